/* optim: AdamW on flat buffers, the warm-up + cosine learning-rate schedule, and global-norm
 * gradient clipping.
 *
 * The AdamW update follows torch.optim.AdamW (single-tensor CPU path) operation by
 * operation, in float, so a run can be compared step by step with a PyTorch reference:
 *
 *   p  = p * (1 - lr*wd)                          decoupled weight decay (decay tensors only)
 *   m  = lerp(m, g, 1 - b1)                       = b1 m + (1-b1) g, as m + w (g - m)
 *   v  = v * b2 + (1-b2) * g * g
 *   denom = sqrt(v) / sqrt(1 - b2^t) + eps
 *   p  = p + (-(lr / (1 - b1^t)) * m) / denom
 *
 * Scalars (bias corrections, step size) are computed in double, as Python computes them, and
 * rounded to float once, as PyTorch does when it applies a Python scalar to a float tensor. */
#include <math.h>
#include <string.h>

#include "bam/optim.h"

/* Element-wise loops shorter than this stay serial (a thread team costs microseconds). */
#define PAR_MIN_WORK 16384

void bam_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr,
                      const bam_adamw_hparams *h, int step, int decay) {
  const double b1 = h->beta1, b2 = h->beta2, t = step < 1 ? 1 : step;
  /* Without decay the factor is exactly 1 and p * 1 == p bitwise: no branch in the loop. */
  const float keep = decay ? (float)(1.0 - (double)lr * (double)h->weight_decay) : 1.0f;
  /* torch's vectorised CPU lerp(self, end, w), w = 1 - b1: fma(w, end - self, self) for
   * |w| < 0.5, else fma(w - 1, end - self, end). fmaf is one instruction with FMA hardware. */
  const float w1 = (float)(1.0 - b1);
  const int lerp_small = fabsf(w1) < 0.5f;
  const float lerp_w = lerp_small ? w1 : w1 - 1.0f;
  const float beta2 = (float)b2, w2 = (float)(1.0 - b2);
  const float bc2_sqrt = (float)sqrt(1.0 - pow(b2, t));
  const float neg_step = (float)(-((double)lr / (1.0 - pow(b1, t))));
  const float eps = h->eps;
  /* Note: sqrtf's errno side effect keeps GCC from vectorising this loop unless the build
   * uses -fno-math-errno (which, unlike -ffast-math, changes no floating-point result). */
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
  for (size_t i = 0; i < n; i++) {
    const float gi = g[i], mo = m[i];
    const float pi = p[i] * keep;
    const float mi = fmaf(lerp_w, gi - mo, lerp_small ? mo : gi);
    float vi = v[i] * beta2;
    vi = vi + w2 * gi * gi; /* addcmul: self + value * t1 * t2, left to right */
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    p[i] = pi + neg_step * mi / denom; /* addcdiv: self + value * t1 / t2, left to right */
    m[i] = mi;
    v[i] = vi;
  }
}

void bam_adamw_step(float *params, const float *grads, float *m, float *v,
                    const bam_tensor_info *tensors, int n_tensors, float lr,
                    const bam_adamw_hparams *h, int step) {
  for (int i = 0; i < n_tensors; i++) {
    const bam_tensor_info *t = &tensors[i];
    bam_adamw_update(params + t->offset, grads + t->offset, m + t->offset, v + t->offset, t->numel,
                     lr, h, step, t->decay);
  }
}

void bam_adamw_step_range(float *params, const float *grads, float *m_own, float *v_own,
                          const bam_tensor_info *tensors, int n_tensors, size_t lo, size_t hi,
                          float lr, const bam_adamw_hparams *h, int step) {
  for (int i = 0; i < n_tensors; i++) {
    const bam_tensor_info *t = &tensors[i];
    size_t a = t->offset > lo ? t->offset : lo;
    size_t b = t->offset + t->numel < hi ? t->offset + t->numel : hi;
    if (a >= b) continue;
    bam_adamw_update(params + a, grads + a, m_own + (a - lo), v_own + (a - lo), b - a, lr, h, step,
                     t->decay);
  }
}

float bam_lr_at(int step, int warmup, int total, float peak, float min_ratio) {
  if (step < 0) step = 0;
  if (step < warmup) return peak * (float)(step + 1) / (float)warmup;
  const double lo = (double)min_ratio * (double)peak;
  if (step >= total) return (float)lo; /* past the schedule: stay at the floor */
  /* cosine from peak at step == warmup to lo at step == total */
  const double progress = (double)(step - warmup) / (double)(total - warmup);
  const double c = 0.5 * (1.0 + cos(M_PI * progress));
  return (float)(lo + c * ((double)peak - lo));
}

/* The sum of squares is split into a FIXED number of contiguous chunks whatever the thread
 * count; each chunk is summed by one thread in a fixed order (8 interleaved double lanes,
 * which the compiler can vectorise without reordering), and the chunk sums are added in chunk
 * order. The result is therefore bitwise reproducible for any thread count or schedule. */
#define NORM_CHUNKS 256

double bam_sum_squares(const float *g, size_t n) {
  double part[NORM_CHUNKS];
  const size_t chunk = (n + NORM_CHUNKS - 1) / NORM_CHUNKS;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
  for (int c = 0; c < NORM_CHUNKS; c++) {
    size_t lo = (size_t)c * chunk, hi = lo + chunk;
    if (lo > n) lo = n;
    if (hi > n) hi = n;
    double lane[8] = {0};
    size_t i = lo;
    for (; i + 8 <= hi; i += 8)
      for (int j = 0; j < 8; j++) lane[j] += (double)g[i + j] * (double)g[i + j];
    for (int j = 0; i < hi; i++, j++) lane[j] += (double)g[i] * (double)g[i];
    part[c] =
        ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  double s = 0.0;
  for (int c = 0; c < NORM_CHUNKS; c++) s += part[c];
  return s;
}

double bam_grad_norm(const float *g, size_t n) { return sqrt(bam_sum_squares(g, n)); }

void bam_scale(float *g, size_t n, float s) {
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
  for (size_t i = 0; i < n; i++) g[i] *= s;
}

double bam_clip_grad(float *g, size_t n, double max_norm) {
  const double norm = bam_grad_norm(g, n);
  /* Unlike torch.nn.utils.clip_grad_norm_ (max/(norm + 1e-6)) the scale is exactly
   * max/norm, so the clipped norm is max_norm up to float rounding. A non-finite norm is
   * returned untouched for the caller to detect: scaling by it would wipe the gradient. */
  if (!isfinite(norm) || norm <= max_norm) return norm;
  const float scale = (float)(max_norm / norm);
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
  for (size_t i = 0; i < n; i++) g[i] *= scale;
  return norm;
}
