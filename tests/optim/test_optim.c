/* Tests of the optimizer module: AdamW against a direct double-precision evaluation of its
 * formula, per-tensor decay flags, the learning-rate schedule at its key points, gradient
 * clipping, and the determinism of the gradient norm. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "bam/optim.h"
#include "test_util.h"

static void fill_normal(float *x, size_t n, float scale, uint64_t seed, uint64_t stream) {
  bam_rng r;
  bam_rng_seed(&r, seed, stream);
  for (size_t i = 0; i < n; i++) x[i] = scale * bam_rng_normal(&r);
}

/* ---- AdamW against the formula of optim.h, evaluated in double ----
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   p -= lr * ( m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p )
 * The float implementation follows torch's operation order instead; the two agree to float
 * rounding, accumulated over the steps (relative 1e-5 after 6 steps is generous for ~10
 * float operations per step, and far below the size of one update, lr = 1e-2). */
static void test_adamw_formula(int decay) {
  enum { N = 1000, STEPS = 6 };
  const bam_adamw_hparams h = {.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  const float lr = 1e-2f;
  float p[N], m[N] = {0}, v[N] = {0}, g[N];
  double pd[N], md[N] = {0}, vd[N] = {0};
  fill_normal(p, N, 1.0f, 1, 0);
  for (int i = 0; i < N; i++) pd[i] = p[i];
  double max_err = 0, max_move = 0;
  for (int t = 1; t <= STEPS; t++) {
    fill_normal(g, N, 0.1f, 2, (uint64_t)t);
    if (t == 3) g[0] = 0.0f, g[1] = 1e-6f; /* tiny and zero gradients: eps matters */
    bam_adamw_update(p, g, m, v, N, lr, &h, t, decay);
    const double b1 = h.beta1, b2 = h.beta2, wd = decay ? h.weight_decay : 0.0;
    for (int i = 0; i < N; i++) {
      double p0 = pd[i];
      md[i] = b1 * md[i] + (1 - b1) * g[i];
      vd[i] = b2 * vd[i] + (1 - b2) * (double)g[i] * g[i];
      double mh = md[i] / (1 - pow(b1, t)), vh = vd[i] / (1 - pow(b2, t));
      pd[i] -= lr * (mh / (sqrt(vh) + h.eps) + wd * pd[i]);
      if (fabs(pd[i] - p0) > max_move) max_move = fabs(pd[i] - p0);
    }
  }
  int bad = 0;
  for (int i = 0; i < N; i++) {
    double e = fabs(p[i] - pd[i]) / (1e-6 + fabs(pd[i]));
    if (e > max_err) max_err = e;
    bad += e > 1e-5;
    /* m and v are sums of terms of size |g| ~ 0.1 and g^2 ~ 0.01, which can cancel: their
     * float error is absolute, a few ulps of those terms over the steps. */
    bad += fabs(m[i] - md[i]) > 1e-8 + 1e-6 * fabs(md[i]);
    bad += fabs(v[i] - vd[i]) > 1e-9 + 1e-6 * fabs(vd[i]);
  }
  T_CHECK(bad == 0, "decay=%d: %d of %d values differ from the double formula (max rel %.3g)",
          decay, bad, 3 * N, max_err);
  T_CHECK(max_move > 5e-3, "decay=%d: updates of size lr were made (%.3g)", decay, max_move);
}

/* Decay follows the tensor flag, and with g = m = v = 0 the Adam term is exactly zero, so a
 * decayed tensor is scaled by exactly (float)(1 - lr*wd) and a norm tensor untouched. */
static void test_adamw_step_flags(void) {
  bam_tensor_info t[2] = {
      {.name = "w", .ndim = 1, .shape = {5}, .offset = 0, .numel = 5, .decay = 1},
      {.name = "ln", .ndim = 1, .shape = {3}, .offset = 5, .numel = 3, .decay = 0}};
  float p[8], g[8] = {0}, m[8] = {0}, v[8] = {0};
  for (int i = 0; i < 8; i++) p[i] = 1.0f + (float)i;
  const bam_adamw_hparams h = {.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
  bam_adamw_step(p, g, m, v, t, 2, 0.5f, &h, 1);
  const float keep = (float)(1.0 - 0.5 * (double)0.1f);
  int ok = 1;
  for (int i = 0; i < 5; i++) ok &= p[i] == (1.0f + (float)i) * keep;
  for (int i = 5; i < 8; i++) ok &= p[i] == 1.0f + (float)i;
  T_CHECK(ok, "decay applied to decay tensors only (p[0] = %.9g, p[5] = %.9g)", (double)p[0],
          (double)p[5]);
  /* First step of Adam moves every coordinate by ~lr (m_hat/sqrt(v_hat) = sign(g)). */
  float q[1] = {0}, gq[1] = {-3.0f}, mq[1] = {0}, vq[1] = {0};
  bam_adamw_update(q, gq, mq, vq, 1, 0.01f, &h, 1, 1);
  T_CLOSE(q[0], 0.01, 0, 1e-5, "first Adam step is lr * sign(-g)");
}

/* ---- learning-rate schedule ---- */
static void test_schedule(void) {
  const int W = 100, TOT = 1100;
  const float peak = 1e-3f, r = 0.1f;
  T_CLOSE(bam_lr_at(0, W, TOT, peak, r), peak / W, 0, 1e-6, "lr at 0 = peak / warmup");
  T_CLOSE(bam_lr_at(49, W, TOT, peak, r), peak * 0.5, 0, 1e-6, "lr half-way through warm-up");
  T_CLOSE(bam_lr_at(W - 1, W, TOT, peak, r), peak, 0, 1e-6, "lr at warmup-1 = peak");
  T_CLOSE(bam_lr_at(W, W, TOT, peak, r), peak, 0, 1e-6, "lr at warmup = peak");
  T_CLOSE(bam_lr_at((W + TOT) / 2, W, TOT, peak, r), 0.5 * (1 + r) * peak, 0, 1e-6,
          "cosine mid-point = (peak + min) / 2");
  T_CLOSE(bam_lr_at(W + 250, W, TOT, peak, r),
          r * peak + (1 - r) * peak * 0.5 * (1 + cos(M_PI / 4)), 0, 1e-6, "cosine quarter-way");
  T_CLOSE(bam_lr_at(TOT, W, TOT, peak, r), r * peak, 0, 1e-6, "lr at total = min");
  T_CLOSE(bam_lr_at(TOT + 5000, W, TOT, peak, r), r * peak, 0, 1e-6, "lr beyond total = min");
  int mono = 1;
  for (int s = W; s < TOT + 10; s++)
    mono &= bam_lr_at(s + 1, W, TOT, peak, r) <= bam_lr_at(s, W, TOT, peak, r);
  for (int s = 0; s < W - 1; s++)
    mono &= bam_lr_at(s + 1, W, TOT, peak, r) > bam_lr_at(s, W, TOT, peak, r);
  T_CHECK(mono, "warm-up increasing, decay non-increasing");
  T_CLOSE(bam_lr_at(0, 0, 10, peak, r), peak, 0, 1e-6, "no warm-up: starts at peak");
  T_CLOSE(bam_lr_at(5, 0, 10, peak, 0.0f), 0.5 * peak, 0, 1e-6, "no warm-up: cosine mid-point");
}

/* ---- gradient norm and clipping ---- */
static void test_norm_and_clip(void) {
  const size_t n = 100003; /* not a multiple of the chunk count */
  float *g = malloc(n * 4), *g0 = malloc(n * 4);
  fill_normal(g, n, 0.5f, 3, 0);
  memcpy(g0, g, n * 4);
  double ref = 0;
  for (size_t i = 0; i < n; i++) ref += (double)g[i] * g[i];
  ref = sqrt(ref);
  double nrm = bam_grad_norm(g, n);
  T_CLOSE(nrm, ref, 0, 1e-12, "grad norm vs serial double sum");

  /* Bitwise identical for any thread count: the chunking does not depend on it. */
  int same = 1;
  for (int th = 1; th <= 4; th++) {
    omp_set_num_threads(th);
    double a = bam_grad_norm(g, n), b = bam_grad_norm(g, n);
    same &= memcmp(&a, &nrm, sizeof a) == 0 && memcmp(&b, &nrm, sizeof b) == 0;
  }
  omp_set_num_threads(2);
  T_CHECK(same, "grad norm bitwise identical across calls and thread counts 1..4");

  /* Clipping: returns the norm before, scales to exactly max_norm (to float rounding). */
  const double max_norm = 1.0;
  double before = bam_clip_grad(g, n, max_norm);
  T_CHECK(before == nrm, "clip returns the pre-clip norm (%.17g vs %.17g)", before, nrm);
  T_CLOSE(bam_grad_norm(g, n), max_norm, 0, 1e-6, "clipped norm = max_norm");
  T_CLOSE(g[17] / g0[17], max_norm / nrm, 0, 1e-6, "clip is a uniform scale");
  /* Below the threshold: untouched, bitwise. */
  memcpy(g, g0, n * 4);
  bam_clip_grad(g, n, 2 * nrm);
  T_CHECK(!memcmp(g, g0, n * 4), "no clipping below max_norm");
  /* Non-finite norms are reported, not spread over the gradient. */
  g[5] = NAN;
  double bad = bam_clip_grad(g, n, 1.0);
  T_CHECK(isnan(bad) && g[6] == g0[6], "NaN norm returned, gradient not scaled");
  /* Tiny and empty buffers. */
  float three[3] = {3, 0, 4};
  T_CLOSE(bam_grad_norm(three, 3), 5.0, 0, 0, "norm of (3,0,4)");
  T_CHECK(bam_grad_norm(three, 0) == 0.0, "norm of nothing is 0");
  free(g);
  free(g0);
}

int main(void) {
  test_adamw_formula(1);
  test_adamw_formula(0);
  test_adamw_step_flags();
  test_schedule();
  test_norm_and_clip();
  BAM_TEST_END();
}
