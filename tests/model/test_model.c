/* Tests of the dense model: layout, initialisation, whole-model gradients against finite
 * differences, ignored targets, gradient accumulation, argument checks, FLOPs. Training
 * (determinism of a short run, overfitting one batch) needs the optimizer and lives in
 * tests/optim/test_train.c, whose target links bam_optim. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "bam/model.h"
#include "test_util.h"

static bam_model_shape tiny_shape(int n_kv_heads, int tied) {
  return (bam_model_shape){.n_layers = 2,
                           .d_model = 16,
                           .n_heads = 4,
                           .n_kv_heads = n_kv_heads,
                           .d_ff = 24,
                           .vocab_size = 37,
                           .seq_len = 8,
                           .tie_embeddings = tied,
                           .rope_base = 10000.0f,
                           .norm_eps = 1e-5f};
}

static void random_ids(int32_t *x, int n, int V, uint64_t seed) {
  bam_rng r;
  bam_rng_seed(&r, seed, 0);
  for (int i = 0; i < n; i++) x[i] = (int32_t)bam_rng_below(&r, (uint64_t)V);
}

static const bam_tensor_info *find_tensor(const bam_model *m, const char *name) {
  for (int i = 0; i < m->n_tensors; i++)
    if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
  return NULL;
}

/* ---- layout ---- */
static void test_layout(void) {
  bam_model_shape s = tiny_shape(2, 0);
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &s, 2));
  if (!m) return;
  const size_t L = 2, d = 16, kvd = 8, f = 24, V = 37;
  const size_t expect =
      V * d + L * d + L * d * d + 2 * L * kvd * d + L * d * d + 3 * L * f * d + d + V * d;
  T_CHECK(m->n_params == expect, "n_params %zu, expected %zu", m->n_params, expect);
  T_CHECK(m->n_tensors == 11, "untied model has %d tensors, expected 11", m->n_tensors);
  size_t off = 0;
  const char *order[] = {"wte",    "ln",   "wq",     "wk",   "wv",    "wo",
                         "w_gate", "w_up", "w_down", "ln_f", "w_head"};
  for (int i = 0; i < m->n_tensors && i < 11; i++) {
    const bam_tensor_info *t = &m->tensors[i];
    T_CHECK(!strcmp(t->name, order[i]), "tensor %d is %s, expected %s", i, t->name, order[i]);
    T_CHECK(t->offset == off, "%s offset %zu, expected %zu (contiguous)", t->name, t->offset, off);
    size_t numel = 1;
    for (int k = 0; k < t->ndim; k++) numel *= (size_t)t->shape[k];
    T_CHECK(numel == t->numel, "%s numel %zu vs shape product %zu", t->name, t->numel, numel);
    int is_norm = !strcmp(t->name, "ln") || !strcmp(t->name, "ln_f");
    T_CHECK(t->decay == !is_norm, "%s decay flag %d", t->name, t->decay);
    off += t->numel;
  }
  T_CHECK(m->params.wk == m->params_mem + find_tensor(m, "wk")->offset, "wk view");
  T_CHECK(m->grads.w_head == m->grads_mem + find_tensor(m, "w_head")->offset, "w_head grad view");
  T_CHECK(m->params.w_head != m->params.wte, "untied head must not alias wte");
  bam_model_free(&m);
  T_CHECK(m == NULL, "free nulls the pointer");

  s.tie_embeddings = 1;
  T_OK(bam_model_create(&m, &s, 2));
  if (!m) return;
  T_CHECK(m->n_tensors == 10 && find_tensor(m, "w_head") == NULL, "tied: no w_head entry");
  T_CHECK(m->n_params == expect - V * d, "tied n_params %zu", m->n_params);
  T_CHECK(m->params.w_head == m->params.wte && m->grads.w_head == m->grads.wte,
          "tied head aliases wte in params and grads");
  printf("tiny model: %zu params, %zu activation bytes\n", m->n_params, m->act_bytes);
  bam_model_free(&m);
}

/* ---- initialisation ---- */
static double stddev(const float *x, size_t n) {
  double s = 0, s2 = 0;
  for (size_t i = 0; i < n; i++) s += x[i], s2 += (double)x[i] * x[i];
  double mu = s / (double)n;
  return sqrt(s2 / (double)n - mu * mu);
}

static void test_init(void) {
  bam_model_shape s = {.n_layers = 3,
                       .d_model = 64,
                       .n_heads = 4,
                       .n_kv_heads = 4,
                       .d_ff = 128,
                       .vocab_size = 100,
                       .seq_len = 8,
                       .tie_embeddings = 0,
                       .rope_base = 10000.0f,
                       .norm_eps = 1e-5f};
  bam_model *a = NULL, *b = NULL, *c = NULL;
  T_OK(bam_model_create(&a, &s, 1));
  T_OK(bam_model_create(&b, &s, 1));
  bam_model_shape s2 = s;
  s2.n_layers = 2;
  s2.tie_embeddings = 1;
  T_OK(bam_model_create(&c, &s2, 1));
  if (!a || !b || !c) return;
  const float std = 0.02f;
  bam_model_init(a, 7, std);
  bam_model_init(b, 7, std);
  bam_model_init(c, 7, std);
  T_CHECK(!memcmp(a->params_mem, b->params_mem, a->n_params * 4), "same seed, same init");
  bam_model_init(b, 8, std);
  T_CHECK(memcmp(a->params_mem, b->params_mem, a->n_params * 4) != 0, "other seed, other init");
  int ones = 1;
  for (int i = 0; i < s.n_layers * s.d_model; i++) ones &= a->params.ln[i] == 1.0f;
  for (int i = 0; i < s.d_model; i++) ones &= a->params.ln_f[i] == 1.0f;
  T_CHECK(ones, "norm scales start at 1");
  const size_t dd = (size_t)s.d_model * s.d_model;
  double sq = stddev(a->params.wq, 3 * dd), so = stddev(a->params.wo, 3 * dd);
  T_CLOSE(sq, std, 0, 0.03, "wq std");
  T_CLOSE(so, std / sqrt(6.0), 0, 0.03, "wo std scaled by 1/sqrt(2L)");
  T_CLOSE(stddev(a->params.w_head, 100 * 64), std, 0, 0.05, "w_head std");
  /* One RNG stream per (tensor, layer): layer 0 of wq is the same with 2 or 3 layers, tied or
   * not, so init does not depend on the layout around it. */
  T_CHECK(!memcmp(a->params.wq, c->params.wq, dd * 4), "wq layer 0 independent of layout");
  T_CHECK(!memcmp(a->params.w_gate, c->params.w_gate, 128 * 64 * 4),
          "w_gate layer 0 independent of layout");
  T_CHECK(memcmp(a->params.wq, a->params.wk, dd * 4) != 0, "tensors have distinct streams");
  T_CHECK(memcmp(a->params.wq, a->params.wq + dd, dd * 4) != 0, "layers have distinct streams");
  bam_model_free(&a);
  bam_model_free(&b);
  bam_model_free(&c);
}

/* ---- whole-model gradient against central finite differences ----
 *
 * The loss is evaluated in float, so a central difference (L(x+e) - L(x-e)) / 2e has two
 * errors: roundoff, the noise of the float loss (~4e-7 here: about 2 ulp of a loss of ~4,
 * from the float accumulations in the forward) divided by 2e; and truncation,
 * |f'''| e^2 / 6, with |f'''| ~ 25 along one coordinate at this init (measured: the error
 * grows 9x from e = 1e-2 to 3e-2). The sum is smallest at e = (3 * 4e-7 / 25)^(1/3) ~ 4e-3.
 * Measured max |analytic - fd| over the 4 configurations: 2.5e-4 at e = 1e-3 (roundoff),
 * 9e-5 at e = 3e-3, 4e-4 at e = 1e-2, 4e-3 at e = 3e-2 (truncation). Hence e = 3e-3 and
 * the tolerance |analytic - fd| <= 3e-4 + 1e-2 |fd|: >= 5x the worst error seen, while the
 * gradients checked are O(1e-3 .. 1e-1), so a wrong factor, sign or missing path (the
 * head's share of a tied wte, one branch of the parallel block, a RoPE gradient left in
 * the rotated frame, a GQA head group summed wrongly) fails. The init is larger than
 * training's (std 0.3) so every path is non-linear and carries a sizeable gradient. */
#ifndef FD_EPS
#define FD_EPS 3e-3f
#endif
#define FD_ATOL 3e-4
#define FD_RTOL 1e-2

static void grad_check(int n_kv_heads, int tied) {
  bam_model_shape s = tiny_shape(n_kv_heads, tied);
  const int B = 2, T = 6, n = B * T;
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &s, B));
  if (!m) return;
  bam_model_init(m, 11, 0.3f);
  int32_t tokens[12], targets[12];
  random_ids(tokens, n, s.vocab_size, 100 + tied);
  random_ids(targets, n, s.vocab_size, 200 + tied);
  targets[3] = -1; /* some ignored positions: the gradient must be that of the masked mean */
  targets[10] = -1;
  float loss;
  bam_model_zero_grad(m);
  T_OK(bam_model_forward(m, tokens, targets, B, T, &loss));
  T_OK(bam_model_backward(m, 1.0f));
  float *grad = malloc(m->n_params * sizeof(float));
  memcpy(grad, m->grads_mem, m->n_params * sizeof(float));

  bam_rng r;
  bam_rng_seed(&r, 5, (uint64_t)(n_kv_heads * 2 + tied));
  int n_bad = 0, n_checked = 0;
  double worst = 0, worst_abs = 0;
  for (int ti = 0; ti < m->n_tensors; ti++) {
    const bam_tensor_info *t = &m->tensors[ti];
    double max_abs = 0;
    for (int rep = 0; rep < 10; rep++) {
      size_t j = bam_rng_below(&r, t->numel);
      if (!strcmp(t->name, "wte")) /* rows of tokens in the batch: the only non-zero ones */
        j = (size_t)tokens[bam_rng_below(&r, (uint64_t)n)] * (size_t)s.d_model +
            bam_rng_below(&r, (uint64_t)s.d_model);
      float *p = m->params_mem + t->offset + j;
      const float saved = *p;
      float lp, lm;
      *p = saved + FD_EPS;
      T_OK(bam_model_forward(m, tokens, targets, B, T, &lp));
      *p = saved - FD_EPS;
      T_OK(bam_model_forward(m, tokens, targets, B, T, &lm));
      *p = saved;
      /* the actual step, (saved + eps) - (saved - eps) in float, not 2*eps */
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
        fprintf(stderr, "  Hkv=%d tied=%d %s[%zu]: analytic %.6g finite-diff %.6g\n", n_kv_heads,
                tied, t->name, j, an, fd);
      }
    }
    /* The check must be able to fail: each tensor's sampled gradients must be well above the
     * absolute tolerance somewhere. */
    T_CHECK(max_abs > 4 * FD_ATOL, "Hkv=%d tied=%d: %s gradients too small (%.3g) to test",
            n_kv_heads, tied, t->name, max_abs);
  }
  T_CHECK(n_bad == 0, "Hkv=%d tied=%d: %d of %d gradient entries off", n_kv_heads, tied, n_bad,
          n_checked);
  printf(
      "grad check Hkv=%d tied=%d: %d entries, max |analytic - fd| %.2g = %.2f of tolerance, "
      "loss %.4f\n",
      n_kv_heads, tied, n_checked, worst_abs, worst, (double)loss);
  free(grad);
  bam_model_free(&m);
}

/* ---- ignored targets ---- */
static void test_ignored_targets(void) {
  bam_model_shape s = tiny_shape(2, 0);
  const int B = 2, T = 6, n = B * T;
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &s, B));
  if (!m) return;
  bam_model_init(m, 3, 0.3f);
  int32_t tok[12], tgt[12], tgt_ign[12];
  random_ids(tok, n, s.vocab_size, 1);
  random_ids(tgt, n, s.vocab_size, 2);
  memcpy(tgt_ign, tgt, sizeof tgt);
  tgt_ign[0] = -1;
  tgt_ign[7] = -5; /* any negative target is ignored */
  float loss_all, loss_ign;
  T_OK(bam_model_forward(m, tok, tgt, B, T, &loss_all));
  float tl[12];
  memcpy(tl, bam_model_token_losses(m), sizeof tl);
  T_OK(bam_model_forward(m, tok, tgt_ign, B, T, &loss_ign));
  const float *tl_ign = bam_model_token_losses(m);
  double sum = 0;
  for (int i = 0; i < n; i++)
    if (tgt_ign[i] >= 0) sum += tl[i];
  T_CLOSE(loss_ign, sum / 10.0, 0, 1e-6, "masked loss = mean of the other tokens' losses");
  T_CHECK(tl_ign[0] == 0.0f && tl_ign[7] == 0.0f, "ignored token losses are 0 (%g, %g)",
          (double)tl_ign[0], (double)tl_ign[7]);
  T_CHECK(fabsf(loss_ign - loss_all) > 1e-4f, "ignoring changes the loss");
  T_OK(bam_model_backward(m, 1.0f));
  const float *dlog = bam_model_logits(m);
  int zero = 1;
  for (int j = 0; j < s.vocab_size; j++)
    zero &= dlog[0 * s.vocab_size + j] == 0.0f && dlog[7 * s.vocab_size + j] == 0.0f;
  T_CHECK(zero, "ignored rows have zero logit gradient");
  /* A valid row's gradient is (softmax - onehot) / n_valid: it sums to 0 and is negative
   * only at the target. */
  double rs = 0;
  for (int j = 0; j < s.vocab_size; j++) rs += dlog[1 * s.vocab_size + j];
  T_CLOSE(rs, 0.0, 1e-7, 0, "valid dlogits row sums to 0");
  T_CHECK(dlog[1 * s.vocab_size + tgt[1]] < 0, "target logit gradient negative");

  /* Causality makes ignoring the last position of every sequence the same as truncating the
   * sequences: same loss and same parameter gradients (up to summation order). */
  int32_t tgt_last[12], tok5[10], tgt5[10];
  memcpy(tgt_last, tgt, sizeof tgt);
  tgt_last[5] = tgt_last[11] = -1;
  for (int b = 0; b < B; b++)
    for (int t = 0; t < 5; t++) tok5[b * 5 + t] = tok[b * T + t], tgt5[b * 5 + t] = tgt[b * T + t];
  float l6, l5;
  bam_model_zero_grad(m);
  T_OK(bam_model_forward(m, tok, tgt_last, B, T, &l6));
  T_OK(bam_model_backward(m, 1.0f));
  float *g6 = malloc(m->n_params * 4);
  memcpy(g6, m->grads_mem, m->n_params * 4);
  bam_model_zero_grad(m);
  T_OK(bam_model_forward(m, tok5, tgt5, B, 5, &l5));
  T_OK(bam_model_backward(m, 1.0f));
  T_CLOSE(l6, l5, 0, 1e-6, "last position ignored == sequence truncated (loss)");
  double dn = 0, nn = 0;
  for (size_t i = 0; i < m->n_params; i++) {
    double e = (double)g6[i] - m->grads_mem[i];
    dn += e * e;
    nn += (double)g6[i] * g6[i];
  }
  T_CHECK(nn > 0 && sqrt(dn / nn) < 1e-5, "ignored-last vs truncated gradients: rel diff %.3g",
          sqrt(dn / nn));
  free(g6);

  /* Every target ignored: loss 0 by definition, and no gradient. */
  int32_t none[12];
  for (int i = 0; i < n; i++) none[i] = -1;
  float l0 = 1;
  bam_model_zero_grad(m);
  T_OK(bam_model_forward(m, tok, none, B, T, &l0));
  T_OK(bam_model_backward(m, 1.0f));
  double gn = 0;
  for (size_t i = 0; i < m->n_params; i++) gn += fabs(m->grads_mem[i]);
  T_CHECK(l0 == 0.0f && gn == 0.0, "all ignored: loss %g, |grad| %g", (double)l0, gn);
  bam_model_free(&m);
}

/* ---- forward without targets gives the same logits ---- */
static void test_forward_no_targets(void) {
  bam_model_shape s = tiny_shape(4, 1);
  const int B = 2, T = 7, n = B * T;
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &s, B));
  if (!m) return;
  bam_model_init(m, 4, 0.1f);
  int32_t tok[14], tgt[14];
  random_ids(tok, n, s.vocab_size, 3);
  random_ids(tgt, n, s.vocab_size, 4);
  float loss;
  T_OK(bam_model_forward(m, tok, tgt, B, T, &loss));
  size_t nl = (size_t)n * s.vocab_size;
  float *a = malloc(nl * 4);
  memcpy(a, bam_model_logits(m), nl * 4);
  T_OK(bam_model_forward(m, tok, NULL, B, T, NULL));
  T_CHECK(!memcmp(a, bam_model_logits(m), nl * 4), "logits identical with and without targets");
  /* Backward after a forward without targets is misuse and must say so. */
  bam_status st = bam_model_backward(m, 1.0f);
  T_CHECK(st == BAM_ERR_ARG && strstr(bam_error_message(), "no targets"),
          "backward without targets rejected: %s", bam_error_message());
  bam_error_clear();
  /* The first sequence's logits do not depend on the batch it is in (B = 1 vs 2). */
  T_OK(bam_model_forward(m, tok, NULL, 1, T, NULL));
  float maxd = 0;
  for (size_t i = 0; i < (size_t)T * s.vocab_size; i++)
    maxd = fmaxf(maxd, fabsf(a[i] - bam_model_logits(m)[i]));
  T_CHECK(maxd < 1e-5f, "batch-size independence: max diff %g", (double)maxd);
  free(a);
  bam_model_free(&m);
}

/* ---- gradient accumulation: two halves at scale 1/2 == the whole batch ---- */
static void test_grad_accumulation(void) {
  bam_model_shape s = tiny_shape(2, 1);
  const int B = 4, T = 8, n = B * T;
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &s, B));
  if (!m) return;
  bam_model_init(m, 9, 0.2f);
  int32_t tok[32], tgt[32];
  random_ids(tok, n, s.vocab_size, 5);
  random_ids(tgt, n, s.vocab_size, 6);
  tgt[2] = -1; /* one ignored target in each half keeps the valid counts equal */
  tgt[20] = -1;
  float l_all, l_a, l_b;
  bam_model_zero_grad(m);
  T_OK(bam_model_forward(m, tok, tgt, B, T, &l_all));
  T_OK(bam_model_backward(m, 1.0f));
  float *g = malloc(m->n_params * 4);
  memcpy(g, m->grads_mem, m->n_params * 4);
  bam_model_zero_grad(m);
  T_OK(bam_model_forward(m, tok, tgt, 2, T, &l_a));
  T_OK(bam_model_backward(m, 0.5f));
  T_OK(bam_model_forward(m, tok + 2 * T, tgt + 2 * T, 2, T, &l_b));
  T_OK(bam_model_backward(m, 0.5f));
  T_CLOSE(0.5 * ((double)l_a + l_b), l_all, 0, 1e-6, "mean of micro-batch losses");
  double dn = 0, nn = 0;
  for (size_t i = 0; i < m->n_params; i++) {
    double e = (double)g[i] - m->grads_mem[i];
    dn += e * e;
    nn += (double)g[i] * g[i];
  }
  T_CHECK(nn > 0 && sqrt(dn / nn) < 1e-6, "accumulated vs whole-batch gradient: rel diff %.3g",
          sqrt(dn / nn));
  free(g);
  bam_model_free(&m);
}

/* ---- argument and shape checks ---- */
static void expect_bad_shape(bam_model_shape s, const char *needle) {
  bam_status st = bam_model_shape_check(&s);
  T_CHECK(st == BAM_ERR_CONFIG && strstr(bam_error_message(), needle),
          "shape check should reject with a message naming '%s'; got %d: %s", needle, (int)st,
          bam_error_message());
  bam_error_clear();
  bam_model *m = NULL;
  st = bam_model_create(&m, &s, 1);
  T_CHECK(st != BAM_OK && m == NULL, "create must refuse a bad shape (%s)", needle);
  bam_error_clear();
}

static void test_shape_check(void) {
  bam_model_shape ok = tiny_shape(2, 0);
  T_OK(bam_model_shape_check(&ok));
  bam_model_shape s;
  s = ok, s.d_model = 18, expect_bad_shape(s, "divisible by n_heads");
  s = ok, s.n_kv_heads = 3, expect_bad_shape(s, "multiple of n_kv_heads");
  s = ok, s.d_model = 12, expect_bad_shape(s, "odd"); /* head_dim 3 */
  s = ok, s.n_layers = 0, expect_bad_shape(s, "n_layers");
  s = ok, s.d_model = -16, expect_bad_shape(s, "d_model");
  s = ok, s.n_heads = 0, expect_bad_shape(s, "n_heads");
  s = ok, s.n_kv_heads = 0, expect_bad_shape(s, "n_kv_heads");
  s = ok, s.d_ff = 0, expect_bad_shape(s, "d_ff");
  s = ok, s.vocab_size = 1, expect_bad_shape(s, "vocab_size");
  s = ok, s.seq_len = 0, expect_bad_shape(s, "seq_len");
  s = ok, s.rope_base = 0.0f, expect_bad_shape(s, "rope_base");
  s = ok, s.norm_eps = 0.0f, expect_bad_shape(s, "norm_eps");
  s = ok, s.norm_eps = NAN, expect_bad_shape(s, "norm_eps");
  s = ok, s.tie_embeddings = 2, expect_bad_shape(s, "tie_embeddings");

  bam_model *m = NULL;
  T_CHECK(bam_model_create(&m, &ok, 0) == BAM_ERR_ARG && !m, "max_batch 0 rejected");
  bam_error_clear();
  T_OK(bam_model_create(&m, &ok, 2));
  if (!m) return;
  bam_model_init(m, 1, 0.02f);
  int32_t tok[27] = {0}, tgt[27] = {0};
  T_CHECK(bam_model_forward(m, tok, tgt, 3, 4, NULL) == BAM_ERR_ARG, "B > max_batch rejected");
  bam_error_clear();
  T_CHECK(bam_model_forward(m, tok, tgt, 1, 9, NULL) == BAM_ERR_ARG, "T > seq_len rejected");
  bam_error_clear();
  tok[5] = 37;
  bam_status st = bam_model_forward(m, tok, tgt, 2, 4, NULL);
  T_CHECK(st == BAM_ERR_DATA && strstr(bam_error_message(), "token 37 at (1, 1)"),
          "token out of vocabulary rejected with its position: %s", bam_error_message());
  bam_error_clear();
  tok[5] = 0;
  tgt[2] = 40;
  T_CHECK(bam_model_forward(m, tok, tgt, 2, 4, NULL) == BAM_ERR_DATA, "target >= V rejected");
  bam_error_clear();
  tgt[2] = 1;
  T_OK(bam_model_forward(m, tok, tgt, 2, 4, NULL));
  T_OK(bam_model_backward(m, 1.0f));
  T_CHECK(bam_model_backward(m, 1.0f) == BAM_ERR_ARG, "second backward of one forward rejected");
  bam_error_clear();
  bam_model_free(&m);
  bam_model_free(&m); /* freeing NULL is fine */
}

/* ---- FLOPs ---- */
static void test_flops(void) {
  bam_model_shape s = {.n_layers = 6,
                       .d_model = 1024,
                       .n_heads = 8,
                       .n_kv_heads = 8,
                       .d_ff = 2048,
                       .vocab_size = 32000,
                       .seq_len = 1024,
                       .tie_embeddings = 0,
                       .rope_base = 10000.0f,
                       .norm_eps = 1e-5f};
  /* method.md section 5 per layer: QKV 6 d^2 + attention 2 n_ctx d + out 2 d^2 + FFN 3 d f2
   * (f2 = 2f, dense k = 1), plus the head 2 d V. */
  const double d = 1024, T = 1024, f2 = 4096, V = 32000;
  double expect = 6 * (6 * d * d + 2 * T * d + 2 * d * d + 3 * d * f2) + 2 * d * V;
  T_CLOSE(bam_model_flops_per_token(&s, 1024), expect, 0, 1e-12, "flops/token, paper formula");
  s.n_kv_heads = 2; /* GQA: Wk, Wv shrink to kvd = 256 */
  expect -= 6 * 2 * 2 * d * (d - 256);
  T_CLOSE(bam_model_flops_per_token(&s, 1024), expect, 0, 1e-12, "flops/token with GQA");

  bam_model_shape q = {.n_layers = 4,
                       .d_model = 256,
                       .n_heads = 4,
                       .n_kv_heads = 4,
                       .d_ff = 1024,
                       .vocab_size = 8192,
                       .seq_len = 256,
                       .tie_embeddings = 0,
                       .rope_base = 10000.0f,
                       .norm_eps = 1e-5f};
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &q, 8));
  if (m) {
    char b[32];
    bam_format_bytes(b, sizeof b, (double)m->act_bytes);
    printf("L=4 d=256 H=4 f=1024 V=8192 T=256 B=8: %zu params, activations %s\n", m->n_params, b);
  }
  bam_model_free(&m);
}

/* concurrent_branches: attention and FFN on two threads at once equal the sequential block to
 * float rounding (a branch's products then run on one thread) and repeat bitwise, at a size
 * where the sequential products are threaded. */
static void test_concurrent_branches(void) {
  bam_model_shape s = tiny_shape(2, 0);
  s.d_model = 64, s.d_ff = 128, s.seq_len = 32, s.n_heads = 4;
  const int B = 8, T = 32, n = B * T;
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &s, B));
  if (!m) return;
  bam_model_init(m, 5, 0.1f);
  int32_t *tok = malloc(sizeof(int32_t) * n), *tgt = malloc(sizeof(int32_t) * n);
  random_ids(tok, n, s.vocab_size, 8);
  random_ids(tgt, n, s.vocab_size, 9);
  const size_t np = m->n_params;
  float loss[3], *g = malloc(np * 4 * 3);
  for (int run = 0; run < 3; run++) { /* sequential, concurrent, concurrent again */
    m->concurrent_branches = run > 0;
    bam_model_zero_grad(m);
    T_OK(bam_model_forward(m, tok, tgt, B, T, &loss[run]));
    T_OK(bam_model_backward(m, 1.0f));
    memcpy(g + run * np, m->grads_mem, np * 4);
  }
  T_CHECK(loss[1] == loss[2] && !memcmp(g + np, g + 2 * np, np * 4),
          "dense: concurrent branches twice differ");
  T_CLOSE(loss[1], loss[0], 0, 1e-6, "dense: concurrent loss");
  for (int i = 0; i < m->n_tensors; i++) {
    const bam_tensor_info *t = &m->tensors[i];
    const double dg = t_max_rel(g + np + t->offset, g + t->offset, t->numel);
    T_CHECK(dg < 1e-4, "dense: concurrent gradient of %s differs by %.2e (%d threads)", t->name,
            dg, omp_get_max_threads());
  }
  free(tok), free(tgt), free(g);
  bam_model_free(&m);
}

int main(void) {
  test_layout();
  test_init();
  grad_check(2, 0);
  grad_check(2, 1);
  grad_check(4, 0);
  grad_check(4, 1);
  test_ignored_targets();
  test_forward_no_targets();
  test_grad_accumulation();
  test_concurrent_branches();
  test_shape_check();
  test_flops();
  BAM_TEST_END();
}
