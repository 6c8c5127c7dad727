/* Tests of KV-cache decoding (decode.h) against the training forward, for the dense model
 * and every mixture: the logits after a prefill of every prompt length, after incremental
 * steps, and after chunked prefills equal the full forward's logits at the same position
 * (within 1e-4 of the logit scale); greedy generation with the cache gives the tokens a full
 * recompute gives; a full cache, bad tokens and bad arguments are refused; the cache size per
 * token is what each method stores. Sequences are longer than the 64-row attention block so
 * a prefill spans several blocks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bam/decode.h"
#include "bam/mixture.h"
#include "bam/model.h"
#include "test_util.h"

#define SEQ 72
#define TOL 1e-4

typedef struct {
  const char *name;
  int mixture; /* 0: dense */
  bam_method method;
  int hkv, tied, Ef, k, renorm, att_top_k;
} tcase;

static bam_model_shape base_shape(const tcase *c) {
  return (bam_model_shape){.n_layers = 2,
                           .d_model = 32,
                           .n_heads = 4,
                           .n_kv_heads = c->hkv,
                           .d_ff = 24,
                           .vocab_size = 37,
                           .seq_len = SEQ,
                           .tie_embeddings = c->tied,
                           .rope_base = 10000.0f,
                           .norm_eps = 1e-5f};
}

/* One network of either kind with its forward, so the checks below are written once. */
typedef struct {
  bam_model *dense;
  bam_mixture *mix;
  int V;
} net;

static int net_make(net *n, const tcase *c) {
  memset(n, 0, sizeof *n);
  bam_model_shape s = base_shape(c);
  n->V = s.vocab_size;
  if (!c->mixture) {
    if (bam_model_create(&n->dense, &s, 1) != BAM_OK) return 0;
    bam_model_init(n->dense, 11, 0.2f);
    return 1;
  }
  bam_mixture_shape ms = {.base = s,
                          .method = c->method,
                          .n_att_experts = 3,
                          .n_ffn_experts = c->Ef,
                          .ffn_top_k = c->k,
                          .ffn_renormalize = c->renorm,
                          .att_top_k = c->att_top_k,
                          .lb_coef = 0.01f,
                          .z_coef = 0.001f,
                          .lb_per_sequence = 1,
                          .capacity_factor = 0.0f};
  if (bam_mixture_create(&n->mix, &ms, 1) != BAM_OK) return 0;
  bam_mixture_init(n->mix, 11, 0.2f);
  /* Routers from N(0, 0.02^2) give near-uniform gates; make them decisive so the test sees
   * routing that depends on the token (and top-k choices far from ties). */
  const char *routers[] = {"ffn_router", "att_router"};
  for (int r = 0; r < 2; r++) {
    const bam_tensor_info *t = NULL;
    float *p = bam_mixture_tensor(n->mix, routers[r], &t);
    for (size_t i = 0; p && i < t->numel; i++) p[i] *= 60.0f;
  }
  return 1;
}

static void net_free(net *n) {
  bam_model_free(&n->dense);
  bam_mixture_free(&n->mix);
}

static bam_status net_forward(net *n, const int32_t *x, int T, const float **logits) {
  if (n->dense) {
    BAM_CHECK(bam_model_forward(n->dense, x, NULL, 1, T, NULL));
    *logits = bam_model_logits(n->dense);
  } else {
    BAM_CHECK(bam_mixture_forward(n->mix, x, NULL, 1, T, NULL));
    *logits = bam_mixture_logits(n->mix);
  }
  return BAM_OK;
}

static void random_ids(int32_t *x, int n, int V, uint64_t seed) {
  bam_rng r;
  bam_rng_seed(&r, seed, 0);
  for (int i = 0; i < n; i++) x[i] = (int32_t)bam_rng_below(&r, (uint64_t)V);
}

/* max |a - b| over V logits, relative to the largest |b| of the reference (the scale). */
static double rel_err(const float *a, const float *b, int V) {
  double e = 0, s = 0;
  for (int i = 0; i < V; i++) {
    e = fmax(e, fabs((double)a[i] - b[i]));
    s = fmax(s, fabs((double)b[i]));
  }
  return e / (s > 0 ? s : 1);
}

static int argmax(const float *x, int V) {
  int b = 0;
  for (int i = 1; i < V; i++)
    if (x[i] > x[b]) b = i;
  return b;
}

static void test_case(const tcase *c) {
  net n;
  if (!net_make(&n, c)) {
    T_CHECK(0, "%s: could not build the network: %s", c->name, bam_error_message());
    return;
  }
  const int V = n.V, T = SEQ;
  int32_t x[SEQ];
  random_ids(x, T, V, 3);
  float *ref = malloc(sizeof(float) * (size_t)T * V), *lg = malloc(sizeof(float) * V);
  const float *fl = NULL;
  T_OK(net_forward(&n, x, T, &fl));
  if (!fl) goto done;
  memcpy(ref, fl, sizeof(float) * (size_t)T * V);
  /* The comparison discriminates: neighbouring positions differ by far more than TOL. */
  T_CHECK(rel_err(ref + V, ref, V) > 100 * TOL, "%s: positions 0 and 1 have the same logits",
          c->name);

  bam_decoder *D = NULL;
  T_OK(bam_decoder_create(&D, n.dense, n.mix, T));
  if (!D) goto done;
  T_CHECK(!strcmp(bam_decoder_kind(D), c->mixture ? bam_method_name(c->method) : "dense"),
          "%s: kind %s", c->name, bam_decoder_kind(D));

  /* Prefill of every prompt length: the logits of its last position. */
  double worst = 0;
  for (int p = 1; p <= T; p++) {
    bam_decoder_reset(D);
    T_OK(bam_decoder_prefill(D, x, p, lg));
    worst = fmax(worst, rel_err(lg, ref + (size_t)(p - 1) * V, V));
  }
  T_CHECK(worst <= TOL, "%s: prefill logits differ from the full forward by %.3g", c->name, worst);
  printf("  %-34s prefill   worst %.2e\n", c->name, worst);

  /* Prefill of 5 tokens, then one step per token up to the full context. Other tokens fill
   * the cache first, so a cache row the steps forget to write holds wrong values. */
  int32_t other[SEQ];
  random_ids(other, T, V, 4);
  bam_decoder_reset(D);
  T_OK(bam_decoder_prefill(D, other, T, NULL));
  worst = 0;
  bam_decoder_reset(D);
  T_OK(bam_decoder_prefill(D, x, 5, lg));
  worst = fmax(worst, rel_err(lg, ref + 4 * (size_t)V, V));
  for (int t = 5; t < T; t++) {
    T_OK(bam_decoder_step(D, x[t], lg));
    worst = fmax(worst, rel_err(lg, ref + (size_t)t * V, V));
  }
  T_CHECK(bam_decoder_len(D) == T, "%s: len %d after %d tokens", c->name, bam_decoder_len(D), T);
  T_CHECK(worst <= TOL, "%s: step logits differ from the full forward by %.3g", c->name, worst);
  printf("  %-34s steps     worst %.2e\n", c->name, worst);

  /* Chunks: 1 token without logits, 40 (crossing nothing), 3 steps, then 28 tokens (rows
   * 44..71, a block whose keys start at position 44). */
  worst = 0;
  bam_decoder_reset(D);
  T_OK(bam_decoder_prefill(D, other, T, NULL));
  bam_decoder_reset(D);
  T_OK(bam_decoder_prefill(D, x, 1, NULL));
  T_OK(bam_decoder_prefill(D, x + 1, 40, lg));
  worst = fmax(worst, rel_err(lg, ref + 40 * (size_t)V, V));
  for (int t = 41; t < 44; t++) {
    T_OK(bam_decoder_step(D, x[t], lg));
    worst = fmax(worst, rel_err(lg, ref + (size_t)t * V, V));
  }
  T_OK(bam_decoder_prefill(D, x + 44, T - 44, lg));
  worst = fmax(worst, rel_err(lg, ref + (size_t)(T - 1) * V, V));
  T_CHECK(worst <= TOL, "%s: chunked prefill differs from the full forward by %.3g", c->name,
          worst);

  /* A full cache refuses more, and is left as it was. */
  T_CHECK(bam_decoder_step(D, x[0], lg) == BAM_ERR_ARG, "%s: step into a full cache", c->name);
  bam_error_clear();
  T_CHECK(bam_decoder_len(D) == T, "%s: a refused step changed the length", c->name);

  /* Greedy generation: 6 prompt tokens, then up to the context with and without the cache. */
  int32_t with[SEQ], without[SEQ];
  memcpy(with, x, 6 * sizeof(int32_t));
  memcpy(without, x, 6 * sizeof(int32_t));
  bam_decoder_reset(D);
  T_OK(bam_decoder_prefill(D, with, 6, lg));
  for (int t = 6; t < T; t++) {
    with[t] = argmax(lg, V);
    if (t + 1 < T) T_OK(bam_decoder_step(D, with[t], lg));
  }
  for (int t = 6; t < T; t++) {
    const float *l = NULL;
    T_OK(net_forward(&n, without, t, &l));
    if (!l) break;
    without[t] = argmax(l + (size_t)(t - 1) * V, V);
  }
  int same = 0;
  while (same < T && with[same] == without[same]) same++;
  T_CHECK(same == T, "%s: greedy tokens differ from position %d (%d vs %d)", c->name, same,
          same < T ? with[same] : -1, same < T ? without[same] : -1);
  int distinct = 0; /* generation is not degenerate: a constant stream would prove little */
  for (int t = 7; t < T; t++) distinct += with[t] != with[t - 1];
  printf("  %-34s greedy    %d of %d tokens equal, %d changes\n", c->name, same, T, distinct);
  if (!c->tied) /* a random tied model tends to repeat its input token */
    T_CHECK(distinct > 3, "%s: greedy stream is nearly constant", c->name);

  /* Cache size per token: 2 L S kvd floats, S the K/V sets of a layer. */
  const bam_model_shape s = base_shape(c);
  const size_t S = c->mixture && c->method == BAM_METHOD_BAM ? 3 : 1;
  T_CHECK(bam_decoder_kv_bytes_per_token(D) == 2 * 2 * S * (size_t)bam_kv_dim(&s) * sizeof(float),
          "%s: %zu KV bytes per token", c->name, bam_decoder_kv_bytes_per_token(D));
  bam_decoder_free(&D);
  T_CHECK(D == NULL, "free nulls the pointer");
done:
  free(ref);
  free(lg);
  net_free(&n);
}

static void test_errors(void) {
  tcase c = {"dense", 0, BAM_METHOD_BTX, 4, 0, 1, 1, 0, 0};
  net n;
  if (!net_make(&n, &c)) return;
  bam_decoder *D = NULL;
  T_CHECK(bam_decoder_create(&D, n.dense, NULL, SEQ + 1) == BAM_ERR_ARG && !D,
          "max_len beyond seq_len refused");
  bam_error_clear();
  T_CHECK(bam_decoder_create(&D, NULL, NULL, 8) == BAM_ERR_ARG, "no network refused");
  bam_error_clear();
  T_OK(bam_decoder_create(&D, n.dense, NULL, 8));
  if (D) {
    int32_t x[16];
    random_ids(x, 16, n.V, 9);
    float lg[37];
    bam_status st = bam_decoder_prefill(D, x, 9, lg);
    T_CHECK(st == BAM_ERR_ARG && strstr(bam_error_message(), "do not fit the KV cache"),
            "a prompt longer than the cache: %s", bam_error_message());
    bam_error_clear();
    T_CHECK(bam_decoder_len(D) == 0, "a refused prefill changed the length");
    T_OK(bam_decoder_prefill(D, x, 6, lg));
    T_CHECK(bam_decoder_prefill(D, x, 3, lg) == BAM_ERR_ARG, "6 + 3 tokens in a cache of 8");
    bam_error_clear();
    T_CHECK(bam_decoder_step(D, 37, lg) == BAM_ERR_DATA, "token outside the vocabulary");
    bam_error_clear();
    T_CHECK(bam_decoder_step(D, -1, lg) == BAM_ERR_DATA, "negative token");
    bam_error_clear();
    x[1] = 40;
    bam_decoder_reset(D);
    T_CHECK(bam_decoder_prefill(D, x, 2, lg) == BAM_ERR_DATA, "bad token in a prompt");
    bam_error_clear();
    T_CHECK(bam_decoder_len(D) == 0, "reset empties; a refused prefill adds nothing");
    T_CHECK(bam_decoder_prefill(D, x, 0, lg) == BAM_ERR_ARG, "empty prompt");
    bam_error_clear();
  }
  bam_decoder_free(&D);
  bam_decoder_free(&D); /* twice is fine */
  net_free(&n);
}

int main(void) {
  const tcase cases[] = {
      {"dense", 0, BAM_METHOD_BTX, 4, 0, 1, 1, 0, 0},
      {"dense GQA tied", 0, BAM_METHOD_BTX, 2, 1, 1, 1, 0, 0},
      {"btx top-1", 1, BAM_METHOD_BTX, 4, 0, 4, 1, 0, 0},
      {"btx top-2 renormalised GQA", 1, BAM_METHOD_BTX, 2, 0, 4, 2, 1, 0},
      {"bam soft", 1, BAM_METHOD_BAM, 4, 0, 4, 1, 0, 0},
      {"bam GQA tied top-2", 1, BAM_METHOD_BAM, 2, 1, 4, 2, 0, 0},
      {"bam att_top_k 1", 1, BAM_METHOD_BAM, 4, 0, 4, 1, 0, 1},
      {"bam-shared-kv soft", 1, BAM_METHOD_BAM_SHARED_KV, 4, 0, 4, 1, 0, 0},
      {"bam-shared-kv GQA att_top_k 2 ren", 1, BAM_METHOD_BAM_SHARED_KV, 2, 0, 4, 2, 1, 2},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) test_case(&cases[i]);
  test_errors();
  BAM_TEST_END();
}
