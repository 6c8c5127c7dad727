/* Router helpers shared by the training mixture (src/model/mixture.c) and the decoder
 * (src/model/decode.c), so both route a token the same way. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "bam/kernels.h"

/* Loops shorter than this stay serial (as in the other kernels). */
#define PAR_MIN_WORK 16384L

void bam_router_softmax(float *p, float *lse, int n, int E) {
#pragma omp parallel for schedule(static) if ((long)n * E >= PAR_MIN_WORK)
  for (int i = 0; i < n; i++) {
    float *r = p + (size_t)i * E;
    float mx = r[0];
    for (int e = 1; e < E; e++) mx = r[e] > mx ? r[e] : mx;
    double s = 0.0;
    for (int e = 0; e < E; e++) {
      r[e] = expf(r[e] - mx);
      s += (double)r[e];
    }
    const float inv = (float)(1.0 / s);
    for (int e = 0; e < E; e++) r[e] *= inv;
    if (lse) lse[i] = mx + (float)log(s);
  }
}

void bam_topk_select(int32_t *idx, const float *p, int E, int k) {
  for (int j = 0; j < k; j++) {
    int best = -1;
    for (int e = 0; e < E; e++) {
      int taken = 0;
      for (int i = 0; i < j; i++) taken |= idx[i] == e;
      if (!taken && (best < 0 || p[e] > p[best])) best = e;
    }
    idx[j] = best;
  }
}
