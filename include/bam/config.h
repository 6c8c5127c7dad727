/* config: the run configuration, read from an INI file (libinih) plus --set overrides.
 *
 * Every key lives in one table (config.c) with its type, range and help, so parsing,
 * validation, printing and storing the resolved config in a checkpoint share one source of
 * truth. Unknown sections or keys, malformed or out-of-range values and missing files are
 * errors naming the file, line and key. */
#ifndef BAM_CONFIG_H
#define BAM_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#include "bam/core.h"
#include "bam/model.h"

#define BAM_PATH_MAX 512

typedef struct {
  /* [model] */
  bam_model_shape model;
  float init_std;
  /* [data] */
  char data_dir[BAM_PATH_MAX];
  char train_mix[256];    /* "general:0.9,code:0.1" */
  char eval_domains[256]; /* "general,code,math,legal,reference" */
  /* [train] */
  int steps;
  int batch_size;         /* global sequences per micro-batch (split over ranks) */
  int concurrent_branches; /* block branches on two threads: 1, 0, -1 auto (model.h, mixture.h) */
  int grad_accum;         /* micro-batches per optimizer step */
  float lr;               /* peak learning rate */
  int warmup_steps;
  float min_lr_ratio;     /* cosine decays to min_lr_ratio * lr */
  float weight_decay;
  float beta1, beta2, adam_eps;
  float grad_clip;
  int64_t seed;
  int log_every;
  /* [eval] */
  int eval_every;         /* steps between evaluations; 0: only at the end */
  int eval_max_tokens;    /* per domain and evaluation; 0: the whole validation split */
  int eval_batch_size;
  /* [mixture] (mixture training; bam mix writes these into the mixture checkpoint) */
  char method[32];        /* btx | bam | bam-shared-kv */
  int n_att_experts;      /* BAM attention experts (E = seed + domain experts) */
  int n_ffn_experts;      /* FFN experts (E, or more for the parameter-matched BTX) */
  int ffn_top_k;
  int ffn_renormalize;
  int att_top_k;          /* 0: soft routing over all attention experts */
  float lb_coef, z_coef;
  int lb_per_sequence;
  float capacity_factor;  /* 0: dropless */
  int freeze_experts;     /* train routers and shared tensors only */
  int ep;                 /* expert-parallel group size */
  /* [ckpt] */
  int ckpt_every;         /* steps between checkpoints; 0: only the final one */
  int ckpt_keep;          /* checkpoints kept (older ones pruned) */
  /* [run] */
  char out_dir[BAM_PATH_MAX];
  /* [pipeline] (jobs/pipeline.sh: the study's stages). Validated like every key, ignored by
   * training, and not written by bam_config_write (so not stored in checkpoints): a stage's
   * checkpoint does not change when only the pipeline's settings do. */
  char pipeline_domains[256];      /* expert domains, comma separated */
  int pipeline_branch_steps;       /* steps of each domain expert; 0: train.steps */
  int pipeline_mix_steps;          /* steps of the data-matched mixture runs; 0: train.steps */
  int pipeline_eval_tokens;        /* tokens per domain in the eval stage; 0: whole split */
  char pipeline_eval_domains[256]; /* empty: general, the expert domains, reference */
} bam_config;

void bam_config_defaults(bam_config *c);
/* Read an INI file over the current values. */
bam_status bam_config_load(bam_config *c, const char *path);
/* Apply "section.key=value" (from --set). */
bam_status bam_config_set(bam_config *c, const char *assignment);
/* Parse INI text held in memory (e.g. the config stored in a checkpoint); origin names it. */
bam_status bam_config_load_string(bam_config *c, const char *text, const char *origin);
/* Cross-field checks (model shape, batch vs. ranks done by the caller). */
bam_status bam_config_validate(const bam_config *c, const char *origin);
/* The model shape with defaults resolved (n_kv_heads 0 -> n_heads). */
bam_model_shape bam_config_shape(const bam_config *c);
/* Write the resolved config as INI text (every section but [pipeline]). */
void bam_config_write(const bam_config *c, FILE *f);
/* The same into a malloc'd string (caller frees with free()). */
char *bam_config_to_string(const bam_config *c);

#endif
