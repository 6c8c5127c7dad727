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

/* exp(x) in straight-line code the compiler vectorises (glibc's expf is a call per element,
 * a tenth of a small model's step). x = k ln2 + r with k = round(x / ln2) (the 1.5 * 2^23
 * trick, round to nearest) and |r| <= ln2/2, r formed with ln2 split in two (Cody-Waite) so
 * it is exact to float precision; exp(r) by its Taylor polynomial of degree 7 (truncation
 * below 1e-8 relative); 2^k from the exponent bits, as 2^(k-1) * 2 so k = 128 still fits.
 * Within 1.2 ulp of exp (tests/kernels: every 97th float in [-86.5, 88.72]; the test allows
 * 2). Edge cases as expf: +inf above ln(FLT_MAX), NaN stays NaN; results below about 2^-125
 * (x < -86.99, the edge of float's normal range) flush to 0. */
static inline float bam_expf(float x) {
  const float xc = x < -88.0f ? -88.0f : x > 88.72283935546875f ? 88.72283935546875f : x; /* NaN passes */
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int k = (int)kf;
  union {
    unsigned u;
    float f;
  } scale = {.u = k > -126 ? (unsigned)(k + 126) << 23 : 0u}; /* 2^(k-1) */
  float y = p * scale.f * 2.0f;
  y = x > 88.72283935546875f ? INFINITY : y;
  return y;
}

/* y[j] = exp(x[j] - m) for j < n and return the sum of the y[j], accumulated in double in
 * per-lane partial sums (fixed order, see above), which keeps the normaliser exact to float
 * precision even for a 100k-entry vocabulary. y may alias x. */
static inline double bam_exp_shift_sum(float *y, const float *x, float m, int n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < n; j++) {
    const float e = bam_expf(x[j] - m);
    y[j] = e;
    s += (double)e;
  }
  return s;
}

#endif
