#include <string.h>

#include "bam/net.h"
#include "bam/upcycle.h"

static void views(bam_net *n) {
  if (n->dense) {
    bam_model *m = n->dense;
    n->kind = "dense";
    n->n_params = m->n_params, n->params = m->params_mem, n->grads = m->grads_mem;
    n->tensors = m->tensors, n->n_tensors = m->n_tensors, n->max_batch = m->max_batch;
    n->seq_len = m->shape.seq_len, n->vocab_size = m->shape.vocab_size, n->act_bytes = m->act_bytes;
    n->global_tensors = m->tensors, n->n_global_tensors = m->n_tensors;
    n->n_params_global = n->n_replicated = m->n_params;
    for (int i = 0; i < m->n_tensors; i++) n->global_offset[i] = m->tensors[i].offset;
  } else {
    bam_mixture *m = n->mix;
    n->kind = bam_method_name(m->shape.method);
    n->n_params = m->n_params, n->params = m->params_mem, n->grads = m->grads_mem;
    n->tensors = m->tensors, n->n_tensors = m->n_tensors, n->max_batch = m->max_batch;
    n->seq_len = m->shape.base.seq_len, n->vocab_size = m->shape.base.vocab_size;
    n->act_bytes = m->act_bytes;
    n->global_tensors = m->global_tensors, n->n_global_tensors = m->n_global_tensors;
    n->n_params_global = m->n_params_global, n->n_replicated = m->n_replicated;
    for (int i = 0; i < m->n_tensors; i++) n->global_offset[i] = m->global_offset[i];
  }
}

bam_status bam_net_create(bam_net *n, const bam_config *cfg, int max_batch) {
  return bam_net_create_ep(n, cfg, max_batch, MPI_COMM_NULL);
}

bam_status bam_net_create_ep(bam_net *n, const bam_config *cfg, int max_batch, MPI_Comm ep_comm) {
  memset(n, 0, sizeof *n);
  if (!cfg->method[0]) {
    int size = 1;
    if (ep_comm != MPI_COMM_NULL) MPI_Comm_size(ep_comm, &size);
    if (size > 1)
      BAM_FAIL(BAM_ERR_CONFIG, "expert parallelism (ep = %d) needs a mixture, not a dense model",
               size);
    bam_model_shape s = bam_config_shape(cfg);
    BAM_CHECK(bam_model_create(&n->dense, &s, max_batch));
    n->dense->concurrent_branches = cfg->concurrent_branches;
  } else {
    bam_mixture_shape s;
    BAM_CHECK(bam_mixture_shape_from_config(cfg, &s));
    BAM_CHECK(bam_mixture_create_sharded(&n->mix, &s, max_batch, ep_comm));
    n->mix->concurrent_branches = cfg->concurrent_branches;
  }
  views(n);
  return BAM_OK;
}

bam_status bam_net_set_ep(bam_net *n, MPI_Comm ep_comm) {
  int size = 1;
  if (ep_comm != MPI_COMM_NULL) MPI_Comm_size(ep_comm, &size);
  if (n->dense) {
    if (size > 1)
      BAM_FAIL(BAM_ERR_CONFIG, "expert parallelism (ep = %d) needs a mixture, not a dense model",
               size);
    return BAM_OK;
  }
  BAM_CHECK(bam_mixture_set_ep(n->mix, ep_comm));
  views(n); /* the activation size changed */
  return BAM_OK;
}

void bam_net_free(bam_net *n) {
  bam_model_free(&n->dense);
  bam_mixture_free(&n->mix);
  memset(n, 0, sizeof *n);
}

void bam_net_init(bam_net *n, uint64_t seed, float std) {
  if (n->dense) bam_model_init(n->dense, seed, std);
  else bam_mixture_init(n->mix, seed, std);
}

bam_status bam_net_forward(bam_net *n, const int32_t *tokens, const int32_t *targets, int B,
                           int T, float *loss) {
  return n->dense ? bam_model_forward(n->dense, tokens, targets, B, T, loss)
                  : bam_mixture_forward(n->mix, tokens, targets, B, T, loss);
}

bam_status bam_net_backward(bam_net *n, float grad_scale) {
  return n->dense ? bam_model_backward(n->dense, grad_scale)
                  : bam_mixture_backward(n->mix, grad_scale);
}

void bam_net_zero_grad(bam_net *n) { memset(n->grads, 0, n->n_params * sizeof(float)); }

float bam_net_token_loss(const bam_net *n) {
  return n->dense ? n->dense->last_loss : n->mix->last_loss;
}

const float *bam_net_token_losses(const bam_net *n) {
  return n->dense ? bam_model_token_losses(n->dense) : bam_mixture_token_losses(n->mix);
}

float *bam_net_logits(bam_net *n) {
  return n->dense ? bam_model_logits(n->dense) : bam_mixture_logits(n->mix);
}

double bam_net_flops_per_token(const bam_net *n, int T) {
  return n->dense ? bam_model_flops_per_token(&n->dense->shape, T)
                  : bam_mixture_flops_per_token(&n->mix->shape, T);
}

double bam_net_comm_seconds(const bam_net *n) {
  return n->mix ? bam_mixture_comm_seconds(n->mix) : 0.0;
}

int bam_net_is_expert_tensor(const bam_net *n, const bam_tensor_info *t) {
  return n->mix != NULL && t->ndim == 4;
}
