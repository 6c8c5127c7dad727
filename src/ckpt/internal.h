/* ckpt/internal.h: helpers shared by the single-file checkpoint (ckpt.c) and the sharded one
 * (shard.c writes, shard_read.c reads). Private to src/ckpt; not part of the API.
 *
 * Everything here runs on the calling thread only: HDF5 is built without thread safety. */
#ifndef BAM_CKPT_INTERNAL_H
#define BAM_CKPT_INTERNAL_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#include "bam/core.h"
#include "bam/model.h"

/* The three flat buffers of a checkpoint, in this order everywhere (index fields, loops). */
#define BAM_CKPT_NBUF 3
extern const char *const bam_ckpt_buffer_names[BAM_CKPT_NBUF]; /* params, adam_m, adam_v */

/* ---- HDF5 ------------------------------------------------------------------------------ */

/* HDF5 prints its own error stack by default; we report our own one-line messages. */
void bam_h5_quiet(void);
/* The innermost description on HDF5's error stack after a failed call, e.g. "data error
 * detected by Fletcher32 checksum"; "unknown HDF5 error" if the stack is empty. Valid until
 * the next call. */
const char *bam_h5_reason(void);

bam_status bam_h5_write_attr_i64(hid_t obj, const char *name, int64_t v, const char *path);
bam_status bam_h5_write_attr_str(hid_t obj, const char *name, const char *s, const char *path);
bam_status bam_h5_read_attr_i64(hid_t obj, const char *name, int64_t *v, const char *path);
/* Fixed- or variable-length string attribute into a malloc'd buffer (*out). */
bam_status bam_h5_read_attr_str(hid_t obj, const char *name, char **out, const char *path);
int bam_h5_has_attr(hid_t obj, const char *name);
/* File-access properties for every checkpoint file: HDF5's file locking off. Checkpoint files
 * are never modified once published (writers use fresh temporary names), and parallel file
 * systems often lack the flock() HDF5 1.10 asks for ("unable to lock file"). Close with
 * H5Pclose. */
hid_t bam_h5_fapl(void);
/* Open a single-file checkpoint read-only and check its format and version attributes. */
bam_status bam_h5_open_single(const char *path, hid_t *out);

/* ---- the single-file format (ckpt.c): writer shared by bam_ckpt_save and bam_ckpt_export */

/* Supplies the data of tensor t of buffer b (index into bam_ckpt_buffer_names): sets *data
 * to t->numel floats that stay valid until the next call. */
typedef bam_status (*bam_tensor_source)(void *ctx, int b, const bam_tensor_info *t,
                                        const float **data);
typedef struct {
  const char *kind;
  int64_t step, tokens_seen, loader_position;
  const char *tokenizer, *config, *lineage; /* lineage NULL: not written */
  int world;                                /* 0: world, loader_state, rng_state not written */
  const int64_t *loader_state;              /* world entries */
  const uint64_t *rng_state;                /* world x 4 entries */
} bam_single_meta;
/* Writes <path>.tmp (attributes, /<buffer>/<tensor> datasets with "offset" and "decay"
 * attributes; buffer b is written when bit b of `buffers` is set), fsyncs it, renames it to
 * path and fsyncs the folder. */
bam_status bam_single_write(const char *path, const bam_single_meta *meta,
                            const bam_tensor_info *tensors, int n_tensors, size_t n_params,
                            unsigned buffers, bam_tensor_source src, void *ctx);

/* ---- files and folders ----------------------------------------------------------------- */

/* Durability: fsync a file or a folder (its entries). */
bam_status bam_fsync_path(const char *path);
/* fsync the folder holding path. */
bam_status bam_fsync_parent(const char *path);
/* mkdir -p with mode 0755. */
bam_status bam_mkdir_p(const char *path);
/* rm -rf: never follows symbolic links; a missing path is fine. 0 or -1 with errno. */
int bam_rm_rf(const char *path);
/* Write text to <dir>/<name>.tmp, fsync, rename to <dir>/<name>, fsync dir. */
bam_status bam_write_file_atomic(const char *dir, const char *name, const char *text);

/* ---- the sharded format's index tables (shard.c writes them, shard_read.c reads them) ---- */

#define BAM_CKPT_NAME_LEN 64 /* fixed-length strings in the index, NUL included */
#define BAM_INDEX_FORMAT "bam-checkpoint-index"
#define BAM_SHARD_FORMAT "bam-checkpoint-shard"
#define BAM_SHARDED_VERSION 1

typedef struct {
  char name[BAM_CKPT_NAME_LEN];
  int32_t ndim;
  int32_t decay;
  int64_t shape[BAM_MAX_DIMS]; /* zeros beyond ndim */
  int64_t offset, numel;       /* floats, in the flat layout */
} bam_rec_tensor;

typedef struct {
  char file[BAM_CKPT_NAME_LEN]; /* "shard-00001-of-00004.h5", relative to the index */
  int64_t lo, hi;               /* the flat range [lo, hi) it holds */
  uint32_t crc32c[BAM_CKPT_NBUF]; /* of each dataset's bytes; 0 for an absent buffer */
  int64_t file_bytes;           /* size of the shard file */
} bam_rec_shard;

typedef struct {
  int32_t tensor, shard;        /* rows of the tensors and shards tables */
  int64_t tensor_offset;        /* first element, within the flattened tensor */
  int64_t length;               /* elements */
  int64_t shard_offset;         /* first element, within the shard's datasets */
} bam_rec_piece;

/* HDF5 compound types of the three tables: file = 1 gives the packed little-endian on-disk
 * type, file = 0 the in-memory type of the structs above. Close with H5Tclose. */
hid_t bam_rec_tensor_type(int file);
hid_t bam_rec_shard_type(int file);
hid_t bam_rec_piece_type(int file);

/* The canonical shard file name of rank r of P. */
void bam_shard_file_name(char *out, size_t cap, int rank, int world);

/* The pieces table: for each tensor (table order), each non-empty shard overlapping it, in
 * increasing flat position. *out is malloc'd (NULL when there are none). Returns the count,
 * or -1 when out of memory. */
int bam_make_pieces(const bam_rec_tensor *t, int n_tensors, const bam_rec_shard *s, int n_shards,
                    bam_rec_piece **out);

/* Check that the tensors cover [0, n_params) exactly, without gaps or overlaps, with sane
 * shapes (ndim 1..4, numel = product of the shape). On failure records "<where>: ..." */
bam_status bam_check_tensor_table(const bam_rec_tensor *t, int n, size_t n_params,
                                  const char *where);

/* "step-" followed by decimal digits only (a step folder's name): 1 and *step, or 0. */
int bam_parse_step_name(const char *name, long long *step);

/* Chunk length (floats) for a 1-D shard dataset of n floats: at least ~16 chunks for small
 * datasets (so a damaged chunk names few tensors), between 4096 floats (16 KiB) and 262144
 * floats (1 MiB). */
size_t bam_shard_chunk(size_t n);

#endif
