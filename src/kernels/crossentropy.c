/* Softmax cross-entropy over V classes, one row per token.
 *
 *   loss_i = logsumexp(x_i) - x_i[t_i],   logsumexp(x) = m + log(sum_j exp(x_j - m)),
 * with m = max_j x_j, so no exp overflows and the largest term is exactly 1 (the sum is in
 * [1, V]: its log never underflows). The loss is formed as (m - x[t]) + log(sum), adding
 * the two non-negative parts rather than subtracting two large numbers.
 *
 *   d loss_i / d x_i = softmax(x_i) - onehot(t_i).
 *
 * A negative target marks an ignored row (padding): loss 0, gradient 0. Targets must
 * otherwise be < V. Rows are independent: parallel over rows, each row's sums in a fixed
 * order. The normaliser is accumulated in double. The fused step computes each exp once:
 * stored, summed, then scaled. */
#include <math.h>

#include "bam/kernels.h"
#include "internal.h"

/* max and sum_j exp(x_j - max) of one row */
static inline void row_stats(const float *x, int V, float *mx, double *sum) {
  const float m = bam_row_max(x, V);
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < V; j++) s += (double)bam_expf(x[j] - m);
  *mx = m;
  *sum = s;
}

static inline float row_loss(const float *x, int t, float m, double s) {
  return (m - x[t]) + (float)log(s);
}

void bam_crossentropy_forward(float *losses, const float *logits, const int32_t *targets, int n,
                              int V) {
#pragma omp parallel for schedule(static) if ((long)n * V >= BAM_OMP_MIN_WORK)
  for (int i = 0; i < n; i++) {
    const int t = targets[i];
    if (t < 0) {
      losses[i] = 0.0f;
      continue;
    }
    const float *x = logits + (size_t)i * V;
    float m;
    double s;
    row_stats(x, V, &m, &s);
    losses[i] = row_loss(x, t, m, s);
  }
}

void bam_crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                               float scale, int n, int V) {
#pragma omp parallel for schedule(static) if ((long)n * V >= BAM_OMP_MIN_WORK)
  for (int i = 0; i < n; i++) {
    const int t = targets[i];
    if (t < 0) continue; /* ignored row: adds 0 */
    const float *x = logits + (size_t)i * V;
    float *dx = dlogits + (size_t)i * V;
    float m;
    double s;
    row_stats(x, V, &m, &s);
    const float c = (float)((double)scale / s); /* scale * softmax = exp(x - m) * c */
#pragma omp simd
    for (int j = 0; j < V; j++) dx[j] += bam_expf(x[j] - m) * c;
    dx[t] -= scale;
  }
}

void bam_crossentropy_fused_inplace(float *logits, float *losses, const int32_t *targets,
                                    float scale, int n, int V) {
#pragma omp parallel for schedule(static) if ((long)n * V >= BAM_OMP_MIN_WORK)
  for (int i = 0; i < n; i++) {
    const int t = targets[i];
    float *x = logits + (size_t)i * V;
    if (t < 0) {
      losses[i] = 0.0f;
      for (int j = 0; j < V; j++) x[j] = 0.0f;
      continue;
    }
    const float m = bam_row_max(x, V), xt = x[t];
    const double s = bam_exp_shift_sum(x, x, m, V); /* x[j] = exp(x[j] - m) */
    losses[i] = row_loss(&xt, 0, m, s);
    /* The same values as bam_crossentropy_backward into a zero buffer (0 + e c = e c), so
     * the two agree bitwise. */
    const float c = (float)((double)scale / s);
#pragma omp simd
    for (int j = 0; j < V; j++) x[j] *= c;
    x[t] -= scale;
  }
}
