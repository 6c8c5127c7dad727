/* report: read a pipeline run folder (jobs/pipeline.sh) into an rp_run.
 *
 * Stage folders: seed/, experts/<domain>/ (experts/DONE names the domains), mix-<method>/,
 * train-<method>-<dm|cm>/ (optional: absent ones are reported as absent), eval/ (DONE,
 * <model>.txt, <model>.routing.csv). Steps, tokens and the config (hence the forward FLOPs per
 * token) come from each stage's checkpoint through the checkpoint API, the training curves from
 * metrics.csv and eval.csv, the final results from eval/. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bam/config.h"
#include "bam/mixture.h"
#include "bam/shard.h"
#include "bam/upcycle.h" /* bam_mixture_shape_from_config */
#include "internal.h"

static const char *const METHODS[] = {"btx", "bam", "bam-shared-kv"};
static const char *const BUDGETS[] = {"dm", "cm"};

void rp_run_free(rp_run *run) {
  for (int i = 0; i < run->n_models; i++) {
    rp_model *m = &run->m[i];
    free(m->name), free(m->method), free(m->matching), free(m->dir);
    free(m->ppl), free(m->bpb), free(m->loss);
    free(m->train), free(m->valid), free(m->ffn), free(m->att);
    if (m->expert_label) {
      int E = m->Ef > m->Ea ? m->Ef : m->Ea;
      for (int e = 0; e < E; e++) free(m->expert_label[e]);
      free(m->expert_label);
    }
  }
  free(run->m);
  for (int i = 0; i < run->n_dom; i++) free(run->dom[i]);
  free(run->dom);
  for (int i = 0; i < run->n_vdom; i++) free(run->vdom[i]);
  free(run->vdom);
  free(run->run_dir), free(run->run_name);
  *run = (rp_run){0};
}

double rp_avg(const rp_model *m, const double *v, int n_avg) {
  (void)m;
  double s = 0;
  for (int i = 0; i < n_avg; i++) s += v[i];
  return s / n_avg;
}

/* ---- string lists ---- */
static int list_find(char *const *list, int n, const char *s) {
  for (int i = 0; i < n; i++)
    if (!strcmp(list[i], s)) return i;
  return -1;
}

static bam_status list_add(char ***list, int *n, const char *s) {
  char **l = realloc(*list, (size_t)(*n + 1) * sizeof *l);
  if (!l) BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory");
  *list = l;
  l[*n] = NULL;
  BAM_CHECK(rp_strdup(&l[*n], s));
  (*n)++;
  return BAM_OK;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* ---- "key = value" text (DONE markers, checkpoint lineage) ---- */
/* 1 and a malloc'd copy of the value of the first line "key = value" (blanks around both
 * trimmed); 0 if there is none; -1 if out of memory. */
static int kv_get(const char *text, const char *key, char **out) {
  const size_t klen = strlen(key);
  for (const char *line = text ? text : ""; *line;) {
    const char *end = strchr(line, '\n');
    if (!end) end = line + strlen(line);
    const char *p = line;
    while (p < end && (*p == ' ' || *p == '\t')) p++;
    const char *eq = memchr(p, '=', (size_t)(end - p));
    if (eq && *p != '#') {
      const char *ke = eq;
      while (ke > p && (ke[-1] == ' ' || ke[-1] == '\t')) ke--;
      if ((size_t)(ke - p) == klen && !memcmp(p, key, klen)) {
        const char *v = eq + 1, *ve = end;
        while (v < ve && (*v == ' ' || *v == '\t')) v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t' || ve[-1] == '\r')) ve--;
        if (rp_fmt(out, "%.*s", (int)(ve - v), v) != BAM_OK) return -1;
        return 1;
      }
    }
    line = *end ? end + 1 : end;
  }
  return 0;
}

/* ---- a stage folder: it exists and holds what a finished stage leaves ---- */
static bam_status check_stage(const char *label, const char *dir, int need_done, int need_logs) {
  if (!rp_is_dir(dir))
    BAM_FAIL(BAM_ERR_IO, "report: stage %s is missing: %s does not exist (has the pipeline run it?)",
             label, dir);
  static const char *const LOGS[] = {"metrics.csv", "eval.csv"};
  char *p = NULL;
  bam_status st = BAM_OK;
  if (need_done) {
    BAM_CHECK_GOTO(st, rp_fmt(&p, "%s/DONE", dir), out);
    if (!rp_exists(p)) {
      st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__,
                         "report: stage %s is incomplete: %s is missing (the stage has not finished)",
                         label, p);
      goto out;
    }
  }
  BAM_CHECK_GOTO(st, rp_fmt(&p, "%s/ckpt", dir), out);
  if (!rp_is_dir(p)) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__,
                       "report: stage %s is incomplete: its checkpoint folder %s is missing", label, p);
    goto out;
  }
  for (int i = 0; need_logs && i < 2; i++) {
    BAM_CHECK_GOTO(st, rp_fmt(&p, "%s/%s", dir, LOGS[i]), out);
    if (!rp_exists(p)) {
      st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "report: stage %s is incomplete: %s is missing",
                         label, p);
      goto out;
    }
  }
out:
  free(p);
  return st;
}

/* ---- checkpoint facts: step, tokens, forward FLOPs per token, kind, model dimensions ---- */
typedef struct {
  int64_t step, tokens;
  double fpt;
  char kind[32];
  int n_layers, n_ffn, n_att; /* n_ffn = n_att = 0 for a dense model */
  char *lineage;
} ckpt_facts;

static bam_status read_ckpt(const char *dir, ckpt_facts *f) {
  char *path = NULL;
  BAM_CHECK(rp_fmt(&path, "%s/ckpt", dir));
  bam_ckpt *c = NULL;
  bam_status st = bam_ckpt_open(&c, path);
  if (st != BAM_OK) {
    free(path);
    bam_error_trace(__FILE__, __LINE__, "bam_ckpt_open");
    return st;
  }
  const bam_ckpt_info *info = bam_ckpt_get_info(c);
  f->step = info->step;
  f->tokens = info->tokens_seen;
  bam_strlcpy(f->kind, info->kind, sizeof f->kind);
  f->lineage = NULL;
  bam_config cfg;
  bam_config_defaults(&cfg);
  char *origin = NULL;
  BAM_CHECK_GOTO(st, rp_fmt(&origin, "%s (stored config)", bam_ckpt_path(c)), out);
  BAM_CHECK_GOTO(st, bam_config_load_string(&cfg, info->config_text ? info->config_text : "", origin), out);
  BAM_CHECK_GOTO(st, rp_strdup(&f->lineage, info->lineage_text ? info->lineage_text : ""), out);
  f->n_layers = cfg.model.n_layers;
  if (!cfg.method[0]) {
    bam_model_shape s = bam_config_shape(&cfg);
    f->fpt = bam_model_flops_per_token(&s, s.seq_len);
    f->n_ffn = f->n_att = 0;
  } else {
    bam_mixture_shape s;
    BAM_CHECK_GOTO(st, bam_mixture_shape_from_config(&cfg, &s), out);
    f->fpt = bam_mixture_flops_per_token(&s, s.base.seq_len);
    f->n_ffn = s.n_ffn_experts;
    f->n_att = s.method == BAM_METHOD_BTX ? 0 : s.n_att_experts;
  }
out:
  bam_ckpt_close(&c);
  free(origin);
  free(path);
  if (st != BAM_OK) {
    free(f->lineage);
    f->lineage = NULL;
  }
  return st;
}

/* ---- CSV with a header: columns found by name, every row the header's width ---- */
typedef struct {
  char *path, *text;
  rp_lines it;
  int ncols;
  char **fields; /* ncols + 1 */
  int lineno;    /* of the current row */
} csv_file;

static void csv_close(csv_file *c) {
  free(c->path), free(c->text), free(c->fields);
  *c = (csv_file){0};
}

static bam_status csv_open(csv_file *c, const char *path, const char *const *want, int n_want, int *col) {
  *c = (csv_file){0};
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, rp_strdup(&c->path, path), fail);
  BAM_CHECK_GOTO(st, rp_read_file(path, &c->text, NULL), fail);
  c->it.p = c->text;
  char *hdr;
  if (!rp_next_line(&c->it, &hdr) || !*hdr) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:1: empty (no CSV header)", path);
    goto fail;
  }
  int n_all = 1;
  for (const char *p = hdr; *p; p++) n_all += *p == ',';
  c->ncols = n_all;
  c->fields = calloc((size_t)n_all + 1, sizeof *c->fields);
  if (!c->fields) {
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", path);
    goto fail;
  }
  rp_split(hdr, ',', c->fields, n_all + 1, NULL);
  for (int w = 0; w < n_want; w++) {
    col[w] = -1;
    for (int i = 0; i < n_all; i++)
      if (!strcmp(c->fields[i], want[w])) col[w] = i;
    if (col[w] < 0) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:1: the header has no column '%s'", path,
                         want[w]);
      goto fail;
    }
  }
  return BAM_OK;
fail:
  csv_close(c);
  return st;
}

/* Next non-empty row (*more = 0 at the end); its fields in c->fields. */
static bam_status csv_row(csv_file *c, int *more) {
  char *line;
  for (;;) {
    if (!rp_next_line(&c->it, &line)) {
      *more = 0;
      return BAM_OK;
    }
    if (*line) break;
  }
  c->lineno = c->it.lineno;
  int n_all = 0;
  rp_split(line, ',', c->fields, c->ncols + 1, &n_all);
  if (n_all != c->ncols)
    BAM_FAIL(BAM_ERR_DATA, "%s:%d: %d field%s where the header has %d", c->path, c->lineno, n_all,
             n_all == 1 ? "" : "s", c->ncols);
  *more = 1;
  return BAM_OK;
}

static bam_status csv_double(const csv_file *c, int col, const char *name, double *out) {
  if (!rp_parse_double(c->fields[col], out))
    BAM_FAIL(BAM_ERR_DATA, "%s:%d: %s '%s' is not a finite number", c->path, c->lineno, name, c->fields[col]);
  return BAM_OK;
}

static bam_status csv_i64(const csv_file *c, int col, const char *name, int64_t *out) {
  if (!rp_parse_i64(c->fields[col], out) || *out < 0)
    BAM_FAIL(BAM_ERR_DATA, "%s:%d: %s '%s' is not a non-negative integer", c->path, c->lineno, name,
             c->fields[col]);
  return BAM_OK;
}

/* metrics.csv: the training curve (tokens, loss); the last row must agree with the checkpoint. */
static bam_status read_metrics(rp_model *m, const ckpt_facts *f) {
  static const char *const WANT[] = {"step", "tokens", "loss"};
  int col[3];
  char *path = NULL;
  BAM_CHECK(rp_fmt(&path, "%s/metrics.csv", m->dir));
  csv_file c;
  bam_status st = csv_open(&c, path, WANT, 3, col);
  free(path);
  BAM_CHECK(st);
  int cap = 0, more = 1;
  int64_t last_step = -1, last_tokens = 0;
  int last_line = 0;
  for (;;) {
    BAM_CHECK_GOTO(st, csv_row(&c, &more), out);
    if (!more) break;
    int64_t step, tokens;
    double loss;
    BAM_CHECK_GOTO(st, csv_i64(&c, col[0], "step", &step), out);
    BAM_CHECK_GOTO(st, csv_i64(&c, col[1], "tokens", &tokens), out);
    BAM_CHECK_GOTO(st, csv_double(&c, col[2], "loss", &loss), out);
    if (step <= last_step) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:%d: step %lld after step %lld", c.path,
                         c.lineno, (long long)step, (long long)last_step);
      goto out;
    }
    if (m->n_train == cap) {
      cap = cap ? 2 * cap : 64;
      rp_point *p = realloc(m->train, (size_t)cap * sizeof *p);
      if (!p) {
        st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", c.path);
        goto out;
      }
      m->train = p;
    }
    m->train[m->n_train++] = (rp_point){(double)tokens, loss};
    last_step = step, last_tokens = tokens, last_line = c.lineno;
  }
  if (!m->n_train) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: no training step logged (only a header)",
                       c.path);
  } else if (last_step > f->step) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s:%d: step %lld is beyond the stage's checkpoint (step %lld)", c.path, last_line,
                       (long long)last_step, (long long)f->step);
  } else if (last_step == f->step && last_tokens != f->tokens) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s:%d: %lld tokens at step %lld, but the checkpoint says %lld", c.path,
                       last_line, (long long)last_tokens, (long long)last_step, (long long)f->tokens);
  }
out:
  csv_close(&c);
  return st;
}

/* eval.csv: validation losses during the stage (step, domain, loss). */
static bam_status read_valid(rp_run *run, rp_model *m) {
  static const char *const WANT[] = {"step", "domain", "loss"};
  int col[3];
  char *path = NULL;
  BAM_CHECK(rp_fmt(&path, "%s/eval.csv", m->dir));
  csv_file c;
  bam_status st = csv_open(&c, path, WANT, 3, col);
  free(path);
  BAM_CHECK(st);
  int cap = 0, more = 1;
  for (;;) {
    BAM_CHECK_GOTO(st, csv_row(&c, &more), out);
    if (!more) break;
    int64_t step;
    double loss;
    BAM_CHECK_GOTO(st, csv_i64(&c, col[0], "step", &step), out);
    BAM_CHECK_GOTO(st, csv_double(&c, col[2], "loss", &loss), out);
    const char *d = c.fields[col[1]];
    if (!*d) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:%d: empty domain", c.path, c.lineno);
      goto out;
    }
    int di = list_find(run->vdom, run->n_vdom, d);
    if (di < 0) {
      BAM_CHECK_GOTO(st, list_add(&run->vdom, &run->n_vdom, d), out);
      di = run->n_vdom - 1;
    }
    if (m->n_valid == cap) {
      cap = cap ? 2 * cap : 64;
      rp_valid *p = realloc(m->valid, (size_t)cap * sizeof *p);
      if (!p) {
        st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", c.path);
        goto out;
      }
      m->valid = p;
    }
    m->valid[m->n_valid++] = (rp_valid){step, di, loss};
  }
out:
  csv_close(&c);
  return st;
}

/* summary.json (optional): the median tokens/s. */
static void read_summary(rp_model *m) {
  m->tokens_per_s = NAN;
  char *path = NULL, *text = NULL;
  if (rp_fmt(&path, "%s/summary.json", m->dir) != BAM_OK) return;
  if (rp_exists(path) && rp_read_file(path, &text, NULL) == BAM_OK) {
    const char *k = strstr(text, "\"tokens_per_s\":");
    if (k) {
      char *end;
      double v = strtod(k + strlen("\"tokens_per_s\":"), &end);
      if (end != k + strlen("\"tokens_per_s\":") && isfinite(v)) m->tokens_per_s = v;
    }
  } else {
    bam_error_clear();
  }
  free(text);
  free(path);
}

/* The results table of `bam eval` (eval/<model>.txt):
 *   domain  tokens  loss  perplexity  bits/B  [unigram-loss]
 *   general   1024  5.8459   345.81   3.6169   5.6423
 *   ...
 *   average         ...                       (the table ends here, or at a blank line)   */
typedef struct {
  char **dom;
  double *loss, *ppl, *bpb;
  int n, cap;
} eval_table;

static void eval_table_free(eval_table *t) {
  for (int i = 0; i < t->n; i++) free(t->dom[i]);
  free(t->dom), free(t->loss), free(t->ppl), free(t->bpb);
  *t = (eval_table){0};
}

static bam_status read_eval_table(const char *path, eval_table *t) {
  *t = (eval_table){0};
  char *text = NULL;
  BAM_CHECK(rp_read_file(path, &text, NULL));
  rp_lines it = {.p = text};
  char *line;
  char *f[16];
  int ncols = 0, c_loss = -1, c_ppl = -1, c_bpb = -1, in_table = 0;
  bam_status st = BAM_OK;
  while (rp_next_line(&it, &line)) {
    int n_all = 0;
    if (!in_table) {
      int n = rp_split(line, ' ', f, 16, &n_all);
      if (n < 1 || strcmp(f[0], "domain")) continue;
      for (int i = 0; i < n; i++) {
        if (!strcmp(f[i], "loss")) c_loss = i;
        if (!strcmp(f[i], "perplexity")) c_ppl = i;
        if (!strcmp(f[i], "bits/B")) c_bpb = i;
      }
      if (c_loss < 0 || c_ppl < 0 || c_bpb < 0 || n_all > 16) {
        st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                           "%s:%d: a results header needs the columns loss, perplexity and bits/B",
                           path, it.lineno);
        goto out;
      }
      ncols = n_all;
      in_table = 1;
      continue;
    }
    int n = rp_split(line, ' ', f, 16, &n_all);
    if (n == 0 || !strcmp(f[0], "average") || !strcmp(f[0], "routing")) break;
    if (n_all != ncols) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:%d: %d fields where the header has %d",
                         path, it.lineno, n_all, ncols);
      goto out;
    }
    double loss, ppl, bpb;
    const char *bad = !rp_parse_double(f[c_loss], &loss) ? "loss"
                      : !rp_parse_double(f[c_ppl], &ppl) ? "perplexity"
                      : !rp_parse_double(f[c_bpb], &bpb) ? "bits/B" : NULL;
    if (bad) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:%d: the %s of '%s' is not a finite number",
                         path, it.lineno, bad, f[0]);
      goto out;
    }
    for (int i = 0; i < t->n; i++)
      if (!strcmp(t->dom[i], f[0])) {
        st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:%d: a second row for domain '%s'",
                           path, it.lineno, f[0]);
        goto out;
      }
    if (t->n == t->cap) {
      t->cap = t->cap ? 2 * t->cap : 8;
      char **d = realloc(t->dom, (size_t)t->cap * sizeof *d);
      if (d) t->dom = d;
      double *a = d ? realloc(t->loss, (size_t)t->cap * sizeof *a) : NULL;
      if (a) t->loss = a;
      double *b = a ? realloc(t->ppl, (size_t)t->cap * sizeof *b) : NULL;
      if (b) t->ppl = b;
      double *c = b ? realloc(t->bpb, (size_t)t->cap * sizeof *c) : NULL;
      if (c) t->bpb = c;
      if (!c) {
        st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", path);
        goto out;
      }
    }
    t->dom[t->n] = NULL;
    BAM_CHECK_GOTO(st, rp_strdup(&t->dom[t->n], f[0]), out);
    t->loss[t->n] = loss, t->ppl[t->n] = ppl, t->bpb[t->n] = bpb;
    t->n++;
  }
  if (!in_table)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: no results table (a line 'domain tokens loss perplexity bits/B')", path);
  else if (!t->n)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: the results table has no rows", path);
out:
  free(text);
  if (st != BAM_OK) eval_table_free(t);
  return st;
}

static bam_status model_results(const rp_run *run, rp_model *m, const eval_table *t, const char *path) {
  m->ppl = calloc((size_t)run->n_dom, sizeof *m->ppl);
  m->bpb = calloc((size_t)run->n_dom, sizeof *m->bpb);
  m->loss = calloc((size_t)run->n_dom, sizeof *m->loss);
  if (!m->ppl || !m->bpb || !m->loss) BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory");
  for (int d = 0; d < run->n_dom; d++) {
    int i = list_find(t->dom, t->n, run->dom[d]);
    if (i < 0)
      BAM_FAIL(BAM_ERR_DATA, "%s: no result for domain '%s' (the other models were evaluated on it)",
               path, run->dom[d]);
    m->ppl[d] = t->ppl[i], m->bpb[d] = t->bpb[i], m->loss[d] = t->loss[i];
  }
  return BAM_OK;
}

/* eval/<model>.routing.csv: domain,layer,router,expert,value. */
static bam_status read_routing(const rp_run *run, rp_model *m, const ckpt_facts *f) {
  static const char *const WANT[] = {"domain", "layer", "router", "expert", "value"};
  int col[5];
  char *path = NULL;
  BAM_CHECK(rp_fmt(&path, "%s/eval/%s.routing.csv", run->run_dir, m->name));
  bam_status st = BAM_OK;
  csv_file c = {0};
  if (!rp_exists(path)) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__,
                       "report: stage eval is incomplete: %s is missing (the routing of mixture %s)",
                       path, m->name);
    goto out;
  }
  BAM_CHECK_GOTO(st, csv_open(&c, path, WANT, 5, col), out);
  m->L = f->n_layers, m->Ef = f->n_ffn, m->Ea = f->n_att;
  const size_t n_ffn = (size_t)run->n_dom * m->L * m->Ef, n_att = (size_t)run->n_dom * m->L * m->Ea;
  m->ffn = malloc((n_ffn ? n_ffn : 1) * sizeof *m->ffn);
  m->att = malloc((n_att ? n_att : 1) * sizeof *m->att);
  if (!m->ffn || !m->att) {
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", path);
    goto out;
  }
  for (size_t i = 0; i < n_ffn; i++) m->ffn[i] = NAN;
  for (size_t i = 0; i < n_att; i++) m->att[i] = NAN;
  int more = 1;
  for (;;) {
    BAM_CHECK_GOTO(st, csv_row(&c, &more), out);
    if (!more) break;
    const char *router = c.fields[col[2]];
    int is_ffn = !strcmp(router, "ffn"), is_att = !strcmp(router, "att");
    if (!is_ffn && !is_att) {
      if (strcmp(router, "ffn_entropy") && strcmp(router, "att_entropy")) {
        st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                           "%s:%d: unknown router '%s' (ffn, att, ffn_entropy, att_entropy)", path,
                           c.lineno, router);
        goto out;
      }
      continue;
    }
    int d = list_find(run->dom, run->n_dom, c.fields[col[0]]);
    if (d < 0) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:%d: domain '%s' is not among the evaluated ones",
                         path, c.lineno, c.fields[col[0]]);
      goto out;
    }
    int64_t layer, expert;
    double v;
    BAM_CHECK_GOTO(st, csv_i64(&c, col[1], "layer", &layer), out);
    BAM_CHECK_GOTO(st, csv_i64(&c, col[3], "expert", &expert), out);
    BAM_CHECK_GOTO(st, csv_double(&c, col[4], "value", &v), out);
    const int E = is_ffn ? m->Ef : m->Ea;
    if (layer >= m->L || expert >= E) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s:%d: layer %lld, %s expert %lld, but the checkpoint of %s has %d layers and "
                         "%d %s experts", path, c.lineno, (long long)layer, router, (long long)expert,
                         m->name, m->L, E, router);
      goto out;
    }
    if (v < 0 || v > 1 + 1e-6) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s:%d: a %s value of %g is outside [0, 1]",
                         path, c.lineno, is_ffn ? "share" : "gate", v);
      goto out;
    }
    (is_ffn ? m->ffn : m->att)[((size_t)d * m->L + (size_t)layer) * (size_t)E + (size_t)expert] = v;
  }
  for (int d = 0; d < run->n_dom; d++)
    for (int l = 0; l < m->L; l++) {
      for (int e = 0; e < m->Ef; e++)
        if (isnan(m->ffn[((size_t)d * m->L + l) * m->Ef + e])) {
          st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                             "%s: no ffn share for domain '%s', layer %d, expert %d", path, run->dom[d],
                             l, e);
          goto out;
        }
      for (int e = 0; e < m->Ea; e++)
        if (isnan(m->att[((size_t)d * m->L + l) * m->Ea + e])) {
          st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                             "%s: no att gate for domain '%s', layer %d, expert %d", path, run->dom[d],
                             l, e);
          goto out;
        }
    }
out:
  csv_close(&c);
  free(path);
  return st;
}

/* Expert labels of a mixture: 0 = the seed, i = the domain of expert.i in the lineage of the
 * mixture as made by `bam mix` (mix-<method>/ckpt), further FFN experts are seed copies. */
static bam_status expert_labels(rp_model *m, const char *mix_lineage) {
  const int E = m->Ef > m->Ea ? m->Ef : m->Ea;
  m->expert_label = calloc((size_t)(E ? E : 1), sizeof *m->expert_label);
  if (!m->expert_label) BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory");
  for (int e = 0; e < E; e++) {
    char key[64];
    snprintf(key, sizeof key, "expert.%d.domain", e);
    int got = e == 0 ? 0 : kv_get(mix_lineage, key, &m->expert_label[e]);
    if (got < 0) BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory");
    if (e == 0) BAM_CHECK(rp_strdup(&m->expert_label[e], "seed"));
    else if (!got) BAM_CHECK(rp_strdup(&m->expert_label[e], "seed copy"));
  }
  return BAM_OK;
}

/* Everything about one present model. */
static bam_status load_model(rp_run *run, rp_model *m, const char *mix_dir) {
  ckpt_facts f = {0};
  BAM_CHECK(read_ckpt(m->dir, &f));
  bam_status st = BAM_OK;
  char *path = NULL;
  eval_table t = {0};
  const char *want_kind = m->kind == RP_MIXTURE ? m->method : "dense";
  if (strcmp(f.kind, want_kind)) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s/ckpt holds a '%s' checkpoint, expected '%s'",
                       m->dir, f.kind, want_kind);
    goto out;
  }
  m->steps = f.step, m->tokens = f.tokens, m->fpt = f.fpt;
  m->flops = 3.0 * f.fpt * (double)f.tokens;
  BAM_CHECK_GOTO(st, read_metrics(m, &f), out);
  BAM_CHECK_GOTO(st, read_valid(run, m), out);
  read_summary(m);
  BAM_CHECK_GOTO(st, rp_fmt(&path, "%s/eval/%s.txt", run->run_dir, m->name), out);
  if (!rp_exists(path)) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__,
                       "report: stage eval is incomplete: %s is missing (the evaluation of %s)", path,
                       m->name);
    goto out;
  }
  BAM_CHECK_GOTO(st, read_eval_table(path, &t), out);
  BAM_CHECK_GOTO(st, model_results(run, m, &t, path), out);
  if (m->kind == RP_MIXTURE) {
    BAM_CHECK_GOTO(st, read_routing(run, m, &f), out);
    ckpt_facts mf = {0};
    BAM_CHECK_GOTO(st, read_ckpt(mix_dir, &mf), out);
    st = expert_labels(m, mf.lineage);
    free(mf.lineage);
    if (st != BAM_OK) goto out;
  }
out:
  eval_table_free(&t);
  free(path);
  free(f.lineage);
  return st;
}

static bam_status add_model(rp_run *run, const char *name, rp_kind kind, const char *method,
                            const char *matching, const char *dir, int present) {
  rp_model *m = realloc(run->m, (size_t)(run->n_models + 1) * sizeof *m);
  if (!m) BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory");
  run->m = m;
  m = &run->m[run->n_models++];
  *m = (rp_model){.kind = kind, .present = present, .tokens_per_s = NAN};
  BAM_CHECK(rp_strdup(&m->name, name));
  BAM_CHECK(rp_strdup(&m->method, method));
  BAM_CHECK(rp_strdup(&m->matching, matching));
  BAM_CHECK(rp_strdup(&m->dir, dir));
  return BAM_OK;
}

/* Result columns: general, the experts' domains sorted, then the other evaluated domains
 * (held out: the reference domain) in the order the seed's evaluation lists them. */
static bam_status domain_columns(rp_run *run, char **experts, int n_experts) {
  char *path = NULL;
  BAM_CHECK(rp_fmt(&path, "%s/eval/seed.txt", run->run_dir));
  bam_status st = BAM_OK;
  eval_table t = {0};
  if (!rp_exists(path)) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__,
                       "report: stage eval is incomplete: %s is missing (the evaluation of seed)", path);
    goto out;
  }
  BAM_CHECK_GOTO(st, read_eval_table(path, &t), out);
  if (list_find(t.dom, t.n, "general") < 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: no result for domain 'general'", path);
    goto out;
  }
  BAM_CHECK_GOTO(st, list_add(&run->dom, &run->n_dom, "general"), out);
  for (int i = 0; i < n_experts; i++) {
    if (list_find(t.dom, t.n, experts[i]) < 0) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s: no result for domain '%s' (an expert's domain)", path, experts[i]);
      goto out;
    }
    if (list_find(run->dom, run->n_dom, experts[i]) < 0)
      BAM_CHECK_GOTO(st, list_add(&run->dom, &run->n_dom, experts[i]), out);
  }
  run->n_avg = run->n_dom;
  for (int i = 0; i < t.n; i++)
    if (list_find(run->dom, run->n_dom, t.dom[i]) < 0)
      BAM_CHECK_GOTO(st, list_add(&run->dom, &run->n_dom, t.dom[i]), out);
out:
  eval_table_free(&t);
  free(path);
  return st;
}

/* Validation domains in column order, then any others alphabetically. */
static bam_status order_vdom(rp_run *run) {
  const int n = run->n_vdom;
  if (!n) return BAM_OK;
  int *rank = malloc((size_t)n * sizeof *rank), *perm = malloc((size_t)n * sizeof *perm);
  char **sorted = malloc((size_t)n * sizeof *sorted);
  if (!rank || !perm || !sorted) {
    free(rank), free(perm), free(sorted);
    BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory");
  }
  for (int i = 0; i < n; i++) perm[i] = i;
  /* insertion sort by (column index or n_dom + alphabetical) */
  for (int i = 1; i < n; i++) {
    int x = perm[i], j = i - 1;
    for (; j >= 0; j--) {
      int ca = list_find(run->dom, run->n_dom, run->vdom[perm[j]]);
      int cb = list_find(run->dom, run->n_dom, run->vdom[x]);
      int before;
      if (ca >= 0 && cb >= 0) before = cb < ca;
      else if (ca >= 0 || cb >= 0) before = cb >= 0;
      else before = strcmp(run->vdom[x], run->vdom[perm[j]]) < 0;
      if (!before) break;
      perm[j + 1] = perm[j];
    }
    perm[j + 1] = x;
  }
  for (int i = 0; i < n; i++) sorted[i] = run->vdom[perm[i]], rank[perm[i]] = i;
  for (int i = 0; i < run->n_models; i++)
    for (int k = 0; k < run->m[i].n_valid; k++) run->m[i].valid[k].domain = rank[run->m[i].valid[k].domain];
  free(run->vdom);
  run->vdom = sorted;
  free(rank), free(perm);
  return BAM_OK;
}

static bam_status collect(rp_run *run, const char *run_dir, char ***experts, int *n_experts, char **tmp) {
  if (!rp_exists(run_dir)) BAM_FAIL(BAM_ERR_IO, "report: run folder %s does not exist", run_dir);
  if (!rp_is_dir(run_dir)) BAM_FAIL(BAM_ERR_IO, "report: %s is not a folder", run_dir);
  BAM_CHECK(rp_strdup(&run->run_dir, run_dir));
  size_t n = strlen(run->run_dir);
  while (n > 1 && run->run_dir[n - 1] == '/') run->run_dir[--n] = 0;
  const char *base = strrchr(run->run_dir, '/');
  BAM_CHECK(rp_strdup(&run->run_name, base && base[1] ? base + 1 : run->run_dir));
  const char *R = run->run_dir;

  /* The required stages: seed, branch (experts/DONE names the domains), eval. */
  BAM_CHECK(rp_fmt(tmp, "%s/seed", R));
  BAM_CHECK(check_stage("seed", *tmp, 1, 1));
  BAM_CHECK(rp_fmt(tmp, "%s/experts", R));
  if (!rp_is_dir(*tmp))
    BAM_FAIL(BAM_ERR_IO, "report: stage branch is missing: %s does not exist (has the pipeline run it?)", *tmp);
  BAM_CHECK(rp_fmt(tmp, "%s/experts/DONE", R));
  if (!rp_exists(*tmp))
    BAM_FAIL(BAM_ERR_IO, "report: stage branch is incomplete: %s is missing (the stage has not finished)", *tmp);
  char *done = NULL, *domains = NULL;
  BAM_CHECK(rp_read_file(*tmp, &done, NULL));
  int got = kv_get(done, "domains", &domains);
  free(done);
  if (got < 0) BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory");
  if (got == 0 || !*domains) {
    free(domains);
    BAM_FAIL(BAM_ERR_DATA, "%s: no 'domains = a,b,...' line", *tmp);
  }
  bam_status st = BAM_OK;
  for (char *p = domains;;) {
    char *comma = strchr(p, ',');
    if (comma) *comma = 0;
    if (*p && list_find(*experts, *n_experts, p) < 0) BAM_CHECK_GOTO(st, list_add(experts, n_experts, p), bad_dom);
    if (!comma) break;
    p = comma + 1;
  }
bad_dom:
  free(domains);
  BAM_CHECK(st);
  if (!*n_experts) BAM_FAIL(BAM_ERR_DATA, "%s: the domains line lists no domain", *tmp);
  qsort(*experts, (size_t)*n_experts, sizeof **experts, cmp_str);
  for (int i = 0; i < *n_experts; i++) {
    char *label = NULL;
    BAM_CHECK(rp_fmt(&label, "branch (expert %s)", (*experts)[i]));
    st = rp_fmt(tmp, "%s/experts/%s", R, (*experts)[i]);
    if (st == BAM_OK) st = check_stage(label, *tmp, 0, 1);
    free(label);
    BAM_CHECK(st);
  }
  BAM_CHECK(rp_fmt(tmp, "%s/eval", R));
  if (!rp_is_dir(*tmp))
    BAM_FAIL(BAM_ERR_IO, "report: stage eval is missing: %s does not exist (has the pipeline run it?)", *tmp);
  BAM_CHECK(rp_fmt(tmp, "%s/eval/DONE", R));
  if (!rp_exists(*tmp))
    BAM_FAIL(BAM_ERR_IO, "report: stage eval is incomplete: %s is missing (the stage has not finished)", *tmp);
  run->eval_max_tokens = -1;
  {
    char *text = NULL, *v = NULL;
    BAM_CHECK(rp_read_file(*tmp, &text, NULL));
    if (kv_get(text, "max_tokens", &v) > 0) {
      int64_t x;
      if (rp_parse_i64(v, &x)) run->eval_max_tokens = x;
    }
    free(v);
    free(text);
  }
  BAM_CHECK(domain_columns(run, *experts, *n_experts));

  /* The models, in the table's order. */
  BAM_CHECK(rp_fmt(tmp, "%s/seed", R));
  BAM_CHECK(add_model(run, "seed", RP_SEED, "dense", "", *tmp, 1));
  for (int i = 0; i < *n_experts; i++) {
    char *name = NULL;
    BAM_CHECK(rp_fmt(&name, "expert-%s", (*experts)[i]));
    st = rp_fmt(tmp, "%s/experts/%s", R, (*experts)[i]);
    if (st == BAM_OK) st = add_model(run, name, RP_EXPERT, "dense", "", *tmp, 1);
    free(name);
    BAM_CHECK(st);
  }
  for (int mi = 0; mi < 3; mi++)
    for (int b = 0; b < 2; b++) {
      char *name = NULL;
      BAM_CHECK(rp_fmt(&name, "%s-%s", METHODS[mi], BUDGETS[b]));
      st = rp_fmt(tmp, "%s/train-%s", R, name);
      int present = rp_exists(*tmp);
      /* BTX is the budget the others are matched to: a compute-matched BTX only if made */
      if (st == BAM_OK && (present || mi != 0 || b != 1))
        st = add_model(run, name, RP_MIXTURE, METHODS[mi], BUDGETS[b], *tmp, present);
      free(name);
      BAM_CHECK(st);
    }

  for (int i = 0; i < run->n_models; i++) {
    rp_model *m = &run->m[i];
    if (!m->present) continue;
    char *mix_dir = NULL, *label = NULL;
    if (m->kind == RP_MIXTURE) {
      st = rp_fmt(&label, "train %s", m->name);
      if (st == BAM_OK) st = check_stage(label, m->dir, 1, 1);
      if (st == BAM_OK) st = rp_fmt(&label, "mix %s", m->method);
      if (st == BAM_OK) st = rp_fmt(&mix_dir, "%s/mix-%s", R, m->method);
      if (st == BAM_OK) st = check_stage(label, mix_dir, 1, 0);
    }
    if (st == BAM_OK) st = load_model(run, m, mix_dir);
    free(mix_dir);
    free(label);
    BAM_CHECK(st);
  }
  return order_vdom(run);
}

bam_status rp_collect(rp_run *run, const char *run_dir) {
  *run = (rp_run){0};
  char **experts = NULL, *tmp = NULL;
  int n_experts = 0;
  bam_status st = collect(run, run_dir, &experts, &n_experts, &tmp);
  for (int i = 0; i < n_experts; i++) free(experts[i]);
  free(experts);
  free(tmp);
  if (st != BAM_OK) rp_run_free(run);
  return st;
}
