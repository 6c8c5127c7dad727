/* Rotary position embedding, "rotate-half" pairing (GPT-NeoX / Llama layout): inside a head
 * of size hd, dimension i < hd/2 pairs with i + hd/2 and the pair is rotated by
 *     theta(pos, i) = pos * base^(-2i/hd).
 * The rotation matrix R = [[c, -s], [s, c]] is orthogonal, so the backward pass (multiply the
 * gradient by R^T) is the rotation by -theta: no saved state besides the tables.
 *
 * Note the backward works IN PLACE on the gradient (it does not accumulate like the other
 * backward kernels): the gradient flowing into the rotated q/k buffer is transformed into the
 * gradient of the un-rotated q/k. */
#include <math.h>

#include "bam/kernels.h"
#include "internal.h"

void bam_rope_table(float *cos_t, float *sin_t, int max_pos, int hd, float base) {
  const int half = hd / 2;
  /* Angles in double: pos * freq reaches ~1e5 radians for long contexts, where a float angle
   * would already be off by ~1e-2 rad before cos/sin are taken. */
#pragma omp parallel for schedule(static) if ((long)max_pos * half >= BAM_OMP_MIN_WORK)
  for (int p = 0; p < max_pos; p++) {
    for (int i = 0; i < half; i++) {
      const double inv_freq = pow((double)base, -2.0 * (double)i / (double)hd);
      const double a = (double)p * inv_freq;
      cos_t[(size_t)p * half + i] = (float)cos(a);
      sin_t[(size_t)p * half + i] = (float)sin(a);
    }
  }
}

/* Rotate every head of every token by sign*theta (sign = +1 forward, -1 backward). */
static void rope_apply(float *x, const float *cos_t, const float *sin_t, int B, int T,
                       int n_heads, int hd, int pos0, float sign) {
  const int half = hd / 2;
  const long rows = (long)B * T;
#pragma omp parallel for schedule(static) if (rows * n_heads * hd >= BAM_OMP_MIN_WORK)
  for (long bt = 0; bt < rows; bt++) {
    const int t = (int)(bt % T);
    const size_t p = (size_t)(pos0 + t) * half;
    const float *c = cos_t + p, *s = sin_t + p;
    for (int h = 0; h < n_heads; h++) {
      float *xh = x + ((size_t)bt * n_heads + h) * hd;
#pragma omp simd
      for (int i = 0; i < half; i++) {
        const float x0 = xh[i], x1 = xh[i + half], si = sign * s[i];
        xh[i] = x0 * c[i] - x1 * si;
        xh[i + half] = x0 * si + x1 * c[i];
      }
    }
  }
}

void bam_rope_forward(float *x, const float *cos_t, const float *sin_t, int B, int T,
                      int n_heads, int hd, int pos0) {
  rope_apply(x, cos_t, sin_t, B, T, n_heads, hd, pos0, 1.0f);
}

void bam_rope_backward(float *dx, const float *cos_t, const float *sin_t, int B, int T,
                       int n_heads, int hd, int pos0) {
  rope_apply(dx, cos_t, sin_t, B, T, n_heads, hd, pos0, -1.0f);
}
