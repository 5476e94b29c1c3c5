/* chexcy/_ops_config.h: build facts and register-tile sizes, read by the Cython kernels (_ops.pyx).
 *
 * - An OpenMP shim: without -fopenmp the two OpenMP calls the kernels make answer "one thread",
 *   so the same .pyx compiles and runs serially.
 * - Register-tile sizes chosen by the instruction set the compiler targets. The same _ops.pyx is
 *   compiled once per instruction-set variant (see setup.py); each variant gets tiles that fill its
 *   vector registers without spilling:
 *     FWD_F x FWD_W   output channels x output columns accumulated in registers (forward, dx)
 *     DW_F x 3 x DW_V output channels x kernel columns x lanes (dweight, 3-wide kernels)
 *   and CHEXCY_VW, the floats per vector register (the vector helpers of _ops_vec.h use it).
 * - Build facts for build_info(): variant name, flags, compiler.
 * The kernels live in one header per job; docs/kernels.md maps them.
 */
#ifndef CHEXCY_OPS_CONFIG_H
#define CHEXCY_OPS_CONFIG_H

#ifdef _OPENMP
#include <omp.h>
#define CHEXCY_OPENMP 1
#else
#define CHEXCY_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

#if defined(__AVX512F__)
/* 32 zmm registers. Forward: 8 channels x 2 output rows x 1 vector = 16 accumulators: 2 input
 * loads and 8 broadcasts per 16 FMAs (16 channels x 1 row needed 17 loads per 16 FMAs). dweight: 4 channels x 3 kernel columns = 12 accumulators (8 spill). */
#define CHEXCY_ISA "avx512"
#define CHEXCY_VW 16
#define FWD_F 8
#define FWD_NR 3    /* 8 channels x 3 rows = 24 zmm + 3 inputs + 1 weight */
#define FWD_NV 1
#define FWD_NR3 8   /* one-channel 3-row tile: 8 rows x 3 vectors = 24 zmm + 3 inputs + 3 weights */
#define FWD_NV3 3
#define DW_F 4
#define DWR_F 2
#elif defined(__AVX2__)
/* 16 ymm registers. Forward: 4 channels x 2 vectors = 8 accumulators (2 input loads and 4
 * broadcasts per 8 FMAs: within two loads per cycle). dweight: 4 x 3 = 12 accumulators. */
#define CHEXCY_ISA "avx2"
#define CHEXCY_VW 8
#define FWD_F 4
#define FWD_NR 1
#define FWD_NV 2
#define FWD_NR3 4   /* one-channel 3-row tile: 4 rows x 2 vectors = 8 ymm + 2 inputs + 3 weights */
#define FWD_NV3 2
#define DW_F 4
#define DWR_F 1
#else
/* 16 xmm registers (SSE2 baseline, or any other target). */
#define CHEXCY_ISA "baseline"
#define CHEXCY_VW 4
#define FWD_F 4
#define FWD_NR 1
#define FWD_NV 2
#define FWD_NR3 4   /* one-channel 3-row tile, as AVX2 (no FMA: one temporary per multiply-add) */
#define FWD_NV3 2
#define DW_F 4
#define DWR_F 1
#endif
/* Tile widths in floats. FWD_W1: the one-channel tile used for the channels left over when the
 * output channels of a group are not a multiple of FWD_F (e.g. dx of a 1-channel input); FWD_W3:
 * the one-channel tile of FWD_NR3 rows that takes over from it for 3-row kernels at stride 1.
 * FWD_WMAX: the widest tile, which is also how far past a padded buffer a partial tile may read. */
#define FWD_W (FWD_NV * CHEXCY_VW)
#define FWD_NV1 4
#define FWD_W1 (FWD_NV1 * CHEXCY_VW)
#define FWD_W3 (FWD_NV3 * CHEXCY_VW)
#define DW_V CHEXCY_VW
#define CHEXCY_MAX(a, b) ((a) > (b) ? (a) : (b))
#define FWD_WMAX CHEXCY_MAX(CHEXCY_MAX(FWD_W, FWD_W1), FWD_W3)

#ifndef CHEXCY_VARIANT
#define CHEXCY_VARIANT "unknown"
#endif
#ifndef CHEXCY_CFLAGS
#define CHEXCY_CFLAGS "unknown"
#endif
#ifdef __VERSION__
#define CHEXCY_COMPILER __VERSION__
#else
#define CHEXCY_COMPILER "unknown"
#endif

/* ---------------------------------------------------------------------------------------------
 * The 2 x 2 max-pool row kernels and the batch-norm plane kernels below are on their way to their own
 * headers (_ops_pool.h, _ops_batchnorm.h); until then they are here, with the vector helpers they use.
 * ------------------------------------------------------------------------------------------- */
#include "_ops_vec.h"
#include <stdint.h>

/* Max pool, kernel 2 x 2, stride 2, no padding, one output row. First maximum in scan order (a, b, c, d);
 * a NaN wins, the first NaN. Written as plain ifs on int64 indices with restrict pointers: in this form gcc
 * if-converts and vectorises the loop (16 windows per AVX-512 iteration, 5x faster than the earlier
 * select-on-int form, which compiled to unpredictable branches). */
static inline void chexcy_max_pool_2x2_row(const float *restrict r0, const float *restrict r1,
                                           float *restrict out, int64_t *restrict arg, int64_t base,
                                           Py_ssize_t W, Py_ssize_t OW)
{
    const int64_t w = (int64_t)W;
    for (Py_ssize_t ow = 0; ow < OW; ow++) {
        const float a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
        const int64_t k0 = base + 2 * (int64_t)ow;
        float m = a;
        int64_t k = k0;
        if (b > m || (b != b && m == m)) { m = b; k = k0 + 1; }
        if (c > m || (c != c && m == m)) { m = c; k = k0 + w; }
        if (d > m || (d != d && m == m)) { m = d; k = k0 + w + 1; }
        out[ow] = m;
        arg[ow] = k;
    }
}

/* Backward of the 2 x 2 / stride 2 pool, one output row, when every argmax lies in its own 2 x 2 cell
 * (checked by chexcy_argmax_in_2x2_cells): the cells are disjoint, so each input element receives at most
 * one gradient and dx can be written whole in one pass, with no zeroing pass and no scatter. "+ 0.0f" keeps
 * the result bitwise equal to adding into zeros (-0.0 becomes +0.0 there too). */
static inline void chexcy_max_unpool_2x2_row(const float *restrict g, const int64_t *restrict arg,
                                             float *restrict d0, float *restrict d1, int64_t base,
                                             Py_ssize_t W, Py_ssize_t OW)
{
    const int64_t w = (int64_t)W;
    for (Py_ssize_t ow = 0; ow < OW; ow++) {
        const int64_t k = arg[ow] - (base + 2 * (int64_t)ow);
        const float v = g[ow];
        d0[2 * ow] = (k == 0 ? v : 0.0f) + 0.0f;
        d0[2 * ow + 1] = (k == 1 ? v : 0.0f) + 0.0f;
        d1[2 * ow] = (k == w ? v : 0.0f) + 0.0f;
        d1[2 * ow + 1] = (k == w + 1 ? v : 0.0f) + 0.0f;
    }
}

/* 1 when every argmax of an (OH, OW) plane points into its own 2 x 2 cell of a (H, W) input. */
static inline int chexcy_argmax_in_2x2_cells(const int64_t *restrict arg, Py_ssize_t W,
                                             Py_ssize_t OH, Py_ssize_t OW)
{
    const int64_t w = (int64_t)W;
    int64_t bad = 0;
    for (Py_ssize_t oh = 0; oh < OH; oh++) {
        const int64_t *a = arg + oh * OW;
        const int64_t base = 2 * (int64_t)oh * w;
        for (Py_ssize_t ow = 0; ow < OW; ow++) {
            const int64_t k = a[ow] - (base + 2 * (int64_t)ow);
            bad |= (k != 0) & (k != 1) & (k != w) & (k != w + 1);
        }
    }
    return bad == 0;
}

/* ---------------------------------------------------------------------------------------------
 * Batch norm helpers: one (n, c) plane of `n` floats each. The sums are float64 (each float
 * converted exactly, then added in CHEXCY_VW double lanes that are summed in a fixed order at the
 * end): a per-channel sum over N * H * W ~ 5e5 values in float32 would lose ~3 digits.
 * ------------------------------------------------------------------------------------------- */
typedef double chexcy_vd __attribute__((vector_size(CHEXCY_VW * sizeof(double))));

static inline chexcy_vd chexcy_load_vd(const float *p)
{
    return __builtin_convertvector(chexcy_load(p), chexcy_vd);
}

static inline double chexcy_vd_total(chexcy_vd a, chexcy_vd b)
{
    double lanes[CHEXCY_VW], s = 0;
    a += b;
    memcpy(lanes, &a, sizeof a);
    for (int j = 0; j < CHEXCY_VW; j++) s += lanes[j];
    return s;
}

/* Sum of a plane and the sum of squared deviations from the plane's own mean (two passes: the second
 * re-reads a plane that is still in L2 for the usual sizes), both in float64. The caller combines the
 * planes of a channel with Chan's formula, M2 = sum M2_p + sum n_p (mean_p - mean)^2: as stable as a
 * two-pass variance over the whole channel, with one pass over memory. */
static inline void chexcy_bn_plane_stats(const float *restrict p, Py_ssize_t n, double *sum, double *m2)
{
    chexcy_vd a0 = {0}, a1 = {0}, mv;
    Py_ssize_t i = 0;
    double s, m, t, q;
    for (; i + 2 * CHEXCY_VW <= n; i += 2 * CHEXCY_VW) {
        a0 += chexcy_load_vd(p + i);
        a1 += chexcy_load_vd(p + i + CHEXCY_VW);
    }
    s = chexcy_vd_total(a0, a1);
    for (; i < n; i++) s += (double)p[i];
    m = s / (double)n;
    for (int j = 0; j < CHEXCY_VW; j++) mv[j] = m;
    a0 = (chexcy_vd){0};
    a1 = a0;
    for (i = 0; i + 2 * CHEXCY_VW <= n; i += 2 * CHEXCY_VW) {
        chexcy_vd d0 = chexcy_load_vd(p + i) - mv, d1 = chexcy_load_vd(p + i + CHEXCY_VW) - mv;
        a0 += d0 * d0;
        a1 += d1 * d1;
    }
    q = chexcy_vd_total(a0, a1);
    for (; i < n; i++) { t = (double)p[i] - m; q += t * t; }
    *sum = s;
    *m2 = q;
}

/* Backward sums of one plane: sum(g) and sum(g * (x - mean)), float64. */
static inline void chexcy_bn_plane_grad_sums(const float *restrict g, const float *restrict x, Py_ssize_t n,
                                             double mean, double *sum_g, double *sum_gx)
{
    chexcy_vd b0 = {0}, b1 = {0}, c0 = {0}, c1 = {0}, mv;
    Py_ssize_t i = 0;
    double sg, sgx, t;
    for (int j = 0; j < CHEXCY_VW; j++) mv[j] = mean;
    for (; i + 2 * CHEXCY_VW <= n; i += 2 * CHEXCY_VW) {
        chexcy_vd g0 = chexcy_load_vd(g + i), g1 = chexcy_load_vd(g + i + CHEXCY_VW);
        b0 += g0;
        b1 += g1;
        c0 += g0 * (chexcy_load_vd(x + i) - mv);
        c1 += g1 * (chexcy_load_vd(x + i + CHEXCY_VW) - mv);
    }
    sg = chexcy_vd_total(b0, b1);
    sgx = chexcy_vd_total(c0, c1);
    for (; i < n; i++) {
        t = (double)x[i] - mean;
        sg += (double)g[i];
        sgx += (double)g[i] * t;
    }
    *sum_g = sg;
    *sum_gx = sgx;
}

/* out = (x - m) * a + b over one plane: one subtract and one multiply-add per element. */
static inline void chexcy_bn_apply(const float *restrict x, float *restrict out, Py_ssize_t n,
                                   float m, float a, float b)
{
    for (Py_ssize_t i = 0; i < n; i++) out[i] = (x[i] - m) * a + b;
}

/* dx = a * g + ((x - m) * b + c) over one plane. */
static inline void chexcy_bn_apply_grad(const float *restrict g, const float *restrict x, float *restrict dx,
                                        Py_ssize_t n, float m, float a, float b, float c)
{
    for (Py_ssize_t i = 0; i < n; i++) dx[i] = a * g[i] + ((x[i] - m) * b + c);
}

#endif
