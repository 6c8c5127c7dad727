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
 * targets of the evaluated windows of `val`. The training split is streamed (opened with
 * bam_split_open) and counted in pieces, so no corpus is held in memory. */
static bam_status unigram_loss(const bam_split *train, const bam_split *val, int64_t n_windows,
                               int T, double *out) {
  enum { PIECE = 1 << 16 };
  const int V = train->vocab_size;
  double *count = calloc((size_t)V, sizeof *count);
  int32_t *piece = malloc(PIECE * sizeof *piece);
  bam_status st = BAM_OK;
  if (!count || !piece) {
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "cannot allocate unigram counts");
    goto done;
  }
  for (int64_t at = 0; at < train->n_tokens; at += PIECE) {
    const int64_t len = train->n_tokens - at < PIECE ? train->n_tokens - at : PIECE;
    BAM_CHECK_GOTO(st, bam_split_read(train, at, len, piece), done);
    for (int64_t i = 0; i < len; i++) count[piece[i]] += 1.0;
  }
  const double total = (double)train->n_tokens + 0.5 * V;
  double nll = 0;
  int64_t n = 0;
  for (int64_t w = 0; w < n_windows; w++)
    for (int t = 1; t <= T; t++) {
      int32_t y = val->tokens[w * T + t];
      nll -= log((count[y] + 0.5) / total);
      n++;
    }
  *out = n ? nll / (double)n : NAN;
done:
  free(count);
  free(piece);
  return st;
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
  memset(out, 0, sizeof *out * (size_t)n);
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
    /* Mixtures: routing statistics, token-weighted; layout [ffn L*Ef | att L*Ea | ent 2L] */
    const bam_mixture_shape *ms = net->mix ? &net->mix->shape : NULL;
    const int L = ms ? ms->base.n_layers : 0, Ef = ms ? ms->n_ffn_experts : 0;
    const int Ea = ms && ms->method != BAM_METHOD_BTX ? ms->n_att_experts : 0;
    const size_t n_stats = ms ? (size_t)L * (Ef + Ea + 2) : 0;
    double *acc = n_stats ? calloc(2 * n_stats, sizeof(double)) : NULL, *one = acc ? acc + n_stats : NULL;
    if (n_stats && !acc) {
      bam_split_free(&val);
      st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "cannot allocate routing statistics");
      goto done;
    }
    /* A mixture under expert parallelism computes collectively over its group: every rank
     * makes the same number of forward calls with the same batch, padding with sequences whose
     * targets are all ignored (they add nothing to the sums below). */
    const int lockstep = net->mix && net->mix->ep_size > 1;
    const int64_t stride = (int64_t)world * batch_size;
    const int64_t rounds = (n_windows + stride - 1) / stride;
    for (int64_t round = 0; round < rounds; round++) {
      const int64_t w0 = round * stride + (int64_t)rank * batch_size;
      const int64_t left = n_windows - w0;
      const int Bv = (int)(left <= 0 ? 0 : left < batch_size ? left : batch_size);
      if (Bv == 0 && !lockstep) break;
      const int B = lockstep ? batch_size : Bv;
      for (int b = 0; b < B; b++) {
        const int64_t w = b < Bv ? w0 + b : 0;
        memcpy(x + (size_t)b * T, val.tokens + w * T, sizeof(int32_t) * T);
        if (b < Bv) memcpy(y + (size_t)b * T, val.tokens + w * T + 1, sizeof(int32_t) * T);
        else for (int i = 0; i < T; i++) y[(size_t)b * T + i] = -1;
      }
      float loss;
      st = bam_net_forward(net, x, y, B, T, &loss);
      if (st != BAM_OK) break;
      const float *tl = bam_net_token_losses(net);
      for (long i = 0; i < (long)Bv * T; i++) sums[0] += tl[i];
      sums[1] += (double)Bv * T;
      if (acc && Bv > 0) {
        bam_route_stats rs = {one, Ea ? one + (size_t)L * Ef : NULL, one + (size_t)L * (Ef + Ea),
                              one + (size_t)L * (Ef + Ea) + L, Bv * T};
        bam_mixture_route_stats(net->mix, &rs);
        for (size_t i = 0; i < n_stats; i++) acc[i] += one[i] * Bv * T;
      }
    }
    if (st == BAM_OK)
      MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, comm);
    if (st == BAM_OK && acc)
      MPI_Allreduce(MPI_IN_PLACE, acc, (int)n_stats, MPI_DOUBLE, MPI_SUM, comm);
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
      if (acc) {
        for (size_t i = 0; i < n_stats; i++) acc[i] /= sums[1];
        r->n_layers = L, r->n_ffn = Ef, r->n_att = Ea;
        r->ffn_share = acc; /* owns the block: the other arrays point into it */
        r->att_gate = Ea ? acc + (size_t)L * Ef : NULL;
        r->ffn_entropy = acc + (size_t)L * (Ef + Ea);
        r->att_entropy = Ea ? acc + (size_t)L * (Ef + Ea) + L : NULL;
        acc = NULL;
      }
      if (with_unigram) {
        bam_split train = {0};
        st = bam_split_open(&train, cfg->data_dir, names[d], "train", V);
        if (st == BAM_OK) st = unigram_loss(&train, &val, n_windows, T, &r->unigram_loss);
        bam_split_free(&train);
      }
    }
    free(acc);
    bam_split_free(&val);
  }
done:
  bam_free(x);
  bam_free(y);
  if (st == BAM_OK) *n_out = n;
  else bam_eval_results_free(out, n);
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

void bam_eval_results_free(bam_eval_result *r, int n) {
  for (int i = 0; i < n; i++) {
    free(r[i].ffn_share);
    r[i].ffn_share = r[i].att_gate = r[i].ffn_entropy = r[i].att_entropy = NULL;
  }
}

void bam_eval_print_routing(const bam_eval_result *r, int n, FILE *f) {
  for (int i = 0; i < n; i++) {
    if (!r[i].ffn_share) continue;
    const int L = r[i].n_layers, Ef = r[i].n_ffn, Ea = r[i].n_att;
    fprintf(f, "routing on %s (share of FFN assignments per expert%s):\n", r[i].domain,
            Ea ? "; mean soft attention gate per expert" : "");
    int dead = 0;
    for (int l = 0; l < L; l++) {
      fprintf(f, "  layer %d  ffn", l);
      for (int e = 0; e < Ef; e++) {
        fprintf(f, " %5.3f", r[i].ffn_share[l * Ef + e]);
        dead += r[i].ffn_share[l * Ef + e] == 0.0;
      }
      fprintf(f, "  (H %.2f)", r[i].ffn_entropy[l]);
      if (Ea) {
        fprintf(f, "   att");
        for (int e = 0; e < Ea; e++) fprintf(f, " %5.3f", r[i].att_gate[l * Ea + e]);
        fprintf(f, "  (H %.2f)", r[i].att_entropy[l]);
      }
      fprintf(f, "\n");
    }
    if (dead) fprintf(f, "  %d (layer, expert) pairs received no %s token\n", dead, r[i].domain);
  }
  fflush(f);
}

void bam_eval_write_routing_csv(const bam_eval_result *r, int n, FILE *f) {
  fprintf(f, "domain,layer,router,expert,value\n");
  for (int i = 0; i < n; i++) {
    if (!r[i].ffn_share) continue;
    const int L = r[i].n_layers, Ef = r[i].n_ffn, Ea = r[i].n_att;
    for (int l = 0; l < L; l++) {
      for (int e = 0; e < Ef; e++)
        fprintf(f, "%s,%d,ffn,%d,%.6f\n", r[i].domain, l, e, r[i].ffn_share[l * Ef + e]);
      for (int e = 0; e < Ea; e++)
        fprintf(f, "%s,%d,att,%d,%.6f\n", r[i].domain, l, e, r[i].att_gate[l * Ea + e]);
      fprintf(f, "%s,%d,ffn_entropy,-1,%.6f\n", r[i].domain, l, r[i].ffn_entropy[l]);
      if (Ea) fprintf(f, "%s,%d,att_entropy,-1,%.6f\n", r[i].domain, l, r[i].att_entropy[l]);
    }
  }
}
