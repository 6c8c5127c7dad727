/* Token embedding lookup and its scatter-add gradient.
 *
 * The backward is a scatter: dwte[tokens[i]] += dout[i]. Repeated tokens collide, so rows
 * cannot be split across threads without atomics. Instead each thread owns a slice of the d
 * columns and walks all n tokens in index order. Every dwte element is then summed in the
 * order i = 0, 1, ..., n-1 for any thread count and any schedule: bitwise reproducible, no
 * sorting, no atomics, and each thread streams whole cache lines of its slice.
 * Tokens must lie in [0, V); the caller (data loader) validates them. */
#include <omp.h>
#include <string.h>

#include "bam/kernels.h"
#include "internal.h"

void bam_embedding_forward(float *out, const int32_t *tokens, const float *wte, int n, int d) {
#pragma omp parallel for schedule(static) if ((long)n * d >= BAM_OMP_MIN_WORK)
  for (int i = 0; i < n; i++)
    memcpy(out + (size_t)i * d, wte + (size_t)tokens[i] * d, (size_t)d * sizeof(float));
}

void bam_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int n, int d) {
  if (n <= 0 || d <= 0) return;
  /* Column slices: one per thread, rounded up to 16 floats (one 64-byte line) so threads
   * never share a cache line of dwte (rows are 64-byte aligned when d % 16 == 0). The slice
   * width only affects speed, never the result. */
  const int serial = (long)n * d < BAM_OMP_MIN_WORK;
  const int nt = serial ? 1 : omp_get_max_threads();
  int width = (d + nt - 1) / nt;
  width = (width + 15) / 16 * 16;
  const int nslices = (d + width - 1) / width;
#pragma omp parallel for schedule(static) if (!serial && nslices > 1)
  for (int s = 0; s < nslices; s++) {
    const int j0 = s * width, nj = bam_min_i(width, d - j0);
    for (int i = 0; i < n; i++) {
      float *dst = dwte + (size_t)tokens[i] * d + j0;
      const float *src = dout + (size_t)i * d + j0;
#pragma omp simd
      for (int j = 0; j < nj; j++) dst[j] += src[j];
    }
  }
}
