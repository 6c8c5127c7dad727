/* Checkpoints of a state held in scattered pieces (an expert-sharded mixture): each rank's
 * pieces are moved to the contiguous ranges of bam_partition, then written as usual. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "bam/shard.h"
#include "internal.h"

static int cmp_piece(const void *a, const void *b) {
  const size_t x = ((const bam_ckpt_piece *)a)->global, y = ((const bam_ckpt_piece *)b)->global;
  return (x > y) - (x < y);
}

/* Every rank learns whether any rank failed; a failing rank keeps its own message. */
static bam_status agree(bam_status st, MPI_Comm comm, const char *dir) {
  int bad = st != BAM_OK, any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, comm);
  if (any && !bad)
    return bam_error_set(BAM_ERR_MPI, __FILE__, __LINE__,
                         "another rank failed while preparing the checkpoint in %s", dir);
  return st;
}

/* The segments of the sorted pieces that fall in [lo, hi), by destination: header pairs
 * (global, length) and the data of each buffer, in global order. */
typedef struct {
  int *cnt, *dsp, *hcnt, *hdsp; /* per rank: floats, their displacement; header int64s */
  int64_t *hdr;
  float *data[BAM_CKPT_NBUF];
} plan;

bam_status bam_ckpt_save_pieces(const char *ckpt_dir, const bam_ckpt_info *info,
                                const bam_tensor_info *tensors, int n_tensors, size_t n_params,
                                const bam_ckpt_piece *pieces_in, int n_pieces,
                                const float *params, const float *m, const float *v, int keep,
                                MPI_Comm comm, char *out_path, size_t out_cap) {
  int rank, world;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  const char *dir = ckpt_dir ? ckpt_dir : "checkpoint";
  const float *src[BAM_CKPT_NBUF] = {params, m, v};
  const int nbuf = m && v ? 3 : 1;
  bam_status st = BAM_OK;
  bam_ckpt_piece *p = NULL;
  plan x;
  memset(&x, 0, sizeof x);
  float *recv[BAM_CKPT_NBUF] = {NULL, NULL, NULL};
  int64_t *rhdr = NULL;
  int *rcnt = NULL, *rdsp = NULL, *rhcnt = NULL, *rhdsp = NULL;

  /* Sort and check this rank's pieces; contiguous: one run in all three coordinates. */
  if (n_pieces < 0 || (n_pieces > 0 && !pieces_in) || !params)
    st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__, "%s: bam_ckpt_save_pieces: bad arguments", dir);
  if (st == BAM_OK && n_pieces > 0)
    st = bam_alloc_checked((void **)&p, sizeof *p * (size_t)n_pieces, "checkpoint pieces");
  int contiguous = 1;
  size_t own_lo = 0, own_hi = 0, mine = 0;
  if (st == BAM_OK) {
    if (n_pieces) memcpy(p, pieces_in, sizeof *p * (size_t)n_pieces);
    if (n_pieces) qsort(p, (size_t)n_pieces, sizeof *p, cmp_piece);
    for (int i = 0; i < n_pieces && st == BAM_OK; i++) {
      if (p[i].global + p[i].n > n_params || p[i].global + p[i].n < p[i].global)
        st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__,
                           "%s: piece [%zu, %zu) outside the %zu-element layout", dir, p[i].global,
                           p[i].global + p[i].n, n_params);
      else if (i && p[i].global < p[i - 1].global + p[i - 1].n)
        st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__, "%s: pieces overlap at element %zu",
                           dir, p[i].global);
      if (i && (p[i].global != p[i - 1].global + p[i - 1].n ||
                p[i].local != p[i - 1].local + p[i - 1].n ||
                p[i].state != p[i - 1].state + p[i - 1].n))
        contiguous = 0;
      mine += p[i].n;
    }
    if (n_pieces) own_lo = p[0].global, own_hi = p[n_pieces - 1].global + p[n_pieces - 1].n;
  }
  BAM_CHECK_GOTO(st, agree(st, comm, dir), done);
  int all_contiguous = contiguous;
  MPI_Allreduce(&contiguous, &all_contiguous, 1, MPI_INT, MPI_MIN, comm);
  if (all_contiguous) { /* already one range per rank: write it as it is */
    const size_t l0 = n_pieces ? p[0].local : 0, s0 = n_pieces ? p[0].state : 0;
    bam_range own = {own_lo, own_hi};
    if (!n_pieces) { /* an empty range: place it where the rank's partition would start */
      const bam_range part = bam_partition(n_params, rank, world);
      own = (bam_range){part.lo, part.lo};
    }
    st = bam_ckpt_save_sharded(ckpt_dir, info, tensors, n_tensors, n_params, own, params + l0,
                               m ? m + s0 : NULL, v ? v + s0 : NULL, keep, comm, out_path, out_cap);
    goto done;
  }

  /* Plan: cut every piece at the partition bounds, by destination rank (pieces sorted, so
   * each destination's segments come in global order). */
  const size_t W = (size_t)world;
  st = bam_alloc_checked((void **)&x.cnt, 4 * W * sizeof(int), "checkpoint exchange counts");
  if (st == BAM_OK) x.dsp = x.cnt + W, x.hcnt = x.cnt + 2 * W, x.hdsp = x.cnt + 3 * W;
  size_t n_seg = 0;
  for (int i = 0; i < n_pieces && st == BAM_OK; i++)
    for (int r = 0; r < world; r++) {
      const bam_range d = bam_partition(n_params, r, world);
      if (p[i].global < d.hi && p[i].global + p[i].n > d.lo) n_seg++;
    }
  if (st == BAM_OK) st = bam_alloc_checked((void **)&x.hdr, 2 * (n_seg + 1) * sizeof(int64_t), "checkpoint headers");
  for (int b = 0; b < nbuf && st == BAM_OK; b++)
    st = bam_alloc_checked((void **)&x.data[b], (mine + 1) * sizeof(float), "checkpoint send buffer");
  if (st == BAM_OK) {
    size_t fo = 0, ho = 0;
    for (int r = 0; r < world; r++) {
      const bam_range d = bam_partition(n_params, r, world);
      x.dsp[r] = (int)fo, x.hdsp[r] = (int)ho;
      for (int i = 0; i < n_pieces; i++) {
        const size_t a = p[i].global > d.lo ? p[i].global : d.lo;
        const size_t e = p[i].global + p[i].n < d.hi ? p[i].global + p[i].n : d.hi;
        if (a >= e) continue;
        x.hdr[ho++] = (int64_t)a, x.hdr[ho++] = (int64_t)(e - a);
        const size_t off = a - p[i].global;
        memcpy(x.data[0] + fo, params + p[i].local + off, (e - a) * sizeof(float));
        for (int b = 1; b < nbuf; b++)
          memcpy(x.data[b] + fo, src[b] + p[i].state + off, (e - a) * sizeof(float));
        fo += e - a;
      }
      if (fo - (size_t)x.dsp[r] > INT_MAX || fo > INT_MAX || ho > INT_MAX) {
        st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__,
                           "%s: more than INT_MAX elements per rank in one checkpoint exchange", dir);
        break;
      }
      x.cnt[r] = (int)(fo - (size_t)x.dsp[r]), x.hcnt[r] = (int)(ho - (size_t)x.hdsp[r]);
    }
  }
  const bam_range own = bam_partition(n_params, rank, world);
  const size_t need = own.hi - own.lo;
  if (st == BAM_OK) st = bam_alloc_checked((void **)&rcnt, 4 * W * sizeof(int), "checkpoint exchange counts");
  for (int b = 0; b < nbuf && st == BAM_OK; b++)
    st = bam_alloc_checked((void **)&recv[b], (need + 1) * sizeof(float), "checkpoint receive buffer");
  BAM_CHECK_GOTO(st, agree(st, comm, dir), done);
  rdsp = rcnt + W, rhcnt = rcnt + 2 * W, rhdsp = rcnt + 3 * W;
  MPI_Alltoall(x.cnt, 1, MPI_INT, rcnt, 1, MPI_INT, comm);
  MPI_Alltoall(x.hcnt, 1, MPI_INT, rhcnt, 1, MPI_INT, comm);
  size_t rf = 0, rh = 0;
  for (int r = 0; r < world; r++) {
    rdsp[r] = (int)rf, rhdsp[r] = (int)rh;
    rf += (size_t)rcnt[r], rh += (size_t)rhcnt[r];
  }
  /* Everything this rank receives must tile its range exactly. */
  if (rf != need || rf > INT_MAX || rh > INT_MAX)
    st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__,
                       "%s: the ranks' pieces give rank %d %zu of the %zu elements of its range "
                       "(pieces missing or overlapping)", dir, rank, rf, need);
  if (st == BAM_OK) st = bam_alloc_checked((void **)&rhdr, (rh + 2) * sizeof(int64_t), "checkpoint headers");
  BAM_CHECK_GOTO(st, agree(st, comm, dir), done);
  MPI_Alltoallv(x.hdr, x.hcnt, x.hdsp, MPI_INT64_T, rhdr, rhcnt, rhdsp, MPI_INT64_T, comm);
  /* Received data lands in source order; place each segment at its global position. */
  float *tmp[BAM_CKPT_NBUF] = {NULL, NULL, NULL};
  for (int b = 0; b < nbuf && st == BAM_OK; b++)
    st = bam_alloc_checked((void **)&tmp[b], (need + 1) * sizeof(float), "checkpoint receive buffer");
  st = agree(st, comm, dir);
  for (int b = 0; b < nbuf && st == BAM_OK; b++)
    MPI_Alltoallv(x.data[b], x.cnt, x.dsp, MPI_FLOAT, tmp[b], rcnt, rdsp, MPI_FLOAT, comm);
  if (st == BAM_OK) {
    size_t fo = 0;
    for (size_t h = 0; h + 1 < rh; h += 2) {
      const size_t g = (size_t)rhdr[h], len = (size_t)rhdr[h + 1];
      if (g < own.lo || g + len > own.hi) {
        st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__,
                           "%s: rank %d received elements [%zu, %zu) outside its range", dir, rank,
                           g, g + len);
        break;
      }
      for (int b = 0; b < nbuf; b++)
        memcpy(recv[b] + (g - own.lo), tmp[b] + fo, len * sizeof(float));
      fo += len;
    }
  }
  for (int b = 0; b < nbuf; b++) bam_free(tmp[b]);
  BAM_CHECK_GOTO(st, agree(st, comm, dir), done);
  st = bam_ckpt_save_sharded(ckpt_dir, info, tensors, n_tensors, n_params, own, recv[0],
                             nbuf > 1 ? recv[1] : NULL, nbuf > 1 ? recv[2] : NULL, keep, comm,
                             out_path, out_cap);
done:
  bam_free(p);
  bam_free(x.cnt);
  bam_free(x.hdr);
  bam_free(rcnt);
  bam_free(rhdr);
  for (int b = 0; b < BAM_CKPT_NBUF; b++) bam_free(x.data[b]), bam_free(recv[b]);
  return st;
}
