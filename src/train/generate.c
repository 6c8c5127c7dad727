#include <math.h>
#include <stdlib.h>
#include <string.h>

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

bam_status bam_generate(bam_net *net, const bam_tokenizer *tok, const int32_t *prompt_ids,
                        int n_prompt, const bam_sample_opts *opts, FILE *out) {
  const int T = net->seq_len, V = net->vocab_size;
  if (n_prompt < 1) BAM_FAIL(BAM_ERR_ARG, "the prompt encodes to no tokens");
  int cap = n_prompt + opts->max_new_tokens;
  int32_t *ctx = NULL;
  float *scratch = NULL;
  BAM_CHECK(bam_alloc_checked((void **)&ctx, sizeof(int32_t) * cap, "generation context"));
  bam_status st = bam_alloc_checked((void **)&scratch, sizeof(float) * V, "sampling scratch");
  if (st != BAM_OK) {
    bam_free(ctx);
    return st;
  }
  memcpy(ctx, prompt_ids, sizeof(int32_t) * n_prompt);
  bam_rng rng;
  bam_rng_seed(&rng, opts->seed, 0x6e6e);
  int len = n_prompt;
  char text[256];
  for (int i = 0; i < opts->max_new_tokens; i++) {
    /* No KV cache yet: rerun the window ending at the newest token. */
    int start = len > T ? len - T : 0, n = len - start;
    float loss;
    BAM_CHECK_GOTO(st, bam_net_forward(net, ctx + start, NULL, 1, n, &loss), done);
    const float *logits = bam_net_logits(net) + (size_t)(n - 1) * V;
    int next = sample(logits, V, opts, &rng, scratch);
    ctx[len++] = next;
    if (next == bam_tokenizer_eos(tok)) break;
    size_t tl;
    BAM_CHECK_GOTO(st, bam_tokenizer_decode(tok, &ctx[len - 1], 1, text, sizeof text, &tl), done);
    fwrite(text, 1, tl, out);
    fflush(out);
  }
  fputc('\n', out);
done:
  bam_free(ctx);
  bam_free(scratch);
  return st;
}
