/* ckpt/shard_format: the index tables of a sharded checkpoint (their HDF5 compound types and
 * the pieces table), shared by the writer (shard.c) and the reader (shard_read.c).
 * docs/checkpoint-format.md describes the same tables for other readers. */
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* One member of a compound type: name, in-memory type and offset, on-disk type. */
typedef struct {
  const char *name;
  hid_t mem;
  size_t mem_offset;
  hid_t file;
} member;

/* The on-disk type is packed in member order (readers such as h5py see exactly these fields);
 * the in-memory one follows the C struct. */
static hid_t build(const member *m, int n, size_t mem_size, int file) {
  size_t size = 0;
  for (int i = 0; i < n; i++) size += H5Tget_size(m[i].file);
  hid_t t = H5Tcreate(H5T_COMPOUND, file ? size : mem_size);
  size_t off = 0;
  for (int i = 0; i < n; i++) {
    if (file) {
      H5Tinsert(t, m[i].name, off, m[i].file);
      off += H5Tget_size(m[i].file);
    } else {
      H5Tinsert(t, m[i].name, m[i].mem_offset, m[i].mem);
    }
  }
  return t;
}

static hid_t fixed_string(void) {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, BAM_CKPT_NAME_LEN);
  H5Tset_strpad(t, H5T_STR_NULLTERM);
  return t;
}

hid_t bam_rec_tensor_type(int file) {
  hsize_t four = BAM_MAX_DIMS;
  hid_t str = fixed_string();
  hid_t shape_mem = H5Tarray_create2(H5T_NATIVE_INT64, 1, &four);
  hid_t shape_file = H5Tarray_create2(H5T_STD_I64LE, 1, &four);
  const member m[] = {
      {"name", str, offsetof(bam_rec_tensor, name), str},
      {"ndim", H5T_NATIVE_INT32, offsetof(bam_rec_tensor, ndim), H5T_STD_I32LE},
      {"shape", shape_mem, offsetof(bam_rec_tensor, shape), shape_file},
      {"offset", H5T_NATIVE_INT64, offsetof(bam_rec_tensor, offset), H5T_STD_I64LE},
      {"numel", H5T_NATIVE_INT64, offsetof(bam_rec_tensor, numel), H5T_STD_I64LE},
      {"decay", H5T_NATIVE_INT32, offsetof(bam_rec_tensor, decay), H5T_STD_I32LE},
  };
  hid_t t = build(m, (int)(sizeof m / sizeof m[0]), sizeof(bam_rec_tensor), file);
  H5Tclose(str);
  H5Tclose(shape_mem);
  H5Tclose(shape_file);
  return t;
}

hid_t bam_rec_shard_type(int file) {
  hid_t str = fixed_string();
  const member m[] = {
      {"file", str, offsetof(bam_rec_shard, file), str},
      {"lo", H5T_NATIVE_INT64, offsetof(bam_rec_shard, lo), H5T_STD_I64LE},
      {"hi", H5T_NATIVE_INT64, offsetof(bam_rec_shard, hi), H5T_STD_I64LE},
      {"crc32c_params", H5T_NATIVE_UINT32, offsetof(bam_rec_shard, crc32c[0]), H5T_STD_U32LE},
      {"crc32c_adam_m", H5T_NATIVE_UINT32, offsetof(bam_rec_shard, crc32c[1]), H5T_STD_U32LE},
      {"crc32c_adam_v", H5T_NATIVE_UINT32, offsetof(bam_rec_shard, crc32c[2]), H5T_STD_U32LE},
      {"file_bytes", H5T_NATIVE_INT64, offsetof(bam_rec_shard, file_bytes), H5T_STD_I64LE},
  };
  hid_t t = build(m, (int)(sizeof m / sizeof m[0]), sizeof(bam_rec_shard), file);
  H5Tclose(str);
  return t;
}

hid_t bam_rec_piece_type(int file) {
  const member m[] = {
      {"tensor", H5T_NATIVE_INT32, offsetof(bam_rec_piece, tensor), H5T_STD_I32LE},
      {"shard", H5T_NATIVE_INT32, offsetof(bam_rec_piece, shard), H5T_STD_I32LE},
      {"tensor_offset", H5T_NATIVE_INT64, offsetof(bam_rec_piece, tensor_offset), H5T_STD_I64LE},
      {"length", H5T_NATIVE_INT64, offsetof(bam_rec_piece, length), H5T_STD_I64LE},
      {"shard_offset", H5T_NATIVE_INT64, offsetof(bam_rec_piece, shard_offset), H5T_STD_I64LE},
  };
  return build(m, (int)(sizeof m / sizeof m[0]), sizeof(bam_rec_piece), file);
}

void bam_shard_file_name(char *out, size_t cap, int rank, int world) {
  snprintf(out, cap, "shard-%05d-of-%05d.h5", rank, world);
}

int bam_parse_step_name(const char *name, long long *step) {
  if (strncmp(name, "step-", 5) != 0 || !name[5]) return 0;
  long long v = 0;
  for (const char *p = name + 5; *p; p++) {
    if (*p < '0' || *p > '9' || v > (LLONG_MAX - 9) / 10) return 0;
    v = v * 10 + (*p - '0');
  }
  *step = v;
  return 1;
}

size_t bam_shard_chunk(size_t n) {
  size_t c = (n / 16 + 1023) / 1024 * 1024; /* ~16 chunks, a multiple of 4 KiB */
  if (c < 4096) c = 4096;
  if (c > 262144) c = 262144;
  return c < n ? c : n;
}

/* ---- pieces ---------------------------------------------------------------------------- */

static int by_lo(const void *a, const void *b, void *base) {
  const bam_rec_shard *s = base;
  const bam_rec_shard *x = &s[*(const int *)a], *y = &s[*(const int *)b];
  if (x->lo != y->lo) return x->lo < y->lo ? -1 : 1;
  return x->hi < y->hi ? -1 : x->hi > y->hi;
}

int bam_make_pieces(const bam_rec_tensor *t, int n_tensors, const bam_rec_shard *s, int n_shards,
                    bam_rec_piece **out) {
  *out = NULL;
  int *order = malloc((size_t)(n_shards > 0 ? n_shards : 1) * sizeof *order);
  if (!order) return -1;
  for (int i = 0; i < n_shards; i++) order[i] = i;
  qsort_r(order, (size_t)n_shards, sizeof *order, by_lo, (void *)s);
  /* Two passes: count, then fill. Shards are few (one per rank) and tensors tens to
   * hundreds, so the quadratic scan costs nothing next to the I/O. */
  bam_rec_piece *p = NULL;
  int n = 0;
  for (int pass = 0; pass < 2; pass++) {
    n = 0;
    for (int ti = 0; ti < n_tensors; ti++) {
      int64_t a = t[ti].offset, e = t[ti].offset + t[ti].numel;
      for (int k = 0; k < n_shards; k++) {
        const bam_rec_shard *sh = &s[order[k]];
        int64_t lo = sh->lo > a ? sh->lo : a, hi = sh->hi < e ? sh->hi : e;
        if (lo >= hi) continue;
        if (pass == 1)
          p[n] = (bam_rec_piece){.tensor = ti, .shard = order[k], .tensor_offset = lo - a,
                                 .length = hi - lo, .shard_offset = lo - sh->lo};
        n++;
      }
    }
    if (pass == 0 && n > 0 && !(p = malloc((size_t)n * sizeof *p))) {
      free(order);
      return -1;
    }
  }
  free(order);
  *out = p;
  return n;
}

/* ---- tensor table checks ------------------------------------------------------------- */

static int by_offset(const void *a, const void *b, void *base) {
  const bam_rec_tensor *t = base;
  int64_t x = t[*(const int *)a].offset, y = t[*(const int *)b].offset;
  return x < y ? -1 : x > y;
}

bam_status bam_check_tensor_table(const bam_rec_tensor *t, int n, size_t n_params,
                                  const char *where) {
  if (n < 1) BAM_FAIL(BAM_ERR_DATA, "%s: the tensor table is empty", where);
  for (int i = 0; i < n; i++) {
    if (!t[i].name[0] || memchr(t[i].name, 0, BAM_CKPT_NAME_LEN) == NULL)
      BAM_FAIL(BAM_ERR_DATA, "%s: tensor %d has an empty or unterminated name", where, i);
    if (t[i].ndim < 1 || t[i].ndim > BAM_MAX_DIMS)
      BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s has %d dimensions (1 to %d allowed)", where,
               t[i].name, (int)t[i].ndim, BAM_MAX_DIMS);
    int64_t numel = 1;
    for (int k = 0; k < t[i].ndim; k++) {
      if (t[i].shape[k] < 1)
        BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s has dimension %d of size %lld", where, t[i].name, k,
                 (long long)t[i].shape[k]);
      numel *= t[i].shape[k];
    }
    if (numel != t[i].numel)
      BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s records %lld elements, its shape holds %lld", where,
               t[i].name, (long long)t[i].numel, (long long)numel);
    for (int j = 0; j < i; j++)
      if (!strcmp(t[i].name, t[j].name))
        BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s is listed twice", where, t[i].name);
  }
  int *order = malloc((size_t)n * sizeof *order);
  if (!order) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", where);
  for (int i = 0; i < n; i++) order[i] = i;
  qsort_r(order, (size_t)n, sizeof *order, by_offset, (void *)t);
  int64_t at = 0;
  bam_status st = BAM_OK;
  for (int k = 0; k < n && st == BAM_OK; k++) {
    const bam_rec_tensor *x = &t[order[k]];
    if (x->offset != at)
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s: tensor %s starts at element %lld, expected %lld (tensors must tile "
                         "the flat buffer without gaps or overlaps)",
                         where, x->name, (long long)x->offset, (long long)at);
    at = x->offset + x->numel;
  }
  if (st == BAM_OK && at != (int64_t)n_params)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: the tensors hold %lld elements, the flat buffer %zu", where,
                       (long long)at, n_params);
  free(order);
  return st;
}
