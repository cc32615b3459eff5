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
#include <omp.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define VW 16
#define RMAX 8
typedef __m512 vec;
#define VLOAD _mm512_loadu_ps
#define VLOADH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VSTORE _mm512_storeu_ps
#define VZERO _mm512_setzero_ps
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VW 8
#define RMAX 4
typedef __m256 vec;
#define VLOAD _mm256_loadu_ps
#define VLOADH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VSTORE _mm256_storeu_ps
#define VZERO _mm256_setzero_ps
#else
#error "tiled_gemm needs AVX-512, or AVX2 with FMA and F16C"
#endif

#define G 2               /* vectors per panel row */
#define GW (G * VW)       /* outputs per panel */

/* One tile: R rows x one panel (GW outputs), accumulators in registers. WT: the packed weight's
   element type; LOADW(p): VW of them as floats; PF_*: prefetch distances in elements (32 KB into
   L2, 2 KB into L1 whatever the element size); LINE: elements per 64-byte line. */
#define DEFINE_TILE(NAME, WT, LOADW, PF_FAR, PF_NEAR, LINE)                                          \
  static inline __attribute__((always_inline)) void NAME(const int R, const float *x, int64_t K,    \
                                                          const WT *p, float *y, int64_t ldy) {     \
    vec acc[8][G]; /* R <= RMAX <= 8 */                                                                           \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {                                           \
      acc[r][0] = VZERO();                                                                          \
      acc[r][1] = VZERO();                                                                          \
    }                                                                                               \
    for (int64_t k = 0; k < K; ++k) {                                                               \
      const WT *pk = p + k * GW;                                                                    \
      _Pragma("GCC unroll 4") for (int l = 0; l < GW; l += LINE) {                                  \
        _mm_prefetch((const char *)(pk + PF_FAR + l), _MM_HINT_T1);                                 \
        _mm_prefetch((const char *)(pk + PF_NEAR + l), _MM_HINT_T0);                                \
      }                                                                                             \
      vec w0 = LOADW(pk), w1 = LOADW(pk + VW);                                                      \
      _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {                                         \
        vec b = VSET1(x[r * K + k]);                                                                \
        acc[r][0] = VFMA(b, w0, acc[r][0]);                                                         \
        acc[r][1] = VFMA(b, w1, acc[r][1]);                                                         \
      }                                                                                             \
    }                                                                                               \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {                                           \
      VSTORE(y + r * ldy, acc[r][0]);                                                               \
      VSTORE(y + r * ldy + VW, acc[r][1]);                                                          \
    }                                                                                               \
  }

DEFINE_TILE(tile_f32, float, VLOAD, 8192, 512, 16)
DEFINE_TILE(tile_f16, uint16_t, VLOADH, 16384, 1024, 32)

typedef void (*tile_f32_fn)(const float *, int64_t, const float *, float *, int64_t);
typedef void (*tile_f16_fn)(const float *, int64_t, const uint16_t *, float *, int64_t);
#define TILES_OF(T, WT)                                                                          \
  static void T##1(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(1, x, K, p, y, l); } \
  static void T##2(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(2, x, K, p, y, l); } \
  static void T##3(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(3, x, K, p, y, l); } \
  static void T##4(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(4, x, K, p, y, l); } \
  static void T##5(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(5, x, K, p, y, l); } \
  static void T##6(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(6, x, K, p, y, l); } \
  static void T##7(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(7, x, K, p, y, l); } \
  static void T##8(const float *x, int64_t K, const WT *p, float *y, int64_t l) { T(8, x, K, p, y, l); }
TILES_OF(tile_f32, float)
TILES_OF(tile_f16, uint16_t)
/* RMAX is 8 or 4: the table holds the first RMAX */
static const tile_f32_fn TILES_F32[9] = {0, tile_f321, tile_f322, tile_f323, tile_f324,
                                         tile_f325, tile_f326, tile_f327, tile_f328};
static const tile_f16_fn TILES_F16[9] = {0, tile_f161, tile_f162, tile_f163, tile_f164,
                                         tile_f165, tile_f166, tile_f167, tile_f168};

/* Outputs per panel: the packed weight is [N / width, K, width], N padded to a multiple. */
int orthrus_tiled_width(void) { return GW; }

/* Threads on a busy machine. A parallel region ends when its last thread does; if another process
   holds one of our cores, the helper thread waits for a time slice (milliseconds) on every one of
   a pass's ~120 GEMMs, and a pass takes ten times longer. So each call times its own share (thread
   0) and the whole region: three regions in a row whose end came well after thread 0's share
   (STALL_FACTOR, STALL_NS) make the next SINGLE_CALLS calls run on one thread (no waiting on
   anyone), then threads are tried again. On an idle machine the helpers arrive in microseconds
   and this never triggers. The counters are heuristics: a race between callers only shifts them. */
#include <time.h>
#define STALL_FACTOR 1.5
#define STALL_NS 50000.0
#define STALLS 3
#define SINGLE_CALLS 4000
static int stalls = 0;
static int64_t single_left = 0;
static int64_t single_spells = 0; /* how often one thread was chosen (for tests and reports) */

static inline double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return 1e9 * (double)t.tv_sec + (double)t.tv_nsec;
}

int64_t orthrus_tiled_single_spells(void) { return single_spells; }

/* x [M, K] (rows contiguous), p the packed weight of N outputs (N a multiple of the width),
   y [M, N] (rows contiguous). _f16: p holds IEEE half floats (converted to float in registers;
   the products and sums are float32, as for fp32 weights). Each thread takes a contiguous range
   of panels. */
#define DEFINE_GEMM(NAME, WT, TABLE)                                                              \
  void NAME(const float *x, int64_t M, int64_t K, const WT *p, int64_t N, float *y, int threads) { \
    const int64_t groups = N / GW;                                                                \
    int use = threads;                                                                            \
    if (single_left > 0) {                                                                        \
      --single_left;                                                                              \
      use = 1;                                                                                    \
    }                                                                                             \
    double own = 0.0;                                                                             \
    const double t0 = now_ns();                                                                   \
    _Pragma("omp parallel num_threads(use)") {                                                    \
      const int nt = omp_get_num_threads(), id = omp_get_thread_num();                            \
      const int64_t lo = groups * id / nt, hi = groups * (id + 1) / nt;                           \
      for (int64_t g = lo; g < hi; ++g) {                                                         \
        const WT *pg = p + g * K * GW;                                                            \
        for (int64_t m = 0; m < M; m += RMAX) {                                                   \
          const int64_t r = M - m < RMAX ? M - m : RMAX;                                          \
          TABLE[r](x + m * K, K, pg, y + m * N + g * GW, N);                                      \
        }                                                                                         \
      }                                                                                           \
      if (id == 0) own = now_ns() - t0;                                                           \
    }                                                                                             \
    if (use > 1) {                                                                                \
      const double total = now_ns() - t0;                                                         \
      stalls = total > STALL_FACTOR * own + STALL_NS ? stalls + 1 : 0;                            \
      if (stalls >= STALLS) {                                                                     \
        stalls = 0;                                                                               \
        single_left = SINGLE_CALLS;                                                               \
        ++single_spells;                                                                          \
      }                                                                                           \
    }                                                                                             \
  }

DEFINE_GEMM(orthrus_tiled_gemm, float, TILES_F32)
DEFINE_GEMM(orthrus_tiled_gemm_f16, uint16_t, TILES_F16)
