/* train: the loops. Pretraining (micro-batches, gradient accumulation, data-parallel
 * gradient sum, clipping, AdamW, schedule, progress, periodic evaluation, checkpoint),
 * per-domain evaluation and sampling. Rank and communicator are passed explicitly. */
#ifndef BAM_TRAIN_H
#define BAM_TRAIN_H

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>

#include "bam/config.h"
#include "bam/data.h"
#include "bam/model.h"
#include "bam/net.h"
#include "bam/tokenizer.h"

typedef struct {
  char domain[BAM_NAME_MAX];
  int64_t tokens;      /* predicted tokens evaluated */
  double loss;         /* mean nats per token */
  double ppl;          /* exp(loss) */
  double bpb;          /* bits per UTF-8 byte of the text those tokens encode */
  double unigram_loss; /* baseline: add-1/2 smoothed unigram of the train split; NaN if not asked */
  /* Mixtures only (NULL for dense models), token-weighted means over the evaluated windows,
   * malloc'd: free with bam_eval_results_free. */
  int n_layers, n_ffn, n_att; /* n_att = 0 for BTX */
  double *ffn_share;   /* (L, Ef) share of the domain's top-k assignments per FFN expert */
  double *att_gate;    /* (L, Ea) mean soft attention gate per attention expert */
  double *ffn_entropy; /* (L) mean FFN router entropy (nats) */
  double *att_entropy; /* (L) mean attention router entropy (nats) */
} bam_eval_result;
void bam_eval_results_free(bam_eval_result *r, int n);
/* Routing tables (per domain and layer: FFN expert shares, soft attention gates, router
 * entropies, dead experts) for mixture results; nothing for dense ones. */
void bam_eval_print_routing(const bam_eval_result *r, int n, FILE *f);
/* The same as CSV rows: domain,layer,router,expert,value (router: ffn | att | ffn_entropy |
 * att_entropy; expert -1 for entropies). */
void bam_eval_write_routing_csv(const bam_eval_result *r, int n, FILE *f);

/* Evaluate on each domain's validation split: consecutive non-overlapping windows of
 * seq_len tokens from the start, at most max_tokens per domain (0: all), windows dealt
 * round-robin over the ranks of comm and sums reduced in double. Fails if a domain's
 * tokenizer differs from tokenizer_id (when non-empty). out has BAM_MAX_DOMAINS entries. */
bam_status bam_evaluate(bam_net *net, const bam_config *cfg, const char *domains, int max_tokens,
                        int batch_size, int with_unigram, const char *tokenizer_id,
                        bam_eval_result *out, int *n_out, MPI_Comm comm);
void bam_eval_print(const bam_eval_result *r, int n, FILE *f);

typedef struct {
  int resume;              /* continue from a checkpoint */
  const char *resume_path; /* NULL or "": the latest under <out_dir>/ckpt (none: start fresh) */
  int stop_after;          /* > 0: stop (after checkpointing) once this many steps are done */
  const char *init_from;   /* start from these parameters (fresh optimizer), unless resuming */
  const char *lineage;     /* "key = value" lines stored in every checkpoint (may be NULL) */
  int eval_at_start;       /* evaluate before the first step (the starting point of a branch) */
} bam_train_opts;

/* Dense data-parallel pretraining as configured. Gradients are summed over the ranks of comm
 * in rank order (bam_reduce_scatter_ordered); each rank keeps the AdamW state of its slice of
 * the parameters only and the updated slices are all-gathered. Writes sharded checkpoints
 * under <out_dir>/ckpt every ckpt.every steps and at the end, <out_dir>/final.h5 (parameters
 * only), metrics.csv and eval.csv. SIGTERM or SIGINT makes every rank stop after the current
 * step and checkpoint; *interrupted is then 1. */
bam_status bam_pretrain(const bam_config *cfg, const bam_train_opts *opts, MPI_Comm comm,
                        int *interrupted);

/* Branch: train one domain expert per domain from the seed, at the same time. The ranks of
 * comm split into groups (one communicator per expert, data parallel inside each); with
 * fewer ranks than experts each rank trains its experts one after another. Expert d trains
 * on "d:(1-general_share),general:general_share" at lr_scale x the config's peak learning
 * rate and writes <out_dir>/<d>/ (checkpoints with lineage: domain, seed_id, tokens). */
typedef struct {
  const char *seed_path;
  const char *domains;      /* "code,math,legal" */
  double general_share;     /* 0.1 */
  double lr_scale;          /* 0.5 */
  int resume;
} bam_branch_opts;
bam_status bam_branch(const bam_config *cfg, const bam_branch_opts *opts, MPI_Comm comm,
                      int *interrupted);

/* Open any checkpoint (a step folder, a run's ckpt folder, or a single-file export), rebuild
 * its config and network (dense or mixture; activations for max_batch sequences) and load its
 * parameters. */
bam_status bam_net_load(bam_net *out, bam_config *cfg, char *tokenizer_id, size_t tok_cap,
                        const char *path, int max_batch);

typedef struct {
  int max_new_tokens;
  float temperature; /* 0: greedy */
  int top_k;         /* 0: whole vocabulary */
  uint64_t seed;
  int no_cache;      /* 1: recompute the whole window for every token (no KV cache) */
  int timing;        /* 1: print prefill time and generation tokens/s to stderr */
} bam_sample_opts;

/* Continue prompt_ids; writes the decoded continuation to `out` as it is produced. With the
 * KV cache (decode.h) the prompt is prefilled once and each new token is one step; the
 * context is the window of the last seq_len tokens either way, so past seq_len every token
 * re-encodes its window, as without the cache. */
bam_status bam_generate(bam_net *net, const bam_tokenizer *tok, const int32_t *prompt_ids,
                        int n_prompt, const bam_sample_opts *opts, FILE *out);

#endif
