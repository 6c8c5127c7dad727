/* parallel: ranks and messages. Deterministic collectives over flat buffers.
 *
 * MPI_Allreduce leaves the order of a floating-point sum to the library (it may change with
 * the algorithm the library picks for a message size), so the data-parallel gradient sum is
 * built from exchanges whose arithmetic this module does itself, in rank order:
 *
 *   reduce-scatter: rank r receives every rank's copy of its own slice [lo_r, hi_r) (one
 *                   MPI_Alltoallv) and sums them as ((g_0 + g_1) + g_2) + ...;
 *   all-gather:     every rank's slice is sent to every rank (MPI_Allgatherv).
 *
 * The result is bitwise identical from run to run for a given rank count, whatever the
 * message timing, and the same sum up to float rounding for any rank count. Between the two
 * exchanges each rank works on its slice alone (sharded optimizer state). */
#ifndef BAM_PARALLEL_H
#define BAM_PARALLEL_H

#include <mpi.h>
#include <stddef.h>

#include "bam/core.h"

typedef struct bam_exchange bam_exchange;

/* Plan exchanges of an n-float buffer over comm, sliced into near-equal ranges whose bounds
 * are multiples of 16 floats; allocates the receive buffer (n floats) once. */
bam_status bam_exchange_create(bam_exchange **out, size_t n, MPI_Comm comm);
void bam_exchange_free(bam_exchange **x);
/* This rank's slice [*lo, *hi) and that of any rank. */
void bam_exchange_range(const bam_exchange *x, int rank, size_t *lo, size_t *hi);
/* After the call buf[lo_r, hi_r) holds the sum over ranks in rank order; the rest of buf is
 * left as it was. */
bam_status bam_reduce_scatter_ordered(bam_exchange *x, float *buf);
/* Every rank's slice of buf is copied to all ranks. */
bam_status bam_allgather_slices(bam_exchange *x, float *buf);
/* Seconds spent inside the two exchanges since creation (for the communication share). */
double bam_exchange_seconds(const bam_exchange *x);

/* Sum of one double per rank, added in rank order (bitwise reproducible). */
bam_status bam_sum_ordered(double *value, MPI_Comm comm);

#endif
