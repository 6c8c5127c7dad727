/* Causal multi-head attention with grouped-query (GQA) heads.
 *
 * Layout: q (B,T,H*hd), k/v (B,T,Hkv*hd), out (B,T,H*hd), probs/scratch (B,H,T,T). Query head
 * h reads kv head h/G with G = H/Hkv. For one (b,h), with Q,K,V the (T,hd) strided views:
 *
 *   S = Q K^T / sqrt(hd),  P = softmax_row(S with S[i][j>i] = -inf),  O = P V.
 *
 * Backward (c = 1/sqrt(hd)):
 *   dP = dO V^T,   dS[i][j] = P[i][j] (dP[i][j] - sum_k P[i][k] dP[i][k])   (softmax Jacobian)
 *   dQ += c dS K,  dK += c dS^T Q,  dV += P^T dO.
 * We store dS already multiplied by c in the scratch.
 *
 * Causal blocking. Rows are cut into blocks of ATTN_BLOCK. Row block [r0,r1) only sees keys
 * [0,r1), so every product is restricted to the lower block triangle: roughly half the flops
 * and half the T*T traffic of the full square. Heads are addressed in place through the
 * sgemm leading dimensions (H*hd for q/out, Hkv*hd for k/v): no transposes or copies.
 *
 * Parallelism and determinism. Forward: every (b, h, row block) is independent, so that is
 * the work item (plenty of items even for B*H smaller than the thread count). Backward runs
 * in two phases:
 *   1. over (b, h, row block): dP, dS (into scratch) and dQ for those rows; all row-local.
 *   2. over (b, kv head, key block): dK and dV for those keys, summing the G query heads of
 *      the group in the fixed order h = kvh*G, ..., kvh*G+G-1, so GQA needs no atomics and
 *      the summation order never depends on scheduling.
 * Each work item calls sgemm inside the parallel region, where OpenBLAS runs single-threaded;
 * an item's result depends only on its inputs, so dynamic scheduling (needed because the
 * triangular items have unequal cost) is still bitwise reproducible. Items are numbered
 * largest-first so the dynamic schedule does not end on a long straggler. */
#include <cblas.h>
#include <math.h>

#include "bam/kernels.h"
#include "internal.h"

#define ATTN_BLOCK 64

void bam_attention_forward(float *out, float *probs, const float *q, const float *k,
                           const float *v, int B, int T, int H, int Hkv, int hd) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  const int G = H / Hkv, nblk = (T + ATTN_BLOCK - 1) / ATTN_BLOCK;
  const int ldq = H * hd, ldk = Hkv * hd;
  const float scale = 1.0f / sqrtf((float)hd);
  const long nbh = (long)B * H, items = nbh * nblk;

#pragma omp parallel for schedule(dynamic, 1)
  for (long it = 0; it < items; it++) {
    const int blk = nblk - 1 - (int)(it / nbh); /* last (largest) row blocks first */
    const long bh = it % nbh;
    const int b = (int)(bh / H), h = (int)(bh % H), kvh = h / G;
    const int r0 = blk * ATTN_BLOCK, r1 = bam_min_i(T, r0 + ATTN_BLOCK), m = r1 - r0;
    const float *qb = q + ((size_t)b * T + r0) * ldq + (size_t)h * hd;
    const float *kb = k + (size_t)b * T * ldk + (size_t)kvh * hd;
    const float *vb = v + (size_t)b * T * ldk + (size_t)kvh * hd;
    float *P = probs + ((size_t)bh * T + r0) * T;
    float *ob = out + ((size_t)b * T + r0) * ldq + (size_t)h * hd;

    /* S[r0:r1, 0:r1] = scale * Q[r0:r1] K[0:r1]^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r1, hd, scale, qb, ldq, kb, ldk,
                0.0f, P, T);
    /* causal row softmax: row i (global index r0+ii) keeps keys 0..i, zero beyond */
    for (int ii = 0; ii < m; ii++) {
      float *p = P + (size_t)ii * T;
      const int len = r0 + ii + 1;
      const float mx = bam_row_max(p, len);
      const float inv = (float)(1.0 / bam_exp_shift_sum(p, p, mx, len));
#pragma omp simd
      for (int j = 0; j < len; j++) p[j] *= inv;
      for (int j = len; j < T; j++) p[j] = 0.0f;
    }
    /* O[r0:r1] = P[r0:r1, 0:r1] V[0:r1] (the zeros above the diagonal add nothing) */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, r1, 1.0f, P, T, vb, ldk, 0.0f,
                ob, ldq);
  }
}

void bam_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                            const float *probs, const float *q, const float *k, const float *v,
                            int B, int T, int H, int Hkv, int hd) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  const int G = H / Hkv, nblk = (T + ATTN_BLOCK - 1) / ATTN_BLOCK;
  const int ldq = H * hd, ldk = Hkv * hd;
  const float scale = 1.0f / sqrtf((float)hd);

  /* ---- phase 1: dS (scaled) into scratch, and dQ; items (b, h, row block) ---- */
  if (dq || dk) {
    const long nbh = (long)B * H, items = nbh * nblk;
#pragma omp parallel for schedule(dynamic, 1)
    for (long it = 0; it < items; it++) {
      const int blk = nblk - 1 - (int)(it / nbh);
      const long bh = it % nbh;
      const int b = (int)(bh / H), h = (int)(bh % H), kvh = h / G;
      const int r0 = blk * ATTN_BLOCK, r1 = bam_min_i(T, r0 + ATTN_BLOCK), m = r1 - r0;
      const float *dob = dout + ((size_t)b * T + r0) * ldq + (size_t)h * hd;
      const float *kb = k + (size_t)b * T * ldk + (size_t)kvh * hd;
      const float *vb = v + (size_t)b * T * ldk + (size_t)kvh * hd;
      const float *P = probs + ((size_t)bh * T + r0) * T;
      float *dS = scratch + ((size_t)bh * T + r0) * T;

      /* dP[r0:r1, 0:r1] = dO[r0:r1] V[0:r1]^T */
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r1, hd, 1.0f, dob, ldq, vb, ldk,
                  0.0f, dS, T);
      for (int ii = 0; ii < m; ii++) {
        const float *p = P + (size_t)ii * T;
        float *ds = dS + (size_t)ii * T;
        const int len = r0 + ii + 1;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < len; j++) dot += p[j] * ds[j];
#pragma omp simd
        for (int j = 0; j < len; j++) ds[j] = scale * p[j] * (ds[j] - dot);
        /* Zero up to the end of the block: phase 2 and the dQ product below read
         * dS[i][0:r1]. Columns >= r1 of this row are never read. */
        for (int j = len; j < r1; j++) ds[j] = 0.0f;
      }
      /* dQ[r0:r1] += dS[r0:r1, 0:r1] K[0:r1] */
      if (dq)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, r1, 1.0f, dS, T, kb, ldk,
                    1.0f, dq + ((size_t)b * T + r0) * ldq + (size_t)h * hd, ldq);
    }
  }

  /* ---- phase 2: dK, dV; items (b, kv head, key block) ---- */
  if (dk || dv) {
    const long nbk = (long)B * Hkv, items = nbk * nblk;
#pragma omp parallel for schedule(dynamic, 1)
    for (long it = 0; it < items; it++) {
      const int blk = (int)(it / nbk); /* first key blocks see the most queries */
      const long bk = it % nbk;
      const int b = (int)(bk / Hkv), kvh = (int)(bk % Hkv);
      const int c0 = blk * ATTN_BLOCK, c1 = bam_min_i(T, c0 + ATTN_BLOCK), m = c1 - c0;
      const int nq = T - c0; /* queries c0..T-1 can see keys in [c0, c1) */
      const size_t kvoff = ((size_t)b * T + c0) * ldk + (size_t)kvh * hd;
      for (int g = 0; g < G; g++) { /* fixed order over the group: deterministic */
        const int h = kvh * G + g;
        const size_t bh = (size_t)b * H + h;
        const size_t qoff = ((size_t)b * T + c0) * ldq + (size_t)h * hd;
        const size_t poff = (bh * T + c0) * T + c0; /* [c0, c0] of this head's T x T */
        /* dK[c0:c1] += dS[c0:T, c0:c1]^T Q[c0:T] */
        if (dk)
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, hd, nq, 1.0f, scratch + poff,
                      T, q + qoff, ldq, 1.0f, dk + kvoff, ldk);
        /* dV[c0:c1] += P[c0:T, c0:c1]^T dO[c0:T] */
        if (dv)
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, hd, nq, 1.0f, probs + poff, T,
                      dout + qoff, ldq, 1.0f, dv + kvoff, ldk);
      }
    }
  }
}
