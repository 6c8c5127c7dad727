/* model: the dense parallel-attention transformer of method.md section 2.
 *
 *   x0 = wte[tokens]
 *   for each layer l:  h = LN_l(x);  x = x + Attn_l(h) + FFN_l(h)
 *   logits = LN_f(x) . W_head^T        (W_head = wte when tied)
 *
 * Attn: q = h Wq^T, k = h Wk^T, v = h Wv^T, RoPE on q and k, causal softmax(q k^T/sqrt(hd)) v,
 * out = concat_heads . Wo^T. FFN: SwiGLU, W_down(silu(W_gate h) * (W_up h)). No biases.
 *
 * Parameters, gradients and AdamW moments each live in ONE contiguous buffer; bam_params is a
 * set of named views into such a buffer, laid out in the order of bam_model_tensors().
 * Activations are allocated once for (max_batch, seq_len) at creation. */
#ifndef BAM_MODEL_H
#define BAM_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "bam/core.h"

typedef struct {
  int n_layers;
  int d_model;
  int n_heads;
  int n_kv_heads; /* divides n_heads; == n_heads for plain multi-head attention */
  int d_ff;       /* SwiGLU hidden size f (the paper's "FFN dim" is 2f) */
  int vocab_size;
  int seq_len;    /* maximum context T */
  int tie_embeddings;
  float rope_base;
  float norm_eps;
} bam_model_shape;

static inline int bam_head_dim(const bam_model_shape *s) { return s->d_model / s->n_heads; }
static inline int bam_kv_dim(const bam_model_shape *s) {
  return s->n_kv_heads * (s->d_model / s->n_heads);
}
bam_status bam_model_shape_check(const bam_model_shape *s);

/* Named views, shapes as (rows, cols) of row-major storage; L = n_layers, d = d_model,
 * kvd = n_kv_heads * head_dim, f = d_ff, V = vocab_size. */
typedef struct {
  float *wte;     /* (V, d)        token embedding */
  float *ln;      /* (L, d)        block norm scale */
  float *wq;      /* (L, d, d)     */
  float *wk;      /* (L, kvd, d)   */
  float *wv;      /* (L, kvd, d)   */
  float *wo;      /* (L, d, d)     */
  float *w_gate;  /* (L, f, d)     */
  float *w_up;    /* (L, f, d)     */
  float *w_down;  /* (L, d, f)     */
  float *ln_f;    /* (d)           final norm scale */
  float *w_head;  /* (V, d)        output head; == wte when tied (not stored twice) */
} bam_params;

#define BAM_MAX_TENSORS 64
#define BAM_MAX_DIMS 4
typedef struct {
  const char *name;  /* "wte", "ln", "wq", ... as in bam_params */
  int ndim;
  int64_t shape[BAM_MAX_DIMS];
  size_t offset;     /* in floats, into the flat buffer */
  size_t numel;
  int decay;         /* 1: weight decay applies (matrices); 0: norms */
} bam_tensor_info;

/* Fill `out` (BAM_MAX_TENSORS entries) with the layout; returns the count. *total gets the
 * number of floats in the flat buffer. */
int bam_model_tensors(const bam_model_shape *s, bam_tensor_info *out, size_t *total);
/* Point the views of `p` into the flat buffer `base` laid out as above. */
void bam_params_view(bam_params *p, const bam_model_shape *s, float *base);

typedef struct bam_acts bam_acts; /* saved activations, private to model.c */

typedef struct {
  bam_model_shape shape;
  int max_batch;          /* B the activations were sized for */
  int n_tensors;
  bam_tensor_info tensors[BAM_MAX_TENSORS];
  size_t n_params;        /* floats in each of the flat buffers below */
  float *params_mem;      /* parameters */
  float *grads_mem;       /* gradients (same layout), allocated with the model */
  bam_params params;
  bam_params grads;
  bam_acts *acts;
  size_t act_bytes;       /* bytes of activations + scratch, for the start-up report */
  float *rope_cos, *rope_sin; /* (seq_len, hd/2) */
  int last_B, last_T;     /* shape of the last forward, for backward */
  float last_loss;        /* mean token loss of the last forward (when targets given) */
  /* 1: the attention and FFN branches of each block run at the same time on two OpenMP
   * threads (each branch's products then single-threaded); 0: one after the other, every
   * product on every thread; -1 (default, auto): concurrently when there are two threads or
   * more (the branches' FLOPs are within 1.5x: they balance) and d_model is at most
   * BAM_CONCURRENT_MAX_D. The same results to float rounding; each mode bitwise repeatable. */
  int concurrent_branches;
} bam_model;

/* Auto concurrent branches only up to this d_model. Small products scale poorly over two
 * threads, so giving each branch a thread wins (quick shape, d 256: dense and BTX 10-25%
 * faster); at d 1024 a two-thread sgemm scales well and the branches' imbalance costs more
 * (paper-small dense and BTX 1-4% slower concurrently; bench/bench.c --concurrent). */
#define BAM_CONCURRENT_MAX_D 512

/* Allocate parameters, gradients and activations for batches of up to max_batch sequences
 * of up to shape->seq_len tokens. Nothing is allocated after this. */
bam_status bam_model_create(bam_model **out, const bam_model_shape *shape, int max_batch);
void bam_model_free(bam_model **m);

/* Norm scales = 1; every matrix ~ N(0, std^2), output projections (wo, w_down) scaled by
 * 1/sqrt(2 L) (GPT-2 style). Deterministic from seed: each (tensor, layer) slice draws from
 * its own RNG stream keyed by the tensor's name and layer index, so values do not depend on
 * the layout around it (tied or not, later layers) nor on the thread count. */
void bam_model_init(bam_model *m, uint64_t seed, float std);

/* Forward over tokens (B, T), T <= seq_len, B <= max_batch. When targets (B, T) is given,
 * returns the mean cross-entropy over the non-ignored targets (target < 0 is ignored) in
 * *loss (loss may be NULL) and keeps what backward needs; per-token losses are available
 * from bam_model_token_losses. Without targets only logits are computed.
 * If every target is ignored the loss is 0 and the backward adds nothing (not 0/0).
 * Errors: BAM_ERR_ARG for B or T out of range, BAM_ERR_DATA for a token outside [0, V) or a
 * target >= V (naming its position), BAM_ERR_NUMERIC for a non-finite loss (*loss is set). */
bam_status bam_model_forward(bam_model *m, const int32_t *tokens, const int32_t *targets, int B,
                             int T, float *loss);
/* Backward of the last forward (which must have had targets). Gradients ACCUMULATE into
 * m->grads_mem, scaled by grad_scale (e.g. 1/n_micro for gradient accumulation). Each
 * forward can be back-propagated once (the logits become their gradient): a second call,
 * or one after a forward without targets, fails with BAM_ERR_ARG. */
bam_status bam_model_backward(bam_model *m, float grad_scale);
void bam_model_zero_grad(bam_model *m);

/* (B*T, V) logits of the last forward. After a backward they hold the logit gradient. */
float *bam_model_logits(bam_model *m);
/* (B*T) per-token losses of the last forward with targets (natural log). */
const float *bam_model_token_losses(const bam_model *m);

/* Forward FLOPs per token for context T (matmuls 2*m*n*k, attention 2*T*d per token per layer
 * for scores and values each averaged over the causal mask as in method.md section 5). */
double bam_model_flops_per_token(const bam_model_shape *s, int T);

#endif
