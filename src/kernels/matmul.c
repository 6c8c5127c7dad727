/* Linear layer without bias, PyTorch nn.Linear layout: W is (out, in), row-major.
 *
 *   forward   y  = x . W^T        (n,out) = (n,in) . (in,out)
 *   backward  dx += dy . W        (n,in)  = (n,out) . (out,in)
 *             dW += dy^T . x      (out,in) = (out,n) . (n,in)
 *
 * All three products are single cblas_sgemm calls made outside any OpenMP region, so the
 * OpenMP build of OpenBLAS spreads each one over the whole thread pool. OpenBLAS splits a
 * product over the rows/columns of C, never over the summation index, so every output is
 * summed in a fixed order for a given thread count. beta = 1 gives the accumulate (+=)
 * semantics of the backward contract for free. */
#include <cblas.h>

#include "bam/kernels.h"

void bam_matmul_forward(float *y, const float *x, const float *w, int n, int in, int out) {
  if (n <= 0 || out <= 0) return;
  if (in <= 0) { /* empty sum: y = 0 (sgemm with k = 0 would also do, but be explicit) */
    for (long i = 0; i < (long)n * out; i++) y[i] = 0.0f;
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y,
              out);
}

void bam_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         int n, int in, int out) {
  if (n <= 0 || in <= 0 || out <= 0) return; /* nothing to add */
  if (dx)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in,
                1.0f, dx, in);
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 1.0f,
                dw, in);
}
