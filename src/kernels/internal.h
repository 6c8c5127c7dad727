/* Private helpers shared by the kernel translation units (not part of the public API).
 *
 * Reductions use `#pragma omp simd reduction(...)`: without -ffast-math the compiler may not
 * reorder a floating-point sum on its own, so a plain loop would run scalar. The simd
 * reduction lets it keep one partial sum per vector lane; the order is fixed at compile time,
 * so results stay deterministic and independent of the thread count, and the lane-wise
 * partial sums are also slightly more accurate than one serial accumulator. */
#ifndef BAM_KERNELS_INTERNAL_H
#define BAM_KERNELS_INTERNAL_H

#include <math.h>
#include <stddef.h>

/* Element count below which a loop stays serial: forking a thread team costs a few
 * microseconds, which is more than streaming ~16k floats through one core. */
#define BAM_OMP_MIN_WORK 16384L

static inline int bam_min_i(int a, int b) { return a < b ? a : b; }

static inline float bam_row_max(const float *x, int n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
  return m;
}

/* y[j] = exp(x[j] - m) for j < n and return the sum of the y[j] (accumulated in double, which
 * is free next to expf and keeps the normaliser exact to float precision even for a
 * 100k-entry vocabulary). y may alias x. */
static inline double bam_exp_shift_sum(float *y, const float *x, float m, int n) {
  double s = 0.0;
  for (int j = 0; j < n; j++) {
    float e = expf(x[j] - m);
    y[j] = e;
    s += (double)e;
  }
  return s;
}

#endif
