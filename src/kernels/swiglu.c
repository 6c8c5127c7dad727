/* SwiGLU gating, elementwise over n values:
 *   out = silu(gate) * up,   silu(a) = a * sigma(a),   sigma(a) = 1/(1+exp(-a)).
 * Derivatives:  d out/d up   = silu(a)
 *               d out/d gate = up * silu'(a),  silu'(a) = sigma(a) * (1 + a*(1 - sigma(a))).
 * 1/(1+exp(-a)) is safe at both ends in IEEE arithmetic: exp(-a) overflows to +inf for
 * a << 0, giving sigma = 0 (and silu = -0), and underflows to 0 for a >> 0, giving 1. */
#include <math.h>

#include "bam/kernels.h"
#include "internal.h"

void bam_swiglu_forward(float *out, const float *gate, const float *up, long n) {
#pragma omp parallel for simd schedule(static) if (n >= BAM_OMP_MIN_WORK)
  for (long i = 0; i < n; i++) {
    const float a = gate[i];
    const float sig = 1.0f / (1.0f + bam_expf(-a));
    out[i] = a * sig * up[i];
  }
}

void bam_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                         const float *up, long n) {
  if (!dgate && !dup) return;
#pragma omp parallel for simd schedule(static) if (n >= BAM_OMP_MIN_WORK)
  for (long i = 0; i < n; i++) {
    const float a = gate[i], go = dout[i];
    const float sig = 1.0f / (1.0f + bam_expf(-a));
    if (dgate) dgate[i] += go * up[i] * sig * (1.0f + a * (1.0f - sig));
    if (dup) dup[i] += go * a * sig;
  }
}
