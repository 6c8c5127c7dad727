/* model/mixture_layout: the mixture's shape checks, tensor table, initialisation, tensor
 * lookup and FLOP count. As for the dense model (layout.c), this file is about WHERE the
 * parameters live and what they start as; forward and backward are in mixture.c. */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "bam/mixture.h"

const char *bam_method_name(bam_method m) {
  switch (m) {
    case BAM_METHOD_BTX: return "btx";
    case BAM_METHOD_BAM: return "bam";
    case BAM_METHOD_BAM_SHARED_KV: return "bam-shared-kv";
  }
  return "unknown";
}

bam_status bam_method_parse(const char *s, bam_method *out) {
  if (!s || !out) BAM_FAIL(BAM_ERR_ARG, "bam_method_parse: NULL argument");
  for (int m = BAM_METHOD_BTX; m <= BAM_METHOD_BAM_SHARED_KV; m++)
    if (!strcmp(s, bam_method_name((bam_method)m))) {
      *out = (bam_method)m;
      return BAM_OK;
    }
  BAM_FAIL(BAM_ERR_CONFIG, "method '%s' unknown: expected btx, bam or bam-shared-kv", s);
}

bam_status bam_mixture_shape_check(const bam_mixture_shape *s) {
  if (!s) BAM_FAIL(BAM_ERR_ARG, "mixture shape: NULL");
  BAM_CHECK(bam_model_shape_check(&s->base));
  if (s->method != BAM_METHOD_BTX && s->method != BAM_METHOD_BAM &&
      s->method != BAM_METHOD_BAM_SHARED_KV)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: method = %d, must be btx (0), bam (1) or "
             "bam-shared-kv (2)", (int)s->method);
  if (s->n_ffn_experts < 1)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: n_ffn_experts = %d, must be >= 1", s->n_ffn_experts);
  if (s->ffn_top_k < 1 || s->ffn_top_k > s->n_ffn_experts)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: ffn_top_k = %d, must be in [1, n_ffn_experts = %d]",
             s->ffn_top_k, s->n_ffn_experts);
  if (s->ffn_renormalize != 0 && s->ffn_renormalize != 1)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: ffn_renormalize = %d, must be 0 or 1",
             s->ffn_renormalize);
  if (s->method != BAM_METHOD_BTX) { /* BTX has one dense attention: Ea, att_top_k unused */
    if (s->n_att_experts < 1)
      BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: n_att_experts = %d, must be >= 1 for %s",
               s->n_att_experts, bam_method_name(s->method));
    if (s->att_top_k < 0 || s->att_top_k > s->n_att_experts)
      BAM_FAIL(BAM_ERR_CONFIG,
               "mixture shape: att_top_k = %d, must be 0 (soft routing) or in [1, "
               "n_att_experts = %d]",
               s->att_top_k, s->n_att_experts);
  }
  if (!(s->lb_coef >= 0.0f) || !isfinite(s->lb_coef))
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: lb_coef = %g, must be a finite number >= 0",
             (double)s->lb_coef);
  if (!(s->z_coef >= 0.0f) || !isfinite(s->z_coef))
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: z_coef = %g, must be a finite number >= 0",
             (double)s->z_coef);
  if (s->lb_per_sequence != 0 && s->lb_per_sequence != 1)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: lb_per_sequence = %d, must be 0 or 1",
             s->lb_per_sequence);
  if (!(s->capacity_factor >= 0.0f) || !isfinite(s->capacity_factor))
    BAM_FAIL(BAM_ERR_CONFIG,
             "mixture shape: capacity_factor = %g, must be 0 (dropless) or a finite number > 0",
             (double)s->capacity_factor);
  /* The kernels take dimensions as int: every single matrix must stay within range. */
  const int64_t E = s->n_ffn_experts > s->n_att_experts ? s->n_ffn_experts : s->n_att_experts;
  if (E * s->base.d_model > INT_MAX)
    BAM_FAIL(BAM_ERR_CONFIG, "mixture shape: experts %lld * d_model %d exceeds INT_MAX",
             (long long)E, s->base.d_model);
  return BAM_OK;
}

/* The table, in this order (mixture.h): wte ln ln_f [w_head] [att_router] wq wk wv wo
 * ffn_router w_gate w_up w_down. Expert tensors are expert-major (Ea or Ef first). */
int bam_mixture_tensors(const bam_mixture_shape *s, bam_tensor_info *out, size_t *total) {
  const bam_model_shape *b = &s->base;
  const int64_t L = b->n_layers, d = b->d_model, kvd = bam_kv_dim(b), f = b->d_ff,
                V = b->vocab_size, Ef = s->n_ffn_experts;
  const int bam = s->method != BAM_METHOD_BTX, own_kv = s->method == BAM_METHOD_BAM;
  const int64_t Ea = bam ? s->n_att_experts : 0;
  typedef struct {
    const char *name;
    int ndim;
    int64_t shape[BAM_MAX_DIMS];
    int decay; /* 1: matrices and embeddings; 0: norm scales and routers */
  } row;
  row table[16];
  int n = 0;
#define ROW(nm, nd, s0, s1, s2, s3, dec) table[n++] = (row){nm, nd, {s0, s1, s2, s3}, dec}
  ROW("wte", 2, V, d, 0, 0, 1);
  ROW("ln", 2, L, d, 0, 0, 0);
  ROW("ln_f", 1, d, 0, 0, 0, 0);
  /* Tied: the head IS wte; listing it would store it twice and update it twice. */
  if (!b->tie_embeddings) ROW("w_head", 2, V, d, 0, 0, 1);
  if (bam) {
    /* Routers are not decayed: decay would pull every gate towards uniform routing, a
     * prior the method does not ask for (mixture.h). */
    ROW("att_router", 3, L, Ea, d, 0, 0);
    ROW("wq", 4, Ea, L, d, d, 1);
    if (own_kv) {
      ROW("wk", 4, Ea, L, kvd, d, 1);
      ROW("wv", 4, Ea, L, kvd, d, 1);
    } else {
      ROW("wk", 3, L, kvd, d, 0, 1);
      ROW("wv", 3, L, kvd, d, 0, 1);
    }
    ROW("wo", 4, Ea, L, d, d, 1);
  } else {
    ROW("wq", 3, L, d, d, 0, 1);
    ROW("wk", 3, L, kvd, d, 0, 1);
    ROW("wv", 3, L, kvd, d, 0, 1);
    ROW("wo", 3, L, d, d, 0, 1);
  }
  ROW("ffn_router", 3, L, Ef, d, 0, 0);
  ROW("w_gate", 4, Ef, L, f, d, 1);
  ROW("w_up", 4, Ef, L, f, d, 1);
  ROW("w_down", 4, Ef, L, d, f, 1);
#undef ROW
  size_t offset = 0;
  for (int i = 0; i < n; i++) {
    bam_tensor_info *t = &out[i];
    t->name = table[i].name;
    t->ndim = table[i].ndim;
    t->numel = 1;
    for (int k = 0; k < BAM_MAX_DIMS; k++) {
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

/* Expert tensors are the 4-d ones, expert-major: rank r's experts are one contiguous block.
 * The replicated tensors come first so that the two parts of the buffer (summed over
 * different ranks) are each one range. */
int bam_mixture_tensors_sharded(const bam_mixture_shape *s, int G, int r, bam_tensor_info *out,
                                size_t *global_offset, int *expert0, size_t *total,
                                size_t *replicated) {
  bam_tensor_info global[BAM_MAX_TENSORS];
  const int n = bam_mixture_tensors(s, global, NULL);
  if (G < 1) G = 1;
  int k = 0;
  size_t offset = 0;
  for (int pass = 0; pass < 2; pass++) {
    for (int i = 0; i < n; i++) {
      const bam_tensor_info *g = &global[i];
      const int expert = g->ndim == 4;
      if (expert != pass) continue;
      bam_tensor_info *t = &out[k];
      *t = *g;
      size_t first = 0;
      if (expert) {
        const int64_t E = g->shape[0], El = E / G;
        t->shape[0] = El;
        t->numel = g->numel / (size_t)E * (size_t)El;
        first = (size_t)r * (size_t)El;
        expert0[k] = (int)first;
        first *= g->numel / (size_t)E;
      } else {
        expert0[k] = 0;
      }
      global_offset[k] = g->offset + first;
      t->offset = offset;
      offset += t->numel;
      k++;
    }
    if (pass == 0 && replicated) *replicated = offset;
  }
  if (G == 1) { /* the global table itself (its order) */
    for (int i = 0; i < n; i++) out[i] = global[i], global_offset[i] = global[i].offset, expert0[i] = 0;
    if (replicated) *replicated = offset;
  }
  if (total) *total = offset;
  return n;
}

float *bam_mixture_tensor(bam_mixture *m, const char *name, const bam_tensor_info **info) {
  for (int i = 0; i < m->n_tensors; i++)
    if (!strcmp(m->tensors[i].name, name)) {
      if (info) *info = &m->tensors[i];
      return m->params_mem + m->tensors[i].offset;
    }
  if (info) *info = NULL;
  return NULL;
}

/* FNV-1a: a stable 64-bit id for a tensor name, the base of its RNG stream (the same
 * function as the dense model's, so the streams agree; see bam_mixture_init). */
static uint64_t name_hash(const char *s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ULL;
  return h;
}

/* Slices of a tensor that get their own RNG stream: (expert, layer) for the 4-d expert
 * tensors, layer for the 3-d per-layer ones (routers included), the whole tensor otherwise. */
static int n_slices(const bam_tensor_info *t) {
  if (t->ndim == 4) return (int)(t->shape[0] * t->shape[1]);
  if (t->ndim == 3) return (int)t->shape[0];
  return 1;
}

void bam_mixture_init(bam_mixture *m, uint64_t seed, float std) {
  const bam_mixture_shape *s = &m->shape;
  const int L = s->base.n_layers;
  const float out_scale = 1.0f / sqrtf(2.0f * (float)L); /* GPT-2, as bam_model_init */
  const float router_std = 0.02f;                         /* method.md section 3 */
  int n_items = 0;
  for (int i = 0; i < m->n_tensors; i++) n_items += n_slices(&m->tensors[i]);
  /* One work item per slice. Its stream is keyed by the tensor NAME, the layer and the
   * expert: name_hash + layer + (expert << 32). Expert 0 (and every non-expert tensor) thus
   * draws exactly what bam_model_init draws for the same name and layer, and values never
   * depend on the layout around them (method, tying, expert counts) or on thread count. */
#pragma omp parallel for schedule(dynamic, 1)
  for (int item = 0; item < n_items; item++) {
    int i = 0, rem = item;
    for (;; i++) {
      const int ns = n_slices(&m->tensors[i]);
      if (rem < ns) break;
      rem -= ns;
    }
    const bam_tensor_info *t = &m->tensors[i];
    /* a sharded mixture's block of experts starts at global expert expert0[i] */
    const int expert = t->ndim == 4 ? m->expert0[i] + rem / L : 0,
              layer = t->ndim == 4 ? rem % L : rem;
    const size_t len = t->numel / (size_t)n_slices(t);
    float *p = m->params_mem + t->offset + (size_t)rem * len;
    if (!strcmp(t->name, "ln") || !strcmp(t->name, "ln_f")) {
      for (size_t j = 0; j < len; j++) p[j] = 1.0f;
      continue;
    }
    float sd = std;
    if (!strcmp(t->name, "att_router") || !strcmp(t->name, "ffn_router")) sd = router_std;
    if (!strcmp(t->name, "wo") || !strcmp(t->name, "w_down")) sd *= out_scale;
    bam_rng r;
    bam_rng_seed(&r, seed, name_hash(t->name) + (uint64_t)layer + ((uint64_t)expert << 32));
    for (size_t j = 0; j < len; j++) p[j] = sd * bam_rng_normal(&r);
  }
}

/* Forward FLOPs per token, counting a (out, in) matmul as 2*in*out and only the experts a
 * token uses (method.md section 5, BAM Table 10):
 *   attention expert:  Q 2 d^2 + K,V 2 d 2kvd (6 d^2 when kvd = d) + scores and values
 *                      2 T d (causal average) + out 2 d^2
 *   BTX:               one attention expert
 *   BAM:               Ea attention experts + attention router 2 Ea d
 *   BAM shared KV:     K,V projected once (one shared Wk, Wv), Q, attention and out Ea times
 *   att_top_k = a > 0: a token's own Q, attention and out run for its a experts only; K and
 *                      V still run for every expert, since later tokens that chose an expert
 *                      read this token's keys and values (the kernels compute every expert
 *                      that any token chose, so this is the ideal count, not what runs)
 *   FFN:               router 2 Ef d + k experts x SwiGLU 3 x 2 d f (= the paper's 3 k d f2
 *                      with f2 = 2f)
 * plus the output head 2 d V per token. Training = 3 x forward (the caller's business).
 * Capacity drops are not subtracted: the count is that of the dropless computation. */
double bam_mixture_flops_per_token(const bam_mixture_shape *s, int T) {
  const bam_model_shape *b = &s->base;
  const double d = b->d_model, kvd = bam_kv_dim(b), f = b->d_ff, V = b->vocab_size;
  const double q_att_o = 2.0 * d * d + 2.0 * (double)T * d + 2.0 * d * d;
  const double kv = 2.0 * d * 2.0 * kvd;
  double att;
  if (s->method == BAM_METHOD_BTX) {
    att = q_att_o + kv;
  } else {
    const double Ea = s->n_att_experts;
    const double used = s->att_top_k > 0 ? s->att_top_k : Ea;
    const double n_kv = s->method == BAM_METHOD_BAM ? Ea : 1.0;
    att = used * q_att_o + n_kv * kv + 2.0 * Ea * d;
  }
  const double ffn = 2.0 * s->n_ffn_experts * d + (double)s->ffn_top_k * 3.0 * 2.0 * d * f;
  return (double)b->n_layers * (att + ffn) + 2.0 * d * V;
}
