#include "bam/config.h"

#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum { K_INT, K_I64, K_FLOAT, K_BOOL, K_STR } key_type;

typedef struct {
  const char *section;
  const char *key;
  key_type type;
  size_t offset;
  size_t size;   /* for strings: buffer size */
  double min, max;
  const char *help;
} key_def;

#define F(field) offsetof(bam_config, field), sizeof(((bam_config *)0)->field)
static const key_def KEYS[] = {
    {"model", "n_layers", K_INT, F(model.n_layers), 1, 1024, "transformer blocks"},
    {"model", "d_model", K_INT, F(model.d_model), 8, 65536, "residual width d"},
    {"model", "n_heads", K_INT, F(model.n_heads), 1, 1024, "attention heads"},
    {"model", "n_kv_heads", K_INT, F(model.n_kv_heads), 0, 1024,
     "key/value heads (grouped-query attention); 0 means n_heads"},
    {"model", "d_ff", K_INT, F(model.d_ff), 1, 1 << 20, "SwiGLU hidden size f"},
    {"model", "vocab_size", K_INT, F(model.vocab_size), 8, 65535, "must match the tokenizer"},
    {"model", "seq_len", K_INT, F(model.seq_len), 2, 1 << 16, "context length T"},
    {"model", "tie_embeddings", K_BOOL, F(model.tie_embeddings), 0, 1, "share wte and the head"},
    {"model", "rope_base", K_FLOAT, F(model.rope_base), 1, 1e9, "RoPE base"},
    {"model", "norm_eps", K_FLOAT, F(model.norm_eps), 1e-12, 1, "LayerNorm epsilon"},
    {"model", "init_std", K_FLOAT, F(init_std), 1e-6, 10, "std of the initial weights"},
    {"data", "dir", K_STR, F(data_dir), 0, 0, "prepared data folder (data/prepare.sh --out)"},
    {"data", "train_mix", K_STR, F(train_mix), 0, 0, "domains and weights, e.g. general:0.9,code:0.1"},
    {"data", "eval_domains", K_STR, F(eval_domains), 0, 0, "domains evaluated, comma separated"},
    {"train", "steps", K_INT, F(steps), 0, 1e9, "optimizer steps"},
    {"train", "batch_size", K_INT, F(batch_size), 1, 1 << 20, "global sequences per micro-batch"},
    {"train", "grad_accum", K_INT, F(grad_accum), 1, 1 << 16, "micro-batches per step"},
    {"train", "lr", K_FLOAT, F(lr), 0, 10, "peak learning rate"},
    {"train", "warmup_steps", K_INT, F(warmup_steps), 0, 1e9, "linear warm-up steps"},
    {"train", "min_lr_ratio", K_FLOAT, F(min_lr_ratio), 0, 1, "final lr / peak lr (cosine)"},
    {"train", "weight_decay", K_FLOAT, F(weight_decay), 0, 10, "AdamW decay (matrices only)"},
    {"train", "beta1", K_FLOAT, F(beta1), 0, 0.999999, "AdamW beta1"},
    {"train", "beta2", K_FLOAT, F(beta2), 0, 0.999999, "AdamW beta2"},
    {"train", "eps", K_FLOAT, F(adam_eps), 0, 1, "AdamW epsilon"},
    {"train", "grad_clip", K_FLOAT, F(grad_clip), 0, 1e9, "max gradient norm; 0 disables"},
    {"train", "concurrent_branches", K_INT, F(concurrent_branches), -1, 1,
     "attention and FFN branches at once on two threads: 1 on, 0 off, -1 auto (when balanced)"},
    {"train", "seed", K_I64, F(seed), 0, 9.2e18, "seeds init and data order"},
    {"train", "log_every", K_INT, F(log_every), 1, 1e9, "steps between progress lines"},
    {"eval", "every", K_INT, F(eval_every), 0, 1e9, "steps between evaluations (0: end only)"},
    {"eval", "max_tokens", K_INT, F(eval_max_tokens), 0, 1 << 30,
     "tokens per domain per evaluation (0: whole split)"},
    {"eval", "batch_size", K_INT, F(eval_batch_size), 1, 1 << 16, "sequences per eval batch, over all ranks"},
    {"mixture", "method", K_STR, F(method), 0, 0, "btx | bam | bam-shared-kv (empty: dense)"},
    {"mixture", "n_att_experts", K_INT, F(n_att_experts), 0, 256, "BAM attention experts"},
    {"mixture", "n_ffn_experts", K_INT, F(n_ffn_experts), 0, 256, "FFN experts"},
    {"mixture", "ffn_top_k", K_INT, F(ffn_top_k), 1, 256, "FFN experts per token"},
    {"mixture", "ffn_renormalize", K_BOOL, F(ffn_renormalize), 0, 1, "renormalise top-k gates (BTX's original)"},
    {"mixture", "att_top_k", K_INT, F(att_top_k), 0, 256, "0: soft attention routing; k: top-k"},
    {"mixture", "lb_coef", K_FLOAT, F(lb_coef), 0, 100, "load-balancing loss coefficient alpha"},
    {"mixture", "z_coef", K_FLOAT, F(z_coef), 0, 100, "router z-loss coefficient beta"},
    {"mixture", "lb_per_sequence", K_BOOL, F(lb_per_sequence), 0, 1, "sequence-level load balancing"},
    {"mixture", "capacity_factor", K_FLOAT, F(capacity_factor), 0, 64, "0: dropless"},
    {"mixture", "freeze_experts", K_BOOL, F(freeze_experts), 0, 1, "train routers and shared tensors only"},
    {"mixture", "ep", K_INT, F(ep), 1, 4096, "expert-parallel group size"},

    {"ckpt", "every", K_INT, F(ckpt_every), 0, 1e9, "steps between checkpoints (0: end only)"},
    {"ckpt", "keep", K_INT, F(ckpt_keep), 1, 1000, "checkpoints kept under <out_dir>/ckpt"},
    {"run", "out_dir", K_STR, F(out_dir), 0, 0, "where checkpoints and logs go"},
    /* jobs/pipeline.sh reads these from the config file; bam only validates them. */
    {"pipeline", "domains", K_STR, F(pipeline_domains), 0, 0, "expert domains, comma separated"},
    {"pipeline", "branch_steps", K_INT, F(pipeline_branch_steps), 0, 1e9,
     "steps of each domain expert (0: train.steps)"},
    {"pipeline", "mix_steps", K_INT, F(pipeline_mix_steps), 0, 1e9,
     "steps of the data-matched mixture runs (0: train.steps)"},
    {"pipeline", "eval_tokens", K_INT, F(pipeline_eval_tokens), 0, 1 << 30,
     "tokens per domain in the eval stage (0: whole split)"},
    {"pipeline", "eval_domains", K_STR, F(pipeline_eval_domains), 0, 0,
     "domains of the eval stage (empty: general, the expert domains, reference)"},
};
#undef F
#define N_KEYS (sizeof KEYS / sizeof KEYS[0])

void bam_config_defaults(bam_config *c) {
  memset(c, 0, sizeof *c);
  c->model = (bam_model_shape){.n_layers = 4, .d_model = 256, .n_heads = 4, .n_kv_heads = 0,
                               .d_ff = 683, .vocab_size = 4096, .seq_len = 256,
                               .tie_embeddings = 0, .rope_base = 10000.0f, .norm_eps = 1e-5f};
  c->init_std = 0.02f;
  bam_strlcpy(c->data_dir, "data/prepared/v4096", sizeof c->data_dir);
  bam_strlcpy(c->train_mix, "general", sizeof c->train_mix);
  bam_strlcpy(c->eval_domains, "general,code,math,legal,reference", sizeof c->eval_domains);
  c->steps = 1000;
  c->batch_size = 8;
  c->grad_accum = 1;
  c->lr = 1e-3f;
  c->warmup_steps = 100;
  c->min_lr_ratio = 0.1f;
  c->weight_decay = 0.1f;
  c->beta1 = 0.9f;
  c->beta2 = 0.95f;
  c->adam_eps = 1e-8f;
  c->grad_clip = 1.0f;
  c->seed = 1337;
  c->log_every = 10;
  c->eval_every = 0;
  c->eval_max_tokens = 65536;
  c->eval_batch_size = 8;
  c->method[0] = 0;
  c->n_att_experts = 0;
  c->n_ffn_experts = 0;
  c->ffn_top_k = 1;
  c->ffn_renormalize = 0;
  c->att_top_k = 0;
  c->lb_coef = 0.01f;
  c->z_coef = 0.001f;
  c->lb_per_sequence = 1;
  c->capacity_factor = 0;
  c->freeze_experts = 0;
  c->ep = 1;
  c->concurrent_branches = -1;
  c->ckpt_every = 0;
  c->ckpt_keep = 2;
  bam_strlcpy(c->out_dir, "runs/default", sizeof c->out_dir);
  bam_strlcpy(c->pipeline_domains, "code,math,legal", sizeof c->pipeline_domains);
  c->pipeline_branch_steps = 0;
  c->pipeline_mix_steps = 0;
  c->pipeline_eval_tokens = 131072;
  c->pipeline_eval_domains[0] = 0;
}

static const key_def *find_key(const char *section, const char *key, int *section_known) {
  *section_known = 0;
  for (size_t i = 0; i < N_KEYS; i++) {
    if (strcmp(KEYS[i].section, section) != 0) continue;
    *section_known = 1;
    if (strcmp(KEYS[i].key, key) == 0) return &KEYS[i];
  }
  return NULL;
}

/* Parse and store one value; on failure writes a message (without location) to err. */
static int apply_value(bam_config *c, const key_def *k, const char *value, char *err, size_t n) {
  char *base = (char *)c + k->offset;
  char *end = NULL;
  while (*value == ' ' || *value == '\t') value++;
  if (k->type == K_STR) {
    if (strlen(value) >= k->size) {
      snprintf(err, n, "%s.%s is longer than %zu characters", k->section, k->key, k->size - 1);
      return 0;
    }
    bam_strlcpy(base, value, k->size);
    return 1;
  }
  if (*value == 0) {
    snprintf(err, n, "%s.%s has no value", k->section, k->key);
    return 0;
  }
  double d;
  if (k->type == K_BOOL) {
    if (!strcmp(value, "true") || !strcmp(value, "1") || !strcmp(value, "yes")) d = 1;
    else if (!strcmp(value, "false") || !strcmp(value, "0") || !strcmp(value, "no")) d = 0;
    else {
      snprintf(err, n, "%s.%s must be true or false, not '%s'", k->section, k->key, value);
      return 0;
    }
    *(int *)base = (int)d;
    return 1;
  }
  errno = 0;
  if (k->type == K_FLOAT) {
    d = strtod(value, &end);
  } else {
    long long v = strtoll(value, &end, 10);
    d = (double)v;
  }
  while (end && (*end == ' ' || *end == '\t')) end++;
  if (errno || end == value || (end && *end) || !isfinite(d)) {
    snprintf(err, n, "%s.%s must be %s, not '%s'", k->section, k->key,
             k->type == K_FLOAT ? "a number" : "an integer", value);
    return 0;
  }
  if (d < k->min || d > k->max) {
    snprintf(err, n, "%s.%s = %s is out of range [%g, %g] (%s)", k->section, k->key, value,
             k->min, k->max, k->help);
    return 0;
  }
  if (k->type == K_FLOAT) *(float *)base = (float)d;
  else if (k->type == K_I64) *(int64_t *)base = (int64_t)strtoll(value, NULL, 10);
  else *(int *)base = (int)d;
  return 1;
}

typedef struct {
  bam_config *c;
  char err[512];
  int failed;
} parse_ctx;

static int on_ini_entry(void *user, const char *section, const char *name, const char *value) {
  parse_ctx *ctx = user;
  if (ctx->failed) return 1; /* report only the first error; ini_parse keeps its line */
  int section_known;
  const key_def *k = find_key(section, name, &section_known);
  if (!k) {
    if (!section_known)
      snprintf(ctx->err, sizeof ctx->err, "unknown section [%s]", section);
    else
      snprintf(ctx->err, sizeof ctx->err, "unknown key '%s' in section [%s]", name, section);
    ctx->failed = 1;
    return 0;
  }
  if (!apply_value(ctx->c, k, value, ctx->err, sizeof ctx->err)) {
    ctx->failed = 1;
    return 0;
  }
  return 1;
}

static bam_status finish_parse(parse_ctx *ctx, int rc, const char *origin) {
  if (rc == -1) BAM_FAIL(BAM_ERR_IO, "%s: cannot open config file", origin);
  if (rc == -2) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory while parsing", origin);
  if (rc > 0) {
    if (ctx->failed) BAM_FAIL(BAM_ERR_CONFIG, "%s:%d: %s", origin, rc, ctx->err);
    BAM_FAIL(BAM_ERR_CONFIG, "%s:%d: malformed line (expected 'key = value' or '[section]')",
             origin, rc);
  }
  return BAM_OK;
}

bam_status bam_config_load(bam_config *c, const char *path) {
  parse_ctx ctx = {.c = c};
  FILE *f = fopen(path, "r");
  if (!f) BAM_FAIL(BAM_ERR_IO, "%s: cannot open config file: %s", path, strerror(errno));
  int rc = ini_parse_file(f, on_ini_entry, &ctx);
  fclose(f);
  BAM_CHECK(finish_parse(&ctx, rc, path));
  return bam_config_validate(c, path);
}

bam_status bam_config_load_string(bam_config *c, const char *text, const char *origin) {
  parse_ctx ctx = {.c = c};
  int rc = ini_parse_string(text, on_ini_entry, &ctx);
  BAM_CHECK(finish_parse(&ctx, rc, origin));
  return bam_config_validate(c, origin);
}

bam_status bam_config_set(bam_config *c, const char *assignment) {
  const char *dot = strchr(assignment, '.');
  const char *eq = strchr(assignment, '=');
  if (!dot || !eq || dot > eq)
    BAM_FAIL(BAM_ERR_CONFIG, "--set %s: expected section.key=value", assignment);
  char section[64], key[64];
  size_t ls = (size_t)(dot - assignment), lk = (size_t)(eq - dot - 1);
  if (ls == 0 || lk == 0 || ls >= sizeof section || lk >= sizeof key)
    BAM_FAIL(BAM_ERR_CONFIG, "--set %s: expected section.key=value", assignment);
  memcpy(section, assignment, ls);
  section[ls] = 0;
  memcpy(key, dot + 1, lk);
  key[lk] = 0;
  int section_known;
  const key_def *k = find_key(section, key, &section_known);
  if (!k) {
    if (!section_known) BAM_FAIL(BAM_ERR_CONFIG, "--set %s: unknown section [%s]", assignment, section);
    BAM_FAIL(BAM_ERR_CONFIG, "--set %s: unknown key '%s' in section [%s]", assignment, key, section);
  }
  char err[512];
  if (!apply_value(c, k, eq + 1, err, sizeof err))
    BAM_FAIL(BAM_ERR_CONFIG, "--set: %s", err);
  return BAM_OK;
}

/* A comma-separated list of domain names ([A-Za-z0-9_.-]+), none empty or repeated; an empty
 * list is allowed only when empty_ok. Returns 0 and writes why into err otherwise. */
static int check_domain_list(const char *list, int empty_ok, char *err, size_t n) {
  if (!*list) {
    if (!empty_ok) snprintf(err, n, "is empty");
    return empty_ok;
  }
  const char *p = list;
  while (1) {
    size_t len = strcspn(p, ",");
    if (len == 0) {
      snprintf(err, n, "'%s' has an empty domain name", list);
      return 0;
    }
    for (size_t i = 0; i < len; i++) {
      char ch = p[i];
      if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
            ch == '_' || ch == '-' || ch == '.')) {
        snprintf(err, n, "'%s': domain names are letters, digits, '_', '-' and '.'", list);
        return 0;
      }
    }
    for (const char *q = list; q < p; q += strcspn(q, ",") + 1)
      if (strcspn(q, ",") == len && !strncmp(q, p, len)) {
        snprintf(err, n, "'%s' names '%.*s' twice", list, (int)len, p);
        return 0;
      }
    if (!p[len]) return 1;
    p += len + 1;
  }
}

bam_status bam_config_validate(const bam_config *c, const char *origin) {
  bam_model_shape s = c->model;
  if (s.n_kv_heads == 0) s.n_kv_heads = s.n_heads;
  if (s.d_model % s.n_heads)
    BAM_FAIL(BAM_ERR_CONFIG, "%s: model.d_model (%d) must be divisible by model.n_heads (%d)",
             origin, s.d_model, s.n_heads);
  if ((s.d_model / s.n_heads) % 2)
    BAM_FAIL(BAM_ERR_CONFIG, "%s: head size d_model/n_heads = %d must be even for RoPE", origin,
             s.d_model / s.n_heads);
  if (s.n_heads % s.n_kv_heads)
    BAM_FAIL(BAM_ERR_CONFIG, "%s: model.n_heads (%d) must be divisible by model.n_kv_heads (%d)",
             origin, s.n_heads, s.n_kv_heads);
  if (c->warmup_steps > c->steps && c->steps > 0)
    BAM_FAIL(BAM_ERR_CONFIG, "%s: train.warmup_steps (%d) exceeds train.steps (%d)", origin,
             c->warmup_steps, c->steps);
  if (!c->data_dir[0]) BAM_FAIL(BAM_ERR_CONFIG, "%s: data.dir is empty", origin);
  if (!c->train_mix[0]) BAM_FAIL(BAM_ERR_CONFIG, "%s: data.train_mix is empty", origin);
  if (!c->out_dir[0]) BAM_FAIL(BAM_ERR_CONFIG, "%s: run.out_dir is empty", origin);
  char err[300];
  if (!check_domain_list(c->pipeline_domains, 0, err, sizeof err))
    BAM_FAIL(BAM_ERR_CONFIG, "%s: pipeline.domains %s", origin, err);
  if (!check_domain_list(c->pipeline_eval_domains, 1, err, sizeof err))
    BAM_FAIL(BAM_ERR_CONFIG, "%s: pipeline.eval_domains %s", origin, err);
  return BAM_OK;
}

void bam_config_write(const bam_config *c, FILE *f) {
  const char *section = "";
  for (size_t i = 0; i < N_KEYS; i++) {
    const key_def *k = &KEYS[i];
    const char *base = (const char *)c + k->offset;
    if (!strcmp(k->section, "pipeline")) continue; /* not a training setting */
    if (strcmp(section, k->section)) {
      fprintf(f, "%s[%s]\n", i ? "\n" : "", k->section);
      section = k->section;
    }
    switch (k->type) {
    case K_INT: fprintf(f, "%s = %d\n", k->key, *(const int *)base); break;
    case K_I64: fprintf(f, "%s = %lld\n", k->key, (long long)*(const int64_t *)base); break;
    case K_BOOL: fprintf(f, "%s = %s\n", k->key, *(const int *)base ? "true" : "false"); break;
    case K_FLOAT: fprintf(f, "%s = %.9g\n", k->key, (double)*(const float *)base); break;
    case K_STR: fprintf(f, "%s = %s\n", k->key, base); break;
    }
  }
}

char *bam_config_to_string(const bam_config *c) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  if (!f) return NULL;
  bam_config_write(c, f);
  fclose(f);
  return buf;
}

bam_model_shape bam_config_shape(const bam_config *c) {
  bam_model_shape s = c->model;
  if (s.n_kv_heads == 0) s.n_kv_heads = s.n_heads;
  return s;
}
