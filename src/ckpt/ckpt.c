#include "bam/ckpt.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CKPT_FORMAT "bam-checkpoint"
#define CKPT_VERSION 1

/* HDF5 prints its own error stack by default; we report our own one-line messages. */
static void quiet_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

static bam_status write_attr_i64(hid_t obj, const char *name, int64_t v, const char *path) {
  hid_t sp = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(obj, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
  herr_t e = a < 0 ? -1 : H5Awrite(a, H5T_NATIVE_INT64, &v);
  if (a >= 0) H5Aclose(a);
  H5Sclose(sp);
  if (e < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot write attribute '%s'", path, name);
  return BAM_OK;
}

static bam_status write_attr_str(hid_t obj, const char *name, const char *s, const char *path) {
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

static bam_status read_attr_i64(hid_t obj, const char *name, int64_t *v, const char *path) {
  if (H5Aexists(obj, name) <= 0) BAM_FAIL(BAM_ERR_DATA, "%s: attribute '%s' is missing", path, name);
  hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  herr_t e = a < 0 ? -1 : H5Aread(a, H5T_NATIVE_INT64, v);
  if (a >= 0) H5Aclose(a);
  if (e < 0) BAM_FAIL(BAM_ERR_DATA, "%s: attribute '%s' is not an integer", path, name);
  return BAM_OK;
}

/* Reads a fixed- or variable-length string attribute into a malloc'd buffer. */
static bam_status read_attr_str(hid_t obj, const char *name, char **out, const char *path) {
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
  if (d >= 0) H5Dclose(d);
  H5Pclose(dcpl);
  H5Sclose(sp);
  if (e < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot write tensor /%s/%s", path, group, ti->name);
  return BAM_OK;
}

static bam_status write_group(hid_t f, const char *group, const bam_model *m, const float *base,
                              const char *path) {
  hid_t g = H5Gcreate2(f, group, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (g < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot create group /%s", path, group);
  bam_status st = BAM_OK;
  for (int i = 0; i < m->n_tensors && st == BAM_OK; i++)
    st = write_tensor(g, &m->tensors[i], base + m->tensors[i].offset, path, group);
  H5Gclose(g);
  return st;
}

static bam_status fsync_path(const char *path) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot open for fsync: %s", path, strerror(errno));
  int rc = fsync(fd);
  close(fd);
  if (rc != 0) BAM_FAIL(BAM_ERR_IO, "%s: fsync failed: %s", path, strerror(errno));
  return BAM_OK;
}

bam_status bam_ckpt_save(const char *path, const bam_model *m, const float *adam_m,
                         const float *adam_v, const bam_ckpt_meta *meta) {
  quiet_hdf5();
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  hid_t fcpl = H5Pcreate(H5P_FILE_CREATE);
  hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, fcpl, H5P_DEFAULT);
  H5Pclose(fcpl);
  if (f < 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot create checkpoint file", tmp);
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, write_attr_str(f, "format", CKPT_FORMAT, tmp), done);
  BAM_CHECK_GOTO(st, write_attr_i64(f, "version", CKPT_VERSION, tmp), done);
  BAM_CHECK_GOTO(st, write_attr_str(f, "kind", "dense", tmp), done);
  BAM_CHECK_GOTO(st, write_attr_i64(f, "step", meta->step, tmp), done);
  BAM_CHECK_GOTO(st, write_attr_i64(f, "tokens_seen", meta->tokens_seen, tmp), done);
  BAM_CHECK_GOTO(st, write_attr_i64(f, "loader_position", meta->loader_position, tmp), done);
  BAM_CHECK_GOTO(st, write_attr_str(f, "tokenizer", meta->tokenizer, tmp), done);
  BAM_CHECK_GOTO(st, write_attr_str(f, "config", meta->config_text ? meta->config_text : "", tmp), done);
  BAM_CHECK_GOTO(st, write_group(f, "params", m, m->params_mem, tmp), done);
  if (adam_m) BAM_CHECK_GOTO(st, write_group(f, "adam_m", m, adam_m, tmp), done);
  if (adam_v) BAM_CHECK_GOTO(st, write_group(f, "adam_v", m, adam_v, tmp), done);
done:
  if (H5Fclose(f) < 0 && st == BAM_OK)
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot close checkpoint", tmp);
  if (st != BAM_OK) {
    unlink(tmp);
    return st;
  }
  BAM_CHECK(fsync_path(tmp));
  if (rename(tmp, path) != 0)
    BAM_FAIL(BAM_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
  return BAM_OK;
}

static bam_status open_checkpoint(const char *path, hid_t *out) {
  quiet_hdf5();
  if (access(path, R_OK) != 0) BAM_FAIL(BAM_ERR_IO, "%s: no such checkpoint: %s", path, strerror(errno));
  hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) BAM_FAIL(BAM_ERR_DATA, "%s: not an HDF5 file, or damaged", path);
  char *format = NULL;
  bam_status st = read_attr_str(f, "format", &format, path);
  if (st == BAM_OK && strcmp(format, CKPT_FORMAT) != 0)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: format is '%s', not a bam checkpoint",
                       path, format);
  free(format);
  int64_t version = 0;
  if (st == BAM_OK) st = read_attr_i64(f, "version", &version, path);
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
  BAM_CHECK(open_checkpoint(path, &f));
  bam_status st = BAM_OK;
  char *tok = NULL;
  BAM_CHECK_GOTO(st, read_attr_i64(f, "step", &meta->step, path), done);
  BAM_CHECK_GOTO(st, read_attr_i64(f, "tokens_seen", &meta->tokens_seen, path), done);
  BAM_CHECK_GOTO(st, read_attr_i64(f, "loader_position", &meta->loader_position, path), done);
  BAM_CHECK_GOTO(st, read_attr_str(f, "tokenizer", &tok, path), done);
  bam_strlcpy(meta->tokenizer, tok, sizeof meta->tokenizer);
  BAM_CHECK_GOTO(st, read_attr_str(f, "config", &meta->config_text, path), done);
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
  BAM_CHECK(open_checkpoint(path, &f));
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
