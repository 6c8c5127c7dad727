/* kernels: pure forward and backward math on plain row-major float arrays.
 *
 * Conventions (after llm.c): arguments are ordered outputs, saved-for-backward, inputs,
 * weights, dimensions. Forward kernels overwrite their outputs; backward kernels ACCUMULATE
 * (+=) into every gradient they are given, so residual branches and gradient accumulation
 * need no extra code. A NULL gradient pointer means "not needed". Kernels know nothing of
 * models, MPI or files. Every matrix product goes through cblas_sgemm; loops over rows, heads
 * and sequences are OpenMP-parallel. Results are deterministic for a fixed thread count and
 * do not depend on scheduling (no atomics, no reductions whose order depends on threads). */
#ifndef BAM_KERNELS_H
#define BAM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---- the kernels OpenBLAS runs ("Haswell", "SkylakeX", "Cooperlake", "Zen", ...): chosen by
 * the library when it loads, from the CPU or from OPENBLAS_CORETYPE (src/kernels/blas.c). */
const char *bam_blas_kernels(void);
/* One line for people: the kernels and where the choice came from (OPENBLAS_CORETYPE or the
 * library), noting when a setting keeps an AVX-512 CPU on AVX2 kernels. */
void bam_blas_describe(char *buf, size_t n);

/* ---- linear layer: y(n,out) = x(n,in) . W(out,in)^T  (PyTorch nn.Linear layout, no bias) */
void bam_matmul_forward(float *y, const float *x, const float *w, int n, int in, int out);
/* y1 = x . W1^T and y2 = x . W2^T, two products of one input and one shape (K and V, gate and
 * up): side by side, one thread each, when the rank has exactly two OpenMP threads. */
void bam_matmul_forward2(float *y1, const float *w1, float *y2, const float *w2, const float *x,
                         int n, int in, int out);
/* dx(n,in) += dy(n,out) . W(out,in);   dw(out,in) += dy(n,out)^T . x(n,in) */
void bam_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         int n, int in, int out);

/* ---- LayerNorm with a learned scale and no bias, over the last dimension d:
 *   y = (x - mean) * rstd * g,   rstd = 1/sqrt(var + eps),  var the biased variance.
 * mean(n) and rstd(n) are saved for the backward pass. */
void bam_layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *g,
                           int n, int d, float eps);
void bam_layernorm_backward(float *dx, float *dg, const float *dy, const float *x,
                            const float *g, const float *mean, const float *rstd, int n, int d);

/* ---- RoPE, "rotate-half" pairing: within each head of size hd, dimension i < hd/2 pairs
 * with i + hd/2 and is rotated by angle pos * base^(-2i/hd):
 *   x'[i]      = x[i] cos - x[i+hd/2] sin
 *   x'[i+hd/2] = x[i] sin + x[i+hd/2] cos
 * Tables cos/sin have shape (max_pos, hd/2). x has shape (B, T, n_heads*hd); the token at
 * index t has position pos0 + t. Forward rotates in place; backward applies the inverse
 * rotation to the gradient in place (RoPE is orthogonal). */
void bam_rope_table(float *cos_t, float *sin_t, int max_pos, int hd, float base);
void bam_rope_forward(float *x, const float *cos_t, const float *sin_t, int B, int T,
                      int n_heads, int hd, int pos0);
void bam_rope_backward(float *dx, const float *cos_t, const float *sin_t, int B, int T,
                       int n_heads, int hd, int pos0);

/* ---- causal multi-head attention with grouped-query heads, fused (src/kernels/attention.c).
 * q (B,T,H*hd), k and v (B,T,Hkv*hd), Hkv divides H; query head h reads kv head
 * h / (H/Hkv); out (B,T,H*hd). The forward saves lse (B,H,T), the log of each row's softmax
 * normaliser of q.k^T/sqrt(hd) under the causal mask; nothing of size T x T is stored, the
 * backward recomputes the probabilities from lse. Both take a scratch of
 * bam_attention_scratch_floats(B, T, Hkv, hd) floats (K and V transposed per head), free
 * again when they return. Deterministic: the same bits for any thread count. */
size_t bam_attention_scratch_floats(int B, int T, int Hkv, int hd);
void bam_attention_forward(float *out, float *lse, float *scratch, const float *q,
                           const float *k, const float *v, int B, int T, int H, int Hkv, int hd);
/* dq, dk, dv accumulate (any may be NULL: not computed); out and lse are the forward's. */
void bam_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                            const float *out, const float *lse, const float *q, const float *k,
                            const float *v, int B, int T, int H, int Hkv, int hd);

/* ---- SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x); n elements. */
void bam_swiglu_forward(float *out, const float *gate, const float *up, long n);
void bam_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                         const float *up, long n);

/* ---- token embedding: out(n,d) = wte[tokens[i]] */
void bam_embedding_forward(float *out, const int32_t *tokens, const float *wte, int n, int d);
/* dwte(V,d) += scatter of dout; deterministic (fixed summation order per row). */
void bam_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int n, int d);

/* ---- softmax cross-entropy over V classes for n rows.
 * losses[i] = logsumexp(logits[i]) - logits[i][targets[i]]  (natural log).
 * A target < 0 marks a row to ignore: its loss is 0 and its gradient 0. */
void bam_crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int n,
                              int V);
/* dlogits[i] += scale * (softmax(logits[i]) - onehot(targets[i])); dlogits may alias logits
 * only when accumulating into zero is not needed: use bam_crossentropy_backward_inplace. */
void bam_crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                               float scale, int n, int V);
/* Fused: overwrites logits with scale * (softmax - onehot) and writes losses. Saves the
 * memory of a separate (n,V) gradient. */
void bam_crossentropy_fused_inplace(float *logits, float *losses, const int32_t *targets,
                                    float scale, int n, int V);

/* ---- small helpers ---- */
void bam_softmax_rows(float *y, const float *x, int n, int d); /* y may alias x */
/* One row in place, on the calling thread (for callers that spread rows over threads
 * themselves, e.g. the decoder's heads); the same values as a row of bam_softmax_rows. */
void bam_softmax_row(float *p, int n);
void bam_add_inplace(float *y, const float *x, long n);       /* y += x */

/* Routers (mixtures). In place, per row of E: logits -> softmax probabilities (max-subtracted,
 * normaliser summed in double); lse (may be NULL) gets each row's logsumexp of the logits. */
void bam_router_softmax(float *p, float *lse, int n, int E);
/* idx[0..k) = the indices of the k largest of p[0..E), descending; equal values go to the lower
 * index. */
void bam_topk_select(int32_t *idx, const float *p, int E, int k);

#endif
