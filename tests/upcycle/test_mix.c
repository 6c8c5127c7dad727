/* Mixing (method.md section 4): the initialisation table checked tensor by tensor, bitwise,
 * for every method; routers deterministic in router_seed with std 0.02; the stored config and
 * lineage; the functional identity (a mixture of E identical dense models computes the dense
 * model's logits); and every kind of bad input refused with a message naming the file.
 *
 * The dense checkpoints are made here: a seed with random parameters and domain "experts" =
 * the seed plus a perturbation, with the lineage bam branch writes. */
#include <mpi.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bam/mixture.h"
#include "bam/shard.h"
#include "bam/upcycle.h"
#include "test_util.h"

static char root[] = "/tmp/bam-test-mix-XXXXXX";
static const char *const DOMAINS[] = {"code", "math", "legal"};
#define TOKENIZER "tok-test-0001"

/* ---- dense models ------------------------------------------------------------------------ */

typedef struct {
  bam_model_shape s;
  bam_tensor_info t[BAM_MAX_TENSORS];
  int nt;
  size_t n;
  float *p;
} dense;

static bam_model_shape tiny(int tied) {
  return (bam_model_shape){.n_layers = 2, .d_model = 32, .n_heads = 4, .n_kv_heads = 2,
                           .d_ff = 48, .vocab_size = 64, .seq_len = 16, .tie_embeddings = tied,
                           .rope_base = 10000, .norm_eps = 1e-5f};
}

static void dense_init(dense *m, bam_model_shape s) {
  memset(m, 0, sizeof *m);
  m->s = s;
  m->nt = bam_model_tensors(&s, m->t, &m->n);
  m->p = calloc(m->n, sizeof(float));
}

/* Norm scales near 1, matrices small: a plausible model whose forward stays well scaled.
 * `scale` and `stream` make perturbations: p += scale * N(0, 1) from that stream. */
static void dense_randomise(dense *m, uint64_t stream, float scale, int add) {
  bam_rng r;
  bam_rng_seed(&r, 1234, stream);
  for (int i = 0; i < m->nt; i++) {
    const bam_tensor_info *t = &m->t[i];
    float base = t->decay ? 0.0f : 1.0f, sd = t->decay ? 0.1f : 0.05f;
    for (size_t k = 0; k < t->numel; k++) {
      float x = scale * sd * bam_rng_normal(&r);
      m->p[t->offset + k] = add ? m->p[t->offset + k] + x : base + x;
    }
  }
}

static const bam_tensor_info *find(const bam_tensor_info *t, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (!strcmp(t[i].name, name)) return &t[i];
  return NULL;
}

static void path_of(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", root, name); }

/* Save as bam pretrain and bam branch do: sharded, with the config text of its shape. */
static bam_status save_dense(const char *dir, const dense *m, const char *kind, const char *tok,
                             const char *lineage, int with_moments) {
  bam_config c;
  bam_config_defaults(&c);
  c.model = m->s;
  char *cfg = bam_config_to_string(&c);
  bam_ckpt_info info = {.step = 10, .tokens_seen = 5120, .config_text = cfg,
                        .lineage_text = (char *)lineage, .world = 1};
  bam_strlcpy(info.kind, kind, sizeof info.kind);
  bam_strlcpy(info.tokenizer, tok, sizeof info.tokenizer);
  float *mom = with_moments ? calloc(m->n, sizeof(float)) : NULL;
  bam_status st = bam_ckpt_save_sharded(dir, &info, m->t, m->nt, m->n, (bam_range){0, m->n}, m->p,
                                        mom, mom, 1, MPI_COMM_SELF, NULL, 0);
  free(mom);
  free(cfg);
  return st;
}

static void expert_lineage(char *out, size_t cap, const char *domain, const char *seed_id) {
  snprintf(out, cap, "kind = expert\ndomain = %s\nseed_id = %s\nseed_path = x\ntokens = 99\n",
           domain, seed_id);
}

static void expect_error(bam_status st, const char *what, const char *a, const char *b) {
  T_CHECK(st != BAM_OK, "%s: accepted", what);
  const char *msg = bam_error_message();
  if (getenv("BAM_TEST_VERBOSE")) printf("refused (%s): %s\n", what, msg);
  T_CHECK(a == NULL || strstr(msg, a), "%s: message '%s' lacks '%s'", what, msg, a);
  T_CHECK(b == NULL || strstr(msg, b), "%s: message '%s' lacks '%s'", what, msg, b);
  bam_error_clear();
}

static int exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

/* ---- reading a mixture back --------------------------------------------------------------- */

typedef struct {
  bam_mixture_shape shape;
  bam_config cfg;
  bam_tensor_info t[BAM_MAX_TENSORS];
  int nt;
  size_t n;
  float *p;
  char kind[32], tokenizer[64];
  char *lineage;
  int64_t step, tokens;
  int has_moments;
} mixture_ckpt;

static int read_mixture(const char *out_dir, mixture_ckpt *x) {
  memset(x, 0, sizeof *x);
  char path[512];
  snprintf(path, sizeof path, "%s/ckpt", out_dir);
  bam_ckpt *c = NULL;
  bam_status st = bam_ckpt_open(&c, path);
  T_CHECK(st == BAM_OK, "open %s: %s", path, bam_error_message());
  if (st != BAM_OK) return bam_error_clear(), 0;
  const bam_ckpt_info *info = bam_ckpt_get_info(c);
  bam_strlcpy(x->kind, info->kind, sizeof x->kind);
  bam_strlcpy(x->tokenizer, info->tokenizer, sizeof x->tokenizer);
  x->lineage = strdup(info->lineage_text);
  x->step = info->step;
  x->tokens = info->tokens_seen;
  x->has_moments = bam_ckpt_has_moments(c);
  bam_config_defaults(&x->cfg);
  T_OK(st = bam_config_load_string(&x->cfg, info->config_text, "stored config"));
  int ok = st == BAM_OK;
  if (ok) {
    T_OK(st = bam_mixture_shape_from_config(&x->cfg, &x->shape));
    ok = st == BAM_OK;
  }
  if (ok) {
    x->nt = bam_mixture_tensors(&x->shape, x->t, &x->n);
    T_OK(st = bam_ckpt_check_layout(c, x->t, x->nt, x->n));
    ok = st == BAM_OK;
  }
  if (ok) {
    x->p = malloc(x->n * sizeof(float));
    T_OK(st = bam_ckpt_read(c, "params", (bam_range){0, x->n}, x->p));
    ok = st == BAM_OK;
  }
  bam_ckpt_close(&c);
  return ok;
}

static void free_mixture(mixture_ckpt *x) {
  free(x->p);
  free(x->lineage);
  x->p = NULL;
  x->lineage = NULL;
}

static const float *mix_tensor(const mixture_ckpt *x, const char *name, const bam_tensor_info **t) {
  *t = find(x->t, x->nt, name);
  return *t ? x->p + (*t)->offset : NULL;
}

/* ---- the initialisation table, written out independently of src/upcycle ------------------ */

/* mean_i models[i][k], summed in double in model order, rounded once */
static int is_mean(const float *got, dense *const *models, int E, const bam_tensor_info *d) {
  for (size_t k = 0; k < d->numel; k++) {
    double acc = 0;
    for (int i = 0; i < E; i++) acc += (double)models[i]->p[d->offset + k];
    float want = (float)(acc / E);
    if (memcmp(&got[k], &want, sizeof want) != 0) return 0;
  }
  return 1;
}

static int is_copy(const float *got, const dense *m, const bam_tensor_info *d) {
  return memcmp(got, m->p + d->offset, d->numel * sizeof(float)) == 0;
}

/* Checks every non-router tensor of the mixture against its rule; returns the count checked. */
static int check_table(const mixture_ckpt *x, dense *const *models, int E, int extra) {
  const bam_method m = x->shape.method;
  const dense *seed = models[0];
  int checked = 0;
  for (int i = 0; i < x->nt; i++) {
    const bam_tensor_info *t = &x->t[i];
    const float *got = x->p + t->offset;
    const char *n = t->name;
    if (!strcmp(n, "ffn_router") || !strcmp(n, "att_router")) continue;
    const bam_tensor_info *d = find(seed->t, seed->nt, n);
    T_CHECK(d != NULL, "%s: mixture tensor %s has no dense counterpart", x->kind, n);
    if (!d) continue;
    int ffn = !strcmp(n, "w_gate") || !strcmp(n, "w_up") || !strcmp(n, "w_down");
    int experts = ffn || (m != BAM_METHOD_BTX && (!strcmp(n, "wq") || !strcmp(n, "wo"))) ||
                  (m == BAM_METHOD_BAM && (!strcmp(n, "wk") || !strcmp(n, "wv")));
    if (!experts) {
      T_CHECK(t->numel == d->numel && is_mean(got, models, E, d),
              "%s: %s is not the double-accumulated mean of the %d models", x->kind, n, E);
    } else {
      int blocks = ffn ? E + extra : E;
      T_CHECK(t->numel == (size_t)blocks * d->numel, "%s: %s holds %zu values, expected %d x %zu",
              x->kind, n, t->numel, blocks, d->numel);
      if (t->numel != (size_t)blocks * d->numel) continue;
      for (int j = 0; j < blocks; j++) {
        const dense *src = j < E ? models[j] : seed;
        T_CHECK(is_copy(got + (size_t)j * d->numel, src, d), "%s: %s expert %d is not a bitwise "
                "copy of %s", x->kind, n, j, j < E ? "its model" : "the seed (extra expert)");
      }
    }
    checked++;
  }
  return checked;
}

static void router_stats(const mixture_ckpt *x, double *mean, double *sd, size_t *count) {
  double s = 0, s2 = 0;
  size_t n = 0;
  for (int i = 0; i < x->nt; i++) {
    const bam_tensor_info *t = &x->t[i];
    if (strcmp(t->name, "ffn_router") && strcmp(t->name, "att_router")) continue;
    for (size_t k = 0; k < t->numel; k++) {
      double v = x->p[t->offset + k];
      s += v, s2 += v * v, n++;
    }
  }
  *count = n;
  *mean = n ? s / (double)n : 0;
  *sd = n ? sqrt(s2 / (double)n - *mean * *mean) : 0;
}

static int same_tensor(const mixture_ckpt *a, const mixture_ckpt *b, const char *name) {
  const bam_tensor_info *ta, *tb;
  const float *pa = mix_tensor(a, name, &ta), *pb = mix_tensor(b, name, &tb);
  return pa && pb && ta->numel == tb->numel && !memcmp(pa, pb, ta->numel * sizeof(float));
}

static int same_non_routers(const mixture_ckpt *a, const mixture_ckpt *b) {
  for (int i = 0; i < a->nt; i++) {
    const char *n = a->t[i].name;
    if (strcmp(n, "ffn_router") && strcmp(n, "att_router") && !same_tensor(a, b, n)) return 0;
  }
  return 1;
}

static void expect_lineage(const char *lin, const char *key, const char *want, int prefix) {
  char v[512];
  int found = bam_lineage_get(lin, key, v, sizeof v);
  T_CHECK(found, "lineage lacks '%s':\n%s", key, lin);
  if (found && want)
    T_CHECK(prefix ? !strncmp(v, want, strlen(want)) : !strcmp(v, want),
            "lineage %s = '%s', expected %s'%s'", key, v, prefix ? "a path under " : "", want);
}

/* ---- tests ----------------------------------------------------------------------------------- */

static void test_lineage_get(void) {
  const char *text = "# comment = no\nkind = expert\n  domain\t=  code  \r\nseed_id=abc-12\n"
                     "empty =\nexpert.1 = /a/b = c\nkind = later\n";
  char v[64];
  T_CHECK(bam_lineage_get(text, "kind", v, sizeof v) && !strcmp(v, "expert"), "kind: '%s'", v);
  T_CHECK(bam_lineage_get(text, "domain", v, sizeof v) && !strcmp(v, "code"), "domain: '%s'", v);
  T_CHECK(bam_lineage_get(text, "seed_id", v, sizeof v) && !strcmp(v, "abc-12"), "seed_id: '%s'", v);
  T_CHECK(bam_lineage_get(text, "empty", v, sizeof v) && !strcmp(v, ""), "empty: '%s'", v);
  T_CHECK(bam_lineage_get(text, "expert.1", v, sizeof v) && !strcmp(v, "/a/b = c"), "expert.1: '%s'", v);
  T_CHECK(!bam_lineage_get(text, "# comment", v, sizeof v), "a comment line is not a key");
  T_CHECK(!bam_lineage_get(text, "seed", v, sizeof v) && v[0] == 0, "a key prefix is not a key");
  T_CHECK(!bam_lineage_get("", "kind", v, sizeof v), "empty lineage");
  T_CHECK(!bam_lineage_get(NULL, "kind", v, sizeof v), "NULL lineage");
  char small[4];
  T_CHECK(bam_lineage_get(text, "seed_id", small, sizeof small) && !strcmp(small, "abc"),
          "truncated: '%s'", small);
}

static void test_params_id(const char *seed_dir, const dense *seed, const char *other_dir) {
  char id[64], want[64], id2[64];
  T_OK(bam_ckpt_params_id(seed_dir, id, sizeof id));
  snprintf(want, sizeof want, "%08x-%zu", (unsigned)bam_crc32c(0, seed->p, seed->n * sizeof(float)),
           seed->n);
  T_CHECK(!strcmp(id, want), "params id %s, expected %s", id, want);
  /* the same parameters exported to one file have the same id; other parameters another */
  char file[512];
  path_of(file, sizeof file, "seed-export.h5");
  T_OK(bam_ckpt_export(seed_dir, file, 0));
  T_OK(bam_ckpt_params_id(file, id2, sizeof id2));
  T_CHECK(!strcmp(id, id2), "exported seed: id %s, sharded %s", id2, id);
  T_OK(bam_ckpt_params_id(other_dir, id2, sizeof id2));
  T_CHECK(strcmp(id, id2) != 0, "another model has the same id %s", id);
  char missing[512];
  path_of(missing, sizeof missing, "nope");
  expect_error(bam_ckpt_params_id(missing, id2, sizeof id2), "id of a missing checkpoint", missing, NULL);
}

static void test_shape_from_config(void) {
  bam_config c;
  bam_mixture_shape s;
  bam_config_defaults(&c);
  expect_error(bam_mixture_shape_from_config(&c, &s), "no method", "mixture.method", NULL);
  bam_strlcpy(c.method, "moe", sizeof c.method);
  expect_error(bam_mixture_shape_from_config(&c, &s), "bad method", "mixture.method", "moe");
  bam_strlcpy(c.method, "bam", sizeof c.method);
  c.n_ffn_experts = 4;
  expect_error(bam_mixture_shape_from_config(&c, &s), "bam without attention experts",
               "mixture.n_att_experts", NULL);
  c.n_att_experts = 4;
  c.n_ffn_experts = 0;
  expect_error(bam_mixture_shape_from_config(&c, &s), "no FFN experts", "mixture.n_ffn_experts", NULL);
  c.n_ffn_experts = 4;
  c.ffn_top_k = 5;
  expect_error(bam_mixture_shape_from_config(&c, &s), "top-k > experts", "mixture.ffn_top_k", NULL);
  c.ffn_top_k = 2;
  c.att_top_k = 5;
  expect_error(bam_mixture_shape_from_config(&c, &s), "att top-k > experts", "mixture.att_top_k", NULL);
  c.att_top_k = 1;
  T_OK(bam_mixture_shape_from_config(&c, &s));
  T_CHECK(s.method == BAM_METHOD_BAM && s.n_att_experts == 4 && s.n_ffn_experts == 4 &&
          s.ffn_top_k == 2 && s.att_top_k == 1 && s.base.n_kv_heads == s.base.n_heads,
          "bam shape from config");
  bam_strlcpy(c.method, "btx", sizeof c.method);
  expect_error(bam_mixture_shape_from_config(&c, &s), "btx with attention top-k", "mixture.att_top_k", NULL);
  c.att_top_k = 0;
  T_OK(bam_mixture_shape_from_config(&c, &s));
  T_CHECK(s.method == BAM_METHOD_BTX && s.n_att_experts == 0, "btx ignores n_att_experts");
}

/* One method: mix, read back, check the whole table, config, lineage and routers. */
static void test_method(bam_method method, int extra, const char *seed_dir, dense *const *models,
                        char expert_dirs[][512], int n_experts, int tied) {
  const int E = n_experts + 1;
  const char *name = bam_method_name(method);
  char out[512], tag[64];
  snprintf(tag, sizeof tag, "mix-%s%s", name, tied ? "-tied" : "");
  path_of(out, sizeof out, tag);
  const char *paths[8];
  for (int i = 0; i < n_experts; i++) paths[i] = expert_dirs[i];
  bam_mix_opts o = {.method = method, .ffn_top_k = method == BAM_METHOD_BTX ? 2 : 1,
                    .ffn_renormalize = method == BAM_METHOD_BTX, .att_top_k = 0,
                    .extra_ffn_experts = extra, .freeze_experts = 1, .router_seed = 77};
  T_OK(bam_upcycle_mix(seed_dir, paths, n_experts, &o, out, MPI_COMM_SELF));
  mixture_ckpt x;
  if (!read_mixture(out, &x)) return;

  /* metadata */
  T_CHECK(!strcmp(x.kind, name), "%s: kind '%s'", name, x.kind);
  T_CHECK(x.step == 0 && x.tokens == 0 && !x.has_moments, "%s: step %lld tokens %lld moments %d",
          name, (long long)x.step, (long long)x.tokens, x.has_moments);
  T_CHECK(!strcmp(x.tokenizer, TOKENIZER), "%s: tokenizer '%s'", name, x.tokenizer);
  /* the stored config describes the mixture */
  const bam_mixture_shape *s = &x.shape;
  T_CHECK(s->method == method && s->n_ffn_experts == E + extra &&
          s->n_att_experts == (method == BAM_METHOD_BTX ? 0 : E) && s->ffn_top_k == o.ffn_top_k &&
          s->ffn_renormalize == o.ffn_renormalize && s->att_top_k == 0,
          "%s: stored shape: method %d Ea %d Ef %d k %d renorm %d", name, (int)s->method,
          s->n_att_experts, s->n_ffn_experts, s->ffn_top_k, s->ffn_renormalize);
  T_CHECK(x.cfg.freeze_experts == 1 && !strcmp(x.cfg.out_dir, out) &&
          x.cfg.n_att_experts == (method == BAM_METHOD_BTX ? 0 : E),
          "%s: stored config: freeze %d out_dir '%s' n_att_experts %d", name, x.cfg.freeze_experts,
          x.cfg.out_dir, x.cfg.n_att_experts);
  bam_model_shape want = models[0]->s;
  T_CHECK(!memcmp(&s->base, &want, sizeof want), "%s: the base shape is not the seed's", name);

  /* the table */
  int checked = check_table(&x, models, E, extra);
  int routers = method == BAM_METHOD_BTX ? 1 : 2;
  T_CHECK(checked + routers == x.nt, "%s: %d of %d tensors checked", name, checked + routers, x.nt);

  /* routers: N(0, 0.02^2), deterministic in router_seed, one stream per tensor */
  double mean, sd;
  size_t count;
  router_stats(&x, &mean, &sd, &count);
  T_CHECK(count > 100 && fabs(sd - 0.02) < 0.004 && fabs(mean) < 0.004,
          "%s: routers: %zu values, mean %g, std %g (expected 0, 0.02)", name, count, mean, sd);
  if (method != BAM_METHOD_BTX) {
    const bam_tensor_info *a, *f;
    const float *pa = mix_tensor(&x, "att_router", &a), *pf = mix_tensor(&x, "ffn_router", &f);
    T_CHECK(pa && pf && memcmp(pa, pf, 16 * sizeof(float)) != 0, "%s: the routers share a stream", name);
  }
  char out2[600], out3[600];
  snprintf(out2, sizeof out2, "%s-again", out);
  snprintf(out3, sizeof out3, "%s-seed78", out);
  T_OK(bam_upcycle_mix(seed_dir, paths, n_experts, &o, out2, MPI_COMM_SELF));
  o.router_seed = 78;
  T_OK(bam_upcycle_mix(seed_dir, paths, n_experts, &o, out3, MPI_COMM_SELF));
  mixture_ckpt y, z;
  if (read_mixture(out2, &y)) {
    T_CHECK(!memcmp(x.p, y.p, x.n * sizeof(float)), "%s: mixing twice differs", name);
    free_mixture(&y);
  }
  if (read_mixture(out3, &z)) {
    T_CHECK(!same_tensor(&x, &z, "ffn_router"), "%s: router_seed does not change the routers", name);
    T_CHECK(same_non_routers(&x, &z), "%s: router_seed changes more than the routers", name);
    free_mixture(&z);
  }

  /* lineage */
  char id[64], seed_path[512], key[64];
  T_OK(bam_ckpt_params_id(seed_dir, id, sizeof id));
  snprintf(seed_path, sizeof seed_path, "%s/step-", seed_dir);
  expect_lineage(x.lineage, "kind", "mixture", 0);
  expect_lineage(x.lineage, "method", name, 0);
  expect_lineage(x.lineage, "seed", seed_path, 1);
  expect_lineage(x.lineage, "seed_id", id, 0);
  for (int i = 1; i < E; i++) {
    snprintf(key, sizeof key, "expert.%d", i);
    expect_lineage(x.lineage, key, expert_dirs[i - 1], 1);
    snprintf(key, sizeof key, "expert.%d.domain", i);
    expect_lineage(x.lineage, key, DOMAINS[i - 1], 0);
  }
  free_mixture(&x);
}

/* A mixture of E identical models computes the dense model: the soft attention gates sum to
 * one, and top-1 renormalised FFN routing gives the one expert weight one. */
static void test_identity(bam_method method, const char *seed_dir, const dense *seed,
                          char copy_dirs[][512], int n_copies) {
  const char *name = bam_method_name(method);
  char out[512], tag[64];
  snprintf(tag, sizeof tag, "identity-%s", name);
  path_of(out, sizeof out, tag);
  const char *paths[8];
  for (int i = 0; i < n_copies; i++) paths[i] = copy_dirs[i];
  bam_mix_opts o = {.method = method, .ffn_top_k = 1, .ffn_renormalize = 1, .router_seed = 5};
  T_OK(bam_upcycle_mix(seed_dir, paths, n_copies, &o, out, MPI_COMM_SELF));
  mixture_ckpt x;
  if (!read_mixture(out, &x)) return;
  const int B = 2, T = seed->s.seq_len, V = seed->s.vocab_size;
  bam_model *dm = NULL;
  bam_mixture *mm = NULL;
  T_OK(bam_model_create(&dm, &seed->s, B));
  T_OK(bam_mixture_create(&mm, &x.shape, B));
  if (dm && mm) {
    memcpy(dm->params_mem, seed->p, seed->n * sizeof(float));
    T_CHECK(mm->n_params == x.n, "%s: mixture model has %zu parameters, the checkpoint %zu", name,
            mm->n_params, x.n);
    memcpy(mm->params_mem, x.p, x.n * sizeof(float));
    int32_t tokens[2 * 16], targets[2 * 16];
    bam_rng r;
    bam_rng_seed(&r, 9, 0);
    for (int i = 0; i < B * T; i++) tokens[i] = (int32_t)bam_rng_below(&r, (uint64_t)V);
    for (int i = 0; i < B * T; i++) targets[i] = i + 1 < B * T ? tokens[i + 1] : 0;
    float dl = 0, ml = 0;
    T_OK(bam_model_forward(dm, tokens, targets, B, T, &dl));
    T_OK(bam_mixture_forward(mm, tokens, targets, B, T, &ml));
    const float *a = bam_model_logits(dm), *b = bam_mixture_logits(mm);
    double scale = 0, diff = 0;
    for (size_t i = 0; i < (size_t)B * T * V; i++) {
      scale = fmax(scale, fabs(a[i]));
      diff = fmax(diff, fabs((double)a[i] - b[i]));
    }
    if (getenv("BAM_TEST_VERBOSE"))
      printf("%s of identical models: max |logit difference| %g, max |logit| %g\n", name, diff, scale);
    T_CHECK(diff <= 1e-5 * scale, "%s of identical models: logits differ from the dense model's by "
            "%g (max |logit| %g)", name, diff, scale);
    T_CLOSE(mm->last_loss, dl, 0, 1e-5, "token loss of the mixture of identical models");
  }
  bam_model_free(&dm);
  bam_mixture_free(&mm);
  free_mixture(&x);
}

static void test_bad_inputs(const char *seed_dir, const dense *seed, const char *good_expert,
                            const char *seed_id) {
  char dir[512], out[512], lin[256];
  path_of(out, sizeof out, "bad-out");
  bam_mix_opts o = {.method = BAM_METHOD_BAM, .ffn_top_k = 1, .router_seed = 1};
  const char *paths[2] = {good_expert, NULL};
  expert_lineage(lin, sizeof lin, "code", seed_id);

  /* an expert of another shape: the layout check names the expert and the tensor */
  dense other;
  bam_model_shape s = seed->s;
  s.d_ff = 64;
  dense_init(&other, s);
  dense_randomise(&other, 50, 1, 0);
  path_of(dir, sizeof dir, "bad-shape");
  T_OK(save_dense(dir, &other, "dense", TOKENIZER, lin, 0));
  paths[1] = dir;
  expect_error(bam_upcycle_mix(seed_dir, paths, 2, &o, out, MPI_COMM_SELF), "expert of another shape", dir, "w_gate");
  free(other.p);

  /* same widths, other head counts: refused by the stored config, naming the field */
  s = seed->s;
  s.n_heads = 8, s.n_kv_heads = 4; /* head_dim 4, kv width 16 as before */
  dense_init(&other, s);
  T_CHECK(other.n == seed->n, "the head-count variant should share the layout");
  memcpy(other.p, seed->p, seed->n * sizeof(float));
  path_of(dir, sizeof dir, "bad-heads");
  T_OK(save_dense(dir, &other, "dense", TOKENIZER, lin, 0));
  paths[1] = dir;
  expect_error(bam_upcycle_mix(seed_dir, paths, 2, &o, out, MPI_COMM_SELF), "other head counts", dir, "model.n_heads");
  free(other.p);

  /* another tokenizer */
  path_of(dir, sizeof dir, "bad-tokenizer");
  T_OK(save_dense(dir, seed, "dense", "tok-other", lin, 0));
  paths[1] = dir;
  expect_error(bam_upcycle_mix(seed_dir, paths, 2, &o, out, MPI_COMM_SELF), "another tokenizer", dir, "tok-other");

  /* branched from another seed */
  char other_lin[256];
  expert_lineage(other_lin, sizeof other_lin, "code", "0badc0de-123");
  path_of(dir, sizeof dir, "bad-ancestor");
  T_OK(save_dense(dir, seed, "dense", TOKENIZER, other_lin, 0));
  paths[1] = dir;
  expect_error(bam_upcycle_mix(seed_dir, paths, 2, &o, out, MPI_COMM_SELF), "not the seed's descendant", dir,
               "branched from seed 0badc0de-123, not from");
  /* no lineage at all (e.g. the seed itself given as an expert) */
  paths[1] = seed_dir;
  expect_error(bam_upcycle_mix(seed_dir, paths, 2, &o, out, MPI_COMM_SELF), "the seed as its own expert",
               seed_dir, "seed_id");

  /* not a dense checkpoint: as an expert, and as the seed */
  path_of(dir, sizeof dir, "bad-kind");
  T_OK(save_dense(dir, seed, "bam", TOKENIZER, lin, 0));
  paths[1] = dir;
  expect_error(bam_upcycle_mix(seed_dir, paths, 2, &o, out, MPI_COMM_SELF), "a non-dense expert", dir, "dense");
  expect_error(bam_upcycle_mix(dir, paths, 1, &o, out, MPI_COMM_SELF), "a non-dense seed", dir, "dense");

  /* a missing expert */
  path_of(dir, sizeof dir, "no-such-expert");
  paths[1] = dir;
  expect_error(bam_upcycle_mix(seed_dir, paths, 2, &o, out, MPI_COMM_SELF), "a missing expert", dir, NULL);
  T_CHECK(!exists(out), "a refused mix left %s behind", out);

  /* methods and options */
  bam_method m;
  expect_error(bam_method_parse("moe", &m), "unknown method name", "moe", NULL);
  bam_mix_opts bad = o;
  bad.method = (bam_method)7;
  expect_error(bam_upcycle_mix(seed_dir, paths, 1, &bad, out, MPI_COMM_SELF), "unknown method", "method", NULL);
  bad = o;
  bad.ffn_top_k = 3;
  expect_error(bam_upcycle_mix(seed_dir, paths, 1, &bad, out, MPI_COMM_SELF), "top-k > experts", "top-k", NULL);
  bad = o;
  bad.method = BAM_METHOD_BTX, bad.att_top_k = 1;
  expect_error(bam_upcycle_mix(seed_dir, paths, 1, &bad, out, MPI_COMM_SELF), "btx with attention top-k", "btx", NULL);
  expect_error(bam_upcycle_mix(seed_dir, paths, 0, &o, out, MPI_COMM_SELF), "no experts", "expert", NULL);

  /* an output folder that already holds a checkpoint */
  path_of(dir, sizeof dir, "mix-bam");
  paths[0] = good_expert;
  expect_error(bam_upcycle_mix(seed_dir, paths, 1, &o, dir, MPI_COMM_SELF), "output already used", dir, "already holds");
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  if (!mkdtemp(root)) return 1;
  test_lineage_get();
  test_shape_from_config();

  for (int tied = 0; tied <= 1; tied++) {
    /* the seed and three experts branched from it */
    dense seed, ex[3];
    dense_init(&seed, tiny(tied));
    dense_randomise(&seed, 1 + (uint64_t)tied, 1, 0);
    char seed_dir[512], expert_dirs[3][512], copy_dirs[2][512], id[64], lin[256];
    path_of(seed_dir, sizeof seed_dir, tied ? "seed-tied" : "seed");
    T_OK(save_dense(seed_dir, &seed, "dense", TOKENIZER, "", 1));
    T_OK(bam_ckpt_params_id(seed_dir, id, sizeof id));
    dense *models[4] = {&seed, &ex[0], &ex[1], &ex[2]};
    for (int i = 0; i < 3; i++) {
      dense_init(&ex[i], seed.s);
      memcpy(ex[i].p, seed.p, seed.n * sizeof(float));
      dense_randomise(&ex[i], 100 + (uint64_t)i, 0.1f * (float)(i + 1), 1);
      char tag[64];
      snprintf(tag, sizeof tag, "expert-%s%s", DOMAINS[i], tied ? "-tied" : "");
      path_of(expert_dirs[i], sizeof expert_dirs[i], tag);
      expert_lineage(lin, sizeof lin, DOMAINS[i], id);
      T_OK(save_dense(expert_dirs[i], &ex[i], "dense", TOKENIZER, lin, 0));
    }
    if (!tied) {
      test_params_id(seed_dir, &seed, expert_dirs[0]);
      test_method(BAM_METHOD_BTX, 1, seed_dir, models, expert_dirs, 3, 0);
      test_method(BAM_METHOD_BAM, 0, seed_dir, models, expert_dirs, 3, 0);
      test_method(BAM_METHOD_BAM_SHARED_KV, 2, seed_dir, models, expert_dirs, 2, 0);
      test_bad_inputs(seed_dir, &seed, expert_dirs[0], id);
      /* identical copies of the seed, each with an expert's lineage */
      for (int i = 0; i < 2; i++) {
        char tag[64];
        snprintf(tag, sizeof tag, "copy-%d", i);
        path_of(copy_dirs[i], sizeof copy_dirs[i], tag);
        expert_lineage(lin, sizeof lin, DOMAINS[i], id);
        T_OK(save_dense(copy_dirs[i], &seed, "dense", TOKENIZER, lin, 0));
      }
      test_identity(BAM_METHOD_BAM, seed_dir, &seed, copy_dirs, 2);
      test_identity(BAM_METHOD_BAM_SHARED_KV, seed_dir, &seed, copy_dirs, 2);
      test_identity(BAM_METHOD_BTX, seed_dir, &seed, copy_dirs, 2);
    } else {
      test_method(BAM_METHOD_BAM, 1, seed_dir, models, expert_dirs, 2, 1);
    }
    free(seed.p);
    for (int i = 0; i < 3; i++) free(ex[i].p);
  }

  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
  if (bam_t_fail == 0 && system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", root);
  MPI_Finalize();
  BAM_TEST_END();
}
