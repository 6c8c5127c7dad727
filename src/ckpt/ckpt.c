/* ckpt: single-file model checkpoints in HDF5 (see bam/ckpt.h), and the HDF5 helpers and the
 * single-file writer shared with the sharded checkpoints (internal.h). */
#include "bam/ckpt.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define CKPT_FORMAT "bam-checkpoint"
#define CKPT_VERSION 1

const char *const bam_ckpt_buffer_names[BAM_CKPT_NBUF] = {"params", "adam_m", "adam_v"};

/* ---- HDF5 helpers ---------------------------------------------------------------------- */

void bam_h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

static _Thread_local char h5_reason[256];

static herr_t reason_cb(unsigned n, const H5E_error2_t *e, void *data) {
  (void)data;
  /* Walking upward, entry 0 is the innermost (most specific) failure. */
  if (n == 0 && e->desc && e->desc[0]) bam_strlcpy(h5_reason, e->desc, sizeof h5_reason);
  return 0;
}

const char *bam_h5_reason(void) {
  h5_reason[0] = 0;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, reason_cb, NULL);
  if (!h5_reason[0]) bam_strlcpy(h5_reason, "unknown HDF5 error", sizeof h5_reason);
  return h5_reason;
}

int bam_h5_has_attr(hid_t obj, const char *name) { return H5Aexists(obj, name) > 0; }

hid_t bam_h5_fapl(void) {
  hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
#if H5_VERSION_GE(1, 10, 7)
  H5Pset_file_locking(fapl, 0, 1);
#endif
  return fapl;
}

bam_status bam_h5_write_attr_i64(hid_t obj, const char *name, int64_t v, const char *path) {
  hid_t sp = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(obj, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
  herr_t e = a < 0 ? -1 : H5Awrite(a, H5T_NATIVE_INT64, &v);
  if (a >= 0) H5Aclose(a);
  H5Sclose(sp);
  if (e < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot write attribute '%s'", path, name);
  return BAM_OK;
}

bam_status bam_h5_write_attr_str(hid_t obj, const char *name, const char *s, const char *path) {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, strlen(s) + 1);
  H5Tset_cset(t, H5T_CSET_UTF8);
  hid_t sp = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
  herr_t e = a < 0 ? -1 : H5Awrite(a, t, s);
  if (a >= 0) H5Aclose(a);
  H5Sclose(sp);
  H5Tclose(t);
  if (e < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot write attribute '%s'", path, name);
  return BAM_OK;
}

bam_status bam_h5_read_attr_i64(hid_t obj, const char *name, int64_t *v, const char *path) {
  if (H5Aexists(obj, name) <= 0) BAM_FAIL(BAM_ERR_DATA, "%s: attribute '%s' is missing", path, name);
  hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  herr_t e = a < 0 ? -1 : H5Aread(a, H5T_NATIVE_INT64, v);
  if (a >= 0) H5Aclose(a);
  if (e < 0) BAM_FAIL(BAM_ERR_DATA, "%s: attribute '%s' is not an integer", path, name);
  return BAM_OK;
}

bam_status bam_h5_read_attr_str(hid_t obj, const char *name, char **out, const char *path) {
  *out = NULL;
  if (H5Aexists(obj, name) <= 0) BAM_FAIL(BAM_ERR_DATA, "%s: attribute '%s' is missing", path, name);
  hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  hid_t t = a < 0 ? -1 : H5Aget_type(a);
  bam_status st = BAM_OK;
  if (t < 0 || H5Tget_class(t) != H5T_STRING) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: attribute '%s' is not a string", path, name);
  } else if (H5Tis_variable_str(t) > 0) {
    char *v = NULL;
    hid_t mt = H5Tcopy(H5T_C_S1);
    H5Tset_size(mt, H5T_VARIABLE);
    H5Tset_cset(mt, H5Tget_cset(t)); /* HDF5 will not convert between ASCII and UTF-8 */
    if (H5Aread(a, mt, &v) < 0 || !v)
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: cannot read attribute '%s'", path, name);
    else {
      *out = strdup(v);
      H5free_memory(v);
      if (!*out) st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "%s: out of memory", path);
    }
    H5Tclose(mt);
  } else {
    size_t n = H5Tget_size(t);
    char *v = calloc(n + 1, 1);
    hid_t mt = H5Tcopy(H5T_C_S1);
    H5Tset_size(mt, n + 1);
    H5Tset_cset(mt, H5Tget_cset(t));
    if (!v || H5Aread(a, mt, v) < 0) {
      free(v);
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: cannot read attribute '%s'", path, name);
    } else
      *out = v;
    H5Tclose(mt);
  }
  if (t >= 0) H5Tclose(t);
  if (a >= 0) H5Aclose(a);
  return st;
}

/* ---- the single-file writer -------------------------------------------------------------- */

static bam_status write_tensor(hid_t grp, const bam_tensor_info *ti, const float *data,
                               const char *path, const char *group) {
  hsize_t dims[BAM_MAX_DIMS], chunk[BAM_MAX_DIMS];
  size_t chunk_elems = 1;
  for (int i = 0; i < ti->ndim; i++) dims[i] = (hsize_t)ti->shape[i];
  /* Chunks of at most ~1M floats, split along the leading dimensions. */
  for (int i = ti->ndim - 1; i >= 0; i--) {
    hsize_t c = dims[i];
    while (chunk_elems * c > (1u << 20) && c > 1) c = (c + 1) / 2;
    chunk[i] = c;
    chunk_elems *= c;
  }
  hid_t sp = H5Screate_simple(ti->ndim, dims, NULL);
  hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_chunk(dcpl, ti->ndim, chunk);
  H5Pset_fletcher32(dcpl);
  H5Pset_obj_track_times(dcpl, 0);
  hid_t d = H5Dcreate2(grp, ti->name, H5T_IEEE_F32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  herr_t e = d < 0 ? -1 : H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
  H5Pclose(dcpl);
  H5Sclose(sp);
  /* Where the tensor sits in the flat buffers: lets a reader assemble flat ranges. */
  bam_status st = BAM_OK;
  if (e >= 0) st = bam_h5_write_attr_i64(d, "offset", (int64_t)ti->offset, path);
  if (e >= 0 && st == BAM_OK) st = bam_h5_write_attr_i64(d, "decay", ti->decay, path);
  if (d >= 0) H5Dclose(d);
  if (e < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot write tensor /%s/%s", path, group, ti->name);
  return st;
}

static bam_status write_i64_dataset(hid_t f, const char *name, int rank, const hsize_t *dims,
                                    hid_t file_type, hid_t mem_type, const void *data,
                                    const char *path) {
  hid_t sp = H5Screate_simple(rank, dims, NULL);
  hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_obj_track_times(dcpl, 0);
  hid_t d = H5Dcreate2(f, name, file_type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  herr_t e = d < 0 ? -1 : H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
  if (d >= 0) H5Dclose(d);
  H5Pclose(dcpl);
  H5Sclose(sp);
  if (e < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot write dataset '%s'", path, name);
  return BAM_OK;
}

bam_status bam_single_write(const char *path, const bam_single_meta *meta,
                            const bam_tensor_info *tensors, int n_tensors, size_t n_params,
                            unsigned buffers, bam_tensor_source src, void *ctx) {
  bam_h5_quiet();
  char tmp[4096];
  if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", path);
  hid_t fcpl = H5Pcreate(H5P_FILE_CREATE);
  H5Pset_obj_track_times(fcpl, 0);
  hid_t fapl = bam_h5_fapl();
  hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, fcpl, fapl);
  H5Pclose(fcpl);
  H5Pclose(fapl);
  if (f < 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot create checkpoint file (%s)", tmp, bam_h5_reason());
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "format", CKPT_FORMAT, tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "version", CKPT_VERSION, tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "kind", meta->kind, tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "step", meta->step, tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "tokens_seen", meta->tokens_seen, tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "loader_position", meta->loader_position, tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "tokenizer", meta->tokenizer, tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "config", meta->config ? meta->config : "", tmp), done);
  BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "n_params", (int64_t)n_params, tmp), done);
  if (meta->lineage)
    BAM_CHECK_GOTO(st, bam_h5_write_attr_str(f, "lineage", meta->lineage, tmp), done);
  if (meta->world > 0) {
    BAM_CHECK_GOTO(st, bam_h5_write_attr_i64(f, "world", meta->world, tmp), done);
    hsize_t d1[1] = {(hsize_t)meta->world}, d2[2] = {(hsize_t)meta->world, 4};
    BAM_CHECK_GOTO(st, write_i64_dataset(f, "loader_state", 1, d1, H5T_STD_I64LE, H5T_NATIVE_INT64,
                                         meta->loader_state, tmp), done);
    BAM_CHECK_GOTO(st, write_i64_dataset(f, "rng_state", 2, d2, H5T_STD_U64LE, H5T_NATIVE_UINT64,
                                         meta->rng_state, tmp), done);
  }
  for (int b = 0; b < BAM_CKPT_NBUF && st == BAM_OK; b++) {
    if (!(buffers & (1u << b))) continue;
    const char *group = bam_ckpt_buffer_names[b];
    hid_t g = H5Gcreate2(f, group, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) {
      st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot create group /%s", tmp, group);
      break;
    }
    for (int i = 0; i < n_tensors && st == BAM_OK; i++) {
      const float *data = NULL;
      st = src(ctx, b, &tensors[i], &data);
      if (st == BAM_OK) st = write_tensor(g, &tensors[i], data, tmp, group);
    }
    H5Gclose(g);
  }
done:
  if (H5Fclose(f) < 0 && st == BAM_OK)
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot close checkpoint (%s)", tmp,
                       bam_h5_reason());
  if (st != BAM_OK) {
    unlink(tmp);
    return st;
  }
  BAM_CHECK(bam_fsync_path(tmp));
  if (rename(tmp, path) != 0)
    BAM_FAIL(BAM_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
  return bam_fsync_parent(path);
}

/* ---- bam_ckpt_save / bam_ckpt_read_meta / bam_ckpt_load ----------------------------------- */

typedef struct {
  const float *base[BAM_CKPT_NBUF];
} model_source;

static bam_status from_memory(void *ctx, int b, const bam_tensor_info *t, const float **data) {
  *data = ((model_source *)ctx)->base[b] + t->offset;
  return BAM_OK;
}

bam_status bam_ckpt_save(const char *path, const bam_model *m, const float *adam_m,
                         const float *adam_v, const bam_ckpt_meta *meta) {
  model_source src = {{m->params_mem, adam_m, adam_v}};
  bam_single_meta sm = {.kind = "dense", .step = meta->step, .tokens_seen = meta->tokens_seen,
                        .loader_position = meta->loader_position, .tokenizer = meta->tokenizer,
                        .config = meta->config_text};
  return bam_single_write(path, &sm, m->tensors, m->n_tensors, m->n_params,
                          1u | (adam_m ? 2u : 0u) | (adam_v ? 4u : 0u),
                          from_memory, &src);
}

bam_status bam_h5_open_single(const char *path, hid_t *out) {
  bam_h5_quiet();
  if (access(path, R_OK) != 0) BAM_FAIL(BAM_ERR_IO, "%s: no such checkpoint: %s", path, strerror(errno));
  hid_t fapl = bam_h5_fapl();
  hid_t f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
  H5Pclose(fapl);
  if (f < 0) BAM_FAIL(BAM_ERR_DATA, "%s: not an HDF5 file, or damaged", path);
  char *format = NULL;
  bam_status st = bam_h5_read_attr_str(f, "format", &format, path);
  if (st == BAM_OK && strcmp(format, CKPT_FORMAT) != 0)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: format is '%s', not a bam checkpoint",
                       path, format);
  free(format);
  int64_t version = 0;
  if (st == BAM_OK) st = bam_h5_read_attr_i64(f, "version", &version, path);
  if (st == BAM_OK && version != CKPT_VERSION)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: checkpoint version %lld, this build reads version %d", path,
                       (long long)version, CKPT_VERSION);
  if (st != BAM_OK) {
    H5Fclose(f);
    return st;
  }
  *out = f;
  return BAM_OK;
}

bam_status bam_ckpt_read_meta(const char *path, bam_ckpt_meta *meta) {
  memset(meta, 0, sizeof *meta);
  hid_t f;
  BAM_CHECK(bam_h5_open_single(path, &f));
  bam_status st = BAM_OK;
  char *tok = NULL;
  BAM_CHECK_GOTO(st, bam_h5_read_attr_i64(f, "step", &meta->step, path), done);
  BAM_CHECK_GOTO(st, bam_h5_read_attr_i64(f, "tokens_seen", &meta->tokens_seen, path), done);
  BAM_CHECK_GOTO(st, bam_h5_read_attr_i64(f, "loader_position", &meta->loader_position, path), done);
  BAM_CHECK_GOTO(st, bam_h5_read_attr_str(f, "tokenizer", &tok, path), done);
  bam_strlcpy(meta->tokenizer, tok, sizeof meta->tokenizer);
  BAM_CHECK_GOTO(st, bam_h5_read_attr_str(f, "config", &meta->config_text, path), done);
done:
  free(tok);
  H5Fclose(f);
  return st;
}

void bam_ckpt_meta_free(bam_ckpt_meta *meta) {
  free(meta->config_text);
  meta->config_text = NULL;
}

static bam_status read_tensor(hid_t f, const char *group, const bam_tensor_info *ti, float *dst,
                              const char *path) {
  char name[256];
  snprintf(name, sizeof name, "/%s/%s", group, ti->name);
  if (H5Lexists(f, group, H5P_DEFAULT) <= 0 || H5Lexists(f, name, H5P_DEFAULT) <= 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: tensor %s is missing", path, name);
  hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
  if (d < 0) BAM_FAIL(BAM_ERR_DATA, "%s: cannot open tensor %s", path, name);
  hid_t sp = H5Dget_space(d);
  int nd = H5Sget_simple_extent_ndims(sp);
  hsize_t dims[8] = {0};
  bam_status st = BAM_OK;
  if (nd != ti->ndim) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: tensor %s has %d dimensions, expected %d",
                       path, name, nd, ti->ndim);
  } else {
    H5Sget_simple_extent_dims(sp, dims, NULL);
    for (int i = 0; i < nd && st == BAM_OK; i++)
      if ((int64_t)dims[i] != ti->shape[i])
        st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                           "%s: tensor %s has dimension %d of size %llu, the model expects %lld "
                           "(a checkpoint of another model shape?)",
                           path, name, i, (unsigned long long)dims[i], (long long)ti->shape[i]);
  }
  if (st == BAM_OK && H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, dst) < 0)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: tensor %s cannot be read (damaged: checksum or truncation)", path, name);
  H5Sclose(sp);
  H5Dclose(d);
  return st;
}

bam_status bam_ckpt_load(const char *path, bam_model *m, float *adam_m, float *adam_v) {
  hid_t f;
  BAM_CHECK(bam_h5_open_single(path, &f));
  bam_status st = BAM_OK;
  for (int i = 0; i < m->n_tensors && st == BAM_OK; i++)
    st = read_tensor(f, "params", &m->tensors[i], m->params_mem + m->tensors[i].offset, path);
  int has_moments = H5Lexists(f, "adam_m", H5P_DEFAULT) > 0;
  for (int i = 0; i < m->n_tensors && st == BAM_OK && has_moments && adam_m && adam_v; i++) {
    st = read_tensor(f, "adam_m", &m->tensors[i], adam_m + m->tensors[i].offset, path);
    if (st == BAM_OK)
      st = read_tensor(f, "adam_v", &m->tensors[i], adam_v + m->tensors[i].offset, path);
  }
  H5Fclose(f);
  for (int t = 0; t < m->n_tensors && st == BAM_OK; t++) {
    const float *p = m->params_mem + m->tensors[t].offset;
    for (size_t i = 0; i < m->tensors[t].numel; i++)
      if (!isfinite(p[i]))
        BAM_FAIL(BAM_ERR_DATA, "%s: tensor /params/%s holds a non-finite value at index %zu",
                 path, m->tensors[t].name, i);
  }
  return st;
}
