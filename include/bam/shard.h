/* shard: sharded, resumable checkpoints (a folder per checkpoint, one HDF5 shard per rank).
 *
 * The trainer's state is three flat float buffers with one layout (bam_tensor_info table):
 * parameters, AdamW m and AdamW v. Rank r of P owns the range [lo_r, hi_r) of that layout
 * (bam_partition) and writes exactly that range of each buffer to its shard. The index file
 * describes every tensor and which shard holds which slice of it, so a checkpoint written by
 * P ranks can be read back by any other number of ranks (resharding is reading ranges).
 *
 *   <ckpt_dir>/step-000200/index.h5             written by rank 0, last
 *   <ckpt_dir>/step-000200/shard-00000-of-00002.h5   one per writing rank
 *   <ckpt_dir>/latest                            text file: "step-000200\n", replaced last
 *
 * Writes are atomic: shards go to <ckpt_dir>/.tmp-step-000200/, every rank fsyncs and passes
 * a barrier, rank 0 writes and fsyncs the index, renames the folder into place, fsyncs the
 * parent, then atomically replaces `latest` and prunes old checkpoints beyond `keep`.
 * A kill at any moment leaves the previous checkpoint and `latest` intact.
 * Every shard dataset carries HDF5's Fletcher32 filter and a CRC-32C of its bytes recorded in
 * the index; a missing, truncated, renamed or altered shard is refused with a message naming
 * the file and the tensor, never read as zeros. docs/checkpoint-format.md is the reference.
 *
 * HDF5 is built without thread safety: call these functions from one thread per rank, never
 * from inside an OpenMP parallel region. One job writes a given checkpoint folder at a time. */
#ifndef BAM_SHARD_H
#define BAM_SHARD_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "bam/core.h"
#include "bam/model.h"

typedef struct {
  size_t lo, hi; /* [lo, hi) in floats */
} bam_range;

/* The range of rank r of P: near-equal, boundaries multiples of 16 floats (64 bytes). */
bam_range bam_partition(size_t n, int rank, int world);

#define BAM_CKPT_MAX_RANKS 4096
typedef struct {
  char kind[32];            /* "dense" (later "btx", "bam", "bam-shared-kv") */
  int64_t step;             /* optimizer steps completed */
  int64_t tokens_seen;
  char tokenizer[64];       /* vocabulary identity */
  char *config_text;        /* resolved INI text (owned by caller on save; malloc'd on read) */
  char *lineage_text;       /* free-form "key = value" lines (seed, domain, ...); may be NULL
                               on save; on read always a malloc'd string, "" when none */
  int world;                /* ranks that wrote it */
  int64_t *loader_state;    /* world entries: each rank's data-loader position; malloc'd on read */
  uint64_t *rng_state;      /* world x 4 entries: each rank's RNG state; malloc'd on read */
} bam_ckpt_info;
/* Frees the four pointers (config_text, lineage_text, loader_state, rng_state) and NULLs them.
 * The info of an open checkpoint belongs to the handle: bam_ckpt_close frees it. */
void bam_ckpt_info_free(bam_ckpt_info *info);

/* Collective over comm. Every rank passes the same layout and info (loader_state and
 * rng_state hold THIS rank's entries: loader_state[0], rng_state[0..3]; they are gathered),
 * its owned range `own` (= bam_partition(n_params, rank, world) in the trainer, but any
 * disjoint cover of [0, n_params) is accepted), and pointers to the owned slices of the three
 * buffers (params_own[i] is element own.lo + i; m_own / v_own may be NULL to save parameters
 * only). keep >= 1 checkpoints are kept: this one and the keep-1 newest of EARLIER steps
 * (folders of later steps, left by a run resumed from an earlier checkpoint, are left alone
 * until this run saves their step, which replaces them). Saving a step that exists replaces it
 * atomically. Stale .tmp-* folders of killed saves are removed. On return, out_path (if
 * non-NULL) holds the step folder. Any rank's failure is reported on every rank (no rank is
 * left in a collective): the failing rank with its own message, the others with "rank N failed
 * while writing the checkpoint in <dir>: <its message>".
 * Test-only: BAM_CKPT_TEST_PAUSE_S=<seconds> in the environment makes every rank sleep after
 * the shards are written and before the checkpoint is published (to kill a job mid-save). */
bam_status bam_ckpt_save_sharded(const char *ckpt_dir, const bam_ckpt_info *info,
                                 const bam_tensor_info *tensors, int n_tensors, size_t n_params,
                                 bam_range own, const float *params_own, const float *m_own,
                                 const float *v_own, int keep, MPI_Comm comm, char *out_path,
                                 size_t out_cap);

/* A state held in pieces (an expert-sharded mixture: each rank holds the replicated tensors
 * and its own experts, and the optimizer state of slices of both): piece i of a rank is
 * global elements [global, global + n) of the layout, found at params[local ...] and, for
 * the moments, m[state ...], v[state ...]. */
typedef struct {
  size_t global, local, state, n;
} bam_ckpt_piece;
/* As bam_ckpt_save_sharded, collective over comm, for pieces: the pieces of all ranks must
 * tile [0, n_params) (checked: a gap or an overlap is an error on every rank). When every
 * rank's pieces form one range (the data-parallel trainer), they are written as they are;
 * otherwise they are first moved (MPI_Alltoallv) to the ranges of bam_partition, so the
 * checkpoint is the one P ranks of a dense run would write, readable with any layout. Costs
 * a temporary copy of the rank's partition range of each buffer. */
bam_status bam_ckpt_save_pieces(const char *ckpt_dir, const bam_ckpt_info *info,
                                const bam_tensor_info *tensors, int n_tensors, size_t n_params,
                                const bam_ckpt_piece *pieces, int n_pieces, const float *params,
                                const float *m, const float *v, int keep, MPI_Comm comm,
                                char *out_path, size_t out_cap);

typedef struct bam_ckpt bam_ckpt;
/* Open a checkpoint for reading (not collective; each rank opens its own handle). path may
 * be a step folder, a checkpoint folder holding `latest` (it is followed), or a single-file
 * export (bam_ckpt_export output). Validates the index and that every shard exists with the
 * recorded size before anything is read. */
bam_status bam_ckpt_open(bam_ckpt **out, const char *path);
void bam_ckpt_close(bam_ckpt **c);
const char *bam_ckpt_path(const bam_ckpt *c); /* the resolved step folder or file */
/* The stored metadata (config text, loader and RNG states of every writing rank ...). */
const bam_ckpt_info *bam_ckpt_get_info(const bam_ckpt *c);
int bam_ckpt_has_moments(const bam_ckpt *c);
/* Check that the stored layout equals the given one: same tensors, names, shapes, offsets;
 * a mismatch names the tensor and the differing dimension ("a checkpoint of another model
 * shape?"). */
bam_status bam_ckpt_check_layout(const bam_ckpt *c, const bam_tensor_info *tensors,
                                 int n_tensors, size_t n_params);
/* Read [r.lo, r.hi) of "params", "adam_m" or "adam_v" into dst, from whichever shards hold
 * it, verifying each shard dataset's CRC-32C the first time it is read: that first read takes
 * the whole shard dataset (straight into dst when r covers it, else through a temporary buffer
 * freed at once); later reads of it take only their range. Non-finite values are refused,
 * naming the tensor. */
bam_status bam_ckpt_read(bam_ckpt *c, const char *buffer, bam_range r, float *dst);
/* The stored layout (owned by the handle; names valid until close) and its length in floats:
 * read a tensor of another layout (upcycling) with bam_ckpt_read(c, "params",
 * (bam_range){t.offset, t.offset + t.numel}, dst). */
const bam_tensor_info *bam_ckpt_tensors(const bam_ckpt *c, int *n_tensors, size_t *n_params);

/* Find the newest complete checkpoint under ckpt_dir (via `latest`); *found = 0 if none (also
 * when ckpt_dir does not exist). out gets "<ckpt_dir>/step-000200". A `latest` naming a
 * folder without index.h5 is an error. */
bam_status bam_ckpt_latest(const char *ckpt_dir, char *out, size_t cap, int *found);

/* Print kind, step, tokens, tokenizer, writing ranks, every tensor (name, shape, shards
 * holding it), and the stored config. */
bam_status bam_ckpt_inspect(const char *path, FILE *out);
/* Write one consolidated single-file checkpoint (parameters only, or with moments). */
bam_status bam_ckpt_export(const char *path, const char *out_file, int with_moments);

/* CRC-32C (Castagnoli: reflected polynomial 0x82F63B78, initial value and final XOR
 * 0xFFFFFFFF), as recorded in the index for every shard dataset. Chainable:
 * bam_crc32c(bam_crc32c(0, a, na), b, nb) is the CRC of a followed by b.
 * bam_crc32c(0, "123456789", 9) == 0xE3069283. */
uint32_t bam_crc32c(uint32_t crc, const void *data, size_t n);

#endif
