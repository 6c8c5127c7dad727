/* mixture: the BTX and BAM mixture-of-experts models of method.md sections 3 and 4.
 *
 *   h = LN(x)
 *   BTX:            y = x + Attn(h)             + MoE(h)
 *   BAM:            y = x + sum_j g_j(h) MHA_j(h) + MoE(h)      g = softmax(h Wa^T) (soft)
 *   BAM shared KV:  as BAM, but every MHA_j uses one shared Wk, Wv
 *
 *   MoE(h) = sum_{i in TopK(p)} p_i(h) FFN_i(h),   p = softmax(h Wr^T) over all E_f experts
 *            (with ffn_renormalize: the top-k gates are renormalised to sum to one)
 *
 * Auxiliary losses, summed over layers and added to the mean token loss:
 *   alpha * L_lb + beta * L_z,   L_lb = E_f sum_i f_i P_i,   L_z = mean_tokens (logsumexp(Wr h))^2
 * f_i = (top-k assignments to expert i) / (tokens * k), a constant in the backward pass;
 * P_i = mean over tokens of p_i. Per sequence (lb_per_sequence, the default: L_lb is averaged
 * over the sequences, so the loss does not depend on how a batch is split over ranks) or over
 * the whole batch.
 *
 * Layout (bam_tensor_info table, one flat buffer like the dense model). Expert tensors are
 * EXPERT-MAJOR, so each expert's weights are one contiguous block per tensor (an expert is a
 * unit of ownership for expert parallelism and checkpoints):
 *   wte (V,d)  ln (L,d)  ln_f (d)  w_head (V,d) unless tied        averaged when mixed
 *   BTX:            wq (L,d,d) wk (L,kvd,d) wv (L,kvd,d) wo (L,d,d)  (dense attention)
 *   BAM:            att_router (L,Ea,d)  wq (Ea,L,d,d) wk (Ea,L,kvd,d) wv (Ea,L,kvd,d) wo (Ea,L,d,d)
 *   BAM shared KV:  att_router (L,Ea,d)  wq (Ea,L,d,d) wk (L,kvd,d) wv (L,kvd,d) wo (Ea,L,d,d)
 *   FFN:            ffn_router (L,Ef,d)  w_gate (Ef,L,f,d) w_up (Ef,L,f,d) w_down (Ef,L,d,f)
 * Routers do not decay (decay = 0); all other matrices do; norms do not. */
#ifndef BAM_MIXTURE_H
#define BAM_MIXTURE_H

#include <stddef.h>
#include <stdint.h>

#include "bam/core.h"
#include "bam/model.h"

typedef enum {
  BAM_METHOD_BTX = 0,
  BAM_METHOD_BAM = 1,           /* attention experts with their own K/V */
  BAM_METHOD_BAM_SHARED_KV = 2, /* attention experts with one shared K/V */
} bam_method;

const char *bam_method_name(bam_method m); /* "btx", "bam", "bam-shared-kv" */
bam_status bam_method_parse(const char *s, bam_method *out);

typedef struct {
  bam_model_shape base;  /* the dense dimensions every expert shares */
  bam_method method;
  int n_att_experts;     /* Ea: attention experts (BAM); ignored for BTX */
  int n_ffn_experts;     /* Ef: FFN experts */
  int ffn_top_k;         /* k, default 1 */
  int ffn_renormalize;   /* BTX's original: renormalise the top-k gates */
  int att_top_k;         /* 0: soft routing over all Ea (BAM); k: only the top k, not renormalised */
  float lb_coef;         /* alpha, default 0.01 */
  float z_coef;          /* beta, default 0.001 */
  int lb_per_sequence;   /* 1 (default): f_i, P_i per sequence; 0: over the batch */
  float capacity_factor; /* 0: dropless (default); c > 0: at most ceil(c * tokens * k / Ef)
                            tokens per expert per sequence, later tokens dropped */
} bam_mixture_shape;

bam_status bam_mixture_shape_check(const bam_mixture_shape *s);
/* The layout above; returns the tensor count, *total the floats of the flat buffer. */
int bam_mixture_tensors(const bam_mixture_shape *s, bam_tensor_info *out, size_t *total);

typedef struct bam_mix_acts bam_mix_acts;

/* Routing statistics of the last forward, per layer (filled when stats != NULL). */
typedef struct {
  double *ffn_share;   /* (L, Ef): share of top-k assignments per expert */
  double *att_gate;    /* (L, Ea): mean soft attention gate per expert (BAM) */
  double *ffn_entropy; /* (L): mean entropy of p (nats) */
  double *att_entropy; /* (L): mean entropy of g (nats, BAM) */
} bam_route_stats;

typedef struct {
  bam_mixture_shape shape;
  int max_batch;
  int n_tensors;
  bam_tensor_info tensors[BAM_MAX_TENSORS];
  size_t n_params;
  float *params_mem, *grads_mem;
  bam_mix_acts *acts;
  size_t act_bytes;
  float *rope_cos, *rope_sin;
  int last_B, last_T;
  float last_loss;      /* mean token loss (without the auxiliary losses) */
  float last_aux_loss;  /* sum over layers of alpha L_lb + beta L_z */
} bam_mixture;

bam_status bam_mixture_create(bam_mixture **out, const bam_mixture_shape *shape, int max_batch);
void bam_mixture_free(bam_mixture **m);
/* Random init like the dense model (routers N(0, 0.02^2)); upcycling overwrites it. */
void bam_mixture_init(bam_mixture *m, uint64_t seed, float std);
/* The tensor by name, or NULL. */
float *bam_mixture_tensor(bam_mixture *m, const char *name, const bam_tensor_info **info);

/* Forward as bam_model_forward; *loss is the mean token loss PLUS the auxiliary losses
 * (the quantity that is differentiated); m->last_loss holds the token loss alone. */
bam_status bam_mixture_forward(bam_mixture *m, const int32_t *tokens, const int32_t *targets,
                               int B, int T, float *loss);
bam_status bam_mixture_backward(bam_mixture *m, float grad_scale);
void bam_mixture_zero_grad(bam_mixture *m);
float *bam_mixture_logits(bam_mixture *m);
const float *bam_mixture_token_losses(const bam_mixture *m);
/* Routing statistics of the last forward into caller-allocated arrays (see bam_route_stats). */
void bam_mixture_route_stats(const bam_mixture *m, bam_route_stats *out);

/* Forward FLOPs per token (method.md section 5, only the experts a token uses). */
double bam_mixture_flops_per_token(const bam_mixture_shape *s, int T);

#endif
