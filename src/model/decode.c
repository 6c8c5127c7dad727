/* model/decode: KV-cache decoding for the dense model and the BTX / BAM mixtures (decode.h).
 *
 * One routine, forward_rows, runs n new tokens at positions len .. len+n-1 through every
 * layer; prefill calls it with the prompt, step with one token. The math is the training
 * forward's (model.c, mixture.c), restricted to the new rows:
 *
 *   x = wte[tokens]                                           (n, d)
 *   per layer:  h = LN_l(x)
 *               K/V of every set: k = RoPE(h Wk^T), v = h Wv^T  -> cache rows [len, len+n)
 *               attention expert j (dense/BTX: the one): q = RoPE(h Wq_j^T),
 *                 att = causal softmax(q K^T / sqrt(hd)) V over cache rows [0, pos], o = att Wo_j^T
 *               a = o (dense, BTX) or sum_j g_j o_j (BAM, experts in index order)
 *               MoE(h) = sum over the top-k assignments (rank order) of w FFN_i(h)
 *               x = x + a + MoE(h)
 *   logits = LN_f(x[last]) W_head^T
 *
 * The top-k choices use the same tie rule as the training forward (equal values go to the
 * lower index) and no capacity limit (capacity is a training-time device: at inference every
 * token keeps its experts). Products: cblas_sgemm for n > 1 rows, cblas_sgemv for one row.
 * Attention is blocked over 64 query rows like the training kernel, but its keys come from
 * the cache and start at position 0 while the queries start at len; items (head, row block)
 * run in parallel, each thread with its own score scratch.
 *
 * Memory: one allocation at create holds the caches, the RoPE tables, the weight pointer
 * tables and scratch for max_len rows (a whole-context prefill); nothing is allocated later. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "bam/decode.h"
#include "bam/kernels.h"

#define ATT_BLOCK 64
/* Loops with less work than this stay serial (as in model.c). */
#define PAR_MIN_WORK 16384L

struct bam_decoder {
  const char *kind;
  int L, d, H, Hkv, hd, kvd, f, V;
  float eps;
  int bam;      /* attention router and attention experts (BAM, both kinds) */
  int Ea;       /* attention router width (BAM), 0 otherwise */
  int nA;       /* attention experts per layer: Ea for BAM, 1 for dense and BTX */
  int nKV;      /* K/V sets per layer: Ea for BAM with KV experts, else 1 */
  int ka;       /* att_top_k, 0: soft */
  int moe;      /* FFN router and experts (mixtures) */
  int Ef, k, renorm; /* FFN experts, top-k, renormalise (dense: 1, 1, 0) */
  int max_len, len;
  int nt;       /* threads the attention scratch was sized for */
  /* ---- borrowed weights ---- */
  const float *wte, *ln_f, *w_head;
  const float **ln, **att_router, **ffn_router;  /* [L] */
  const float **wq, **wo;                         /* [L * nA], index l*nA + j */
  const float **wk, **wv;                         /* [L * nKV] */
  const float **w_gate, **w_up, **w_down;         /* [L * Ef] */
  /* ---- cache ---- */
  float *kc, *vc;               /* (L, nKV, max_len, kvd) after RoPE / as projected */
  float *rope_cos, *rope_sin;   /* (max_len, hd/2) */
  /* ---- scratch for up to max_len rows (R) ---- */
  float *x, *h, *mean, *rstd;   /* (R, d), (R, d), (R), (R) */
  float *q, *att, *o, *ya, *mo; /* (R, d): query, attention, expert output, branch outputs */
  float *ap, *ag;               /* (R, Ea) attention router softmax, gate used */
  int32_t *aidx, *active;       /* (R, ka) kept attention experts, (Ea) used by any row */
  float *fp, *fw;               /* (R, Ef) FFN router softmax, (R, k) gates */
  int32_t *fidx, *frow, *dtok;  /* (R, k) experts, dispatch rows; (R k) token of each row */
  int32_t *off;                 /* (Ef + 1) first dispatch row of each expert */
  int32_t *cur;                 /* (Ef) cursor */
  float *xg, *yg;               /* (R k, d) gathered h rows, expert outputs */
  float *gate, *up;             /* (R k, f); gate then holds silu(gate) * up */
  float *scores;                /* (nt, ATT_BLOCK, max_len) */
  float *xf;                    /* (d) final norm of the last row */
  float lnf_mean, lnf_rstd;
  size_t bytes;
  void *mem;
};

/* ---- allocation ---- */

/* Measures (base NULL) or carves (base set) the one allocation; returns its bytes. */
static size_t layout(bam_decoder *D, char *base) {
  const size_t L = (size_t)D->L, d = (size_t)D->d, kvd = (size_t)D->kvd, f = (size_t)D->f,
               R = (size_t)D->max_len, Rk = R * (size_t)D->k, nA = (size_t)D->nA,
               nKV = (size_t)D->nKV, Ea = (size_t)D->Ea, Ef = (size_t)D->Ef,
               ka = (size_t)D->ka, half = (size_t)D->hd / 2;
  size_t off = 0;
#define SLOT(field, count)                                  \
  do {                                                      \
    if (base) D->field = (void *)(base + off);              \
    off += ((count) * sizeof *D->field + 63) & ~(size_t)63; \
  } while (0)
  SLOT(ln, L);
  SLOT(att_router, L);
  SLOT(ffn_router, L);
  SLOT(wq, L * nA);
  SLOT(wo, L * nA);
  SLOT(wk, L * nKV);
  SLOT(wv, L * nKV);
  SLOT(w_gate, L * Ef);
  SLOT(w_up, L * Ef);
  SLOT(w_down, L * Ef);
  SLOT(kc, L * nKV * R * kvd);
  SLOT(vc, L * nKV * R * kvd);
  SLOT(rope_cos, R * half);
  SLOT(rope_sin, R * half);
  SLOT(x, R * d);
  SLOT(h, R * d);
  SLOT(mean, R);
  SLOT(rstd, R);
  SLOT(q, R * d);
  SLOT(att, R * d);
  SLOT(o, R * d);
  SLOT(ya, R * d);
  SLOT(mo, R * d);
  SLOT(ap, R * Ea);
  SLOT(ag, R * Ea);
  SLOT(aidx, R * ka);
  SLOT(active, Ea);
  SLOT(fp, R * Ef);
  SLOT(fw, Rk);
  SLOT(fidx, Rk);
  SLOT(frow, Rk);
  SLOT(dtok, Rk);
  SLOT(off, Ef + 1);
  SLOT(cur, Ef);
  SLOT(xg, D->moe ? Rk * d : 0);
  SLOT(yg, D->moe ? Rk * d : 0);
  SLOT(gate, Rk * f);
  SLOT(up, Rk * f);
  SLOT(scores, (size_t)D->nt * ATT_BLOCK * R);
  SLOT(xf, d);
#undef SLOT
  return off;
}

/* A mixture tensor by name, checked against the element count the layout implies. */
static bam_status mix_tensor(const float **out, bam_mixture *m, const char *name, size_t numel) {
  const bam_tensor_info *t = NULL;
  *out = bam_mixture_tensor(m, name, &t);
  if (!*out || t->numel != numel)
    BAM_FAIL(BAM_ERR_INTERNAL, "decoder: mixture tensor '%s' %s (expected %zu floats)", name,
             *out ? "has another size" : "is missing", numel);
  return BAM_OK;
}

static void point_dense(bam_decoder *D, const bam_model *m) {
  const bam_params *p = &m->params;
  const size_t d = (size_t)D->d, kvd = (size_t)D->kvd, f = (size_t)D->f;
  D->wte = p->wte, D->ln_f = p->ln_f, D->w_head = p->w_head;
  for (size_t l = 0; l < (size_t)D->L; l++) {
    D->ln[l] = p->ln + l * d;
    D->att_router[l] = D->ffn_router[l] = NULL;
    D->wq[l] = p->wq + l * d * d;
    D->wo[l] = p->wo + l * d * d;
    D->wk[l] = p->wk + l * kvd * d;
    D->wv[l] = p->wv + l * kvd * d;
    D->w_gate[l] = p->w_gate + l * f * d;
    D->w_up[l] = p->w_up + l * f * d;
    D->w_down[l] = p->w_down + l * d * f;
  }
}

/* Expert-major mixture tensors (mixture.h): block (e, l) of an (E, L, rows, cols) tensor is
 * at (e L + l) rows cols; the non-expert (L, rows, cols) tensors are expert 0 of the same. */
static bam_status point_mixture(bam_decoder *D, bam_mixture *m) {
  const size_t L = (size_t)D->L, d = (size_t)D->d, kvd = (size_t)D->kvd, f = (size_t)D->f,
               V = (size_t)D->V, nA = (size_t)D->nA, nKV = (size_t)D->nKV,
               Ea = (size_t)D->Ea, Ef = (size_t)D->Ef;
  const float *wq, *wo, *wk, *wv, *ar = NULL, *fr, *wg, *wu, *wd, *ln;
  BAM_CHECK(mix_tensor(&D->wte, m, "wte", V * d));
  BAM_CHECK(mix_tensor(&D->ln_f, m, "ln_f", d));
  if (m->shape.base.tie_embeddings) D->w_head = D->wte;
  else BAM_CHECK(mix_tensor(&D->w_head, m, "w_head", V * d));
  BAM_CHECK(mix_tensor(&ln, m, "ln", L * d));
  if (D->bam) BAM_CHECK(mix_tensor(&ar, m, "att_router", L * Ea * d));
  BAM_CHECK(mix_tensor(&wq, m, "wq", nA * L * d * d));
  BAM_CHECK(mix_tensor(&wo, m, "wo", nA * L * d * d));
  BAM_CHECK(mix_tensor(&wk, m, "wk", nKV * L * kvd * d));
  BAM_CHECK(mix_tensor(&wv, m, "wv", nKV * L * kvd * d));
  BAM_CHECK(mix_tensor(&fr, m, "ffn_router", L * Ef * d));
  BAM_CHECK(mix_tensor(&wg, m, "w_gate", Ef * L * f * d));
  BAM_CHECK(mix_tensor(&wu, m, "w_up", Ef * L * f * d));
  BAM_CHECK(mix_tensor(&wd, m, "w_down", Ef * L * d * f));
  for (size_t l = 0; l < L; l++) {
    D->ln[l] = ln + l * d;
    D->att_router[l] = ar ? ar + l * Ea * d : NULL;
    D->ffn_router[l] = fr + l * Ef * d;
    for (size_t j = 0; j < nA; j++) {
      D->wq[l * nA + j] = wq + (j * L + l) * d * d;
      D->wo[l * nA + j] = wo + (j * L + l) * d * d;
    }
    for (size_t j = 0; j < nKV; j++) {
      D->wk[l * nKV + j] = wk + (j * L + l) * kvd * d;
      D->wv[l * nKV + j] = wv + (j * L + l) * kvd * d;
    }
    for (size_t e = 0; e < Ef; e++) {
      D->w_gate[l * Ef + e] = wg + (e * L + l) * f * d;
      D->w_up[l * Ef + e] = wu + (e * L + l) * f * d;
      D->w_down[l * Ef + e] = wd + (e * L + l) * d * f;
    }
  }
  return BAM_OK;
}

bam_status bam_decoder_create(bam_decoder **out, bam_model *dense, bam_mixture *mix,
                              int max_len) {
  if (!out) BAM_FAIL(BAM_ERR_ARG, "bam_decoder_create: NULL output pointer");
  *out = NULL;
  if (!dense == !mix)
    BAM_FAIL(BAM_ERR_ARG, "bam_decoder_create: pass exactly one of a dense model and a mixture");
  if (mix && mix->sharded)
    BAM_FAIL(BAM_ERR_ARG,
             "bam_decoder_create: this mixture is sharded (it holds only its rank's experts); "
             "decoding needs every expert: load it unsharded");
  const bam_model_shape *s = dense ? &dense->shape : &mix->shape.base;
  if (max_len < 1 || max_len > s->seq_len)
    BAM_FAIL(BAM_ERR_ARG,
             "bam_decoder_create: max_len %d outside [1, seq_len = %d] (the positions the "
             "network was trained on)", max_len, s->seq_len);

  bam_status st = BAM_OK;
  bam_decoder *D = NULL;
  BAM_CHECK(bam_alloc_checked((void **)&D, sizeof *D, "the decoder struct"));
  D->L = s->n_layers, D->d = s->d_model, D->H = s->n_heads, D->Hkv = s->n_kv_heads;
  D->hd = bam_head_dim(s), D->kvd = bam_kv_dim(s), D->f = s->d_ff, D->V = s->vocab_size;
  D->eps = s->norm_eps;
  D->max_len = max_len;
  D->nt = omp_get_max_threads();
  if (dense) {
    D->kind = "dense";
    D->nA = D->nKV = D->Ef = D->k = 1;
  } else {
    const bam_mixture_shape *ms = &mix->shape;
    D->kind = bam_method_name(ms->method);
    D->bam = ms->method != BAM_METHOD_BTX;
    D->Ea = D->bam ? ms->n_att_experts : 0;
    D->nA = D->bam ? ms->n_att_experts : 1;
    D->nKV = ms->method == BAM_METHOD_BAM ? ms->n_att_experts : 1;
    D->ka = D->bam ? ms->att_top_k : 0;
    D->moe = 1;
    D->Ef = ms->n_ffn_experts, D->k = ms->ffn_top_k, D->renorm = ms->ffn_renormalize;
  }
  const size_t bytes = layout(D, NULL);
  char what[128];
  snprintf(what, sizeof what, "the %s decoder (KV cache and scratch for %d tokens)", D->kind,
           max_len);
  BAM_CHECK_GOTO(st, bam_alloc_checked(&D->mem, bytes, what), fail);
  layout(D, D->mem);
  D->bytes = bytes;
  if (dense) point_dense(D, dense);
  else BAM_CHECK_GOTO(st, point_mixture(D, mix), fail);
  bam_rope_table(D->rope_cos, D->rope_sin, max_len, D->hd, s->rope_base);
  *out = D;
  return BAM_OK;
fail:
  bam_decoder_free(&D);
  return st;
}

void bam_decoder_free(bam_decoder **dp) {
  if (!dp || !*dp) return;
  bam_free((*dp)->mem);
  bam_free(*dp);
  *dp = NULL;
}

void bam_decoder_reset(bam_decoder *D) { D->len = 0; }
int bam_decoder_len(const bam_decoder *D) { return D->len; }
int bam_decoder_max_len(const bam_decoder *D) { return D->max_len; }
int bam_decoder_vocab(const bam_decoder *D) { return D->V; }
const char *bam_decoder_kind(const bam_decoder *D) { return D->kind; }
size_t bam_decoder_kv_bytes_per_token(const bam_decoder *D) {
  return 2 * (size_t)D->L * (size_t)D->nKV * (size_t)D->kvd * sizeof(float);
}
size_t bam_decoder_bytes(const bam_decoder *D) { return D->bytes + sizeof *D; }

/* ---- building blocks ---- */

/* y(n, out) = x(n, in) W(out, in)^T: one sgemm, or one sgemv for a single row. */
static void linear(float *y, const float *x, const float *w, int n, int in, int out) {
  if (n == 1)
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 0.0f, y, 1);
  else
    bam_matmul_forward(y, x, w, n, in, out);
}

static float *k_cache(const bam_decoder *D, int l, int jk) {
  return D->kc + ((size_t)l * D->nKV + (size_t)jk) * (size_t)D->max_len * D->kvd;
}
static float *v_cache(const bam_decoder *D, int l, int jk) {
  return D->vc + ((size_t)l * D->nKV + (size_t)jk) * (size_t)D->max_len * D->kvd;
}

/* out(d) = attention of one query row q(d) at position len-1 over the cached keys and values
 * kc, vc (rows 0 .. len-1, kvd wide). Plain loops, not BLAS: inside an OpenMP region the
 * OpenBLAS of Debian 12 (0.3.21) still tries to thread a matrix-vector product, and the nested
 * dispatch costs far more than these few thousand multiply-adds per head. */
static void attend_one(const bam_decoder *D, float *out, const float *q, const float *kc,
                       const float *vc, int len) {
  const int H = D->H, G = H / D->Hkv, hd = D->hd, kvd = D->kvd;
  const float scale = 1.0f / sqrtf((float)hd);
  int nt = omp_get_max_threads();
  if (nt > D->nt) nt = D->nt;
#pragma omp parallel for schedule(static) num_threads(nt) if ((long)len * D->d >= PAR_MIN_WORK)
  for (int h = 0; h < H; h++) {
    const int kvh = h / G;
    float *S = D->scores + (size_t)omp_get_thread_num() * ATT_BLOCK * (size_t)D->max_len;
    const float *qh = q + (size_t)h * hd;
    for (int j = 0; j < len; j++) {
      const float *kj = kc + (size_t)j * kvd + (size_t)kvh * hd;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int c = 0; c < hd; c++) s += qh[c] * kj[c];
      S[j] = scale * s;
    }
    bam_softmax_row(S, len);
    float *oh = out + (size_t)h * hd;
    for (int c = 0; c < hd; c++) oh[c] = 0.0f;
    for (int j = 0; j < len; j++) {
      const float pj = S[j];
      const float *vj = vc + (size_t)j * kvd + (size_t)kvh * hd;
#pragma omp simd
      for (int c = 0; c < hd; c++) oh[c] += pj * vj[c];
    }
  }
}

/* out(n, d) = causal attention of the query rows q(n, d) at positions pos0 .. pos0+n-1 over
 * the cached keys and values kc, vc (rows 0 .. pos0+n-1, kvd wide). Query head h reads kv
 * head h / (H / Hkv). Several rows: items (head, block of 64 rows) in parallel, each two
 * sgemm calls, as the training kernel does; one row: attend_one. */
static void attend(const bam_decoder *D, float *out, const float *q, const float *kc,
                   const float *vc, int pos0, int n) {
  if (n == 1) {
    attend_one(D, out, q, kc, vc, pos0 + 1);
    return;
  }
  const int H = D->H, G = H / D->Hkv, hd = D->hd, d = D->d, kvd = D->kvd;
  const float scale = 1.0f / sqrtf((float)hd);
  const int nblk = (n + ATT_BLOCK - 1) / ATT_BLOCK;
  const long items = (long)H * nblk, work = (long)n * (pos0 + n) * d;
  int nt = omp_get_max_threads();
  if (nt > D->nt) nt = D->nt;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (items > 1 && work >= PAR_MIN_WORK)
  for (long it = 0; it < items; it++) {
    const int blk = nblk - 1 - (int)(it / H), h = (int)(it % H), kvh = h / G;
    const int r0 = blk * ATT_BLOCK, r1 = n < r0 + ATT_BLOCK ? n : r0 + ATT_BLOCK, m = r1 - r0;
    const int nk = pos0 + r1; /* keys the block's last row sees */
    float *S = D->scores + (size_t)omp_get_thread_num() * ATT_BLOCK * (size_t)D->max_len;
    const float *qb = q + (size_t)r0 * d + (size_t)h * hd;
    const float *kb = kc + (size_t)kvh * hd, *vb = vc + (size_t)kvh * hd;
    float *ob = out + (size_t)r0 * d + (size_t)h * hd;
    /* S(m, nk) = scale * Q K^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, nk, hd, scale, qb, d, kb, kvd, 0.0f,
                S, nk);
    /* causal softmax: row ii (position pos0 + r0 + ii) keeps keys 0 .. pos0 + r0 + ii */
    for (int ii = 0; ii < m; ii++) {
      float *p = S + (size_t)ii * nk;
      const int len = pos0 + r0 + ii + 1;
      bam_softmax_row(p, len);
      for (int j = len; j < nk; j++) p[j] = 0.0f;
    }
    /* O(m, hd) = P V */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, nk, 1.0f, S, nk, vb, kvd, 0.0f,
                ob, d);
  }
}

/* y[t] += g[t, j] * o[t] for the n rows (gate column j of an (n, E) gate matrix). */
static void add_scaled_rows(float *y, const float *o, const float *g, int E, int j, int n,
                            int d) {
#pragma omp parallel for schedule(static) if ((long)n * d >= PAR_MIN_WORK)
  for (int t = 0; t < n; t++) {
    const float gj = g[(size_t)t * E + j];
    float *yt = y + (size_t)t * d;
    const float *ot = o + (size_t)t * d;
#pragma omp simd
    for (int c = 0; c < d; c++) yt[c] += gj * ot[c];
  }
}

/* The attention branch of layer l for the n rows of D->h into D->ya; appends their K/V. */
static void attention_rows(bam_decoder *D, int l, int n, int pos0) {
  const int d = D->d, kvd = D->kvd, Ea = D->Ea;
  const float *h = D->h;
  if (D->bam) {
    /* g = softmax(h Wa^T); with att_top_k only each row's top entries (not renormalised). */
    linear(D->ap, h, D->att_router[l], n, d, Ea);
    bam_router_softmax(D->ap, NULL, n, Ea);
    if (D->ka == 0) {
      memcpy(D->ag, D->ap, (size_t)n * Ea * sizeof(float));
      for (int j = 0; j < Ea; j++) D->active[j] = 1;
    } else {
      for (int j = 0; j < Ea; j++) D->active[j] = 0;
      for (int t = 0; t < n; t++) {
        int32_t *idx = D->aidx + (size_t)t * D->ka;
        const float *p = D->ap + (size_t)t * Ea;
        float *g = D->ag + (size_t)t * Ea;
        bam_topk_select(idx, p, Ea, D->ka);
        for (int j = 0; j < Ea; j++) g[j] = 0.0f;
        for (int r = 0; r < D->ka; r++) {
          g[idx[r]] = p[idx[r]];
          D->active[idx[r]] = 1;
        }
      }
    }
    memset(D->ya, 0, (size_t)n * d * sizeof(float));
  }
  /* Every K/V set, whether or not these rows use it: later rows may. */
  for (int jk = 0; jk < D->nKV; jk++) {
    float *kc = k_cache(D, l, jk) + (size_t)pos0 * kvd, *vc = v_cache(D, l, jk) + (size_t)pos0 * kvd;
    linear(kc, h, D->wk[(size_t)l * D->nKV + jk], n, d, kvd);
    linear(vc, h, D->wv[(size_t)l * D->nKV + jk], n, d, kvd);
    bam_rope_forward(kc, D->rope_cos, D->rope_sin, 1, n, D->Hkv, D->hd, pos0);
  }
  for (int j = 0; j < D->nA; j++) {
    if (D->bam && !D->active[j]) continue; /* g_j = 0 on every row: contributes nothing */
    const int jk = D->nKV == 1 ? 0 : j;
    linear(D->q, h, D->wq[(size_t)l * D->nA + j], n, d, d);
    bam_rope_forward(D->q, D->rope_cos, D->rope_sin, 1, n, D->H, D->hd, pos0);
    attend(D, D->att, D->q, k_cache(D, l, jk), v_cache(D, l, jk), pos0, n);
    if (!D->bam) {
      linear(D->ya, D->att, D->wo[(size_t)l * D->nA + j], n, d, d);
      continue;
    }
    linear(D->o, D->att, D->wo[(size_t)l * D->nA + j], n, d, d);
    add_scaled_rows(D->ya, D->o, D->ag, Ea, j, n, d);
  }
}

/* The FFN branch of layer l for the n rows of D->h into D->mo. */
static void ffn_rows(bam_decoder *D, int l, int n) {
  const int d = D->d, f = D->f, Ef = D->Ef, k = D->k;
  const float *h = D->h;
  if (!D->moe) { /* dense SwiGLU */
    linear(D->gate, h, D->w_gate[l], n, d, f);
    linear(D->up, h, D->w_up[l], n, d, f);
    bam_swiglu_forward(D->gate, D->gate, D->up, (long)n * f);
    linear(D->mo, D->gate, D->w_down[l], n, f, d);
    return;
  }
  /* Route: p = softmax(h Wr^T), top-k, gates p_i (or renormalised over the top-k). */
  linear(D->fp, h, D->ffn_router[l], n, d, Ef);
  bam_router_softmax(D->fp, NULL, n, Ef);
  for (int t = 0; t < n; t++) {
    int32_t *idx = D->fidx + (size_t)t * k;
    float *w = D->fw + (size_t)t * k;
    const float *p = D->fp + (size_t)t * Ef;
    bam_topk_select(idx, p, Ef, k);
    float S = 0.0f; /* summed in rank order, as the training forward */
    for (int r = 0; r < k; r++) S += p[idx[r]];
    for (int r = 0; r < k; r++) w[r] = D->renorm ? p[idx[r]] / S : p[idx[r]];
  }
  /* Dispatch: rows grouped by expert, token order inside each expert (no capacity). */
  const int nk = n * k;
  for (int e = 0; e <= Ef; e++) D->off[e] = 0;
  for (int s = 0; s < nk; s++) D->off[D->fidx[s] + 1]++;
  for (int e = 0; e < Ef; e++) D->off[e + 1] += D->off[e];
  for (int e = 0; e < Ef; e++) D->cur[e] = D->off[e];
  for (int s = 0; s < nk; s++) {
    const int row = D->cur[D->fidx[s]]++;
    D->frow[s] = row;
    D->dtok[row] = s / k;
  }
  for (int r = 0; r < nk; r++)
    memcpy(D->xg + (size_t)r * d, h + (size_t)D->dtok[r] * d, (size_t)d * sizeof(float));
  for (int e = 0; e < Ef; e++) {
    const int r0 = D->off[e], ne = D->off[e + 1] - r0;
    if (ne == 0) continue;
    const float *xe = D->xg + (size_t)r0 * d;
    linear(D->gate + (size_t)r0 * f, xe, D->w_gate[(size_t)l * Ef + e], ne, d, f);
    linear(D->up + (size_t)r0 * f, xe, D->w_up[(size_t)l * Ef + e], ne, d, f);
  }
  bam_swiglu_forward(D->gate, D->gate, D->up, (long)nk * f);
  for (int e = 0; e < Ef; e++) {
    const int r0 = D->off[e], ne = D->off[e + 1] - r0;
    if (ne == 0) continue;
    linear(D->yg + (size_t)r0 * d, D->gate + (size_t)r0 * f, D->w_down[(size_t)l * Ef + e], ne,
           f, d);
  }
  /* Combine: each row sums its assignments in rank order. */
#pragma omp parallel for schedule(static) if ((long)n * d >= PAR_MIN_WORK)
  for (int t = 0; t < n; t++) {
    float *ot = D->mo + (size_t)t * d;
    for (int c = 0; c < d; c++) ot[c] = 0.0f;
    for (int r = 0; r < k; r++) {
      const float wt = D->fw[(size_t)t * k + r];
      const float *yr = D->yg + (size_t)D->frow[(size_t)t * k + r] * d;
#pragma omp simd
      for (int c = 0; c < d; c++) ot[c] += wt * yr[c];
    }
  }
}

/* The n tokens at positions len .. len+n-1 through the network; caches their K/V. Logits of
 * the last row into `logits` when given. Arguments are checked by the callers. */
static void forward_rows(bam_decoder *D, const int32_t *tokens, int n, float *logits) {
  const int d = D->d, pos0 = D->len;
  bam_embedding_forward(D->x, tokens, D->wte, n, d);
  for (int l = 0; l < D->L; l++) {
    bam_layernorm_forward(D->h, D->mean, D->rstd, D->x, D->ln[l], n, d, D->eps);
    attention_rows(D, l, n, pos0);
    ffn_rows(D, l, n);
    /* x' = x + a + FFN, in the training forward's order of evaluation */
    const long m = (long)n * d;
    float *x = D->x;
    const float *a = D->ya, *fo = D->mo;
#pragma omp parallel for schedule(static) if (m >= PAR_MIN_WORK)
    for (long i = 0; i < m; i++) x[i] = x[i] + a[i] + fo[i];
  }
  D->len += n;
  if (!logits) return;
  bam_layernorm_forward(D->xf, &D->lnf_mean, &D->lnf_rstd, D->x + (size_t)(n - 1) * d, D->ln_f,
                        1, d, D->eps);
  cblas_sgemv(CblasRowMajor, CblasNoTrans, D->V, d, 1.0f, D->w_head, d, D->xf, 1, 0.0f, logits, 1);
}

static bam_status check_tokens(const bam_decoder *D, const int32_t *tokens, int n,
                               const char *who) {
  for (int i = 0; i < n; i++)
    if (tokens[i] < 0 || tokens[i] >= D->V)
      BAM_FAIL(BAM_ERR_DATA, "%s: token %d at %d outside vocabulary [0, %d)", who, tokens[i], i,
               D->V);
  return BAM_OK;
}

bam_status bam_decoder_prefill(bam_decoder *D, const int32_t *tokens, int n, float *logits) {
  if (!D || !tokens) BAM_FAIL(BAM_ERR_ARG, "decoder prefill: NULL decoder or tokens");
  if (n < 1) BAM_FAIL(BAM_ERR_ARG, "decoder prefill: %d tokens, need at least 1", n);
  if (n > D->max_len - D->len)
    BAM_FAIL(BAM_ERR_ARG,
             "decoder prefill: %d tokens do not fit the KV cache (%d cached, room for %d "
             "tokens in all)", n, D->len, D->max_len);
  BAM_CHECK(check_tokens(D, tokens, n, "decoder prefill"));
  forward_rows(D, tokens, n, logits);
  return BAM_OK;
}

bam_status bam_decoder_step(bam_decoder *D, int32_t token, float *logits) {
  if (!D) BAM_FAIL(BAM_ERR_ARG, "decoder step: NULL decoder");
  if (D->len >= D->max_len)
    BAM_FAIL(BAM_ERR_ARG, "decoder step: the KV cache is full (%d tokens)", D->max_len);
  BAM_CHECK(check_tokens(D, &token, 1, "decoder step"));
  forward_rows(D, &token, 1, logits);
  return BAM_OK;
}
