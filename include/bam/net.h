/* net: one handle over the networks the loops train and evaluate, the dense model or a
 * BTX/BAM mixture, chosen by the config ([mixture] method empty: dense). Both keep their
 * parameters and gradients in one flat buffer described by a tensor table, so the trainer,
 * the gradient exchange, the optimizer and the checkpoints see only these views. */
#ifndef BAM_NET_H
#define BAM_NET_H

#include "bam/config.h"
#include "bam/mixture.h"
#include "bam/model.h"

typedef struct {
  bam_model *dense;      /* exactly one of these two is set */
  bam_mixture *mix;
  const char *kind;      /* "dense", "btx", "bam", "bam-shared-kv" */
  size_t n_params;
  float *params, *grads;
  const bam_tensor_info *tensors;
  int n_tensors;
  int max_batch, seq_len, vocab_size;
  size_t act_bytes;
  /* The buffers are this rank's part of the global layout (global_tensors, n_params_global:
   * what checkpoints hold): tensors[i] is global elements [global_offset[i], + numel).
   * [0, n_replicated) is the same on every rank; [n_replicated, n_params) holds this rank's
   * expert blocks (an expert-sharded mixture, bam_net_create_ep), else it is empty and the
   * two layouts are one. */
  const bam_tensor_info *global_tensors;
  int n_global_tensors;
  size_t n_params_global, n_replicated;
  size_t global_offset[BAM_MAX_TENSORS];
} bam_net;

bam_status bam_net_create(bam_net *n, const bam_config *cfg, int max_batch);
/* As bam_net_create; a mixture with an ep_comm of more than one rank holds only this rank's
 * experts (bam_mixture_create_sharded) and is bound to that group. */
bam_status bam_net_create_ep(bam_net *n, const bam_config *cfg, int max_batch, MPI_Comm ep_comm);
void bam_net_free(bam_net *n);
void bam_net_init(bam_net *n, uint64_t seed, float std);
/* Expert parallelism over ep_comm (bam_mixture_set_ep); MPI_COMM_NULL: none. A dense model
 * accepts only MPI_COMM_NULL or a size-1 communicator. */
bam_status bam_net_set_ep(bam_net *n, MPI_Comm ep_comm);
/* *loss is the differentiated loss (token loss plus a mixture's auxiliary losses). */
bam_status bam_net_forward(bam_net *n, const int32_t *tokens, const int32_t *targets, int B,
                           int T, float *loss);
bam_status bam_net_backward(bam_net *n, float grad_scale);
void bam_net_zero_grad(bam_net *n);
float bam_net_token_loss(const bam_net *n);       /* mean token loss of the last forward */
const float *bam_net_token_losses(const bam_net *n);
float *bam_net_logits(bam_net *n);
double bam_net_flops_per_token(const bam_net *n, int T);
/* Cumulative seconds in a mixture's expert-parallel MPI calls (0 for the dense model). */
double bam_net_comm_seconds(const bam_net *n);
/* Expert tensors: a mixture's expert-major tensors (4-D: expert, layer, rows, cols). */
int bam_net_is_expert_tensor(const bam_net *n, const bam_tensor_info *t);

#endif
