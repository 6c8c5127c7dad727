/* LayerNorm with a learned scale and no bias, over the last dimension d of an (n,d) array.
 *
 * Forward, per row:   mean = sum(x)/d,  var = sum((x-mean)^2)/d  (biased),
 *                     rstd = 1/sqrt(var + eps),  xhat = (x-mean)*rstd,  y = xhat*g.
 * The variance uses the two-pass form (subtract the mean first), which cannot go negative
 * and does not lose digits when |mean| >> std the way E[x^2]-E[x]^2 does.
 *
 * Backward: with dyg = dy*g, the Jacobian of xhat w.r.t. x gives
 *     dx = rstd * (dyg - mean(dyg) - xhat * mean(dyg*xhat)),
 *     dg = sum over rows of dy*xhat.
 * dx is row-local (parallel over rows). dg is a sum over rows, so to keep it deterministic
 * and race-free each thread owns a slice of the d columns and adds the rows in index order:
 * the summation order of every dg[j] is then 0,1,...,n-1 whatever the thread count. */
#include "bam/kernels.h"
#include "internal.h"

void bam_layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *g,
                           int n, int d, float eps) {
#pragma omp parallel for schedule(static) if ((long)n * d >= BAM_OMP_MIN_WORK)
  for (int i = 0; i < n; i++) {
    const float *xi = x + (size_t)i * d;
    float *yi = y + (size_t)i * d;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < d; j++) s += xi[j];
    const float m = s / (float)d;
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int j = 0; j < d; j++) {
      const float c = xi[j] - m;
      v += c * c;
    }
    const float r = 1.0f / sqrtf(v / (float)d + eps);
#pragma omp simd
    for (int j = 0; j < d; j++) yi[j] = (xi[j] - m) * r * g[j];
    mean[i] = m;
    rstd[i] = r;
  }
}

/* Columns per dg work item: 64 floats = 4 cache lines, so two threads never write the same
 * line of dg and each row visit streams a few whole lines. */
#define LN_DG_COLS 64

void bam_layernorm_backward(float *dx, float *dg, const float *dy, const float *x,
                            const float *g, const float *mean, const float *rstd, int n, int d) {
  const int ncol_blocks = (d + LN_DG_COLS - 1) / LN_DG_COLS;
#pragma omp parallel if ((long)n * d >= BAM_OMP_MIN_WORK)
  {
    if (dx) {
#pragma omp for schedule(static)
      for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * d, *dyi = dy + (size_t)i * d;
        float *dxi = dx + (size_t)i * d;
        const float m = mean[i], r = rstd[i];
        float a = 0.0f, b = 0.0f; /* sum(dyg), sum(dyg*xhat) */
#pragma omp simd reduction(+ : a, b)
        for (int j = 0; j < d; j++) {
          const float dyg = dyi[j] * g[j];
          a += dyg;
          b += dyg * ((xi[j] - m) * r);
        }
        a /= (float)d;
        b /= (float)d;
#pragma omp simd
        for (int j = 0; j < d; j++) {
          const float xhat = (xi[j] - m) * r;
          dxi[j] += r * (dyi[j] * g[j] - a - xhat * b);
        }
      }
    }
    if (dg) {
#pragma omp for schedule(static)
      for (int cb = 0; cb < ncol_blocks; cb++) {
        const int j0 = cb * LN_DG_COLS, nj = bam_min_i(LN_DG_COLS, d - j0);
        float acc[LN_DG_COLS] = {0};
        for (int i = 0; i < n; i++) { /* fixed row order: deterministic */
          const float *xi = x + (size_t)i * d + j0, *dyi = dy + (size_t)i * d + j0;
          const float m = mean[i], r = rstd[i];
#pragma omp simd
          for (int j = 0; j < nj; j++) acc[j] += dyi[j] * ((xi[j] - m) * r);
        }
        for (int j = 0; j < nj; j++) dg[j0 + j] += acc[j];
      }
    }
  }
}
