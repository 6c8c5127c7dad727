/* Causal multi-head attention with grouped-query (GQA) heads, fused (flash-attention style).
 *
 * Layout: q (B,T,H*hd), k/v (B,T,Hkv*hd), out (B,T,H*hd), lse (B,H,T). Query head h reads kv
 * head h/G with G = H/Hkv. For one (b,h), with Q,K,V the (T,hd) strided views and c = 1/sqrt(hd):
 *
 *   S = c Q K^T,  P = softmax_row(S with S[i][j>i] = -inf),  O = P V,  lse_i = log sum_j e^S_ij.
 *
 * Backward, with D_i = dO_i . O_i (= sum_j P_ij dP_ij):
 *   P_ij = exp(S_ij - lse_i),  dP = dO V^T,  dS_ij = P_ij (dP_ij - D_i),
 *   dQ += c dS K,  dK += c dS^T Q,  dV += P^T dO.
 *
 * Why fused. Nothing of size T x T is stored: the forward keeps a running max and sum per
 * row (online softmax) and saves only lse, the backward recomputes the probabilities from it.
 * The sgemm-based kernel this replaced saved the (B,H,T,T) probabilities of every attention
 * layer for the backward: 27% of a BAM training step's memory at the quick shape (T 256),
 * and growing with T^2 (at T 2048, 1 GiB per layer and expert for 8 x 8 heads). With
 * head_dim 64 every score costs only 2 x 64 multiply-adds, so materialising it (written by
 * one product, read and written by the softmax, packed by the next product, read again in
 * the backward) also cost as much time as the arithmetic; the fused tiles avoid that traffic
 * but pay for their own exponentials and bookkeeping. Measured on an AVX2 machine
 * (one attention layer, forward + backward): at head_dim 64 (quick shape) the same
 * time as the sgemm-based kernel to within 10%, on one thread and on two; at head_dim 128
 * (paper-small) the backward is slower, 20-30 against 30-40 GFLOP/s on one thread, a few
 * percent of a paper-small step (docs/performance.md).
 *
 * The tiles. A score tile S[FQ][FK] = sum_c Q[i][c] Kt[c][j] is FQ x NV vector accumulators
 * (VL floats each) held in registers: each step broadcasts one q value and multiplies NV
 * vectors of keys, so it works for any head_dim. K (and V for the backward) are transposed
 * once per call into the caller's scratch (bam_attention_scratch_floats) in key tiles of FK,
 * each tile hd x FK contiguous floats. The value-side products (P V, dS K, dS^T Q, P^T dO)
 * go through rank_update: FQ rows x 2 vectors of head_dim in registers while the inner sum
 * runs. The backward takes QS queries per step so the dK, dV blocks are loaded and stored
 * once per QS, and copies the rows it reads (q, dout, the key block's K) into contiguous
 * local blocks. This file is compiled with -ffp-contract=fast (CMakeLists.txt) so the
 * compiler fuses the multiply-adds.
 *
 * Parallelism and determinism. Forward items are (b, h, block of ATTN_ROWS queries), numbered
 * largest (latest) block first for the dynamic schedule. Backward items are (b, kv head): an
 * item owns dK, dV of its kv head and dQ of the G query heads that read it, so nothing is
 * shared between threads, and within an item every sum runs in a fixed order (key blocks,
 * heads, query tiles, ascending). Results do not depend on the thread count or schedule. */
#include <math.h>
#include <string.h>

#include "bam/kernels.h"
#include "internal.h"

/* Vector width: 16 floats with AVX-512, else 8 (AVX2); this project's machines have been of
 * both kinds (-march=native picks; CMake's BAM_MARCH overrides). A score tile is FQ x FK =
 * FQ x 2 vectors of accumulators plus two loaded vectors, sized to the register file (16 ymm
 * or 32 zmm registers). */
#ifndef ATTN_NV
#define ATTN_NV 2
#endif
#ifdef __AVX512F__
#define VL 16
#else
#define VL 8
#endif
#define NV ATTN_NV                 /* vectors of keys per tile row */
#define FK (NV * VL)               /* keys per tile */
#define FQ ((VL == 16 ? 24 : 12) / NV) /* queries per tile: FQ x NV accumulators fill the registers */
#define ATTN_ROWS 60  /* queries per forward work item (a multiple of FQ) */
#define QS (4 * FQ)   /* queries per backward step (dK, dV updates) */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4))); /* unaligned access */

static inline int pad_keys(int T) { return (T + FK - 1) / FK * FK; }

size_t bam_attention_scratch_floats(int B, int T, int Hkv, int hd) {
  return 2 * (size_t)B * Hkv * hd * pad_keys(T);
}

/* K (and V, unless vt is NULL) transposed per (b, kv head) in key tiles: for key t = k0 + j
 * (k0 a multiple of FK), kt[(b*Hkv + kvh)][k0/FK][c][j] = k[b][t][kvh*hd + c]. A tile is then
 * hd x FK contiguous floats (4 KiB at hd 64), read row by row by score_tile; a plain (hd, T)
 * transpose would put its rows T floats apart, a power-of-two stride whose cache lines all
 * fall into a few L1 sets and evict each other. The padding keys t in [T, Tp) are not
 * written: their scores are computed from whatever the scratch holds, then masked by
 * selection (never multiplied), so even NaN there cannot reach a result (tests/kernels runs
 * on a NaN-filled scratch). */
static void transpose_kv(float *kt, float *vt, const float *k, const float *v, int B, int T,
                         int Hkv, int hd) {
  const int Tp = pad_keys(T), ldk = Hkv * hd;
  const long items = (long)B * Hkv;
#pragma omp parallel for schedule(static) if (items > 1 && (long)B * T * ldk >= BAM_OMP_MIN_WORK)
  for (long it = 0; it < items; it++) {
    const int b = (int)(it / Hkv), kvh = (int)(it % Hkv);
    for (int w = 0; w < (vt ? 2 : 1); w++) {
      const float *src = (w ? v : k) + (size_t)b * T * ldk + (size_t)kvh * hd;
      float *dst = (w ? vt : kt) + (size_t)it * hd * Tp;
      for (int k0 = 0; k0 < Tp; k0 += FK) {
        float *tile = dst + (size_t)k0 * hd;
        const int jn = bam_min_i(FK, T - k0);
        for (int j = 0; j < jn; j++) {
          const float *row = src + (size_t)(k0 + j) * ldk;
          for (int c = 0; c < hd; c++) tile[c * FK + j] = row[c];
        }
      }
    }
  }
}

/* S[i][0:FK] = scale * sum_c a_i[c] bt[c][0:FK], a_i = a + min(i, nq - 1) * lda (rows past
 * the block's end repeat a valid row; their results are ignored). bt: hd rows of FK keys,
 * row stride ldb. */
static inline void score_tile(float S[FQ][FK], const float *a, int lda, int nq, const float *bt,
                              int ldb, int hd, float scale) {
  vf acc[FQ][NV];
  size_t off[FQ];
  for (int i = 0; i < FQ; i++) {
    for (int u = 0; u < NV; u++) acc[i][u] = (vf){0};
    off[i] = (size_t)bam_min_i(i, nq - 1) * lda;
  }
  for (int c = 0; c < hd; c++) {
    vf bv[NV];
    for (int u = 0; u < NV; u++) bv[u] = *(const vfu *)(bt + (size_t)c * ldb + u * VL);
    for (int i = 0; i < FQ; i++) {
      const float av = a[off[i] + c];
      for (int u = 0; u < NV; u++) acc[i][u] += av * bv[u];
    }
  }
  for (int i = 0; i < FQ; i++)
    for (int u = 0; u < NV; u++) *(vfu *)&S[i][u * VL] = acc[i][u] * scale;
}

/* y_r[0:hd] += sum_{s < nx} w(r, s) x_s[0:hd] for r < ny, w(r, s) = coef[r * cr + s * cs]:
 * the value-side products (P V, dS K, dS^T Q, P^T dO). Rows of y go FQ at a time and columns
 * 2 vectors at a time, the block held in registers while s runs; a scalar loop takes the
 * columns past the last full pair. Each sum runs in ascending s: deterministic. */
static inline void rank_update(float *y, size_t ldy, int ny, const float *coef, int cr, int cs,
                               const float *x, size_t ldx, int nx, int hd) {
  for (int r0 = 0; r0 < ny; r0 += FQ) {
    const int nr = bam_min_i(FQ, ny - r0);
    size_t woff[FQ];
    for (int i = 0; i < FQ; i++) woff[i] = (size_t)(r0 + bam_min_i(i, nr - 1)) * cr;
    int c = 0;
    for (; c + 2 * VL <= hd; c += 2 * VL) {
      vf a0[FQ], a1[FQ];
      for (int i = 0; i < FQ; i++) {
        const float *yr = y + (size_t)(r0 + bam_min_i(i, nr - 1)) * ldy + c;
        a0[i] = *(const vfu *)yr;
        a1[i] = *(const vfu *)(yr + VL);
      }
      for (int s = 0; s < nx; s++) {
        const vf x0 = *(const vfu *)(x + (size_t)s * ldx + c);
        const vf x1 = *(const vfu *)(x + (size_t)s * ldx + c + VL);
        for (int i = 0; i < FQ; i++) {
          const float w = coef[woff[i] + (size_t)s * cs];
          a0[i] += w * x0;
          a1[i] += w * x1;
        }
      }
      for (int i = 0; i < nr; i++) {
        float *yr = y + (size_t)(r0 + i) * ldy + c;
        *(vfu *)yr = a0[i];
        *(vfu *)(yr + VL) = a1[i];
      }
    }
    for (; c < hd; c++)
      for (int i = 0; i < nr; i++) {
        float acc = y[(size_t)(r0 + i) * ldy + c];
        for (int s = 0; s < nx; s++) acc += coef[woff[i] + (size_t)s * cs] * x[(size_t)s * ldx + c];
        y[(size_t)(r0 + i) * ldy + c] = acc;
      }
  }
}

static inline float dot(const float *a, const float *b, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < n; c++) s += a[c] * b[c];
  return s;
}

void bam_attention_forward(float *out, float *lse, float *scratch, const float *q,
                           const float *k, const float *v, int B, int T, int H, int Hkv, int hd) {
  if (B <= 0 || T <= 0 || H <= 0) return;
  const int G = H / Hkv, Tp = pad_keys(T), nblk = (T + ATTN_ROWS - 1) / ATTN_ROWS;
  const int ldq = H * hd, ldk = Hkv * hd;
  const float scale = 1.0f / sqrtf((float)hd);
  float *kt = scratch; /* P V reads V as it is: only K is transposed */
  transpose_kv(kt, NULL, k, v, B, T, Hkv, hd);
  const long nbh = (long)B * H, items = nbh * nblk;

#pragma omp parallel for schedule(dynamic, 1)
  for (long it = 0; it < items; it++) {
    const int blk = nblk - 1 - (int)(it / nbh); /* last (longest) query blocks first */
    const long bh = it % nbh;
    const int b = (int)(bh / H), h = (int)(bh % H), kvh = h / G;
    const float *ktb = kt + ((size_t)b * Hkv + kvh) * hd * Tp;
    const float *vb = v + (size_t)b * T * ldk + (size_t)kvh * hd;
    float O[FQ][hd], S[FQ][FK];
    for (int q0 = blk * ATTN_ROWS; q0 < bam_min_i(T, (blk + 1) * ATTN_ROWS); q0 += FQ) {
      const int nq = bam_min_i(FQ, T - q0);
      const float *a = q + ((size_t)b * T + q0) * ldq + (size_t)h * hd;
      float m[FQ], l[FQ];
      for (int i = 0; i < FQ; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
        memset(O[i], 0, sizeof O[i]);
      }
      const int kend = q0 + nq; /* keys [0, kend) are visible to some row of the tile */
      for (int k0 = 0; k0 < kend; k0 += FK) {
        score_tile(S, a, ldq, nq, ktb + (size_t)k0 * hd, FK, hd, scale);
        const int jn = bam_min_i(FK, kend - k0);
        for (int i = 0; i < nq; i++) {
          /* Online softmax over the keys <= q0 + i of this tile (len of them, possibly none):
           * fixed-length loops over the tile with the masked keys selected away, which the
           * compiler turns into straight vector code. */
          const int len = q0 + i + 1 - k0;
          float *s = S[i], mt = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mt)
          for (int j = 0; j < FK; j++) mt = j < len && s[j] > mt ? s[j] : mt;
          const float mn = mt > m[i] ? mt : m[i];
#pragma omp simd reduction(+ : sum)
          for (int j = 0; j < FK; j++) {
            const float e = j < len ? bam_expf(s[j] - mn) : 0.0f;
            s[j] = e;
            sum += e;
          }
          const float corr = bam_expf(m[i] - mn); /* 0 on the first tile (m = -inf) */
          l[i] = l[i] * corr + sum;
          m[i] = mn;
          if (corr != 1.0f)
#pragma omp simd
            for (int c = 0; c < hd; c++) O[i][c] *= corr;
        }
        rank_update(&O[0][0], hd, nq, &S[0][0], FK, 1, vb + (size_t)k0 * ldk, ldk, jn, hd); /* O += P V */
      }
      for (int i = 0; i < nq; i++) {
        const float inv = 1.0f / l[i];
        float *o = out + ((size_t)b * T + q0 + i) * ldq + (size_t)h * hd;
#pragma omp simd
        for (int c = 0; c < hd; c++) o[c] = O[i][c] * inv;
        lse[(size_t)bh * T + q0 + i] = m[i] + logf(l[i]);
      }
    }
  }
}

void bam_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                            const float *out, const float *lse, const float *q, const float *k,
                            const float *v, int B, int T, int H, int Hkv, int hd) {
  if (B <= 0 || T <= 0 || H <= 0 || (!dq && !dk && !dv)) return;
  const int G = H / Hkv, Tp = pad_keys(T);
  const int ldq = H * hd, ldk = Hkv * hd;
  const float scale = 1.0f / sqrtf((float)hd);
  float *kt = scratch, *vt = scratch + (size_t)B * Hkv * hd * Tp;
  transpose_kv(kt, vt, k, v, B, T, Hkv, hd);
  const long items = (long)B * Hkv;

#pragma omp parallel for schedule(dynamic, 1)
  for (long it = 0; it < items; it++) {
    const int b = (int)(it / Hkv), kvh = (int)(it % Hkv);
    const float *ktb = kt + (size_t)it * hd * Tp, *vtb = vt + (size_t)it * hd * Tp;
    const size_t kvoff = (size_t)b * T * ldk + (size_t)kvh * hd;
    /* Local contiguous copies of the rows the tiles read: with H x hd a power of two (1024
     * floats at paper-small) the rows of q, dout and dq lie 4 KiB apart, which maps them all
     * onto the same few L1 sets; copied, a step's rows are adjacent. */
    float dK[FK][hd], dV[FK][hd], Kr[FK][hd], P[QS][FK], dS[QS][FK];
    float Qs[QS][hd], dOs[QS][hd], dQs[QS][hd], D[QS];
    for (int k0 = 0; k0 < T; k0 += FK) {
      const int jn = bam_min_i(FK, T - k0);
      memset(dK, 0, sizeof dK);
      memset(dV, 0, sizeof dV);
      for (int j = 0; j < jn; j++)
        memcpy(Kr[j], k + kvoff + (size_t)(k0 + j) * ldk, sizeof(float) * hd);
      for (int g = 0; g < G; g++) { /* fixed order over the group: deterministic */
        const int h = kvh * G + g;
        const size_t bh = (size_t)b * H + h;
        /* the queries that see at least one key of [k0, k0 + jn) are those >= k0; they go QS
         * at a time (score tiles of FQ), so the dK and dV blocks are loaded and stored once
         * per QS queries */
        for (int q0 = k0 / FQ * FQ; q0 < T; q0 += QS) {
          const int nqs = bam_min_i(QS, T - q0);
          const size_t r0 = ((size_t)b * T + q0) * ldq + (size_t)h * hd;
          for (int i = 0; i < nqs; i++) {
            const size_t ri = r0 + (size_t)i * ldq;
            memcpy(Qs[i], q + ri, sizeof(float) * hd);
            memcpy(dOs[i], dout + ri, sizeof(float) * hd);
            D[i] = dot(dOs[i], out + ri, hd);
          }
          for (int u0 = 0; u0 < nqs; u0 += FQ) {
            const int nq = bam_min_i(FQ, nqs - u0);
            score_tile(P + u0, Qs[u0], hd, nq, ktb + (size_t)k0 * hd, FK, hd, scale);
            score_tile(dS + u0, dOs[u0], hd, nq, vtb + (size_t)k0 * hd, FK, hd, 1.0f); /* dP = dO V^T */
            for (int i = u0; i < u0 + nq; i++) {
              const int len = q0 + i + 1 - k0; /* keys <= q0 + i; may be <= 0 */
              const float li = lse[bh * T + q0 + i], Di = D[i];
              float *p = P[i], *ds = dS[i];
#pragma omp simd
              for (int j = 0; j < FK; j++) {
                const float e = j < len ? bam_expf(p[j] - li) : 0.0f;
                p[j] = e;
                ds[j] = scale * e * (ds[j] - Di);
              }
            }
          }
          if (dq) { /* dQ += dS K, summed locally and added to the rows once */
            memset(dQs, 0, sizeof(float) * (size_t)nqs * hd);
            rank_update(&dQs[0][0], hd, nqs, &dS[0][0], FK, 1, &Kr[0][0], hd, jn, hd);
            for (int i = 0; i < nqs; i++) {
              float *dqi = dq + r0 + (size_t)i * ldq;
#pragma omp simd
              for (int c = 0; c < hd; c++) dqi[c] += dQs[i][c];
            }
          }
          if (dk) /* dK += dS^T Q */
            rank_update(&dK[0][0], hd, jn, &dS[0][0], 1, FK, &Qs[0][0], hd, nqs, hd);
          if (dv) /* dV += P^T dO */
            rank_update(&dV[0][0], hd, jn, &P[0][0], 1, FK, &dOs[0][0], hd, nqs, hd);
        }
      }
      for (int j = 0; j < jn; j++) {
        const size_t r = kvoff + (size_t)(k0 + j) * ldk;
        if (dk)
#pragma omp simd
          for (int c = 0; c < hd; c++) dk[r + c] += dK[j][c];
        if (dv)
#pragma omp simd
          for (int c = 0; c < hd; c++) dv[r + c] += dV[j][c];
      }
    }
  }
}
