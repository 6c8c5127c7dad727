/* ckpt/shard: writing sharded checkpoints (bam/shard.h; the format is in
 * docs/checkpoint-format.md).
 *
 * A save runs in phases. Every phase ends with an agreement (agree(): an MPI_Allreduce of
 * "did anyone fail?"), so when one rank fails every rank returns an error from the same
 * phase and no rank is left waiting in a collective:
 *
 *   A  every rank checks its arguments and allocates what it needs
 *   B  the ranks compare step, layout and buffers, and check that their ranges tile
 *      [0, n_params) (an Allgather; every rank reaches the same verdict, no agreement needed)
 *   C  rank 0 creates <dir>/.tmp-step-N/, removing stale .tmp-* folders of killed saves
 *   D  every rank writes, closes and fsyncs its shard, recording the CRC-32C of each dataset
 *      and the file's size
 *   E  the records are gathered on rank 0, which writes and fsyncs index.h5 and the folder,
 *      renames it to step-N (swapping it with an existing step-N), fsyncs <dir>, replaces
 *      `latest` (write, fsync, rename, fsync), prunes old checkpoints and sweeps .tmp-* again.
 *
 * A kill anywhere before the rename of phase E leaves only a .tmp-* folder, which readers
 * never look at; a kill after it leaves a complete step-N folder (and `latest` naming either
 * it or the previous one). Rank 0 alone touches the folder structure. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bam/shard.h"
#include "internal.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
/* The CRC-32C in the index covers the little-endian bytes stored in the files; on a
 * big-endian host the in-memory floats would first need a byte swap. */
#error "bam checkpoints assume a little-endian host"
#endif

bam_range bam_partition(size_t n, int rank, int world) {
  if (world < 1 || rank < 0 || rank >= world) return (bam_range){0, 0};
  /* Whole blocks of 16 floats, the first (blocks % world) ranks getting one more. */
  size_t blocks = (n + 15) / 16, base = blocks / (size_t)world, rem = blocks % (size_t)world;
  size_t r = (size_t)rank;
  size_t b0 = r * base + (r < rem ? r : rem), b1 = b0 + base + (r < rem ? 1 : 0);
  size_t lo = b0 * 16, hi = b1 * 16;
  return (bam_range){lo < n ? lo : n, hi < n ? hi : n};
}

void bam_ckpt_info_free(bam_ckpt_info *info) {
  if (!info) return;
  free(info->config_text);
  free(info->lineage_text);
  free(info->loader_state);
  free(info->rng_state);
  info->config_text = info->lineage_text = NULL;
  info->loader_state = NULL;
  info->rng_state = NULL;
}

/* ---- collective error agreement --------------------------------------------------------- */

/* Every rank passes its own status; all return BAM_OK only if every rank succeeded. The
 * lowest failing rank keeps its own message; the others report that rank's failure with its
 * message (broadcast from it), so rank 0's log says what went wrong wherever it happened. */
static bam_status agree(bam_status local, MPI_Comm comm, const char *dir) {
  int rank, world;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  int in[2] = {local != BAM_OK ? rank : world, (int)local}, out[2];
  if (MPI_Allreduce(in, out, 1, MPI_2INT, MPI_MINLOC, comm) != MPI_SUCCESS)
    BAM_FAIL(BAM_ERR_MPI, "%s: MPI_Allreduce failed while writing the checkpoint", dir);
  if (out[0] == world) return BAM_OK;
  char msg[640] = {0};
  if (rank == out[0]) bam_strlcpy(msg, bam_error_message(), sizeof msg);
  MPI_Bcast(msg, (int)sizeof msg, MPI_CHAR, out[0], comm);
  if (rank == out[0]) return local;
  msg[sizeof msg - 1] = 0;
  return bam_error_set((bam_status)out[1], __FILE__, __LINE__,
                       "rank %d failed while writing the checkpoint in %s: %s", out[0], dir, msg);
}

/* ---- phase A: arguments ------------------------------------------------------------------ */

/* What each rank sends rank 0 in phase E (uint64 words). */
enum { REC_CRC = 0, REC_BYTES = 3, REC_LOADER = 4, REC_RNG = 5, REC_LEN = 9 };

typedef struct {
  char dir[PATH_MAX];      /* ckpt_dir without trailing slashes */
  int rank, world;
  MPI_Comm comm;
  int64_t step;
  int nbuf;                /* 1 (parameters only) or 3 */
  char step_name[32];      /* "step-000200" */
  char tmp_dir[PATH_MAX];  /* <dir>/.tmp-step-000200 */
  char step_dir[PATH_MAX]; /* <dir>/step-000200 */
  char shard_path[PATH_MAX];
  bam_rec_tensor *tensors; /* the layout as index records */
  uint64_t *ranges;        /* world x 2: every rank's [lo, hi) */
  uint64_t *recs;          /* rank 0: world x REC_LEN */
  uint64_t rec[REC_LEN];   /* this rank's */
} save_ctx;

static int fits(char *dst, size_t cap, const char *fmt, const char *a, const char *b) {
  return (size_t)snprintf(dst, cap, fmt, a, b) < cap;
}

static bam_status check_args(save_ctx *x, const char *ckpt_dir, const bam_ckpt_info *info,
                             const bam_tensor_info *tensors, int n_tensors, size_t n_params,
                             bam_range own, const float *params_own, const float *m_own,
                             const float *v_own, int keep, char *out_path, size_t out_cap) {
  if (!ckpt_dir || !ckpt_dir[0]) BAM_FAIL(BAM_ERR_ARG, "checkpoint: no checkpoint folder given");
  if (bam_strlcpy(x->dir, ckpt_dir, sizeof x->dir) >= sizeof x->dir)
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", ckpt_dir);
  for (size_t n = strlen(x->dir); n > 1 && x->dir[n - 1] == '/'; n--) x->dir[n - 1] = 0;
  const char *d = x->dir;
  if (!info) BAM_FAIL(BAM_ERR_ARG, "%s: checkpoint info is NULL", d);
  if (info->step < 0) BAM_FAIL(BAM_ERR_ARG, "%s: step %lld is negative", d, (long long)info->step);
  if (keep < 1) BAM_FAIL(BAM_ERR_ARG, "%s: keep = %d, at least 1 checkpoint must be kept", d, keep);
  if (x->world > BAM_CKPT_MAX_RANKS)
    BAM_FAIL(BAM_ERR_ARG, "%s: %d ranks, checkpoints support at most %d", d, x->world,
             BAM_CKPT_MAX_RANKS);
  if (!memchr(info->kind, 0, sizeof info->kind) || !memchr(info->tokenizer, 0, sizeof info->tokenizer))
    BAM_FAIL(BAM_ERR_ARG, "%s: info.kind or info.tokenizer is not NUL-terminated", d);
  if (own.lo > own.hi || own.hi > n_params)
    BAM_FAIL(BAM_ERR_ARG, "%s: rank %d owns [%zu, %zu), outside [0, %zu)", d, x->rank, own.lo,
             own.hi, n_params);
  if (own.hi > own.lo && !params_own)
    BAM_FAIL(BAM_ERR_ARG, "%s: rank %d owns [%zu, %zu) but passed no parameters", d, x->rank,
             own.lo, own.hi);
  if (!m_own != !v_own)
    BAM_FAIL(BAM_ERR_ARG, "%s: rank %d passed one AdamW moment without the other", d, x->rank);
  x->nbuf = m_own ? 3 : 1;
  x->step = info->step;
  snprintf(x->step_name, sizeof x->step_name, "step-%06lld", (long long)info->step);
  char shard[64];
  bam_shard_file_name(shard, sizeof shard, x->rank, x->world);
  if (!fits(x->tmp_dir, sizeof x->tmp_dir, "%s/.tmp-%s", d, x->step_name) ||
      !fits(x->step_dir, sizeof x->step_dir, "%s/%s", d, x->step_name) ||
      !fits(x->shard_path, sizeof x->shard_path, "%s/%s", x->tmp_dir, shard))
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", d);
  if (out_path && strlen(x->step_dir) >= out_cap)
    BAM_FAIL(BAM_ERR_ARG, "%s: out_path holds %zu bytes, the step folder's name needs %zu", d,
             out_cap, strlen(x->step_dir) + 1);
  /* The layout as index records (zero-padded, so every rank hashes the same bytes). */
  if (n_tensors < 1 || !tensors) BAM_FAIL(BAM_ERR_ARG, "%s: no tensors given", d);
  BAM_CHECK(bam_alloc_checked((void **)&x->tensors, (size_t)n_tensors * sizeof *x->tensors,
                              "checkpoint tensor table"));
  for (int i = 0; i < n_tensors; i++) {
    const bam_tensor_info *t = &tensors[i];
    bam_rec_tensor *r = &x->tensors[i];
    if (!t->name || strlen(t->name) >= BAM_CKPT_NAME_LEN)
      BAM_FAIL(BAM_ERR_ARG, "%s: tensor %d's name is missing or longer than %d characters", d, i,
               BAM_CKPT_NAME_LEN - 1);
    if (t->ndim < 1 || t->ndim > BAM_MAX_DIMS)
      BAM_FAIL(BAM_ERR_ARG, "%s: tensor %s has %d dimensions", d, t->name, t->ndim);
    memcpy(r->name, t->name, strlen(t->name));
    r->ndim = t->ndim;
    r->decay = t->decay;
    for (int k = 0; k < t->ndim; k++) r->shape[k] = t->shape[k];
    r->offset = (int64_t)t->offset;
    r->numel = (int64_t)t->numel;
  }
  char where[PATH_MAX + 32];
  snprintf(where, sizeof where, "%s: the model layout", d);
  BAM_CHECK(bam_check_tensor_table(x->tensors, n_tensors, n_params, where));
  BAM_CHECK(bam_alloc_checked((void **)&x->ranges, (size_t)x->world * 2 * sizeof *x->ranges,
                              "checkpoint ranges"));
  if (x->rank == 0)
    BAM_CHECK(bam_alloc_checked((void **)&x->recs, (size_t)x->world * REC_LEN * sizeof *x->recs,
                                "checkpoint records"));
  return BAM_OK;
}

/* ---- phase B: do the ranks agree, and do their ranges tile [0, n_params)? ----------------- */

static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
  const unsigned char *p = data;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

/* Orders rank indices by their range (lo, then hi). */
static int cmp_range(const void *a, const void *b, void *ranges) {
  const uint64_t *r = ranges, *x = &r[2 * *(const int *)a], *y = &r[2 * *(const int *)b];
  if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
  return x[1] < y[1] ? -1 : x[1] > y[1];
}

static bam_status check_consistent(save_ctx *x, const bam_ckpt_info *info, int n_tensors,
                                   size_t n_params, bam_range own, int keep) {
  const char *d = x->dir;
  uint64_t mine[2] = {own.lo, own.hi};
  if (MPI_Allgather(mine, 2, MPI_UINT64_T, x->ranges, 2, MPI_UINT64_T, x->comm) != MPI_SUCCESS)
    BAM_FAIL(BAM_ERR_MPI, "%s: MPI_Allgather failed while writing the checkpoint", d);
  enum { N = 7 };
  static const char *what[N] = {"step", "tokens seen", "parameter count", "tensor count",
                                "buffers saved (with or without AdamW moments)", "tensor layout",
                                "number of checkpoints to keep"};
  uint64_t v[N] = {(uint64_t)info->step, (uint64_t)info->tokens_seen, n_params,
                   (uint64_t)n_tensors, (uint64_t)x->nbuf,
                   fnv1a(0xcbf29ce484222325ULL, x->tensors, (size_t)n_tensors * sizeof *x->tensors),
                   (uint64_t)keep};
  uint64_t lo[N], hi[N];
  if (MPI_Allreduce(v, lo, N, MPI_UINT64_T, MPI_MIN, x->comm) != MPI_SUCCESS ||
      MPI_Allreduce(v, hi, N, MPI_UINT64_T, MPI_MAX, x->comm) != MPI_SUCCESS)
    BAM_FAIL(BAM_ERR_MPI, "%s: MPI_Allreduce failed while writing the checkpoint", d);
  for (int i = 0; i < N; i++)
    if (lo[i] != hi[i])
      BAM_FAIL(BAM_ERR_ARG, "%s: the ranks passed different %s (every rank must save the same "
               "checkpoint)", d, what[i]);
  /* Sorted by start, each range must begin where the previous one ended (empty ranges may
   * sit on any boundary) and the last must end at n_params. */
  int *order = malloc((size_t)x->world * sizeof *order);
  if (!order) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", d);
  for (int r = 0; r < x->world; r++) order[r] = r;
  qsort_r(order, (size_t)x->world, sizeof *order, cmp_range, x->ranges);
  uint64_t at = 0;
  int bad = -1;
  for (int k = 0; k < x->world && bad < 0; k++) {
    if (x->ranges[2 * order[k]] != at) bad = order[k];
    at = x->ranges[2 * order[k] + 1];
  }
  free(order);
  if (bad >= 0)
    BAM_FAIL(BAM_ERR_ARG, "%s: the ranks' ranges do not tile [0, %zu): rank %d owns [%llu, %llu), "
             "which does not start where another range ends", d, n_params, bad,
             (unsigned long long)x->ranges[2 * bad], (unsigned long long)x->ranges[2 * bad + 1]);
  if (at != n_params)
    BAM_FAIL(BAM_ERR_ARG, "%s: the ranks' ranges end at %llu, not at n_params = %zu", d,
             (unsigned long long)at, n_params);
  return BAM_OK;
}

/* ---- phase C: the temporary folder -------------------------------------------------------- */

/* Removes .tmp-* entries: temporary folders of saves that were killed, folders set aside by an
 * interrupted replacement or prune. One job writes a checkpoint folder at a time. */
static void remove_stale(const char *dir) {
  DIR *dp = opendir(dir);
  if (!dp) return;
  struct dirent *e;
  char path[PATH_MAX];
  while ((e = readdir(dp)) != NULL) {
    if (strncmp(e->d_name, ".tmp-", 5) != 0) continue;
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= sizeof path) continue;
    if (bam_rm_rf(path) != 0)
      bam_warn("warning: %s: cannot remove a stale temporary checkpoint: %s\n", path, strerror(errno));
  }
  closedir(dp);
}

static bam_status prepare(save_ctx *x) {
  BAM_CHECK(bam_mkdir_p(x->dir));
  remove_stale(x->dir);
  if (mkdir(x->tmp_dir, 0755) != 0)
    BAM_FAIL(BAM_ERR_IO, "%s: cannot create folder: %s", x->tmp_dir, strerror(errno));
  return BAM_OK;
}

/* ---- phase D: this rank's shard ----------------------------------------------------------- */

/* A float32 or integer dataset with the Fletcher32 filter (chunked, chunk_rows rows per chunk)
 * and no timestamps. An empty one is contiguous: there is nothing to checksum, and a chunked
 * dataset needs a non-zero chunk. */
static bam_status write_dataset(hid_t f, const char *name, int rank, const hsize_t *dims,
                                hsize_t chunk_rows, hid_t file_type, hid_t mem_type,
                                const void *data, const char *path) {
  hid_t sp = H5Screate_simple(rank, dims, NULL);
  hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_obj_track_times(dcpl, 0);
  if (dims[0] > 0) {
    hsize_t chunk[2] = {chunk_rows < dims[0] ? chunk_rows : dims[0], rank > 1 ? dims[1] : 1};
    H5Pset_chunk(dcpl, rank, chunk);
    H5Pset_fletcher32(dcpl);
  }
  /* No chunk cache: each chunk is written once, so staging it in HDF5's 1 MiB cache only costs
   * a copy (bypassing it halves the write time of a 100 MB shard). */
  hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
  H5Pset_chunk_cache(dapl, 0, 0, 1.0);
  hid_t d = H5Dcreate2(f, name, file_type, sp, H5P_DEFAULT, dcpl, dapl);
  H5Pclose(dapl);
  herr_t e = d < 0 ? -1 : dims[0] == 0 ? 0 : H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
  const char *why = e < 0 ? bam_h5_reason() : "";
  char reason[256];
  bam_strlcpy(reason, why, sizeof reason);
  if (d >= 0) H5Dclose(d);
  H5Pclose(dcpl);
  H5Sclose(sp);
  if (e < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot write dataset '%s' (%s)", path, name, reason);
  return BAM_OK;
}

/* Creation properties shared by shards and the index: no timestamps (identical state, identical
 * bytes), and object headers with checksums (the 1.8 file format), so damaged metadata is an
 * error too, not only damaged data. */
static hid_t create_file(const char *path) {
  hid_t fcpl = H5Pcreate(H5P_FILE_CREATE);
  H5Pset_obj_track_times(fcpl, 0);
  hid_t fapl = bam_h5_fapl();
  H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
  hid_t f = H5Fcreate(path, H5F_ACC_EXCL, fcpl, fapl);
  H5Pclose(fcpl);
  H5Pclose(fapl);
  return f;
}

static bam_status close_and_sync(hid_t f, const char *path, int64_t *bytes) {
  if (H5Fclose(f) < 0)
    BAM_FAIL(BAM_ERR_HDF5, "%s: cannot close (%s)", path, bam_h5_reason());
  struct stat sb;
  if (stat(path, &sb) != 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
  if (bytes) *bytes = (int64_t)sb.st_size;
  return bam_fsync_path(path);
}

static bam_status write_shard(save_ctx *x, bam_range own, const float *const bufs[BAM_CKPT_NBUF],
                              const bam_ckpt_info *info) {
  const char *p = x->shard_path;
  size_t n = own.hi - own.lo;
  /* CRC-32C of each buffer's bytes as they will be stored (little-endian float32). */
  for (int b = 0; b < x->nbuf; b++)
    x->rec[REC_CRC + b] = n ? bam_crc32c(0, bufs[b], n * sizeof(float)) : 0;
  x->rec[REC_LOADER] = info->loader_state ? (uint64_t)info->loader_state[0] : 0;
  for (int k = 0; k < 4; k++) x->rec[REC_RNG + k] = info->rng_state ? info->rng_state[k] : 0;

  hid_t f = create_file(p);
  if (f < 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot create (%s)", p, bam_h5_reason());
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "format", BAM_SHARD_FORMAT, p), fail);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "version", BAM_SHARDED_VERSION, p), fail);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "step", x->step, p), fail);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "lo", (int64_t)own.lo, p), fail);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "hi", (int64_t)own.hi, p), fail);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "rank", x->rank, p), fail);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "world", x->world, p), fail);
  hsize_t dims[1] = {n};
  for (int b = 0; b < x->nbuf; b++)
    BAM_CHECK_GOTO(st, write_dataset(f, bam_ckpt_buffer_names[b], 1, dims, bam_shard_chunk(n),
                                     H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, bufs[b], p), fail);
  int64_t bytes = 0;
  BAM_CHECK(close_and_sync(f, p, &bytes));
  x->rec[REC_BYTES] = (uint64_t)bytes;
  return BAM_OK;
fail:
  H5Fclose(f);
  return st;
}

/* ---- phase E: index, publication, pruning ------------------------------------------------- */

static bam_status write_index(save_ctx *x, const bam_ckpt_info *info, int n_tensors,
                              size_t n_params) {
  char path[PATH_MAX];
  if ((size_t)snprintf(path, sizeof path, "%s/index.h5", x->tmp_dir) >= sizeof path)
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", x->tmp_dir);
  const int W = x->world;
  bam_rec_shard *shards = calloc((size_t)W, sizeof *shards);
  int64_t *loader = calloc((size_t)W, sizeof *loader);
  uint64_t *rng = calloc((size_t)W * 4, sizeof *rng);
  bam_rec_piece *pieces = NULL;
  int n_pieces = 0;
  hid_t f = -1;
  bam_status st = BAM_OK;
  if (!shards || !loader || !rng) {
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", path);
    goto done;
  }
  for (int r = 0; r < W; r++) {
    const uint64_t *rec = &x->recs[(size_t)r * REC_LEN];
    bam_shard_file_name(shards[r].file, sizeof shards[r].file, r, W);
    shards[r].lo = (int64_t)x->ranges[2 * r];
    shards[r].hi = (int64_t)x->ranges[2 * r + 1];
    for (int b = 0; b < BAM_CKPT_NBUF; b++) shards[r].crc32c[b] = (uint32_t)rec[REC_CRC + b];
    shards[r].file_bytes = (int64_t)rec[REC_BYTES];
    loader[r] = (int64_t)rec[REC_LOADER];
    for (int k = 0; k < 4; k++) rng[4 * r + k] = rec[REC_RNG + k];
  }
  n_pieces = bam_make_pieces(x->tensors, n_tensors, shards, W, &pieces);
  if (n_pieces < 0) {
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", path);
    goto done;
  }
  f = create_file(path);
  if (f < 0) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "%s: cannot create (%s)", path, bam_h5_reason());
    goto done;
  }
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "format", BAM_INDEX_FORMAT, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "version", BAM_SHARDED_VERSION, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "kind", info->kind, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "step", info->step, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "tokens_seen", info->tokens_seen, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "tokenizer", info->tokenizer, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "config", info->config_text ? info->config_text : "", path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "lineage", info->lineage_text ? info->lineage_text : "", path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "world", W, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "n_params", (int64_t)n_params, path), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "has_moments", x->nbuf == 3, path), done);
  struct {
    const char *name;
    hid_t (*type)(int);
    hsize_t rows;
    const void *data;
  } tables[] = {{"tensors", bam_rec_tensor_type, (hsize_t)n_tensors, x->tensors},
                {"shards", bam_rec_shard_type, (hsize_t)W, shards},
                {"pieces", bam_rec_piece_type, (hsize_t)n_pieces, pieces}};
  for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++) {
    hid_t ft = tables[i].type(1), mt = tables[i].type(0);
    st = write_dataset(f, tables[i].name, 1, &tables[i].rows, 1024, ft, mt, tables[i].data, path);
    H5Tclose(ft);
    H5Tclose(mt);
    if (st != BAM_OK) goto done;
  }
  hsize_t d1[1] = {(hsize_t)W}, d2[2] = {(hsize_t)W, 4};
  BAM_CHECK_GOTO(st, write_dataset(f, "loader_state", 1, d1, 1024, H5T_STD_I64LE, H5T_NATIVE_INT64,
                                   loader, path), done);
  BAM_CHECK_GOTO(st, write_dataset(f, "rng_state", 2, d2, 1024, H5T_STD_U64LE, H5T_NATIVE_UINT64,
                                   rng, path), done);
  hid_t closing = f;
  f = -1;
  st = close_and_sync(closing, path, NULL);
done:
  if (f >= 0) H5Fclose(f);
  free(shards);
  free(loader);
  free(rng);
  free(pieces);
  return st;
}

/* Moves the finished temporary folder to step-N. An existing step-N (the same step saved
 * again) is swapped out atomically with renameat2(RENAME_EXCHANGE) and then removed; where
 * the file system cannot exchange, it is renamed aside first, leaving a short window in which
 * step-N does not exist (a kill there leaves `latest` naming a missing folder: resume from an
 * explicit older step). */
static bam_status move_into_place(save_ctx *x) {
  struct stat sb;
  if (lstat(x->step_dir, &sb) != 0) {
    if (rename(x->tmp_dir, x->step_dir) != 0)
      BAM_FAIL(BAM_ERR_IO, "cannot rename %s to %s: %s", x->tmp_dir, x->step_dir, strerror(errno));
    return BAM_OK;
  }
  if (renameat2(AT_FDCWD, x->tmp_dir, AT_FDCWD, x->step_dir, RENAME_EXCHANGE) == 0) {
    BAM_CHECK(bam_fsync_path(x->dir));
    if (bam_rm_rf(x->tmp_dir) != 0) /* now the old checkpoint */
      bam_warn("warning: %s: cannot remove the replaced checkpoint: %s\n", x->tmp_dir, strerror(errno));
    return BAM_OK;
  }
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
    BAM_FAIL(BAM_ERR_IO, "cannot exchange %s and %s: %s", x->tmp_dir, x->step_dir, strerror(errno));
  char old[PATH_MAX];
  if ((size_t)snprintf(old, sizeof old, "%s/.tmp-old-%s", x->dir, x->step_name) >= sizeof old)
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", x->dir);
  bam_rm_rf(old);
  if (rename(x->step_dir, old) != 0)
    BAM_FAIL(BAM_ERR_IO, "cannot rename %s to %s: %s", x->step_dir, old, strerror(errno));
  if (rename(x->tmp_dir, x->step_dir) != 0)
    BAM_FAIL(BAM_ERR_IO, "cannot rename %s to %s: %s", x->tmp_dir, x->step_dir, strerror(errno));
  BAM_CHECK(bam_fsync_path(x->dir));
  if (bam_rm_rf(old) != 0)
    bam_warn("warning: %s: cannot remove the replaced checkpoint: %s\n", old, strerror(errno));
  return BAM_OK;
}

typedef struct {
  long long step;
  char name[256];
} step_folder;

static int cmp_desc(const void *a, const void *b) {
  long long x = ((const step_folder *)a)->step, y = ((const step_folder *)b)->step;
  return x > y ? -1 : x < y;
}

/* Keeps the checkpoint just written and the keep-1 newest ones before it. Folders of LATER
 * steps (left by a run that was resumed from an earlier checkpoint) are not touched: they are
 * replaced as this run reaches their steps. Failures are warnings: the new checkpoint is safe. */
static void prune(const save_ctx *x, int keep) {
  DIR *dp = opendir(x->dir);
  if (!dp) return;
  step_folder *found = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(dp)) != NULL) {
    long long s;
    if (!bam_parse_step_name(e->d_name, &s) || s >= x->step || strlen(e->d_name) >= 256) continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 16;
      step_folder *grown = realloc(found, cap * sizeof *found);
      if (!grown) break;
      found = grown;
    }
    found[n].step = s;
    memcpy(found[n].name, e->d_name, strlen(e->d_name) + 1);
    n++;
  }
  closedir(dp);
  if (n > 0) qsort(found, n, sizeof *found, cmp_desc);
  for (size_t i = (size_t)(keep - 1); i < n; i++) {
    char path[PATH_MAX], aside[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", x->dir, found[i].name) >= sizeof path ||
        (size_t)snprintf(aside, sizeof aside, "%s/.tmp-prune-%s", x->dir, found[i].name) >= sizeof aside)
      continue;
    /* Renamed first, so an interrupted removal never leaves a half checkpoint named step-*. */
    if (rename(path, aside) != 0 || bam_rm_rf(aside) != 0)
      bam_warn("warning: %s: cannot remove an old checkpoint: %s\n", path, strerror(errno));
  }
  free(found);
}

static bam_status publish(save_ctx *x, const bam_ckpt_info *info, int n_tensors, size_t n_params,
                          int keep) {
  BAM_CHECK(write_index(x, info, n_tensors, n_params));
  BAM_CHECK(bam_fsync_path(x->tmp_dir)); /* the shard and index entries of the folder */
  BAM_CHECK(move_into_place(x));
  BAM_CHECK(bam_fsync_path(x->dir));
  char text[48];
  snprintf(text, sizeof text, "%s\n", x->step_name);
  BAM_CHECK(bam_write_file_atomic(x->dir, "latest", text));
  prune(x, keep);
  remove_stale(x->dir); /* anything a failed removal above left behind */
  return BAM_OK;
}

/* Test-only fault injection: BAM_CKPT_TEST_PAUSE_S=<seconds> makes every rank sleep after the
 * shards are written and before the index is written and the folder published, so a test can
 * kill the job mid-checkpoint. Never set it in production. */
static void test_pause(void) {
  const char *s = getenv("BAM_CKPT_TEST_PAUSE_S");
  if (!s || !*s) return;
  double sec = strtod(s, NULL);
  if (!(sec > 0)) return;
  struct timespec ts = {(time_t)sec, (long)((sec - floor(sec)) * 1e9)};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

bam_status bam_ckpt_save_sharded(const char *ckpt_dir, const bam_ckpt_info *info,
                                 const bam_tensor_info *tensors, int n_tensors, size_t n_params,
                                 bam_range own, const float *params_own, const float *m_own,
                                 const float *v_own, int keep, MPI_Comm comm, char *out_path,
                                 size_t out_cap) {
  bam_h5_quiet();
  /* On the stack (about 20 KB): no rank may return before the first agreement. */
  save_ctx ctx;
  memset(&ctx, 0, sizeof ctx);
  save_ctx *x = &ctx;
  x->comm = comm;
  MPI_Comm_rank(comm, &x->rank);
  MPI_Comm_size(comm, &x->world);
  const char *d = ckpt_dir ? ckpt_dir : "checkpoint";
  bam_status st;
  int created = 0; /* rank 0: the temporary folder exists and is ours to remove on failure */

  /* A */
  st = check_args(x, ckpt_dir, info, tensors, n_tensors, n_params, own, params_own, m_own,
                  v_own, keep, out_path, out_cap);
  BAM_CHECK_GOTO(st, agree(st, comm, d), done);
  d = x->dir;
  /* B */
  BAM_CHECK_GOTO(st, check_consistent(x, info, n_tensors, n_params, own, keep), done);
  /* C */
  if (x->rank == 0) {
    st = prepare(x);
    created = st == BAM_OK;
  }
  BAM_CHECK_GOTO(st, agree(st, comm, d), done);
  /* D */
  const float *bufs[BAM_CKPT_NBUF] = {params_own, m_own, v_own};
  st = write_shard(x, own, bufs, info);
  BAM_CHECK_GOTO(st, agree(st, comm, d), done);
  /* E */
  if (MPI_Gather(x->rec, REC_LEN, MPI_UINT64_T, x->recs, REC_LEN, MPI_UINT64_T, 0, comm) != MPI_SUCCESS)
    st = bam_error_set(BAM_ERR_MPI, __FILE__, __LINE__, "%s: MPI_Gather failed while writing the checkpoint", d);
  test_pause();
  if (x->rank == 0 && st == BAM_OK) {
    st = publish(x, info, n_tensors, n_params, keep);
    if (access(x->tmp_dir, F_OK) != 0) created = 0; /* renamed into place */
  }
  BAM_CHECK_GOTO(st, agree(st, comm, d), done);
  if (out_path) bam_strlcpy(out_path, x->step_dir, out_cap);
done:
  if (st != BAM_OK && created && bam_rm_rf(x->tmp_dir) != 0)
    bam_warn("warning: %s: cannot remove: %s\n", x->tmp_dir, strerror(errno));
  bam_free(x->tensors);
  bam_free(x->ranges);
  bam_free(x->recs);
  return st;
}
