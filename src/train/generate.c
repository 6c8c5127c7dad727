#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bam/decode.h"
#include "bam/train.h"

/* Sample from logits (V) with temperature and top-k; temperature 0 is greedy. */
static int sample(const float *logits, int V, const bam_sample_opts *o, bam_rng *rng,
                  float *scratch) {
  int best = 0;
  for (int i = 1; i < V; i++)
    if (logits[i] > logits[best]) best = i;
  if (o->temperature <= 0) return best;
  /* top-k threshold: the k-th largest logit (k small: partial selection by repeated scans
   * would be O(kV); a copy + quickselect is O(V)). */
  float threshold = -INFINITY;
  if (o->top_k > 0 && o->top_k < V) {
    memcpy(scratch, logits, sizeof(float) * V);
    int lo = 0, hi = V - 1, k = o->top_k - 1; /* k-th largest = index k in descending order */
    while (lo < hi) {
      float pivot = scratch[(lo + hi) / 2];
      int i = lo, j = hi;
      while (i <= j) {
        while (scratch[i] > pivot) i++;
        while (scratch[j] < pivot) j--;
        if (i <= j) {
          float t = scratch[i];
          scratch[i] = scratch[j];
          scratch[j] = t;
          i++, j--;
        }
      }
      if (k <= j) hi = j;
      else if (k >= i) lo = i;
      else break;
    }
    threshold = scratch[k];
  }
  double z = 0;
  for (int i = 0; i < V; i++)
    z += logits[i] >= threshold ? exp((logits[i] - logits[best]) / o->temperature) : 0.0;
  double u = bam_rng_uniform(rng) * z, acc = 0;
  for (int i = 0; i < V; i++) {
    if (logits[i] < threshold) continue;
    acc += exp((logits[i] - logits[best]) / o->temperature);
    if (acc > u) return i;
  }
  return best;
}

/* Where the next-token logits come from: the KV cache, or a full forward of the window. */
typedef struct {
  bam_net *net;
  bam_decoder *dec; /* NULL: recompute (--no-cache) */
  int cache_start;  /* the context position of cache row 0 */
  float *logits;    /* (V), the cached path's output */
} logit_source;

/* Logits of the token after ctx[0, len), given the window of its last seq_len tokens. The
 * cached path steps when the cache holds exactly ctx[0, len-1) and has room; otherwise (the
 * prompt, or a context longer than seq_len, where the window slides and every position
 * moves) it prefills the window anew. */
static bam_status next_logits(logit_source *src, const int32_t *ctx, int len, const float **out) {
  const int T = src->net->seq_len, start = len > T ? len - T : 0, n = len - start;
  bam_decoder *dec = src->dec;
  if (!dec) {
    float loss;
    BAM_CHECK(bam_net_forward(src->net, ctx + start, NULL, 1, n, &loss));
    *out = bam_net_logits(src->net) + (size_t)(n - 1) * src->net->vocab_size;
    return BAM_OK;
  }
  const int cached = bam_decoder_len(dec);
  if (src->cache_start == 0 && start == 0 && cached == len - 1 && cached > 0 &&
      cached < bam_decoder_max_len(dec)) {
    BAM_CHECK(bam_decoder_step(dec, ctx[len - 1], src->logits));
  } else {
    bam_decoder_reset(dec);
    BAM_CHECK(bam_decoder_prefill(dec, ctx + start, n, src->logits));
    src->cache_start = start;
  }
  *out = src->logits;
  return BAM_OK;
}

bam_status bam_generate(bam_net *net, const bam_tokenizer *tok, const int32_t *prompt_ids,
                        int n_prompt, const bam_sample_opts *opts, FILE *out) {
  const int T = net->seq_len, V = net->vocab_size;
  if (n_prompt < 1) BAM_FAIL(BAM_ERR_ARG, "the prompt encodes to no tokens");
  const int cap = n_prompt + opts->max_new_tokens;
  int32_t *ctx = NULL;
  float *scratch = NULL;
  logit_source src = {.net = net};
  bam_status st = BAM_OK;
  /* Everything is allocated here, before the first token. */
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&ctx, sizeof(int32_t) * cap, "generation context"),
                 done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&scratch, sizeof(float) * V, "sampling scratch"),
                 done);
  if (!opts->no_cache) {
    BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&src.logits, sizeof(float) * V, "logits"), done);
    BAM_CHECK_GOTO(st, bam_decoder_create(&src.dec, net->dense, net->mix, cap < T ? cap : T),
                   done);
  }
  memcpy(ctx, prompt_ids, sizeof(int32_t) * n_prompt);
  bam_rng rng;
  bam_rng_seed(&rng, opts->seed, 0x6e6e);
  int len = n_prompt, made = 0;
  char text[256];
  const double t0 = bam_now();
  double t_prefill = 0.0;
  for (int i = 0; i < opts->max_new_tokens; i++) {
    const float *logits = NULL;
    BAM_CHECK_GOTO(st, next_logits(&src, ctx, len, &logits), done);
    if (i == 0) t_prefill = bam_now() - t0;
    int next = sample(logits, V, opts, &rng, scratch);
    ctx[len++] = next;
    made++;
    if (next == bam_tokenizer_eos(tok)) break;
    size_t tl;
    BAM_CHECK_GOTO(st, bam_tokenizer_decode(tok, &ctx[len - 1], 1, text, sizeof text, &tl), done);
    fwrite(text, 1, tl, out);
    fflush(out);
  }
  fputc('\n', out);
  if (opts->timing) {
    /* The generation phase: every token after the prompt's pass (its steps, sampling and
     * decoding; the first new token comes from the prompt's logits). */
    const double t_gen = bam_now() - t0 - t_prefill;
    fprintf(stderr,
            "generate: %s, %s: prompt %d tokens in %.1f ms; %d new tokens in %.1f ms after it "
            "(%.1f tokens/s)\n",
            net->kind, src.dec ? "KV cache" : "no cache, full recompute", n_prompt,
            1e3 * t_prefill, made, 1e3 * t_gen, t_gen > 0 ? made / t_gen : 0.0);
  }
done:
  bam_decoder_free(&src.dec);
  bam_free(src.logits);
  bam_free(ctx);
  bam_free(scratch);
  return st;
}
