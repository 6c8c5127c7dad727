/* ckpt/shard_read: opening, checking and reading checkpoints (bam/shard.h): sharded step
 * folders and single-file exports; inspect and export.
 *
 * Trust nothing that has not been checked. bam_ckpt_open reads the whole index and checks it
 * for consistency (the shards tile [0, n_params) exactly, the tensors tile it too, the pieces
 * table is exactly what the two imply), and checks that every shard file exists with the
 * recorded size, before a single parameter is read. Shard files are opened lazily, by the
 * reads that need them, and closed again before bam_ckpt_read returns (a rank resharding a
 * checkpoint of thousands of ranks would otherwise run out of file descriptors).
 *
 * CRC-32C policy: the first read that touches a shard dataset reads the WHOLE dataset once and
 * compares its CRC-32C with the index; the dataset is then marked verified in the handle and
 * later reads fetch only the range they need (still protected chunk by chunk by Fletcher32).
 * When the request covers the whole dataset (the usual case: same rank count, each rank reading
 * its own range) it is read straight into the caller's buffer; otherwise the whole dataset is
 * read into a temporary buffer which is freed at once, so the peak extra memory is one shard
 * dataset and nothing is cached until close. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bam/shard.h"
#include "internal.h"

/* Floats read per piece while a dataset is verified on first touch (rounded to whole HDF5
 * chunks). */
#define VERIFY_FLOATS ((hsize_t)1 << 20)

struct bam_ckpt {
  char path[PATH_MAX]; /* the step folder, or the single file */
  int single;          /* a single-file export (bam_ckpt_export, bam_ckpt_save) */
  bam_ckpt_info info;
  int n_tensors;
  bam_rec_tensor *rec;      /* the stored layout, as in the index */
  bam_tensor_info *tensors; /* the same; names point into rec */
  size_t n_params;
  int has_moments;
  /* sharded */
  int n_shards;
  bam_rec_shard *shards;
  int *order; /* shard rows by increasing lo */
  unsigned char (*verified)[BAM_CKPT_NBUF];
  int n_pieces;
  bam_rec_piece *pieces;
  /* single file */
  hid_t file;
};

static int buffer_index(const char *name) {
  for (int b = 0; b < BAM_CKPT_NBUF; b++)
    if (name && !strcmp(name, bam_ckpt_buffer_names[b])) return b;
  return -1;
}

/* ---- naming what a damaged range holds ------------------------------------------------- */

/* Appends "name" (whole tensor) or "name[a:b]" (flat elements a..b-1 of the tensor) to a
 * list of at most 6 entries, then "and N more". */
typedef struct {
  char *buf;
  size_t cap;
  int count;
} name_list;

static void list_add(name_list *l, const bam_rec_tensor *t, int64_t a, int64_t b) {
  size_t used = strlen(l->buf);
  if (l->count < 6) {
    if (a == 0 && b == t->numel)
      snprintf(l->buf + used, l->cap - used, "%s%s", l->count ? ", " : "", t->name);
    else
      snprintf(l->buf + used, l->cap - used, "%s%s[%lld:%lld]", l->count ? ", " : "", t->name,
               (long long)a, (long long)b);
  }
  l->count++;
}

static void list_end(name_list *l) {
  size_t used = strlen(l->buf);
  if (l->count > 6) snprintf(l->buf + used, l->cap - used, " and %d more", l->count - 6);
  if (l->count == 0) snprintf(l->buf, l->cap, "no tensor");
}

/* The tensors (and element ranges of them) held by elements [a, b) of shard s's datasets,
 * found through the pieces table. */
static const char *describe_shard(const bam_ckpt *c, int s, int64_t a, int64_t b, char *buf,
                                  size_t cap) {
  buf[0] = 0;
  name_list l = {buf, cap, 0};
  for (int i = 0; i < c->n_pieces; i++) {
    const bam_rec_piece *p = &c->pieces[i];
    if (p->shard != s) continue;
    int64_t lo = p->shard_offset > a ? p->shard_offset : a;
    int64_t hi = p->shard_offset + p->length < b ? p->shard_offset + p->length : b;
    if (lo >= hi) continue;
    list_add(&l, &c->rec[p->tensor], p->tensor_offset + (lo - p->shard_offset),
             p->tensor_offset + (hi - p->shard_offset));
  }
  list_end(&l);
  return buf;
}

static const char *describe_whole_shard(const bam_ckpt *c, int s, char *buf, size_t cap) {
  return describe_shard(c, s, 0, c->shards[s].hi - c->shards[s].lo, buf, cap);
}

/* <step folder>/<file>; names are checked canonical at open and the folder's path fits in
 * PATH_MAX less the file name (open_sharded), so this never truncates. */
static void shard_path(const bam_ckpt *c, int s, char *out, size_t cap) {
  if ((size_t)snprintf(out, cap, "%s/%s", c->path, c->shards[s].file) >= cap) out[0] = 0;
}

/* ---- latest ------------------------------------------------------------------------------ */

/* Reads <dir>/latest into name ("step-000200"); *found = 0 if there is none. */
static bam_status read_latest(const char *dir, char *name, size_t cap, int *found) {
  *found = 0;
  char path[PATH_MAX];
  snprintf(path, sizeof path, "%s/latest", dir);
  FILE *f = fopen(path, "r");
  if (!f) {
    if (errno == ENOENT) return BAM_OK;
    BAM_FAIL(BAM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  }
  char text[128] = {0};
  size_t n = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == ' ')) text[--n] = 0;
  long long step;
  if (!bam_parse_step_name(text, &step))
    BAM_FAIL(BAM_ERR_DATA, "%s: holds '%.60s', not the name of a step folder", path, text);
  if (bam_strlcpy(name, text, cap) >= cap) BAM_FAIL(BAM_ERR_ARG, "%s: name too long", path);
  *found = 1;
  return BAM_OK;
}

bam_status bam_ckpt_latest(const char *ckpt_dir, char *out, size_t cap, int *found) {
  *found = 0;
  struct stat sb;
  if (stat(ckpt_dir, &sb) != 0) {
    if (errno == ENOENT) return BAM_OK; /* nothing saved yet */
    BAM_FAIL(BAM_ERR_IO, "%s: cannot access: %s", ckpt_dir, strerror(errno));
  }
  char name[64], index[PATH_MAX];
  int have = 0;
  BAM_CHECK(read_latest(ckpt_dir, name, sizeof name, &have));
  if (!have) return BAM_OK;
  if ((size_t)snprintf(out, cap, "%s/%s", ckpt_dir, name) >= cap)
    BAM_FAIL(BAM_ERR_ARG, "%s/%s: path longer than the %zu bytes given", ckpt_dir, name, cap);
  snprintf(index, sizeof index, "%s/index.h5", out);
  if (access(index, F_OK) != 0)
    BAM_FAIL(BAM_ERR_DATA, "%s/latest names %s, which has no index.h5 (removed by hand, or an "
             "interrupted replacement of that step?)", ckpt_dir, name);
  *found = 1;
  return BAM_OK;
}

/* ---- opening a sharded checkpoint ------------------------------------------------------------ */

/* A 1-D table (compound or scalar) into a malloc'd array of *n records. */
static bam_status read_table(hid_t f, const char *name, hid_t mem_type, size_t rec_size, void **out,
                             int *n, const char *path) {
  *out = NULL;
  *n = 0;
  if (H5Lexists(f, name, H5P_DEFAULT) <= 0) BAM_FAIL(BAM_ERR_DATA, "%s: dataset '%s' is missing", path, name);
  hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  if (d < 0) BAM_FAIL(BAM_ERR_DATA, "%s: cannot open dataset '%s' (%s)", path, name, bam_h5_reason());
  hid_t sp = H5Dget_space(d);
  hsize_t dims[2] = {0, 0};
  int nd = H5Sget_simple_extent_dims(sp, dims, NULL);
  H5Sclose(sp);
  bam_status st = BAM_OK;
  void *buf = NULL;
  if (nd != 1 || dims[0] > INT_MAX / 2) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: dataset '%s' is not a 1-D table", path, name);
  } else if (!(buf = calloc(dims[0] ? dims[0] : 1, rec_size))) {
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory reading '%s'", path, name);
  } else if (dims[0] > 0 && H5Dread(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: dataset '%s' cannot be read (%s: damaged, or not the expected fields)",
                       path, name, bam_h5_reason());
  }
  H5Dclose(d);
  if (st != BAM_OK) {
    free(buf);
    return st;
  }
  *out = buf;
  *n = (int)dims[0];
  return BAM_OK;
}

static bam_status read_rng(hid_t f, bam_ckpt *c, const char *path) {
  const int W = c->info.world;
  if (H5Lexists(f, "rng_state", H5P_DEFAULT) <= 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: dataset 'rng_state' is missing", path);
  hid_t d = H5Dopen2(f, "rng_state", H5P_DEFAULT);
  if (d < 0) BAM_FAIL(BAM_ERR_DATA, "%s: cannot open dataset 'rng_state'", path);
  hid_t sp = H5Dget_space(d);
  hsize_t dims[2] = {0, 0};
  int nd = H5Sget_simple_extent_ndims(sp);
  if (nd == 2) H5Sget_simple_extent_dims(sp, dims, NULL);
  H5Sclose(sp);
  bam_status st = BAM_OK;
  if (nd != 2 || dims[0] != (hsize_t)W || dims[1] != 4)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: dataset 'rng_state' is not (world = %d) x 4", path, W);
  else if (!(c->info.rng_state = calloc((size_t)W * 4, sizeof(uint64_t))))
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", path);
  else if (H5Dread(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, c->info.rng_state) < 0)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: dataset 'rng_state' cannot be read (%s)",
                       path, bam_h5_reason());
  H5Dclose(d);
  return st;
}

/* String attribute into a fixed char array. */
static bam_status attr_to_array(hid_t f, const char *name, char *dst, size_t cap, const char *path) {
  char *s = NULL;
  BAM_CHECK(bam_h5_read_attr_str(f, name, &s, path));
  size_t n = bam_strlcpy(dst, s, cap);
  free(s);
  if (n >= cap) BAM_FAIL(BAM_ERR_DATA, "%s: attribute '%s' is longer than %zu bytes", path, name, cap - 1);
  return BAM_OK;
}

static bam_status read_index_attrs(hid_t f, bam_ckpt *c, const char *idx) {
  char *format = NULL;
  BAM_CHECK(bam_h5_read_attr_str(f, "format", &format, idx));
  int ok = !strcmp(format, BAM_INDEX_FORMAT);
  if (!ok) {
    bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: format is '%s', not '%s'", idx, format,
                  BAM_INDEX_FORMAT);
    free(format);
    return BAM_ERR_DATA;
  }
  free(format);
  int64_t version, world, n_params, has_moments;
  BAM_CHECK(bam_h5_read_attr_i64(f, "version", &version, idx));
  if (version != BAM_SHARDED_VERSION)
    BAM_FAIL(BAM_ERR_DATA, "%s: index version %lld, this build reads version %d", idx,
             (long long)version, BAM_SHARDED_VERSION);
  bam_ckpt_info *in = &c->info;
  BAM_CHECK(attr_to_array(f, "kind", in->kind, sizeof in->kind, idx));
  BAM_CHECK(bam_h5_read_attr_i64(f, "step", &in->step, idx));
  BAM_CHECK(bam_h5_read_attr_i64(f, "tokens_seen", &in->tokens_seen, idx));
  BAM_CHECK(attr_to_array(f, "tokenizer", in->tokenizer, sizeof in->tokenizer, idx));
  BAM_CHECK(bam_h5_read_attr_str(f, "config", &in->config_text, idx));
  BAM_CHECK(bam_h5_read_attr_str(f, "lineage", &in->lineage_text, idx));
  BAM_CHECK(bam_h5_read_attr_i64(f, "world", &world, idx));
  BAM_CHECK(bam_h5_read_attr_i64(f, "n_params", &n_params, idx));
  BAM_CHECK(bam_h5_read_attr_i64(f, "has_moments", &has_moments, idx));
  if (world < 1 || world > BAM_CKPT_MAX_RANKS)
    BAM_FAIL(BAM_ERR_DATA, "%s: world = %lld, expected 1 to %d", idx, (long long)world, BAM_CKPT_MAX_RANKS);
  if (n_params < 0 || (has_moments != 0 && has_moments != 1) || in->step < 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: n_params = %lld, has_moments = %lld, step = %lld: not a valid index",
             idx, (long long)n_params, (long long)has_moments, (long long)in->step);
  in->world = (int)world;
  c->n_params = (size_t)n_params;
  c->has_moments = (int)has_moments;
  return BAM_OK;
}

/* Shards: canonical names, and sorted by lo they tile [0, n_params) exactly. */
static int cmp_shard_lo(const void *a, const void *b, void *shards) {
  const bam_rec_shard *s = shards, *x = &s[*(const int *)a], *y = &s[*(const int *)b];
  if (x->lo != y->lo) return x->lo < y->lo ? -1 : 1;
  return x->hi < y->hi ? -1 : x->hi > y->hi;
}

static bam_status check_shards(bam_ckpt *c, const char *idx) {
  for (int s = 0; s < c->n_shards; s++) {
    char want[BAM_CKPT_NAME_LEN];
    bam_shard_file_name(want, sizeof want, s, c->n_shards);
    c->shards[s].file[BAM_CKPT_NAME_LEN - 1] = 0;
    if (strcmp(c->shards[s].file, want) != 0)
      BAM_FAIL(BAM_ERR_DATA, "%s: shard %d is named '%s', expected '%s'", idx, s, c->shards[s].file, want);
    if (c->shards[s].lo < 0 || c->shards[s].lo > c->shards[s].hi)
      BAM_FAIL(BAM_ERR_DATA, "%s: shard %s holds [%lld, %lld), not a range", idx, want,
               (long long)c->shards[s].lo, (long long)c->shards[s].hi);
  }
  if (!(c->order = malloc((size_t)c->n_shards * sizeof *c->order)))
    BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", idx);
  for (int s = 0; s < c->n_shards; s++) c->order[s] = s;
  qsort_r(c->order, (size_t)c->n_shards, sizeof *c->order, cmp_shard_lo, c->shards);
  int64_t at = 0;
  for (int k = 0; k < c->n_shards; k++) {
    const bam_rec_shard *s = &c->shards[c->order[k]];
    if (s->lo != at)
      BAM_FAIL(BAM_ERR_DATA, "%s: shard %s holds [%lld, %lld), expected it to start at %lld (the "
               "shards must tile the flat buffer without gaps or overlaps)", idx, s->file,
               (long long)s->lo, (long long)s->hi, (long long)at);
    at = s->hi;
  }
  if (at != (int64_t)c->n_params)
    BAM_FAIL(BAM_ERR_DATA, "%s: the shards hold [0, %lld), n_params is %zu", idx, (long long)at,
             c->n_params);
  return BAM_OK;
}

/* The pieces table must be exactly the one the tensors and shards tables imply: readers other
 * than this one (h5py) rely on it. */
static bam_status check_pieces(bam_ckpt *c, const char *idx) {
  bam_rec_piece *want = NULL;
  int n = bam_make_pieces(c->rec, c->n_tensors, c->shards, c->n_shards, &want);
  if (n < 0) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", idx);
  int bad = n != c->n_pieces ? (n < c->n_pieces ? n : c->n_pieces) : -1;
  for (int i = 0; i < n && i < c->n_pieces && bad < 0; i++) {
    const bam_rec_piece *p = &c->pieces[i], *q = &want[i];
    if (p->tensor != q->tensor || p->shard != q->shard || p->tensor_offset != q->tensor_offset ||
        p->length != q->length || p->shard_offset != q->shard_offset)
      bad = i;
  }
  free(want);
  if (bad >= 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: the pieces table disagrees with the tensors and shards tables at "
             "row %d (%d rows, expected %d)", idx, bad, c->n_pieces, n);
  return BAM_OK;
}

static bam_status build_tensor_views(bam_ckpt *c, const char *where) {
  if (!(c->tensors = calloc((size_t)c->n_tensors, sizeof *c->tensors)))
    BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", where);
  for (int i = 0; i < c->n_tensors; i++) {
    bam_rec_tensor *r = &c->rec[i];
    bam_tensor_info *t = &c->tensors[i];
    t->name = r->name;
    t->ndim = r->ndim;
    for (int k = 0; k < BAM_MAX_DIMS; k++) t->shape[k] = k < r->ndim ? r->shape[k] : 0;
    t->offset = (size_t)r->offset;
    t->numel = (size_t)r->numel;
    t->decay = r->decay;
  }
  return BAM_OK;
}

/* Every shard file exists and has the recorded size: checked before anything is read, so an
 * incomplete copy or a truncated transfer is refused up front, naming what it would lose. */
static bam_status check_shard_files(bam_ckpt *c) {
  for (int s = 0; s < c->n_shards; s++) {
    char path[PATH_MAX], what[512];
    shard_path(c, s, path, sizeof path);
    struct stat sb;
    if (stat(path, &sb) != 0) {
      if (errno == ENOENT)
        BAM_FAIL(BAM_ERR_DATA, "%s: missing (checkpoint incomplete?); it holds %s", path,
                 describe_whole_shard(c, s, what, sizeof what));
      BAM_FAIL(BAM_ERR_IO, "%s: cannot access: %s", path, strerror(errno));
    }
    if ((int64_t)sb.st_size != c->shards[s].file_bytes)
      BAM_FAIL(BAM_ERR_DATA, "%s: size %lld bytes, index records %lld (%s); it holds %s", path,
               (long long)sb.st_size, (long long)c->shards[s].file_bytes,
               (int64_t)sb.st_size < c->shards[s].file_bytes ? "truncated?" : "altered?",
               describe_whole_shard(c, s, what, sizeof what));
  }
  return BAM_OK;
}

static bam_status open_sharded(bam_ckpt *c, const char *dir) {
  if (strlen(dir) + BAM_CKPT_NAME_LEN + 2 > sizeof c->path)
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", dir);
  bam_strlcpy(c->path, dir, sizeof c->path);
  char idx[PATH_MAX + 16];
  snprintf(idx, sizeof idx, "%s/index.h5", dir);
  if (access(idx, F_OK) != 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: no index.h5 (not a checkpoint, or one whose save did not finish)", dir);
  hid_t fapl = bam_h5_fapl();
  hid_t f = H5Fopen(idx, H5F_ACC_RDONLY, fapl);
  char why[256];
  bam_strlcpy(why, f < 0 ? bam_h5_reason() : "", sizeof why);
  H5Pclose(fapl);
  if (f < 0) BAM_FAIL(BAM_ERR_DATA, "%s: cannot open (%s: not HDF5, or damaged)", idx, why);
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, read_index_attrs(f, c, idx), done);
  hid_t tt = bam_rec_tensor_type(0), ts = bam_rec_shard_type(0), tp = bam_rec_piece_type(0);
  st = read_table(f, "tensors", tt, sizeof(bam_rec_tensor), (void **)&c->rec, &c->n_tensors, idx);
  if (st == BAM_OK)
    st = read_table(f, "shards", ts, sizeof(bam_rec_shard), (void **)&c->shards, &c->n_shards, idx);
  if (st == BAM_OK)
    st = read_table(f, "pieces", tp, sizeof(bam_rec_piece), (void **)&c->pieces, &c->n_pieces, idx);
  H5Tclose(tt), H5Tclose(ts), H5Tclose(tp);
  if (st != BAM_OK) goto done;
  int n_loader = 0;
  BAM_CHECK_GOTO(st, read_table(f, "loader_state", H5T_NATIVE_INT64, sizeof(int64_t),
                                (void **)&c->info.loader_state, &n_loader, idx), done);
  if (n_loader != c->info.world) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: loader_state has %d entries, world is %d",
                       idx, n_loader, c->info.world);
    goto done;
  }
  BAM_CHECK_GOTO(st, read_rng(f, c, idx), done);
  if (c->n_shards != c->info.world) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: %d shards, world is %d", idx,
                       c->n_shards, c->info.world);
    goto done;
  }
  for (int i = 0; i < c->n_tensors; i++) {
    c->rec[i].name[BAM_CKPT_NAME_LEN - 1] = 0;
    for (int k = c->rec[i].ndim > 0 ? c->rec[i].ndim : 0; k < BAM_MAX_DIMS; k++) c->rec[i].shape[k] = 0;
  }
  BAM_CHECK_GOTO(st, bam_check_tensor_table(c->rec, c->n_tensors, c->n_params, idx), done);
  BAM_CHECK_GOTO(st, check_shards(c, idx), done);
  BAM_CHECK_GOTO(st, check_pieces(c, idx), done);
  BAM_CHECK_GOTO(st, build_tensor_views(c, idx), done);
  if (!(c->verified = calloc((size_t)c->n_shards, sizeof *c->verified))) {
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", idx);
    goto done;
  }
  BAM_CHECK_GOTO(st, check_shard_files(c), done);
done:
  H5Fclose(f);
  return st;
}

/* ---- opening a single file ------------------------------------------------------------------ */

/* Files written before tensors carried an "offset" attribute hold dense models only, laid out
 * in the dense table order of bam_model_tensors. */
static int dense_rank(const char *name) {
  bam_model_shape s = {.n_layers = 1, .d_model = 2, .n_heads = 1, .n_kv_heads = 1, .d_ff = 1,
                       .vocab_size = 2, .seq_len = 1, .rope_base = 10000, .norm_eps = 1e-5f};
  bam_tensor_info t[BAM_MAX_TENSORS];
  int n = bam_model_tensors(&s, t, NULL);
  for (int i = 0; i < n; i++)
    if (!strcmp(t[i].name, name)) return i;
  return -1;
}

static bam_status read_single_tensor_info(hid_t g, const char *name, bam_rec_tensor *r,
                                          int *has_offset, const char *path) {
  memset(r, 0, sizeof *r);
  if (strlen(name) >= BAM_CKPT_NAME_LEN)
    BAM_FAIL(BAM_ERR_DATA, "%s: tensor name /params/%.40s... is too long", path, name);
  memcpy(r->name, name, strlen(name));
  hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
  if (d < 0) BAM_FAIL(BAM_ERR_DATA, "%s: /params/%s is not a dataset", path, name);
  hid_t sp = H5Dget_space(d);
  int nd = H5Sget_simple_extent_ndims(sp);
  hsize_t dims[BAM_MAX_DIMS] = {0};
  if (nd >= 1 && nd <= BAM_MAX_DIMS) H5Sget_simple_extent_dims(sp, dims, NULL);
  H5Sclose(sp);
  bam_status st = BAM_OK;
  if (nd < 1 || nd > BAM_MAX_DIMS) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: tensor /params/%s has %d dimensions",
                       path, name, nd);
  } else {
    r->ndim = nd;
    r->numel = 1;
    for (int k = 0; k < nd; k++) r->shape[k] = (int64_t)dims[k], r->numel *= (int64_t)dims[k];
    *has_offset = bam_h5_has_attr(d, "offset");
    if (*has_offset) st = bam_h5_read_attr_i64(d, "offset", &r->offset, path);
    int64_t decay = nd >= 2;
    if (st == BAM_OK && bam_h5_has_attr(d, "decay")) st = bam_h5_read_attr_i64(d, "decay", &decay, path);
    r->decay = (int32_t)decay;
  }
  H5Dclose(d);
  return st;
}

static int cmp_rec_offset(const void *a, const void *b) {
  int64_t x = ((const bam_rec_tensor *)a)->offset, y = ((const bam_rec_tensor *)b)->offset;
  return x < y ? -1 : x > y;
}

static bam_status read_single_tensors(bam_ckpt *c, const char *path) {
  if (H5Lexists(c->file, "params", H5P_DEFAULT) <= 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: group /params is missing", path);
  hid_t g = H5Gopen2(c->file, "params", H5P_DEFAULT);
  if (g < 0) BAM_FAIL(BAM_ERR_DATA, "%s: /params is not a group", path);
  H5G_info_t gi;
  bam_status st = BAM_OK;
  if (H5Gget_info(g, &gi) < 0 || gi.nlinks < 1 || gi.nlinks > 100000) {
    H5Gclose(g);
    BAM_FAIL(BAM_ERR_DATA, "%s: group /params holds no tensors", path);
  }
  c->n_tensors = (int)gi.nlinks;
  if (!(c->rec = calloc(gi.nlinks, sizeof *c->rec))) {
    H5Gclose(g);
    BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", path);
  }
  int with_offset = 0;
  for (int i = 0; i < c->n_tensors && st == BAM_OK; i++) {
    char name[256];
    if (H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, (hsize_t)i, name, sizeof name,
                           H5P_DEFAULT) < 0) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: cannot list /params", path);
      break;
    }
    int has = 0;
    st = read_single_tensor_info(g, name, &c->rec[i], &has, path);
    with_offset += has;
  }
  H5Gclose(g);
  if (st != BAM_OK) return st;
  if (with_offset == 0) {
    /* an older file: the dense order */
    int64_t at = 0;
    for (int i = 0; i < c->n_tensors; i++)
      if (dense_rank(c->rec[i].name) < 0)
        BAM_FAIL(BAM_ERR_DATA, "%s: tensor /params/%s has no 'offset' attribute, and is not a "
                 "dense tensor whose place is known", path, c->rec[i].name);
    for (int k = 0; k < BAM_MAX_TENSORS; k++)
      for (int i = 0; i < c->n_tensors; i++)
        if (dense_rank(c->rec[i].name) == k) c->rec[i].offset = at, at += c->rec[i].numel;
  } else if (with_offset != c->n_tensors) {
    BAM_FAIL(BAM_ERR_DATA, "%s: %d of the %d tensors under /params lack the 'offset' attribute",
             path, c->n_tensors - with_offset, c->n_tensors);
  }
  qsort(c->rec, (size_t)c->n_tensors, sizeof *c->rec, cmp_rec_offset);
  int64_t total = 0;
  for (int i = 0; i < c->n_tensors; i++) total += c->rec[i].numel;
  int64_t n_params = total;
  if (bam_h5_has_attr(c->file, "n_params")) BAM_CHECK(bam_h5_read_attr_i64(c->file, "n_params", &n_params, path));
  c->n_params = (size_t)n_params;
  return bam_check_tensor_table(c->rec, c->n_tensors, c->n_params, path);
}

static bam_status open_single(bam_ckpt *c, const char *path) {
  if (bam_strlcpy(c->path, path, sizeof c->path) >= sizeof c->path)
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", path);
  c->single = 1;
  BAM_CHECK(bam_h5_open_single(path, &c->file));
  bam_ckpt_info *in = &c->info;
  hid_t f = c->file;
  if (bam_h5_has_attr(f, "kind")) BAM_CHECK(attr_to_array(f, "kind", in->kind, sizeof in->kind, path));
  else bam_strlcpy(in->kind, "dense", sizeof in->kind);
  BAM_CHECK(bam_h5_read_attr_i64(f, "step", &in->step, path));
  BAM_CHECK(bam_h5_read_attr_i64(f, "tokens_seen", &in->tokens_seen, path));
  BAM_CHECK(attr_to_array(f, "tokenizer", in->tokenizer, sizeof in->tokenizer, path));
  BAM_CHECK(bam_h5_read_attr_str(f, "config", &in->config_text, path));
  if (bam_h5_has_attr(f, "lineage")) BAM_CHECK(bam_h5_read_attr_str(f, "lineage", &in->lineage_text, path));
  else if (!(in->lineage_text = strdup(""))) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", path);
  int64_t world = 1;
  if (bam_h5_has_attr(f, "world")) BAM_CHECK(bam_h5_read_attr_i64(f, "world", &world, path));
  if (world < 1 || world > BAM_CKPT_MAX_RANKS)
    BAM_FAIL(BAM_ERR_DATA, "%s: world = %lld, expected 1 to %d", path, (long long)world, BAM_CKPT_MAX_RANKS);
  in->world = (int)world;
  if (H5Lexists(f, "loader_state", H5P_DEFAULT) > 0) {
    int n = 0;
    BAM_CHECK(read_table(f, "loader_state", H5T_NATIVE_INT64, sizeof(int64_t),
                         (void **)&in->loader_state, &n, path));
    if (n != in->world)
      BAM_FAIL(BAM_ERR_DATA, "%s: loader_state has %d entries, world is %d", path, n, in->world);
    BAM_CHECK(read_rng(f, c, path));
  } else {
    /* bam_ckpt_save: one loader position, no RNG state */
    int64_t pos = 0;
    BAM_CHECK(bam_h5_read_attr_i64(f, "loader_position", &pos, path));
    in->loader_state = calloc((size_t)in->world, sizeof *in->loader_state);
    in->rng_state = calloc((size_t)in->world * 4, sizeof *in->rng_state);
    if (!in->loader_state || !in->rng_state) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", path);
    for (int r = 0; r < in->world; r++) in->loader_state[r] = pos;
  }
  BAM_CHECK(read_single_tensors(c, path));
  c->has_moments = H5Lexists(f, "adam_m", H5P_DEFAULT) > 0 && H5Lexists(f, "adam_v", H5P_DEFAULT) > 0;
  return build_tensor_views(c, path);
}

/* ---- open / close / accessors ------------------------------------------------------------------ */

bam_status bam_ckpt_open(bam_ckpt **out, const char *path) {
  *out = NULL;
  bam_h5_quiet();
  if (!path || !path[0]) BAM_FAIL(BAM_ERR_ARG, "checkpoint: no path given");
  struct stat sb;
  if (stat(path, &sb) != 0) BAM_FAIL(BAM_ERR_IO, "%s: no such checkpoint: %s", path, strerror(errno));
  bam_ckpt *c = calloc(1, sizeof *c);
  if (!c) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", path);
  c->file = -1;
  bam_status st;
  if (S_ISDIR(sb.st_mode)) {
    /* a step folder, or a checkpoint folder whose `latest` names one */
    char dir[PATH_MAX], idx[PATH_MAX], name[64];
    snprintf(idx, sizeof idx, "%s/index.h5", path);
    int found = 0;
    st = BAM_OK;
    if (access(idx, F_OK) == 0) {
      bam_strlcpy(dir, path, sizeof dir);
    } else {
      st = read_latest(path, name, sizeof name, &found);
      const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
      long long step;
      if (st == BAM_OK && !found && bam_parse_step_name(base, &step))
        st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                           "%s: no index.h5 (a step folder whose save did not finish, or damaged)",
                           path);
      else if (st == BAM_OK && !found)
        st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                           "%s: neither a checkpoint (no index.h5) nor a checkpoint folder (no "
                           "latest)", path);
      if (st == BAM_OK) snprintf(dir, sizeof dir, "%s/%s", path, name);
    }
    if (st == BAM_OK) st = open_sharded(c, dir);
  } else {
    st = open_single(c, path);
  }
  if (st != BAM_OK) {
    bam_ckpt_close(&c);
    return st;
  }
  *out = c;
  return BAM_OK;
}

void bam_ckpt_close(bam_ckpt **cp) {
  if (!cp || !*cp) return;
  bam_ckpt *c = *cp;
  if (c->file >= 0) H5Fclose(c->file);
  bam_ckpt_info_free(&c->info);
  free(c->rec);
  free(c->tensors);
  free(c->shards);
  free(c->order);
  free(c->verified);
  free(c->pieces);
  free(c);
  *cp = NULL;
}

const char *bam_ckpt_path(const bam_ckpt *c) { return c->path; }
const bam_ckpt_info *bam_ckpt_get_info(const bam_ckpt *c) { return &c->info; }
int bam_ckpt_has_moments(const bam_ckpt *c) { return c->has_moments; }

const bam_tensor_info *bam_ckpt_tensors(const bam_ckpt *c, int *n_tensors, size_t *n_params) {
  if (n_tensors) *n_tensors = c->n_tensors;
  if (n_params) *n_params = c->n_params;
  return c->tensors;
}

/* ---- layout check ---------------------------------------------------------------------------- */

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
  size_t used = (size_t)snprintf(buf, cap, "(");
  for (int k = 0; k < ndim && used < cap; k++)
    used += (size_t)snprintf(buf + used, cap - used, "%s%lld", k ? ", " : "", (long long)shape[k]);
  if (used < cap) snprintf(buf + used, cap - used, ")");
}

static int find_tensor(const bam_tensor_info *t, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (t[i].name && !strcmp(t[i].name, name)) return i;
  return -1;
}

bam_status bam_ckpt_check_layout(const bam_ckpt *c, const bam_tensor_info *tensors,
                                  int n_tensors, size_t n_params) {
  const char *p = c->path;
  for (int j = 0; j < c->n_tensors; j++)
    if (find_tensor(tensors, n_tensors, c->tensors[j].name) < 0)
      BAM_FAIL(BAM_ERR_DATA, "%s: %s names tensor '%s' which the model does not have", p,
               c->single ? "the file" : "index", c->tensors[j].name);
  for (int i = 0; i < n_tensors; i++)
    if (find_tensor(c->tensors, c->n_tensors, tensors[i].name) < 0)
      BAM_FAIL(BAM_ERR_DATA, "%s: the model's tensor '%s' is not in the checkpoint", p, tensors[i].name);
  if (n_tensors != c->n_tensors)
    BAM_FAIL(BAM_ERR_DATA, "%s: %d tensors, the model has %d (a tensor listed twice?)", p,
             c->n_tensors, n_tensors);
  for (int i = 0; i < n_tensors; i++) {
    const bam_tensor_info *m = &tensors[i], *s = &c->tensors[find_tensor(c->tensors, c->n_tensors, m->name)];
    int same = m->ndim == s->ndim;
    for (int k = 0; k < m->ndim && same; k++) same = m->shape[k] == s->shape[k];
    if (!same) {
      char a[128], b[128];
      shape_str(a, sizeof a, s->ndim, s->shape);
      shape_str(b, sizeof b, m->ndim, m->shape);
      BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s has shape %s, the model expects %s (a checkpoint of "
               "another model shape?)", p, m->name, a, b);
    }
  }
  for (int i = 0; i < n_tensors; i++) {
    const bam_tensor_info *m = &tensors[i], *s = &c->tensors[find_tensor(c->tensors, c->n_tensors, m->name)];
    if (m->offset != s->offset)
      BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s starts at element %zu of the flat buffer, the model "
               "puts it at %zu (another tensor order?)", p, m->name, s->offset, m->offset);
  }
  if (n_params != c->n_params)
    BAM_FAIL(BAM_ERR_DATA, "%s: %zu parameters, the model has %zu", p, c->n_params, n_params);
  return BAM_OK;
}

/* ---- reading ------------------------------------------------------------------------------------ */

/* Elements [a, e) of a 1-D float dataset into dst: 0, or -1 with HDF5's reason in `why` (taken
 * at once: the next HDF5 call clears the error stack). */
static herr_t read_1d(hid_t d, hsize_t a, hsize_t e, float *dst, char *why, size_t cap) {
  hsize_t count = e - a;
  hid_t fs = H5Dget_space(d), ms = H5Screate_simple(1, &count, NULL);
  herr_t r = H5Sselect_hyperslab(fs, H5S_SELECT_SET, &a, NULL, &count, NULL);
  if (r >= 0) r = H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, dst);
  if (r < 0) bam_strlcpy(why, bam_h5_reason(), cap);
  H5Sclose(ms);
  H5Sclose(fs);
  return r;
}

/* Reads [a, e) of dataset b of shard s; on failure re-reads chunk by chunk to find the damaged
 * chunk, and names the tensors it holds. */
static bam_status read_slice(const bam_ckpt *c, int s, hid_t d, int b, hsize_t a, hsize_t e,
                             float *dst, const char *path) {
  char reason[256], what[512];
  if (read_1d(d, a, e, dst, reason, sizeof reason) >= 0) return BAM_OK;
  hsize_t chunk = e - a;
  hid_t dcpl = H5Dget_create_plist(d);
  if (H5Pget_layout(dcpl) == H5D_CHUNKED) H5Pget_chunk(dcpl, 1, &chunk);
  H5Pclose(dcpl);
  if (chunk < 1) chunk = 1;
  for (hsize_t c0 = a / chunk * chunk; c0 < e; c0 += chunk) {
    hsize_t lo = c0 > a ? c0 : a, hi = c0 + chunk < e ? c0 + chunk : e;
    if (read_1d(d, lo, hi, dst + (lo - a), reason, sizeof reason) < 0) {
      BAM_FAIL(BAM_ERR_DATA, "%s: dataset '%s' elements [%llu, %llu) cannot be read (%s: the file "
               "is damaged); they hold %s", path, bam_ckpt_buffer_names[b], (unsigned long long)lo,
               (unsigned long long)hi, reason,
               describe_shard(c, s, (int64_t)lo, (int64_t)hi, what, sizeof what));
    }
  }
  BAM_FAIL(BAM_ERR_DATA, "%s: dataset '%s' elements [%llu, %llu) cannot be read (%s); they hold %s",
           path, bam_ckpt_buffer_names[b], (unsigned long long)a, (unsigned long long)e, reason,
           describe_shard(c, s, (int64_t)a, (int64_t)e, what, sizeof what));
}

/* The shard's own attributes must match its row in the index: a shard copied in from another
 * checkpoint (same size, other contents) is refused before its data are looked at. */
static bam_status check_shard_attrs(const bam_ckpt *c, int s, hid_t f, const char *path) {
  char *format = NULL;
  BAM_CHECK(bam_h5_read_attr_str(f, "format", &format, path));
  int ok = !strcmp(format, BAM_SHARD_FORMAT);
  free(format);
  if (!ok) BAM_FAIL(BAM_ERR_DATA, "%s: not a bam checkpoint shard (format attribute)", path);
  int64_t v[5];
  static const char *names[5] = {"step", "lo", "hi", "rank", "world"};
  for (int i = 0; i < 5; i++) BAM_CHECK(bam_h5_read_attr_i64(f, names[i], &v[i], path));
  const bam_rec_shard *sh = &c->shards[s];
  if (v[0] != c->info.step || v[1] != sh->lo || v[2] != sh->hi || v[3] != s || v[4] != c->n_shards)
    BAM_FAIL(BAM_ERR_DATA, "%s: a shard of step %lld, rank %lld of %lld, holding [%lld, %lld); the "
             "index expects step %lld, rank %d of %d, [%lld, %lld) (a shard of another checkpoint?)",
             path, (long long)v[0], (long long)v[3], (long long)v[4], (long long)v[1], (long long)v[2],
             (long long)c->info.step, s, c->n_shards, (long long)sh->lo, (long long)sh->hi);
  return BAM_OK;
}

static bam_status read_from_shard(bam_ckpt *c, int s, int b, size_t a, size_t e, float *dst) {
  char path[PATH_MAX], what[512];
  shard_path(c, s, path, sizeof path);
  const bam_rec_shard *sh = &c->shards[s];
  const size_t n = (size_t)(sh->hi - sh->lo);
  const char *bn = bam_ckpt_buffer_names[b];
  hid_t fapl = bam_h5_fapl();
  hid_t f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
  char why[256];
  bam_strlcpy(why, f < 0 ? bam_h5_reason() : "", sizeof why);
  H5Pclose(fapl);
  if (f < 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: cannot open (%s: damaged?); it holds %s", path, why,
             describe_whole_shard(c, s, what, sizeof what));
  hid_t d = -1;
  float *whole = NULL;
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, check_shard_attrs(c, s, f, path), done);
  /* No chunk cache: every chunk is read once, straight through the Fletcher32 filter. */
  hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
  H5Pset_chunk_cache(dapl, 0, 0, 1.0);
  if (H5Lexists(f, bn, H5P_DEFAULT) > 0) d = H5Dopen2(f, bn, dapl);
  H5Pclose(dapl);
  if (d < 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: dataset '%s' is missing; it holds %s",
                       path, bn, describe_whole_shard(c, s, what, sizeof what));
    goto done;
  }
  hid_t sp = H5Dget_space(d), ty = H5Dget_type(d);
  hsize_t dims[1] = {0};
  int nd = H5Sget_simple_extent_ndims(sp);
  if (nd == 1) H5Sget_simple_extent_dims(sp, dims, NULL);
  int is_f32 = H5Tget_class(ty) == H5T_FLOAT && H5Tget_size(ty) == 4;
  H5Sclose(sp);
  H5Tclose(ty);
  if (nd != 1 || dims[0] != n || !is_f32) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: dataset '%s' is not %zu float32 values as the index records; it holds %s",
                       path, bn, n, describe_whole_shard(c, s, what, sizeof what));
    goto done;
  }
  if (c->verified[s][b]) {
    st = read_slice(c, s, d, b, a, e, dst, path);
    goto done;
  }
  /* First touch: the whole dataset is checked against the CRC-32C in the index. It streams
   * through the check in pieces of whole HDF5 chunks, the requested range copied out as it
   * passes, so verifying costs a few MiB beside the destination, never a copy of the shard. */
  const int direct = a == 0 && e == n;
  size_t piece = n;
  hid_t dcpl = H5Dget_create_plist(d);
  hsize_t hchunk = 0;
  if (H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, 1, &hchunk) == 1 && hchunk > 0)
    piece = VERIFY_FLOATS > hchunk ? VERIFY_FLOATS / hchunk * hchunk : hchunk;
  H5Pclose(dcpl);
  if (piece > n) piece = n;
  if (!direct && !(whole = malloc((piece ? piece : 1) * sizeof(float)))) {
    char size[32];
    bam_format_bytes(size, sizeof size, (double)piece * sizeof(float));
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__,
                       "%s: cannot allocate %s to verify dataset '%s'", path, size, bn);
    goto done;
  }
  uint32_t crc = 0;
  for (size_t o = 0; o < n; o += piece) {
    const size_t len = n - o < piece ? n - o : piece;
    float *p = direct ? dst + o : whole;
    BAM_CHECK_GOTO(st, read_slice(c, s, d, b, o, o + len, p, path), done);
    crc = bam_crc32c(crc, p, len * sizeof(float));
    const size_t lo = a > o ? a : o, hi = e < o + len ? e : o + len;
    if (!direct && lo < hi) memcpy(dst + (lo - a), whole + (lo - o), (hi - lo) * sizeof(float));
  }
  if (crc != sh->crc32c[b]) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: dataset '%s' has CRC-32C 0x%08x, the index records 0x%08x (altered or "
                       "replaced shard); it holds %s", path, bn, crc, sh->crc32c[b],
                       describe_whole_shard(c, s, what, sizeof what));
    goto done;
  }
  c->verified[s][b] = 1;
done:
  free(whole);
  if (d >= 0) H5Dclose(d);
  H5Fclose(f);
  return st;
}

static bam_status read_sharded(bam_ckpt *c, int b, bam_range r, float *dst) {
  for (int k = 0; k < c->n_shards; k++) {
    int s = c->order[k];
    size_t lo = (size_t)c->shards[s].lo, hi = (size_t)c->shards[s].hi;
    if (lo >= r.hi) break;
    size_t a = lo > r.lo ? lo : r.lo, e = hi < r.hi ? hi : r.hi;
    if (a >= e) continue;
    BAM_CHECK(read_from_shard(c, s, b, a - lo, e - lo, dst + (a - r.lo)));
  }
  return BAM_OK;
}

static bam_status read_single(bam_ckpt *c, int b, bam_range r, float *dst) {
  const char *bn = bam_ckpt_buffer_names[b];
  for (int i = 0; i < c->n_tensors; i++) {
    const bam_tensor_info *t = &c->tensors[i];
    size_t a = t->offset > r.lo ? t->offset : r.lo;
    size_t e = t->offset + t->numel < r.hi ? t->offset + t->numel : r.hi;
    if (a >= e) continue;
    char name[BAM_CKPT_NAME_LEN + 16];
    snprintf(name, sizeof name, "/%s/%s", bn, t->name);
    if (H5Lexists(c->file, bn, H5P_DEFAULT) <= 0 || H5Lexists(c->file, name, H5P_DEFAULT) <= 0)
      BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s is missing", c->path, name);
    hid_t d = H5Dopen2(c->file, name, H5P_DEFAULT);
    if (d < 0) BAM_FAIL(BAM_ERR_DATA, "%s: cannot open tensor %s", c->path, name);
    hid_t sp = H5Dget_space(d);
    hssize_t npoints = H5Sget_simple_extent_npoints(sp);
    H5Sclose(sp);
    float *buf = dst + (a - r.lo);
    bam_status st = BAM_OK;
    if (npoints != (hssize_t)t->numel)
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: tensor %s holds %lld values, /params/%s %zu",
                         c->path, name, (long long)npoints, t->name, t->numel);
    /* A tensor read in part goes through a temporary copy of the whole tensor. */
    if (st == BAM_OK && (a != t->offset || e != t->offset + t->numel) &&
        !(buf = malloc(t->numel * sizeof(float))))
      st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: cannot allocate a buffer for tensor %s",
                         c->path, name);
    if (st == BAM_OK && H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s: tensor %s cannot be read (%s: damaged: checksum or truncation)",
                         c->path, name, bam_h5_reason());
    if (st == BAM_OK && buf != dst + (a - r.lo))
      memcpy(dst + (a - r.lo), buf + (a - t->offset), (e - a) * sizeof(float));
    if (buf != dst + (a - r.lo)) free(buf);
    H5Dclose(d);
    BAM_CHECK(st);
  }
  return BAM_OK;
}

bam_status bam_ckpt_read(bam_ckpt *c, const char *buffer, bam_range r, float *dst) {
  bam_h5_quiet();
  int b = buffer_index(buffer);
  if (b < 0)
    BAM_FAIL(BAM_ERR_ARG, "%s: no buffer '%s' (params, adam_m or adam_v)", c->path,
             buffer ? buffer : "(null)");
  if (b > 0 && !c->has_moments)
    BAM_FAIL(BAM_ERR_DATA, "%s: holds parameters only, no %s (saved without optimizer state)",
             c->path, buffer);
  if (r.lo > r.hi || r.hi > c->n_params)
    BAM_FAIL(BAM_ERR_ARG, "%s: range [%zu, %zu) of %s is outside [0, %zu)", c->path, r.lo, r.hi,
             buffer, c->n_params);
  if (r.lo == r.hi) return BAM_OK;
  BAM_CHECK(c->single ? read_single(c, b, r, dst) : read_sharded(c, b, r, dst));
  /* A checksum proves the bytes are those saved, not that they are numbers. */
  for (size_t i = 0; i < r.hi - r.lo; i++) {
    if (isfinite(dst[i])) continue;
    size_t at = r.lo + i;
    for (int t = 0; t < c->n_tensors; t++)
      if (at >= c->tensors[t].offset && at < c->tensors[t].offset + c->tensors[t].numel)
        BAM_FAIL(BAM_ERR_NUMERIC, "%s: tensor %s holds a non-finite value in %s (element %zu of "
                 "the tensor)", c->path, c->tensors[t].name, buffer, at - c->tensors[t].offset);
  }
  return BAM_OK;
}

/* ---- inspect ------------------------------------------------------------------------------------ */

/* "0", "0-3", "0-1,5": the shards holding tensor t, from the pieces table. */
static void tensor_shards(const bam_ckpt *c, int t, char *buf, size_t cap) {
  buf[0] = 0;
  if (c->single) {
    snprintf(buf, cap, "-");
    return;
  }
  size_t used = 0;
  int run_start = -1, prev = -2;
  for (int i = 0; i <= c->n_pieces; i++) {
    int s = i < c->n_pieces && c->pieces[i].tensor == t ? c->pieces[i].shard : -1;
    if (i < c->n_pieces && s < 0) continue;
    if (s >= 0 && s == prev + 1 && run_start >= 0) {
      prev = s;
      continue;
    }
    if (run_start >= 0 && used < cap) {
      if (prev > run_start)
        used += (size_t)snprintf(buf + used, cap - used, "%s%d-%d", used ? "," : "", run_start, prev);
      else
        used += (size_t)snprintf(buf + used, cap - used, "%s%d", used ? "," : "", run_start);
    }
    run_start = prev = s;
  }
}

static void print_block(FILE *out, const char *title, const char *text) {
  fprintf(out, "%s:\n", title);
  if (!text || !text[0]) {
    fprintf(out, "  (none)\n");
    return;
  }
  const char *p = text;
  while (*p) {
    const char *nl = strchr(p, '\n');
    int len = nl ? (int)(nl - p) : (int)strlen(p);
    fprintf(out, "  %.*s\n", len, p);
    p += len + (nl ? 1 : 0);
  }
}

bam_status bam_ckpt_inspect(const char *path, FILE *out) {
  if (!out) out = stdout;
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  const bam_ckpt_info *in = &c->info;
  char size[32];
  bam_format_bytes(size, sizeof size, (double)c->n_params * sizeof(float));
  fprintf(out, "checkpoint  %s\n", c->path);
  if (c->single) fprintf(out, "format      single file (bam-checkpoint)\n");
  else fprintf(out, "format      sharded (%d shard%s)\n", c->n_shards, c->n_shards > 1 ? "s" : "");
  fprintf(out, "kind        %s\n", in->kind);
  fprintf(out, "step        %lld\n", (long long)in->step);
  fprintf(out, "tokens      %lld\n", (long long)in->tokens_seen);
  fprintf(out, "tokenizer   %s\n", in->tokenizer);
  fprintf(out, "world       %d rank%s\n", in->world, in->world > 1 ? "s" : "");
  fprintf(out, "parameters  %zu floats (%s), %s\n", c->n_params, size,
          c->has_moments ? "with AdamW moments" : "no optimizer state");
  fprintf(out, "loader      ");
  for (int r = 0; r < in->world && r < 16; r++) fprintf(out, "%s%lld", r ? " " : "", (long long)in->loader_state[r]);
  fprintf(out, "%s\n", in->world > 16 ? " ..." : "");
  if (!c->single) {
    fprintf(out, "shards:\n");
    for (int s = 0; s < c->n_shards; s++) {
      if (c->n_shards > 32 && s == 16) {
        fprintf(out, "  ... %d more ...\n", c->n_shards - 32);
        s = c->n_shards - 16;
      }
      const bam_rec_shard *sh = &c->shards[s];
      bam_format_bytes(size, sizeof size, (double)sh->file_bytes);
      fprintf(out, "  %s  [%lld, %lld)  %s  crc32c %08x", sh->file, (long long)sh->lo,
              (long long)sh->hi, size, sh->crc32c[0]);
      if (c->has_moments) fprintf(out, " %08x %08x", sh->crc32c[1], sh->crc32c[2]);
      fprintf(out, "\n");
    }
  }
  fprintf(out, "tensors (%d):\n", c->n_tensors);
  fprintf(out, "  %-24s %-22s %12s %12s  %s\n", "name", "shape", "numel", "offset", "shards");
  for (int i = 0; i < c->n_tensors; i++) {
    const bam_tensor_info *t = &c->tensors[i];
    char shape[128], shards[128];
    shape_str(shape, sizeof shape, t->ndim, t->shape);
    tensor_shards(c, i, shards, sizeof shards);
    fprintf(out, "  %-24s %-22s %12zu %12zu  %s\n", t->name, shape, t->numel, t->offset, shards);
  }
  print_block(out, "lineage", in->lineage_text);
  print_block(out, "config", in->config_text);
  bam_ckpt_close(&c);
  return BAM_OK;
}

/* ---- export ---------------------------------------------------------------------------------- */

typedef struct {
  bam_ckpt *c;
  float *scratch; /* the largest tensor */
} export_source;

static bam_status from_checkpoint(void *ctx, int b, const bam_tensor_info *t, const float **data) {
  export_source *x = ctx;
  BAM_CHECK(bam_ckpt_read(x->c, bam_ckpt_buffer_names[b], (bam_range){t->offset, t->offset + t->numel},
                          x->scratch));
  *data = x->scratch;
  return BAM_OK;
}

bam_status bam_ckpt_export(const char *path, const char *out_file, int with_moments) {
  if (!out_file || !out_file[0]) BAM_FAIL(BAM_ERR_ARG, "export: no output file given");
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  bam_status st = BAM_OK;
  export_source src = {c, NULL};
  if (with_moments && !c->has_moments) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: holds no AdamW moments to export", c->path);
    goto done;
  }
  size_t largest = 1;
  for (int i = 0; i < c->n_tensors; i++)
    if (c->tensors[i].numel > largest) largest = c->tensors[i].numel;
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&src.scratch, largest * sizeof(float), "export buffer"), done);
  const bam_ckpt_info *in = &c->info;
  bam_single_meta meta = {.kind = in->kind, .step = in->step, .tokens_seen = in->tokens_seen,
                          .loader_position = in->loader_state[0], .tokenizer = in->tokenizer,
                          .config = in->config_text, .lineage = in->lineage_text ? in->lineage_text : "",
                          .world = in->world, .loader_state = in->loader_state,
                          .rng_state = in->rng_state};
  st = bam_single_write(out_file, &meta, c->tensors, c->n_tensors, c->n_params,
                        with_moments ? 7u : 1u, from_checkpoint, &src);
done:
  bam_free(src.scratch);
  bam_ckpt_close(&c);
  return st;
}
