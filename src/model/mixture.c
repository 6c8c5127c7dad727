/* model/mixture: allocation, forward and backward of the BTX / BAM mixture (mixture.h,
 * method.md section 3). Per layer l, on the N = B*T token rows:
 *
 *   h = LN_l(x)
 *   attention branch  BTX: a = Attn(h), the dense attention of model.c
 *                     BAM: g = softmax(h Wa^T) (N, Ea), optionally kept on its top-k only;
 *                          a = sum_j g_j * (Attn_j(h) Wo_j^T)   row-wise scale, expert order
 *   FFN branch        p = softmax(h Wr^T) (N, Ef), top-k per token (ties: lower index),
 *                     gate w = p_i, or p_i / sum_topk p with ffn_renormalize;
 *                     MoE(h)_t = sum over t's kept assignments (rank order) of w * FFN_i(h_t)
 *   x' = x + a + MoE(h)
 *   aux_l = lb_coef * L_lb + z_coef * L_z
 * then logits = LN_f(x_L) W_head^T and loss = mean token cross-entropy + sum_l aux_l.
 *
 * FFN dispatch. The top-k assignments of all tokens are grouped by expert into one
 * contiguous "dispatch" array of at most N*k rows: expert 0's rows first, each expert's rows
 * in token order (disp_off[e] .. disp_off[e+1]). Each expert's SwiGLU then runs as three
 * ordinary matmuls on its contiguous rows (cblas), like the dense FFN. Gathering copies h
 * rows in; combining reads, for every token, its k dispatch rows in top-k rank order: each
 * output row is written by one thread in a fixed order, so no atomics and bitwise
 * reproducible results. The dispatch is recorded (slot -> row, row -> slot, offsets) so the
 * backward pass replays it exactly.
 *
 * Capacity (capacity_factor c > 0): within each sequence, expert i accepts at most
 * C = ceil(c * T * k / Ef) assignments, first come first served in token order; a token's
 * k assignments go to distinct experts, so the order among them does not matter. A dropped
 * assignment contributes nothing (its token keeps its other assignments, whose gates are
 * NOT re-normalised over the survivors: gating is decided before capacity). f_i counts only
 * the kept assignments.
 *
 * Load balance (Switch Transformer): L_lb = Ef sum_i f_i P_i with f_i = kept_i / (n k) a
 * constant and P_i = (1/n) sum_t p_ti over a group of n tokens: each sequence
 * (lb_per_sequence, averaged over the B sequences) or the whole batch. Either way
 * dL_lb/dp_ti = Ef f_i(group of t) / N, since the mean over B sequences of a mean over T
 * tokens is a mean over N. z-loss: L_z = (1/N) sum_t lse_t^2, lse_t = logsumexp(z_t), so
 * dL_z/dz_tj = 2 lse_t p_tj / N. Both use every token, including ignored targets.
 *
 * Gradients through the routers (the top-k choice itself is piecewise constant):
 *   gate:      dL/dw for one assignment is <dMoE_t, FFN_i(h_t)>; we get it without keeping
 *              FFN_i(h_t) from <dy W_down_i, s> = <dy, s W_down_i^T> (s = the SwiGLU output,
 *              saved anyway for dW_down), before the gate scales the row.
 *   renorm:    w_i = p_i / S, S = sum_{j in topk} p_j  =>  dp_m = (dw_m - sum_i dw_i w_i) / S
 *   softmax:   dz_j = p_j (dp_j - sum_l p_l dp_l)
 *   BAM gates: dg_tj = <dMoA_t, o_tj> = <dy_t Wo_j, att_tj> (the same trick: o_j is never
 *              stored), through the kept entries only when att_top_k > 0.
 *
 * Memory: as model.c, one allocation made at creation for (max_batch, seq_len), carved into
 * named slices; a forward on (B, T) uses the first B*T rows of each slice. The dispatch
 * arena of each layer has N*k rows (the worst case: an expert may take every token), and BAM
 * keeps q, att, the attention probabilities (and with KV experts k, v) per attention expert:
 * Ea times the dense attention memory, the price of the method. Nothing is allocated in
 * forward or backward. */
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "bam/kernels.h"
#include "bam/mixture.h"

/* Loops shorter than this stay serial (as in model.c). */
#define PAR_MIN_WORK 16384L

/* Named views into a flat buffer laid out by bam_mixture_tensors (params or grads). Absent
 * tensors (att_router for BTX, w_head when tied) are NULL, w_head then aliases wte. */
typedef struct {
  float *wte, *ln, *ln_f, *w_head, *att_router, *wq, *wk, *wv, *wo, *ffn_router, *w_gate, *w_up,
      *w_down;
} mix_params;

/* Sizes used everywhere, derived once from the shape. */
typedef struct {
  int L, d, kvd, f, V, H, Hkv, hd;
  int bam;  /* attention experts with a router (BAM, both kinds) */
  int Ea;   /* attention router width: n_att_experts for BAM, 0 for BTX */
  int nA;   /* attention experts computed per layer: Ea for BAM, 1 for BTX */
  int nKV;  /* K/V projections per layer: Ea for BAM with KV experts, 1 otherwise */
  int ka;   /* att_top_k (0: soft routing over all Ea) */
  int Ef, k;
  size_t R;  /* rows of one activation slice: max_batch * seq_len */
  size_t LT; /* floats of one attention lse slice: max_batch * H * seq_len */
  /* Expert parallelism (1 and 0 on the single-process path, where the rest reduces to the
   * fields above: a0 = 0, nAl = nA, nKVl = nKV, RA = R, LTA = LT, GRk = R k). */
  int G, gr;  /* group size, this rank's position */
  int Ga;     /* G for BAM's attention experts (run on the whole group), 1 for BTX */
  int a0, nAl;/* own attention experts [a0, a0 + nAl) (BTX: the one dense attention) */
  int kv0, nKVl; /* own K/V sets [kv0, kv0 + nKVl) */
  int f0, El; /* own FFN experts [f0, f0 + El) */
  size_t RA, LTA; /* attention-expert rows and lse: Ga R, Ga LT */
  /* First expert STORED in the parameter buffers: a0, kv0, f0 when the mixture holds only
   * its own experts (bam_mixture_create_sharded), else 0 (every expert stored). */
  int pa0, pkv0, pf0;
  size_t GRk; /* dispatch rows an expert owner may receive: G R k */
} dims;

struct bam_mix_acts {
  mix_params p, g; /* parameter and gradient views */
  /* ---- saved by the forward pass for the backward pass ---- */
  float *res;         /* (L+1, R, d) residual stream, res[l] = layer l's input */
  float *ln_out;      /* (L, R, d) h = LN_l(x) */
  float *ln_mean;     /* (L, R) */
  float *ln_rstd;     /* (L, R) */
  float *q;           /* (L, nA, R, d)    per attention expert, after RoPE */
  float *k;           /* (L, nKV, R, kvd) after RoPE */
  float *v;           /* (L, nKV, R, kvd) */
  float *lse;         /* (L, nA, LT)      attention softmax log-normalisers per expert */
  float *att;         /* (L, nA, R, d)    attention output before Wo */
  float *att_p;       /* (L, RA, Ea) softmax of the attention router (BAM) */
  float *att_g;       /* (L, RA, Ea) gate used: att_p, or att_p on its top-k and 0 elsewhere */
  int32_t *att_idx;   /* (L, RA, ka) top-k attention experts per token, descending */
  int32_t *att_active;/* (L, Ea) 1 if any token kept the expert (else it was skipped) */
  float *ffn_p;       /* (L, R, Ef) softmax of the FFN router */
  float *ffn_lse;     /* (L, R) logsumexp of the FFN router logits (z-loss) */
  int32_t *ffn_idx;   /* (L, R, k) top-k FFN experts per token, descending p */
  float *ffn_w;       /* (L, R, k) gates of those assignments */
  int32_t *ffn_row;   /* (L, R, k) dispatch row of each assignment, -1 if dropped */
  int32_t *disp_slot; /* (L, R*k) assignment (token*k + rank) of each dispatch row */
  int32_t *disp_off;  /* (L, Ef+1) first dispatch row of each expert; [Ef] = rows used */
  double *ffn_frac;   /* (L, max_batch, Ef) f_i per load-balance group (row 0 if per batch) */
  float *gate;        /* (L, R*k, f) dispatch rows: h Wgate_i^T */
  float *up;          /* (L, R*k, f) h Wup_i^T */
  float *swi;         /* (L, R*k, f) silu(gate) * up */
  float *lnf_out;     /* (R, d) */
  float *lnf_mean;    /* (R) */
  float *lnf_rstd;    /* (R) */
  float *logits;      /* (R, V); the logit gradient after backward */
  float *losses;      /* (R) per-token cross-entropy, 0 where ignored */
  int32_t *tokens;    /* (R) */
  int32_t *targets;   /* (R) */
  /* ---- scratch, reused by every layer ---- */
  float *dres;        /* (R, d) gradient of the residual stream */
  float *dh;          /* (R, d) gradient of h; the MoE output during the forward pass */
  float *datt;        /* (R, d) attention-output gradient; one expert's o during forward */
  float *tmp;         /* (R, d) gate-scaled dy for a BAM expert's dWo */
  float *dq;          /* (R, d) */
  float *dk;          /* (R, kvd) */
  float *dv;          /* (R, kvd) */
  float *att_scratch; /* bam_attention_scratch_floats(Ga max_batch, T, Hkv, hd) */
  float *drouter;     /* (R, Ef) FFN router probability, then logit, gradient */
  float *dg_att;      /* (RA, Ea) attention gate, then router logit, gradient (BAM) */
  float *dh_att;      /* (R, d) the attention branch's dh (single process; EP uses ep_b) */
  float *dgate_w;     /* (R*k) dL/dw per FFN assignment */
  float *xg;          /* (R*k, d) gathered h rows */
  float *yg;          /* (R*k, d) expert outputs (forward); gathered dy, then dX (backward) */
  float *dswi;        /* (R*k, f) */
  float *dgate;       /* (R*k, f) */
  float *dup;         /* (R*k, f) */
  int32_t *seq_count; /* (Ef) per-sequence assignment counter of the dispatch */
  /* ---- expert parallelism only (empty when G = 1); the arrays above with R rows that
   * hold group data are RA (attention) or GRk (dispatch) rows long ---- */
  float *hg;          /* (L, RA, d) h of the group's sequences, rank order (BAM) */
  float *xr;          /* (L, GRk, d) received dispatch rows, own-expert order */
  int32_t *ep_cnt;    /* (L, G, El) rows received from each source for each own expert */
  float *ep_a, *ep_b, *ep_c; /* (RA * max(d, Ea)) attention exchange scratch */
  float *sbuf;        /* (R k, d+1) dispatch rows sent and returned */
  float *rbuf, *ebuf; /* (GRk, d+1) rows received: in source order, in expert order */
  float *ep_w;        /* (GRk) gates, then gate gradients, of the received rows */
  /* ---- state of the last forward ---- */
  int has_targets;
  long n_valid;
  void *mem;
};

/* ---- sizes, views, allocation ---- */

static dims dims_of(const bam_mixture_shape *s, int max_batch, int G, int gr, int sharded) {
  const bam_model_shape *b = &s->base;
  dims z;
  z.L = b->n_layers;
  z.d = b->d_model;
  z.kvd = bam_kv_dim(b);
  z.f = b->d_ff;
  z.V = b->vocab_size;
  z.H = b->n_heads;
  z.Hkv = b->n_kv_heads;
  z.hd = bam_head_dim(b);
  z.bam = s->method != BAM_METHOD_BTX;
  z.Ea = z.bam ? s->n_att_experts : 0;
  z.nA = z.bam ? s->n_att_experts : 1;
  z.nKV = s->method == BAM_METHOD_BAM ? s->n_att_experts : 1;
  z.ka = z.bam ? s->att_top_k : 0;
  z.Ef = s->n_ffn_experts;
  z.k = s->ffn_top_k;
  z.R = (size_t)max_batch * (size_t)b->seq_len;
  z.LT = (size_t)max_batch * (size_t)b->n_heads * (size_t)b->seq_len;
  z.G = G;
  z.gr = gr;
  z.Ga = z.bam ? G : 1;
  z.nAl = z.nA / z.Ga;
  z.a0 = gr * z.nAl * (z.Ga > 1);
  z.nKVl = z.nKV == 1 ? 1 : z.nAl;
  z.kv0 = z.nKV == 1 ? 0 : z.a0;
  z.El = z.Ef / G;
  z.f0 = gr * z.El;
  z.RA = (size_t)z.Ga * z.R;
  z.LTA = (size_t)z.Ga * z.LT;
  z.GRk = (size_t)G * z.R * (size_t)z.k;
  z.pa0 = sharded && z.bam ? z.a0 : 0;
  z.pkv0 = sharded && z.nKV > 1 ? z.kv0 : 0;
  z.pf0 = sharded ? z.f0 : 0;
  return z;
}

static dims dims_m(const bam_mixture *m) {
  return dims_of(&m->shape, m->max_batch, m->ep_size, m->ep_rank, m->sharded);
}

static void params_view(mix_params *p, const bam_mixture *m, float *base) {
  const struct {
    const char *name;
    float **view;
  } views[] = {{"wte", &p->wte},         {"ln", &p->ln},
               {"ln_f", &p->ln_f},       {"w_head", &p->w_head},
               {"att_router", &p->att_router}, {"wq", &p->wq},
               {"wk", &p->wk},           {"wv", &p->wv},
               {"wo", &p->wo},           {"ffn_router", &p->ffn_router},
               {"w_gate", &p->w_gate},   {"w_up", &p->w_up},
               {"w_down", &p->w_down}};
  memset(p, 0, sizeof *p);
  for (int i = 0; i < m->n_tensors; i++)
    for (size_t j = 0; j < sizeof views / sizeof views[0]; j++)
      if (!strcmp(m->tensors[i].name, views[j].name)) *views[j].view = base + m->tensors[i].offset;
  if (m->shape.base.tie_embeddings) p->w_head = p->wte;
}

/* The activation layout: with base == NULL only measures, otherwise also points every
 * buffer into base. Each buffer starts on a 64-byte boundary. Returns the bytes needed. */
static size_t act_layout(bam_mix_acts *a, const dims *z, size_t max_batch, char *base) {
  const size_t L = (size_t)z->L, d = (size_t)z->d, kvd = (size_t)z->kvd, f = (size_t)z->f,
               V = (size_t)z->V, R = z->R, Rk = R * (size_t)z->k, nA = (size_t)z->nAl,
               nKV = (size_t)z->nKVl, Ea = (size_t)z->Ea, Ef = (size_t)z->Ef, ka = (size_t)z->ka,
               LT = z->LTA, RA = z->RA, GRk = z->GRk,
               ep = z->G > 1, epa = z->Ga > 1, dE = d > Ea ? d : Ea;
  size_t off = 0;
#define SLOT(field, count)                                  \
  do {                                                      \
    if (base) a->field = (void *)(base + off);              \
    off += ((count) * sizeof *a->field + 63) & ~(size_t)63; \
  } while (0)
  SLOT(res, (L + 1) * R * d);
  SLOT(ln_out, L * R * d);
  SLOT(ln_mean, L * R);
  SLOT(ln_rstd, L * R);
  SLOT(q, L * nA * RA * d);
  SLOT(k, L * nKV * RA * kvd);
  SLOT(v, L * nKV * RA * kvd);
  SLOT(lse, L * nA * LT);
  SLOT(att, L * nA * RA * d);
  SLOT(att_p, L * RA * Ea);
  SLOT(att_g, L * RA * Ea);
  SLOT(att_idx, L * RA * ka);
  SLOT(att_active, L * Ea);
  SLOT(ffn_p, L * R * Ef);
  SLOT(ffn_lse, L * R);
  SLOT(ffn_idx, L * Rk);
  SLOT(ffn_w, L * Rk);
  SLOT(ffn_row, L * Rk);
  SLOT(disp_slot, L * Rk);
  SLOT(disp_off, L * (Ef + 1));
  SLOT(ffn_frac, L * max_batch * Ef);
  SLOT(gate, L * GRk * f);
  SLOT(up, L * GRk * f);
  SLOT(swi, L * GRk * f);
  SLOT(lnf_out, R * d);
  SLOT(lnf_mean, R);
  SLOT(lnf_rstd, R);
  SLOT(logits, R * V);
  SLOT(losses, R);
  SLOT(tokens, R);
  SLOT(targets, R);
  SLOT(dres, R * d);
  SLOT(dh, R * d);
  SLOT(datt, RA * d);
  SLOT(tmp, z->bam ? RA * d : 0);
  SLOT(dq, RA * d);
  SLOT(dk, RA * kvd);
  SLOT(dv, RA * kvd);
  SLOT(att_scratch, bam_attention_scratch_floats(z->Ga * (int)max_batch, (int)(R / max_batch), z->Hkv, z->hd));
  SLOT(drouter, R * Ef);
  SLOT(dg_att, RA * Ea);
  SLOT(dh_att, R * d);
  SLOT(dgate_w, Rk);
  SLOT(xg, Rk * d);
  SLOT(yg, GRk * d);
  SLOT(dswi, GRk * f);
  SLOT(dgate, GRk * f);
  SLOT(dup, GRk * f);
  SLOT(seq_count, Ef);
  SLOT(hg, epa ? L * RA * d : 0);
  SLOT(xr, ep ? L * GRk * d : 0);
  SLOT(ep_cnt, ep ? L * Ef : 0);
  SLOT(ep_a, epa ? RA * dE : 0);
  SLOT(ep_b, epa ? RA * dE : 0);
  SLOT(ep_c, epa ? RA * dE : 0);
  SLOT(sbuf, ep ? Rk * (d + 1) : 0);
  SLOT(rbuf, ep ? GRk * (d + 1) : 0);
  SLOT(ebuf, ep ? GRk * (d + 1) : 0);
  SLOT(ep_w, ep ? GRk : 0);
#undef SLOT
  return off;
}

/* G > 1: only the experts of rank gr of a group of G (bam_mixture_create_sharded). */
static bam_status create(bam_mixture **out, const bam_mixture_shape *shape, int max_batch, int G,
                         int gr) {
  if (!out) BAM_FAIL(BAM_ERR_ARG, "bam_mixture_create: NULL output pointer");
  *out = NULL;
  BAM_CHECK(bam_mixture_shape_check(shape));
  if (max_batch < 1)
    BAM_FAIL(BAM_ERR_ARG, "bam_mixture_create: max_batch = %d, must be >= 1", max_batch);
  /* Dispatch rows (N*k) and router widths are ints in the kernels and the dispatch tables. */
  const int64_t rows = (int64_t)max_batch * shape->base.seq_len;
  if (rows * shape->ffn_top_k > INT_MAX)
    BAM_FAIL(BAM_ERR_ARG,
             "bam_mixture_create: max_batch %d * seq_len %d * ffn_top_k %d exceeds INT_MAX "
             "dispatch rows",
             max_batch, shape->base.seq_len, shape->ffn_top_k);

  bam_status st = BAM_OK;
  bam_mixture *m = NULL;
  BAM_CHECK(bam_alloc_checked((void **)&m, sizeof *m, "the mixture struct"));
  m->shape = *shape;
  m->max_batch = max_batch;
  m->n_global_tensors = bam_mixture_tensors(shape, m->global_tensors, &m->n_params_global);
  m->n_tensors = bam_mixture_tensors_sharded(shape, G, gr, m->tensors, m->global_offset,
                                             m->expert0, &m->n_params, &m->n_replicated);
  m->sharded = G > 1;

  const size_t param_bytes = m->n_params * sizeof(float);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->params_mem, param_bytes, "parameters"), fail);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->grads_mem, param_bytes, "gradients"), fail);

  const int hd = bam_head_dim(&shape->base);
  const size_t rope_n = (size_t)shape->base.seq_len * (size_t)(hd / 2);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->rope_cos, rope_n * sizeof(float), "RoPE cos"),
                 fail);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->rope_sin, rope_n * sizeof(float), "RoPE sin"),
                 fail);
  bam_rope_table(m->rope_cos, m->rope_sin, shape->base.seq_len, hd, shape->base.rope_base);

  /* Activations: measure, allocate once, carve. */
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&m->acts, sizeof *m->acts, "the activation table"),
                 fail);
  m->ep_comm = MPI_COMM_NULL;
  m->concurrent_branches = -1;
  /* A sharded mixture's activations are sized for its group at once (bam_mixture_set_ep then
   * finds them ready): never the single-process set and the group's at the same time. */
  m->ep_size = G;
  m->ep_rank = G > 1 ? gr : 0;
  m->comm_seconds = 0.0;
  const dims z = dims_of(shape, max_batch, G, m->ep_rank, G > 1);
  const size_t act_bytes = act_layout(m->acts, &z, (size_t)max_batch, NULL);
  char what[128];
  snprintf(what, sizeof what, "mixture activations (batch %d x seq_len %d, %s)", max_batch,
           shape->base.seq_len, bam_method_name(shape->method));
  BAM_CHECK_GOTO(st, bam_alloc_checked(&m->acts->mem, act_bytes, what), fail);
  act_layout(m->acts, &z, (size_t)max_batch, m->acts->mem);
  params_view(&m->acts->p, m, m->params_mem);
  params_view(&m->acts->g, m, m->grads_mem);
  m->act_bytes = act_bytes + 2 * rope_n * sizeof(float);
  *out = m;
  return BAM_OK;

fail:
  bam_mixture_free(&m);
  return st;
}

static bam_status check_ep(const bam_mixture_shape *s, int G) {
  if (G > 1 && s->n_ffn_experts % G)
    BAM_FAIL(BAM_ERR_CONFIG,
             "expert parallelism: ep = %d does not divide the %d FFN experts of the mixture", G,
             s->n_ffn_experts);
  if (G > 1 && s->method != BAM_METHOD_BTX && s->n_att_experts % G)
    BAM_FAIL(BAM_ERR_CONFIG,
             "expert parallelism: ep = %d does not divide the %d attention experts of the %s "
             "mixture", G, s->n_att_experts, bam_method_name(s->method));
  return BAM_OK;
}

bam_status bam_mixture_create(bam_mixture **out, const bam_mixture_shape *shape, int max_batch) {
  return create(out, shape, max_batch, 1, 0);
}

bam_status bam_mixture_create_sharded(bam_mixture **out, const bam_mixture_shape *shape,
                                      int max_batch, MPI_Comm ep_comm) {
  int G = 1, gr = 0;
  if (ep_comm != MPI_COMM_NULL) {
    MPI_Comm_size(ep_comm, &G);
    MPI_Comm_rank(ep_comm, &gr);
  }
  BAM_CHECK(bam_mixture_shape_check(shape));
  BAM_CHECK(check_ep(shape, G));
  BAM_CHECK(create(out, shape, max_batch, G, gr));
  bam_status st = bam_mixture_set_ep(*out, ep_comm);
  if (st != BAM_OK) bam_mixture_free(out);
  return st;
}

double bam_mixture_comm_seconds(const bam_mixture *m) { return m->comm_seconds; }

bam_status bam_mixture_set_ep(bam_mixture *m, MPI_Comm ep_comm) {
  if (!m) BAM_FAIL(BAM_ERR_ARG, "bam_mixture_set_ep: NULL mixture");
  int G = 1, gr = 0;
  if (ep_comm != MPI_COMM_NULL) {
    MPI_Comm_size(ep_comm, &G);
    MPI_Comm_rank(ep_comm, &gr);
  }
  const bam_mixture_shape *s = &m->shape;
  BAM_CHECK(check_ep(s, G));
  if (m->sharded && m->ep_comm != MPI_COMM_NULL && (G != m->ep_size || gr != m->ep_rank))
    BAM_FAIL(BAM_ERR_ARG,
             "this mixture holds only the experts of rank %d of an expert-parallel group of %d: "
             "it cannot change to %s (create another one)", m->ep_rank, m->ep_size,
             G > 1 ? "another group" : "the single-process path");
  if (G != m->ep_size) { /* the group-sized activations: measure, allocate, carve */
    const dims z = dims_of(s, m->max_batch, G, gr, m->sharded);
    const size_t bytes = act_layout(m->acts, &z, (size_t)m->max_batch, NULL);
    void *mem = NULL;
    char what[160];
    snprintf(what, sizeof what, "mixture activations for expert parallelism over %d ranks "
             "(batch %d x seq_len %d, %s)", G, m->max_batch, s->base.seq_len,
             bam_method_name(s->method));
    BAM_CHECK(bam_alloc_checked(&mem, bytes, what));
    bam_free(m->acts->mem);
    m->acts->mem = mem;
    act_layout(m->acts, &z, (size_t)m->max_batch, mem);
    const size_t rope_n = (size_t)s->base.seq_len * (size_t)(bam_head_dim(&s->base) / 2);
    m->act_bytes = bytes + 2 * rope_n * sizeof(float);
  }
  m->ep_comm = G > 1 ? ep_comm : MPI_COMM_NULL;
  m->ep_size = G;
  m->ep_rank = G > 1 ? gr : 0;
  m->acts->has_targets = 0;
  return BAM_OK;
}

void bam_mixture_free(bam_mixture **mp) {
  if (!mp || !*mp) return;
  bam_mixture *m = *mp;
  if (m->acts) bam_free(m->acts->mem);
  bam_free(m->acts);
  bam_free(m->rope_cos);
  bam_free(m->rope_sin);
  bam_free(m->params_mem);
  bam_free(m->grads_mem);
  bam_free(m);
  *mp = NULL;
}

void bam_mixture_zero_grad(bam_mixture *m) {
  memset(m->grads_mem, 0, m->n_params * sizeof(float));
}
float *bam_mixture_logits(bam_mixture *m) { return m->acts->logits; }
const float *bam_mixture_token_losses(const bam_mixture *m) { return m->acts->losses; }

/* ---- per-layer and per-expert slices ---- */

/* Weights of layer l: attention expert j (BTX: j = 0, the (L, ...) tensors are expert 0 of
 * the same formula), its K/V set jk, FFN expert e. Expert-major: (j*L + l) blocks. */
typedef struct {
  float *ln, *att_router, *ffn_router;
} layer_w;
static layer_w layer_w_of(const mix_params *p, const dims *z, int l) {
  return (layer_w){
      .ln = p->ln + (size_t)l * z->d,
      .att_router = p->att_router ? p->att_router + (size_t)l * z->Ea * z->d : NULL,
      .ffn_router = p->ffn_router + (size_t)l * z->Ef * z->d,
  };
}
/* j, jk and e are global expert indices; a sharded mixture stores its own experts only,
 * from pa0, pkv0, pf0 on (dims). */
static float *wq_of(const mix_params *p, const dims *z, int l, int j) {
  return p->wq + ((size_t)(j - z->pa0) * z->L + l) * z->d * z->d;
}
static float *wo_of(const mix_params *p, const dims *z, int l, int j) {
  return p->wo + ((size_t)(j - z->pa0) * z->L + l) * z->d * z->d;
}
static float *wk_of(const mix_params *p, const dims *z, int l, int jk) {
  return p->wk + ((size_t)(jk - z->pkv0) * z->L + l) * z->kvd * z->d;
}
static float *wv_of(const mix_params *p, const dims *z, int l, int jk) {
  return p->wv + ((size_t)(jk - z->pkv0) * z->L + l) * z->kvd * z->d;
}
/* w_gate, w_up (Ef, L, f, d) and w_down (Ef, L, d, f) all have f*d floats per block. */
static float *ffn_w_of(float *t, const dims *z, int l, int e) {
  return t + ((size_t)(e - z->pf0) * z->L + l) * z->f * z->d;
}

/* Saved activations of layer l. */
typedef struct {
  float *x, *x_next, *h, *mean, *rstd;
  float *hA;          /* h of the rows the attention experts run on: h, or the group's (EP) */
  float *xr;          /* received dispatch rows (EP) */
  int32_t *ep_cnt;    /* (G, El) received row counts (EP) */
  float *att_p, *att_g;
  int32_t *att_idx, *att_active;
  float *ffn_p, *ffn_lse, *ffn_w, *gate, *up, *swi;
  int32_t *ffn_idx, *ffn_row, *disp_slot, *disp_off;
  double *ffn_frac;
} layer_acts;

static layer_acts acts_of(const bam_mixture *m, const dims *z, int l) {
  const bam_mix_acts *a = m->acts;
  const size_t L = (size_t)l, R = z->R, Rk = R * (size_t)z->k, d = (size_t)z->d,
               f = (size_t)z->f, RA = z->RA, GRk = z->GRk;
  return (layer_acts){
      .hA = z->Ga > 1 ? a->hg + L * RA * d : a->ln_out + L * R * d,
      .xr = a->xr + L * GRk * d,
      .ep_cnt = a->ep_cnt + L * (size_t)z->Ef,
      .x = a->res + L * R * d,
      .x_next = a->res + (L + 1) * R * d,
      .h = a->ln_out + L * R * d,
      .mean = a->ln_mean + L * R,
      .rstd = a->ln_rstd + L * R,
      .att_p = a->att_p + L * RA * (size_t)z->Ea,
      .att_g = a->att_g + L * RA * (size_t)z->Ea,
      .att_idx = a->att_idx + L * RA * (size_t)z->ka,
      .att_active = a->att_active + L * (size_t)z->Ea,
      .ffn_p = a->ffn_p + L * R * (size_t)z->Ef,
      .ffn_lse = a->ffn_lse + L * R,
      .ffn_w = a->ffn_w + L * Rk,
      .gate = a->gate + L * GRk * f,
      .up = a->up + L * GRk * f,
      .swi = a->swi + L * GRk * f,
      .ffn_idx = a->ffn_idx + L * Rk,
      .ffn_row = a->ffn_row + L * Rk,
      .disp_slot = a->disp_slot + L * Rk,
      .disp_off = a->disp_off + L * (size_t)(z->Ef + 1),
      .ffn_frac = a->ffn_frac + L * (size_t)m->max_batch * (size_t)z->Ef,
  };
}

/* Attention expert j's saved q, att, lse and its K/V set jk's k, v in layer l. */
/* Only the rank's own experts are stored (all of them without EP): j and jk are global
 * expert indices, stored at j - a0 and jk - kv0. */
static float *q_of(const bam_mixture *m, const dims *z, int l, int j) {
  return m->acts->q + ((size_t)l * z->nAl + (size_t)(j - z->a0)) * z->RA * z->d;
}
static float *att_of(const bam_mixture *m, const dims *z, int l, int j) {
  return m->acts->att + ((size_t)l * z->nAl + (size_t)(j - z->a0)) * z->RA * z->d;
}
static float *lse_of(const bam_mixture *m, const dims *z, int l, int j) {
  return m->acts->lse + ((size_t)l * z->nAl + (size_t)(j - z->a0)) * z->LTA;
}
static float *k_of(const bam_mixture *m, const dims *z, int l, int jk) {
  return m->acts->k + ((size_t)l * z->nKVl + (size_t)(jk - z->kv0)) * z->RA * z->kvd;
}
static float *v_of(const bam_mixture *m, const dims *z, int l, int jk) {
  return m->acts->v + ((size_t)l * z->nKVl + (size_t)(jk - z->kv0)) * z->RA * z->kvd;
}

/* ---- routing helpers (softmax and top-k: bam_router_softmax, bam_topk_select) ---- */

/* dst[r] = src[slot[r] / k] for the n dispatch rows (the token of each row). */
static void gather_rows(float *dst, const float *src, const int32_t *slot, int n, int k, int d) {
#pragma omp parallel for schedule(static) if ((long)n * d >= PAR_MIN_WORK)
  for (int r = 0; r < n; r++)
    memcpy(dst + (size_t)r * d, src + (size_t)(slot[r] / k) * d, (size_t)d * sizeof(float));
}

static float dot_f(const float *x, const float *y, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; i++) s += x[i] * y[i];
  return s;
}

/* ---- attention branch ---- */

/* ---- expert-parallel exchanges (G > 1) ---- */

/* Runs one MPI call of the exchanges and adds its wall time to m->comm_seconds (timing only;
 * m may be const-qualified in the caller but never points to a const object). */
#define EP_TIMED(m, call)                                        \
  do {                                                           \
    const double ep_t0_ = MPI_Wtime();                           \
    call;                                                        \
    ((bam_mixture *)(m))->comm_seconds += MPI_Wtime() - ep_t0_;  \
  } while (0)

/* Rank order reduce-scatter of a (G n) buffer over the group: every rank sends block r of
 * part to rank r; returns recv[0, n) = ((s_0 + s_1) + s_2) + ... of this rank's block
 * (recv: G n floats). Bitwise independent of timing. */
static float *ep_reduce_scatter(const float *part, float *recv, size_t n, const bam_mixture *m) {
  const int G = m->ep_size;
  EP_TIMED(m, MPI_Alltoall(part, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, m->ep_comm));
  for (int s = 1; s < G; s++) {
    const float *src = recv + (size_t)s * n;
#pragma omp parallel for schedule(static) if ((long)n >= PAR_MIN_WORK)
    for (size_t i = 0; i < n; i++) recv[i] += src[i];
  }
  return recv;
}

/* The attention branch output (N, d) goes into x.x_next, in three phases: gather (MPI),
 * compute (no MPI call: it may run on any thread, beside the FFN branch), scatter (MPI).
 * BAM with expert parallelism (Ga > 1): the group's h is gathered, this rank's experts run
 * on all NA = Ga N rows and their partial sum is reduce-scattered in rank order. */
static void attention_forward_gather(bam_mixture *m, const dims *z, int l, int B, int T) {
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, d = z->d;
  if (z->Ga > 1)
    EP_TIMED(m, MPI_Allgather(x.h, N * d, MPI_FLOAT, x.hA, N * d, MPI_FLOAT, m->ep_comm));
}

static void attention_forward_scatter(bam_mixture *m, const dims *z, int l, int B, int T) {
  if (z->Ga == 1) return;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, d = z->d;
  const float *sum = ep_reduce_scatter(m->acts->ep_a, m->acts->ep_c, (size_t)N * d, m);
  memcpy(x.x_next, sum, (size_t)N * d * sizeof(float));
}

static void attention_forward(bam_mixture *m, const dims *z, int l, int B, int T) {
  bam_mix_acts *a = m->acts;
  const mix_params *P = &a->p;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, d = z->d, kvd = z->kvd, Ea = z->Ea;
  const int NA = z->Ga * N, BA = z->Ga * B;
  const float *cs = m->rope_cos, *sn = m->rope_sin;
  const float *hA = x.hA;
  float *yA = z->Ga > 1 ? a->ep_a : x.x_next; /* this rank's (partial) branch output */

  if (z->bam) {
    /* g = softmax(h Wa^T); with att_top_k the gate keeps only each token's top-k entries,
     * unnormalised. An expert no token kept has g = 0 everywhere: skipped (exact). */
    bam_matmul_forward(x.att_p, hA, layer_w_of(P, z, l).att_router, NA, d, Ea);
    bam_router_softmax(x.att_p, NULL, NA, Ea);
    if (z->ka == 0) {
      memcpy(x.att_g, x.att_p, (size_t)NA * Ea * sizeof(float));
      for (int j = 0; j < Ea; j++) x.att_active[j] = 1;
    } else {
#pragma omp parallel for schedule(static) if ((long)NA * Ea >= PAR_MIN_WORK)
      for (int t = 0; t < NA; t++) {
        int32_t *idx = x.att_idx + (size_t)t * z->ka;
        float *g = x.att_g + (size_t)t * Ea;
        const float *p = x.att_p + (size_t)t * Ea;
        bam_topk_select(idx, p, Ea, z->ka);
        for (int j = 0; j < Ea; j++) g[j] = 0.0f;
        for (int r = 0; r < z->ka; r++) g[idx[r]] = p[idx[r]];
      }
      for (int j = 0; j < Ea; j++) x.att_active[j] = 0;
      for (size_t i = 0; i < (size_t)NA * z->ka; i++) x.att_active[x.att_idx[i]] = 1;
    }
    memset(yA, 0, (size_t)NA * d * sizeof(float));
  }
  /* One K/V for every expert (BTX, shared KV): project once. */
  if (z->nKV == 1) {
    float *k = k_of(m, z, l, 0), *v = v_of(m, z, l, 0);
    bam_matmul_forward2(k, wk_of(P, z, l, 0), v, wv_of(P, z, l, 0), hA, NA, d, kvd);
    bam_rope_forward(k, cs, sn, BA, T, z->Hkv, z->hd, 0);
  }
  for (int j = z->a0; j < z->a0 + z->nAl; j++) {
    if (z->bam && !x.att_active[j]) continue;
    const int jk = z->nKV == 1 ? 0 : j;
    float *q = q_of(m, z, l, j), *k = k_of(m, z, l, jk), *v = v_of(m, z, l, jk);
    float *att = att_of(m, z, l, j);
    bam_matmul_forward(q, hA, wq_of(P, z, l, j), NA, d, d);
    bam_rope_forward(q, cs, sn, BA, T, z->H, z->hd, 0);
    if (z->nKV > 1) {
      bam_matmul_forward2(k, wk_of(P, z, l, jk), v, wv_of(P, z, l, jk), hA, NA, d, kvd);
      bam_rope_forward(k, cs, sn, BA, T, z->Hkv, z->hd, 0);
    }
    bam_attention_forward(att, lse_of(m, z, l, j), a->att_scratch, q, k, v, BA, T, z->H, z->Hkv,
                          z->hd);
    if (!z->bam) { /* BTX: the dense attention, straight into the branch output */
      bam_matmul_forward(x.x_next, att, wo_of(P, z, l, j), N, d, d);
      continue;
    }
    /* MoA += g_j * o_j, experts summed in index order (deterministic). */
    float *o = a->datt; /* backward scratch, free during the forward pass */
    bam_matmul_forward(o, att, wo_of(P, z, l, j), NA, d, d);
    float *y = yA;
    const float *g = x.att_g;
#pragma omp parallel for schedule(static) if ((long)NA * d >= PAR_MIN_WORK)
    for (int t = 0; t < NA; t++) {
      const float gj = g[(size_t)t * Ea + j];
      float *yt = y + (size_t)t * d;
      const float *ot = o + (size_t)t * d;
#pragma omp simd
      for (int c = 0; c < d; c++) yt[c] += gj * ot[c];
    }
  }
}

/* Adds the attention branch's gradients: dy = dres (the branch output's gradient), into
 * dh and the parameter gradients. With expert parallelism (Ga > 1) dy is gathered over the
 * group, this rank's experts back-propagate all group rows, the partial dh and the gate
 * gradients (zero outside this rank's experts) are reduce-scattered in rank order, and the
 * router backward runs on this rank's own rows. */
/* Phases as in the forward: gather (MPI) the group's dy; compute this rank's experts'
 * gradients into dhA (dh_att, or ep_b with EP) and dg_att (no MPI call); scatter (MPI) the
 * partial dh and gate gradients, add dh_att to a->dh, and run the router backward. */
static void attention_backward_gather(bam_mixture *m, const dims *z, int l, int B, int T) {
  (void)l;
  bam_mix_acts *a = m->acts;
  const int N = B * T, d = z->d;
  if (z->Ga > 1)
    EP_TIMED(m, MPI_Allgather(a->dres, N * d, MPI_FLOAT, a->ep_a, N * d, MPI_FLOAT, m->ep_comm));
}

static void attention_backward(bam_mixture *m, const dims *z, int l, int B, int T) {
  bam_mix_acts *a = m->acts;
  const mix_params *P = &a->p, *G = &a->g;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, d = z->d, kvd = z->kvd, Ea = z->Ea;
  const int NA = z->Ga * N, BA = z->Ga * B;
  const float *cs = m->rope_cos, *sn = m->rope_sin;
  const float *dy = z->Ga > 1 ? a->ep_a : a->dres;
  const size_t nd = (size_t)NA * d * sizeof(float), nkv = (size_t)NA * kvd * sizeof(float);
  float *dg = a->dg_att; /* (NA, Ea) dL/dg */
  const float *hA = x.hA;
  float *dhA = z->Ga > 1 ? a->ep_b : a->dh_att;
  memset(dhA, 0, nd);

  if (z->bam) memset(dg, 0, (size_t)NA * Ea * sizeof(float));
  if (z->nKV == 1) { /* the shared K/V gradients gather every expert's share */
    memset(a->dk, 0, nkv);
    memset(a->dv, 0, nkv);
  }
  for (int j = z->a0; j < z->a0 + z->nAl; j++) {
    if (z->bam && !x.att_active[j]) continue; /* g_j = 0: no gradient anywhere */
    const int jk = z->nKV == 1 ? 0 : j;
    const float *q = q_of(m, z, l, j), *k = k_of(m, z, l, jk), *v = v_of(m, z, l, jk);
    const float *att = att_of(m, z, l, j);
    float *wo = wo_of(P, z, l, j), *gwo = wo_of(G, z, l, j);
    memset(a->datt, 0, nd);
    if (!z->bam) {
      bam_matmul_backward(a->datt, gwo, dy, att, wo, N, d, d);
    } else {
      /* y = sum_j g_j o_j, o_j = att_j Wo_j^T:
       *   dg_j = <dy, o_j> = <dy Wo_j, att_j>,   datt_j = g_j dy Wo_j,
       *   dWo_j += (g_j dy)^T att_j. */
      bam_matmul_backward(a->datt, NULL, dy, att, wo, NA, d, d); /* datt = dy Wo_j */
      const float *g = x.att_g;
      float *tmp = a->tmp, *datt = a->datt;
#pragma omp parallel for schedule(static) if ((long)NA * d >= PAR_MIN_WORK)
      for (int t = 0; t < NA; t++) {
        const size_t r = (size_t)t * d;
        const float gj = g[(size_t)t * Ea + j];
        dg[(size_t)t * Ea + j] = dot_f(datt + r, att + r, d);
        for (int c = 0; c < d; c++) {
          tmp[r + c] = gj * dy[r + c];
          datt[r + c] *= gj;
        }
      }
      bam_matmul_backward(NULL, gwo, tmp, att, wo, NA, d, d);
    }
    memset(a->dq, 0, nd);
    if (z->nKV > 1) {
      memset(a->dk, 0, nkv);
      memset(a->dv, 0, nkv);
    }
    bam_attention_backward(a->dq, a->dk, a->dv, a->att_scratch, a->datt, att, lse_of(m, z, l, j), q,
                           k, v, BA, T, z->H, z->Hkv, z->hd);
    /* The saved q, k are post-RoPE: rotate their gradients back (RoPE is linear, so the
     * shared dk can be rotated once after summing the experts). */
    bam_rope_backward(a->dq, cs, sn, BA, T, z->H, z->hd, 0);
    bam_matmul_backward(dhA, wq_of(G, z, l, j), a->dq, hA, wq_of(P, z, l, j), NA, d, d);
    if (z->nKV > 1) {
      bam_rope_backward(a->dk, cs, sn, BA, T, z->Hkv, z->hd, 0);
      bam_matmul_backward(dhA, wk_of(G, z, l, jk), a->dk, hA, wk_of(P, z, l, jk), NA, d, kvd);
      bam_matmul_backward(dhA, wv_of(G, z, l, jk), a->dv, hA, wv_of(P, z, l, jk), NA, d, kvd);
    }
  }
  if (z->nKV == 1) {
    bam_rope_backward(a->dk, cs, sn, BA, T, z->Hkv, z->hd, 0);
    bam_matmul_backward(dhA, wk_of(G, z, l, 0), a->dk, hA, wk_of(P, z, l, 0), NA, d, kvd);
    bam_matmul_backward(dhA, wv_of(G, z, l, 0), a->dv, hA, wv_of(P, z, l, 0), NA, d, kvd);
  }
}

static void attention_backward_scatter(bam_mixture *m, const dims *z, int l, int B, int T) {
  bam_mix_acts *a = m->acts;
  const mix_params *P = &a->p, *G = &a->g;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, d = z->d, Ea = z->Ea, NA = z->Ga * N;
  float *dg = a->dg_att, *dh = a->dh;
  /* dh of this rank's rows: its own attention gradient, or with EP the sum over the experts
   * of the group in rank order */
  const float *sum = z->Ga > 1 ? ep_reduce_scatter(a->ep_b, a->ep_c, (size_t)N * d, m) : a->dh_att;
#pragma omp parallel for schedule(static) if ((long)N * d >= PAR_MIN_WORK)
  for (size_t i = 0; i < (size_t)N * d; i++) dh[i] += sum[i];
  if (!z->bam) return;
  const float *att_p = x.att_p;
  const int32_t *att_idx = x.att_idx;
  if (z->Ga > 1) {
    /* the gate gradients likewise (each column is nonzero on its owner only: the sum is
     * exact) */
    memcpy(a->ep_a, dg, (size_t)NA * Ea * sizeof(float));
    const float *gsum = ep_reduce_scatter(a->ep_a, a->ep_c, (size_t)N * Ea, m);
    memcpy(dg, gsum, (size_t)N * Ea * sizeof(float));
    att_p += (size_t)z->gr * N * Ea;
    att_idx += (size_t)z->gr * N * z->ka;
  }
  /* Router: the kept gates are softmax entries, dropped ones constants (0). In place, per
   * token: dp = dg on the kept entries, dz = p (dp - <p, dp>). */
#pragma omp parallel for schedule(static) if ((long)N * Ea >= PAR_MIN_WORK)
  for (int t = 0; t < N; t++) {
    float *dp = dg + (size_t)t * Ea;
    const float *p = att_p + (size_t)t * Ea;
    if (z->ka > 0) { /* zero the entries outside the top-k */
      const int32_t *idx = att_idx + (size_t)t * z->ka;
      for (int j = 0; j < Ea; j++) {
        int kept = 0;
        for (int r = 0; r < z->ka; r++) kept |= idx[r] == j;
        if (!kept) dp[j] = 0.0f;
      }
    }
    float s = 0.0f;
    for (int j = 0; j < Ea; j++) s += p[j] * dp[j];
    for (int j = 0; j < Ea; j++) dp[j] = p[j] * (dp[j] - s);
  }
  bam_matmul_backward(a->dh, layer_w_of(G, z, l).att_router, dg, x.h,
                      layer_w_of(P, z, l).att_router, N, d, Ea);
}

/* ---- FFN mixture ---- */

/* Routing, capacity and dispatch of layer l (see the top of the file); returns the layer's
 * auxiliary loss lb_coef L_lb + z_coef L_z. */
static double moe_route(bam_mixture *m, const dims *z, int l, int B, int T) {
  const bam_mixture_shape *s = &m->shape;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, k = z->k, Ef = z->Ef;

  bam_matmul_forward(x.ffn_p, x.h, layer_w_of(&m->acts->p, z, l).ffn_router, N, z->d, Ef);
  bam_router_softmax(x.ffn_p, x.ffn_lse, N, Ef);
#pragma omp parallel for schedule(static) if ((long)N * Ef >= PAR_MIN_WORK)
  for (int t = 0; t < N; t++) {
    int32_t *idx = x.ffn_idx + (size_t)t * k;
    float *w = x.ffn_w + (size_t)t * k;
    const float *p = x.ffn_p + (size_t)t * Ef;
    bam_topk_select(idx, p, Ef, k);
    float S = 0.0f; /* summed in rank order; the backward recomputes it the same way */
    for (int r = 0; r < k; r++) S += p[idx[r]];
    for (int r = 0; r < k; r++) w[r] = s->ffn_renormalize ? p[idx[r]] / S : p[idx[r]];
  }

  /* Capacity, pass 1 (token order, per sequence): keep or drop every assignment, count the
   * kept ones per expert (disp_off[e+1] for now) and per load-balance group (ffn_frac). */
  const double cap_f = ceil((double)s->capacity_factor * T * k / Ef);
  const int cap = s->capacity_factor > 0.0f && cap_f < INT_MAX ? (int)cap_f : INT_MAX;
  int32_t *off = x.disp_off, *cnt = m->acts->seq_count;
  const int n_groups = s->lb_per_sequence ? B : 1;
  for (int e = 0; e <= Ef; e++) off[e] = 0;
  for (size_t i = 0; i < (size_t)n_groups * Ef; i++) x.ffn_frac[i] = 0.0;
  for (int b = 0; b < B; b++) {
    for (int e = 0; e < Ef; e++) cnt[e] = 0;
    double *frac = x.ffn_frac + (size_t)(s->lb_per_sequence ? b : 0) * Ef;
    for (int t = b * T; t < (b + 1) * T; t++)
      for (int r = 0; r < k; r++) {
        const size_t slot = (size_t)t * k + r;
        const int e = x.ffn_idx[slot];
        if (cnt[e] < cap) {
          cnt[e]++;
          off[e + 1]++;
          frac[e] += 1.0;
          x.ffn_row[slot] = 0; /* kept; its row is assigned in pass 2 */
        } else {
          x.ffn_row[slot] = -1; /* dropped */
        }
      }
  }
  for (int e = 0; e < Ef; e++) off[e + 1] += off[e];
  /* Pass 2: rows, expert by expert, each expert's rows in token order. */
  for (int e = 0; e < Ef; e++) cnt[e] = off[e];
  for (size_t slot = 0; slot < (size_t)N * k; slot++) {
    if (x.ffn_row[slot] < 0) continue;
    const int row = cnt[x.ffn_idx[slot]]++;
    x.ffn_row[slot] = row;
    x.disp_slot[row] = (int32_t)slot;
  }

  /* Auxiliary losses, in double and in a fixed order. f_i = kept_i / (n k); P_i = mean p_i. */
  const int n_per = N / n_groups;
  double lb = 0.0;
  for (int gi = 0; gi < n_groups; gi++) {
    double *frac = x.ffn_frac + (size_t)gi * Ef, sum = 0.0;
    for (int e = 0; e < Ef; e++) {
      frac[e] /= (double)n_per * k;
      double P = 0.0;
      for (int t = gi * n_per; t < (gi + 1) * n_per; t++) P += x.ffn_p[(size_t)t * Ef + e];
      sum += frac[e] * (P / n_per);
    }
    lb += Ef * sum;
  }
  lb /= n_groups;
  double zl = 0.0;
  for (int t = 0; t < N; t++) zl += (double)x.ffn_lse[t] * x.ffn_lse[t];
  zl /= N;
  return (double)s->lb_coef * lb + (double)s->z_coef * zl;
}

/* out(N, d) = sum over each token's kept assignments r of w[t,r] * y[row[t,r]], in the
 * assignment order (row < 0: dropped); one writer per row, so the sum order is fixed. */
static void moe_combine(float *out, const float *y, const int32_t *rows, const float *w, int N,
                        int k, int d) {
#pragma omp parallel for schedule(static) if ((long)N * d >= PAR_MIN_WORK)
  for (int t = 0; t < N; t++) {
    float *ot = out + (size_t)t * d;
    for (int c = 0; c < d; c++) ot[c] = 0.0f;
    for (int r = 0; r < k; r++) {
      const int row = rows[(size_t)t * k + r];
      if (row < 0) continue;
      const float wt = w[(size_t)t * k + r];
      const float *yr = y + (size_t)row * d;
#pragma omp simd
      for (int c = 0; c < d; c++) ot[c] += wt * yr[c];
    }
  }
}

/* dh(N, d) += each token's kept dispatch rows of dx (row r at dx + r * stride), in the
 * assignment order (row < 0: dropped); one writer per token, so the sum order is fixed. */
static void moe_scatter_dx(float *dh, const float *dx, size_t stride, const int32_t *rows, int N,
                           int k, int d) {
#pragma omp parallel for schedule(static) if ((long)N * d >= PAR_MIN_WORK)
  for (int t = 0; t < N; t++)
    for (int r = 0; r < k; r++) {
      const int row = rows[(size_t)t * k + r];
      if (row < 0) continue;
      float *dt = dh + (size_t)t * d;
      const float *src = dx + (size_t)row * stride;
#pragma omp simd
      for (int c = 0; c < d; c++) dt[c] += src[c];
    }
}

/* The MoE output (N, d) of layer l into out, from the dispatch moe_route recorded. */
static void moe_forward(bam_mixture *m, const dims *z, int l, int B, int T, float *out) {
  bam_mix_acts *a = m->acts;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, k = z->k, d = z->d, f = z->f, n_rows = x.disp_off[z->Ef];
  gather_rows(a->xg, x.h, x.disp_slot, n_rows, k, d);
  for (int e = 0; e < z->Ef; e++) {
    const int r0 = x.disp_off[e], n = x.disp_off[e + 1] - r0;
    const float *xe = a->xg + (size_t)r0 * d;
    bam_matmul_forward2(x.gate + (size_t)r0 * f, ffn_w_of(a->p.w_gate, z, l, e),
                        x.up + (size_t)r0 * f, ffn_w_of(a->p.w_up, z, l, e), xe, n, d, f);
  }
  bam_swiglu_forward(x.swi, x.gate, x.up, (long)n_rows * f);
  for (int e = 0; e < z->Ef; e++) {
    const int r0 = x.disp_off[e], n = x.disp_off[e + 1] - r0;
    bam_matmul_forward(a->yg + (size_t)r0 * d, x.swi + (size_t)r0 * f,
                       ffn_w_of(a->p.w_down, z, l, e), n, f, d);
  }
  /* Combine: each token sums its kept assignments in rank order; one writer per row. */
  moe_combine(out, a->yg, x.ffn_row, x.ffn_w, N, k, d);
}

static void moe_router_backward(bam_mixture *m, const dims *z, int l, int B, int T,
                                float grad_scale);

/* Adds the FFN branch's gradients (dy = dres) into dh and the parameter gradients, the
 * routers' included (gates, load balance, z-loss). */
static void moe_backward(bam_mixture *m, const dims *z, int l, int B, int T, float grad_scale) {
  bam_mix_acts *a = m->acts;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, k = z->k, d = z->d, f = z->f, Ef = z->Ef, n_rows = x.disp_off[Ef];
  float *A = a->yg, *dswi = a->dswi, *dw = a->dgate_w;

  /* Down projection y = s W_down^T on the rows, scaled by the gate w into the output:
   *   dL/dw = <dy, y> = <dy W_down, s>,  ds = w dy W_down,  dW_down += (w dy)^T s. */
  gather_rows(A, a->dres, x.disp_slot, n_rows, k, d);
  memset(dswi, 0, (size_t)n_rows * f * sizeof(float));
  for (int e = 0; e < Ef; e++) {
    const int r0 = x.disp_off[e], n = x.disp_off[e + 1] - r0;
    bam_matmul_backward(dswi + (size_t)r0 * f, NULL, A + (size_t)r0 * d, NULL,
                        ffn_w_of(a->p.w_down, z, l, e), n, f, d);
  }
  memset(dw, 0, (size_t)N * k * sizeof(float)); /* dropped assignments: 0 */
#pragma omp parallel for schedule(static) if ((long)n_rows * f >= PAR_MIN_WORK)
  for (int r = 0; r < n_rows; r++) {
    const int32_t slot = x.disp_slot[r];
    const float w = x.ffn_w[slot];
    float *ds = dswi + (size_t)r * f, *ar = A + (size_t)r * d;
    dw[slot] = dot_f(ds, x.swi + (size_t)r * f, f);
    for (int c = 0; c < f; c++) ds[c] *= w;
    for (int c = 0; c < d; c++) ar[c] *= w;
  }
  for (int e = 0; e < Ef; e++) {
    const int r0 = x.disp_off[e], n = x.disp_off[e + 1] - r0;
    bam_matmul_backward(NULL, ffn_w_of(a->g.w_down, z, l, e), A + (size_t)r0 * d,
                        x.swi + (size_t)r0 * f, ffn_w_of(a->p.w_down, z, l, e), n, f, d);
  }
  /* SwiGLU, then gate/up projections of the gathered h rows; dX reuses A. */
  memset(a->dgate, 0, (size_t)n_rows * f * sizeof(float));
  memset(a->dup, 0, (size_t)n_rows * f * sizeof(float));
  bam_swiglu_backward(a->dgate, a->dup, dswi, x.gate, x.up, (long)n_rows * f);
  gather_rows(a->xg, x.h, x.disp_slot, n_rows, k, d);
  memset(A, 0, (size_t)n_rows * d * sizeof(float));
  for (int e = 0; e < Ef; e++) {
    const int r0 = x.disp_off[e], n = x.disp_off[e + 1] - r0;
    const float *xe = a->xg + (size_t)r0 * d;
    float *dxe = A + (size_t)r0 * d;
    bam_matmul_backward(dxe, ffn_w_of(a->g.w_gate, z, l, e), a->dgate + (size_t)r0 * f, xe,
                        ffn_w_of(a->p.w_gate, z, l, e), n, d, f);
    bam_matmul_backward(dxe, ffn_w_of(a->g.w_up, z, l, e), a->dup + (size_t)r0 * f, xe,
                        ffn_w_of(a->p.w_up, z, l, e), n, d, f);
  }
  moe_scatter_dx(a->dh, A, d, x.ffn_row, N, k, d);
  moe_router_backward(m, z, l, B, T, grad_scale);
}

/* The FFN router's gradients from the assignment gate gradients a->dgate_w (dL/dw per
 * assignment slot, 0 when dropped) and the auxiliary losses, into dh and dWr. */
static void moe_router_backward(bam_mixture *m, const dims *z, int l, int B, int T,
                                float grad_scale) {
  bam_mix_acts *a = m->acts;
  const bam_mixture_shape *s = &m->shape;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, k = z->k, d = z->d, Ef = z->Ef;
  const float *dw = a->dgate_w;
  float *dh = a->dh;

  /* Router: dp from the gates (through the renormalisation), + the load-balance term
   * Ef f_i / N (f constant), then through the softmax, + the z-loss 2 lse p_j / N. The
   * auxiliary losses are part of the differentiated loss, so they take grad_scale too. */
  const int n_per = s->lb_per_sequence ? T : N;
  const float c_lb = grad_scale * s->lb_coef * (float)Ef / (float)N;
  const float c_z = grad_scale * s->z_coef * 2.0f / (float)N;
  float *dz = a->drouter;
#pragma omp parallel for schedule(static) if ((long)N * Ef >= PAR_MIN_WORK)
  for (int t = 0; t < N; t++) {
    const float *p = x.ffn_p + (size_t)t * Ef, *w = x.ffn_w + (size_t)t * k,
                *dwt = dw + (size_t)t * k;
    const int32_t *idx = x.ffn_idx + (size_t)t * k;
    const double *frac = x.ffn_frac + (size_t)(t / n_per) * Ef;
    float *dp = dz + (size_t)t * Ef;
    for (int e = 0; e < Ef; e++) dp[e] = c_lb * (float)frac[e];
    if (s->ffn_renormalize) {
      float S = 0.0f, sw = 0.0f;
      for (int r = 0; r < k; r++) S += p[idx[r]];
      for (int r = 0; r < k; r++) sw += dwt[r] * w[r];
      for (int r = 0; r < k; r++) dp[idx[r]] += (dwt[r] - sw) / S;
    } else {
      for (int r = 0; r < k; r++) dp[idx[r]] += dwt[r];
    }
    float sp = 0.0f;
    for (int e = 0; e < Ef; e++) sp += p[e] * dp[e];
    const float zt = c_z * x.ffn_lse[t];
    for (int e = 0; e < Ef; e++) dp[e] = p[e] * (dp[e] - sp) + zt * p[e];
  }
  bam_matmul_backward(dh, layer_w_of(&a->g, z, l).ffn_router, dz, x.h,
                      layer_w_of(&a->p, z, l).ffn_router, N, d, Ef);
}

/* ---- FFN experts across the group (expert parallelism, G > 1) ----
 *
 * Rank r of the group owns FFN experts [r El, (r+1) El). Its local dispatch (moe_route,
 * unchanged) is sorted by expert, so the rows for rank r are the contiguous dispatch rows
 * [disp_off[r El], disp_off[(r+1) El]), each expert's in token order. The owner receives
 * them in source rank order (MPI_Alltoallv) and reorders them so that each of its experts
 * has contiguous rows ordered by (source rank, sender order): the expert's input matrix
 * does not depend on the message timing, and for P = 1 vs a group of 2 it is the rows one
 * rank holding both halves of the batch would have. Outputs (ungated) travel back the
 * same way and the token's rank combines them with its gates as without EP. Backward: dy
 * rows with their gate travel to the owners, which return dX rows with the gate gradient;
 * the router backward (gates, load balance, z-loss) runs on the token's rank. */

/* Exchange plan in floats for rows of w floats: sent to / received from each rank. Returns
 * the rows received. cnt: (G, El) rows received from each source for each own expert. */
static int ep_plan(const int32_t *off, const int32_t *cnt, int G, int El, int w, int *sc,
                   int *sd, int *rc, int *rd) {
  int rows = 0;
  for (int r = 0; r < G; r++) {
    sc[r] = (off[(r + 1) * El] - off[r * El]) * w;
    sd[r] = off[r * El] * w;
    int n = 0;
    for (int e = 0; e < El; e++) n += cnt[r * El + e];
    rc[r] = n * w;
    rd[r] = rows * w;
    rows += n;
  }
  return rows;
}

/* eoff[e]: first row of own expert e in expert order; eoff[El] = rows. */
static void ep_offsets(const int32_t *cnt, int G, int El, int *eoff) {
  eoff[0] = 0;
  for (int e = 0; e < El; e++) {
    int n = 0;
    for (int r = 0; r < G; r++) n += cnt[r * El + e];
    eoff[e + 1] = eoff[e] + n;
  }
}

/* Moves rows of w floats between source order (src_rows: source, expert, sender order)
 * and expert order (exp_rows: expert, source, sender order), in the direction asked. */
static void ep_reorder(const int32_t *cnt, int G, int El, int w, float *src_rows,
                       float *exp_rows, int to_expert_order) {
  int eoff[El + 1];
  ep_offsets(cnt, G, El, eoff);
  size_t rpos = 0;
  for (int r = 0; r < G; r++)
    for (int e = 0; e < El; e++) {
      const size_t n = (size_t)cnt[r * El + e] * (size_t)w;
      float *a = src_rows + rpos, *b = exp_rows + (size_t)eoff[e] * w;
      if (to_expert_order) memcpy(b, a, n * sizeof(float));
      else memcpy(a, b, n * sizeof(float));
      rpos += n;
      eoff[e] += cnt[r * El + e];
    }
}

static void moe_forward_ep(bam_mixture *m, const dims *z, int l, int B, int T, float *out) {
  bam_mix_acts *a = m->acts;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, k = z->k, d = z->d, f = z->f, G = z->G, El = z->El, Ef = z->Ef;
  const int32_t *off = x.disp_off;
  const int n_rows = off[Ef];
  int sc[G], sd[G], rc[G], rd[G], eoff[El + 1];
  int32_t send_cnt[Ef];
  for (int e = 0; e < Ef; e++) send_cnt[e] = off[e + 1] - off[e];
  EP_TIMED(m, MPI_Alltoall(send_cnt, El, MPI_INT32_T, x.ep_cnt, El, MPI_INT32_T, m->ep_comm));
  gather_rows(a->xg, x.h, x.disp_slot, n_rows, k, d);
  const int nr = ep_plan(off, x.ep_cnt, G, El, d, sc, sd, rc, rd);
  EP_TIMED(m, MPI_Alltoallv(a->xg, sc, sd, MPI_FLOAT, a->rbuf, rc, rd, MPI_FLOAT, m->ep_comm));
  ep_reorder(x.ep_cnt, G, El, d, a->rbuf, x.xr, 1);
  ep_offsets(x.ep_cnt, G, El, eoff);
  for (int e = 0; e < El; e++) {
    const int r0 = eoff[e], n = eoff[e + 1] - r0, ge = z->f0 + e;
    const float *xe = x.xr + (size_t)r0 * d;
    bam_matmul_forward2(x.gate + (size_t)r0 * f, ffn_w_of(a->p.w_gate, z, l, ge),
                        x.up + (size_t)r0 * f, ffn_w_of(a->p.w_up, z, l, ge), xe, n, d, f);
  }
  bam_swiglu_forward(x.swi, x.gate, x.up, (long)nr * f);
  for (int e = 0; e < El; e++) {
    const int r0 = eoff[e], n = eoff[e + 1] - r0;
    bam_matmul_forward(a->yg + (size_t)r0 * d, x.swi + (size_t)r0 * f,
                       ffn_w_of(a->p.w_down, z, l, z->f0 + e), n, f, d);
  }
  ep_reorder(x.ep_cnt, G, El, d, a->rbuf, a->yg, 0);
  EP_TIMED(m, MPI_Alltoallv(a->rbuf, rc, rd, MPI_FLOAT, a->xg, sc, sd, MPI_FLOAT, m->ep_comm));
  /* Combine, as moe_forward: the outputs are now in this rank's dispatch order. */
  moe_combine(out, a->xg, x.ffn_row, x.ffn_w, N, k, d);
}

static void moe_backward_ep(bam_mixture *m, const dims *z, int l, int B, int T,
                            float grad_scale) {
  bam_mix_acts *a = m->acts;
  const layer_acts x = acts_of(m, z, l);
  const int N = B * T, k = z->k, d = z->d, f = z->f, G = z->G, El = z->El, Ef = z->Ef;
  const int w = d + 1;
  const int32_t *off = x.disp_off;
  const int n_rows = off[Ef];
  int sc[G], sd[G], rc[G], rd[G], eoff[El + 1];
  /* dy rows (with their gate in column d) to the owners, in dispatch order */
  float *sbuf = a->sbuf;
  const float *dres = a->dres;
#pragma omp parallel for schedule(static) if ((long)n_rows * d >= PAR_MIN_WORK)
  for (int r = 0; r < n_rows; r++) {
    const int32_t slot = x.disp_slot[r];
    memcpy(sbuf + (size_t)r * w, dres + (size_t)(slot / k) * d, (size_t)d * sizeof(float));
    sbuf[(size_t)r * w + d] = x.ffn_w[slot];
  }
  const int nr = ep_plan(off, x.ep_cnt, G, El, w, sc, sd, rc, rd);
  EP_TIMED(m, MPI_Alltoallv(sbuf, sc, sd, MPI_FLOAT, a->rbuf, rc, rd, MPI_FLOAT, m->ep_comm));
  ep_reorder(x.ep_cnt, G, El, w, a->rbuf, a->ebuf, 1);
  ep_offsets(x.ep_cnt, G, El, eoff);
  float *A = a->yg, *wr = a->ep_w, *dswi = a->dswi, *eb = a->ebuf;
#pragma omp parallel for schedule(static) if ((long)nr * d >= PAR_MIN_WORK)
  for (int r = 0; r < nr; r++) {
    memcpy(A + (size_t)r * d, eb + (size_t)r * w, (size_t)d * sizeof(float));
    wr[r] = eb[(size_t)r * w + d];
  }
  /* As moe_backward, on the received rows of the own experts. */
  memset(dswi, 0, (size_t)nr * f * sizeof(float));
  for (int e = 0; e < El; e++) {
    const int r0 = eoff[e], n = eoff[e + 1] - r0;
    bam_matmul_backward(dswi + (size_t)r0 * f, NULL, A + (size_t)r0 * d, NULL,
                        ffn_w_of(a->p.w_down, z, l, z->f0 + e), n, f, d);
  }
#pragma omp parallel for schedule(static) if ((long)nr * f >= PAR_MIN_WORK)
  for (int r = 0; r < nr; r++) {
    const float g = wr[r];
    float *ds = dswi + (size_t)r * f, *ar = A + (size_t)r * d;
    wr[r] = dot_f(ds, x.swi + (size_t)r * f, f); /* now the gate gradient */
    for (int c = 0; c < f; c++) ds[c] *= g;
    for (int c = 0; c < d; c++) ar[c] *= g;
  }
  for (int e = 0; e < El; e++) {
    const int r0 = eoff[e], n = eoff[e + 1] - r0, ge = z->f0 + e;
    bam_matmul_backward(NULL, ffn_w_of(a->g.w_down, z, l, ge), A + (size_t)r0 * d,
                        x.swi + (size_t)r0 * f, ffn_w_of(a->p.w_down, z, l, ge), n, f, d);
  }
  memset(a->dgate, 0, (size_t)nr * f * sizeof(float));
  memset(a->dup, 0, (size_t)nr * f * sizeof(float));
  bam_swiglu_backward(a->dgate, a->dup, dswi, x.gate, x.up, (long)nr * f);
  memset(A, 0, (size_t)nr * d * sizeof(float));
  for (int e = 0; e < El; e++) {
    const int r0 = eoff[e], n = eoff[e + 1] - r0, ge = z->f0 + e;
    const float *xe = x.xr + (size_t)r0 * d;
    float *dxe = A + (size_t)r0 * d;
    bam_matmul_backward(dxe, ffn_w_of(a->g.w_gate, z, l, ge), a->dgate + (size_t)r0 * f, xe,
                        ffn_w_of(a->p.w_gate, z, l, ge), n, d, f);
    bam_matmul_backward(dxe, ffn_w_of(a->g.w_up, z, l, ge), a->dup + (size_t)r0 * f, xe,
                        ffn_w_of(a->p.w_up, z, l, ge), n, d, f);
  }
  /* dX rows (gate gradient in column d) back to the tokens' ranks */
#pragma omp parallel for schedule(static) if ((long)nr * d >= PAR_MIN_WORK)
  for (int r = 0; r < nr; r++) {
    memcpy(eb + (size_t)r * w, A + (size_t)r * d, (size_t)d * sizeof(float));
    eb[(size_t)r * w + d] = wr[r];
  }
  ep_reorder(x.ep_cnt, G, El, w, a->rbuf, a->ebuf, 0);
  EP_TIMED(m, MPI_Alltoallv(a->rbuf, rc, rd, MPI_FLOAT, sbuf, sc, sd, MPI_FLOAT, m->ep_comm));
  float *dw = a->dgate_w;
  memset(dw, 0, (size_t)N * k * sizeof(float)); /* dropped assignments: 0 */
  for (int r = 0; r < n_rows; r++) dw[x.disp_slot[r]] = sbuf[(size_t)r * w + d];
  moe_scatter_dx(a->dh, sbuf, w, x.ffn_row, N, k, d);
  moe_router_backward(m, z, l, B, T, grad_scale);
}

/* ---- forward and backward of the whole model ---- */

/* Whether the two branches of a layer run at the same time (concurrent_branches; mixture.h):
 * on needs two threads; auto (-1) also needs small products (BAM_CONCURRENT_MAX_D) and
 * branches of similar cost, forward FLOPs per token within 1.5x of each other (method.md
 * section 5), since each branch then has one thread: BTX's dense attention and its FFN, not
 * BAM's Ea attention experts against one FFN. */
static int branches_concurrent(const bam_mixture *m) {
  if (m->concurrent_branches == 0 || omp_get_max_threads() < 2 || omp_in_parallel()) return 0;
  if (m->concurrent_branches > 0) return 1;
  if (m->shape.base.d_model > BAM_CONCURRENT_MAX_D) return 0;
  const bam_mixture_shape *s = &m->shape;
  const double d = s->base.d_model, kvd = bam_kv_dim(&s->base), f = s->base.d_ff,
               T = s->base.seq_len;
  const double one = 4.0 * d * d + 2.0 * T * d, kv = 4.0 * d * kvd;
  const double Ea = s->method == BAM_METHOD_BTX ? 1.0 : s->n_att_experts;
  const double att = Ea * one + (s->method == BAM_METHOD_BAM ? Ea : 1.0) * kv;
  const double ffn = (double)s->ffn_top_k * 6.0 * d * f;
  const double ratio = att > ffn ? att / ffn : ffn / att;
  return ratio <= 1.5;
}

bam_status bam_mixture_forward(bam_mixture *m, const int32_t *tokens, const int32_t *targets,
                               int B, int T, float *loss) {
  const bam_model_shape *s = &m->shape.base;
  bam_mix_acts *a = m->acts;
  if (B < 1 || B > m->max_batch)
    BAM_FAIL(BAM_ERR_ARG, "mixture forward: batch %d outside [1, %d] (the size given at creation)",
             B, m->max_batch);
  if (T < 1 || T > s->seq_len)
    BAM_FAIL(BAM_ERR_ARG, "mixture forward: sequence length %d outside [1, seq_len = %d]", T,
             s->seq_len);
  if (!tokens) BAM_FAIL(BAM_ERR_ARG, "mixture forward: NULL tokens");
  const dims z = dims_m(m);
  const int N = B * T, d = z.d, V = z.V;
  for (int i = 0; i < N; i++) {
    if (tokens[i] < 0 || tokens[i] >= V)
      BAM_FAIL(BAM_ERR_DATA, "mixture forward: token %d at (%d, %d) outside vocabulary [0, %d)",
               tokens[i], i / T, i % T, V);
    if (targets && targets[i] >= V)
      BAM_FAIL(BAM_ERR_DATA, "mixture forward: target %d at (%d, %d) outside vocabulary [0, %d)",
               targets[i], i / T, i % T, V);
  }
  a->has_targets = 0;
  memcpy(a->tokens, tokens, (size_t)N * sizeof *tokens);
  m->last_B = B;
  m->last_T = T;

  bam_embedding_forward(a->res, tokens, a->p.wte, N, d);
  const int concurrent = branches_concurrent(m);
  double aux = 0.0;
  for (int l = 0; l < z.L; l++) {
    const layer_acts x = acts_of(m, &z, l);
    bam_layernorm_forward(x.h, x.mean, x.rstd, x.x, layer_w_of(&a->p, &z, l).ln, N, d,
                          s->norm_eps);
    float *moe = a->dh; /* backward scratch, free during the forward pass */
    /* The branches read h and write apart (attention: x_next; FFN: moe). Concurrently, the
     * attention experts compute on a second thread while the main thread routes and runs
     * the FFN experts with their all-to-all exchanges (every MPI call on the main thread). */
    attention_forward_gather(m, &z, l, B, T);
    double aux_l = 0.0;
    if (concurrent) {
#pragma omp parallel num_threads(2)
      {
        const int tid = omp_get_thread_num();
        if (tid == 1 || omp_get_num_threads() == 1) attention_forward(m, &z, l, B, T);
        if (tid == 0) {
          aux_l = moe_route(m, &z, l, B, T);
          if (z.G > 1) moe_forward_ep(m, &z, l, B, T, moe);
          else moe_forward(m, &z, l, B, T, moe);
        }
      }
    } else {
      attention_forward(m, &z, l, B, T);
      aux_l = moe_route(m, &z, l, B, T);
      if (z.G > 1) moe_forward_ep(m, &z, l, B, T, moe);
      else moe_forward(m, &z, l, B, T, moe);
    }
    attention_forward_scatter(m, &z, l, B, T); /* into x_next */
    aux += aux_l;
    /* x' = x + a + MoE, in the dense model's order of evaluation */
    const long n = (long)N * d;
    float *xn = x.x_next;
    const float *xi = x.x;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (long i = 0; i < n; i++) xn[i] = xi[i] + xn[i] + moe[i];
  }
  const float *x_last = a->res + (size_t)z.L * z.R * d;
  bam_layernorm_forward(a->lnf_out, a->lnf_mean, a->lnf_rstd, x_last, a->p.ln_f, N, d,
                        s->norm_eps);
  bam_matmul_forward(a->logits, a->lnf_out, a->p.w_head, N, d, V);
  m->last_aux_loss = (float)aux;

  if (!targets) return BAM_OK;

  memcpy(a->targets, targets, (size_t)N * sizeof *targets);
  bam_crossentropy_forward(a->losses, a->logits, targets, N, V);
  double sum = 0.0;
  long n_valid = 0;
  for (int i = 0; i < N; i++) {
    if (targets[i] < 0) continue;
    sum += a->losses[i];
    n_valid++;
  }
  /* All targets ignored: the token loss is 0 (not 0/0); the auxiliary losses remain. */
  const double token_loss = n_valid > 0 ? sum / (double)n_valid : 0.0;
  m->last_loss = (float)token_loss;
  a->n_valid = n_valid;
  a->has_targets = 1;
  const float total = (float)(token_loss + aux);
  if (loss) *loss = total;
  if (!isfinite(total))
    BAM_FAIL(BAM_ERR_NUMERIC,
             "mixture forward: loss is %g (token %g, auxiliary %g) on a batch of %d x %d tokens",
             (double)total, token_loss, aux, B, T);
  return BAM_OK;
}

bam_status bam_mixture_backward(bam_mixture *m, float grad_scale) {
  bam_mix_acts *a = m->acts;
  if (!a->has_targets)
    BAM_FAIL(BAM_ERR_ARG,
             "mixture backward: the last forward had no targets, or its backward already ran "
             "(the logits buffer now holds gradients)");
  a->has_targets = 0;
  const dims z = dims_m(m);
  const int B = m->last_B, T = m->last_T, N = B * T, d = z.d, V = z.V;
  const size_t nd = (size_t)N * d * sizeof(float);
  const int concurrent = branches_concurrent(m);

  /* Token loss: d/dlogits = (softmax - onehot) grad_scale / n_valid, in place. */
  const float scale = a->n_valid > 0 ? grad_scale / (float)a->n_valid : 0.0f;
  bam_crossentropy_fused_inplace(a->logits, a->losses, a->targets, scale, N, V);
  memset(a->dh, 0, nd);
  bam_matmul_backward(a->dh, a->g.w_head, a->logits, a->lnf_out, a->p.w_head, N, d, V);
  memset(a->dres, 0, nd);
  const float *x_last = a->res + (size_t)z.L * z.R * d;
  bam_layernorm_backward(a->dres, a->g.ln_f, a->dh, x_last, a->p.ln_f, a->lnf_mean, a->lnf_rstd,
                         N, d);

  for (int l = z.L - 1; l >= 0; l--) {
    const layer_acts x = acts_of(m, &z, l);
    /* x' = x + a + MoE: dres (= dx') flows into both branches and on into dx. */
    memset(a->dh, 0, nd);
    attention_backward_gather(m, &z, l, B, T);
    if (concurrent) {
#pragma omp parallel num_threads(2)
      {
        const int tid = omp_get_thread_num();
        if (tid == 1 || omp_get_num_threads() == 1) attention_backward(m, &z, l, B, T);
        if (tid == 0) {
          if (z.G > 1) moe_backward_ep(m, &z, l, B, T, grad_scale);
          else moe_backward(m, &z, l, B, T, grad_scale);
        }
      }
    } else {
      if (z.G > 1) moe_backward_ep(m, &z, l, B, T, grad_scale);
      else moe_backward(m, &z, l, B, T, grad_scale);
      attention_backward(m, &z, l, B, T);
    }
    attention_backward_scatter(m, &z, l, B, T); /* dh += the attention branch's */
    bam_layernorm_backward(a->dres, layer_w_of(&a->g, &z, l).ln, a->dh, x.x,
                           layer_w_of(&a->p, &z, l).ln, x.mean, x.rstd, N, d);
  }
  bam_embedding_backward(a->g.wte, a->dres, a->tokens, N, d);
  return BAM_OK;
}

/* ---- routing statistics ---- */

void bam_mixture_route_stats(const bam_mixture *m, bam_route_stats *out) {
  const dims z = dims_m(m);
  const int N_all = m->last_B * m->last_T;
  const int N = out->rows > 0 && out->rows < N_all ? out->rows : N_all;
  for (int l = 0; l < z.L; l++) {
    const layer_acts x = acts_of(m, &z, l);
    if (out->ffn_share) {
      double *sh = out->ffn_share + (size_t)l * z.Ef;
      for (int e = 0; e < z.Ef; e++) sh[e] = 0.0;
      for (size_t i = 0; i < (size_t)N * z.k; i++) sh[x.ffn_idx[i]] += 1.0;
      for (int e = 0; e < z.Ef; e++) sh[e] = N > 0 ? sh[e] / ((double)N * z.k) : 0.0;
    }
    if (out->ffn_entropy) {
      double h = 0.0;
      for (size_t i = 0; i < (size_t)N * z.Ef; i++)
        if (x.ffn_p[i] > 0.0f) h -= (double)x.ffn_p[i] * log((double)x.ffn_p[i]);
      out->ffn_entropy[l] = N > 0 ? h / N : 0.0;
    }
    if (!z.bam) continue; /* BTX has no attention router: its arrays are left alone */
    /* with expert parallelism the attention arrays hold the group's rows: take our own */
    const float *att_g = x.att_g + (size_t)z.gr * N_all * z.Ea * (z.Ga > 1),
                *att_p = x.att_p + (size_t)z.gr * N_all * z.Ea * (z.Ga > 1);
    if (out->att_gate) {
      double *gm = out->att_gate + (size_t)l * z.Ea;
      for (int j = 0; j < z.Ea; j++) gm[j] = 0.0;
      for (int t = 0; t < N; t++)
        for (int j = 0; j < z.Ea; j++) gm[j] += att_g[(size_t)t * z.Ea + j];
      for (int j = 0; j < z.Ea; j++) gm[j] = N > 0 ? gm[j] / N : 0.0;
    }
    if (out->att_entropy) {
      double h = 0.0;
      for (size_t i = 0; i < (size_t)N * z.Ea; i++)
        if (att_p[i] > 0.0f) h -= (double)att_p[i] * log((double)att_p[i]);
      out->att_entropy[l] = N > 0 ? h / N : 0.0;
    }
  }
}

uint64_t bam_mixture_route_hash(const bam_mixture *m) {
  const dims z = dims_m(m);
  const size_t N = (size_t)m->last_B * (size_t)m->last_T;
  uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a over the decisions */
#define MIX(v) h = (h ^ (uint64_t)(uint32_t)(v)) * 0x100000001b3ULL
  for (int l = 0; l < z.L; l++) {
    const layer_acts x = acts_of(m, &z, l);
    for (size_t i = 0; i < N * z.k; i++) {
      MIX(x.ffn_idx[i]);
      MIX(x.ffn_row[i] >= 0);
    }
    const int32_t *att_idx = x.att_idx + (size_t)z.gr * N * z.ka * (z.Ga > 1);
    for (size_t i = 0; i < N * z.ka; i++) MIX(att_idx[i]);
  }
#undef MIX
  return h;
}
