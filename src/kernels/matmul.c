/* Linear layer without bias, PyTorch nn.Linear layout: W is (out, in), row-major.
 *
 *   forward   y  = x . W^T        (n,out) = (n,in) . (in,out)
 *   backward  dx += dy . W        (n,in)  = (n,out) . (out,in)
 *             dW += dy^T . x      (out,in) = (out,n) . (n,in)
 *
 * Every product is one cblas_sgemm call. OpenBLAS splits a product over the rows/columns of
 * C, never over the summation index, so every output is summed in a fixed order for a given
 * thread count. beta = 1 gives the accumulate (+=) semantics of the backward contract.
 *
 * Threads. Called outside any OpenMP region, the OpenMP build of OpenBLAS spreads a product
 * over the whole thread pool; inside one it runs it on the calling thread. Two independent
 * products of equal work (the backward's dx and dW; two projections of one input,
 * bam_matmul_forward2) therefore run side by side, one thread each, when the rank has exactly
 * two threads: a single-threaded sgemm keeps its core at the kernel's peak, where one product
 * split over two cores loses to the split and the synchronisation (a paper-small BTX step's
 * backward on 2 threads: 1.92 -> 1.73-1.89 s). With more threads each product would get one of
 * them, so they run one after the other, each over all threads. */
#include <cblas.h>
#include <omp.h>

#include "bam/kernels.h"

static int side_by_side(void) { return omp_get_max_threads() == 2 && !omp_in_parallel(); }

static void product_nt(float *y, const float *x, const float *w, int n, int in, int out) {
  if (in <= 0) { /* empty sum: y = 0 (sgemm with k = 0 would also do, but be explicit) */
    for (long i = 0; i < (long)n * out; i++) y[i] = 0.0f;
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y,
              out);
}

void bam_matmul_forward(float *y, const float *x, const float *w, int n, int in, int out) {
  if (n <= 0 || out <= 0) return;
  product_nt(y, x, w, n, in, out);
}

void bam_matmul_forward2(float *y1, const float *w1, float *y2, const float *w2, const float *x,
                         int n, int in, int out) {
  if (n <= 0 || out <= 0) return;
  /* one thread each when side by side; otherwise the region is inactive and its thread runs
   * the two products in turn, each over the whole pool */
#pragma omp parallel sections num_threads(2) if (side_by_side())
  {
#pragma omp section
    product_nt(y1, x, w1, n, in, out);
#pragma omp section
    product_nt(y2, x, w2, n, in, out);
  }
}

void bam_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         int n, int in, int out) {
  if (n <= 0 || in <= 0 || out <= 0) return; /* nothing to add */
#pragma omp parallel sections num_threads(2) if (dx && dw && side_by_side())
  {
#pragma omp section
    if (dx)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in,
                  1.0f, dx, in);
#pragma omp section
    if (dw)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 1.0f,
                  dw, in);
  }
}
