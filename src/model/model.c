/* model: allocation, forward and backward of the dense parallel-attention transformer.
 *
 * Per layer l (x = residual input, (B*T, d) rows):
 *   h = LN_l(x)
 *   q = h Wq^T, k = h Wk^T, v = h Wv^T;  RoPE(q), RoPE(k) at positions 0..T-1
 *   a = attention(q, k, v) Wo^T
 *   s = silu(h Wgate^T) * (h Wup^T);  f = s Wdown^T
 *   x' = x + a + f
 * then xf = LN_f(x_L), logits = xf W_head^T, loss = mean over non-ignored targets of the
 * cross-entropy.
 *
 * Memory: every activation buffer is carved from ONE allocation made in bam_model_create,
 * sized for (max_batch, seq_len); a forward on (B, T) uses the first B*T rows of each
 * per-layer slice (and the first B*H*T*T entries of each probability slice), indexed with
 * the ACTUAL T. Nothing is allocated in forward or backward, so peak memory is known at
 * start-up (act_bytes). */
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "bam/kernels.h"
#include "bam/model.h"

/* Element-wise loops shorter than this stay serial: forking a thread team costs more than
 * streaming this many floats through one core. */
#define PAR_MIN_WORK 16384L

struct bam_acts {
  /* ---- saved by the forward pass for the backward pass ---- */
  float *res;       /* (L+1, BT, d) residual stream: res[0] = embeddings, res[l+1] = layer l out;
                       res[l] is layer l's input x, res[L] the final norm's input */
  float *ln_out;    /* (L, BT, d)  h = LN_l(x) */
  float *ln_mean;   /* (L, BT) */
  float *ln_rstd;   /* (L, BT) */
  float *q;         /* (L, BT, d)   after RoPE */
  float *k;         /* (L, BT, kvd) after RoPE */
  float *v;         /* (L, BT, kvd) */
  float *lse;       /* (L, B, H, T) log of each attention row's softmax normaliser */
  float *att;       /* (L, BT, d)  attention output before Wo (heads concatenated) */
  float *gate;      /* (L, BT, f)  h Wgate^T */
  float *up;        /* (L, BT, f)  h Wup^T */
  float *swi;       /* (L, BT, f)  silu(gate) * up */
  float *lnf_out;   /* (BT, d) */
  float *lnf_mean;  /* (BT) */
  float *lnf_rstd;  /* (BT) */
  float *logits;    /* (BT, V); the logit gradient after backward */
  float *losses;    /* (BT) per-token cross-entropy, 0 where ignored */
  int32_t *tokens;  /* (BT) copy of the inputs (embedding backward) */
  int32_t *targets; /* (BT) copy of the targets (loss backward) */
  /* ---- backward scratch, reused by every layer ---- */
  float *dres;    /* (BT, d) gradient of the residual stream */
  float *dh;      /* (BT, d) gradient of h (sum of the q, k, v, gate, up paths); also the
                     FFN-branch output f during the forward pass */
  float *dq;      /* (BT, d) */
  float *dk;      /* (BT, kvd) */
  float *dv;      /* (BT, kvd) */
  float *datt;    /* (BT, d) */
  float *dh_att;  /* (BT, d) the attention branch's part of dh (summed into dh after) */
  float *dgate;   /* (BT, f) */
  float *dup;     /* (BT, f) */
  float *dswi;    /* (BT, f) */
  float *att_scratch; /* bam_attention_scratch_floats(B, T, Hkv, hd): K, V transposed */
  /* ---- state of the last forward ---- */
  int has_targets; /* the last forward had targets and backward has not consumed it */
  long n_valid;    /* non-ignored targets of the last forward */
  void *mem;       /* the one allocation everything above points into */
};

/* ---- allocation ---- */

/* The activation layout: with base == NULL only measures, otherwise also points every
 * buffer into base. Each buffer starts on a 64-byte boundary. Returns the bytes needed. */
static size_t act_layout(bam_acts *a, const bam_model_shape *s, size_t B, char *base) {
  const size_t L = (size_t)s->n_layers, d = (size_t)s->d_model, kvd = (size_t)bam_kv_dim(s),
               f = (size_t)s->d_ff, V = (size_t)s->vocab_size, H = (size_t)s->n_heads,
               T = (size_t)s->seq_len, BT = B * T, att = B * H * T;
  size_t off = 0;
#define SLOT(field, count)                                  \
  do {                                                      \
    if (base) a->field = (void *)(base + off);              \
    off += ((count) * sizeof *a->field + 63) & ~(size_t)63; \
  } while (0)
  SLOT(res, (L + 1) * BT * d);
  SLOT(ln_out, L * BT * d);
  SLOT(ln_mean, L * BT);
  SLOT(ln_rstd, L * BT);
  SLOT(q, L * BT * d);
  SLOT(k, L * BT * kvd);
  SLOT(v, L * BT * kvd);
  SLOT(lse, L * att);
  SLOT(att, L * BT * d);
  SLOT(gate, L * BT * f);
  SLOT(up, L * BT * f);
  SLOT(swi, L * BT * f);
  SLOT(lnf_out, BT * d);
  SLOT(lnf_mean, BT);
  SLOT(lnf_rstd, BT);
  SLOT(logits, BT * V);
  SLOT(losses, BT);
  SLOT(tokens, BT);
  SLOT(targets, BT);
  SLOT(dres, BT * d);
  SLOT(dh, BT * d);
  SLOT(dq, BT * d);
  SLOT(dk, BT * kvd);
  SLOT(dv, BT * kvd);
  SLOT(datt, BT * d);
  SLOT(dgate, BT * f);
  SLOT(dup, BT * f);
  SLOT(dswi, BT * f);
  SLOT(att_scratch, bam_attention_scratch_floats((int)B, (int)T, s->n_kv_heads, bam_head_dim(s)));
  SLOT(dh_att, BT * d);
#undef SLOT
  return off;
}

bam_status bam_model_create(bam_model **out, const bam_model_shape *shape, int max_batch) {
  if (!out) BAM_FAIL(BAM_ERR_ARG, "bam_model_create: NULL output pointer");
  *out = NULL;
  BAM_CHECK(bam_model_shape_check(shape));
  if (max_batch < 1)
    BAM_FAIL(BAM_ERR_ARG, "bam_model_create: max_batch = %d, must be >= 1", max_batch);
  if ((int64_t)max_batch * shape->seq_len > INT_MAX)
    BAM_FAIL(BAM_ERR_ARG, "bam_model_create: max_batch %d * seq_len %d exceeds INT_MAX rows",
             max_batch, shape->seq_len);

  bam_status st = BAM_OK;
  bam_model *m = NULL;
  BAM_CHECK(bam_alloc_checked((void **)&m, sizeof *m, "the model struct"));
  m->shape = *shape;
  m->max_batch = max_batch;
  m->concurrent_branches = -1;
  m->n_tensors = bam_model_tensors(shape, m->tensors, &m->n_params);

  const size_t param_bytes = m->n_params * sizeof(float);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->params_mem, param_bytes, "parameters"), fail);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->grads_mem, param_bytes, "gradients"), fail);
  bam_params_view(&m->params, shape, m->params_mem);
  bam_params_view(&m->grads, shape, m->grads_mem);

  const int hd = bam_head_dim(shape);
  const size_t rope_n = (size_t)shape->seq_len * (size_t)(hd / 2);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->rope_cos, rope_n * sizeof(float), "RoPE cos"),
                 fail);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->rope_sin, rope_n * sizeof(float), "RoPE sin"),
                 fail);
  bam_rope_table(m->rope_cos, m->rope_sin, shape->seq_len, hd, shape->rope_base);

  /* Activations: measure, allocate once, carve. */
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->acts, sizeof *m->acts, "the activation table"),
                 fail);
  const size_t act_bytes = act_layout(m->acts, shape, (size_t)max_batch, NULL);
  char what[96];
  snprintf(what, sizeof what, "activations (batch %d x seq_len %d)", max_batch, shape->seq_len);
  BAM_CHECK_GOTO(st, bam_alloc_checked(&m->acts->mem, act_bytes, what), fail);
  act_layout(m->acts, shape, (size_t)max_batch, m->acts->mem);
  m->act_bytes = act_bytes + 2 * rope_n * sizeof(float);
  *out = m;
  return BAM_OK;

fail:
  bam_model_free(&m);
  return st;
}

void bam_model_free(bam_model **mp) {
  if (!mp || !*mp) return;
  bam_model *m = *mp;
  if (m->acts) bam_free(m->acts->mem);
  bam_free(m->acts);
  bam_free(m->rope_cos);
  bam_free(m->rope_sin);
  bam_free(m->params_mem);
  bam_free(m->grads_mem);
  bam_free(m);
  *mp = NULL;
}

void bam_model_zero_grad(bam_model *m) { memset(m->grads_mem, 0, m->n_params * sizeof(float)); }

float *bam_model_logits(bam_model *m) { return m->acts->logits; }
const float *bam_model_token_losses(const bam_model *m) { return m->acts->losses; }

/* ---- forward ---- */

/* Pointers to layer l's slices of the parameters (or gradients) and saved activations.
 * Activation slices have the stride of the allocation (max_batch * seq_len rows); within a
 * slice the first B*T rows are used. */
typedef struct {
  float *ln, *wq, *wk, *wv, *wo, *w_gate, *w_up, *w_down;
} layer_params;

static layer_params layer_of(const bam_params *p, const bam_model_shape *s, int l) {
  const size_t d = (size_t)s->d_model, kvd = (size_t)bam_kv_dim(s), f = (size_t)s->d_ff;
  const size_t L = (size_t)l;
  return (layer_params){
      .ln = p->ln + L * d,
      .wq = p->wq + L * d * d,
      .wk = p->wk + L * kvd * d,
      .wv = p->wv + L * kvd * d,
      .wo = p->wo + L * d * d,
      .w_gate = p->w_gate + L * f * d,
      .w_up = p->w_up + L * f * d,
      .w_down = p->w_down + L * d * f,
  };
}

typedef struct {
  float *x, *x_next, *h, *mean, *rstd, *q, *k, *v, *lse, *att, *gate, *up, *swi;
} layer_acts;

static layer_acts acts_of(const bam_model *m, int l) {
  const bam_model_shape *s = &m->shape;
  const bam_acts *a = m->acts;
  const size_t rows = (size_t)m->max_batch * (size_t)s->seq_len; /* slice stride in rows */
  const size_t d = (size_t)s->d_model, kvd = (size_t)bam_kv_dim(s), f = (size_t)s->d_ff;
  const size_t att = (size_t)m->max_batch * (size_t)s->n_heads * (size_t)s->seq_len;
  const size_t L = (size_t)l;
  return (layer_acts){
      .x = a->res + L * rows * d,
      .x_next = a->res + (L + 1) * rows * d,
      .h = a->ln_out + L * rows * d,
      .mean = a->ln_mean + L * rows,
      .rstd = a->ln_rstd + L * rows,
      .q = a->q + L * rows * d,
      .k = a->k + L * rows * kvd,
      .v = a->v + L * rows * kvd,
      .lse = a->lse + L * att,
      .att = a->att + L * rows * d,
      .gate = a->gate + L * rows * f,
      .up = a->up + L * rows * f,
      .swi = a->swi + L * rows * f,
  };
}

/* concurrent_branches resolved: auto needs two threads (a dense block's attention and FFN
 * balance: 8d^2 + 2Td against 6df at the shapes this project trains) and small products
 * (BAM_CONCURRENT_MAX_D). A parallel region with an if clause that is false runs on one
 * thread as if it were not there. */
static int branches_concurrent(const bam_model *m) {
  if (m->concurrent_branches == 0 || omp_get_max_threads() < 2 || omp_in_parallel()) return 0;
  return m->concurrent_branches > 0 || m->shape.d_model <= BAM_CONCURRENT_MAX_D;
}

bam_status bam_model_forward(bam_model *m, const int32_t *tokens, const int32_t *targets, int B,
                             int T, float *loss) {
  const bam_model_shape *s = &m->shape;
  bam_acts *a = m->acts;
  if (B < 1 || B > m->max_batch)
    BAM_FAIL(BAM_ERR_ARG, "model forward: batch %d outside [1, %d] (the size given at creation)", B,
             m->max_batch);
  if (T < 1 || T > s->seq_len)
    BAM_FAIL(BAM_ERR_ARG, "model forward: sequence length %d outside [1, seq_len = %d]", T,
             s->seq_len);
  if (!tokens) BAM_FAIL(BAM_ERR_ARG, "model forward: NULL tokens");
  const int BT = B * T, d = s->d_model, kvd = bam_kv_dim(s), f = s->d_ff, V = s->vocab_size,
            H = s->n_heads, Hkv = s->n_kv_heads, hd = bam_head_dim(s);

  /* Validate ids before they index anything: a bad shard must not become a wild read. */
  for (int i = 0; i < BT; i++) {
    if (tokens[i] < 0 || tokens[i] >= V)
      BAM_FAIL(BAM_ERR_DATA, "model forward: token %d at (%d, %d) outside vocabulary [0, %d)",
               tokens[i], i / T, i % T, V);
    if (targets && targets[i] >= V)
      BAM_FAIL(BAM_ERR_DATA, "model forward: target %d at (%d, %d) outside vocabulary [0, %d)",
               targets[i], i / T, i % T, V);
  }
  a->has_targets = 0; /* until this forward completes with targets */
  memcpy(a->tokens, tokens, (size_t)BT * sizeof *tokens);
  m->last_B = B;
  m->last_T = T;

  bam_embedding_forward(a->res, tokens, m->params.wte, BT, d);
  const int concurrent = branches_concurrent(m);
  for (int l = 0; l < s->n_layers; l++) {
    layer_params w = layer_of(&m->params, s, l);
    layer_acts x = acts_of(m, l);
    bam_layernorm_forward(x.h, x.mean, x.rstd, x.x, w.ln, BT, d, s->norm_eps);
    float *ffn_out = a->dh; /* backward scratch, free during the forward pass */
    /* The two branches read h and write apart: concurrently, one thread each. */
#pragma omp parallel num_threads(2) if (concurrent)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      if (tid == 1 || nt == 1) { /* attention branch */
        bam_matmul_forward(x.q, x.h, w.wq, BT, d, d);
        bam_matmul_forward2(x.k, w.wk, x.v, w.wv, x.h, BT, d, kvd);
        bam_rope_forward(x.q, m->rope_cos, m->rope_sin, B, T, H, hd, 0);
        bam_rope_forward(x.k, m->rope_cos, m->rope_sin, B, T, Hkv, hd, 0);
        bam_attention_forward(x.att, x.lse, a->att_scratch, x.q, x.k, x.v, B, T, H, Hkv, hd);
        bam_matmul_forward(x.x_next, x.att, w.wo, BT, d, d); /* a, summed below */
      }
      if (tid == 0) { /* FFN branch, reading the same h (parallel block) */
        bam_matmul_forward2(x.gate, w.w_gate, x.up, w.w_up, x.h, BT, d, f);
        bam_swiglu_forward(x.swi, x.gate, x.up, (long)BT * f);
        bam_matmul_forward(ffn_out, x.swi, w.w_down, BT, f, d);
      }
    }
    /* x' = x + a + f (element-wise: the order of evaluation is fixed, thread-independent) */
    const long n = (long)BT * d;
    float *xn = x.x_next;
    const float *xi = x.x;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (long i = 0; i < n; i++) xn[i] = xi[i] + xn[i] + ffn_out[i];
  }
  const float *x_last = a->res + (size_t)s->n_layers * (size_t)m->max_batch * s->seq_len * d;
  bam_layernorm_forward(a->lnf_out, a->lnf_mean, a->lnf_rstd, x_last, m->params.ln_f, BT, d,
                        s->norm_eps);
  bam_matmul_forward(a->logits, a->lnf_out, m->params.w_head, BT, d, V);

  if (!targets) return BAM_OK;

  memcpy(a->targets, targets, (size_t)BT * sizeof *targets);
  bam_crossentropy_forward(a->losses, a->logits, targets, BT, V);
  /* Mean over the non-ignored tokens, summed in double in a fixed (row) order. */
  double sum = 0.0;
  long n_valid = 0;
  for (int i = 0; i < BT; i++) {
    if (targets[i] < 0) continue;
    sum += a->losses[i];
    n_valid++;
  }
  /* With every target ignored there is nothing to average: the loss is defined as 0 and
   * backward adds no gradient (rather than 0/0 = NaN poisoning an accumulated batch). */
  m->last_loss = n_valid > 0 ? (float)(sum / (double)n_valid) : 0.0f;
  a->n_valid = n_valid;
  a->has_targets = 1;
  if (loss) *loss = m->last_loss;
  if (!isfinite(m->last_loss))
    BAM_FAIL(BAM_ERR_NUMERIC, "model forward: loss is %g on a batch of %d x %d tokens",
             (double)m->last_loss, B, T);
  return BAM_OK;
}

/* ---- backward ---- */

bam_status bam_model_backward(bam_model *m, float grad_scale) {
  const bam_model_shape *s = &m->shape;
  bam_acts *a = m->acts;
  if (!a->has_targets)
    BAM_FAIL(BAM_ERR_ARG,
             "model backward: the last forward had no targets, or its backward already ran "
             "(the logits buffer now holds gradients)");
  a->has_targets = 0;
  const int B = m->last_B, T = m->last_T, BT = B * T, d = s->d_model, kvd = bam_kv_dim(s),
            f = s->d_ff, V = s->vocab_size, H = s->n_heads, Hkv = s->n_kv_heads,
            hd = bam_head_dim(s);
  const size_t nd = (size_t)BT * d * sizeof(float), nkv = (size_t)BT * kvd * sizeof(float),
               nf = (size_t)BT * f * sizeof(float);

  /* d(loss)/d(logits) = (softmax - onehot) / n_valid per valid row, times grad_scale.
   * The fused kernel overwrites the logits with it: no second (BT, V) buffer. */
  const int concurrent = branches_concurrent(m);
  const float scale = a->n_valid > 0 ? grad_scale / (float)a->n_valid : 0.0f;
  bam_crossentropy_fused_inplace(a->logits, a->losses, a->targets, scale, BT, V);
  const float *dlogits = a->logits;

  /* Head and final norm. Tied: grads.w_head is grads.wte, so the head's gradient lands in
   * the embedding's buffer and the embedding backward below adds to it. */
  memset(a->dh, 0, nd);
  bam_matmul_backward(a->dh, m->grads.w_head, dlogits, a->lnf_out, m->params.w_head, BT, d, V);
  memset(a->dres, 0, nd);
  const float *x_last = a->res + (size_t)s->n_layers * (size_t)m->max_batch * s->seq_len * d;
  bam_layernorm_backward(a->dres, m->grads.ln_f, a->dh, x_last, m->params.ln_f, a->lnf_mean,
                         a->lnf_rstd, BT, d);

  for (int l = s->n_layers - 1; l >= 0; l--) {
    layer_params w = layer_of(&m->params, s, l);
    layer_params g = layer_of(&m->grads, s, l);
    layer_acts x = acts_of(m, l);
    /* x' = x + a + f: dres (= dx') flows unchanged into both branches and into dx. */
    const float *dy = a->dres;
#pragma omp parallel num_threads(2) if (concurrent)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      if (tid == 0) {
        /* FFN branch: f = s Wdown^T, s = silu(gate) * up, gate = h Wgate^T, up = h Wup^T */
        memset(a->dswi, 0, nf);
        bam_matmul_backward(a->dswi, g.w_down, dy, x.swi, w.w_down, BT, f, d);
        memset(a->dgate, 0, nf);
        memset(a->dup, 0, nf);
        bam_swiglu_backward(a->dgate, a->dup, a->dswi, x.gate, x.up, (long)BT * f);
        memset(a->dh, 0, nd);
        bam_matmul_backward(a->dh, g.w_gate, a->dgate, x.h, w.w_gate, BT, d, f);
        bam_matmul_backward(a->dh, g.w_up, a->dup, x.h, w.w_up, BT, d, f);
      }
      if (tid == 1 || nt == 1) {
        /* Attention branch: a = att Wo^T, att = attention(rope(q), rope(k), v), its dh apart */
        memset(a->datt, 0, nd);
        bam_matmul_backward(a->datt, g.wo, dy, x.att, w.wo, BT, d, d);
        memset(a->dq, 0, nd);
        memset(a->dk, 0, nkv);
        memset(a->dv, 0, nkv);
        bam_attention_backward(a->dq, a->dk, a->dv, a->att_scratch, a->datt, x.att, x.lse, x.q,
                               x.k, x.v, B, T, H, Hkv, hd);
        /* The saved q, k are post-RoPE; rotate their gradients back to the pre-RoPE frame. */
        bam_rope_backward(a->dq, m->rope_cos, m->rope_sin, B, T, H, hd, 0);
        bam_rope_backward(a->dk, m->rope_cos, m->rope_sin, B, T, Hkv, hd, 0);
        memset(a->dh_att, 0, nd);
        bam_matmul_backward(a->dh_att, g.wq, a->dq, x.h, w.wq, BT, d, d);
        bam_matmul_backward(a->dh_att, g.wk, a->dk, x.h, w.wk, BT, d, kvd);
        bam_matmul_backward(a->dh_att, g.wv, a->dv, x.h, w.wv, BT, d, kvd);
      }
    }
    {
      float *dh = a->dh;
      const float *dha = a->dh_att;
      const long n = (long)BT * d;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
      for (long i = 0; i < n; i++) dh[i] += dha[i];
    }
    /* h = LN(x): dx = dx' + LN_backward(dh). The kernel accumulates into dres, which holds
     * dx' (the residual path); both branches above have finished reading it. */
    bam_layernorm_backward(a->dres, g.ln, a->dh, x.x, w.ln, x.mean, x.rstd, BT, d);
  }
  bam_embedding_backward(m->grads.wte, a->dres, a->tokens, BT, d);
  return BAM_OK;
}
