/* Attention of a few query rows over the KV cache, row by row (x86, AVX-512 or AVX2 + FMA).

   y[b, h, t] = softmax(q[b, h, t] . k[b, h / G, j] * scale + mask[b, t, j]) . v[b, h / G, j]
   over cache slots j, with G = H / Hkv query heads per KV head and an additive mask (0 / -inf).

   Each output row is computed alone, as one fixed sequence of operations over the slots 0 .. L-1,
   where L is one past the row's last unmasked slot: its dot products, its maximum, its exponentials
   (masked slots give exactly 0), its sum and its weighted sum of values. So a row's result depends
   neither on the other rows of the pass nor on how far the attended cache length runs past its
   own slots: a query at position p gets the same bits in a 1-token step and in a K-token verify
   pass, whatever their cache-length buckets. (The library's SDPA reduces over the whole padded
   length, in blocks that depend on it.)

   Speed: the decode passes have few rows (1 to a few dozen) over a few hundred to a few thousand
   slots; the library kernel's per-call setup and blocking are sized for long queries. Here the
   rows of a KV head go through its slots together, block by block, so each block of K and V is
   read once for all of them; threads split chunks of rows; the exponential is a vector polynomial.

   Built with tiled_gemm.c into one library by orthrus/models/tiled.py. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define AW 16
typedef __m512 avec;
#define ALOAD _mm512_loadu_ps
#define ASTORE _mm512_storeu_ps
#define ASET1 _mm512_set1_ps
#define AFMA _mm512_fmadd_ps
#define AMUL _mm512_mul_ps
#define AADD _mm512_add_ps
#define ASUB _mm512_sub_ps
#define AMAX _mm512_max_ps
#define AZERO _mm512_setzero_ps
#define AHSUM _mm512_reduce_add_ps
#define AROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define ASCALE(p, n) _mm512_scalef_ps(p, n) /* p * 2^n */
/* the four sums of a0..a3's lanes, as [sum a0, sum a1, sum a2, sum a3] */
static inline __m128 hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 b0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
  const __m256 b1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
  const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
  const __m256 b3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
/* x < lim ? z : val, lane by lane */
#define ABELOW(x, lim, z, val) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lim, _CMP_LT_OQ), val, z)
#else
#define AW 8
typedef __m256 avec;
#define ALOAD _mm256_loadu_ps
#define ASTORE _mm256_storeu_ps
#define ASET1 _mm256_set1_ps
#define AFMA _mm256_fmadd_ps
#define AMUL _mm256_mul_ps
#define AADD _mm256_add_ps
#define ASUB _mm256_sub_ps
#define AMAX _mm256_max_ps
#define AZERO _mm256_setzero_ps
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#define AHSUM hsum8
#define AROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline __m256 scale2(__m256 p, __m256 n) { /* p * 2^n, n integral in [-126, 0] */
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#define ASCALE scale2
#define ABELOW(x, lim, z, val) _mm256_blendv_ps(val, z, _mm256_cmp_ps(x, lim, _CMP_LT_OQ))
#endif

/* exp(x) for x <= 0 (x - max of a row): exactly 0 below -87 (and for -inf), else a degree-6
   polynomial after x = n ln2 + r, |r| <= ln2 / 2 (relative error a few ulp). */
static inline avec vexp(avec x) {
  const avec lim = ASET1(-87.0f);
  const avec xc = AMAX(x, lim);
  const avec n = AROUND(AMUL(xc, ASET1(1.44269504088896341f)));
  avec r = AFMA(n, ASET1(-0.693145751953125f), xc);
  r = AFMA(n, ASET1(-1.428606765330187e-06f), r);
  avec p = ASET1(1.0f / 720.0f);
  p = AFMA(p, r, ASET1(1.0f / 120.0f));
  p = AFMA(p, r, ASET1(1.0f / 24.0f));
  p = AFMA(p, r, ASET1(1.0f / 6.0f));
  p = AFMA(p, r, ASET1(0.5f));
  p = AFMA(p, r, ASET1(1.0f));
  p = AFMA(p, r, ASET1(1.0f));
  return ABELOW(x, lim, AZERO(), ASCALE(p, n));
}

#define DMAX 256 /* head dims up to this many floats (a multiple of the vector width) */

static __thread float *scratch = 0;
static __thread int64_t scratch_cap = 0;

static float *scores_buffer(int64_t n) {
  if (n > scratch_cap) {
    free(scratch);
    scratch = (float *)malloc((size_t)n * sizeof(float));
    scratch_cap = scratch ? n : 0;
  }
  return scratch;
}

#define CHUNK 8   /* rows that share a pass over their KV head's slots */
#define BLOCK 64  /* slots per block: a block of K or V (16 KB at D = 64) stays in L1 for the chunk's rows */

/* The four scores of slots j .. j+3 of one row (slots past L: slot L - 1 again, dropped by the
   caller), each through the same arithmetic wherever it falls. */
static inline __m128 scores4(const avec *qv, int nv, const float *kh, int64_t kss, int64_t j, int64_t L) {
  const float *k0 = kh + j * kss;
  const float *k1 = kh + (j + 1 < L ? j + 1 : L - 1) * kss;
  const float *k2 = kh + (j + 2 < L ? j + 2 : L - 1) * kss;
  const float *k3 = kh + (j + 3 < L ? j + 3 : L - 1) * kss;
  avec a0 = AMUL(qv[0], ALOAD(k0)), a1 = AMUL(qv[0], ALOAD(k1));
  avec a2 = AMUL(qv[0], ALOAD(k2)), a3 = AMUL(qv[0], ALOAD(k3));
  for (int i = 1; i < nv; ++i) {
    a0 = AFMA(qv[i], ALOAD(k0 + i * AW), a0);
    a1 = AFMA(qv[i], ALOAD(k1 + i * AW), a1);
    a2 = AFMA(qv[i], ALOAD(k2 + i * AW), a2);
    a3 = AFMA(qv[i], ALOAD(k3 + i * AW), a3);
  }
  return hsum4(a0, a1, a2, a3);
}

/* n <= CHUNK rows of one KV head: row u reads q at qs[u], the mask row ms[u], writes y at ys[u].
   The rows go through the slots together, block by block, so each block of K and V is read from
   memory once for all of them; each row's arithmetic is its own and in the same order whatever
   the other rows are. buf: n * (LP + 2 D) floats of scratch, LP >= every row's L rounded up. */
static void attend_rows(int n, const float *const *qs, const float *kh, int64_t kss, const float *vh,
                        int64_t vss, const float *const *ms, int64_t S, int64_t D, float scale,
                        float *const *ys, float *buf, int64_t LP) {
  const int nv = (int)(D / AW);
  int64_t L[CHUNK], Lmax = 0;
  float *sc[CHUNK], *acc[CHUNK], mx[CHUNK];
  for (int u = 0; u < n; ++u) {
    int64_t l = S;
    while (l > 0 && isinf(ms[u][l - 1]) && ms[u][l - 1] < 0) --l; /* slots past the row's last: not read */
    L[u] = l;
    Lmax = l > Lmax ? l : Lmax;
    sc[u] = buf + u * (LP + 2 * D);
    acc[u] = sc[u] + LP;
    mx[u] = -INFINITY;
  }
  const __m128 sc4 = _mm_set1_ps(scale);
  for (int64_t j0 = 0; j0 < Lmax; j0 += BLOCK) { /* scores, block by block */
    for (int u = 0; u < n; ++u) {
      avec qv[DMAX / AW];
      for (int i = 0; i < nv; ++i) qv[i] = ALOAD(qs[u] + i * AW);
      const int64_t hi = j0 + BLOCK < L[u] ? j0 + BLOCK : L[u];
      __m128 mx4 = _mm_set1_ps(mx[u]);
      for (int64_t j = j0; j < hi; j += 4) {
        const __m128 d4 = _mm_mul_ps(scores4(qv, nv, kh, kss, j, L[u]), sc4);
        if (j + 4 <= L[u]) {
          const __m128 s4 = _mm_add_ps(d4, _mm_loadu_ps(ms[u] + j));
          mx4 = _mm_max_ps(mx4, s4);
          _mm_storeu_ps(sc[u] + j, s4);
        } else { /* the row's last slots */
          float m4[4];
          const int64_t c = L[u] - j;
          for (int w = 0; w < 4; ++w) m4[w] = w < c ? ms[u][j + w] : -INFINITY;
          const __m128 s4 = _mm_add_ps(d4, _mm_loadu_ps(m4));
          mx4 = _mm_max_ps(mx4, s4);
          _mm_storeu_ps(m4, s4);
          for (int w = 0; w < c; ++w) sc[u][j + w] = m4[w];
        }
      }
      mx4 = _mm_max_ps(mx4, _mm_movehl_ps(mx4, mx4));
      mx[u] = _mm_cvtss_f32(_mm_max_ss(mx4, _mm_movehdup_ps(mx4)));
    }
  }
  float inv[CHUNK];
  for (int u = 0; u < n; ++u) { /* exponentials and their sum, row by row */
    const int64_t lp = (L[u] + AW - 1) / AW * AW;
    for (int64_t j = L[u]; j < lp; ++j) sc[u][j] = -INFINITY;
    const avec m = ASET1(mx[u]);
    avec sum = AZERO();
    for (int64_t j = 0; j < lp; j += AW) {
      const avec e = vexp(ASUB(ALOAD(sc[u] + j), m));
      ASTORE(sc[u] + j, e);
      sum = AADD(sum, e);
    }
    inv[u] = L[u] > 0 ? 1.0f / AHSUM(sum) : 0.0f; /* a row that sees nothing (padding): zeros */
    for (int64_t i = 0; i < 2 * D; ++i) acc[u][i] = 0.0f;
  }
  /* values, block by block: two accumulator sets per row (even and odd slots), added at the end */
  for (int64_t j0 = 0; j0 < Lmax; j0 += BLOCK) {
    for (int u = 0; u < n; ++u) {
      const int64_t hi = j0 + BLOCK < L[u] ? j0 + BLOCK : L[u];
      if (j0 >= hi) continue;
      avec a0[DMAX / AW], a1[DMAX / AW];
      for (int i = 0; i < nv; ++i) {
        a0[i] = ALOAD(acc[u] + i * AW);
        a1[i] = ALOAD(acc[u] + D + i * AW);
      }
      int64_t j = j0;
      for (; j + 1 < hi; j += 2) {
        const avec p0 = ASET1(sc[u][j]), p1 = ASET1(sc[u][j + 1]);
        const float *v0 = vh + j * vss, *v1 = v0 + vss;
        for (int i = 0; i < nv; ++i) {
          a0[i] = AFMA(p0, ALOAD(v0 + i * AW), a0[i]);
          a1[i] = AFMA(p1, ALOAD(v1 + i * AW), a1[i]);
        }
      }
      if (j < hi) { /* an odd block end: only at the row's last slot (BLOCK is even) */
        const avec p0 = ASET1(sc[u][j]);
        for (int i = 0; i < nv; ++i) a0[i] = AFMA(p0, ALOAD(vh + j * vss + i * AW), a0[i]);
      }
      for (int i = 0; i < nv; ++i) {
        ASTORE(acc[u] + i * AW, a0[i]);
        ASTORE(acc[u] + D + i * AW, a1[i]);
      }
    }
  }
  for (int u = 0; u < n; ++u) {
    const avec iv = ASET1(inv[u]);
    for (int i = 0; i < nv; ++i)
      ASTORE(ys[u] + i * AW, AMUL(AADD(ALOAD(acc[u] + i * AW), ALOAD(acc[u] + D + i * AW)), iv));
  }
}

/* q [B, H, T, D], k / v [B, Hkv, S, D], mask [B, 1, T, S] (additive, float), y [B, H, T, D]; any
   strides (elements) but a contiguous last dimension; a mask batch stride of 0 broadcasts it.
   D must be a multiple of the vector width and at most DMAX; H a multiple of Hkv. The rows of
   each KV head (G query heads x T positions) go in chunks of up to CHUNK; threads split the
   chunks. Returns 0, or -1 when scratch memory ran out (y is then incomplete). */
int orthrus_decode_attention(const float *q, int64_t qsb, int64_t qsh, int64_t qst,
                             const float *k, int64_t ksb, int64_t ksh, int64_t kss,
                             const float *v, int64_t vsb, int64_t vsh, int64_t vss,
                             const float *mask, int64_t msb, int64_t mst,
                             float *y, int64_t ysb, int64_t ysh, int64_t yst,
                             int64_t B, int64_t H, int64_t HKV, int64_t T, int64_t S, int64_t D,
                             float scale, int threads) {
  const int64_t G = H / HKV, R = G * T; /* rows per KV head, ordered (t, g) */
  int64_t ch = B * HKV * R / (2 * (int64_t)threads); /* at least two chunks a thread, when there are rows enough */
  ch = ch < 1 ? 1 : ch > CHUNK ? CHUNK : ch;
  const int64_t per = (R + ch - 1) / ch, tasks = B * HKV * per, LP = (S + AW - 1) / AW * AW;
  int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (HKV * per), kvh = (task / per) % HKV, c = task % per;
    float *buf = scores_buffer(CHUNK * (LP + 2 * D));
    if (!buf) {
      failed = 1;
      continue;
    }
    const float *qs[CHUNK], *ms[CHUNK];
    float *ys[CHUNK];
    int n = 0;
    for (int64_t r = c * ch; r < R && r < (c + 1) * ch; ++r, ++n) {
      const int64_t t = r / G, h = kvh * G + r % G;
      qs[n] = q + b * qsb + h * qsh + t * qst;
      ms[n] = mask + b * msb + t * mst;
      ys[n] = y + b * ysb + h * ysh + t * yst;
    }
    attend_rows(n, qs, k + b * ksb + kvh * ksh, kss, v + b * vsb + kvh * vsh, vss, ms, S, D, scale, ys, buf, LP);
  }
  return failed ? -1 : 0;
}

int orthrus_decode_attention_width(void) { return AW; }
