#include <stdlib.h>
#include <string.h>

#include "bam/parallel.h"

/* Bytes of the reduce-scatter's receive buffer (all ranks' pieces of one round): 4 MiB, messages
 * of 4/world MiB, large enough for full bandwidth and small beside any state worth training. */
#define BAM_EXCHANGE_BYTES ((size_t)4 << 20)

struct bam_exchange {
  MPI_Comm comm;
  int rank, world;
  size_t n;
  int *counts, *displs; /* per rank: slice length and start, in floats */
  size_t chunk;         /* floats of each slice moved per round of the reduce-scatter */
  size_t max_len;       /* the longest slice: every rank runs the same number of rounds */
  int *send_counts, *send_displs, *recv_counts, *recv_displs; /* of one round */
  float *recv;          /* world pieces of `chunk` floats of this rank's slice */
  double seconds;
};

static void slice(size_t n, int r, int world, size_t *lo, size_t *hi) {
  /* near-equal shares in units of 16 floats (64-byte boundaries) */
  size_t units = (n + 15) / 16;
  size_t a = units * (size_t)r / (size_t)world * 16, b = units * (size_t)(r + 1) / (size_t)world * 16;
  *lo = a < n ? a : n;
  *hi = b < n ? b : n;
}

bam_status bam_exchange_create(bam_exchange **out, size_t n, MPI_Comm comm) {
  bam_exchange *x = calloc(1, sizeof *x);
  if (!x) BAM_FAIL(BAM_ERR_NOMEM, "cannot allocate the exchange plan");
  x->comm = comm;
  MPI_Comm_rank(comm, &x->rank);
  MPI_Comm_size(comm, &x->world);
  x->n = n;
  if (n / (size_t)x->world > (size_t)1 << 30) {
    int world = x->world;
    free(x);
    BAM_FAIL(BAM_ERR_ARG, "buffer of %zu floats is too large for one exchange over %d ranks", n,
             world);
  }
  x->counts = calloc((size_t)x->world, sizeof(int));
  x->displs = calloc((size_t)x->world, sizeof(int));
  x->send_counts = calloc((size_t)x->world, sizeof(int));
  x->send_displs = calloc((size_t)x->world, sizeof(int));
  x->recv_counts = calloc((size_t)x->world, sizeof(int));
  x->recv_displs = calloc((size_t)x->world, sizeof(int));
  for (int r = 0; x->counts && x->displs && r < x->world; r++) {
    size_t a, b;
    slice(n, r, x->world, &a, &b);
    x->counts[r] = (int)(b - a);
    x->displs[r] = (int)a;
    if (b - a > x->max_len) x->max_len = b - a;
  }
  /* The receive buffer holds every rank's copy of one chunk of this rank's slice, about
   * BAM_EXCHANGE_BYTES in all, not a copy of the whole slice per rank: the exchange then
   * costs no memory beside the gradients. */
  x->chunk = BAM_EXCHANGE_BYTES / sizeof(float) / (size_t)x->world / 16 * 16;
  if (x->chunk < 4096) x->chunk = 4096;
  if (x->chunk > x->max_len) x->chunk = x->max_len;
  bam_status st = BAM_OK;
  if (!x->counts || !x->displs || !x->send_counts || !x->send_displs || !x->recv_counts ||
      !x->recv_displs)
    st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__, "cannot allocate the exchange plan");
  else if (x->world > 1)
    st = bam_alloc_checked((void **)&x->recv, sizeof(float) * x->chunk * (size_t)x->world + 64,
                           "the gradient exchange buffer");
  if (st != BAM_OK) {
    bam_exchange_free(&x);
    return st;
  }
  *out = x;
  return BAM_OK;
}

void bam_exchange_free(bam_exchange **px) {
  bam_exchange *x = *px;
  if (!x) return;
  free(x->counts);
  free(x->displs);
  free(x->send_counts);
  free(x->send_displs);
  free(x->recv_counts);
  free(x->recv_displs);
  bam_free(x->recv);
  free(x);
  *px = NULL;
}

void bam_exchange_range(const bam_exchange *x, int rank, size_t *lo, size_t *hi) {
  slice(x->n, rank, x->world, lo, hi);
}

double bam_exchange_seconds(const bam_exchange *x) { return x->seconds; }

bam_status bam_reduce_scatter_ordered(bam_exchange *x, float *buf) {
  if (x->world == 1) return BAM_OK;
  double t0 = bam_now();
  /* Round k: rank r sends floats [k chunk, (k+1) chunk) of slice j to rank j and receives every
   * rank's copy of those floats of slice r, then sums them in rank order. Every rank runs the
   * same rounds (the longest slice's); a shorter slice sends and receives nothing at the end. */
  const size_t mine = (size_t)x->counts[x->rank];
  for (size_t off = 0; off < x->max_len; off += x->chunk) {
    const size_t len = off >= mine ? 0 : mine - off < x->chunk ? mine - off : x->chunk;
    for (int r = 0; r < x->world; r++) {
      const size_t theirs = (size_t)x->counts[r];
      const size_t l = off >= theirs ? 0 : theirs - off < x->chunk ? theirs - off : x->chunk;
      x->send_counts[r] = (int)l;
      x->send_displs[r] = (int)((size_t)x->displs[r] + (l ? off : 0));
      x->recv_counts[r] = (int)len;
      x->recv_displs[r] = (int)(len * (size_t)r);
    }
    int rc = MPI_Alltoallv(buf, x->send_counts, x->send_displs, MPI_FLOAT, x->recv, x->recv_counts,
                           x->recv_displs, MPI_FLOAT, x->comm);
    if (rc != MPI_SUCCESS)
      BAM_FAIL(BAM_ERR_MPI, "MPI_Alltoallv failed in the gradient reduce-scatter");
    float *dst = buf + x->displs[x->rank] + off;
    const float *src = x->recv;
#pragma omp parallel for schedule(static) if (len >= 16384)
    for (size_t i = 0; i < len; i++) {
      float s = src[i];
      for (int r = 1; r < x->world; r++) s += src[(size_t)r * len + i];
      dst[i] = s;
    }
  }
  x->seconds += bam_now() - t0;
  return BAM_OK;
}

bam_status bam_allgather_slices(bam_exchange *x, float *buf) {
  if (x->world == 1) return BAM_OK;
  double t0 = bam_now();
  int rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, x->counts, x->displs, MPI_FLOAT,
                          x->comm);
  if (rc != MPI_SUCCESS) BAM_FAIL(BAM_ERR_MPI, "MPI_Allgatherv failed in the parameter all-gather");
  x->seconds += bam_now() - t0;
  return BAM_OK;
}

bam_status bam_sum_ordered(double *value, MPI_Comm comm) {
  int world;
  MPI_Comm_size(comm, &world);
  if (world == 1) return BAM_OK;
  double local = *value, stack[64], *all = world <= 64 ? stack : malloc(sizeof(double) * world);
  if (!all) BAM_FAIL(BAM_ERR_NOMEM, "cannot allocate %d doubles", world);
  int rc = MPI_Allgather(&local, 1, MPI_DOUBLE, all, 1, MPI_DOUBLE, comm);
  double s = all[0];
  for (int r = 1; r < world; r++) s += all[r];
  if (all != stack) free(all);
  *value = s;
  return rc == MPI_SUCCESS ? BAM_OK
                           : bam_error_set(BAM_ERR_MPI, __FILE__, __LINE__,
                                           "MPI_Allgather failed in an ordered sum");
}
