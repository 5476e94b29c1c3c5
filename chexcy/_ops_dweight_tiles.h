/* chexcy/_ops_dweight_tiles.h: the lane-sum tiles of the weight gradient (LANE_SUM path, _dw_block in
 * _ops.pyx): DW_F output channels x 3 kernel columns x DW_V lanes (chexcy_dw_rows3), DWR_F channels x
 * 3 kernel rows x 3 columns for 3-row kernels (chexcy_dw_rows33), and the fixed-order lane total.
 */
#ifndef CHEXCY_OPS_DWEIGHT_TILES_H
#define CHEXCY_OPS_DWEIGHT_TILES_H

#include "_ops_vec.h"

/* dweight lane sums for DW_F output channels x 3 kernel columns of one (c, kh), over NB samples:
 *   part[f][k][lane] += sum over (n, oh, ow = lane mod VW) of
 *                       dout_f[n, oh, ow] * x[n * x_nstride + oh * xstep + ow + k * dil_w]
 *   xr0: padded input of sample 0 at (row of oh = 0 for this kh, column of kernel column 0 of the group)
 *   drows: DW_F pointers to the dout planes (OH, OW) of sample 0; sample n is d_nstride further
 *   part: IN/OUT (DW_F, 3, VW) lane partial sums, kept in registers over all NB planes
 * The last OW % VW columns use masked loads, so nothing outside a plane is read. */
static inline void chexcy_dw_rows3(const float *xr0, const float *const *drows, Py_ssize_t NB,
                                   Py_ssize_t x_nstride, Py_ssize_t d_nstride, Py_ssize_t OH,
                                   Py_ssize_t OW, Py_ssize_t ds, Py_ssize_t xstep, Py_ssize_t dil_w, float *part)
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
                x1 = chexcy_load(xr + ow0 + dil_w);
                x2 = chexcy_load(xr + ow0 + 2 * dil_w);
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
                x1 = chexcy_load_partial(xr + ow0 + dil_w, rem);
                x2 = chexcy_load_partial(xr + ow0 + 2 * dil_w, rem);
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
 *       dout_f[n, oh, ow] * x[n * x_nstride + (oh + kh) * Wp + ow + kw * dil_w]
 *   xr0: padded input of sample 0 at (row of oh = 0 for kh = 0, column of kernel column 0 of the group)
 *   drows: DWR_F pointers to the dout planes of sample 0 (row 0 of the chunk); sample n is d_nstride further
 * Each input row is loaded once per column vector (3 shifted vectors) and feeds the 3 kernel rows whose
 * output rows oh = row - kh it reaches; the dout vectors of the last 3 output rows stay in registers.
 * 5 loads per 18 FMAs (chexcy_dw_rows3 needs 7 per 12). Lane sums add in (n, column vector, oh) order.
 * pf: where the next call's input starts (same extents: samples x_nstride apart); its rows are
 * prefetched one per input row here. Without it each call's input comes from L2/L3 at ~20% of the time. */
static inline __attribute__((always_inline)) void chexcy_dw_col33(
        const float *xr, const float *const *drows, Py_ssize_t doff, Py_ssize_t OH, Py_ssize_t ds,
        Py_ssize_t Wp, Py_ssize_t dil_w, Py_ssize_t rem, chexcy_vf acc[DWR_F][3][3], const float *pf)
{
    chexcy_vf d0[DWR_F], d1[DWR_F], d2[DWR_F], x0, x1, x2;
#define CHEXCY_DW33_X(T)                                                                          \
    if (rem == CHEXCY_VW) {                                                                       \
        x0 = chexcy_load(xr + (T) * Wp); x1 = chexcy_load(xr + (T) * Wp + dil_w);                 \
        x2 = chexcy_load(xr + (T) * Wp + 2 * dil_w);                                              \
    } else {                                                                                      \
        x0 = chexcy_load_partial(xr + (T) * Wp, rem); x1 = chexcy_load_partial(xr + (T) * Wp + dil_w, rem); \
        x2 = chexcy_load_partial(xr + (T) * Wp + 2 * dil_w, rem);                                 \
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
                                    Py_ssize_t OW, Py_ssize_t ds, Py_ssize_t Wp, Py_ssize_t dil_w, float *part,
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
            chexcy_dw_col33(xr0 + n * x_nstride + ow0, drows, n * d_nstride + ow0, OH, ds, Wp, dil_w,
                            CHEXCY_VW, acc, pf + n * x_nstride + ow0);
        if (ow0 < OW)   /* last OW % VW columns: masked loads, other lanes read as 0 */
            chexcy_dw_col33(xr0 + n * x_nstride + ow0, drows, n * d_nstride + ow0, OH, ds, Wp, dil_w,
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

#endif
