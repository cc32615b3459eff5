/* A row-invariant fp32 GEMM for passes of few rows on an x86 CPU (AVX-512 or AVX2 + FMA).

   y[M, N] = x[M, K] @ W[N, K]^T, with W packed once as panels p[N / GW][K][GW]: the GW outputs
   of a panel side by side for each k, so a panel is one sequential stream of memory.

   Every output is the same chain of fused multiply-adds over k = 0 .. K-1, from zero, whatever M
   is and whichever row tile computes it: a row's result does not depend on how many rows share
   the pass, bit for bit (the vendor kernels round 1 row and 8 differently).

   Speed: a pass of 1-8 rows streams each weight once (a tile of up to RMAX rows keeps its
   accumulators in registers) and prefetches ahead, far into L2 and near into L1, so that the
   arithmetic of 8 rows overlaps the streaming instead of adding to it. Rows beyond RMAX take
   further tiles over the same panel while it sits in L1/L2. Threads split the panels (OpenMP;
   the caller passes the count, torch's, and shares torch's libgomp).

   Built at first use by orthrus/models/tiled.py (gcc -O3 -march=native). */

#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define VW 16
#define RMAX 8
typedef __m512 vec;
#define VLOAD _mm512_loadu_ps
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VSTORE _mm512_storeu_ps
#define VZERO _mm512_setzero_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define RMAX 4
typedef __m256 vec;
#define VLOAD _mm256_loadu_ps
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VSTORE _mm256_storeu_ps
#define VZERO _mm256_setzero_ps
#else
#error "tiled_gemm needs AVX-512 or AVX2 with FMA"
#endif

#define G 2               /* vectors per panel row */
#define GW (G * VW)       /* outputs per panel */
#define PF_FAR (8192)     /* floats ahead prefetched into L2 (32 KB) */
#define PF_NEAR (512)     /* floats ahead prefetched into L1 (2 KB) */

static inline __attribute__((always_inline)) void tile(const int R, const float *x, int64_t K,
                                                      const float *p, float *y, int64_t ldy) {
  vec acc[RMAX][G];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r][0] = VZERO();
    acc[r][1] = VZERO();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float *pk = p + k * GW;
    _mm_prefetch((const char *)(pk + PF_FAR), _MM_HINT_T1);
    _mm_prefetch((const char *)(pk + PF_NEAR), _MM_HINT_T0);
#if GW * 4 > 64
    _mm_prefetch((const char *)(pk + PF_FAR + 16), _MM_HINT_T1);
    _mm_prefetch((const char *)(pk + PF_NEAR + 16), _MM_HINT_T0);
#endif
    vec w0 = VLOAD(pk), w1 = VLOAD(pk + VW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      vec b = VSET1(x[r * K + k]);
      acc[r][0] = VFMA(b, w0, acc[r][0]);
      acc[r][1] = VFMA(b, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    VSTORE(y + r * ldy, acc[r][0]);
    VSTORE(y + r * ldy + VW, acc[r][1]);
  }
}

typedef void (*tile_fn)(const float *, int64_t, const float *, float *, int64_t);
#define TILE(n) \
  static void tile##n(const float *x, int64_t K, const float *p, float *y, int64_t ldy) { tile(n, x, K, p, y, ldy); }
TILE(1) TILE(2) TILE(3) TILE(4)
#if RMAX == 8
TILE(5) TILE(6) TILE(7) TILE(8)
static const tile_fn TILES[RMAX + 1] = {0, tile1, tile2, tile3, tile4, tile5, tile6, tile7, tile8};
#else
static const tile_fn TILES[RMAX + 1] = {0, tile1, tile2, tile3, tile4};
#endif

/* Outputs per panel: the packed weight is [N / width, K, width], N padded to a multiple. */
int orthrus_tiled_width(void) { return GW; }

/* x [M, K] (rows contiguous), p the packed weight of N outputs (N a multiple of the width),
   y [M, N] (rows contiguous). */
void orthrus_tiled_gemm(const float *x, int64_t M, int64_t K, const float *p, int64_t N, float *y,
                        int threads) {
  const int64_t groups = N / GW;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const float *pg = p + g * K * GW;
    for (int64_t m = 0; m < M; m += RMAX) {
      const int64_t r = M - m < RMAX ? M - m : RMAX;
      TILES[r](x + m * K, K, pg, y + m * N + g * GW, N);
    }
  }
}
