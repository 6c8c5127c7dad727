/* bam-latency: the BAM paper's inference latency case (a 256-token prompt, then 16 greedy
 * tokens, batch 1) for the dense model and the BTX / BAM / BAM shared-KV mixtures, with the
 * KV cache (decode.h) and without it (the whole window recomputed for every token).
 *
 *   build/bam-latency [--shape quick|paper-small|all] [--kind dense|btx|bam|bam-shared-kv|all]
 *                     [--prompt 256] [--new 16] [--runs 10] [--nocache-runs N] [--experts 4]
 *                     [--threads T]
 *
 * One JSON line per (shape, kind): the medians over the runs (after one warm-up run) of the
 * prefill time (the prompt's pass, which also gives the first new token), the decode time per
 * token (the other new-1 tokens, one step each), and the total; the same three without the
 * cache; whether both produced the same greedy tokens; and what one decode step must read and
 * compute at the mean context of the decode steps: weights read (only the experts a token uses), K/V cache
 * read, FLOPs, and the bandwidth the measured step time implies. Random initialisation and
 * random prompt tokens: timing depends on the shapes, not on the values. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "bam/decode.h"
#include "bam/kernels.h"
#include "bam/net.h"

typedef struct {
  const char *name;
  bam_model_shape shape;
} shape_case;



/* The 1-minute load average (Linux /proc): the other work sharing the machine. */
static double load_average(void) {
  FILE *f = fopen("/proc/loadavg", "r");
  double l = -1;
  if (f && fscanf(f, "%lf", &l) != 1) l = -1;
  if (f) fclose(f);
  return l;
}

static int argmax(const float *x, int V) {
  int b = 0;
  for (int i = 1; i < V; i++)
    if (x[i] > x[b]) b = i;
  return b;
}

/* What one decode step reads and computes with `ctx` tokens in the cache (method.md's
 * per-token terms at batch 1): weights of the experts a token uses, the K/V cache, FLOPs. */
typedef struct {
  double weight_bytes, kv_bytes, flops;
} step_cost;

static step_cost decode_step_cost(const bam_model_shape *s, const char *kind, int E, int k,
                                  int ctx) {
  const double d = s->d_model, kvd = bam_kv_dim(s), f = s->d_ff, V = s->vocab_size,
               L = s->n_layers;
  const int bam = !strcmp(kind, "bam"), shared = !strcmp(kind, "bam-shared-kv");
  const int mixture = strcmp(kind, "dense") != 0;
  const double nA = bam || shared ? E : 1; /* attention experts run (soft routing: all) */
  const double nKV = bam ? E : 1;          /* K/V sets projected and cached */
  double w = d;                            /* block norm */
  w += nA * 2 * d * d + nKV * 2 * kvd * d; /* Wq, Wo per expert; Wk, Wv per K/V set */
  if (bam || shared) w += E * d;           /* attention router */
  w += (mixture ? k : 1) * 3 * d * f + (mixture ? E * d : 0); /* FFN experts used, router */
  step_cost c;
  c.weight_bytes = 4 * (L * w + V * d + 2 * d); /* + head, final norm, one embedding row */
  c.kv_bytes = 4 * L * nKV * 2 * kvd * ctx;
  /* matrix-vector products: 2 flops per weight; attention: q.K and p.V over ctx keys for
   * every query head of every attention expert run. */
  c.flops = 2 * (c.weight_bytes / 4) + L * nA * 4 * d * ctx;
  return c;
}

typedef struct {
  double prefill, per_token, total;
} timing;

/* One greedy generation of n_new tokens after the prompt; toks gets them. */
static bam_status run_cached(bam_decoder *dec, const int32_t *prompt, int n_prompt, int n_new,
                             float *logits, int32_t *toks, timing *t) {
  const int V = bam_decoder_vocab(dec);
  const double t0 = bam_now();
  bam_decoder_reset(dec);
  BAM_CHECK(bam_decoder_prefill(dec, prompt, n_prompt, logits));
  toks[0] = argmax(logits, V);
  const double t1 = bam_now();
  for (int i = 1; i < n_new; i++) {
    BAM_CHECK(bam_decoder_step(dec, toks[i - 1], logits));
    toks[i] = argmax(logits, V);
  }
  const double t2 = bam_now();
  *t = (timing){t1 - t0, n_new > 1 ? (t2 - t1) / (n_new - 1) : 0, t2 - t0};
  return BAM_OK;
}

static bam_status run_full(bam_net *net, int32_t *ctx, int n_prompt, int n_new, int32_t *toks,
                           timing *t) {
  const int V = net->vocab_size;
  const double t0 = bam_now();
  double t1 = t0;
  for (int i = 0; i < n_new; i++) {
    const int len = n_prompt + i;
    float loss;
    BAM_CHECK(bam_net_forward(net, ctx, NULL, 1, len, &loss));
    toks[i] = argmax(bam_net_logits(net) + (size_t)(len - 1) * V, V);
    ctx[len] = toks[i];
    if (i == 0) t1 = bam_now();
  }
  const double t2 = bam_now();
  *t = (timing){t1 - t0, n_new > 1 ? (t2 - t1) / (n_new - 1) : 0, t2 - t0};
  return BAM_OK;
}

static int fail(void) {
  fprintf(stderr, "bam-latency: %s\n", bam_error_message());
  return 1;
}

static int usage(FILE *f) {
  fprintf(f, "usage: bam-latency [--shape quick|paper-small|all] "
             "[--kind dense|btx|bam|bam-shared-kv|all]\n"
             "                   [--prompt N] [--new N] [--runs N (1-100)] "
             "[--nocache-runs N (0-100)] [--experts E] [--threads T]\n"
             "(bench/latency.c and docs/inference.md say what it measures)\n");
  return f == stdout ? 0 : 2;
}

int main(int argc, char **argv) {
  const char *P = "bam-latency", *which = "all", *kinds = "all";
  int n_prompt = 256, n_new = 16, runs = 10, nc_runs = -1, experts = 4, threads_opt = 0;
  for (int i = 1; i < argc; i++) {
    const char *opt, *v;
    int ok;
    if (!bench_option(P, argc, argv, &i, usage, &opt, &v, &ok)) return ok;
    if (!strcmp(opt, "--shape")) ok = bench_choice(P, opt, which = v, BENCH_SHAPES);
    else if (!strcmp(opt, "--kind")) ok = bench_choice(P, opt, kinds = v, BENCH_KINDS);
    else if (!strcmp(opt, "--prompt")) ok = bench_int(P, opt, v, 1, 1 << 20, &n_prompt);
    else if (!strcmp(opt, "--new")) ok = bench_int(P, opt, v, 1, 1 << 20, &n_new);
    else if (!strcmp(opt, "--runs")) ok = bench_int(P, opt, v, 1, 100, &runs);
    else if (!strcmp(opt, "--nocache-runs")) ok = bench_int(P, opt, v, 0, 100, &nc_runs);
    else if (!strcmp(opt, "--experts")) ok = bench_int(P, opt, v, 1, 64, &experts);
    else if (!strcmp(opt, "--threads")) ok = bench_int(P, opt, v, 1, 4096, &threads_opt);
    else {
      fprintf(stderr, "%s: unknown option %s\n", P, opt);
      return usage(stderr);
    }
    if (!ok) return 2;
  }
  if (threads_opt > 0) omp_set_num_threads(threads_opt);
  if (nc_runs < 0) nc_runs = runs;
  const int threads = omp_get_max_threads(), T = n_prompt + n_new;
  /* seq_len = the context the case needs: positions 0 .. prompt + new - 1. */
  shape_case cases[] = {
      {"quick", {4, 256, 4, 4, 512, 4096, T, 0, 10000.0f, 1e-5f}},
      {"paper-small", {6, 1024, 8, 8, 2048, 4096, T, 0, 10000.0f, 1e-5f}},
  };
  const char *kind_names[] = {"dense", "btx", "bam", "bam-shared-kv"};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    const shape_case *sc = &cases[c];
    if (strcmp(which, "all") && strcmp(which, sc->name)) continue;
    for (int k = 0; k < 4; k++) {
      if (strcmp(kinds, "all") && strcmp(kinds, kind_names[k])) continue;
      bam_config cfg;
      bam_config_defaults(&cfg);
      cfg.model = sc->shape;
      if (k > 0) {
        bam_strlcpy(cfg.method, kind_names[k], sizeof cfg.method);
        cfg.n_ffn_experts = experts;
        cfg.n_att_experts = k == 1 ? 0 : experts;
        cfg.ffn_top_k = 1;
        cfg.ffn_renormalize = 0;
        cfg.att_top_k = 0;
      }
      bam_net net;
      if (bam_net_create(&net, &cfg, 1) != BAM_OK) return fail();
      bam_net_init(&net, 1, 0.02f);
      bam_decoder *dec = NULL;
      if (bam_decoder_create(&dec, net.dense, net.mix, T) != BAM_OK) return fail();
      const int V = net.vocab_size;
      int32_t *prompt = bam_alloc(sizeof(int32_t) * T), *ctx = bam_alloc(sizeof(int32_t) * T);
      int32_t *tc = bam_alloc(sizeof(int32_t) * n_new), *tf = bam_alloc(sizeof(int32_t) * n_new);
      float *logits = bam_alloc(sizeof(float) * V);
      double *pre = bam_alloc(sizeof(double) * 100), *tok = bam_alloc(sizeof(double) * 100),
             *tot = bam_alloc(sizeof(double) * 100);
      bam_rng rng;
      bam_rng_seed(&rng, 5, 0);
      for (int i = 0; i < n_prompt; i++) prompt[i] = (int32_t)bam_rng_below(&rng, V);

      timing t, cache_t, full_t;
      for (int r = -1; r < runs; r++) { /* r = -1: the warm-up */
        if (run_cached(dec, prompt, n_prompt, n_new, logits, tc, &t) != BAM_OK) return fail();
        if (r >= 0) pre[r] = t.prefill, tok[r] = t.per_token, tot[r] = t.total;
      }
      cache_t = (timing){bam_median(pre, runs), bam_median(tok, runs), bam_median(tot, runs)};
      const double best_total = tot[0]; /* sorted by bam_median() */
      int same = -1; /* -1: no full recompute measured */
      full_t = (timing){0, 0, 0};
      if (nc_runs > 0) {
        for (int r = -1; r < nc_runs; r++) {
          memcpy(ctx, prompt, sizeof(int32_t) * n_prompt);
          if (run_full(&net, ctx, n_prompt, n_new, tf, &t) != BAM_OK) return fail();
          if (r >= 0) pre[r] = t.prefill, tok[r] = t.per_token, tot[r] = t.total;
        }
        full_t = (timing){bam_median(pre, nc_runs), bam_median(tok, nc_runs), bam_median(tot, nc_runs)};
        same = !memcmp(tc, tf, sizeof(int32_t) * n_new);
      }
      const int E = k ? experts : 1;
      /* decode steps see n_prompt + 1 .. T - 1 keys: cost at the mean context */
      const step_cost sc_end = decode_step_cost(&sc->shape, kind_names[k], E, 1, n_prompt + n_new / 2);
      printf("{\"kind\":\"%s\",\"shape\":\"%s\",\"threads\":%d,\"batch\":1,\"prompt\":%d,"
             "\"new_tokens\":%d,\"experts\":%d,\"ffn_top_k\":1,\"runs\":%d,\"nocache_runs\":%d,"
             "\"params\":%zu,"
             "\"prefill_ms\":%.2f,\"decode_ms_per_token\":%.3f,\"total_ms\":%.2f,"
             "\"nocache_prefill_ms\":%.2f,\"nocache_ms_per_token\":%.2f,\"nocache_total_ms\":%.2f,"
             "\"speedup_total\":%.2f,\"same_tokens\":%s,"
             "\"kv_bytes_per_token\":%zu,\"kv_cache_mib\":%.2f,"
             "\"step_weight_mib\":%.2f,\"step_kv_read_mib\":%.2f,\"step_gflop\":%.4f,"
             "\"step_gb_per_s\":%.2f,\"step_gflops\":%.2f,\"best_total_ms\":%.2f,"
             "\"peak_rss_mib\":%.0f,\"load_average\":%.2f,\"blas\":\"%s\"}\n",
             kind_names[k], sc->name, threads, n_prompt, n_new, E, runs, nc_runs, net.n_params,
             1e3 * cache_t.prefill, 1e3 * cache_t.per_token, 1e3 * cache_t.total,
             1e3 * full_t.prefill, 1e3 * full_t.per_token, 1e3 * full_t.total,
             full_t.total > 0 ? full_t.total / cache_t.total : 0.0,
             same < 0 ? "null" : same ? "true" : "false", bam_decoder_kv_bytes_per_token(dec),
             (double)bam_decoder_kv_bytes_per_token(dec) * T / (1024.0 * 1024.0),
             sc_end.weight_bytes / (1024.0 * 1024.0), sc_end.kv_bytes / (1024.0 * 1024.0),
             sc_end.flops / 1e9,
             cache_t.per_token > 0 ? (sc_end.weight_bytes + sc_end.kv_bytes) / cache_t.per_token / 1e9 : 0.0,
             cache_t.per_token > 0 ? sc_end.flops / cache_t.per_token / 1e9 : 0.0,
             1e3 * best_total, bam_peak_rss_mib(), load_average(), bam_blas_kernels());
      fflush(stdout);
      bam_free(prompt), bam_free(ctx), bam_free(tc), bam_free(tf), bam_free(logits);
      bam_free(pre), bam_free(tok), bam_free(tot);
      bam_decoder_free(&dec);
      bam_net_free(&net);
    }
  }
  return 0;
}
