/* Small dense helpers: row softmax and in-place add. */
#include "bam/kernels.h"
#include "internal.h"

/* y = softmax(x) per row of length d, max-subtracted so exp never overflows. y may alias x:
 * every element is read before it is written. */
static inline void softmax_row(float *y, const float *x, int d) {
  const float m = bam_row_max(x, d);
  const float inv = (float)(1.0 / bam_exp_shift_sum(y, x, m, d));
#pragma omp simd
  for (int j = 0; j < d; j++) y[j] *= inv;
}

void bam_softmax_rows(float *y, const float *x, int n, int d) {
#pragma omp parallel for schedule(static) if ((long)n * d >= BAM_OMP_MIN_WORK)
  for (int i = 0; i < n; i++) softmax_row(y + (size_t)i * d, x + (size_t)i * d, d);
}

void bam_softmax_row(float *p, int n) { softmax_row(p, p, n); }

void bam_add_inplace(float *y, const float *x, long n) {
#pragma omp parallel for simd schedule(static) if (n >= BAM_OMP_MIN_WORK)
  for (long i = 0; i < n; i++) y[i] += x[i];
}
