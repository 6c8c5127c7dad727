#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bam/train.h"

/* Split "a,b,c" into names; returns the count or -1 when there are too many / too long. */
static int split_names(const char *list, char names[][BAM_NAME_MAX], int cap) {
  int n = 0;
  const char *p = list;
  while (*p) {
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    while (len && *p == ' ') p++, len--;
    while (len && p[len - 1] == ' ') len--;
    if (len) {
      if (n == cap || len >= BAM_NAME_MAX) return -1;
      memcpy(names[n], p, len);
      names[n][len] = 0;
      n++;
    }
    if (!e) break;
    p = e + 1;
  }
  return n;
}

/* Cross-entropy (nats/token) of an add-1/2 smoothed unigram model of `train` on the
 * targets of the evaluated windows of `val`. */
static double unigram_loss(const bam_split *train, const bam_split *val, int64_t n_windows, int T) {
  int V = train->vocab_size;
  double *count = calloc((size_t)V, sizeof *count);
  if (!count) return NAN;
  for (int64_t i = 0; i < train->n_tokens; i++) count[train->tokens[i]] += 1.0;
  double total = (double)train->n_tokens + 0.5 * V;
  double nll = 0;
  int64_t n = 0;
  for (int64_t w = 0; w < n_windows; w++)
    for (int t = 1; t <= T; t++) {
      int32_t y = val->tokens[w * T + t];
      nll -= log((count[y] + 0.5) / total);
      n++;
    }
  free(count);
  return n ? nll / (double)n : NAN;
}

bam_status bam_evaluate(bam_net *net, const bam_config *cfg, const char *domains, int max_tokens,
                        int batch_size, int with_unigram, const char *tokenizer_id,
                        bam_eval_result *out, int *n_out, MPI_Comm comm) {
  int rank, world;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  char names[BAM_MAX_DOMAINS][BAM_NAME_MAX];
  int n = split_names(domains, names, BAM_MAX_DOMAINS);
  if (n <= 0) BAM_FAIL(BAM_ERR_ARG, "no valid domains in '%s'", domains);
  const int T = net->seq_len, V = net->vocab_size;
  if (batch_size > net->max_batch) batch_size = net->max_batch;
  int32_t *x = NULL, *y = NULL;
  BAM_CHECK(bam_alloc_checked((void **)&x, sizeof(int32_t) * (size_t)batch_size * T, "eval inputs"));
  bam_status st = bam_alloc_checked((void **)&y, sizeof(int32_t) * (size_t)batch_size * T, "eval targets");
  for (int d = 0; d < n && st == BAM_OK; d++) {
    bam_split val = {0};
    BAM_CHECK_GOTO(st, bam_split_load(&val, cfg->data_dir, names[d], "val", V), done);
    if (tokenizer_id && tokenizer_id[0] && strcmp(val.tokenizer, tokenizer_id) != 0) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s/tokens/%s.h5: tokenizer '%s' differs from the model's '%s'",
                         cfg->data_dir, names[d], val.tokenizer, tokenizer_id);
      bam_split_free(&val);
      goto done;
    }
    int64_t n_windows = (val.n_tokens - 1) / T;
    if (max_tokens > 0 && n_windows > max_tokens / T) n_windows = max_tokens / T;
    if (n_windows < 1) n_windows = val.n_tokens > T ? 1 : 0;
    if (n_windows == 0) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s/tokens/%s.h5: validation split has %lld tokens, fewer than seq_len+1",
                         cfg->data_dir, names[d], (long long)val.n_tokens);
      bam_split_free(&val);
      goto done;
    }
    /* Rank r takes batches of windows starting at r*batch, r*batch + world*batch, ... */
    double sums[2] = {0, 0}; /* nll, tokens */
    for (int64_t w0 = (int64_t)rank * batch_size; w0 < n_windows; w0 += (int64_t)world * batch_size) {
      int B = (int)((n_windows - w0) < batch_size ? (n_windows - w0) : batch_size);
      for (int b = 0; b < B; b++) {
        memcpy(x + (size_t)b * T, val.tokens + (w0 + b) * T, sizeof(int32_t) * T);
        memcpy(y + (size_t)b * T, val.tokens + (w0 + b) * T + 1, sizeof(int32_t) * T);
      }
      float loss;
      st = bam_net_forward(net, x, y, B, T, &loss);
      if (st != BAM_OK) break;
      const float *tl = bam_net_token_losses(net);
      for (long i = 0; i < (long)B * T; i++) sums[0] += tl[i];
      sums[1] += (double)B * T;
    }
    if (st == BAM_OK)
      MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, comm);
    if (st == BAM_OK) {
      bam_eval_result *r = &out[d];
      memset(r, 0, sizeof *r);
      bam_strlcpy(r->domain, names[d], sizeof r->domain);
      r->tokens = (int64_t)sums[1];
      r->loss = sums[0] / sums[1];
      r->ppl = exp(r->loss);
      /* The evaluated windows cover tokens/n_tokens of the split; its byte count scales
       * with that share (exact when the whole split is evaluated). */
      double bytes = (double)val.text_bytes * sums[1] / (double)(val.n_tokens - 1);
      r->bpb = sums[0] / log(2.0) / bytes;
      r->unigram_loss = NAN;
      if (with_unigram) {
        bam_split train = {0};
        st = bam_split_load(&train, cfg->data_dir, names[d], "train", V);
        if (st == BAM_OK) r->unigram_loss = unigram_loss(&train, &val, n_windows, T);
        bam_split_free(&train);
      }
    }
    bam_split_free(&val);
  }
done:
  bam_free(x);
  bam_free(y);
  if (st == BAM_OK) *n_out = n;
  return st;
}

void bam_eval_print(const bam_eval_result *r, int n, FILE *f) {
  int uni = 0;
  for (int i = 0; i < n; i++) uni |= !isnan(r[i].unigram_loss);
  fprintf(f, "%-12s %10s %9s %10s %8s%s\n", "domain", "tokens", "loss", "perplexity", "bits/B",
          uni ? "  unigram-loss" : "");
  double sl = 0, sp = 0, sb = 0;
  for (int i = 0; i < n; i++) {
    fprintf(f, "%-12s %10lld %9.4f %10.2f %8.4f", r[i].domain, (long long)r[i].tokens, r[i].loss,
            r[i].ppl, r[i].bpb);
    if (uni) fprintf(f, "  %12.4f", r[i].unigram_loss);
    fprintf(f, "\n");
    sl += r[i].loss, sp += r[i].ppl, sb += r[i].bpb;
  }
  if (n > 1)
    fprintf(f, "%-12s %10s %9.4f %10.2f %8.4f\n", "average", "", sl / n, sp / n, sb / n);
  fflush(f);
}
