/* upcycle/mix: build a BTX or BAM mixture checkpoint from a seed and its domain experts
 * (method.md section 4; the table is in include/bam/upcycle.h).
 *
 * Steps: check the options and the output folder; open every input and check that it is a
 * dense checkpoint of the seed's layout, model, tokenizer and (for the experts) lineage;
 * read every input once to compute its parameters id (which also verifies every shard's
 * CRC-32C up front); write the mixture's config and derive its shape and layout from that
 * config exactly as a reader will; fill the mixture tensor by tensor; save it.
 *
 * Memory: every input is read through once (its id) before the mixture is allocated; that
 * first read of a shard takes the whole shard, at most one dense model, freed at once. Then
 * the mixture's parameters plus a double accumulator of the largest averaged tensor: copies
 * are read straight into their place in the mixture, and averaged tensors are read into their
 * place one model at a time and accumulated in double. */
#include <stdlib.h>
#include <string.h>

#include "bam/shard.h"
#include "bam/upcycle.h"
#include "internal.h"

#define ROUTER_STD 0.02f      /* method.md section 3: routers start as N(0, 0.02^2) */
#define MAX_FFN_EXPERTS 256   /* the range of mixture.n_ffn_experts in the config */

/* ---- the mixture shape a config describes ----------------------------------------------- */

bam_status bam_mixture_shape_from_config(const bam_config *c, bam_mixture_shape *out) {
  memset(out, 0, sizeof *out);
  if (!c->method[0])
    BAM_FAIL(BAM_ERR_CONFIG, "mixture.method is empty: not a mixture config (btx, bam, "
             "bam-shared-kv)");
  bam_method m;
  if (bam_method_parse(c->method, &m) != BAM_OK) {
    bam_error_clear(); /* our message names the config key */
    BAM_FAIL(BAM_ERR_CONFIG, "mixture.method = '%s' is not a method (btx, bam, bam-shared-kv)",
             c->method);
  }
  const int bam = m != BAM_METHOD_BTX;
  if (bam && c->n_att_experts < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture.n_att_experts = %d: method %s needs at least one "
             "attention expert", c->n_att_experts, c->method);
  if (c->n_ffn_experts < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture.n_ffn_experts = %d: a mixture needs at least one FFN "
             "expert", c->n_ffn_experts);
  if (c->ffn_top_k < 1 || c->ffn_top_k > c->n_ffn_experts)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture.ffn_top_k = %d must be between 1 and mixture.n_ffn_experts "
             "= %d", c->ffn_top_k, c->n_ffn_experts);
  if (!bam && c->att_top_k != 0)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture.att_top_k = %d: method btx has no attention experts to "
             "route (set it to 0)", c->att_top_k);
  if (bam && (c->att_top_k < 0 || c->att_top_k > c->n_att_experts))
    BAM_FAIL(BAM_ERR_CONFIG, "mixture.att_top_k = %d must be between 0 (soft routing) and "
             "mixture.n_att_experts = %d", c->att_top_k, c->n_att_experts);
  out->base = bam_config_shape(c);
  out->method = m;
  out->n_att_experts = bam ? c->n_att_experts : 0; /* BTX keeps the dense attention */
  out->n_ffn_experts = c->n_ffn_experts;
  out->ffn_top_k = c->ffn_top_k;
  out->ffn_renormalize = c->ffn_renormalize;
  out->att_top_k = bam ? c->att_top_k : 0;
  out->lb_coef = c->lb_coef;
  out->z_coef = c->z_coef;
  out->lb_per_sequence = c->lb_per_sequence;
  out->capacity_factor = c->capacity_factor;
  return BAM_OK;
}

/* ---- tensor tables ---------------------------------------------------------------------- */

static const bam_tensor_info *find_tensor(const bam_tensor_info *t, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (!strcmp(t[i].name, name)) return &t[i];
  return NULL;
}

/* "(2, 48, 32)" */
static void shape_str(char *buf, size_t cap, const bam_tensor_info *t) {
  size_t used = (size_t)snprintf(buf, cap, "(");
  for (int k = 0; k < t->ndim && used < cap; k++)
    used += (size_t)snprintf(buf + used, cap - used, "%s%lld", k ? ", " : "", (long long)t->shape[k]);
  if (used < cap) snprintf(buf + used, cap - used, ")");
}

/* ---- the inputs ---------------------------------------------------------------------------- */

typedef struct {
  bam_ckpt *c;
  const char *path;               /* the resolved step folder or file (owned by c) */
  char id[BAM_PARAMS_ID_LEN];     /* bam_ckpt_params_id */
  char domain[128];               /* from an expert's lineage; "" if it records none */
} input;

/* Open a checkpoint and require a dense one. `role` names it in messages ("the seed",
 * "expert 2 of 3"). */
static bam_status open_dense(input *in, const char *path, const char *role) {
  BAM_CHECK(bam_ckpt_open(&in->c, path));
  in->path = bam_ckpt_path(in->c);
  const bam_ckpt_info *info = bam_ckpt_get_info(in->c);
  if (strcmp(info->kind, "dense") != 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: a '%s' checkpoint, given as %s; mixing needs dense models",
             in->path, info->kind, role);
  return BAM_OK;
}

/* The model an input's stored config describes. */
static bam_status stored_config(const input *in, bam_config *cfg) {
  char origin[BAM_PATH_MAX + 32];
  snprintf(origin, sizeof origin, "%s (stored config)", in->path);
  const char *text = bam_ckpt_get_info(in->c)->config_text;
  bam_config_defaults(cfg);
  return bam_config_load_string(cfg, text ? text : "", origin);
}

/* Every [model] field of an expert equals the seed's: the layout check cannot see head counts
 * that give the same widths, nor RoPE and norm constants. */
static bam_status same_model(const input *ex, const bam_model_shape *a, const input *seed,
                             const bam_model_shape *s) {
#define SAME_INT(f)                                                                            \
  if (a->f != s->f)                                                                            \
    BAM_FAIL(BAM_ERR_DATA, "%s: model." #f " = %d, the seed (%s) has %d", ex->path, a->f,      \
             seed->path, s->f);
#define SAME_FLOAT(f)                                                                          \
  if (a->f != s->f)                                                                            \
    BAM_FAIL(BAM_ERR_DATA, "%s: model." #f " = %.9g, the seed (%s) has %.9g", ex->path,        \
             (double)a->f, seed->path, (double)s->f);
  SAME_INT(n_layers) SAME_INT(d_model) SAME_INT(n_heads) SAME_INT(n_kv_heads) SAME_INT(d_ff)
  SAME_INT(vocab_size) SAME_INT(seq_len) SAME_INT(tie_embeddings)
  SAME_FLOAT(rope_base) SAME_FLOAT(norm_eps)
#undef SAME_INT
#undef SAME_FLOAT
  return BAM_OK;
}

/* An expert must be a dense model of the seed's layout, model and tokenizer, branched from
 * exactly this seed (its lineage's seed_id is the seed's parameters id). */
static bam_status check_expert(input *ex, const input *seed, const bam_model_shape *seed_shape) {
  int nt = 0;
  size_t np = 0;
  const bam_tensor_info *t = bam_ckpt_tensors(seed->c, &nt, &np);
  const bam_ckpt_info *info = bam_ckpt_get_info(ex->c), *sinfo = bam_ckpt_get_info(seed->c);
  /* Shapes first, in the seed's words; then names, order and offsets (bam_ckpt_check_layout). */
  int ent = 0;
  const bam_tensor_info *et = bam_ckpt_tensors(ex->c, &ent, NULL);
  for (int i = 0; i < nt; i++) {
    const bam_tensor_info *x = find_tensor(et, ent, t[i].name);
    int same = x && x->ndim == t[i].ndim;
    for (int k = 0; same && k < x->ndim; k++) same = x->shape[k] == t[i].shape[k];
    if (x && !same) {
      char a[96], b[96];
      shape_str(a, sizeof a, x);
      shape_str(b, sizeof b, &t[i]);
      BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s has shape %s, the seed (%s) has %s (an expert of "
               "another model shape?)", ex->path, x->name, a, seed->path, b);
    }
  }
  BAM_CHECK(bam_ckpt_check_layout(ex->c, t, nt, np));
  bam_config cfg;
  BAM_CHECK(stored_config(ex, &cfg));
  bam_model_shape shape = bam_config_shape(&cfg);
  BAM_CHECK(same_model(ex, &shape, seed, seed_shape));
  if (strcmp(info->tokenizer, sinfo->tokenizer) != 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: tokenizer '%s', the seed (%s) has '%s'", ex->path,
             info->tokenizer, seed->path, sinfo->tokenizer);
  char seed_id[BAM_PARAMS_ID_LEN + 64];
  if (!bam_lineage_get(info->lineage_text, "seed_id", seed_id, sizeof seed_id))
    BAM_FAIL(BAM_ERR_DATA, "%s: its lineage records no seed_id (not a domain expert made by "
             "bam branch); mixing needs experts branched from %s (%s)", ex->path, seed->path,
             seed->id);
  if (strcmp(seed_id, seed->id) != 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: branched from seed %s, not from %s (%s)", ex->path, seed_id,
             seed->path, seed->id);
  bam_lineage_get(info->lineage_text, "domain", ex->domain, sizeof ex->domain);
  BAM_CHECK(bam_upcycle_params_id(ex->c, ex->id, sizeof ex->id));
  bam_log("mix:   %s, domain %s, id %s\n", ex->path, ex->domain[0] ? ex->domain : "(none)", ex->id);
  return BAM_OK;
}

/* ---- filling the mixture ------------------------------------------------------------------ */

typedef enum { RULE_AVERAGE, RULE_EXPERTS, RULE_ROUTER } rule_kind;

static int is_ffn(const char *name) {
  return !strcmp(name, "w_gate") || !strcmp(name, "w_up") || !strcmp(name, "w_down");
}

/* How mixture tensor `name` starts (the table in upcycle.h); -1 if no rule covers it. */
static int rule_of(const char *name, bam_method m) {
  static const char *const averaged[] = {"wte", "ln", "ln_f", "w_head"};
  for (size_t i = 0; i < sizeof averaged / sizeof averaged[0]; i++)
    if (!strcmp(name, averaged[i])) return RULE_AVERAGE;
  if (!strcmp(name, "ffn_router") || !strcmp(name, "att_router")) return RULE_ROUTER;
  if (is_ffn(name)) return RULE_EXPERTS;
  if (!strcmp(name, "wq") || !strcmp(name, "wo"))
    return m == BAM_METHOD_BTX ? RULE_AVERAGE : RULE_EXPERTS;
  if (!strcmp(name, "wk") || !strcmp(name, "wv"))
    return m == BAM_METHOD_BAM ? RULE_EXPERTS : RULE_AVERAGE;
  return -1;
}

/* FNV-1a of a tensor name: the RNG stream of a router, independent of the layout around it. */
static uint64_t name_hash(const char *s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
  return h;
}

typedef struct {
  input *in;   /* in[0] = the seed, in[1..E-1] = the experts */
  int E;
  bam_method method;
  uint64_t router_seed;
  double *acc; /* accumulator, numel of the largest averaged tensor */
  float *mix;  /* the mixture's flat parameters */
} builder;

static bam_status read_tensor(input *in, const bam_tensor_info *d, float *dst) {
  return bam_ckpt_read(in->c, "params", (bam_range){d->offset, d->offset + d->numel}, dst);
}

/* The uniform mean over the E models, summed in double in model order and rounded once. */
static bam_status fill_average(builder *b, const bam_tensor_info *d, float *dst) {
  const size_t n = d->numel;
  memset(b->acc, 0, n * sizeof(double));
  for (int i = 0; i < b->E; i++) {
    BAM_CHECK(read_tensor(&b->in[i], d, dst)); /* the destination doubles as the read buffer */
    double *acc = b->acc;
#pragma omp parallel for schedule(static)
    for (size_t k = 0; k < n; k++) acc[k] += (double)dst[k];
  }
  const double E = (double)b->E;
  const double *acc = b->acc;
#pragma omp parallel for schedule(static)
  for (size_t k = 0; k < n; k++) dst[k] = (float)(acc[k] / E);
  return BAM_OK;
}

/* Expert-major blocks: block j is a bitwise copy of model j; blocks past the E models (extra
 * FFN experts) are copies of the seed's, block 0. */
static bam_status fill_experts(builder *b, const bam_tensor_info *d, int blocks, float *dst) {
  for (int j = 0; j < blocks; j++) {
    float *blk = dst + (size_t)j * d->numel;
    if (j < b->E) BAM_CHECK(read_tensor(&b->in[j], d, blk));
    else memcpy(blk, dst, d->numel * sizeof(float));
  }
  return BAM_OK;
}

static void fill_router(const builder *b, const bam_tensor_info *t, float *dst) {
  bam_rng r;
  bam_rng_seed(&r, b->router_seed, name_hash(t->name));
  for (size_t k = 0; k < t->numel; k++) dst[k] = ROUTER_STD * bam_rng_normal(&r);
}

/* Mixture tensor t must be the dense tensor d (blocks == 0) or `blocks` of them stacked. */
static bam_status check_shape(const bam_tensor_info *t, const bam_tensor_info *d, int blocks) {
  int lead = blocks > 0;
  int ok = t->ndim == d->ndim + lead && (!lead || t->shape[0] == blocks);
  for (int k = 0; ok && k < d->ndim; k++) ok = t->shape[k + lead] == d->shape[k];
  if (!ok) {
    char a[96], b[96];
    shape_str(a, sizeof a, t);
    shape_str(b, sizeof b, d);
    if (lead)
      BAM_FAIL(BAM_ERR_INTERNAL, "mixture tensor %s has shape %s; mixing expects %d experts of "
               "the dense shape %s", t->name, a, blocks, b);
    BAM_FAIL(BAM_ERR_INTERNAL, "mixture tensor %s has shape %s; mixing expects the dense shape %s",
             t->name, a, b);
  }
  return BAM_OK;
}

/* Fill every tensor of the mixture layout mt[0..nm) from the dense layout dt[0..nd). */
static bam_status build(builder *b, const bam_mixture_shape *s, const bam_tensor_info *mt,
                        int nm, const bam_tensor_info *dt, int nd) {
  int used[BAM_MAX_TENSORS] = {0};
  for (int i = 0; i < nm; i++) {
    const bam_tensor_info *t = &mt[i];
    float *dst = b->mix + t->offset;
    int rule = rule_of(t->name, b->method);
    if (rule < 0)
      BAM_FAIL(BAM_ERR_INTERNAL, "mixture tensor %s: no initialisation rule for it (method %s)",
               t->name, bam_method_name(b->method));
    if (rule == RULE_ROUTER) {
      fill_router(b, t, dst);
      continue;
    }
    const bam_tensor_info *d = find_tensor(dt, nd, t->name);
    if (!d)
      BAM_FAIL(BAM_ERR_INTERNAL, "mixture tensor %s: the dense models have no tensor of that "
               "name", t->name);
    used[d - dt] = 1;
    if (rule == RULE_AVERAGE) {
      BAM_CHECK(check_shape(t, d, 0));
      BAM_CHECK(fill_average(b, d, dst));
    } else {
      int blocks = is_ffn(t->name) ? s->n_ffn_experts : s->n_att_experts;
      BAM_CHECK(check_shape(t, d, blocks));
      BAM_CHECK(fill_experts(b, d, blocks, dst));
    }
  }
  for (int j = 0; j < nd; j++)
    if (!used[j])
      BAM_FAIL(BAM_ERR_INTERNAL, "dense tensor %s has no place in the %s mixture layout",
               dt[j].name, bam_method_name(b->method));
  return BAM_OK;
}

/* ---- the mixture's config and lineage ----------------------------------------------------- */

/* The seed's config with the [mixture] section set and the mixture phase's data: equal shares
 * of general text and every expert's domain (method.md section 1, step 4); its text, and the
 * shape a reader of that text derives (so the layout written is the layout every reader will
 * expect). */
static bam_status mixture_config(const bam_config *seed_cfg, const bam_mix_opts *o,
                                 const input *in, int E, const char *out_dir, char **text,
                                 bam_mixture_shape *shape) {
  bam_config mc = *seed_cfg;
  int used = snprintf(mc.train_mix, sizeof mc.train_mix, "general:1");
  for (int i = 1; i < E && used < (int)sizeof mc.train_mix; i++) {
    int seen = !in[i].domain[0] || !strcmp(in[i].domain, "general");
    for (int j = 1; j < i && !seen; j++) seen = !strcmp(in[j].domain, in[i].domain);
    if (!seen)
      used += snprintf(mc.train_mix + used, sizeof mc.train_mix - (size_t)used, ",%s:1", in[i].domain);
  }
  if (used >= (int)sizeof mc.train_mix)
    BAM_FAIL(BAM_ERR_ARG, "%s: too many expert domains for data.train_mix", out_dir);
  bam_strlcpy(mc.method, bam_method_name(o->method), sizeof mc.method);
  mc.n_att_experts = o->method == BAM_METHOD_BTX ? 0 : E;
  mc.n_ffn_experts = E + o->extra_ffn_experts;
  mc.ffn_top_k = o->ffn_top_k;
  mc.ffn_renormalize = o->ffn_renormalize != 0;
  mc.att_top_k = o->att_top_k;
  mc.freeze_experts = o->freeze_experts != 0;
  bam_strlcpy(mc.out_dir, out_dir, sizeof mc.out_dir); /* length checked by the caller */
  *text = bam_config_to_string(&mc);
  if (!*text) BAM_FAIL(BAM_ERR_NOMEM, "%s: cannot format the mixture's config", out_dir);
  char origin[BAM_PATH_MAX + 32];
  snprintf(origin, sizeof origin, "%s (the mixture's config)", out_dir);
  bam_config rt;
  bam_config_defaults(&rt);
  BAM_CHECK(bam_config_load_string(&rt, *text, origin));
  BAM_CHECK(bam_mixture_shape_from_config(&rt, shape));
  BAM_CHECK(bam_mixture_shape_check(shape));
  return BAM_OK;
}

static bam_status mixture_lineage(const input *in, int E, const bam_mix_opts *o, char **out) {
  size_t len = 0;
  FILE *f = open_memstream(out, &len);
  if (!f) BAM_FAIL(BAM_ERR_NOMEM, "mix: cannot format the lineage");
  fprintf(f, "kind = mixture\nmethod = %s\nseed = %s\nseed_id = %s\nrouter_seed = %llu\n",
          bam_method_name(o->method), in[0].path, in[0].id, (unsigned long long)o->router_seed);
  for (int i = 1; i < E; i++) {
    fprintf(f, "expert.%d = %s\n", i, in[i].path);
    if (in[i].domain[0]) fprintf(f, "expert.%d.domain = %s\n", i, in[i].domain);
    fprintf(f, "expert.%d.id = %s\n", i, in[i].id);
  }
  if (fclose(f) != 0 || !*out) BAM_FAIL(BAM_ERR_NOMEM, "mix: cannot format the lineage");
  return BAM_OK;
}

/* ---- bam_upcycle_mix ----------------------------------------------------------------------- */

/* Everything that can be refused before a file is opened. */
static bam_status check_request(const char *seed_path, const char *const *expert_paths,
                                int n_experts, const bam_mix_opts *o, const char *out_dir,
                                MPI_Comm comm, char *ckpt_dir, size_t cap) {
  int world = 0;
  MPI_Comm_size(comm, &world);
  if (world != 1)
    BAM_FAIL(BAM_ERR_ARG, "mix: runs on one rank (call it with MPI_COMM_SELF), not %d", world);
  if (!o) BAM_FAIL(BAM_ERR_ARG, "mix: no options given");
  if (!seed_path || !seed_path[0]) BAM_FAIL(BAM_ERR_ARG, "mix: no seed checkpoint given");
  if (n_experts < 1 || !expert_paths)
    BAM_FAIL(BAM_ERR_ARG, "mix: no domain experts given (a mixture is the seed plus at least "
             "one expert)");
  for (int i = 0; i < n_experts; i++)
    if (!expert_paths[i] || !expert_paths[i][0])
      BAM_FAIL(BAM_ERR_ARG, "mix: expert %d of %d has an empty path", i + 1, n_experts);
  if (o->method != BAM_METHOD_BTX && o->method != BAM_METHOD_BAM &&
      o->method != BAM_METHOD_BAM_SHARED_KV)
    BAM_FAIL(BAM_ERR_ARG, "mix: unknown method %d (btx, bam, bam-shared-kv)", (int)o->method);
  const int E = n_experts + 1;
  if (o->extra_ffn_experts < 0 || E + o->extra_ffn_experts > MAX_FFN_EXPERTS)
    BAM_FAIL(BAM_ERR_ARG, "mix: %d extra FFN experts: the mixture may have 1 to %d FFN experts, "
             "%d models are given", o->extra_ffn_experts, MAX_FFN_EXPERTS, E);
  const int ef = E + o->extra_ffn_experts;
  if (o->ffn_top_k < 1 || o->ffn_top_k > ef)
    BAM_FAIL(BAM_ERR_ARG, "mix: FFN top-k = %d, must be between 1 and the %d FFN experts",
             o->ffn_top_k, ef);
  if (o->method == BAM_METHOD_BTX && o->att_top_k != 0)
    BAM_FAIL(BAM_ERR_ARG, "mix: attention top-k = %d, but btx has no attention experts",
             o->att_top_k);
  if (o->att_top_k < 0 || o->att_top_k > E)
    BAM_FAIL(BAM_ERR_ARG, "mix: attention top-k = %d, must be between 0 (soft routing) and the %d "
             "attention experts", o->att_top_k, E);
  if (!out_dir || !out_dir[0]) BAM_FAIL(BAM_ERR_ARG, "mix: no output folder given");
  if (strlen(out_dir) >= BAM_PATH_MAX || (size_t)snprintf(ckpt_dir, cap, "%s/ckpt", out_dir) >= cap)
    BAM_FAIL(BAM_ERR_ARG, "%s: output folder path too long (at most %d characters)", out_dir,
             BAM_PATH_MAX - 6);
  /* Saving step 0 where a mixture already trains would point `latest` back to the start. */
  char latest[BAM_PATH_MAX + 64];
  int found = 0;
  BAM_CHECK(bam_ckpt_latest(ckpt_dir, latest, sizeof latest, &found));
  if (found)
    BAM_FAIL(BAM_ERR_ARG, "%s: already holds a checkpoint (%s); choose another output folder "
             "or remove it", ckpt_dir, latest);
  return BAM_OK;
}

bam_status bam_upcycle_mix(const char *seed_path, const char *const *expert_paths, int n_experts,
                           const bam_mix_opts *opts, const char *out_dir, MPI_Comm comm) {
  char ckpt_dir[BAM_PATH_MAX + 8];
  BAM_CHECK(check_request(seed_path, expert_paths, n_experts, opts, out_dir, comm, ckpt_dir,
                          sizeof ckpt_dir));
  const double t0 = bam_now();
  const int E = n_experts + 1;
  bam_status st = BAM_OK;
  input *in = NULL;
  char *cfg_text = NULL, *lineage = NULL;
  builder b = {.E = E, .method = opts->method, .router_seed = opts->router_seed};
  BAM_CHECK(bam_alloc_checked((void **)&in, (size_t)E * sizeof *in, "mix inputs"));
  b.in = in;

  /* The seed: dense, its stored layout the one its config describes, and its id. */
  bam_config seed_cfg;
  bam_tensor_info dt[BAM_MAX_TENSORS];
  size_t n_dense = 0;
  BAM_CHECK_GOTO(st, open_dense(&in[0], seed_path, "the seed"), done);
  BAM_CHECK_GOTO(st, stored_config(&in[0], &seed_cfg), done);
  const bam_model_shape dense = bam_config_shape(&seed_cfg);
  const int nd = bam_model_tensors(&dense, dt, &n_dense);
  BAM_CHECK_GOTO(st, bam_ckpt_check_layout(in[0].c, dt, nd, n_dense), done);
  bam_log("mix: seed %s (%zu parameters)\n", in[0].path, n_dense);
  BAM_CHECK_GOTO(st, bam_upcycle_params_id(in[0].c, in[0].id, sizeof in[0].id), done);
  bam_log("mix: seed id %s\n", in[0].id);

  /* The experts, in the order given. */
  for (int i = 1; i < E; i++) {
    char role[32];
    snprintf(role, sizeof role, "expert %d of %d", i, n_experts);
    bam_log("mix: reading %s: %s\n", role, expert_paths[i - 1]);
    BAM_CHECK_GOTO(st, open_dense(&in[i], expert_paths[i - 1], role), done);
    BAM_CHECK_GOTO(st, check_expert(&in[i], &in[0], &dense), done);
  }

  /* The mixture's config, shape and layout. */
  bam_mixture_shape shape;
  BAM_CHECK_GOTO(st, mixture_config(&seed_cfg, opts, in, E, out_dir, &cfg_text, &shape), done);
  bam_tensor_info mt[BAM_MAX_TENSORS];
  size_t n_mix = 0;
  const int nm = bam_mixture_tensors(&shape, mt, &n_mix);
  char size[32];
  bam_format_bytes(size, sizeof size, (double)n_mix * sizeof(float));
  bam_log("mix: %s mixture of %d models: %d attention experts, %d FFN experts (top-%d%s), "
          "%zu parameters (%s)\n", bam_method_name(opts->method), E, shape.n_att_experts,
          shape.n_ffn_experts, shape.ffn_top_k, shape.ffn_renormalize ? ", renormalised" : "",
          n_mix, size);

  /* Fill it. */
  size_t acc_len = 1;
  for (int i = 0; i < nm; i++)
    if (rule_of(mt[i].name, opts->method) == RULE_AVERAGE && mt[i].numel > acc_len)
      acc_len = mt[i].numel;
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&b.mix, n_mix * sizeof(float), "mixture parameters"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&b.acc, acc_len * sizeof(double), "mixing accumulator"), done);
  BAM_CHECK_GOTO(st, build(&b, &shape, mt, nm, dt, nd), done);
  bam_free(b.acc);
  b.acc = NULL;

  /* Save: one shard, parameters only, step 0. */
  BAM_CHECK_GOTO(st, mixture_lineage(in, E, opts, &lineage), done);
  bam_ckpt_info info = {.step = 0, .tokens_seen = 0, .config_text = cfg_text,
                        .lineage_text = lineage, .world = 1};
  bam_strlcpy(info.kind, bam_method_name(opts->method), sizeof info.kind);
  bam_strlcpy(info.tokenizer, bam_ckpt_get_info(in[0].c)->tokenizer, sizeof info.tokenizer);
  char written[BAM_PATH_MAX + 64];
  BAM_CHECK_GOTO(st, bam_ckpt_save_sharded(ckpt_dir, &info, mt, nm, n_mix,
                                           (bam_range){0, n_mix}, b.mix, NULL, NULL, 1, comm,
                                           written, sizeof written), done);
  bam_log("mix: wrote %s (%.1f s)\n", written, bam_now() - t0);
done:
  for (int i = 0; i < E; i++) bam_ckpt_close(&in[i].c);
  bam_free(in);
  bam_free(b.mix);
  bam_free(b.acc);
  free(cfg_text);
  free(lineage);
  return st;
}
