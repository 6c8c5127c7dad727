/* bam-test-ranks: 1 2 3 4
 * The ordered reduce-scatter and all-gather: exact rank-order sums, slices that cover the
 * buffer, odd sizes and ranks with empty slices; a buffer large enough that the reduce-scatter
 * runs several rounds of its 4 MiB receive buffer, the last one partial and uneven. */
#include <math.h>
#include <string.h>

#include "bam/parallel.h"
#include "test_util.h"

static float value(int rank, size_t i) { return sinf((float)(i * 7 + 1) * 0.37f + (float)rank) * 1e3f; }

static void run(size_t n, int rank, int world) {
  bam_exchange *x = NULL;
  T_OK(bam_exchange_create(&x, n, MPI_COMM_WORLD));
  if (!x) return;
  /* slices tile [0, n) in order, bounds multiples of 16 */
  size_t expect_lo = 0;
  for (int r = 0; r < world; r++) {
    size_t lo, hi;
    bam_exchange_range(x, r, &lo, &hi);
    T_CHECK(lo == expect_lo && hi >= lo && hi <= n, "slice %d [%zu,%zu) of %zu", r, lo, hi, n);
    T_CHECK(lo % 16 == 0, "slice %d starts at %zu", r, lo);
    expect_lo = hi;
  }
  T_CHECK(expect_lo == n, "slices cover %zu of %zu", expect_lo, n);

  float *buf = bam_alloc(sizeof(float) * (n + 1));
  for (size_t i = 0; i < n; i++) buf[i] = value(rank, i);
  T_OK(bam_reduce_scatter_ordered(x, buf));
  size_t lo, hi;
  bam_exchange_range(x, rank, &lo, &hi);
  int exact = 1;
  for (size_t i = lo; i < hi; i++) {
    float s = value(0, i);
    for (int r = 1; r < world; r++) s += value(r, i);
    exact &= memcmp(&s, &buf[i], sizeof s) == 0;
  }
  T_CHECK(exact, "n=%zu: reduce-scatter is not the rank-order sum", n);
  T_OK(bam_allgather_slices(x, buf));
  exact = 1;
  for (size_t i = 0; i < n; i++) {
    float s = value(0, i);
    for (int r = 1; r < world; r++) s += value(r, i);
    exact &= memcmp(&s, &buf[i], sizeof s) == 0;
  }
  T_CHECK(exact, "n=%zu: all-gathered buffer differs from the sum", n);
  bam_free(buf);
  bam_exchange_free(&x);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, world;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const size_t sizes[] = {1, 15, 16, 17, 40, 1000, 4097, 300001, 9000011};
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) run(sizes[k], rank, world);

  double v = 0.1 * (rank + 1) + 1e-17 * rank, expect = 0.1;
  for (int r = 1; r < world; r++) expect += 0.1 * (r + 1) + 1e-17 * r;
  T_OK(bam_sum_ordered(&v, MPI_COMM_WORLD));
  T_CHECK(v == expect, "ordered sum %.17g expected %.17g", v, expect);

  int failed = bam_t_fail;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Finalize();
  if (rank != 0) return failed ? 1 : 0;
  bam_t_fail = failed;
  BAM_TEST_END();
}
