/* chexcy/_ops_conv_tiles.h: the register tiles of the direct convolution (forward, and dx of stride-1
 * convs as the transposed conv): FWD_F output channels x FWD_NR rows x FWD_W columns, the one-channel
 * tiles for channels left over, and the 3-row one-channel tile. _conv_rows in _ops.pyx drives them.
 */
#ifndef CHEXCY_OPS_CONV_TILES_H
#define CHEXCY_OPS_CONV_TILES_H

#include "_ops_vec.h"

/* out tile (FB, NR, NV * VW): FB output channels x NR output rows x NV vectors of output columns,
 *   = bias[f] + sum over (c, kh, kw) of w[c, kh, kw, f] * x[c, r * xrow_step + kh*dil_h*Wp + kw*dil_w + col]
 *   xt: padded input at (c = 0, first input row of the first output row, first column of the tile)
 *   wt: packed weights (Cg, KH, KW, FB) of this channel block; bias: (FB,)
 *   dst: OUT (f, r) of the tile at dst + f * dst_fstride + r * dst_rstride (output planes or scratch) */
#define CHEXCY_DEFINE_FWD_TILE(NAME, FB, NR, NV)                                                   \
static inline void NAME(const float *xt, const float *wt, Py_ssize_t Cg, Py_ssize_t KH,            \
                        Py_ssize_t KW, Py_ssize_t plane, Py_ssize_t Wp, Py_ssize_t dil_h,          \
                        Py_ssize_t dil_w, Py_ssize_t xrow_step, const float *bias, float *dst,     \
                        Py_ssize_t dst_fstride, Py_ssize_t dst_rstride)                            \
{                                                                                                  \
    chexcy_vf acc[FB][NR][NV], xv[NR][NV];                                                         \
    CHEXCY_UNROLL for (int f = 0; f < FB; f++)                                                     \
        CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                                 \
            CHEXCY_UNROLL for (int v = 0; v < NV; v++) acc[f][r][v] = chexcy_splat(0.0f);          \
    for (Py_ssize_t c = 0; c < Cg; c++) {                                                          \
        for (Py_ssize_t kh = 0; kh < KH; kh++) {                                                   \
            const float *xr = xt + c * plane + kh * dil_h * Wp;                                    \
            const float *wk = wt + (c * KH + kh) * KW * FB;                                        \
            for (Py_ssize_t kw = 0; kw < KW; kw++, wk += FB) {                                     \
                CHEXCY_UNROLL for (int r = 0; r < NR; r++)                                         \
                    CHEXCY_UNROLL for (int v = 0; v < NV; v++)                                     \
                        xv[r][v] = chexcy_load(xr + r * xrow_step + kw * dil_w + v * CHEXCY_VW);   \
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
            chexcy_fwd_tile(xt, wt, Cg, KH_, KW_, plane, Wp, dil_h, dil_w, xrow_step, bias, dst,   \
                            dst_fstride, dst_rstride);                                             \
        else if (nr == 2)                                                                          \
            chexcy_fwd_tile_r2(xt, wt, Cg, KH_, KW_, plane, Wp, dil_h, dil_w, xrow_step, bias, dst, \
                               dst_fstride, dst_rstride);                                          \
        else                                                                                       \
            chexcy_fwd_tile_r1(xt, wt, Cg, KH_, KW_, plane, Wp, dil_h, dil_w, xrow_step, bias, dst, \
                               dst_fstride, dst_rstride);                                          \
    } while (0)
static inline void chexcy_fwd_tile_rows(Py_ssize_t nr, const float *xt, const float *wt, Py_ssize_t Cg,
                                        Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t plane, Py_ssize_t Wp,
                                        Py_ssize_t dil_h, Py_ssize_t dil_w, Py_ssize_t xrow_step,
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
 *   = bias + sum over (c, kh, kw) of w[c, kh, kw] * x[c, (r + kh) * Wp + kw*dil_w + col]
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
static __attribute__((noinline)) void NAME(const float *xt, const float *wt, Py_ssize_t Cg,        \
                                           Py_ssize_t KW, Py_ssize_t plane, Py_ssize_t Wp,         \
                                           Py_ssize_t dil_w, float bias, float *dst,               \
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
            const float *xr = xc + kw * dil_w;  /* stepped row by row: one pointer register */     \
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

#endif
