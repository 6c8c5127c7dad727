/* mixture: the BTX and BAM mixture-of-experts models of method.md sections 3 and 4.
 *
 *   h = LN(x)
 *   BTX:            y = x + Attn(h)             + MoE(h)
 *   BAM:            y = x + sum_j g_j(h) MHA_j(h) + MoE(h)      g = softmax(h Wa^T) (soft)
 *   BAM shared KV:  as BAM, but every MHA_j uses one shared Wk, Wv
 *
 *   MoE(h) = sum_{i in TopK(p)} p_i(h) FFN_i(h),   p = softmax(h Wr^T) over all E_f experts
 *            (with ffn_renormalize: the top-k gates are renormalised to sum to one)
 *
 * Auxiliary losses, summed over layers and added to the mean token loss:
 *   alpha * L_lb + beta * L_z,   L_lb = E_f sum_i f_i P_i,   L_z = mean_tokens (logsumexp(Wr h))^2
 * f_i = (top-k assignments to expert i) / (tokens * k), a constant in the backward pass;
 * P_i = mean over tokens of p_i. Per sequence (lb_per_sequence, the default: L_lb is averaged
 * over the sequences, so the loss does not depend on how a batch is split over ranks) or over
 * the whole batch.
 *
 * Routing details (mixture.c has the derivations):
 *   - top-k by p, descending, equal values to the lower index; the FFN gates are decided
 *     before capacity (with ffn_renormalize, over the full top-k).
 *   - capacity_factor c > 0: per sequence, expert i accepts at most ceil(c * T * k / Ef)
 *     assignments (T the forward's sequence length), first come first served in token
 *     order; a dropped assignment contributes 0 (the token keeps its other ones, gates
 *     unchanged), and f_i counts KEPT assignments (still divided by tokens * k).
 *   - att_top_k = a > 0: g keeps each token's a largest entries (others 0, not renormalised);
 *     gradients flow through the kept entries only; an expert no token kept is not computed.
 *   - the auxiliary losses use every token, ignored targets included; f_i is a constant.
 *
 * Layout (bam_tensor_info table, one flat buffer like the dense model), IN THIS ORDER, absent
 * entries skipped. Expert tensors are EXPERT-MAJOR, so each expert's weights are one
 * contiguous block per tensor (an expert is a unit of ownership for expert parallelism and
 * checkpoints):
 *   wte (V,d)  ln (L,d)  ln_f (d)  w_head (V,d) unless tied        averaged when mixed
 *   BTX:            wq (L,d,d) wk (L,kvd,d) wv (L,kvd,d) wo (L,d,d)  (dense attention)
 *   BAM:            att_router (L,Ea,d)  wq (Ea,L,d,d) wk (Ea,L,kvd,d) wv (Ea,L,kvd,d) wo (Ea,L,d,d)
 *   BAM shared KV:  att_router (L,Ea,d)  wq (Ea,L,d,d) wk (L,kvd,d) wv (L,kvd,d) wo (Ea,L,d,d)
 *   FFN:            ffn_router (L,Ef,d)  w_gate (Ef,L,f,d) w_up (Ef,L,f,d) w_down (Ef,L,d,f)
 * Routers do not decay (decay = 0); all other matrices do; norms do not. */
#ifndef BAM_MIXTURE_H
#define BAM_MIXTURE_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "bam/core.h"
#include "bam/model.h"

typedef enum {
  BAM_METHOD_BTX = 0,
  BAM_METHOD_BAM = 1,           /* attention experts with their own K/V */
  BAM_METHOD_BAM_SHARED_KV = 2, /* attention experts with one shared K/V */
} bam_method;

const char *bam_method_name(bam_method m); /* "btx", "bam", "bam-shared-kv" */
bam_status bam_method_parse(const char *s, bam_method *out);

typedef struct {
  bam_model_shape base;  /* the dense dimensions every expert shares */
  bam_method method;
  int n_att_experts;     /* Ea: attention experts (BAM); ignored for BTX */
  int n_ffn_experts;     /* Ef: FFN experts */
  int ffn_top_k;         /* k, default 1 */
  int ffn_renormalize;   /* BTX's original: renormalise the top-k gates */
  int att_top_k;         /* 0: soft routing over all Ea (BAM); k: only the top k, not renormalised */
  float lb_coef;         /* alpha, default 0.01 */
  float z_coef;          /* beta, default 0.001 */
  int lb_per_sequence;   /* 1 (default): f_i, P_i per sequence; 0: over the batch */
  float capacity_factor; /* 0: dropless (default); c > 0: at most ceil(c * T * k / Ef)
                            assignments per expert per sequence, later ones dropped */
} bam_mixture_shape;

bam_status bam_mixture_shape_check(const bam_mixture_shape *s);
/* The layout above; returns the tensor count, *total the floats of the flat buffer. */
int bam_mixture_tensors(const bam_mixture_shape *s, bam_tensor_info *out, size_t *total);

typedef struct bam_mix_acts bam_mix_acts;

/* Routing statistics of the last forward, per layer. Each array is filled when not NULL;
 * for BTX the two attention arrays are left untouched (there is no attention router). */
typedef struct {
  double *ffn_share;   /* (L, Ef): share of top-k assignments per expert (routing decisions,
                          before capacity drops: sums to 1 per layer) */
  double *att_gate;    /* (L, Ea): mean attention gate per expert as used (soft: sums to 1;
                          with att_top_k, the kept entries only) (BAM) */
  double *ffn_entropy; /* (L): mean entropy of p (nats) */
  double *att_entropy; /* (L): mean entropy of softmax(h Wa^T) (nats, BAM) */
  int rows;            /* 0: every token of the last forward; n > 0: its first n tokens only
                          (the rest padding, as in a lock-step evaluation under expert
                          parallelism) */
} bam_route_stats;

typedef struct {
  bam_mixture_shape shape;
  int max_batch;
  int n_tensors;
  bam_tensor_info tensors[BAM_MAX_TENSORS];
  size_t n_params;
  float *params_mem, *grads_mem;
  bam_mix_acts *acts;
  size_t act_bytes;
  float *rope_cos, *rope_sin;
  int last_B, last_T;
  float last_loss;      /* mean token loss (without the auxiliary losses) */
  float last_aux_loss;  /* sum over layers of alpha L_lb + beta L_z */
  /* Expert parallelism (bam_mixture_set_ep): the group communicator (MPI_COMM_NULL: none),
   * its size and this rank's position. ep_size 1 is the single-process path. */
  MPI_Comm ep_comm;
  int ep_size, ep_rank;
  /* Expert sharding (bam_mixture_create_sharded): 1 when this rank holds only its own
   * experts. `tensors` and n_params then describe THIS rank's buffer: the replicated
   * tensors first, [0, n_replicated), then its block of each expert tensor (shape[0] = the
   * experts it owns); global_tensors / n_params_global are the layout of the whole mixture
   * (bam_mixture_tensors: checkpoints), global_offset[i] the global element of tensors[i]'s
   * first element and expert0[i] the global index of its first expert (0 if replicated).
   * Unsharded: the two tables are equal, n_replicated = n_params, global_offset = offset. */
  int sharded;
  size_t n_replicated, n_params_global;
  int n_global_tensors;
  bam_tensor_info global_tensors[BAM_MAX_TENSORS];
  size_t global_offset[BAM_MAX_TENSORS];
  int expert0[BAM_MAX_TENSORS];
  double comm_seconds;  /* wall seconds spent in the expert-parallel MPI calls, cumulative */
  /* 1: in every layer the attention branch and the FFN branch run at the same time on two
   * OpenMP threads (each branch's BLAS calls then single-threaded), the FFN's all-to-all
   * exchanges overlapping the attention experts' compute; 0: one after the other, each
   * product on every thread; -1 (default, auto): concurrently when there are two threads or
   * more, the branches' forward FLOPs per token are within 1.5x (BTX; not BAM, whose Ea
   * attention experts outweigh its FFN, so one thread would wait for the other) and d_model
   * is at most BAM_CONCURRENT_MAX_D (model.h). The two give the same results to float
   * rounding (a product on one thread may sum in another order); each is bitwise repeatable. */
  int concurrent_branches;
} bam_mixture;

bam_status bam_mixture_create(bam_mixture **out, const bam_mixture_shape *shape, int max_batch);
void bam_mixture_free(bam_mixture **m);
/* Random init like the dense model (routers N(0, 0.02^2)); upcycling overwrites it. Norms 1,
 * other matrices N(0, std^2), wo and w_down scaled by 1/sqrt(2L). Each (tensor, expert, layer)
 * slice has its own RNG stream keyed by name, layer and expert; expert 0 and the non-expert
 * tensors draw what bam_model_init draws for the same name and seed. */
void bam_mixture_init(bam_mixture *m, uint64_t seed, float std);
/* The tensor by name, or NULL (also for w_head when tied: the head is wte). */
float *bam_mixture_tensor(bam_mixture *m, const char *name, const bam_tensor_info **info);

/* Expert parallelism (docs/design-expert-parallel.md). With a communicator of ep > 1 ranks
 * (MPI_COMM_NULL or a size-1 communicator: the single-process path, bitwise unchanged),
 * forward and backward become collective over it: every rank of the group passes the same
 * B and T, routes and scores its own sequences, and rank r computes only FFN experts
 * [r Ef/ep, (r+1) Ef/ep) (tokens exchanged with MPI_Alltoallv, rows ordered by source rank
 * then sender order) and, for BAM, attention experts [r Ea/ep, (r+1) Ea/ep) on every
 * sequence of the group (h all-gathered, partial sums reduce-scattered in rank order).
 * Parameters stay replicated; the gradient buffer holds this rank's share: its own
 * experts' gradients (zeros for the others) plus the replicated tensors' gradients of its
 * tokens, so summing the buffers of the group (any order: x + 0 = x) gives the gradient of
 * the group's batch. ep must divide Ef and, for BAM, Ea. Reallocates the activations when
 * the group size changes; the communicator is borrowed (the caller frees it). */
bam_status bam_mixture_set_ep(bam_mixture *m, MPI_Comm ep_comm);
/* A mixture that holds only this rank's experts (docs/design-expert-parallel.md): rank r of
 * an ep_comm group of G ranks allocates the replicated tensors and FFN experts
 * [r Ef/G, (r+1) Ef/G) (for BAM also attention experts [r Ea/G, (r+1) Ea/G), with their K/V
 * when each expert has its own), parameters and gradients alike, and is bound to that group
 * for life (bam_mixture_set_ep refuses another one). Forward and backward are those of
 * bam_mixture_set_ep on a full mixture, bitwise: the gradient buffer holds this rank's
 * experts' gradients over the group's tokens plus the replicated tensors' gradients of its own
 * tokens. bam_mixture_init gives its blocks exactly the values the full mixture's blocks get.
 * A group of one rank (or MPI_COMM_NULL) gives the ordinary full mixture. */
bam_status bam_mixture_create_sharded(bam_mixture **out, const bam_mixture_shape *shape,
                                      int max_batch, MPI_Comm ep_comm);
/* This rank's layout for rank r of a group of G (the replicated tensors, then the expert
 * blocks; see bam_mixture.sharded): fills out, global_offset and expert0 (BAM_MAX_TENSORS
 * entries each), returns the count; *total the floats, *replicated those of the replicated
 * part. G = 1 gives bam_mixture_tensors' table. G must divide the expert counts. */
int bam_mixture_tensors_sharded(const bam_mixture_shape *s, int G, int r, bam_tensor_info *out,
                                size_t *global_offset, int *expert0, size_t *total,
                                size_t *replicated);
/* Cumulative wall seconds spent in the expert-parallel MPI calls (all-to-all dispatch,
 * attention all-gather and reduce-scatter) since creation; 0 without expert parallelism. */
double bam_mixture_comm_seconds(const bam_mixture *m);

/* Forward as bam_model_forward; *loss is the mean token loss PLUS the auxiliary losses
 * (the quantity that is differentiated); m->last_loss holds the token loss alone and
 * m->last_aux_loss the auxiliary part (also set by a forward without targets). With every
 * target ignored the token loss is 0 and the backward adds only the auxiliary gradients.
 * Backward: as bam_model_backward (accumulates, scaled by grad_scale, auxiliary losses
 * included; once per forward with targets). */
bam_status bam_mixture_forward(bam_mixture *m, const int32_t *tokens, const int32_t *targets,
                               int B, int T, float *loss);
bam_status bam_mixture_backward(bam_mixture *m, float grad_scale);
void bam_mixture_zero_grad(bam_mixture *m);
float *bam_mixture_logits(bam_mixture *m);
const float *bam_mixture_token_losses(const bam_mixture *m);
/* Routing statistics of the last forward into caller-allocated arrays (see bam_route_stats). */
void bam_mixture_route_stats(const bam_mixture *m, bam_route_stats *out);
/* A 64-bit hash of every discrete routing decision of the last forward (FFN top-k experts,
 * capacity drops, attention top-k): equal hashes mean the same dispatch. For tests (finite
 * differences are only valid while no decision flips) and debugging. */
uint64_t bam_mixture_route_hash(const bam_mixture *m);

/* Forward FLOPs per token (method.md section 5, only the experts a token uses): per layer,
 * each attention expert used 2d(d + 2kvd) + 2Td + 2d^2 (shared KV: the K,V term once for all
 * experts), BAM's attention router 2 Ea d, the FFN router 2 Ef d and k SwiGLU experts 6 d f;
 * plus the head 2 d V. With att_top_k = a, Q, attention and out count a times and K,V every
 * expert's (other tokens read them). */
double bam_mixture_flops_per_token(const bam_mixture_shape *s, int T);

#endif
