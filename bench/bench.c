/* bam-bench: training throughput of the dense model and the BTX / BAM / BAM shared-KV
 * mixtures against the machine's sgemm ceiling.
 *
 *   build/bam-bench [--shape quick|paper-small|all] [--kind dense|btx|bam|bam-shared-kv|all]
 *                   [--experts E] [--batch B] [--steps N] [--warmup W] [--threads T]
 *                   [--ranks R] [--concurrent 1|0|-1]
 *
 * Prints one JSON line per measurement: first the cblas_sgemm GFLOP/s on square 2048 and on
 * each matrix shape the model's training step uses, then, per model kind and shape, the
 * median training-step time over N timed steps (after 2 warm-up steps) and of its three phases
 * (forward_s: zeroing the gradients, forward and loss; backward_s; update_s: gradient clipping
 * and AdamW), tokens/s, model FLOP/s
 * (3 x forward FLOPs per token, method.md section 5, only the experts a token uses), its share
 * of the best sgemm rate, and the peak resident memory of the process so far (VmHWM).
 * Random tokens: throughput does not depend on the data.
 *
 * --steps 0 times nothing: after the sgemm lines it prints, per case, the parameter count and
 * the memory the state needs (bench/compare.sh uses it for the rows of the trainer). With
 * --ranks R (only with --steps 0) that need is per rank of R data-parallel ranks as
 * `bam pretrain` / `bam train` hold it: parameters and gradients whole, AdamW moments 1/R,
 * activations of the local batch B/R. --concurrent sets train.concurrent_branches (default -1,
 * auto: what the trainer does). */
#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "bam/kernels.h"
#include "bam/net.h"
#include "bam/optim.h"

typedef struct {
  const char *name;
  bam_model_shape shape;
  int batch;
} bench_case;

#define MAX_STEPS 64



/* GFLOP/s of C(m,n) = A(m,k) B(k,n)^T, median of reps after one warm-up. */
static double sgemm_gflops(int m, int n, int k, int reps) {
  float *a = bam_alloc(sizeof(float) * (size_t)m * k), *b = bam_alloc(sizeof(float) * (size_t)n * k);
  float *c = bam_alloc(sizeof(float) * (size_t)m * n);
  for (size_t i = 0; i < (size_t)m * k; i++) a[i] = (float)(i % 7) * 0.1f;
  for (size_t i = 0; i < (size_t)n * k; i++) b[i] = (float)(i % 5) * 0.1f;
  double t[16];
  for (int r = -1; r < reps; r++) {
    double t0 = bam_now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, b, k, 0.0f, c, n);
    if (r >= 0) t[r] = bam_now() - t0;
  }
  bam_free(a), bam_free(b), bam_free(c);
  return 2.0 * m * n * k / bam_median(t, reps) / 1e9;
}

static int usage(FILE *f) {
  fprintf(f, "usage: bam-bench [--shape quick|paper-small|all] [--kind dense|btx|bam|bam-shared-kv|all]\n"
             "                 [--experts E] [--batch B] [--steps N (0-%d)] [--warmup W (0-10)]\n"
             "                 [--threads T] [--ranks R] [--concurrent 1|0|-1]\n"
             "(bench/bench.c and docs/performance.md say what it measures)\n", MAX_STEPS);
  return f == stdout ? 0 : 2;
}

int main(int argc, char **argv) {
  const char *P = "bam-bench", *which = "all", *kinds = "all";
  int steps = 5, batch = 0, experts = 4, warmup = 2, ranks = 1, concurrent = -1, threads_opt = 0;
  for (int i = 1; i < argc; i++) {
    const char *opt, *v;
    int ok;
    if (!bench_option(P, argc, argv, &i, usage, &opt, &v, &ok)) return ok;
    if (!strcmp(opt, "--shape")) ok = bench_choice(P, opt, which = v, BENCH_SHAPES);
    else if (!strcmp(opt, "--kind")) ok = bench_choice(P, opt, kinds = v, BENCH_KINDS);
    else if (!strcmp(opt, "--steps")) ok = bench_int(P, opt, v, 0, MAX_STEPS, &steps);
    else if (!strcmp(opt, "--batch")) ok = bench_int(P, opt, v, 1, 1 << 16, &batch);
    else if (!strcmp(opt, "--experts")) ok = bench_int(P, opt, v, 1, 64, &experts);
    else if (!strcmp(opt, "--warmup")) ok = bench_int(P, opt, v, 0, 10, &warmup);
    else if (!strcmp(opt, "--ranks")) ok = bench_int(P, opt, v, 1, 1 << 16, &ranks);
    else if (!strcmp(opt, "--concurrent")) ok = bench_int(P, opt, v, -1, 1, &concurrent);
    else if (!strcmp(opt, "--threads")) ok = bench_int(P, opt, v, 1, 4096, &threads_opt);
    else {
      fprintf(stderr, "%s: unknown option %s\n", P, opt);
      return usage(stderr);
    }
    if (!ok) return 2;
  }
  if (threads_opt > 0) omp_set_num_threads(threads_opt);
  if (ranks > 1 && steps > 0) {
    fprintf(stderr, "bam-bench: --ranks R > 1 only with --steps 0 (the state per rank)\n");
    return 2;
  }
  const int threads = omp_get_max_threads();
  bench_case cases[] = {
      {"quick", {4, 256, 4, 4, 512, 4096, 256, 0, 10000.0f, 1e-5f}, 16},
      {"paper-small", {6, 1024, 8, 8, 2048, 4096, 256, 0, 10000.0f, 1e-5f}, 8},
  };
  double sq = sgemm_gflops(2048, 2048, 2048, 5);
  printf("{\"kind\":\"sgemm\",\"shape\":\"square-2048\",\"threads\":%d,\"blas\":\"%s\",\"gflops\":%.1f}\n",
         threads, bam_blas_kernels(), sq);
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    bench_case *bc = &cases[c];
    if (strcmp(which, "all") && strcmp(which, bc->name)) continue;
    if (batch > 0) bc->batch = batch;
    if (bc->batch % ranks) {
      fprintf(stderr, "bam-bench: batch %d is not divisible by %d ranks\n", bc->batch, ranks);
      return 2;
    }
    const bam_model_shape *s = &bc->shape;
    const int T = s->seq_len, B = bc->batch, N = B * T;
    /* The products of a training step: projections, FFN, head (forward shapes). */
    int shapes[4][3] = {{N, s->d_model, s->d_model}, {N, s->d_ff, s->d_model},
                        {N, s->d_model, s->d_ff}, {N, s->vocab_size, s->d_model}};
    double ceiling = sq;
    for (int i = 0; i < 4; i++) {
      double g = sgemm_gflops(shapes[i][0], shapes[i][1], shapes[i][2], 5);
      printf("{\"kind\":\"sgemm\",\"shape\":\"%dx%dx%d\",\"model\":\"%s\",\"threads\":%d,\"gflops\":%.1f}\n",
             shapes[i][0], shapes[i][1], shapes[i][2], bc->name, threads, g);
      if (g > ceiling) ceiling = g;
    }
    const char *kind_names[] = {"dense", "btx", "bam", "bam-shared-kv"};
    for (int k = 0; k < 4; k++) {
      if (strcmp(kinds, "all") && strcmp(kinds, kind_names[k])) continue;
      bam_config cfg;
      bam_config_defaults(&cfg);
      cfg.model = *s;
      cfg.concurrent_branches = concurrent;
      if (k > 0) {
        bam_strlcpy(cfg.method, kind_names[k], sizeof cfg.method);
        cfg.n_ffn_experts = experts;
        cfg.n_att_experts = k == 1 ? 0 : experts;
      }
      bam_net net;
      if (bam_net_create(&net, &cfg, B / ranks) != BAM_OK) {
        fprintf(stderr, "bam-bench: %s\n", bam_error_message());
        return 1;
      }
      if (steps == 0) {
        /* what the state needs per rank: params, grads, the rank's AdamW slice, activations */
        double need = ((2.0 + 2.0 / ranks) * net.n_params * sizeof(float) + (double)net.act_bytes) /
                      (1024.0 * 1024.0);
        printf("{\"kind\":\"%s\",\"shape\":\"%s\",\"ranks\":%d,\"threads\":%d,\"batch\":%d,"
               "\"seq_len\":%d,\"experts\":%d,\"params\":%zu,\"sgemm_ceiling_gflops\":%.1f,"
               "\"state_mib\":%.0f,\"blas\":\"%s\"}\n",
               kind_names[k], bc->name, ranks, threads, B, T, k ? experts : 1, net.n_params, ceiling,
               need, bam_blas_kernels());
        fflush(stdout);
        bam_net_free(&net);
        continue;
      }
      bam_net_init(&net, 1, 0.02f);
      float *am = bam_alloc(net.n_params * sizeof(float)), *av = bam_alloc(net.n_params * sizeof(float));
      int32_t *x = bam_alloc(sizeof(int32_t) * N), *y = bam_alloc(sizeof(int32_t) * N);
      bam_rng rng;
      bam_rng_seed(&rng, 5, 0);
      for (int i = 0; i < N; i++) x[i] = (int32_t)bam_rng_below(&rng, s->vocab_size);
      for (int i = 0; i < N; i++) y[i] = (int32_t)bam_rng_below(&rng, s->vocab_size);
      const bam_adamw_hparams hp = {0.9f, 0.95f, 1e-8f, 0.1f};
      /* the step, and its phases: zero_grad + forward, backward, clip + AdamW */
      double t[MAX_STEPS], tf[MAX_STEPS], tb[MAX_STEPS], tu[MAX_STEPS];
      for (int r = -warmup; r < steps; r++) {
        const double t0 = bam_now();
        float loss;
        bam_net_zero_grad(&net);
        bam_status st = bam_net_forward(&net, x, y, B, T, &loss);
        const double t1 = bam_now();
        if (st == BAM_OK) st = bam_net_backward(&net, 1.0f);
        if (st != BAM_OK) {
          fprintf(stderr, "bam-bench: %s\n", bam_error_message());
          return 1;
        }
        const double t2 = bam_now();
        bam_clip_grad(net.grads, net.n_params, 1.0);
        bam_adamw_step(net.params, net.grads, am, av, net.tensors, net.n_tensors, 1e-4f, &hp, r + warmup + 1);
        const double t3 = bam_now();
        if (r >= 0) t[r] = t3 - t0, tf[r] = t1 - t0, tb[r] = t2 - t1, tu[r] = t3 - t2;
      }
      const double dt = bam_median(t, steps);
      double flops = 3.0 * bam_net_flops_per_token(&net, T) * N;
      /* what the state needs: params, grads, AdamW m and v, plus the activations */
      double need = (4.0 * net.n_params * sizeof(float) + (double)net.act_bytes) / (1024.0 * 1024.0);
      printf("{\"kind\":\"%s\",\"shape\":\"%s\",\"ranks\":1,\"threads\":%d,\"batch\":%d,"
             "\"seq_len\":%d,\"experts\":%d,\"params\":%zu,\"step_s\":%.4f,\"tokens_per_s\":%.1f,"
             "\"model_gflops\":%.2f,\"sgemm_ceiling_gflops\":%.1f,\"ceiling_share\":%.3f,"
             "\"forward_s\":%.4f,\"backward_s\":%.4f,\"update_s\":%.4f,"
             "\"peak_rss_mib\":%.0f,\"state_mib\":%.0f,\"blas\":\"%s\"}\n",
             kind_names[k], bc->name, threads, B, T, k ? experts : 1, net.n_params, dt, N / dt,
             flops / dt / 1e9, ceiling, flops / dt / 1e9 / ceiling, bam_median(tf, steps),
             bam_median(tb, steps), bam_median(tu, steps), bam_peak_rss_mib(), need,
             bam_blas_kernels());
      fflush(stdout);
      bam_free(am), bam_free(av), bam_free(x), bam_free(y);
      bam_net_free(&net);
    }
  }
  return 0;
}
