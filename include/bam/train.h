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
#include "bam/tokenizer.h"

typedef struct {
  char domain[BAM_NAME_MAX];
  int64_t tokens;      /* predicted tokens evaluated */
  double loss;         /* mean nats per token */
  double ppl;          /* exp(loss) */
  double bpb;          /* bits per UTF-8 byte of the text those tokens encode */
  double unigram_loss; /* baseline: add-1/2 smoothed unigram of the train split; NaN if not asked */
} bam_eval_result;

/* Evaluate on each domain's validation split: consecutive non-overlapping windows of
 * seq_len tokens from the start, at most max_tokens per domain (0: all), windows dealt
 * round-robin over the ranks of comm and sums reduced in double. Fails if a domain's
 * tokenizer differs from tokenizer_id (when non-empty). out has BAM_MAX_DOMAINS entries. */
bam_status bam_evaluate(bam_model *m, const bam_config *cfg, const char *domains, int max_tokens,
                        int batch_size, int with_unigram, const char *tokenizer_id,
                        bam_eval_result *out, int *n_out, MPI_Comm comm);
void bam_eval_print(const bam_eval_result *r, int n, FILE *f);

/* Dense pretraining as configured; writes <out_dir>/final.h5 and metrics CSVs. */
bam_status bam_pretrain(const bam_config *cfg, MPI_Comm comm);

typedef struct {
  int max_new_tokens;
  float temperature; /* 0: greedy */
  int top_k;         /* 0: whole vocabulary */
  uint64_t seed;
} bam_sample_opts;

/* Continue prompt_ids; writes the decoded continuation to `out` as it is produced. */
bam_status bam_generate(bam_model *m, const bam_tokenizer *tok, const int32_t *prompt_ids,
                        int n_prompt, const bam_sample_opts *opts, FILE *out);

#endif
