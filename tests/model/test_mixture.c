/* Tests of the BTX / BAM mixture (mixture.h): layout, initialisation, whole-model gradients
 * against finite differences for every method and routing option, the auxiliary losses
 * against a hand computation in double, identities with the dense model (identical experts),
 * expert skipping, determinism, ignored targets, gradient accumulation, routing statistics,
 * shape checks and FLOPs. */
#include <math.h>
#include <stdlib.h>
#include <omp.h>
#include <string.h>

#include "bam/mixture.h"
#include "bam/model.h"
#include "test_util.h"

/* ---- shapes and helpers ---- */

typedef struct {
  bam_method method;
  int hkv, k, renorm, att_top_k, lb_seq, tied, Ef;
  float cap;
} cfg;

static bam_mixture_shape mix_shape(cfg c) {
  return (bam_mixture_shape){
      .base = {.n_layers = 2,
               .d_model = 16,
               .n_heads = 4,
               .n_kv_heads = c.hkv,
               .d_ff = 12,
               .vocab_size = 29,
               .seq_len = 8,
               .tie_embeddings = c.tied,
               .rope_base = 10000.0f,
               .norm_eps = 1e-5f},
      .method = c.method,
      .n_att_experts = 3,
      .n_ffn_experts = c.Ef,
      .ffn_top_k = c.k,
      .ffn_renormalize = c.renorm,
      .att_top_k = c.att_top_k,
      .lb_coef = 0.1f,
      .z_coef = 0.05f,
      .lb_per_sequence = c.lb_seq,
      .capacity_factor = c.cap};
}

static void cfg_name(char *buf, size_t n, cfg c) {
  snprintf(buf, n, "%s Hkv=%d Ef=%d k=%d renorm=%d att_top_k=%d lb=%s cap=%g tied=%d",
           bam_method_name(c.method), c.hkv, c.Ef, c.k, c.renorm, c.att_top_k,
           c.lb_seq ? "seq" : "batch", (double)c.cap, c.tied);
}

static void random_ids(int32_t *x, int n, int V, uint64_t seed) {
  bam_rng r;
  bam_rng_seed(&r, seed, 0);
  for (int i = 0; i < n; i++) x[i] = (int32_t)bam_rng_below(&r, (uint64_t)V);
}

static const bam_tensor_info *tinfo(bam_mixture *m, const char *name) {
  const bam_tensor_info *t = NULL;
  bam_mixture_tensor(m, name, &t);
  return t;
}

static float *tgrad(bam_mixture *m, const char *name) {
  const bam_tensor_info *t = tinfo(m, name);
  return t ? m->grads_mem + t->offset : NULL;
}

static void scale_tensor(bam_mixture *m, const char *name, float s) {
  const bam_tensor_info *t = NULL;
  float *p = bam_mixture_tensor(m, name, &t);
  if (!p) return;
  for (size_t i = 0; i < t->numel; i++) p[i] *= s;
}

/* Relative L2 difference of two float arrays (0 when both are zero). */
static double rel_diff(const float *a, const float *b, size_t n) {
  double dn = 0, nn = 0;
  for (size_t i = 0; i < n; i++) {
    double e = (double)a[i] - b[i];
    dn += e * e;
    nn += (double)b[i] * b[i];
  }
  return nn > 0 ? sqrt(dn / nn) : sqrt(dn);
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
  return m;
}

/* ---- layout ---- */
static void test_layout(void) {
  const size_t L = 2, d = 16, kvd = 8, f = 12, V = 29, Ea = 3, Ef = 4;
  const struct {
    bam_method method;
    const char *order[14];
    size_t n;
  } cases[] = {
      {BAM_METHOD_BTX,
       {"wte", "ln", "ln_f", "w_head", "wq", "wk", "wv", "wo", "ffn_router", "w_gate", "w_up",
        "w_down"},
       12},
      {BAM_METHOD_BAM,
       {"wte", "ln", "ln_f", "w_head", "att_router", "wq", "wk", "wv", "wo", "ffn_router",
        "w_gate", "w_up", "w_down"},
       13},
      {BAM_METHOD_BAM_SHARED_KV,
       {"wte", "ln", "ln_f", "w_head", "att_router", "wq", "wk", "wv", "wo", "ffn_router",
        "w_gate", "w_up", "w_down"},
       13},
  };
  for (size_t c = 0; c < 3; c++) {
    cfg cf = {.method = cases[c].method, .hkv = 2, .k = 1, .lb_seq = 1, .Ef = 4};
    bam_mixture_shape s = mix_shape(cf);
    bam_mixture *m = NULL;
    T_OK(bam_mixture_create(&m, &s, 2));
    if (!m) continue;
    const int bam = cases[c].method != BAM_METHOD_BTX, own = cases[c].method == BAM_METHOD_BAM;
    T_CHECK((size_t)m->n_tensors == cases[c].n, "%s: %d tensors", bam_method_name(s.method),
            m->n_tensors);
    size_t off = 0;
    for (int i = 0; i < m->n_tensors && i < (int)cases[c].n; i++) {
      const bam_tensor_info *t = &m->tensors[i];
      T_CHECK(!strcmp(t->name, cases[c].order[i]), "%s tensor %d is %s, expected %s",
              bam_method_name(s.method), i, t->name, cases[c].order[i]);
      T_CHECK(t->offset == off, "%s offset", t->name);
      size_t numel = 1;
      for (int k = 0; k < t->ndim; k++) numel *= (size_t)t->shape[k];
      T_CHECK(numel == t->numel, "%s numel", t->name);
      const int no_decay = !strcmp(t->name, "ln") || !strcmp(t->name, "ln_f") ||
                           !strcmp(t->name, "att_router") || !strcmp(t->name, "ffn_router");
      T_CHECK(t->decay == !no_decay, "%s decay flag %d", t->name, t->decay);
      off += t->numel;
    }
    T_CHECK(off == m->n_params, "contiguous table covers the buffer");
    /* Shapes: expert-major expert tensors. */
    const bam_tensor_info *wq = tinfo(m, "wq"), *wk = tinfo(m, "wk"), *wg = tinfo(m, "w_gate"),
                          *wd = tinfo(m, "w_down"), *fr = tinfo(m, "ffn_router");
    if (bam)
      T_CHECK(wq->ndim == 4 && wq->shape[0] == (int64_t)Ea && wq->shape[1] == (int64_t)L,
              "BAM wq (Ea, L, d, d)");
    else
      T_CHECK(wq->ndim == 3 && wq->shape[0] == (int64_t)L, "BTX wq (L, d, d)");
    T_CHECK(own ? wk->ndim == 4 && wk->shape[2] == (int64_t)kvd : wk->ndim == 3,
            "wk shape per method");
    T_CHECK(wg->ndim == 4 && wg->shape[0] == (int64_t)Ef && wg->shape[2] == (int64_t)f &&
                wd->shape[2] == (int64_t)d && wd->shape[3] == (int64_t)f,
            "FFN experts (Ef, L, f, d) and (Ef, L, d, f)");
    T_CHECK(fr->ndim == 3 && fr->shape[1] == (int64_t)Ef, "ffn_router (L, Ef, d)");
    size_t att = bam ? Ea * L * 2 * d * d + (own ? Ea : 1) * L * 2 * kvd * d + L * Ea * d
                     : L * (2 * d * d + 2 * kvd * d);
    size_t expect = 2 * V * d + L * d + d + att + L * Ef * d + Ef * L * 3 * f * d;
    T_CHECK(m->n_params == expect, "%s n_params %zu expected %zu", bam_method_name(s.method),
            m->n_params, expect);
    T_CHECK(bam_mixture_tensor(m, "nope", NULL) == NULL, "unknown name gives NULL");
    bam_mixture_free(&m);
    T_CHECK(m == NULL, "free nulls the pointer");
    s.base.tie_embeddings = 1;
    T_OK(bam_mixture_create(&m, &s, 2));
    if (!m) continue;
    T_CHECK(tinfo(m, "w_head") == NULL && m->n_params == expect - V * d, "tied: no w_head");
    bam_mixture_free(&m);
  }
  bam_method me;
  T_OK(bam_method_parse("bam-shared-kv", &me));
  T_CHECK(me == BAM_METHOD_BAM_SHARED_KV, "parse bam-shared-kv");
  T_CHECK(bam_method_parse("moe", &me) == BAM_ERR_CONFIG && strstr(bam_error_message(), "btx"),
          "unknown method rejected, listing the valid ones: %s", bam_error_message());
  bam_error_clear();
  T_CHECK(!strcmp(bam_method_name(BAM_METHOD_BTX), "btx") &&
              !strcmp(bam_method_name(BAM_METHOD_BAM), "bam"),
          "method names");
}

/* ---- initialisation ---- */
static double stddev(const float *x, size_t n) {
  double s = 0, s2 = 0;
  for (size_t i = 0; i < n; i++) s += x[i], s2 += (double)x[i] * x[i];
  double mu = s / (double)n;
  return sqrt(s2 / (double)n - mu * mu);
}

static void test_init(void) {
  cfg c = {.method = BAM_METHOD_BAM, .hkv = 4, .k = 1, .lb_seq = 1, .Ef = 4};
  bam_mixture_shape s = mix_shape(c);
  s.base.d_model = 64;
  s.base.d_ff = 128;
  s.base.vocab_size = 100;
  bam_mixture *a = NULL, *b = NULL;
  bam_model *dense = NULL;
  T_OK(bam_mixture_create(&a, &s, 1));
  T_OK(bam_mixture_create(&b, &s, 1));
  T_OK(bam_model_create(&dense, &s.base, 1));
  if (!a || !b || !dense) return;
  const float std = 0.02f;
  bam_mixture_init(a, 7, std);
  bam_mixture_init(b, 7, std);
  bam_model_init(dense, 7, std);
  T_CHECK(!memcmp(a->params_mem, b->params_mem, a->n_params * 4), "same seed, same init");
  const bam_tensor_info *t;
  float *ln = bam_mixture_tensor(a, "ln", &t);
  int ones = 1;
  for (size_t i = 0; i < t->numel; i++) ones &= ln[i] == 1.0f;
  float *lnf = bam_mixture_tensor(a, "ln_f", &t);
  for (size_t i = 0; i < t->numel; i++) ones &= lnf[i] == 1.0f;
  T_CHECK(ones, "norm scales start at 1");
  /* Routers N(0, 0.02^2) whatever std; init with a larger std to tell them apart. */
  bam_mixture_init(b, 7, 0.1f);
  float *ar = bam_mixture_tensor(b, "att_router", &t);
  T_CLOSE(stddev(ar, t->numel), 0.02, 0, 0.1, "att_router std 0.02");
  float *fr = bam_mixture_tensor(b, "ffn_router", &t);
  T_CLOSE(stddev(fr, t->numel), 0.02, 0, 0.1, "ffn_router std 0.02");
  float *wo = bam_mixture_tensor(b, "wo", &t);
  T_CLOSE(stddev(wo, t->numel), 0.1 / 2.0, 0, 0.03, "wo std scaled by 1/sqrt(2L)");
  float *wq = bam_mixture_tensor(b, "wq", &t);
  T_CLOSE(stddev(wq, t->numel), 0.1, 0, 0.03, "wq std");
  /* Expert 0 draws what the dense model draws for the same seed; other experts differ. */
  const size_t dd = 64 * 64, fd = 128 * 64;
  wq = bam_mixture_tensor(a, "wq", NULL);
  float *wg = bam_mixture_tensor(a, "w_gate", NULL), *wte = bam_mixture_tensor(a, "wte", NULL);
  T_CHECK(!memcmp(wq, dense->params.wq, 2 * dd * 4), "wq expert 0 (both layers) == dense init");
  T_CHECK(!memcmp(wg, dense->params.w_gate, 2 * fd * 4), "w_gate expert 0 == dense init");
  T_CHECK(!memcmp(wte, dense->params.wte, 100 * 64 * 4), "wte == dense init");
  T_CHECK(memcmp(wq, wq + 2 * dd, dd * 4) != 0, "experts have distinct streams");
  T_CHECK(memcmp(wq, wq + dd, dd * 4) != 0, "layers have distinct streams");
  bam_mixture_free(&a);
  bam_mixture_free(&b);
  bam_model_free(&dense);
}

/* ---- whole-model gradient against central finite differences ----
 *
 * As in the dense test (tests/model/test_model.c, which derives the step): float loss,
 * central differences with e = 3e-3 (roundoff ~ 4e-7 / 2e, truncation ~ |f'''| e^2 / 6) and
 * the same tolerance |analytic - fd| <= 3e-4 + 1e-2 |fd|. The mixture adds routers and
 * auxiliary losses (here lb_coef 0.1, z_coef 0.05, ten times the defaults, so their
 * gradients are well above the tolerance) but no stiffer non-linearity; the worst errors
 * measured over the configurations below are printed per configuration and stay below ~1/3
 * of the tolerance. Init std 0.3 for every matrix, routers included (they start at 0.02,
 * rescaled here), so routing is decisive and every path carries a sizeable gradient.
 *
 * Top-k routing and capacity are piecewise constant: a perturbation that flips a decision
 * makes the difference quotient meaningless. Each entry's +e and -e forwards are compared
 * with the base forward through bam_mixture_route_hash (every top-k choice, capacity drop
 * and attention top-k); an entry whose perturbation changes any decision is re-drawn. */
#define FD_EPS 3e-3f
#define FD_ATOL 3e-4
#define FD_RTOL 1e-2

static int rounds_total = 0, redraws_total = 0;

/* aux_only: every target ignored, so the loss is the auxiliary losses alone (checks their
 * gradients in isolation; the head and ln_f then have exactly zero gradient). */
static void grad_check(cfg c, int aux_only, uint64_t seed) {
  char name[160];
  cfg_name(name, sizeof name, c);
  bam_mixture_shape s = mix_shape(c);
  if (aux_only) s.lb_coef = 1.0f, s.z_coef = 0.5f;
  const int B = 2, T = 6, n = B * T;
  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &s, B));
  if (!m) return;
  bam_mixture_init(m, seed, 0.3f);
  scale_tensor(m, "att_router", 15.0f);
  scale_tensor(m, "ffn_router", 15.0f);
  int32_t tokens[12], targets[12];
  random_ids(tokens, n, s.base.vocab_size, seed + 100);
  random_ids(targets, n, s.base.vocab_size, seed + 200);
  targets[3] = -1;
  targets[10] = -1;
  if (aux_only)
    for (int i = 0; i < n; i++) targets[i] = -1;
  float loss;
  bam_mixture_zero_grad(m);
  T_OK(bam_mixture_forward(m, tokens, targets, B, T, &loss));
  const uint64_t route0 = bam_mixture_route_hash(m);
  T_OK(bam_mixture_backward(m, 1.0f));
  float *grad = malloc(m->n_params * sizeof(float));
  memcpy(grad, m->grads_mem, m->n_params * sizeof(float));

  bam_rng r;
  bam_rng_seed(&r, seed, 77);
  int n_bad = 0, n_checked = 0, redraws = 0;
  double worst = 0, worst_abs = 0;
  for (int ti = 0; ti < m->n_tensors; ti++) {
    const bam_tensor_info *t = &m->tensors[ti];
    if (aux_only && (!strcmp(t->name, "w_head") || !strcmp(t->name, "ln_f"))) {
      int zero = 1;
      for (size_t j = 0; j < t->numel; j++) zero &= grad[t->offset + j] == 0.0f;
      T_CHECK(zero, "%s aux-only: %s gradient must be exactly 0", name, t->name);
      continue;
    }
    double max_abs = 0;
    for (int rep = 0, tries = 0; rep < 10 && tries < 200; tries++) {
      size_t j = bam_rng_below(&r, t->numel);
      if (!strcmp(t->name, "wte")) /* rows of tokens in the batch: the only non-zero ones */
        j = (size_t)tokens[bam_rng_below(&r, (uint64_t)n)] * (size_t)s.base.d_model +
            bam_rng_below(&r, (uint64_t)s.base.d_model);
      float *p = m->params_mem + t->offset + j;
      const float saved = *p;
      float lp, lm;
      *p = saved + FD_EPS;
      T_OK(bam_mixture_forward(m, tokens, targets, B, T, &lp));
      const uint64_t rp = bam_mixture_route_hash(m);
      *p = saved - FD_EPS;
      T_OK(bam_mixture_forward(m, tokens, targets, B, T, &lm));
      const uint64_t rm = bam_mixture_route_hash(m);
      *p = saved;
      rounds_total++;
      if (rp != route0 || rm != route0) { /* a routing decision flipped: re-draw */
        redraws++;
        continue;
      }
      rep++;
      double h = (double)(saved + FD_EPS) - (double)(saved - FD_EPS);
      double fd = ((double)lp - (double)lm) / h;
      double an = grad[t->offset + j];
      double err = fabs(an - fd);
      if (err > worst_abs) worst_abs = err;
      double excess = err / (FD_ATOL + FD_RTOL * fabs(fd));
      if (excess > worst) worst = excess;
      if (fabs(an) > max_abs) max_abs = fabs(an);
      n_checked++;
      if (excess > 1.0) {
        n_bad++;
        fprintf(stderr, "  %s%s %s[%zu]: analytic %.6g finite-diff %.6g\n", name,
                aux_only ? " aux-only" : "", t->name, j, an, fd);
      }
    }
    /* The check must be able to fail: sampled gradients well above the absolute tolerance. */
    T_CHECK(max_abs > 4 * FD_ATOL, "%s%s: %s gradients too small (%.3g) to test", name,
            aux_only ? " aux-only" : "", t->name, max_abs);
  }
  redraws_total += redraws;
  T_CHECK(n_bad == 0, "%s%s: %d of %d gradient entries off", name, aux_only ? " aux-only" : "",
          n_bad, n_checked);
  printf("grad %-66s%s: %3d entries (%2d re-drawn), max err %.2g = %.2f of tol, loss %.4f\n",
         name, aux_only ? " aux" : "", n_checked, redraws, worst_abs, worst, (double)loss);
  free(grad);
  bam_mixture_free(&m);
}

static void test_gradients(void) {
  const bam_method BTX = BAM_METHOD_BTX, BAM = BAM_METHOD_BAM, SKV = BAM_METHOD_BAM_SHARED_KV;
  /* Every method with k = 1 and 2, renormalisation on and off, soft and top-2 attention,
   * load balance per sequence and per batch, capacity on and off, MHA and GQA, tied and
   * untied, Ef = 4 and 3: pairwise covered rather than the full product. */
  const cfg cases[] = {
      /* method hkv k renorm att_top_k lb_seq tied Ef cap */
      {BTX, 2, 1, 0, 0, 1, 0, 4, 0.0f}, {BTX, 4, 2, 1, 0, 0, 1, 4, 1.0f},
      {BTX, 2, 2, 0, 0, 1, 0, 3, 1.0f}, {BTX, 4, 1, 1, 0, 1, 0, 3, 0.0f},
      {BAM, 2, 1, 0, 0, 1, 0, 4, 0.0f}, {BAM, 4, 2, 1, 2, 0, 0, 4, 0.0f},
      {BAM, 2, 2, 0, 2, 1, 1, 3, 1.0f}, {BAM, 4, 1, 1, 0, 0, 0, 3, 1.0f},
      {SKV, 2, 1, 1, 0, 0, 0, 4, 1.0f}, {SKV, 4, 2, 0, 2, 1, 1, 4, 0.0f},
      {SKV, 2, 2, 1, 0, 1, 0, 3, 0.0f}, {SKV, 4, 1, 0, 2, 0, 0, 3, 1.0f},
  };
  const int n_cases = (int)(sizeof cases / sizeof cases[0]);
  for (int i = 0; i < n_cases; i++) grad_check(cases[i], 0, 11 + (uint64_t)i);
  /* The auxiliary losses alone, for each method and both load-balance forms. */
  grad_check(cases[1], 1, 31);
  grad_check(cases[6], 1, 32);
  grad_check(cases[8], 1, 33);
  grad_check(cases[4], 1, 34);
  T_CHECK(redraws_total * 4 < rounds_total, "re-drawn %d of %d FD entries: routing too marginal",
          redraws_total, rounds_total);
}

/* ---- auxiliary losses against a hand computation in double ----
 *
 * One layer, every target ignored: the loss is exactly lb_coef L_lb + z_coef L_z of that
 * layer, whose router input h = LN(wte[token]) the test computes itself. */
static void aux_case(int k, int lb_seq, float cap, float lb_coef, float z_coef) {
  cfg c = {.method = BAM_METHOD_BTX, .hkv = 2, .k = k, .lb_seq = lb_seq, .Ef = 4, .cap = cap};
  bam_mixture_shape s = mix_shape(c);
  s.base.n_layers = 1;
  s.lb_coef = lb_coef;
  s.z_coef = z_coef;
  const int B = 3, T = 8, N = B * T, d = s.base.d_model, Ef = 4;
  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &s, B));
  if (!m) return;
  bam_mixture_init(m, 5, 0.3f);
  scale_tensor(m, "ffn_router", 40.0f); /* decisive routing: clear top-k margins */
  float *ln = bam_mixture_tensor(m, "ln", NULL);
  for (int i = 0; i < d; i++) ln[i] = 1.0f + 0.1f * (float)(i % 5); /* a non-trivial scale */
  int32_t tok[24], tgt[24];
  random_ids(tok, N, s.base.vocab_size, 9);
  for (int i = 0; i < N; i++) tgt[i] = -1;
  float loss;
  T_OK(bam_mixture_forward(m, tok, tgt, B, T, &loss));

  const float *wte = bam_mixture_tensor(m, "wte", NULL);
  const float *wr = bam_mixture_tensor(m, "ffn_router", NULL);
  const int cap_n = cap > 0 ? (int)ceil((double)cap * T * k / Ef) : 1 << 30;
  double p[24][4], lse[24], kept[3][4] = {{0}}, P[3][4] = {{0}}, min_margin = 1e9;
  for (int t = 0; t < N; t++) {
    const float *x = wte + (size_t)tok[t] * d;
    double mu = 0, var = 0, h[16], z[4], mx = -1e300, sum = 0;
    for (int i = 0; i < d; i++) mu += x[i];
    mu /= d;
    for (int i = 0; i < d; i++) var += (x[i] - mu) * (x[i] - mu);
    var /= d;
    for (int i = 0; i < d; i++) h[i] = (x[i] - mu) / sqrt(var + 1e-5) * ln[i];
    for (int e = 0; e < Ef; e++) {
      z[e] = 0;
      for (int i = 0; i < d; i++) z[e] += h[i] * wr[e * d + i];
      mx = fmax(mx, z[e]);
    }
    for (int e = 0; e < Ef; e++) sum += exp(z[e] - mx);
    lse[t] = mx + log(sum);
    for (int e = 0; e < Ef; e++) p[t][e] = exp(z[e] - lse[t]);
  }
  /* top-k in token order, capacity per sequence */
  for (int b = 0; b < B; b++) {
    int cnt[4] = {0};
    for (int t = b * T; t < (b + 1) * T; t++) {
      int taken[4] = {0};
      for (int r = 0; r < k; r++) {
        int best = -1;
        for (int e = 0; e < Ef; e++)
          if (!taken[e] && (best < 0 || p[t][e] > p[t][best])) best = e;
        for (int e = 0; e < Ef; e++) /* margin to the best non-chosen */
          if (!taken[e] && e != best) min_margin = fmin(min_margin, p[t][best] - p[t][e]);
        taken[best] = 1;
        if (cnt[best] < cap_n) cnt[best]++, kept[lb_seq ? b : 0][best] += 1;
      }
      for (int e = 0; e < Ef; e++) P[lb_seq ? b : 0][e] += p[t][e];
    }
  }
  const int G = lb_seq ? B : 1, n_per = N / G;
  double L_lb = 0, L_z = 0;
  for (int g = 0; g < G; g++) {
    double s_ = 0;
    for (int e = 0; e < Ef; e++) s_ += (kept[g][e] / (n_per * k)) * (P[g][e] / n_per);
    L_lb += Ef * s_ / G;
  }
  for (int t = 0; t < N; t++) L_z += lse[t] * lse[t] / N;
  const double expect = lb_coef * L_lb + z_coef * L_z;
  char what[128];
  snprintf(what, sizeof what, "aux loss k=%d lb=%s cap=%g coefs (%g, %g) [L_lb %.5f L_z %.5f]",
           k, lb_seq ? "seq" : "batch", (double)cap, (double)lb_coef, (double)z_coef, L_lb, L_z);
  T_CHECK(min_margin > 1e-4, "%s: top-k margin %.3g too small for a float/double comparison",
          what, min_margin);
  T_CLOSE(loss, expect, 1e-7, 2e-6, what);
  T_CLOSE(m->last_aux_loss, expect, 1e-7, 2e-6, "last_aux_loss");
  T_CHECK(m->last_loss == 0.0f, "all ignored: token loss 0");
  bam_mixture_free(&m);
}

static void test_aux_losses(void) {
  aux_case(1, 1, 0.0f, 1.0f, 0.0f);
  aux_case(1, 0, 0.0f, 1.0f, 0.0f);
  aux_case(2, 1, 0.0f, 1.0f, 0.0f);
  aux_case(2, 0, 0.0f, 1.0f, 0.0f);
  aux_case(1, 1, 1.0f, 1.0f, 0.0f); /* capacity: f counts kept assignments only */
  aux_case(2, 0, 0.75f, 1.0f, 0.0f);
  aux_case(1, 1, 1.25f, 1.0f, 0.0f); /* ceil(1.25 * 8 / 4) = 3 per expert and sequence */
  aux_case(1, 1, 0.0f, 0.0f, 1.0f); /* z-loss */
  aux_case(2, 0, 1.0f, 0.3f, 0.7f); /* both */
}

/* ---- identities with identical experts ---- */

static void copy_tensor(bam_mixture *dst, const char *name, const float *src, size_t numel) {
  const bam_tensor_info *t;
  float *p = bam_mixture_tensor(dst, name, &t);
  if (!p) return;
  for (size_t off = 0; off + numel <= t->numel; off += numel) memcpy(p + off, src, numel * 4);
}

/* BAM whose Ea attention experts are copies of BTX's dense attention: sum_j g_j o = o, so the
 * logits match BTX's and each expert's gradient is its gate's share of BTX's: the sum over
 * experts of dWq_j (dWk_j, dWv_j, dWo_j) equals BTX's dWq (...). */
static void test_identity_attention(bam_method method, int hkv) {
  cfg c = {.method = BAM_METHOD_BTX, .hkv = hkv, .k = 2, .renorm = 0, .lb_seq = 1, .Ef = 3};
  bam_mixture_shape sb = mix_shape(c), sa = sb;
  sa.method = method;
  const int B = 2, T = 8, n = B * T;
  bam_mixture *btx = NULL, *bam = NULL;
  T_OK(bam_mixture_create(&btx, &sb, B));
  T_OK(bam_mixture_create(&bam, &sa, B));
  if (!btx || !bam) return;
  bam_mixture_init(btx, 21, 0.3f);
  bam_mixture_init(bam, 22, 0.3f);
  scale_tensor(bam, "att_router", 15.0f); /* far from uniform gates */
  for (int i = 0; i < btx->n_tensors; i++) {
    const bam_tensor_info *t = &btx->tensors[i];
    copy_tensor(bam, t->name, btx->params_mem + t->offset, t->numel);
  }
  int32_t tok[16], tgt[16];
  random_ids(tok, n, sb.base.vocab_size, 41);
  random_ids(tgt, n, sb.base.vocab_size, 42);
  float lb, la;
  bam_mixture_zero_grad(btx);
  bam_mixture_zero_grad(bam);
  T_OK(bam_mixture_forward(btx, tok, tgt, B, T, &lb));
  T_OK(bam_mixture_forward(bam, tok, tgt, B, T, &la));
  const size_t nl = (size_t)n * sb.base.vocab_size;
  double dl = max_abs_diff(bam_mixture_logits(bam), bam_mixture_logits(btx), nl);
  T_CHECK(dl < 1e-5, "%s Hkv=%d with copied experts: max |logit diff| %.3g vs BTX",
          bam_method_name(method), hkv, dl);
  T_CLOSE(la, lb, 0, 1e-6, "copied-expert BAM loss == BTX loss");
  T_CHECK(bam_mixture_route_hash(bam) != 0, "hash defined");
  T_OK(bam_mixture_backward(btx, 1.0f));
  T_OK(bam_mixture_backward(bam, 1.0f));
  const char *names[] = {"wq", "wk", "wv", "wo", "w_gate", "ffn_router", "wte", "ln"};
  for (int i = 0; i < 8; i++) {
    const bam_tensor_info *tb = tinfo(btx, names[i]), *ta = tinfo(bam, names[i]);
    const size_t nb = tb->numel, ne = ta->numel / nb;
    float *sum = calloc(nb, 4);
    for (size_t e = 0; e < ne; e++)
      for (size_t j = 0; j < nb; j++) sum[j] += tgrad(bam, names[i])[e * nb + j];
    double rd = rel_diff(sum, tgrad(btx, names[i]), nb);
    T_CHECK(rd < 2e-5, "%s Hkv=%d: sum over experts of d%s vs BTX: rel diff %.3g",
            bam_method_name(method), hkv, names[i], rd);
    free(sum);
  }
  printf("identity %s Hkv=%d: BAM with %d copies of BTX's attention, max |logit diff| %.2g\n",
         bam_method_name(method), hkv, sa.n_att_experts, dl);
  bam_mixture_free(&btx);
  bam_mixture_free(&bam);
}

/* BTX whose Ef FFN experts are copies of a dense model's FFN, renormalised top-k gates (sum
 * to 1), no auxiliary losses: the dense model exactly, logits, loss and gradients (summed
 * over the experts). */
static void test_identity_ffn(int k, int tied) {
  cfg c = {.method = BAM_METHOD_BTX, .hkv = 2, .k = k, .renorm = 1, .lb_seq = 1, .tied = tied,
           .Ef = 3};
  bam_mixture_shape s = mix_shape(c);
  s.lb_coef = 0.0f;
  s.z_coef = 0.0f;
  const int B = 2, T = 8, n = B * T;
  bam_mixture *mix = NULL;
  bam_model *dense = NULL;
  T_OK(bam_mixture_create(&mix, &s, B));
  T_OK(bam_model_create(&dense, &s.base, B));
  if (!mix || !dense) return;
  bam_model_init(dense, 23, 0.3f);
  bam_mixture_init(mix, 24, 0.3f);
  scale_tensor(mix, "ffn_router", 15.0f);
  for (int i = 0; i < dense->n_tensors; i++) {
    const bam_tensor_info *t = &dense->tensors[i];
    copy_tensor(mix, t->name, dense->params_mem + t->offset, t->numel);
  }
  int32_t tok[16], tgt[16];
  random_ids(tok, n, s.base.vocab_size, 51);
  random_ids(tgt, n, s.base.vocab_size, 52);
  tgt[4] = -1;
  float lm, ld;
  bam_mixture_zero_grad(mix);
  bam_model_zero_grad(dense);
  T_OK(bam_mixture_forward(mix, tok, tgt, B, T, &lm));
  T_OK(bam_model_forward(dense, tok, tgt, B, T, &ld));
  const size_t nl = (size_t)n * s.base.vocab_size;
  double dl = max_abs_diff(bam_mixture_logits(mix), bam_model_logits(dense), nl);
  T_CHECK(dl < 1e-5, "BTX k=%d tied=%d identical experts vs dense: max |logit diff| %.3g", k,
          tied, dl);
  T_CLOSE(lm, ld, 0, 1e-6, "identical-expert mixture loss == dense loss");
  T_CHECK(mix->last_aux_loss == 0.0f, "no auxiliary loss with zero coefficients");
  T_OK(bam_mixture_backward(mix, 1.0f));
  T_OK(bam_model_backward(dense, 1.0f));
  for (int i = 0; i < dense->n_tensors; i++) {
    const bam_tensor_info *td = &dense->tensors[i], *tm = tinfo(mix, td->name);
    const size_t nb = td->numel, ne = tm->numel / nb;
    float *sum = calloc(nb, 4);
    for (size_t e = 0; e < ne; e++)
      for (size_t j = 0; j < nb; j++) sum[j] += tgrad(mix, td->name)[e * nb + j];
    double rd = rel_diff(sum, dense->grads_mem + td->offset, nb);
    T_CHECK(rd < 2e-5, "BTX k=%d tied=%d identical experts: d%s vs dense: rel diff %.3g", k, tied,
            td->name, rd);
    free(sum);
  }
  /* The renormalised gates are constant (sum to 1): the router gets no gradient at all. */
  const bam_tensor_info *tr = tinfo(mix, "ffn_router");
  double rn = 0;
  for (size_t j = 0; j < tr->numel; j++) rn += fabs(tgrad(mix, "ffn_router")[j]);
  T_CHECK(rn < 1e-6, "router gradient %.3g with constant renormalised gates", rn);
  printf("identity BTX k=%d tied=%d: %d copies of the dense FFN, max |logit diff| %.2g\n", k,
         tied, s.n_ffn_experts, dl);
  bam_mixture_free(&mix);
  bam_model_free(&dense);
}

/* ---- an attention expert no token keeps is skipped, exactly ---- */
static void test_skipped_expert(void) {
  cfg c = {.method = BAM_METHOD_BAM, .hkv = 2, .k = 1, .att_top_k = 1, .lb_seq = 1, .Ef = 4};
  bam_mixture_shape s = mix_shape(c);
  const int B = 2, T = 6, n = B * T, d = 16, L = 2, Ea = 3;
  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &s, B));
  if (!m) return;
  bam_mixture_init(m, 61, 0.3f);
  scale_tensor(m, "att_router", 15.0f);
  /* Column 0 of every embedding is large, so h[0] = LN(x)[0] is large and positive for every
   * token of layer 0; a router row -20 e_0 then gives expert 2 the lowest logit everywhere. */
  float *wte = bam_mixture_tensor(m, "wte", NULL), *ar = bam_mixture_tensor(m, "att_router", NULL);
  for (int v = 0; v < s.base.vocab_size; v++) wte[v * d] = 3.0f;
  for (int i = 0; i < d; i++) ar[2 * d + i] = i == 0 ? -20.0f : 0.0f; /* layer 0, expert 2 */
  int32_t tok[12], tgt[12];
  random_ids(tok, n, s.base.vocab_size, 62);
  random_ids(tgt, n, s.base.vocab_size, 63);
  float l0, l1;
  bam_mixture_zero_grad(m);
  T_OK(bam_mixture_forward(m, tok, tgt, B, T, &l0));
  double gate[2 * 3], share[2 * 4];
  bam_route_stats st = {.ffn_share = share, .att_gate = gate};
  bam_mixture_route_stats(m, &st);
  T_CHECK(gate[2] == 0.0, "layer 0 expert 2 never kept (mean gate %g)", gate[2]);
  double gs = 0;
  for (int j = 0; j < Ea; j++) gs += gate[j];
  T_CHECK(gs < 1.0 && gs > 1.0 / Ea, "top-1 gates keep one softmax entry: mean sum %g", gs);
  T_OK(bam_mixture_backward(m, 1.0f));
  const size_t dd = (size_t)d * d;
  float *gq = tgrad(m, "wq") + (2 * L + 0) * dd, *go = tgrad(m, "wo") + (2 * L + 0) * dd;
  int zero = 1;
  for (size_t i = 0; i < dd; i++) zero &= gq[i] == 0.0f && go[i] == 0.0f;
  T_CHECK(zero, "skipped expert: wq, wo gradients exactly 0");
  /* Its weights do not influence the loss at all. */
  float *wq2 = bam_mixture_tensor(m, "wq", NULL) + (2 * L + 0) * dd;
  for (size_t i = 0; i < dd; i++) wq2[i] += 1.0f;
  T_OK(bam_mixture_forward(m, tok, tgt, B, T, &l1));
  T_CHECK(l0 == l1, "skipped expert's weights do not change the loss (%.9g vs %.9g)", (double)l0,
          (double)l1);
  bam_mixture_free(&m);
}

/* ---- determinism, ignored targets, zero_grad ---- */
static void test_determinism_and_targets(void) {
  cfg c = {.method = BAM_METHOD_BAM, .hkv = 2, .k = 2, .renorm = 1, .att_top_k = 0, .lb_seq = 1,
           .Ef = 4, .cap = 1.0f};
  bam_mixture_shape s = mix_shape(c);
  const int B = 2, T = 8, n = B * T;
  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &s, B));
  if (!m) return;
  bam_mixture_init(m, 71, 0.2f);
  scale_tensor(m, "att_router", 10.0f);
  scale_tensor(m, "ffn_router", 10.0f);
  int32_t tok[16], tgt[16];
  random_ids(tok, n, s.base.vocab_size, 72);
  random_ids(tgt, n, s.base.vocab_size, 73);
  const size_t nl = (size_t)n * s.base.vocab_size, np = m->n_params;
  float l1, l2;
  float *g1 = malloc(np * 4), *d1 = malloc(nl * 4);
  bam_mixture_zero_grad(m);
  T_OK(bam_mixture_forward(m, tok, tgt, B, T, &l1));
  T_OK(bam_mixture_backward(m, 1.0f));
  memcpy(g1, m->grads_mem, np * 4);
  memcpy(d1, bam_mixture_logits(m), nl * 4);
  bam_mixture_zero_grad(m);
  int zero = 1;
  for (size_t i = 0; i < np; i++) zero &= m->grads_mem[i] == 0.0f;
  T_CHECK(zero, "zero_grad clears every gradient");
  T_OK(bam_mixture_forward(m, tok, tgt, B, T, &l2));
  T_OK(bam_mixture_backward(m, 1.0f));
  T_CHECK(l1 == l2 && !memcmp(g1, m->grads_mem, np * 4) &&
              !memcmp(d1, bam_mixture_logits(m), nl * 4),
          "two forward/backward runs are bitwise identical");
  T_CHECK(bam_mixture_backward(m, 1.0f) == BAM_ERR_ARG, "second backward rejected");
  bam_error_clear();

  /* Ignored targets: token loss = mean over the others; the auxiliary losses use every token
   * and do not change; loss = token + aux. */
  T_OK(bam_mixture_forward(m, tok, tgt, B, T, &l1));
  float tl[16], aux_all = m->last_aux_loss;
  memcpy(tl, bam_mixture_token_losses(m), sizeof tl);
  int32_t tig[16];
  memcpy(tig, tgt, sizeof tig);
  tig[0] = -1, tig[9] = -3;
  T_OK(bam_mixture_forward(m, tok, tig, B, T, &l2));
  double sum = 0;
  for (int i = 0; i < n; i++)
    if (tig[i] >= 0) sum += tl[i];
  T_CLOSE(m->last_loss, sum / (n - 2), 0, 1e-6, "masked token loss = mean of the others");
  T_CHECK(m->last_aux_loss == aux_all && aux_all > 0, "aux loss independent of targets (%g)",
          (double)aux_all);
  T_CLOSE(l2, (double)m->last_loss + m->last_aux_loss, 0, 1e-6, "loss = token + aux");
  T_CHECK(bam_mixture_token_losses(m)[0] == 0.0f && bam_mixture_token_losses(m)[9] == 0.0f,
          "ignored token losses are 0");
  /* Forward without targets: same logits, aux still reported, no backward. */
  memcpy(d1, bam_mixture_logits(m), nl * 4);
  T_OK(bam_mixture_forward(m, tok, NULL, B, T, NULL));
  T_CHECK(!memcmp(d1, bam_mixture_logits(m), nl * 4) && m->last_aux_loss == aux_all,
          "logits and aux identical without targets");
  bam_status st = bam_mixture_backward(m, 1.0f);
  T_CHECK(st == BAM_ERR_ARG && strstr(bam_error_message(), "no targets"),
          "backward without targets rejected: %s", bam_error_message());
  bam_error_clear();
  /* All ignored: loss = aux, the head gets nothing, the routers still learn. */
  int32_t none[16];
  for (int i = 0; i < n; i++) none[i] = -1;
  bam_mixture_zero_grad(m);
  T_OK(bam_mixture_forward(m, tok, none, B, T, &l1));
  T_OK(bam_mixture_backward(m, 1.0f));
  T_CHECK(l1 == m->last_aux_loss && m->last_loss == 0.0f, "all ignored: loss %g = aux %g",
          (double)l1, (double)m->last_aux_loss);
  const bam_tensor_info *th = tinfo(m, "w_head"), *tr = tinfo(m, "ffn_router");
  double gh = 0, gr = 0;
  for (size_t i = 0; i < th->numel; i++) gh += fabs(m->grads_mem[th->offset + i]);
  for (size_t i = 0; i < tr->numel; i++) gr += fabs(m->grads_mem[tr->offset + i]);
  T_CHECK(gh == 0.0 && gr > 0.0, "all ignored: |d w_head| %g, |d ffn_router| %g", gh, gr);
  free(g1);
  free(d1);
  bam_mixture_free(&m);
}

/* ---- gradient accumulation: two halves at scale 1/2 == the whole batch ----
 * Holds with per-sequence load balance and capacity (both per sequence), the z-loss (a mean
 * over tokens) and equal valid-target counts per half. */
static void test_grad_accumulation(bam_method method) {
  cfg c = {.method = method, .hkv = 2, .k = 2, .renorm = 0, .att_top_k = 0, .lb_seq = 1,
           .tied = 1, .Ef = 3, .cap = 1.0f};
  bam_mixture_shape s = mix_shape(c);
  const int B = 4, T = 8, n = B * T;
  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &s, B));
  if (!m) return;
  bam_mixture_init(m, 81, 0.2f);
  scale_tensor(m, "ffn_router", 10.0f);
  scale_tensor(m, "att_router", 10.0f);
  int32_t tok[32], tgt[32];
  random_ids(tok, n, s.base.vocab_size, 82);
  random_ids(tgt, n, s.base.vocab_size, 83);
  tgt[2] = -1;
  tgt[20] = -1;
  float l_all, l_a, l_b;
  bam_mixture_zero_grad(m);
  T_OK(bam_mixture_forward(m, tok, tgt, B, T, &l_all));
  T_OK(bam_mixture_backward(m, 1.0f));
  float *g = malloc(m->n_params * 4);
  memcpy(g, m->grads_mem, m->n_params * 4);
  bam_mixture_zero_grad(m);
  T_OK(bam_mixture_forward(m, tok, tgt, 2, T, &l_a));
  T_OK(bam_mixture_backward(m, 0.5f));
  T_OK(bam_mixture_forward(m, tok + 2 * T, tgt + 2 * T, 2, T, &l_b));
  T_OK(bam_mixture_backward(m, 0.5f));
  T_CLOSE(0.5 * ((double)l_a + l_b), l_all, 0, 1e-6, "mean of micro-batch losses (aux included)");
  double rd = rel_diff(m->grads_mem, g, m->n_params);
  T_CHECK(rd < 1e-6, "%s: accumulated vs whole-batch gradient: rel diff %.3g",
          bam_method_name(method), rd);
  free(g);
  bam_mixture_free(&m);
}

/* ---- routing statistics ---- */
static void test_stats(void) {
  for (int att_top_k = 0; att_top_k <= 2; att_top_k += 2) {
    cfg c = {.method = BAM_METHOD_BAM, .hkv = 2, .k = 2, .att_top_k = att_top_k, .lb_seq = 1,
             .Ef = 4, .cap = 0.5f};
    bam_mixture_shape s = mix_shape(c);
    const int B = 2, T = 8, n = B * T, L = 2, Ea = 3, Ef = 4;
    bam_mixture *m = NULL;
    T_OK(bam_mixture_create(&m, &s, B));
    if (!m) return;
    bam_mixture_init(m, 91, 0.3f);
    scale_tensor(m, "att_router", 10.0f);
    int32_t tok[16];
    random_ids(tok, n, s.base.vocab_size, 92);
    T_OK(bam_mixture_forward(m, tok, NULL, B, T, NULL));
    double share[8], gate[6], fe[2], ae[2];
    bam_route_stats st = {share, gate, fe, ae, 0};
    bam_mixture_route_stats(m, &st);
    for (int l = 0; l < L; l++) {
      double ss = 0, gs = 0;
      for (int e = 0; e < Ef; e++) ss += share[l * Ef + e];
      for (int j = 0; j < Ea; j++) gs += gate[l * Ea + j];
      T_CLOSE(ss, 1.0, 1e-12, 0, "FFN shares sum to 1 per layer (capacity drops included)");
      if (att_top_k == 0)
        T_CLOSE(gs, 1.0, 1e-6, 0, "soft attention gates sum to 1 per layer");
      else
        T_CHECK(gs < 1.0 && gs > 2.0 / 3.0, "top-2 of 3 gates: mean sum %g in (2/3, 1)", gs);
      T_CHECK(fe[l] >= 0 && fe[l] <= log(4.0) + 1e-9, "FFN entropy %g in [0, log 4]", fe[l]);
      T_CHECK(ae[l] >= 0 && ae[l] < log(3.0) - 1e-3, "attention entropy %g in [0, log 3)", ae[l]);
    }
    bam_mixture_free(&m);
  }
  /* BTX: the attention arrays are left alone. */
  cfg c = {.method = BAM_METHOD_BTX, .hkv = 2, .k = 1, .lb_seq = 1, .Ef = 4};
  bam_mixture_shape s = mix_shape(c);
  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &s, 1));
  if (!m) return;
  bam_mixture_init(m, 93, 0.02f);
  int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  T_OK(bam_mixture_forward(m, tok, NULL, 1, 8, NULL));
  double share[8], gate[6] = {-1, -1, -1, -1, -1, -1}, fe[2], ae[2] = {-1, -1};
  bam_route_stats st = {share, gate, fe, ae, 0};
  bam_mixture_route_stats(m, &st);
  T_CHECK(gate[0] == -1 && ae[1] == -1, "BTX leaves the attention statistics untouched");
  T_CLOSE(share[0] + share[1] + share[2] + share[3], 1.0, 1e-12, 0, "BTX shares sum to 1");
  /* Near-uniform router at init: entropy close to log Ef. */
  T_CHECK(fe[0] > log(4.0) - 0.05, "FFN entropy at init %g near log 4", fe[0]);
  bam_mixture_free(&m);

  /* Ties go to the lower index: zero routers make every p exactly uniform, so top-2 FFN
   * routing picks experts 0 and 1 for every token and top-1 attention picks expert 0. */
  cfg ct = {.method = BAM_METHOD_BAM, .hkv = 2, .k = 2, .att_top_k = 1, .lb_seq = 1, .Ef = 4};
  s = mix_shape(ct);
  T_OK(bam_mixture_create(&m, &s, 1));
  if (!m) return;
  bam_mixture_init(m, 94, 0.1f);
  scale_tensor(m, "ffn_router", 0.0f);
  scale_tensor(m, "att_router", 0.0f);
  T_OK(bam_mixture_forward(m, tok, NULL, 1, 8, NULL));
  bam_mixture_route_stats(m, &st);
  T_CHECK(share[0] == 0.5 && share[1] == 0.5 && share[2] == 0 && share[3] == 0,
          "uniform p: top-2 = experts 0, 1 (shares %g %g %g %g)", share[0], share[1], share[2],
          share[3]);
  T_CLOSE(gate[0], 1.0 / 3.0, 1e-7, 0, "uniform g: top-1 = expert 0, gate 1/3");
  T_CHECK(gate[1] == 0 && gate[2] == 0, "uniform g: experts 1, 2 not kept");
  bam_mixture_free(&m);
}

/* ---- shape checks ---- */
static void expect_bad(bam_mixture_shape s, const char *needle) {
  bam_status st = bam_mixture_shape_check(&s);
  T_CHECK(st == BAM_ERR_CONFIG && strstr(bam_error_message(), needle),
          "shape check should reject naming '%s'; got %d: %s", needle, (int)st,
          bam_error_message());
  bam_error_clear();
  bam_mixture *m = NULL;
  st = bam_mixture_create(&m, &s, 1);
  T_CHECK(st != BAM_OK && m == NULL, "create refuses a bad shape (%s)", needle);
  bam_error_clear();
}

static void test_shape_check(void) {
  cfg c = {.method = BAM_METHOD_BAM, .hkv = 2, .k = 2, .att_top_k = 1, .lb_seq = 1, .Ef = 4};
  const bam_mixture_shape ok = mix_shape(c);
  T_OK(bam_mixture_shape_check(&ok));
  bam_mixture_shape s;
  s = ok, s.n_ffn_experts = 0, expect_bad(s, "n_ffn_experts");
  s = ok, s.ffn_top_k = 5, expect_bad(s, "ffn_top_k");
  s = ok, s.ffn_top_k = 0, expect_bad(s, "ffn_top_k");
  s = ok, s.n_att_experts = 0, expect_bad(s, "n_att_experts");
  s = ok, s.att_top_k = 4, expect_bad(s, "att_top_k");
  s = ok, s.lb_coef = -1, expect_bad(s, "lb_coef");
  s = ok, s.z_coef = NAN, expect_bad(s, "z_coef");
  s = ok, s.capacity_factor = -0.5f, expect_bad(s, "capacity_factor");
  s = ok, s.lb_per_sequence = 2, expect_bad(s, "lb_per_sequence");
  s = ok, s.ffn_renormalize = 3, expect_bad(s, "ffn_renormalize");
  s = ok, s.method = (bam_method)7, expect_bad(s, "method");
  s = ok, s.base.d_model = 18, expect_bad(s, "divisible by n_heads");
  s = ok, s.method = BAM_METHOD_BTX, s.n_att_experts = 0, s.att_top_k = 9;
  T_OK(bam_mixture_shape_check(&s)); /* BTX ignores the attention-expert fields */

  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &ok, 2));
  if (!m) return;
  bam_mixture_init(m, 1, 0.02f);
  int32_t tok[27] = {0}, tgt[27] = {0};
  T_CHECK(bam_mixture_forward(m, tok, tgt, 3, 4, NULL) == BAM_ERR_ARG, "B > max_batch rejected");
  bam_error_clear();
  T_CHECK(bam_mixture_forward(m, tok, tgt, 1, 9, NULL) == BAM_ERR_ARG, "T > seq_len rejected");
  bam_error_clear();
  tok[5] = 29;
  bam_status st = bam_mixture_forward(m, tok, tgt, 2, 4, NULL);
  T_CHECK(st == BAM_ERR_DATA && strstr(bam_error_message(), "token 29 at (1, 1)"),
          "token out of vocabulary rejected with its position: %s", bam_error_message());
  bam_error_clear();
  /* T < seq_len and B < max_batch work (slices indexed with the actual T). */
  tok[5] = 3;
  T_OK(bam_mixture_forward(m, tok, tgt, 1, 5, NULL));
  bam_mixture_free(&m);
  bam_mixture_free(&m);
}

/* ---- FLOPs (method.md section 5) ---- */
static void test_flops(void) {
  bam_mixture_shape s = {.base = {.n_layers = 6,
                                  .d_model = 1024,
                                  .n_heads = 8,
                                  .n_kv_heads = 8,
                                  .d_ff = 2048,
                                  .vocab_size = 32000,
                                  .seq_len = 1024,
                                  .rope_base = 10000.0f,
                                  .norm_eps = 1e-5f},
                         .method = BAM_METHOD_BTX,
                         .n_att_experts = 4,
                         .n_ffn_experts = 4,
                         .ffn_top_k = 1,
                         .lb_per_sequence = 1};
  const double d = 1024, T = 1024, f2 = 4096, V = 32000, E = 4, Lr = 6;
  const double attn = 6 * d * d + 2 * T * d + 2 * d * d;
  double ffn = 2 * E * d + 3 * 1 * d * f2;
  T_CLOSE(bam_mixture_flops_per_token(&s, 1024), Lr * (attn + ffn) + 2 * d * V, 0, 1e-12,
          "BTX flops/token, paper formula");
  s.method = BAM_METHOD_BAM;
  T_CLOSE(bam_mixture_flops_per_token(&s, 1024), Lr * (E * attn + 2 * E * d + ffn) + 2 * d * V, 0,
          1e-12, "BAM flops/token: attention x E + attention router");
  s.method = BAM_METHOD_BAM_SHARED_KV;
  const double skv = E * (2 * d * d + 2 * T * d + 2 * d * d) + 4 * d * d;
  T_CLOSE(bam_mixture_flops_per_token(&s, 1024), Lr * (skv + 2 * E * d + ffn) + 2 * d * V, 0,
          1e-12, "BAM shared-KV flops/token: K,V once");
  s.method = BAM_METHOD_BTX;
  s.ffn_top_k = 2;
  ffn = 2 * E * d + 3 * 2 * d * f2;
  T_CLOSE(bam_mixture_flops_per_token(&s, 1024), Lr * (attn + ffn) + 2 * d * V, 0, 1e-12,
          "BTX top-2");
  /* One FFN expert, k = 1: the dense model plus the router. */
  s.n_ffn_experts = 1, s.ffn_top_k = 1;
  T_CLOSE(bam_mixture_flops_per_token(&s, 1024),
          bam_model_flops_per_token(&s.base, 1024) + Lr * 2 * d, 0, 1e-12,
          "BTX with one expert = dense + router");
}

/* concurrent_branches: the attention and FFN branches on two threads at once give the
 * sequential results to float rounding (the products of a branch then run on one thread, whose
 * blocking may sum in another order) and are bitwise repeatable; at a size where the products
 * are threaded when run one after the other. */
static void test_concurrent_branches(void) {
  const bam_method methods[3] = {BAM_METHOD_BTX, BAM_METHOD_BAM, BAM_METHOD_BAM_SHARED_KV};
  for (int mi = 0; mi < 3; mi++) {
    bam_mixture_shape s = mix_shape((cfg){.method = methods[mi], .hkv = 2, .k = 2, .renorm = 0,
                                          .att_top_k = 0, .lb_seq = 1, .Ef = 4, .cap = 0.0f});
    s.base.d_model = 64, s.base.d_ff = 128, s.base.seq_len = 32, s.base.n_heads = 4;
    const int B = 8, T = 32, n = B * T;
    bam_mixture *m = NULL;
    T_OK(bam_mixture_create(&m, &s, B));
    if (!m) return;
    bam_mixture_init(m, 5, 0.1f);
    int32_t *tok = malloc(sizeof(int32_t) * n), *tgt = malloc(sizeof(int32_t) * n);
    random_ids(tok, n, s.base.vocab_size, 8);
    random_ids(tgt, n, s.base.vocab_size, 9);
    const size_t np = m->n_params, nl = (size_t)n * s.base.vocab_size;
    float loss[3], *g = malloc(np * 4 * 3), *lg = malloc(nl * 4 * 3);
    for (int run = 0; run < 3; run++) { /* sequential, concurrent, concurrent again */
      m->concurrent_branches = run > 0;
      bam_mixture_zero_grad(m);
      T_OK(bam_mixture_forward(m, tok, tgt, B, T, &loss[run]));
      T_OK(bam_mixture_backward(m, 1.0f));
      memcpy(g + run * np, m->grads_mem, np * 4);
      memcpy(lg + run * nl, bam_mixture_logits(m), nl * 4);
    }
    const char *name = bam_method_name(methods[mi]);
    T_CHECK(loss[1] == loss[2] && !memcmp(lg + nl, lg + 2 * nl, nl * 4) &&
                !memcmp(g + np, g + 2 * np, np * 4),
            "%s: concurrent branches twice differ", name);
    T_CLOSE(loss[1], loss[0], 0, 1e-6, name);
    const double dl = t_max_rel(lg + nl, lg, nl);
    T_CHECK(dl < 1e-5, "%s: concurrent logits differ by %.2e", name, dl);
    for (int i = 0; i < m->n_tensors; i++) {
      const bam_tensor_info *t = &m->tensors[i];
      const double dg = t_max_rel(g + np + t->offset, g + t->offset, t->numel);
      T_CHECK(dg < 1e-4, "%s: concurrent gradient of %s differs by %.2e", name, t->name, dg);
    }
    free(tok), free(tgt), free(g), free(lg);
    bam_mixture_free(&m);
  }
}

int main(void) {
  double t0 = bam_now();
  test_layout();
  test_init();
  test_gradients();
  test_aux_losses();
  test_identity_attention(BAM_METHOD_BAM, 2);
  test_identity_attention(BAM_METHOD_BAM, 4);
  test_identity_attention(BAM_METHOD_BAM_SHARED_KV, 2);
  test_identity_ffn(1, 0);
  test_identity_ffn(2, 1);
  test_skipped_expert();
  test_determinism_and_targets();
  test_concurrent_branches();
  test_grad_accumulation(BAM_METHOD_BTX);
  test_grad_accumulation(BAM_METHOD_BAM);
  test_grad_accumulation(BAM_METHOD_BAM_SHARED_KV);
  test_stats();
  test_shape_check();
  test_flops();
  printf("mixture tests: %.1f s\n", bam_now() - t0);
  BAM_TEST_END();
}
