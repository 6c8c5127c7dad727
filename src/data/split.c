/* Reading one tokenized split from <data_dir>/tokens/<domain>.h5 (format in bam/data.h):
 * opened with its checks and read in hyperslabs (the training loader's windows), or loaded
 * whole, which is an open plus one read of every token.
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

/* ---- the split: open (checks, handles kept), read (hyperslabs), load (open + read all) ---- */

/* What an open split keeps between reads. The file's dataspace is kept too and reselected by
 * every read, so a read allocates nothing of ours. */
struct bam_split_stream {
  hid_t file, dset, space;
  char path[PATH_CAP];
  char dname[BAM_NAME_MAX + 2]; /* "/train" */
};

/* HDF5 prints its error stack by default; ours are single messages naming the file, so the
 * printing is off while we call HDF5 and restored after. */
typedef struct {
  H5E_auto2_t func;
  void *data;
} h5_quiet;

static h5_quiet quiet_begin(void) {
  h5_quiet q;
  H5Eget_auto2(H5E_DEFAULT, &q.func, &q.data);
  H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
  return q;
}

static void quiet_end(h5_quiet q) { H5Eset_auto2(H5E_DEFAULT, q.func, q.data); }

static void stream_close(struct bam_split_stream *h) {
  if (!h) return;
  if (h->space >= 0) H5Sclose(h->space);
  if (h->dset >= 0) H5Dclose(h->dset);
  if (h->file >= 0) H5Fclose(h->file);
  free(h);
}

/* Open the 1-D integer dataset h->dname, keep it and its dataspace in h, and read its length
 * and attributes into out (no tokens). */
static bam_status open_dataset(bam_split *out, struct bam_split_stream *h) {
  const char *path = h->path, *dname = h->dname;
  char where[BAM_NAME_MAX + 8];
  snprintf(where, sizeof where, " of %s", dname);
  htri_t exists = H5Lexists(h->file, dname, H5P_DEFAULT);
  if (exists < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot look up dataset '%s'", path, dname);
  if (exists == 0) BAM_FAIL(BAM_ERR_DATA, "%s: no dataset '%s'", path, dname);
  h->dset = H5Dopen2(h->file, dname, H5P_DEFAULT);
  if (h->dset < 0) BAM_FAIL(BAM_ERR_HDF5, "%s: cannot open dataset '%s'", path, dname);
  hid_t type = H5Dget_type(h->dset);
  h->space = H5Dget_space(h->dset);
  H5T_class_t cls = type >= 0 ? H5Tget_class(type) : H5T_NO_CLASS;
  if (type >= 0) H5Tclose(type);
  if (type < 0 || h->space < 0)
    BAM_FAIL(BAM_ERR_HDF5, "%s: cannot inspect dataset '%s'", path, dname);
  if (cls != H5T_INTEGER) BAM_FAIL(BAM_ERR_DATA, "%s: dataset '%s' does not hold integers", path,
                                   dname);
  int rank = H5Sget_simple_extent_ndims(h->space);
  hsize_t dims[1] = {0};
  if (rank != 1 || H5Sget_simple_extent_dims(h->space, dims, NULL) != 1)
    BAM_FAIL(BAM_ERR_DATA, "%s: dataset '%s' has rank %d, expected 1", path, dname, rank);
  if (dims[0] > (hsize_t)INT64_MAX / sizeof(int32_t))
    BAM_FAIL(BAM_ERR_DATA, "%s: dataset '%s' has %llu tokens, too many", path, dname,
             (unsigned long long)dims[0]);
  out->n_tokens = (int64_t)dims[0];
  BAM_CHECK(attr_int(h->dset, path, "text_bytes", where, &out->text_bytes));
  BAM_CHECK(attr_int(h->dset, path, "n_docs", where, &out->n_docs));
  if (out->text_bytes < 0 || out->n_docs < 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: attributes text_bytes and n_docs of %s must not be negative",
             path, dname);
  return BAM_OK;
}

/* The file's attributes, checked against the domain and the expected vocabulary. */
static bam_status file_attrs(bam_split *out, hid_t file, const char *path, const char *domain,
                             int expect_vocab) {
  int64_t vocab = 0, eos = 0;
  BAM_CHECK(attr_str(file, path, "domain", out->domain, sizeof out->domain));
  BAM_CHECK(attr_str(file, path, "tokenizer", out->tokenizer, sizeof out->tokenizer));
  BAM_CHECK(attr_int(file, path, "vocab_size", "", &vocab));
  BAM_CHECK(attr_int(file, path, "eos_id", "", &eos));
  if (strcmp(out->domain, domain) != 0)
    BAM_FAIL(BAM_ERR_DATA, "%s: attribute 'domain' is '%s' but the file is for domain '%s'", path,
             out->domain, domain);
  if (vocab <= 0 || vocab > INT32_MAX)
    BAM_FAIL(BAM_ERR_DATA, "%s: attribute 'vocab_size' is %" PRId64 ", not a positive int", path,
             vocab);
  if (expect_vocab > 0 && vocab != expect_vocab)
    BAM_FAIL(BAM_ERR_DATA,
             "%s: attribute 'vocab_size' is %" PRId64 " but the config's model.vocab_size is %d",
             path, vocab, expect_vocab);
  if (eos < 0 || eos >= vocab)
    BAM_FAIL(BAM_ERR_DATA, "%s: attribute 'eos_id' is %" PRId64 ", outside vocab_size %" PRId64,
             path, eos, vocab);
  out->vocab_size = (int)vocab;
  out->eos_id = (int)eos;
  return BAM_OK;
}

bam_status bam_split_open(bam_split *out, const char *data_dir, const char *domain,
                          const char *split, int expect_vocab) {
  memset(out, 0, sizeof *out);
  if (!domain[0] || strchr(domain, '/') || strlen(domain) >= BAM_NAME_MAX)
    BAM_FAIL(BAM_ERR_ARG, "bad domain name '%s'", domain);
  if (!split[0] || strchr(split, '/') || strlen(split) >= BAM_NAME_MAX)
    BAM_FAIL(BAM_ERR_ARG, "bad split name '%s'", split);
  struct bam_split_stream *h = calloc(1, sizeof *h);
  if (!h) BAM_FAIL(BAM_ERR_NOMEM, "%s/tokens/%s.h5: out of memory", data_dir, domain);
  h->file = h->dset = h->space = -1;
  snprintf(h->dname, sizeof h->dname, "/%s", split);
  if (snprintf(h->path, sizeof h->path, "%s/tokens/%s.h5", data_dir, domain) >=
      (int)sizeof h->path) {
    free(h);
    BAM_FAIL(BAM_ERR_ARG, "%s: data directory path too long", data_dir);
  }
  const char *path = h->path;
  bam_status st = BAM_OK;
  struct stat sb;
  if (stat(path, &sb) != 0) {
    st = errno == ENOENT
             ? bam_error_set(BAM_ERR_IO, __FILE__, __LINE__,
                             "%s: no such file (run data/prepare.sh)", path)
             : bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "%s: %s", path, strerror(errno));
    free(h);
    return st;
  }
  h5_quiet q = quiet_begin();
  h->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  if (h->file < 0) {
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__, "%s: not a readable HDF5 file", path);
    goto done;
  }
  BAM_CHECK_GOTO(st, file_attrs(out, h->file, path, domain, expect_vocab), done);
  BAM_CHECK_GOTO(st, open_dataset(out, h), done);
  out->stream = h;
done:
  if (st != BAM_OK) {
    stream_close(h);
    memset(out, 0, sizeof *out);
  }
  quiet_end(q);
  return st;
}

/* Every token of dst[0, count) in [0, vocab): a branch-free min/max pass, then the first
 * offender if any, named by its index in the dataset. */
static bam_status check_range(const bam_split *s, int64_t start, int64_t count,
                              const int32_t *dst) {
  int32_t lo = 0, hi = 0;
  for (int64_t i = 0; i < count; i++) {
    lo = dst[i] < lo ? dst[i] : lo;
    hi = dst[i] > hi ? dst[i] : hi;
  }
  if (lo >= 0 && hi < s->vocab_size) return BAM_OK;
  for (int64_t i = 0; i < count; i++)
    if (dst[i] < 0 || dst[i] >= s->vocab_size)
      BAM_FAIL(BAM_ERR_DATA, "%s: token %d at index %" PRId64 " of %s is out of range for "
               "vocab_size %d", s->stream->path, (int)dst[i], start + i, s->stream->dname,
               s->vocab_size);
  return BAM_ERR_INTERNAL;
}

bam_status bam_split_read(const bam_split *s, int64_t start, int64_t count, int32_t *dst) {
  const struct bam_split_stream *h = s->stream;
  if (!h)
    BAM_FAIL(BAM_ERR_ARG, "split of domain '%s' is not open (bam_split_open) for reading",
             s->domain);
  if (start < 0 || count < 0 || start > s->n_tokens || count > s->n_tokens - start)
    BAM_FAIL(BAM_ERR_ARG, "%s: tokens [%" PRId64 ", %" PRId64 ") are outside dataset '%s' of %"
             PRId64 " tokens", h->path, start, start + count, h->dname, s->n_tokens);
  if (count == 0) return BAM_OK;
  h5_quiet q = quiet_begin();
  bam_status st = BAM_OK;
  hsize_t off[1] = {(hsize_t)start}, n[1] = {(hsize_t)count};
  hid_t mem = H5Screate_simple(1, n, NULL);
  if (mem < 0 || H5Sselect_hyperslab(h->space, H5S_SELECT_SET, off, NULL, n, NULL) < 0 ||
      H5Dread(h->dset, H5T_NATIVE_INT32, mem, h->space, H5P_DEFAULT, dst) < 0)
    st = bam_error_set(BAM_ERR_HDF5, __FILE__, __LINE__,
                       "%s: cannot read tokens [%" PRId64 ", %" PRId64 ") of dataset '%s'",
                       h->path, start, start + count, h->dname);
  if (mem >= 0) H5Sclose(mem);
  quiet_end(q);
  if (st != BAM_OK) return st;
  return check_range(s, start, count, dst);
}

bam_status bam_split_load(bam_split *out, const char *data_dir, const char *domain,
                          const char *split, int expect_vocab) {
  BAM_CHECK(bam_split_open(out, data_dir, domain, split, expect_vocab));
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&out->tokens,
                                       (size_t)out->n_tokens * sizeof(int32_t),
                                       out->stream->path),
                 done);
  BAM_CHECK_GOTO(st, bam_split_read(out, 0, out->n_tokens, out->tokens), done);
done:
  /* the tokens are in memory: the file is not needed any more */
  if (out->stream) {
    h5_quiet q = quiet_begin();
    stream_close(out->stream);
    quiet_end(q);
    out->stream = NULL;
  }
  if (st != BAM_OK) bam_split_free(out);
  return st;
}

void bam_split_free(bam_split *s) {
  if (s->stream) {
    h5_quiet q = quiet_begin();
    stream_close(s->stream);
    quiet_end(q);
  }
  bam_free(s->tokens);
  memset(s, 0, sizeof *s);
}
