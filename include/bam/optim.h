/* optim: AdamW on flat buffers, the learning-rate schedule, gradient clipping. */
#ifndef BAM_OPTIM_H
#define BAM_OPTIM_H

#include <stddef.h>

#include "bam/model.h"

typedef struct {
  float beta1, beta2, eps, weight_decay;
} bam_adamw_hparams;

/* One AdamW step (decoupled weight decay, bias-corrected; step counts from 1) over a flat
 * range:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *         p -= lr * ( m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p )      wd only if decay. */
/* Evaluated in float with torch.optim.AdamW's order of operations (p *= 1 - lr*wd first,
 * m via lerp, sqrt(v)/sqrt(1-b2^t) + eps, then p += -(lr/(1-b1^t)) * m / denom), which is
 * the formula above rearranged, so runs track a PyTorch reference closely. */
void bam_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr,
                      const bam_adamw_hparams *h, int step, int decay);
/* The same over every tensor of a model layout (decay per tensor's flag). */
void bam_adamw_step(float *params, const float *grads, float *m, float *v,
                    const bam_tensor_info *tensors, int n_tensors, float lr,
                    const bam_adamw_hparams *h, int step);

/* AdamW over the slice [lo, hi) of a layout (sharded optimizer state): params and grads are
 * indexed globally, m_own and v_own hold only the slice (m_own[0] is element lo). Updates the
 * same elements exactly as bam_adamw_step would. */
void bam_adamw_step_range(float *params, const float *grads, float *m_own, float *v_own,
                          const bam_tensor_info *tensors, int n_tensors, size_t lo, size_t hi,
                          float lr, const bam_adamw_hparams *h, int step);

/* Linear warm-up from lr/warmup to peak over `warmup` steps, then cosine decay to
 * min_ratio * peak at `total`; step counts from 0:
 *   step < warmup:           peak * (step + 1) / warmup
 *   warmup <= step < total:  min + (peak - min) * (1 + cos(pi (step - warmup)/(total - warmup)))/2
 *   step >= total:           min = min_ratio * peak */
float bam_lr_at(int step, int warmup, int total, float peak, float min_ratio);

/* L2 norm of a flat buffer, accumulated in double over a fixed chunking that does not depend
 * on the thread count: bitwise reproducible for any number of threads. */
double bam_grad_norm(const float *g, size_t n);
/* Sum of squares in double, bitwise reproducible for any thread count. */
double bam_sum_squares(const float *g, size_t n);
void bam_scale(float *g, size_t n, float s); /* g *= s */
/* Scale g so its norm is at most max_norm (by exactly max_norm/norm; torch adds 1e-6 to the
 * norm); returns the norm before clipping. A non-finite norm is returned with g untouched. */
double bam_clip_grad(float *g, size_t n, double max_norm);

#endif
