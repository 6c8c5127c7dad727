/* decode: incremental generation with a key/value cache, for the dense model and the BTX,
 * BAM and BAM shared-KV mixtures (the inference side of method.md sections 2 and 3).
 *
 * The training forward (model.c, mixture.c) recomputes every position. A decoder keeps, per
 * layer, the RoPE-rotated keys and the values of every token seen so far, so a new token
 * costs one pass of matrix-vector products over the weights plus attention over the cache:
 *
 *   h = LN_l(x)                                      x the new token's residual row
 *   dense, BTX:     a = Attn(h)                      one K/V cache per layer
 *   BAM:            a = sum_j g_j MHA_j(h)           one K/V cache per attention expert
 *   BAM shared KV:  as BAM, every MHA_j reads one    one K/V cache per layer, shared
 *   g = softmax(h Wa^T); with att_top_k only the top a entries, not renormalised
 *   MoE(h) = sum_{i in TopK(p)} p_i FFN_i(h)         p = softmax(h Wr^T); renormalised over the
 *                                                    top-k with ffn_renormalize; no capacity
 *   x' = x + a + MoE(h)      (dense: + FFN(h)),  logits = LN_f(x_L) W_head^T
 *
 * Cache layout: K and V are each (L, S, max_len, kvd) floats, S the K/V sets of a layer
 * (Ea for BAM with KV experts, else 1), kvd = n_kv_heads * head_dim: a token of context
 * costs 2 L S kvd floats. With att_top_k every expert's K/V is still computed for every
 * token (a later token may route to an expert this one skipped); only Q, attention and W_o
 * are limited to the kept experts.
 *
 * The decoder borrows the weights of the model or mixture it was created from (which must
 * outlive it and may be updated in place between calls); a sharded mixture (holding only its
 * rank's experts) is refused. Every buffer, cache and scratch, is
 * allocated once in bam_decoder_create: prefill and step allocate nothing. Products over
 * several rows (prefill) are cblas_sgemm calls, a single row (step) cblas_sgemv. */
#ifndef BAM_DECODE_H
#define BAM_DECODE_H

#include <stddef.h>
#include <stdint.h>

#include "bam/core.h"
#include "bam/mixture.h"
#include "bam/model.h"

typedef struct bam_decoder bam_decoder;

/* A decoder over exactly one of `dense` and `mix` (the other NULL) with room for max_len
 * tokens of context, 1 <= max_len <= the network's seq_len (the positions it was trained
 * on). */
bam_status bam_decoder_create(bam_decoder **out, bam_model *dense, bam_mixture *mix,
                              int max_len);
void bam_decoder_free(bam_decoder **dec); /* nulls the pointer; NULL is fine */
/* Forget the context (the next prefill starts at position 0). */
void bam_decoder_reset(bam_decoder *dec);

/* Append n >= 1 tokens at positions len .. len+n-1 (len = the tokens already cached, 0 after
 * create or reset) in one batched pass, filling the cache. logits: NULL, or V floats that
 * receive the next-token logits after the last of them. A context that would not fit
 * (len + n > max_len) is refused with BAM_ERR_ARG and leaves the decoder unchanged; a token
 * outside [0, V) with BAM_ERR_DATA. */
bam_status bam_decoder_prefill(bam_decoder *dec, const int32_t *tokens, int n, float *logits);
/* One token at position len: as bam_decoder_prefill with n = 1, through matrix-vector
 * products. */
bam_status bam_decoder_step(bam_decoder *dec, int32_t token, float *logits);

int bam_decoder_len(const bam_decoder *dec);     /* tokens in the cache */
int bam_decoder_max_len(const bam_decoder *dec);
int bam_decoder_vocab(const bam_decoder *dec);
const char *bam_decoder_kind(const bam_decoder *dec); /* "dense", "btx", "bam", "bam-shared-kv" */
/* Bytes of K/V cache per token of context (2 L S kvd floats) and of everything the decoder
 * allocated (caches and scratch). */
size_t bam_decoder_kv_bytes_per_token(const bam_decoder *dec);
size_t bam_decoder_bytes(const bam_decoder *dec);

#endif
