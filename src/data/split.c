/* Reading one tokenized split from <data_dir>/tokens/<domain>.h5 (format in bam/data.h).
 *
 * HDF5's own error stack printing is silenced while we read (and restored afterwards): every
 * failure becomes one message naming the file and the dataset or attribute at fault. */
#include "bam/data.h"

#include <errno.h>
#include <hdf5.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PATH_CAP 4096

/* ---- HDF5 helpers; `what` names the object in messages ("attribute 'x' of /train") ---- */

static bam_status attr_open(hid_t obj, const char *path, const char *name, const char *what,
                            hid_t *attr, hssize_t *npoints) {
  htri_t exists = H5Aexists(obj, name);
  if (exists < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot look up %s", path, what);
  if (exists == 0) BAM_FAIL(BAM_ERR_DATA, "%s: %s is missing", path, what);
  *attr = H5Aopen(obj, name, H5P_DEFAULT);
  if (*attr < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot open %s", path, what);
  hid_t space = H5Aget_space(*attr);
  *npoints = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
  if (space >= 0) H5Sclose(space);
  if (*npoints != 1) {
    H5Aclose(*attr);
    BAM_FAIL(BAM_ERR_DATA, "%s: %s should hold one value, not %" PRId64, path, what,
             (int64_t)*npoints);
  }
  return BAM_OK;
}

/* An integer attribute of any integer type, read as int64. */
static bam_status attr_int(hid_t obj, const char *path, const char *name, const char *where,
                           int64_t *out) {
  char what[128];
  snprintf(what, sizeof what, "attribute '%s'%s", name, where);
  hid_t attr;
  hssize_t np;
  BAM_CHECK(attr_open(obj, path, name, what, &attr, &np));
  hid_t type = H5Aget_type(attr);
  H5T_class_t cls = type >= 0 ? H5Tget_class(type) : H5T_NO_CLASS;
  if (type >= 0) H5Tclose(type);
  herr_t rc = cls == H5T_INTEGER ? H5Aread(attr, H5T_NATIVE_INT64, out) : -1;
  H5Aclose(attr);
  if (cls != H5T_INTEGER) BAM_FAIL(BAM_ERR_DATA, "%s: %s is not an integer", path, what);
  if (rc < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot read %s", path, what);
  return BAM_OK;
}

/* A string attribute, variable-length (h5py's str) or fixed-length (numpy bytes). */
static bam_status attr_str(hid_t obj, const char *path, const char *name, char *out,
                           size_t cap) {
  char what[128];
  snprintf(what, sizeof what, "attribute '%s'", name);
  hid_t attr;
  hssize_t np;
  BAM_CHECK(attr_open(obj, path, name, what, &attr, &np));
  bam_status st = BAM_OK;
  hid_t ftype = H5Aget_type(attr), mtype = -1;
  char *vstr = NULL, *fbuf = NULL;
  if (ftype < 0 || H5Tget_class(ftype) != H5T_STRING) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: %s is not a string", path, what);
    goto done;
  }
  mtype = H5Tcopy(ftype); /* same size, padding and character set, in memory */
  htri_t vlen = H5Tis_variable_str(ftype);
  const char *value = NULL;
  if (mtype < 0 || vlen < 0) {
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot inspect %s", path, what);
    goto done;
  }
  if (vlen) {
    if (H5Aread(attr, mtype, &vstr) < 0 || !vstr) {
      st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot read %s", path, what);
      goto done;
    }
    value = vstr;
  } else {
    size_t size = H5Tget_size(ftype);
    fbuf = calloc(size + 1, 1);
    if (!fbuf || H5Aread(attr, mtype, fbuf) < 0) {
      st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot read %s", path, what);
      goto done;
    }
    /* space-padded strings (Fortran style) lose their padding */
    for (size_t n = strlen(fbuf); n > 0 && fbuf[n - 1] == ' '; n--) fbuf[n - 1] = 0;
    value = fbuf;
  }
  if (strlen(value) >= cap)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: %s is longer than %zu bytes",
                       path, what, cap - 1);
  else
    bam_strlcpy(out, value, cap);
done:
  if (vstr) H5free_memory(vstr);
  free(fbuf);
  if (mtype >= 0) H5Tclose(mtype);
  if (ftype >= 0) H5Tclose(ftype);
  H5Aclose(attr);
  return st;
}

/* Read the 1-D integer dataset /<split> into out->tokens with its attributes. */
static bam_status read_tokens(bam_split *out, hid_t file, const char *path, const char *split) {
  char dname[BAM_NAME_MAX + 2], where[BAM_NAME_MAX + 8];
  snprintf(dname, sizeof dname, "/%s", split);
  snprintf(where, sizeof where, " of %s", dname);
  htri_t exists = H5Lexists(file, dname, H5P_DEFAULT);
  if (exists < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot look up dataset '%s'", path, dname);
  if (exists == 0) BAM_FAIL(BAM_ERR_DATA, "%s: no dataset '%s'", path, dname);
  hid_t dset = H5Dopen2(file, dname, H5P_DEFAULT);
  if (dset < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot open dataset '%s'", path, dname);
  bam_status st = BAM_OK;
  hid_t type = H5Dget_type(dset), space = H5Dget_space(dset);
  if (type < 0 || space < 0) {
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot inspect dataset '%s'", path,
                       dname);
    goto done;
  }
  if (H5Tget_class(type) != H5T_INTEGER) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: dataset '%s' does not hold integers", path, dname);
    goto done;
  }
  int rank = H5Sget_simple_extent_ndims(space);
  hsize_t dims[1] = {0};
  if (rank != 1 || H5Sget_simple_extent_dims(space, dims, NULL) != 1) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: dataset '%s' has rank %d, expected 1", path, dname, rank);
    goto done;
  }
  out->n_tokens = (int64_t)dims[0];
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&out->tokens,
                                       (size_t)dims[0] * sizeof(int32_t), path),
                 done);
  if (dims[0] > 0 &&
      H5Dread(dset, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, out->tokens) < 0) {
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: cannot read dataset '%s'", path,
                       dname);
    goto done;
  }
  BAM_CHECK_GOTO(st, attr_int(dset, path, "text_bytes", where, &out->text_bytes), done);
  BAM_CHECK_GOTO(st, attr_int(dset, path, "n_docs", where, &out->n_docs), done);
  if (out->text_bytes < 0 || out->n_docs < 0)
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: attributes text_bytes and n_docs of %s must not be negative", path,
                       dname);
done:
  if (space >= 0) H5Sclose(space);
  if (type >= 0) H5Tclose(type);
  H5Dclose(dset);
  return st;
}

/* Every token in [0, vocab): a branch-free min/max pass, then the first offender if any. */
static bam_status check_range(const bam_split *s, const char *path, const char *split) {
  int32_t lo = 0, hi = 0;
  const int32_t *tok = s->tokens;
  for (int64_t i = 0; i < s->n_tokens; i++) {
    lo = tok[i] < lo ? tok[i] : lo;
    hi = tok[i] > hi ? tok[i] : hi;
  }
  if (lo >= 0 && hi < s->vocab_size) return BAM_OK;
  for (int64_t i = 0; i < s->n_tokens; i++)
    if (tok[i] < 0 || tok[i] >= s->vocab_size)
      BAM_FAIL(BAM_ERR_DATA, "%s: token %d at index %" PRId64 " of /%s is out of range for "
               "vocab_size %d", path, (int)tok[i], i, split, s->vocab_size);
  return BAM_ERR_INTERNAL;
}

bam_status bam_split_load(bam_split *out, const char *data_dir, const char *domain,
                          const char *split, int expect_vocab) {
  memset(out, 0, sizeof *out);
  if (!domain[0] || strchr(domain, '/') || strlen(domain) >= BAM_NAME_MAX)
    BAM_FAIL(BAM_ERR_ARG, "bad domain name '%s'", domain);
  if (!split[0] || strchr(split, '/') || strlen(split) >= BAM_NAME_MAX)
    BAM_FAIL(BAM_ERR_ARG, "bad split name '%s'", split);
  char path[PATH_CAP];
  if (snprintf(path, sizeof path, "%s/tokens/%s.h5", data_dir, domain) >= (int)sizeof path)
    BAM_FAIL(BAM_ERR_ARG, "%s: data directory path too long", data_dir);
  struct stat sb;
  if (stat(path, &sb) != 0) {
    if (errno == ENOENT) BAM_FAIL(BAM_ERR_IO, "%s: no such file (run data/prepare.sh)", path);
    BAM_FAIL(BAM_ERR_IO, "%s: %s", path, strerror(errno));
  }

  H5E_auto2_t old_func;
  void *old_data;
  H5Eget_auto2(H5E_DEFAULT, &old_func, &old_data);
  H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
  bam_status st = BAM_OK;
  hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  if (file < 0) {
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: not a readable HDF5 file", path);
    goto done;
  }
  int64_t vocab = 0, eos = 0;
  BAM_CHECK_GOTO(st, attr_str(file, path, "domain", out->domain, sizeof out->domain), done);
  BAM_CHECK_GOTO(st, attr_str(file, path, "tokenizer", out->tokenizer, sizeof out->tokenizer),
                 done);
  BAM_CHECK_GOTO(st, attr_int(file, path, "vocab_size", "", &vocab), done);
  BAM_CHECK_GOTO(st, attr_int(file, path, "eos_id", "", &eos), done);
  if (strcmp(out->domain, domain) != 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: attribute 'domain' is '%s' but the file is for domain '%s'", path,
                       out->domain, domain);
    goto done;
  }
  if (vocab <= 0 || vocab > INT32_MAX) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: attribute 'vocab_size' is %" PRId64 ", not a positive int", path,
                       vocab);
    goto done;
  }
  if (expect_vocab > 0 && vocab != expect_vocab) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: attribute 'vocab_size' is %" PRId64
                       " but the config's model.vocab_size is %d",
                       path, vocab, expect_vocab);
    goto done;
  }
  if (eos < 0 || eos >= vocab) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: attribute 'eos_id' is %" PRId64 ", outside vocab_size %" PRId64,
                       path, eos, vocab);
    goto done;
  }
  out->vocab_size = (int)vocab;
  out->eos_id = (int)eos;
  BAM_CHECK_GOTO(st, read_tokens(out, file, path, split), done);
  BAM_CHECK_GOTO(st, check_range(out, path, split), done);
done:
  if (file >= 0) H5Fclose(file);
  H5Eset_auto2(H5E_DEFAULT, old_func, old_data);
  if (st != BAM_OK) bam_split_free(out);
  return st;
}

void bam_split_free(bam_split *s) {
  bam_free(s->tokens);
  memset(s, 0, sizeof *s);
}
