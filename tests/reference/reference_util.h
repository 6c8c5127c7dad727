/* Helpers shared by the reference tests (dense and mixture): comparing a float32 result
 * with a float64 reference, and reading the reference files. */
#ifndef BAM_REFERENCE_UTIL_H
#define BAM_REFERENCE_UTIL_H

#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "bam/model.h"

typedef struct {
  double max_abs, max_ref, rel_norm, max_scaled; /* max_scaled: max |c-t| / (atol + rtol|t|) */
} cmp_stats;

static cmp_stats compare(const float *c, const double *t, size_t n, double atol, double rtol) {
  cmp_stats s = {0, 0, 0, 0};
  double dd = 0, tt = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs((double)c[i] - t[i]);
    if (!(d <= s.max_abs)) s.max_abs = d; /* NaN propagates */
    if (fabs(t[i]) > s.max_ref) s.max_ref = fabs(t[i]);
    double lim = atol + rtol * fabs(t[i]);
    if (lim > 0 && !(d / lim <= s.max_scaled)) s.max_scaled = d / lim;
    dd += d * d;
    tt += t[i] * t[i];
  }
  s.rel_norm = tt > 0 ? sqrt(dd / tt) : sqrt(dd);
  return s;
}

static int h5_attr(hid_t f, const char *name, hid_t type, void *out) {
  if (H5Aexists(f, name) <= 0) {
    fprintf(stderr, "reference file has no attribute '%s'\n", name);
    return -1;
  }
  hid_t a = H5Aopen(f, name, H5P_DEFAULT);
  herr_t e = a < 0 ? -1 : H5Aread(a, type, out);
  if (a >= 0) H5Aclose(a);
  if (e < 0) fprintf(stderr, "cannot read attribute '%s'\n", name);
  return e < 0 ? -1 : 0;
}

static void shape_str(char *buf, size_t n, const bam_tensor_info *ti) {
  int k = 0;
  buf[0] = 0;
  for (int i = 0; i < ti->ndim && k >= 0 && (size_t)k < n; i++)
    k += snprintf(buf + k, n - (size_t)k, "%s%lld", i ? "x" : "", (long long)ti->shape[i]);
}

static double *dalloc(size_t n) { return calloc(n ? n : 1, sizeof(double)); }

#endif
