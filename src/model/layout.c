/* model/layout: shape validation, the parameter size table and its views, initialisation,
 * and the FLOP count. Everything here is about WHERE parameters live and what they start as;
 * the forward and backward passes are in model.c. */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "bam/model.h"

bam_status bam_model_shape_check(const bam_model_shape *s) {
  if (!s) BAM_FAIL(BAM_ERR_ARG, "model shape: NULL");
  /* Each size on its own line of the message, so a config typo is found at once. */
  if (s->n_layers < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: n_layers = %d, must be >= 1", s->n_layers);
  if (s->d_model < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: d_model = %d, must be >= 1", s->d_model);
  if (s->n_heads < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: n_heads = %d, must be >= 1", s->n_heads);
  if (s->n_kv_heads < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: n_kv_heads = %d, must be >= 1", s->n_kv_heads);
  if (s->d_ff < 1) BAM_FAIL(BAM_ERR_CONFIG, "model shape: d_ff = %d, must be >= 1", s->d_ff);
  if (s->vocab_size < 2)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: vocab_size = %d, must be >= 2", s->vocab_size);
  if (s->seq_len < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: seq_len = %d, must be >= 1", s->seq_len);
  if (s->d_model % s->n_heads != 0)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: d_model = %d is not divisible by n_heads = %d",
             s->d_model, s->n_heads);
  if (s->n_heads % s->n_kv_heads != 0)
    BAM_FAIL(BAM_ERR_CONFIG,
             "model shape: n_heads = %d is not a multiple of n_kv_heads = %d (grouped-query "
             "attention shares each kv head among n_heads/n_kv_heads query heads)",
             s->n_heads, s->n_kv_heads);
  if (bam_head_dim(s) % 2 != 0)
    BAM_FAIL(BAM_ERR_CONFIG,
             "model shape: head_dim = d_model/n_heads = %d is odd; RoPE rotates pairs of "
             "dimensions and needs it even",
             bam_head_dim(s));
  if (s->tie_embeddings != 0 && s->tie_embeddings != 1)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: tie_embeddings = %d, must be 0 or 1", s->tie_embeddings);
  if (!(s->rope_base > 1.0f) || !isfinite(s->rope_base))
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: rope_base = %g, must be a finite number > 1",
             (double)s->rope_base);
  if (!(s->norm_eps > 0.0f) || !isfinite(s->norm_eps))
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: norm_eps = %g, must be a finite number > 0",
             (double)s->norm_eps);
  /* Kernels take row counts and widths as int: keep every single matrix (rows or columns)
   * and the per-layer parameter count within range. */
  int64_t big = (int64_t)s->d_ff > s->vocab_size ? s->d_ff : s->vocab_size;
  if ((int64_t)s->d_model * big > INT_MAX)
    BAM_FAIL(BAM_ERR_CONFIG, "model shape: d_model * max(d_ff, vocab_size) = %lld exceeds INT_MAX",
             (long long)((int64_t)s->d_model * big));
  return BAM_OK;
}

int bam_model_tensors(const bam_model_shape *s, bam_tensor_info *out, size_t *total) {
  const int64_t L = s->n_layers, d = s->d_model, kvd = bam_kv_dim(s), f = s->d_ff,
                V = s->vocab_size;
  /* name, ndim, shape, decay. Matrices and embeddings decay, norm scales do not. */
  const struct {
    const char *name;
    int ndim;
    int64_t shape[3];
    int decay;
  } table[] = {
      /* clang-format off */
      {"wte", 2, {V, d, 0}, 1},       {"ln", 2, {L, d, 0}, 0},
      {"wq", 3, {L, d, d}, 1},        {"wk", 3, {L, kvd, d}, 1},
      {"wv", 3, {L, kvd, d}, 1},      {"wo", 3, {L, d, d}, 1},
      {"w_gate", 3, {L, f, d}, 1},    {"w_up", 3, {L, f, d}, 1},
      {"w_down", 3, {L, d, f}, 1},    {"ln_f", 1, {d, 0, 0}, 0},
      {"w_head", 2, {V, d, 0}, 1},
      /* clang-format on */
  };
  int n = 0;
  size_t offset = 0;
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
    /* Tied: the head IS wte; listing it would store it twice and update it twice. */
    if (s->tie_embeddings && strcmp(table[i].name, "w_head") == 0) continue;
    bam_tensor_info *t = &out[n++];
    t->name = table[i].name;
    t->ndim = table[i].ndim;
    t->numel = 1;
    for (int k = 0; k < 3; k++) {
      t->shape[k] = k < t->ndim ? table[i].shape[k] : 0;
      if (k < t->ndim) t->numel *= (size_t)t->shape[k];
    }
    t->offset = offset;
    t->decay = table[i].decay;
    offset += t->numel;
  }
  if (total) *total = offset;
  return n;
}

void bam_params_view(bam_params *p, const bam_model_shape *s, float *base) {
  const struct {
    const char *name;
    float **view;
  } views[] = {{"wte", &p->wte},       {"ln", &p->ln},        {"wq", &p->wq},
               {"wk", &p->wk},         {"wv", &p->wv},        {"wo", &p->wo},
               {"w_gate", &p->w_gate}, {"w_up", &p->w_up},    {"w_down", &p->w_down},
               {"ln_f", &p->ln_f},     {"w_head", &p->w_head}};
  bam_tensor_info t[BAM_MAX_TENSORS];
  int n = bam_model_tensors(s, t, NULL);
  memset(p, 0, sizeof *p);
  for (int i = 0; i < n; i++)
    for (size_t j = 0; j < sizeof views / sizeof views[0]; j++)
      if (!strcmp(t[i].name, views[j].name)) *views[j].view = base + t[i].offset;
  if (s->tie_embeddings) p->w_head = p->wte;
}

/* FNV-1a: a stable 64-bit id for a tensor name, the base of its RNG stream. */
static uint64_t name_hash(const char *s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
  return h;
}

void bam_model_init(bam_model *m, uint64_t seed, float std) {
  const bam_model_shape *s = &m->shape;
  /* GPT-2: the two projections that write into the residual stream are scaled down so the
   * residual variance does not grow with depth (each layer adds two such branches). */
  const float out_scale = 1.0f / sqrtf(2.0f * (float)s->n_layers);
  /* Work items are (tensor, layer) slices, each with its own RNG stream derived from the
   * tensor NAME and the layer index: values do not depend on the layout order, on other
   * tensors' sizes (e.g. tied or not, n_layers for the earlier layers) or on thread count. */
  int n_items = 0;
  for (int i = 0; i < m->n_tensors; i++)
    n_items += m->tensors[i].ndim == 3 ? (int)m->tensors[i].shape[0] : 1;
#pragma omp parallel for schedule(dynamic, 1)
  for (int item = 0; item < n_items; item++) {
    /* Map the flat item index back to (tensor, layer). */
    int i = 0, rem = item;
    for (;; i++) {
      int slices = m->tensors[i].ndim == 3 ? (int)m->tensors[i].shape[0] : 1;
      if (rem < slices) break;
      rem -= slices;
    }
    const bam_tensor_info *t = &m->tensors[i];
    int layer = rem;
    int slices = t->ndim == 3 ? (int)t->shape[0] : 1;
    size_t len = t->numel / (size_t)slices;
    float *p = m->params_mem + t->offset + (size_t)layer * len;
    if (!t->decay) { /* norm scales */
      for (size_t j = 0; j < len; j++) p[j] = 1.0f;
      continue;
    }
    float sd = std;
    if (!strcmp(t->name, "wo") || !strcmp(t->name, "w_down")) sd *= out_scale;
    bam_rng r;
    bam_rng_seed(&r, seed, name_hash(t->name) + (uint64_t)layer);
    for (size_t j = 0; j < len; j++) p[j] = sd * bam_rng_normal(&r);
  }
}

double bam_model_flops_per_token(const bam_model_shape *s, int T) {
  const double d = s->d_model, kvd = bam_kv_dim(s), f = s->d_ff, V = s->vocab_size;
  /* A matmul with a (out, in) weight costs 2*in*out FLOPs per token (multiply + add). */
  double per_layer = 2.0 * (d * d           /* Wq */
                            + 2.0 * d * kvd /* Wk, Wv */
                            + d * d         /* Wo */
                            + 3.0 * d * f); /* W_gate, W_up, W_down */
  /* Attention: q.k^T and probs.v each cost 2*T*d per token without a mask; the causal mask
   * halves both on average, giving 2*T*d per token per layer in total. This is the paper's
   * convention ("attention 2 n_ctx d", BAM Table 10, method.md section 5). */
  per_layer += 2.0 * (double)T * d;
  return (double)s->n_layers * per_layer + 2.0 * d * V; /* + output head; lookups are free */
}
