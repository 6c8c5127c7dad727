/* bam-blas-check: do the OpenBLAS kernels this process runs compute bam's matrix products
 * right? bench/compare.sh and bench/latency.sh run it before they time anything, because
 * `--blas auto` lets OpenBLAS choose kernels that a site may have set aside on purpose (older
 * OpenBLAS builds have computed wrong results on some processors).
 *
 *   build/bam-blas-check [--threads T]
 *
 * Every product the model's training and decoding steps make, through bam_matmul_forward and
 * bam_matmul_backward (src/kernels/matmul.c, the three cblas_sgemm forms: y = x W^T,
 * dx += dy W, dW += dy^T x), at the quick and paper-small shapes (tokens x d_model x d_ff x
 * vocabulary, the FFN experts' uneven token counts, one-token decoding) and at edge sizes
 * around OpenBLAS's blocking (1, 15-17, 63-65, 255-257). Inputs are random in [-1, 1); the
 * accumulating forms start from a random output. 61 entries of every result (its corners
 * among them) are compared with a double-precision sum of the same terms:
 *   |got - exact| <= 2e-5 * (|initial| + sum |terms|).
 * Float32 sums of up to 4096 terms stay below 1e-6 of that scale with any blocking; a wrong
 * kernel is off by the order of the terms. One JSON line: the kernels, products and entries
 * checked, the worst relative error; a line per failing product on stderr. Exit 0 when every
 * entry is within the bound, 1 otherwise. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "args.h"
#include "bam/core.h"
#include "bam/kernels.h"

#define SAMPLES 61
#define TOL 2e-5

typedef struct {
  int n, in, out; /* y(n,out) = x(n,in) W(out,in)^T */
  const char *what;
} product;

static const product PRODUCTS[] = {
    /* quick: 16 x 256 tokens, d 256, f 512 (gate+up fused: 1024), vocabulary 4096 */
    {4096, 256, 768, "quick QKV"},      {4096, 256, 256, "quick attention out"},
    {4096, 256, 1024, "quick gate+up"}, {4096, 512, 256, "quick down"},
    {4096, 256, 4096, "quick head"},    {1031, 256, 1024, "quick expert gate+up (1031 tokens)"},
    {1, 256, 4096, "quick decode head"},
    /* paper-small: 8 x 256 tokens, d 1024, f 2048, vocabulary 4096 */
    {2048, 1024, 3072, "paper-small QKV"},     {2048, 1024, 4096, "paper-small gate+up"},
    {2048, 2048, 1024, "paper-small down"},    {2048, 1024, 4096, "paper-small head"},
    {509, 2048, 1024, "paper-small expert down (509 tokens)"},
    {1, 1024, 3072, "paper-small decode QKV"},
    /* around the blocking */
    {1, 1, 1, "1x1x1"},     {15, 17, 16, "15x17x16"},    {17, 15, 63, "17x15x63"},
    {63, 65, 64, "63x65x64"}, {65, 64, 63, "65x64x63"},  {255, 257, 256, "255x257x256"},
    {257, 255, 129, "257x255x129"}, {3, 1000, 7, "3x1000x7"}, {1000, 3, 1001, "1000x3x1001"},
};

static float uniform(bam_rng *r) { return 2.0f * bam_rng_uniform(r) - 1.0f; }

static float *random_floats(bam_rng *r, size_t n) {
  float *p = bam_alloc(n * sizeof(float));
  if (p)
    for (size_t i = 0; i < n; i++) p[i] = uniform(r);
  return p;
}

/* The worst |got - exact| / (|c0| + sum |terms|) over the sampled entries (row i, column j)
 * of an (rows, cols) result: entry (i, j) = c0 + sum_k a(i, k) b(k, j), where a(i, k) =
 * A[i * as_i + k * as_k] and b(k, j) = B[k * bs_k + j * bs_j]. */
static double worst_error(const float *got, const float *c0, int rows, int cols, int K,
                          const float *A, long as_i, long as_k, const float *B, long bs_k,
                          long bs_j, bam_rng *r) {
  double worst = 0;
  for (int s = 0; s < SAMPLES; s++) {
    int i, j;
    if (s < 4) i = s & 1 ? rows - 1 : 0, j = s & 2 ? cols - 1 : 0; /* the corners */
    else i = (int)bam_rng_below(r, (uint64_t)rows), j = (int)bam_rng_below(r, (uint64_t)cols);
    double exact = c0 ? c0[(size_t)i * cols + j] : 0, scale = c0 ? fabs(exact) : 0;
    for (int k = 0; k < K; k++) {
      const double t = (double)A[i * as_i + k * as_k] * B[k * bs_k + j * bs_j];
      exact += t, scale += fabs(t);
    }
    const double g = got[(size_t)i * cols + j];
    const double e = isfinite(g) ? fabs(g - exact) / (scale > 0 ? scale : 1) : INFINITY;
    if (e > worst) worst = e;
  }
  return worst;
}

static int usage(FILE *f) {
  fprintf(f, "usage: bam-blas-check [--threads T]\n"
             "(bench/blas_check.c says what it checks)\n");
  return f == stdout ? 0 : 2;
}

int main(int argc, char **argv) {
  const char *P = "bam-blas-check";
  int threads_opt = 0;
  for (int i = 1; i < argc; i++) {
    const char *opt, *v;
    int ok;
    if (!bench_option(P, argc, argv, &i, usage, &opt, &v, &ok)) return ok;
    if (!strcmp(opt, "--threads")) ok = bench_int(P, opt, v, 1, 4096, &threads_opt);
    else {
      fprintf(stderr, "%s: unknown option %s\n", P, opt);
      return usage(stderr);
    }
    if (!ok) return 2;
  }
  if (threads_opt > 0) omp_set_num_threads(threads_opt);
  bam_rng rng;
  bam_rng_seed(&rng, 2026, 0);
  double worst = 0;
  int n_products = 0, bad = 0;
  for (size_t p = 0; p < sizeof PRODUCTS / sizeof PRODUCTS[0]; p++) {
    const product *pr = &PRODUCTS[p];
    const int n = pr->n, in = pr->in, out = pr->out;
    float *x = random_floats(&rng, (size_t)n * in), *w = random_floats(&rng, (size_t)out * in);
    float *dy = random_floats(&rng, (size_t)n * out), *y = bam_alloc((size_t)n * out * sizeof(float));
    float *dx = random_floats(&rng, (size_t)n * in), *dw = random_floats(&rng, (size_t)out * in);
    float *dx0 = bam_alloc((size_t)n * in * sizeof(float)), *dw0 = bam_alloc((size_t)out * in * sizeof(float));
    if (!x || !w || !dy || !y || !dx || !dw || !dx0 || !dw0) {
      fprintf(stderr, "%s: out of memory for %s\n", P, pr->what);
      return 1;
    }
    memcpy(dx0, dx, (size_t)n * in * sizeof(float));
    memcpy(dw0, dw, (size_t)out * in * sizeof(float));
    bam_matmul_forward(y, x, w, n, in, out);
    bam_matmul_backward(dx, dw, dy, x, w, n, in, out);
    /* y(i,o) = sum_k x(i,k) w(o,k);  dx(i,k) += sum_o dy(i,o) w(o,k);
     * dw(o,k) += sum_i dy(i,o) x(i,k) */
    const double e[3] = {
        worst_error(y, NULL, n, out, in, x, in, 1, w, 1, in, &rng),
        worst_error(dx, dx0, n, in, out, dy, out, 1, w, in, 1, &rng),
        worst_error(dw, dw0, out, in, n, dy, 1, out, x, in, 1, &rng),
    };
    const char *form[3] = {"y = x W^T", "dx += dy W", "dW += dy^T x"};
    for (int f = 0; f < 3; f++) {
      n_products++;
      if (e[f] > worst) worst = e[f];
      if (!(e[f] <= TOL)) {
        bad++;
        fprintf(stderr, "%s: %s (n %d, in %d, out %d), %s: relative error %.3g > %.0e\n", P,
                pr->what, n, in, out, form[f], e[f], TOL);
      }
    }
    bam_free(x), bam_free(w), bam_free(dy), bam_free(y), bam_free(dx), bam_free(dw);
    bam_free(dx0), bam_free(dw0);
  }
  printf("{\"check\":\"blas\",\"blas\":\"%s\",\"threads\":%d,\"products\":%d,\"entries\":%d,"
         "\"worst_rel_error\":%.3g,\"bound\":%.0e,\"wrong_products\":%d,\"ok\":%s}\n",
         bam_blas_kernels(), omp_get_max_threads(), n_products, n_products * SAMPLES, worst, TOL,
         bad, bad ? "false" : "true");
  return bad ? 1 : 0;
}
