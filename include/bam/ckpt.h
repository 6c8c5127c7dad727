/* ckpt: model checkpoints in HDF5.
 *
 * A checkpoint file holds:
 *   attributes  format = "bam-checkpoint", version = 1, step, tokens_seen, loader_position,
 *               tokenizer (vocabulary identity), config (the resolved INI text), kind ("dense"),
 *               n_params; files exported from sharded checkpoints (bam/shard.h) also lineage,
 *               world, and the datasets /loader_state (world) and /rng_state (world x 4)
 *   /params/<name>   float32 tensors named and shaped as bam_model_tensors(), each with the
 *                    attributes offset (its place in the flat buffer) and decay
 *   /adam_m/<name>, /adam_v/<name>   AdamW moments (optional)
 * bam_ckpt_open (bam/shard.h) reads these files too; docs/checkpoint-format.md describes both.
 * Every dataset is chunked with the Fletcher32 checksum filter, so a flipped byte is a read
 * error, never silently wrong weights. Files are written to "<path>.tmp", flushed, fsync'ed
 * and renamed into place: a kill leaves either the old file or the new one, never half of one. */
#ifndef BAM_CKPT_H
#define BAM_CKPT_H

#include <stdint.h>

#include "bam/core.h"
#include "bam/model.h"

typedef struct {
  int64_t step;
  int64_t tokens_seen;
  int64_t loader_position;
  char tokenizer[64];
  char *config_text; /* malloc'd by bam_ckpt_read_meta; caller frees */
} bam_ckpt_meta;

/* adam_m / adam_v may be NULL (then not written). */
bam_status bam_ckpt_save(const char *path, const bam_model *m, const float *adam_m,
                         const float *adam_v, const bam_ckpt_meta *meta);
bam_status bam_ckpt_read_meta(const char *path, bam_ckpt_meta *meta);
void bam_ckpt_meta_free(bam_ckpt_meta *meta);
/* Load parameters (and moments if non-NULL and present) into a model created with the
 * checkpoint's shape. Every tensor must exist with exactly the expected shape. */
bam_status bam_ckpt_load(const char *path, bam_model *m, float *adam_m, float *adam_v);

#endif
