/* chexcy/_ops_config.h: compile-time facts read by the Cython kernels (_ops.pyx).
 *
 * - An OpenMP shim: without -fopenmp the two OpenMP calls the kernels make answer "one thread",
 *   so the same .pyx compiles and runs serially.
 * - Register-tile sizes chosen by the instruction set the compiler targets. The same _ops.pyx is
 *   compiled once per instruction-set variant (see setup.py); each variant gets tiles that fill its
 *   vector registers without spilling:
 *     FWD_F x FWD_W   output channels x output columns accumulated in registers (forward, dx)
 *     DW_F x 3 x DW_V output channels x kernel columns x lanes (dweight, 3-wide kernels)
 * - Build facts for build_info(): variant name, flags, compiler.
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
 * Register-tile micro-kernels. Why C here and not in _ops.pyx: gcc does not keep a Cython-generated
 * float accumulator array in registers (measured: the same loops written in Cython vectorised to
 * 128-bit with spills, 3.7 GFLOP/s). GCC/Clang vector extensions make each accumulator a register
 * value. All blocking, padding, threading and ownership stay in _ops.pyx; these only do the
 * innermost multiply-adds of one tile. Multiply-adds contract to FMA where the target has it
 * (-ffp-contract=fast is GCC's default; this is not fast-math: no reassociation, lanes are summed
 * in a fixed order, so results are bitwise reproducible for a given build).
 * ------------------------------------------------------------------------------------------- */
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>

/* Map the whole pages inside [addr, addr + n) now, in one system call (Linux 5.14+; elsewhere, or on
 * failure, nothing happens and the pages fault in on first touch as usual). Returns madvise's result. */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
static inline int chexcy_populate(void *addr, size_t n)
{
    uintptr_t page = 4096, a = ((uintptr_t)addr + page - 1) & ~(page - 1);
    uintptr_t e = ((uintptr_t)addr + n) & ~(page - 1);
    return e > a ? madvise((void *)a, e - a, MADV_POPULATE_WRITE) : 0;
}

/* n bytes of fresh anonymous pages (page-aligned), or NULL; and their release. */
static inline void *chexcy_map(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}
static inline void chexcy_unmap(void *p, size_t n) { munmap(p, n); }

#if defined(__GNUC__) || defined(__clang__)
typedef float chexcy_vf __attribute__((vector_size(CHEXCY_VW * sizeof(float))));
static inline chexcy_vf chexcy_load(const float *p) { chexcy_vf v; memcpy(&v, p, sizeof v); return v; }
static inline void chexcy_store(float *p, chexcy_vf v) { memcpy(p, &v, sizeof v); }
/* Broadcast with the target's own set1 (one vbroadcastss from memory). Not `zero + s`: without
 * fast-math that is a real scalar add (0 + -0 is +0) plus a shuffle per weight; an element-wise
 * init compiles to 16 masked broadcasts. */
#include <immintrin.h>
static inline chexcy_vf chexcy_splat(float s)
{
#if CHEXCY_VW == 16
    return (chexcy_vf)_mm512_set1_ps(s);
#elif CHEXCY_VW == 8
    return (chexcy_vf)_mm256_set1_ps(s);
#else
    return (chexcy_vf)_mm_set1_ps(s);
#endif
}
#define CHEXCY_UNROLL _Pragma("GCC unroll 16")
/* Keep a loaded vector in a register: otherwise gcc folds the same load into each of the FMAs that
 * use it (3 load uops instead of 1 in the dweight loop, which is load-bound). */
#define CHEXCY_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#error "chexcy's kernels need GCC or Clang vector extensions"
#endif

/* The first n (< VW) floats at p, other lanes 0; memory past p + n is never touched. */
static inline chexcy_vf chexcy_load_partial(const float *p, Py_ssize_t n)
{
#if CHEXCY_VW == 16
    return (chexcy_vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#elif CHEXCY_VW == 8
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return (chexcy_vf)_mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lane));
#else
    float t[CHEXCY_VW] = {0};
    for (Py_ssize_t j = 0; j < n; j++) t[j] = p[j];
    return chexcy_load(t);
#endif
}

/* The first n (< VW) lanes of v to p; memory past p + n is never touched. */
static inline void chexcy_store_partial(float *p, chexcy_vf v, Py_ssize_t n)
{
#if CHEXCY_VW == 16
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#elif CHEXCY_VW == 8
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lane), (__m256)v);
#else
    float t[CHEXCY_VW];
    chexcy_store(t, v);
    for (Py_ssize_t j = 0; j < n; j++) p[j] = t[j];
#endif
}

/* out tile (FB, NR, NV * VW): FB output channels x NR output rows x NV vectors of output columns,
 *   = bias[f] + sum over (c, kh, kw) of w[c, kh, kw, f] * x[c, r * xrow_step + kh*dh*Wp + kw*dw + col]
 *   xt: padded input at (c = 0, first input row of the first output row, first column of the tile)
 *   wt: packed weights (Cg, KH, KW, FB) of this channel block; bias: (FB,)
 *   dst: OUT (f, r) of the tile at dst + f * dst_fstride + r * dst_rstride (output planes or scratch) */
#define CHEXCY_DEFINE_FWD_TILE(NAME, FB, NR, NV)                                                   \
static inline void NAME(const float *xt, const float *wt, Py_ssize_t Cg, Py_ssize_t KH,            \
                        Py_ssize_t KW, Py_ssize_t plane, Py_ssize_t Wp, Py_ssize_t dh,             \
                        Py_ssize_t dw, Py_ssize_t xrow_step, const float *bias, float *dst,        \
                        Py_ssize_t dst_fstride, Py_ssize_t dst_rstride)                            \
{                                                                                                  \
    chexcy_vf acc[FB][NR][NV], xv[NR][NV];                                                         \
    CHEXCY_UNROLL for (int f = 0; f < FB; f++)                                                     \
        CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                                 \
            CHEXCY_UNROLL for (int v = 0; v < NV; v++) acc[f][r][v] = chexcy_splat(0.0f);          \
    for (Py_ssize_t c = 0; c < Cg; c++) {                                                          \
        for (Py_ssize_t kh = 0; kh < KH; kh++) {                                                   \
            const float *xr = xt + c * plane + kh * dh * Wp;                                       \
            const float *wk = wt + (c * KH + kh) * KW * FB;                                        \
            for (Py_ssize_t kw = 0; kw < KW; kw++, wk += FB) {                                     \
                CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                         \
                    CHEXCY_UNROLL for (int v = 0; v < NV; v++)                                     \
                        xv[r][v] = chexcy_load(xr + r * xrow_step + kw * dw + v * CHEXCY_VW);      \
                CHEXCY_UNROLL for (int f = 0; f < FB; f++) {                                       \
                    chexcy_vf w = chexcy_splat(wk[f]);                                             \
                    CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                     \
                        CHEXCY_UNROLL for (int v = 0; v < NV; v++) acc[f][r][v] += w * xv[r][v];   \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    CHEXCY_UNROLL for (int f = 0; f < FB; f++) {                                                   \
        chexcy_vf b = chexcy_splat(bias[f]);                                                       \
        CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                                 \
            CHEXCY_UNROLL for (int v = 0; v < NV; v++)                                             \
                chexcy_store(dst + f * dst_fstride + r * dst_rstride + v * CHEXCY_VW, acc[f][r][v] + b);\
    }                                                                                              \
}

CHEXCY_DEFINE_FWD_TILE(chexcy_fwd_tile, FWD_F, FWD_NR, FWD_NV)     /* the main tile */
CHEXCY_DEFINE_FWD_TILE(chexcy_fwd_tile_r2, FWD_F, 2, FWD_NV)       /* rows left over (OH % FWD_NR) */
CHEXCY_DEFINE_FWD_TILE(chexcy_fwd_tile_r1, FWD_F, 1, FWD_NV)
CHEXCY_DEFINE_FWD_TILE(chexcy_fwd_tile1, 1, 1, FWD_NV1)            /* channels left over */

/* FWD_F channels x nr rows (nr = FWD_NR, 2 or 1) of one tile column. 3x3 kernels get copies of the
 * tiles compiled with KH = KW = 3, whose kernel loops unroll: with the sizes known only at run time
 * the kw loop's counter and branch ran with every 3 x (FWD_F + NR) loads, and the tile reached 176
 * instead of 190 GFLOP/s on one core (8 x 2 tile, AVX-512, a harness with the data in L1/L2). */
#define CHEXCY_FWD_TILE_ROWS(KH_, KW_)                                                             \
    do {                                                                                           \
        if (nr == FWD_NR)                                                                          \
            chexcy_fwd_tile(xt, wt, Cg, KH_, KW_, plane, Wp, dh, dw, xrow_step, bias, dst,         \
                            dst_fstride, dst_rstride);                                             \
        else if (nr == 2)                                                                          \
            chexcy_fwd_tile_r2(xt, wt, Cg, KH_, KW_, plane, Wp, dh, dw, xrow_step, bias, dst,      \
                               dst_fstride, dst_rstride);                                          \
        else                                                                                       \
            chexcy_fwd_tile_r1(xt, wt, Cg, KH_, KW_, plane, Wp, dh, dw, xrow_step, bias, dst,      \
                               dst_fstride, dst_rstride);                                          \
    } while (0)
static inline void chexcy_fwd_tile_rows(Py_ssize_t nr, const float *xt, const float *wt, Py_ssize_t Cg,
                                        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t plane, Py_ssize_t Wp,
                                        Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t xrow_step,
                                        const float *bias, float *dst, Py_ssize_t dst_fstride,
                                        Py_ssize_t dst_rstride)
{
    if (KH == 3 && KW == 3)
        CHEXCY_FWD_TILE_ROWS(3, 3);
    else
        CHEXCY_FWD_TILE_ROWS(KH, KW);
}
#undef CHEXCY_FWD_TILE_ROWS

/* One output channel, 3-row kernel, stride 1, row dilation 1: out tile (NR, NV * VW),
 *   = bias + sum over (c, kh, kw) of w[c, kh, kw] * x[c, (r + kh) * Wp + kw*dw + col]
 * Why: the one-channel tile above needs an input load per FMA. Here each of the NR + 2 input rows
 * of the window is loaded once per kernel column and feeds the up-to-3 output rows it touches
 * (r = i - kh), so NR x NV accumulators share every load. The loops over rows and kh are unrolled
 * over constants, so every accumulator index is known at compile time and stays in a register.
 * Order of the sums per output value: c, then kw, then kh (fixed by the shape alone).
 * noinline: inlined into the OpenMP body, gcc ran out of registers there (an accumulator and the
 * row offsets went to the stack, each input vector made a store/reload round trip); compiled on its
 * own, the kw loop has no stack access at all (objdump -d; the call costs nothing next to its
 * Cg * 3 * KW * NR * NV FMAs).
 *   xt: padded input at (c = 0, input row of output row 0, first column of the tile)
 *   wt: (Cg, 3, KW) weights of this channel; dst: OUT row r at dst + r * dst_rstride */
#define CHEXCY_DEFINE_FWD_TILE1_K3(NAME, NR, NV)                                                   \
static __attribute__((noinline)) void NAME(const float *xt, const float *wt, Py_ssize_t Cg,       \
                                           Py_ssize_t KW, Py_ssize_t plane, Py_ssize_t Wp,         \
                                           Py_ssize_t dw, float bias, float *dst,                  \
                                           Py_ssize_t dst_rstride)                                 \
{                                                                                                  \
    chexcy_vf acc[NR][NV], xv[NV], w0, w1, w2;                                                     \
    CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                                     \
        CHEXCY_UNROLL for (int v = 0; v < NV; v++) acc[r][v] = chexcy_splat(0.0f);                 \
    for (Py_ssize_t c = 0; c < Cg; c++) {                                                          \
        const float *xc = xt + c * plane;                                                          \
        const float *wc = wt + c * 3 * KW;                                                         \
        for (Py_ssize_t kw = 0; kw < KW; kw++) {                                                   \
            w0 = chexcy_splat(wc[kw]);                                                             \
            w1 = chexcy_splat(wc[KW + kw]);                                                        \
            w2 = chexcy_splat(wc[2 * KW + kw]);                                                    \
            CHEXCY_IN_REGISTER(w0); CHEXCY_IN_REGISTER(w1); CHEXCY_IN_REGISTER(w2);                \
            const float *xr = xc + kw * dw;  /* stepped row by row: one pointer register */       \
            CHEXCY_UNROLL for (int i = 0; i < NR + 2; i++, xr += Wp) {                             \
                CHEXCY_UNROLL for (int v = 0; v < NV; v++) {                                       \
                    xv[v] = chexcy_load(xr + v * CHEXCY_VW);                                       \
                    CHEXCY_IN_REGISTER(xv[v]);  /* else gcc folds it into each of its 3 FMAs */    \
                }                                                                                  \
                CHEXCY_UNROLL for (int v = 0; v < NV; v++) {                                       \
                    if (i < NR) acc[i][v] += w0 * xv[v];                                           \
                    if (i >= 1 && i - 1 < NR) acc[i - 1][v] += w1 * xv[v];                         \
                    if (i >= 2) acc[i - 2][v] += w2 * xv[v];                                       \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    chexcy_vf b = chexcy_splat(bias);                                                              \
    CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                                     \
        CHEXCY_UNROLL for (int v = 0; v < NV; v++)                                                 \
            chexcy_store(dst + r * dst_rstride + v * CHEXCY_VW, acc[r][v] + b);                    \
}

CHEXCY_DEFINE_FWD_TILE1_K3(chexcy_fwd_tile1_k3, FWD_NR3, FWD_NV3)   /* channels left over, KH = 3 */

/* dweight lane sums for DW_F output channels x 3 kernel columns of one (c, kh), over NB samples:
 *   part[f][k][lane] += sum over (n, oh, ow = lane mod VW) of
 *                       dout_f[n, oh, ow] * x[n * x_nstride + oh * xstep + ow + k * dw]
 *   xr0: padded input of sample 0 at (row of oh = 0 for this kh, column of kernel column 0 of the group)
 *   drows: DW_F pointers to the dout planes (OH, OW) of sample 0; sample n is d_nstride further
 *   part: IN/OUT (DW_F, 3, VW) lane partial sums, kept in registers over all NB planes
 * The last OW % VW columns use masked loads, so nothing outside a plane is read. */
static inline void chexcy_dw_rows3(const float *xr0, const float *const *drows, Py_ssize_t NB,
                                   Py_ssize_t x_nstride, Py_ssize_t d_nstride, Py_ssize_t OH,
                                   Py_ssize_t OW, Py_ssize_t ds, Py_ssize_t xstep, Py_ssize_t dw, float *part)
{
    chexcy_vf acc[DW_F][3], x0, x1, x2, d;
    CHEXCY_UNROLL for (int f = 0; f < DW_F; f++)
        CHEXCY_UNROLL for (int k = 0; k < 3; k++) acc[f][k] = chexcy_load(part + (f * 3 + k) * CHEXCY_VW);
    for (Py_ssize_t n = 0; n < NB; n++) {
        for (Py_ssize_t oh = 0; oh < OH; oh++) {
            const float *xr = xr0 + n * x_nstride + oh * xstep;
            Py_ssize_t doff = n * d_nstride + oh * ds;
            Py_ssize_t ow0 = 0;
            for (; ow0 + CHEXCY_VW <= OW; ow0 += CHEXCY_VW) {
                x0 = chexcy_load(xr + ow0);
                x1 = chexcy_load(xr + ow0 + dw);
                x2 = chexcy_load(xr + ow0 + 2 * dw);
                CHEXCY_UNROLL for (int f = 0; f < DW_F; f++) {
                    d = chexcy_load(drows[f] + doff + ow0);
                    CHEXCY_IN_REGISTER(d);
                    acc[f][0] += d * x0;
                    acc[f][1] += d * x1;
                    acc[f][2] += d * x2;
                }
            }
            if (ow0 < OW) {  /* last OW % VW columns: masked loads, other lanes read as 0 */
                Py_ssize_t rem = OW - ow0;
                x0 = chexcy_load_partial(xr + ow0, rem);
                x1 = chexcy_load_partial(xr + ow0 + dw, rem);
                x2 = chexcy_load_partial(xr + ow0 + 2 * dw, rem);
                CHEXCY_UNROLL for (int f = 0; f < DW_F; f++) {
                    d = chexcy_load_partial(drows[f] + doff + ow0, rem);
                    acc[f][0] += d * x0;
                    acc[f][1] += d * x1;
                    acc[f][2] += d * x2;
                }
            }
        }
    }
    CHEXCY_UNROLL for (int f = 0; f < DW_F; f++)
        CHEXCY_UNROLL for (int k = 0; k < 3; k++) chexcy_store(part + (f * 3 + k) * CHEXCY_VW, acc[f][k]);
}

/* dweight lane sums for DWR_F output channels x 3 kernel rows x 3 kernel columns of one input
 * channel (stride 1, dilation 1 in rows), over NB samples of rows [0, OH) of dout:
 *   part[(kh * kh_stride) + (f * 3 + kw) * VW + lane] += sum over (n, ow = lane mod VW, oh) of
 *       dout_f[n, oh, ow] * x[n * x_nstride + (oh + kh) * Wp + ow + kw * dw]
 *   xr0: padded input of sample 0 at (row of oh = 0 for kh = 0, column of kernel column 0 of the group)
 *   drows: DWR_F pointers to the dout planes of sample 0 (row 0 of the chunk); sample n is d_nstride further
 * Each input row is loaded once per column vector (3 shifted vectors) and feeds the 3 kernel rows whose
 * output rows oh = row - kh it reaches; the dout vectors of the last 3 output rows stay in registers.
 * 5 loads per 18 FMAs (chexcy_dw_rows3 needs 7 per 12). Lane sums add in (n, column vector, oh) order.
 * pf: where the next call's input starts (same extents: samples x_nstride apart); its rows are
 * prefetched one per input row here. Without it each call's input comes from L2/L3 at ~20% of the time. */
static inline __attribute__((always_inline)) void chexcy_dw_col33(
        const float *xr, const float *const *drows, Py_ssize_t doff, Py_ssize_t OH, Py_ssize_t ds,
        Py_ssize_t Wp, Py_ssize_t dw, Py_ssize_t rem, chexcy_vf acc[DWR_F][3][3], const float *pf)
{
    chexcy_vf d0[DWR_F], d1[DWR_F], d2[DWR_F], x0, x1, x2;
#define CHEXCY_DW33_X(T)                                                                          \
    if (rem == CHEXCY_VW) {                                                                       \
        x0 = chexcy_load(xr + (T) * Wp); x1 = chexcy_load(xr + (T) * Wp + dw);                    \
        x2 = chexcy_load(xr + (T) * Wp + 2 * dw);                                                 \
    } else {                                                                                      \
        x0 = chexcy_load_partial(xr + (T) * Wp, rem); x1 = chexcy_load_partial(xr + (T) * Wp + dw, rem); \
        x2 = chexcy_load_partial(xr + (T) * Wp + 2 * dw, rem);                                    \
    }
#define CHEXCY_DW33_D(T)                                                                          \
    CHEXCY_UNROLL for (int f = 0; f < DWR_F; f++) {                                               \
        d0[f] = rem == CHEXCY_VW ? chexcy_load(drows[f] + doff + (T) * ds)                        \
                                 : chexcy_load_partial(drows[f] + doff + (T) * ds, rem);          \
        CHEXCY_IN_REGISTER(d0[f]);                                                                \
    }
#define CHEXCY_DW33_FMA(KH, D)                                                                    \
    CHEXCY_UNROLL for (int f = 0; f < DWR_F; f++) {                                               \
        acc[f][KH][0] += D[f] * x0; acc[f][KH][1] += D[f] * x1; acc[f][KH][2] += D[f] * x2;       \
    }
    /* input row t meets dout rows t (kernel row 0, in d0), t - 1 (row 1, d1) and t - 2 (row 2, d2) */
    CHEXCY_DW33_X(0) CHEXCY_DW33_D(0) CHEXCY_DW33_FMA(0, d0)
    __builtin_prefetch(pf);
    CHEXCY_UNROLL for (int f = 0; f < DWR_F; f++) d1[f] = d0[f];
    CHEXCY_DW33_X(1) CHEXCY_DW33_D(1) CHEXCY_DW33_FMA(0, d0) CHEXCY_DW33_FMA(1, d1)
    __builtin_prefetch(pf + Wp);
    for (Py_ssize_t t = 2; t < OH; t++) {
        CHEXCY_UNROLL for (int f = 0; f < DWR_F; f++) { d2[f] = d1[f]; d1[f] = d0[f]; }
        CHEXCY_DW33_X(t) CHEXCY_DW33_D(t)
        __builtin_prefetch(pf + t * Wp);
        CHEXCY_DW33_FMA(0, d0) CHEXCY_DW33_FMA(1, d1) CHEXCY_DW33_FMA(2, d2)
    }
    /* the last two input rows: only kernel rows 1 and 2 (OH >= 2, so d1 holds dout row OH - 2) */
    CHEXCY_DW33_X(OH) CHEXCY_DW33_FMA(1, d0) CHEXCY_DW33_FMA(2, d1)
    __builtin_prefetch(pf + OH * Wp);
    CHEXCY_DW33_X(OH + 1) CHEXCY_DW33_FMA(2, d0)
    __builtin_prefetch(pf + (OH + 1) * Wp);
#undef CHEXCY_DW33_X
#undef CHEXCY_DW33_D
#undef CHEXCY_DW33_FMA
}

/* Needs OH >= 2 (a chunk of one row takes chexcy_dw_rows3). Not inlined: its loop variables then
 * live in registers rather than in the caller's stack frame. */
static __attribute__((noinline)) void chexcy_dw_rows33(const float *xr0, const float *const *drows, Py_ssize_t NB,
                                    Py_ssize_t x_nstride, Py_ssize_t d_nstride, Py_ssize_t OH,
                                    Py_ssize_t OW, Py_ssize_t ds, Py_ssize_t Wp, Py_ssize_t dw, float *part,
                                    Py_ssize_t kh_stride, const float *pf)
{
    chexcy_vf acc[DWR_F][3][3];
    CHEXCY_UNROLL for (int f = 0; f < DWR_F; f++)
        CHEXCY_UNROLL for (int kh = 0; kh < 3; kh++)
            CHEXCY_UNROLL for (int k = 0; k < 3; k++)
                acc[f][kh][k] = chexcy_load(part + kh * kh_stride + (f * 3 + k) * CHEXCY_VW);
    for (Py_ssize_t n = 0; n < NB; n++) {
        Py_ssize_t ow0 = 0;
        for (; ow0 + CHEXCY_VW <= OW; ow0 += CHEXCY_VW)
            chexcy_dw_col33(xr0 + n * x_nstride + ow0, drows, n * d_nstride + ow0, OH, ds, Wp, dw,
                            CHEXCY_VW, acc, pf + n * x_nstride + ow0);
        if (ow0 < OW)   /* last OW % VW columns: masked loads, other lanes read as 0 */
            chexcy_dw_col33(xr0 + n * x_nstride + ow0, drows, n * d_nstride + ow0, OH, ds, Wp, dw,
                            OW - ow0, acc, pf + n * x_nstride + ow0);
    }
    CHEXCY_UNROLL for (int f = 0; f < DWR_F; f++)
        CHEXCY_UNROLL for (int kh = 0; kh < 3; kh++)
            CHEXCY_UNROLL for (int k = 0; k < 3; k++)
                chexcy_store(part + kh * kh_stride + (f * 3 + k) * CHEXCY_VW, acc[f][kh][k]);
}

/* Total of the CHEXCY_VW lane sums at p (a dweight lane-sum vector), halving: lanes j and j + VW/2,
 * then j and j + VW/4, ... The order is fixed by the build (bitwise reproducible), and the halving
 * steps are whole-vector adds: added one after another, the 16 lanes were a chain of 16 dependent
 * scalar adds for every dweight value (3% of conv4's backward). */
static inline float chexcy_lane_total(const float *p)
{
#if CHEXCY_VW == 16
    __m512 v = _mm512_loadu_ps(p);
    /* upper half via the AVX512F 64-bit extract (the 32-bit one needs AVX512DQ) */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
#elif CHEXCY_VW == 8
    __m256 h = _mm256_loadu_ps(p);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
#else
    __m128 q = _mm_loadu_ps(p);
#endif
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));                      /* lanes 0 + 2, 1 + 3 */
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));  /* then 0 + 1 */
}

/* The four lane accumulators of chexcy_sum_rows to one double: (a0 + a1) + (a2 + a3), then its lanes in
 * order. */
static inline double chexcy_acc_total(const chexcy_vf a[4])
{
    float lanes[CHEXCY_VW];
    double s = 0;
    chexcy_store(lanes, (a[0] + a[1]) + (a[2] + a[3]));
    for (int j = 0; j < CHEXCY_VW; j++) s += lanes[j];
    return s;
}

/* Sum of a rows x n block whose rows are `stride` floats apart: the same lane scheme as chexcy_sum, the
 * lanes carried across rows and added in double once at the end. The order is fixed by the shape. */
static inline double chexcy_sum_rows(const float *p, Py_ssize_t rows, Py_ssize_t n, Py_ssize_t stride)
{
    chexcy_vf a[4] = {chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f)};
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *q = p + r * stride;
        Py_ssize_t i = 0;
        for (; i + 4 * CHEXCY_VW <= n; i += 4 * CHEXCY_VW) {
            a[0] += chexcy_load(q + i);
            a[1] += chexcy_load(q + i + CHEXCY_VW);
            a[2] += chexcy_load(q + i + 2 * CHEXCY_VW);
            a[3] += chexcy_load(q + i + 3 * CHEXCY_VW);
        }
        for (; i + CHEXCY_VW <= n; i += CHEXCY_VW) a[0] += chexcy_load(q + i);
        if (i < n) a[1] += chexcy_load_partial(q + i, n - i);
    }
    return chexcy_acc_total(a);
}

/* One row of chexcy_sum_rows (into its accumulators a[4], in its order) while copying the row to d:
 * a sum taken in a copy that reads the data anyway. chexcy_acc_total(a) after the last row gives
 * exactly chexcy_sum_rows of the rows. */
static inline void chexcy_copy_sum_row(float *restrict d, const float *restrict q, Py_ssize_t n,
                                       chexcy_vf a[4])
{
    Py_ssize_t i = 0;
    for (; i + 4 * CHEXCY_VW <= n; i += 4 * CHEXCY_VW) {
        chexcy_vf v0 = chexcy_load(q + i), v1 = chexcy_load(q + i + CHEXCY_VW);
        chexcy_vf v2 = chexcy_load(q + i + 2 * CHEXCY_VW), v3 = chexcy_load(q + i + 3 * CHEXCY_VW);
        chexcy_store(d + i, v0);
        chexcy_store(d + i + CHEXCY_VW, v1);
        chexcy_store(d + i + 2 * CHEXCY_VW, v2);
        chexcy_store(d + i + 3 * CHEXCY_VW, v3);
        a[0] += v0; a[1] += v1; a[2] += v2; a[3] += v3;
    }
    for (; i + CHEXCY_VW <= n; i += CHEXCY_VW) {
        chexcy_vf v = chexcy_load(q + i);
        chexcy_store(d + i, v);
        a[0] += v;
    }
    if (i < n) {
        chexcy_vf v = chexcy_load_partial(q + i, n - i);
        chexcy_store_partial(d + i, v, n - i);
        a[1] += v;
    }
}

/* Copy P planes of H x W floats into zero-bordered planes of (H + 2 ph) x (W + 2 pw). With sums, also
 * sums[p] = chexcy_sum_rows of plane p (bitwise the same), taken while copying: conv1's per-sample
 * backward reads its 33.5 MB dout once this way instead of copying it and then summing the copy. */
static inline void chexcy_pad_planes(const float *restrict src, float *restrict dst, Py_ssize_t P,
                                     Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                                     double *restrict sums)
{
    Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw;
    for (Py_ssize_t p = 0; p < P; p++) {
        chexcy_vf a[4] = {chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f)};
        for (Py_ssize_t r = 0; r < Hp; r++) {
            float *d = dst + (p * Hp + r) * Wp;
            if (r < ph || r >= ph + H) {
                memset(d, 0, Wp * sizeof(float));
                continue;
            }
            for (Py_ssize_t j = 0; j < pw; j++) {       /* borders are a float or two: no memset per row */
                d[j] = 0;
                d[pw + W + j] = 0;
            }
            const float *q = src + (p * H + r - ph) * W;
            if (sums) {
                chexcy_copy_sum_row(d + pw, q, W, a);
            } else {                                     /* rows are short (16 floats for conv4 at 128x128): */
                for (Py_ssize_t j = 0; j < W; j++)       /* an inline, vectorised copy, no memcpy call */
                    d[pw + j] = q[j];
            }
        }
        if (sums)
            sums[p] = chexcy_acc_total(a);
    }
}

#define CHEXCY_FILL_AHEAD 1024     /* floats: how far ahead the pool fills and sums prefetch (4 KB) */

/* Read prefetches for the lines of [p + ahead, p + ahead + n) floats, n at most CHEXCY_FILL_AHEAD: the
 * global average pool's forward asks, before summing a plane, for min(plane, 4 KB) of data starting 4 KB
 * past the plane's start (the next planes when planes are small, as in ref-cnn's 1 KB ones). The
 * planes are one sequential stream, but the hardware prefetchers alone left a 4 MB read at 2 threads
 * 20% slower (C harness, 47-50 -> 37-42 us). Addresses as integers: past the array they are never
 * dereferenced, and a prefetch does not fault. */
static inline void chexcy_prefetch_ahead(const float *p, Py_ssize_t ahead, Py_ssize_t n)
{
    uintptr_t a = ((uintptr_t)p + 4 * (uintptr_t)ahead) & ~(uintptr_t)63;
    uintptr_t e = (uintptr_t)p + 4 * (uintptr_t)(ahead + (n < CHEXCY_FILL_AHEAD ? n : CHEXCY_FILL_AHEAD));
    for (; a < e; a += 64)
        __builtin_prefetch((const void *)a, 0, 3);
}

/* Sum of n floats: chexcy_sum_rows over one row. The order is fixed by n alone. */
static inline double chexcy_sum(const float *p, Py_ssize_t n)
{
    return chexcy_sum_rows(p, 1, n, n);
}

/* Floats [j0, j1) of planes of hw floats, plane u filled with vals[u] * scale (the global average pool's
 * backward; a thread's share need not start or end on a plane boundary).
 * Store-bound: every line stored to must first be owned by this core, and a store that misses L1 waits
 * for it. Write prefetches CHEXCY_FILL_AHEAD floats ahead (one per cache line, issued plane by plane in
 * their own loop, never past j1, so never into another thread's lines) overlap those waits: for 4 MB at
 * 2 threads (C harness, the lines in L2/L3), 46-47 -> 39-41 us, with prefetchw or prefetcht0 alike;
 * unchanged on one thread (139 us) and from DRAM. With SSE2's 16-byte stores (4 per line) they cost
 * more than they hide (harness 48 -> 51-52 us, the op 62-70 -> 76-80 us), so that build has none. */
static inline void chexcy_fill_planes(float *dst, const float *vals, Py_ssize_t hw, float scale,
                                      Py_ssize_t j0, Py_ssize_t j1)
{
#if CHEXCY_VW >= 8
    /* Addresses as integers: the prefetch window runs past the share, where pointers may not point. */
    uintptr_t stop = (uintptr_t)(dst + j1);
    uintptr_t pf = ((uintptr_t)(dst + j0) + 4 * CHEXCY_FILL_AHEAD) & ~(uintptr_t)63;
#endif
    Py_ssize_t j = j0, u = j0 / hw, e;
    for (; j < j1; u++) {
        e = (u + 1) * hw < j1 ? (u + 1) * hw : j1;
#if CHEXCY_VW >= 8
        uintptr_t pf_end = (uintptr_t)(dst + e) + 4 * CHEXCY_FILL_AHEAD;
        for (; pf < pf_end && pf < stop; pf += 64)
            __builtin_prefetch((const void *)pf, 1, 3);
#endif
        chexcy_vf z = chexcy_splat(vals[u] * scale);
        float *p = dst + j, *body_end = dst + e - (e - j) % CHEXCY_VW;
        for (; p < body_end; p += CHEXCY_VW)
            chexcy_store(p, z);
        if (p < dst + e)
            chexcy_store_partial(p, z, dst + e - p);
        j = e;
    }
}

#endif
