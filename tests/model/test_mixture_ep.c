/* bam-test-ranks: 2 4
 * Expert parallelism of the mixture (bam_mixture_set_ep): on groups of ep ranks, each rank
 * holding its share of the batch, the loss, the logits of its rows and the gradients summed
 * over the ranks equal those of one process holding the whole batch; each rank's gradient
 * buffer holds zeros for the experts it does not own; the same run twice is bitwise
 * identical; switching back to the single-process path works; ep not dividing the experts
 * is refused. Every method, top-k FFN routing with renormalisation, capacity drops,
 * attention top-k, GQA. */
#include <math.h>
#include <string.h>

#include "bam/mixture.h"
#include "test_util.h"

typedef struct {
  bam_method method;
  int hkv, k, renorm, att_top_k;
  float cap;
} cfg;

static bam_mixture_shape mix_shape(cfg c, int Ef, int Ea) {
  return (bam_mixture_shape){
      .base = {.n_layers = 2, .d_model = 16, .n_heads = 4, .n_kv_heads = c.hkv, .d_ff = 12,
               .vocab_size = 29, .seq_len = 8, .tie_embeddings = 0, .rope_base = 10000.0f,
               .norm_eps = 1e-5f},
      .method = c.method,
      .n_att_experts = Ea,
      .n_ffn_experts = Ef,
      .ffn_top_k = c.k,
      .ffn_renormalize = c.renorm,
      .att_top_k = c.att_top_k,
      .lb_coef = 0.1f,
      .z_coef = 0.05f,
      .lb_per_sequence = 1,
      .capacity_factor = c.cap};
}

static void random_ids(int32_t *x, int n, int V, uint64_t seed) {
  bam_rng r;
  bam_rng_seed(&r, seed, 0);
  for (int i = 0; i < n; i++) x[i] = (int32_t)bam_rng_below(&r, (uint64_t)V);
}

static double rel_diff(const float *a, const float *b, size_t n) {
  double dn = 0, nn = 0;
  for (size_t i = 0; i < n; i++) {
    const double e = (double)a[i] - b[i];
    dn += e * e;
    nn += (double)b[i] * b[i];
  }
  return nn > 0 ? sqrt(dn / nn) : sqrt(dn);
}

/* One configuration on groups of ep consecutive ranks of the world. */
static void run(cfg c, int ep, int rank, int world) {
  const int Ef = 4, Ea = 4, Bl = 2, T = 8, BW = Bl * world, V = 29;
  const bam_mixture_shape s = mix_shape(c, Ef, Ea);
  char name[128];
  snprintf(name, sizeof name, "%s hkv=%d k=%d renorm=%d att_top_k=%d cap=%g ep=%d of %d",
           bam_method_name(c.method), c.hkv, c.k, c.renorm, c.att_top_k, (double)c.cap, ep, world);
  const int NW = BW * T, Nl = Bl * T;
  int32_t *tok = bam_alloc(sizeof(int32_t) * NW), *tgt = bam_alloc(sizeof(int32_t) * NW);
  random_ids(tok, NW, V, 5);
  random_ids(tgt, NW, V, 6);

  /* the reference: one process, the whole batch */
  bam_mixture *ref = NULL, *m = NULL;
  T_OK(bam_mixture_create(&ref, &s, BW));
  T_OK(bam_mixture_create(&m, &s, Bl));
  if (!ref || !m) return;
  bam_mixture_init(ref, 3, 0.3f);
  bam_mixture_init(m, 3, 0.3f);
  float loss_ref = 0, loss = 0;
  bam_mixture_zero_grad(ref);
  T_OK(bam_mixture_forward(ref, tok, tgt, BW, T, &loss_ref));
  T_OK(bam_mixture_backward(ref, 1.0f));

  MPI_Comm comm;
  MPI_Comm_split(MPI_COMM_WORLD, rank / ep, rank, &comm);
  T_OK(bam_mixture_set_ep(m, comm));
  T_CHECK(m->ep_size == ep && m->ep_rank == rank % ep, "%s: ep_size %d ep_rank %d", name,
          m->ep_size, m->ep_rank);
  const int32_t *mt = tok + (size_t)rank * Nl, *my = tgt + (size_t)rank * Nl;
  float *g1 = bam_alloc(sizeof(float) * m->n_params), *sum = bam_alloc(sizeof(float) * m->n_params);
  for (int rep = 0; rep < 2; rep++) {
    bam_mixture_zero_grad(m);
    T_OK(bam_mixture_forward(m, mt, my, Bl, T, &loss));
    T_OK(bam_mixture_backward(m, 1.0f / (float)world));
    if (rep == 0) memcpy(g1, m->grads_mem, sizeof(float) * m->n_params);
  }
  T_CHECK(!memcmp(g1, m->grads_mem, sizeof(float) * m->n_params),
          "%s: the same run twice gives different gradients", name);
  /* loss: the mean of the ranks' means (equal token counts) */
  double l = loss;
  MPI_Allreduce(MPI_IN_PLACE, &l, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  T_CLOSE(l / world, loss_ref, 0, 1e-5, name);
  /* this rank's logits are the reference's rows (forward without targets keeps them) */
  T_OK(bam_mixture_forward(m, mt, NULL, Bl, T, NULL));
  T_OK(bam_mixture_forward(ref, tok, NULL, BW, T, NULL));
  const double dl = rel_diff(bam_mixture_logits(m), bam_mixture_logits(ref) + (size_t)rank * Nl * V,
                             (size_t)Nl * V);
  T_CHECK(dl < 1e-5, "%s: logits differ by %.2e", name, dl);
  /* expert blocks this rank does not own: exactly zero; its own: not all zero */
  const int r = rank % ep;
  for (int i = 0; i < m->n_tensors; i++) {
    const bam_tensor_info *t = &m->tensors[i];
    if (t->ndim != 4) continue;
    const int E = (int)t->shape[0], per = E / ep;
    const size_t blk = t->numel / (size_t)E;
    int zero_ok = 1, own_nonzero = 0;
    for (int e = 0; e < E; e++)
      for (size_t j = 0; j < blk; j++) {
        const float v = g1[t->offset + (size_t)e * blk + j];
        if (e / per == r) own_nonzero |= v != 0.0f;
        else zero_ok &= v == 0.0f;
      }
    T_CHECK(zero_ok, "%s: %s has gradients in experts rank %d does not own", name, t->name, r);
    T_CHECK(own_nonzero, "%s: %s has no gradient in rank %d's own experts", name, t->name, r);
  }
  /* gradients summed over the world equal the whole-batch gradient */
  MPI_Allreduce(g1, sum, (int)m->n_params, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  for (int i = 0; i < m->n_tensors; i++) {
    const bam_tensor_info *t = &m->tensors[i];
    const double d = rel_diff(sum + t->offset, ref->grads_mem + t->offset, t->numel);
    T_CHECK(d < 2e-5, "%s: gradient of %s differs by %.2e", name, t->name, d);
  }
  /* Expert sharding: a mixture holding only this rank's experts starts from the same
   * values (its blocks of the full mixture's tensors), and its forward and backward are the
   * replicated ones bitwise: same loss, its gradient blocks equal to the full buffer's. */
  bam_mixture *sh = NULL;
  T_OK(bam_mixture_create_sharded(&sh, &s, Bl, comm));
  if (sh) {
    bam_mixture_init(sh, 3, 0.3f);
    T_CHECK(sh->sharded && sh->n_params < m->n_params && sh->n_params_global == m->n_params,
            "%s: sharded mixture holds %zu of %zu parameters", name, sh->n_params, m->n_params);
    size_t expert_floats = 0;
    for (int i = 0; i < sh->n_tensors; i++) {
      const bam_tensor_info *t = &sh->tensors[i];
      if (t->ndim == 4) expert_floats += t->numel;
      T_CHECK(t->offset >= sh->n_replicated || t->ndim != 4, "%s: expert tensor %s in the "
              "replicated part", name, t->name);
      T_CHECK(!memcmp(sh->params_mem + t->offset, m->params_mem + sh->global_offset[i],
                      t->numel * sizeof(float)),
              "%s: sharded %s differs from the full mixture's block", name, t->name);
    }
    T_CHECK(sh->n_params - sh->n_replicated == expert_floats,
            "%s: expert part %zu floats, tensors %zu", name, sh->n_params - sh->n_replicated,
            expert_floats);
    float loss_sh = 0;
    bam_mixture_zero_grad(sh);
    T_OK(bam_mixture_forward(sh, mt, my, Bl, T, &loss_sh));
    T_OK(bam_mixture_backward(sh, 1.0f / (float)world));
    T_CHECK(loss_sh == loss, "%s: sharded loss %.9g, replicated %.9g", name, loss_sh, loss);
    for (int i = 0; i < sh->n_tensors; i++) {
      const bam_tensor_info *t = &sh->tensors[i];
      T_CHECK(!memcmp(sh->grads_mem + t->offset, g1 + sh->global_offset[i],
                      t->numel * sizeof(float)),
              "%s: sharded gradient of %s differs from the replicated one", name, t->name);
    }
    T_CHECK(bam_mixture_set_ep(sh, MPI_COMM_NULL) == BAM_ERR_ARG,
            "%s: a sharded mixture left its group", name);
    bam_error_clear();
    bam_mixture_free(&sh);
  }
  /* back to the single-process path: this rank's batch alone, the same loss */
  T_OK(bam_mixture_set_ep(m, MPI_COMM_NULL));
  float loss1 = 0;
  T_OK(bam_mixture_forward(m, mt, my, Bl, T, &loss1));
  T_CLOSE(loss1, loss, 0, 1e-5, name);
  MPI_Comm_free(&comm);
  bam_free(g1);
  bam_free(sum);
  bam_free(tok);
  bam_free(tgt);
  bam_mixture_free(&m);
  bam_mixture_free(&ref);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, world;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const cfg cases[] = {
      {BAM_METHOD_BTX, 2, 2, 1, 0, 0.0f},
      {BAM_METHOD_BAM, 4, 1, 0, 0, 0.0f},
      {BAM_METHOD_BAM, 2, 2, 0, 2, 1.0f},
      {BAM_METHOD_BAM_SHARED_KV, 2, 2, 1, 0, 0.0f},
      {BAM_METHOD_BAM_SHARED_KV, 4, 1, 0, 1, 0.75f},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    run(cases[i], world, rank, world);
    if (world == 4) run(cases[i], 2, rank, world);
  }
  /* ep must divide the experts */
  bam_mixture *m = NULL;
  const bam_mixture_shape s3 = mix_shape((cfg){BAM_METHOD_BAM, 2, 1, 0, 0, 0.0f}, 3, 4);
  T_OK(bam_mixture_create(&m, &s3, 1));
  if (m) {
    T_CHECK(bam_mixture_set_ep(m, MPI_COMM_WORLD) == BAM_ERR_CONFIG, "ep = %d, Ef = 3 accepted", world);
    bam_error_clear();
    T_CHECK(m->ep_size == 1, "a refused group size was kept");
    bam_mixture_free(&m);
  }
  const bam_mixture_shape s6 = mix_shape((cfg){BAM_METHOD_BAM, 2, 1, 0, 0, 0.0f}, 4, 6);
  T_OK(bam_mixture_create(&m, &s6, 1));
  if (m) {
    if (world == 4)
      T_CHECK(bam_mixture_set_ep(m, MPI_COMM_WORLD) == BAM_ERR_CONFIG, "ep = 4, Ea = 6 accepted");
    bam_error_clear();
    bam_mixture_free(&m);
  }

  int failed = bam_t_fail;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Finalize();
  if (rank != 0) return failed ? 1 : 0;
  bam_t_fail = failed;
  BAM_TEST_END();
}
