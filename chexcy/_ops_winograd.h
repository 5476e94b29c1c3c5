/* chexcy/_ops_winograd.h: the transforms of the Winograd convolution F(2x2, 3x3) (chexcy._ops, _wino_*).
 *
 * A 3x3, stride-1 convolution computes each 2x2 block ("tile") of output from a 4x4 window of padded
 * input d and the kernel g as
 *
 *   Y = A^T [ (G g G^T) (.) (B^T d B) ] A        ((.): element by element, 16 products)
 *
 *   B^T = [1  0 -1  0]     G = [ 1    0    0 ]     A^T = [1  1  1  0]
 *         [0  1  1  0]         [1/2  1/2  1/2]           [0  1 -1 -1]
 *         [0 -1  1  0]         [1/2 -1/2  1/2]
 *         [0  1  0 -1]         [ 0    0    1 ]
 *
 * (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). Summed over input
 * channels, the 16 products become 16 independent matrix products, one per position xi of the 4x4
 * transformed tile: M[xi] (F, tiles) = U[xi] (F, C) V[xi] (C, tiles), with U = G g G^T per (f, c) and
 * V = B^T d B per (c, tile). That is 16 multiply-adds per tile, channel pair instead of 36: 2.25x fewer.
 * The transforms below are additions only; they work on whole vectors of VW tiles that lie side by side
 * in a row of tiles, which is why the input is first split into its even and odd columns.
 *
 * dweight is the same algebra read backwards: Y is linear in g, so for a tile with output gradient dY
 * (2x2) and input window d, dL/dg = G^T [ (B^T d B) (.) (A dY A^T) ] G. Summed over tiles, that is
 * again 16 matrix products, S[xi] (F, C) = Z[xi] (F, tiles) V[xi]^T (tiles, C) with Z = A dY A^T, and
 * dweight = G^T S G per (f, c). Here V is computed with channels in the vector lanes (from the
 * channel-blocked input of the dense-tile dweight) and Z with output channels in them, so both come out
 * in the packed layouts of the register tile without a transpose.
 *
 * Needs _ops_config.h first (chexcy_vf, CHEXCY_VW, chexcy_load / chexcy_store).
 */
#ifndef CHEXCY_OPS_WINOGRAD_H
#define CHEXCY_OPS_WINOGRAD_H

#include <string.h>
#include "_ops_gemm.h"

/* dst[2 l] = a[l], dst[2 l + 1] = b[l] for the VW lanes: 2 VW floats. */
static inline void chexcy_interleave(chexcy_vf a, chexcy_vf b, float *dst)
{
#if defined(__GNUC__) && !defined(__clang__)
    chexcy_store(dst, chexcy_zip_lo(a, b));
    chexcy_store(dst + CHEXCY_VW, chexcy_zip_hi(a, b));
#else
    float ta[CHEXCY_VW], tb[CHEXCY_VW];
    chexcy_store(ta, a);
    chexcy_store(tb, b);
    for (int l = 0; l < CHEXCY_VW; l++) {
        dst[2 * l] = ta[l];
        dst[2 * l + 1] = tb[l];
    }
#endif
}

/* U = G g G^T of C kernels g (3, 3), w: (C, 3, 3); U[xi] of kernel c to u[c * 16 + xi] (xi = 4 i + j). */
static void chexcy_wino_weight(const float *w, Py_ssize_t C, float *u)
{
    for (Py_ssize_t c = 0; c < C; c++, w += 9) {
        float gg[4][3];                                 /* G g */
        for (int j = 0; j < 3; j++) {
            const float g0 = w[j], g1 = w[3 + j], g2 = w[6 + j];
            gg[0][j] = g0;
            gg[1][j] = (g0 + g1 + g2) * 0.5f;
            gg[2][j] = (g0 - g1 + g2) * 0.5f;
            gg[3][j] = g2;
        }
        for (int i = 0; i < 4; i++) {                   /* (G g) G^T */
            const float a0 = gg[i][0], a1 = gg[i][1], a2 = gg[i][2];
            u[c * 16 + 4 * i] = a0;
            u[c * 16 + 4 * i + 1] = (a0 + a1 + a2) * 0.5f;
            u[c * 16 + 4 * i + 2] = (a0 - a1 + a2) * 0.5f;
            u[c * 16 + 4 * i + 3] = a2;
        }
    }
}

/* U of output channels [q GEMM_MR, q GEMM_MR + GEMM_MR) (clipped to F; the rows past F zero; the kernel
 * of output channel f times scale[f] first when scale is not NULL), every
 * input channel, straight into the packed A strips of the 16 products: U[xi] of (f, c) at
 * up + xi * xstride + q * C * GEMM_MR + c * GEMM_MR + f % GEMM_MR. The kernel of (f, c) is the 3x3 at
 * w + f * rs + c * cs, turned by 180 degrees when flip (dx as a forward conv: w (C, F, 3, 3) read with
 * rs = 9, cs = F * 9, no transposed copy). The channels go in
 * blocks of CHEXCY_WINO_CB through a local buffer, so each of the 16 destinations gets one contiguous
 * run per block (the 16 streams are xstride apart, often a multiple of 4 KiB: single floats written to
 * each would fight over the same L1 sets). Packing U (F, C, 16) afterwards read one float per cache line
 * per product: 16 passes over all of U, half the forward time of a 512-channel layer at 7x7. */
#define CHEXCY_WINO_CB 16
static void chexcy_wino_weight_pack(const float *w, Py_ssize_t rs, Py_ssize_t cs, int flip, Py_ssize_t F,
                                    Py_ssize_t C, Py_ssize_t q, float *up, Py_ssize_t xstride,
                                    const float *scale)
{
    float buf[16][CHEXCY_WINO_CB * GEMM_MR];           /* 12 KiB on AVX-512 */
    const Py_ssize_t f0 = q * GEMM_MR, mr = F - f0 < GEMM_MR ? F - f0 : GEMM_MR;
    up += q * C * GEMM_MR;
    for (Py_ssize_t c0 = 0; c0 < C; c0 += CHEXCY_WINO_CB) {
        const Py_ssize_t cb = C - c0 < CHEXCY_WINO_CB ? C - c0 : CHEXCY_WINO_CB;
        for (Py_ssize_t r = 0; r < GEMM_MR; r++) {
            for (Py_ssize_t c = 0; c < cb; c++) {
                float u[16];
                if (r < mr) {
                    const float *g = w + (f0 + r) * rs + (c0 + c) * cs;
                    float gf[9];
                    if (flip) for (int t = 0; t < 9; t++) gf[t] = g[8 - t];
                    else if (scale) for (int t = 0; t < 9; t++) gf[t] = g[t] * scale[f0 + r];
                    chexcy_wino_weight(flip || scale ? gf : g, 1, u);
                } else {
                    memset(u, 0, sizeof u);
                }
                for (int xi = 0; xi < 16; xi++) buf[xi][c * GEMM_MR + r] = u[xi];
            }
        }
        for (int xi = 0; xi < 16; xi++)
            memcpy(up + xi * xstride + c0 * GEMM_MR, buf[xi], (size_t)(cb * GEMM_MR) * sizeof(float));
    }
}

/* Lanes l in [lo, hi) of p[l], the others 0 (clipped to [0, VW]); memory outside those lanes is never
 * touched, so p may point before the start or near the end of a row. */
static inline chexcy_vf chexcy_load_window(const float *p, Py_ssize_t lo, Py_ssize_t hi)
{
    if (lo < 0) lo = 0;
    if (hi > CHEXCY_VW) hi = CHEXCY_VW;
    if (hi <= lo) return chexcy_splat(0.0f);
    if (lo == 0 && hi == CHEXCY_VW) return chexcy_load(p);
#if CHEXCY_VW == 16
    return (chexcy_vf)_mm512_maskz_loadu_ps((__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u)), p);
#elif CHEXCY_VW == 8
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)hi), lane),
                                  _mm256_cmpgt_epi32(lane, _mm256_set1_epi32((int)lo - 1)));
    return (chexcy_vf)_mm256_maskload_ps(p, in);
#else
    float t[CHEXCY_VW] = {0};
    for (Py_ssize_t j = lo; j < hi; j++) t[j] = p[j];
    return chexcy_load(t);
#endif
}

/* The even and the odd lanes of the 2 VW floats (a, b): a0 a2 ... b0 b2 ... and a1 a3 ... b1 b3 ... */
static inline void chexcy_deinterleave(chexcy_vf a, chexcy_vf b, chexcy_vf *even, chexcy_vf *odd)
{
#if defined(__GNUC__) && !defined(__clang__)
#if CHEXCY_VW == 16
    const chexcy_vi ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const chexcy_vi od = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
#elif CHEXCY_VW == 8
    const chexcy_vi ev = {0, 2, 4, 6, 8, 10, 12, 14};
    const chexcy_vi od = {1, 3, 5, 7, 9, 11, 13, 15};
#else
    const chexcy_vi ev = {0, 2, 4, 6};
    const chexcy_vi od = {1, 3, 5, 7};
#endif
    *even = __builtin_shuffle(a, b, ev);
    *odd = __builtin_shuffle(a, b, od);
#else
    float t[2 * CHEXCY_VW], e[CHEXCY_VW], o[CHEXCY_VW];
    chexcy_store(t, a);
    chexcy_store(t + CHEXCY_VW, b);
    for (int l = 0; l < CHEXCY_VW; l++) {
        e[l] = t[2 * l];
        o[l] = t[2 * l + 1];
    }
    *even = chexcy_load(e);
    *odd = chexcy_load(o);
#endif
}

/* The column half of the input transform (d B), for padded input rows r0 .. r0 + rows - 1 of one
 * plane x (H, W) and the TW tile columns:
 *   row r (counted from r0) to p = (r odd ? po : pe) + (r / 2) * TW, then for tile tx
 *   p[k * ps + tx], k = 0..3: d0 - d2, d1 + d2, d2 - d1, d1 - d3   with dj = padded[r0 + r][2 tx + j]
 * where padded[i][k] = x[i - ph][k - pw] inside the plane and 0 outside. VW tiles at a time: their
 * 2 VW + 2 columns come in as windowed loads (the padding is the masked-off lanes) and are split into
 * even and odd columns by two shuffles. Whole vectors are stored: a row writes up to VW - 1 floats past
 * its tile TW - 1, into the start of row r + 2, which is written after it (so p needs VW floats of slack
 * after its last row). Masked stores of the last vector of each row instead cost 30% of this loop. */
static void chexcy_wino_cols(const float *x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                             Py_ssize_t r0, Py_ssize_t rows, Py_ssize_t TW, float *pe, float *po,
                             Py_ssize_t ps)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        const Py_ssize_t ih = r0 + r - ph;
        for (Py_ssize_t tx = 0; tx < TW; tx += CHEXCY_VW) {
            const Py_ssize_t c0 = 2 * tx - pw;     /* input column of the first lane */
            float *p = (r % 2 ? po : pe) + r / 2 * TW + tx;
            chexcy_vf w[4];
            if (ih >= 0 && ih < H) {
                const float *q = x + ih * W + c0;
                chexcy_vf d0, d1, d2, d3;
                chexcy_deinterleave(chexcy_load_window(q, -c0, W - c0),
                                    chexcy_load_window(q + CHEXCY_VW, -c0 - CHEXCY_VW, W - c0 - CHEXCY_VW),
                                    &d0, &d1);
                chexcy_deinterleave(chexcy_load_window(q + 2, -c0 - 2, W - c0 - 2),
                                    chexcy_load_window(q + 2 + CHEXCY_VW, -c0 - 2 - CHEXCY_VW,
                                                       W - c0 - 2 - CHEXCY_VW),
                                    &d2, &d3);
                w[0] = d0 - d2;
                w[1] = d1 + d2;
                w[2] = d2 - d1;
                w[3] = d1 - d3;
            } else {
                w[0] = w[1] = w[2] = w[3] = chexcy_splat(0.0f);
            }
            CHEXCY_UNROLL for (int k = 0; k < 4; k++) chexcy_store(p + k * ps, w[k]);
        }
    }
}

/* The row half of the input transform (B^T (d B)) for n tiles numbered t = ty * TW + tx of one channel:
 *   pe, po: the column halves (chexcy_wino_cols) of the even and odd input rows: row 2 ty + r of tile
 *           row ty is at pe (r = 0), po (1), pe + TW (2), po + TW (3), element t; column half k at
 *           + k * ps
 *   v:      OUT V[xi] of tile t at v + xi * vs + t (xi = 4 i + k); nothing past tile n - 1 is written.
 * Every vector holds VW consecutive tiles whatever their rows: no lanes are idle on narrow planes. Reads
 * up to n rounded up to VW (+ TW) floats past pe and po. */
static __attribute__((noinline)) void chexcy_wino_rows(const float *pe, const float *po, Py_ssize_t ps,
                                                       Py_ssize_t TW, Py_ssize_t n, float *v, Py_ssize_t vs)
{
    for (Py_ssize_t t = 0; t < n; t += CHEXCY_VW) {
        const Py_ssize_t left = n - t;
        CHEXCY_UNROLL for (int k = 0; k < 4; k++) {
            const chexcy_vf a0 = chexcy_load(pe + k * ps + t), a1 = chexcy_load(po + k * ps + t);
            const chexcy_vf a2 = chexcy_load(pe + k * ps + t + TW), a3 = chexcy_load(po + k * ps + t + TW);
            const chexcy_vf w[4] = {a0 - a2, a1 + a2, a2 - a1, a1 - a3};
            CHEXCY_UNROLL for (int i = 0; i < 4; i++) {
                if (left >= CHEXCY_VW)
                    chexcy_store(v + (4 * i + k) * vs + t, w[i]);
                else
                    chexcy_store_partial(v + (4 * i + k) * vs + t, w[i], left);
            }
        }
    }
}

/* Y = A^T M A + bias for n tiles t of one output channel, then max(Y, 0) when relu:
 *   m: M[xi] of tile t at m + xi * ms + t; read up to n rounded up to VW
 *   y: OUT the tile's outputs (i, j) at y + (2 i + j) * ys + t, whole vectors (up to n rounded up) */
static __attribute__((noinline)) void chexcy_wino_output(const float *m, Py_ssize_t ms, Py_ssize_t n,
                                                         float bias, float *y, Py_ssize_t ys, int relu)
{
    const chexcy_vf b = chexcy_splat(bias);
    for (Py_ssize_t t = 0; t < n; t += CHEXCY_VW) {
        chexcy_vf s0[4], s1[4], o[4];
        CHEXCY_UNROLL for (int i = 0; i < 4; i++) {
            const chexcy_vf m0 = chexcy_load(m + (4 * i) * ms + t), m1 = chexcy_load(m + (4 * i + 1) * ms + t);
            const chexcy_vf m2 = chexcy_load(m + (4 * i + 2) * ms + t), m3 = chexcy_load(m + (4 * i + 3) * ms + t);
            s0[i] = m0 + m1 + m2;   /* M A: the columns */
            s1[i] = m1 - m2 - m3;
        }
        o[0] = s0[0] + s0[1] + s0[2] + b;
        o[1] = s1[0] + s1[1] + s1[2] + b;
        o[2] = s0[1] - s0[2] - s0[3] + b;
        o[3] = s1[1] - s1[2] - s1[3] + b;
        CHEXCY_UNROLL for (int i = 0; i < 4; i++)
            chexcy_store(y + i * ys + t, relu ? chexcy_relu_v(o[i]) : o[i]);
    }
}

/* Output rows of one row of TW tiles: out0[2 tx + j] = y[j * ys + tx], out1[2 tx + j] = y[(2 + j) * ys
 * + tx], the first `width` columns (out1 only when not NULL). row: scratch of 2 TW rounded up to 2 VW. */
static void chexcy_wino_store_rows(const float *y, Py_ssize_t ys, Py_ssize_t TW, float *row, float *out0,
                                   float *out1, Py_ssize_t width)
{
    for (Py_ssize_t tx = 0; tx < TW; tx += CHEXCY_VW)
        chexcy_interleave(chexcy_load(y + tx), chexcy_load(y + ys + tx), row + 2 * tx);
    memcpy(out0, row, width * sizeof(float));
    if (!out1) return;
    for (Py_ssize_t tx = 0; tx < TW; tx += CHEXCY_VW)
        chexcy_interleave(chexcy_load(y + 2 * ys + tx), chexcy_load(y + 3 * ys + tx), row + 2 * tx);
    memcpy(out1, row, width * sizeof(float));
}

/* ---- dweight ---------------------------------------------------------------------------------- */

/* Output rows r0 .. r0 + rows - 1 of one sample's dout (F, OH, OW), channels last:
 *   dt[(r * W2 + w) * Fs + f] = dout[f, r0 + r, w], 0 for rows >= OH, columns >= OW (w < W2), f >= F
 * Each dout row is read once, contiguously, and scattered with stride Fs. noinline: inlined into the
 * OpenMP body, gcc kept the loop's strides on the stack (5 cycles a float instead of ~1). */
static __attribute__((noinline)) void chexcy_wdw_dout_rows(const float *dout, Py_ssize_t F, Py_ssize_t OH,
                                                           Py_ssize_t OW, Py_ssize_t r0, Py_ssize_t rows,
                                                           Py_ssize_t W2, Py_ssize_t Fs, float *dt)
{
    const Py_ssize_t plane = OH * OW;
    for (Py_ssize_t r = 0; r < rows; r++) {
        float *d = dt + r * W2 * Fs;
        if (r0 + r >= OH) {
            memset(d, 0, W2 * Fs * sizeof(float));
            continue;
        }
        const float *src = dout + (r0 + r) * OW;
        for (Py_ssize_t f = 0; f < F; f++, src += plane) {
            float *df = d + f;
            for (Py_ssize_t w = 0; w < OW; w++) df[w * Fs] = src[w];
        }
        for (Py_ssize_t w = 0; w < OW; w++) memset(d + w * Fs + F, 0, (Fs - F) * sizeof(float));
        if (W2 > OW) memset(d + OW * Fs, 0, (W2 - OW) * Fs * sizeof(float));
    }
}

/* Z = A dY A^T of the nty x TW tiles of dt (chexcy_wdw_dout_rows, rows 2 ty and 2 ty + 1 of tile row
 * ty), for every block of GEMM_MR output channels, as packed strips of the register tile:
 *   Z[xi] of tile t = ty * TW + tx, channel fb * GEMM_MR + i at z[((xi * nfb + fb) * tq + t) * GEMM_MR + i]
 * A = [1 0; 1 1; 1 -1; 0 -1]. Each store is a whole vector of VW >= GEMM_MR lanes: the lanes past
 * GEMM_MR land on the next tile's row of the strip, written after it (row tq - 1 >= nty * TW is slack).
 * dt needs VW - GEMM_MR channels of slack past nfb * GEMM_MR (Fs). */
static void chexcy_wdw_dout_tiles(const float *dt, Py_ssize_t Fs, Py_ssize_t TW, Py_ssize_t nty,
                                  Py_ssize_t nfb, Py_ssize_t tq, float *z)
{
    const Py_ssize_t W2 = 2 * TW, xs = nfb * tq * GEMM_MR;
    for (Py_ssize_t ty = 0; ty < nty; ty++) {
        for (Py_ssize_t tx = 0; tx < TW; tx++) {
            const Py_ssize_t t = ty * TW + tx;
            const float *p = dt + (2 * ty * W2 + 2 * tx) * Fs;
            for (Py_ssize_t fb = 0; fb < nfb; fb++, p += GEMM_MR) {
                const chexcy_vf y00 = chexcy_load(p), y01 = chexcy_load(p + Fs);
                const chexcy_vf y10 = chexcy_load(p + W2 * Fs), y11 = chexcy_load(p + (W2 + 1) * Fs);
                const chexcy_vf r0[4] = {y00, y00 + y01, y00 - y01, -y01};     /* dY A^T */
                const chexcy_vf r1[4] = {y10, y10 + y11, y10 - y11, -y11};
                float *o = z + (fb * tq + t) * GEMM_MR;
                CHEXCY_UNROLL for (int j = 0; j < 4; j++) {
                    chexcy_store(o + j * xs, r0[j]);
                    chexcy_store(o + (4 + j) * xs, r0[j] + r1[j]);
                    chexcy_store(o + (8 + j) * xs, r0[j] - r1[j]);
                    chexcy_store(o + (12 + j) * xs, -r1[j]);
                }
            }
        }
    }
}

/* V = B^T d B of the nty x TW tiles of one channel block of the channel-blocked padded input
 * (rows of wq positions of GEMM_NR channels, xt at padded row 2 ty0), as packed strips:
 *   V[xi] of tile t, channel j at v + xi * xs + t * GEMM_NR + j */
static void chexcy_wdw_input_tiles(const float *xt, Py_ssize_t wq, Py_ssize_t TW, Py_ssize_t nty, float *v,
                                   Py_ssize_t xs)
{
    for (Py_ssize_t ty = 0; ty < nty; ty++) {
        for (Py_ssize_t tx = 0; tx < TW; tx++) {
            const float *p = xt + (2 * ty * wq + 2 * tx) * GEMM_NR;
            float *o = v + (ty * TW + tx) * GEMM_NR;
            CHEXCY_UNROLL for (int l = 0; l < GEMM_NV; l++) {
                chexcy_vf t[4][4];
                CHEXCY_UNROLL for (int r = 0; r < 4; r++) {
                    const float *q = p + r * wq * GEMM_NR + l * CHEXCY_VW;
                    const chexcy_vf d0 = chexcy_load(q), d1 = chexcy_load(q + GEMM_NR);
                    const chexcy_vf d2 = chexcy_load(q + 2 * GEMM_NR), d3 = chexcy_load(q + 3 * GEMM_NR);
                    t[r][0] = d0 - d2;      /* d B */
                    t[r][1] = d1 + d2;
                    t[r][2] = d2 - d1;
                    t[r][3] = d1 - d3;
                }
                CHEXCY_UNROLL for (int k = 0; k < 4; k++) {
                    chexcy_store(o + k * xs + l * CHEXCY_VW, t[0][k] - t[2][k]);
                    chexcy_store(o + (4 + k) * xs + l * CHEXCY_VW, t[1][k] + t[2][k]);
                    chexcy_store(o + (8 + k) * xs + l * CHEXCY_VW, t[2][k] - t[1][k]);
                    chexcy_store(o + (12 + k) * xs + l * CHEXCY_VW, t[1][k] - t[3][k]);
                }
            }
        }
    }
}

/* dweight[c] (3, 3) = G^T S G for the C input channels of one output channel, where
 *   S[xi][c] = the sum of the nparts partial sums s[p * ps + xi * xs + c], added in order p = 0, 1, ...
 * The partial sums are first added row by row into acc (16, C) (contiguous reads; column by column,
 * 64 streams 33 KiB apart fought over the same L1 sets). */
static __attribute__((noinline)) void chexcy_wdw_weight_row(const float *s, Py_ssize_t nparts, Py_ssize_t ps,
                                                            Py_ssize_t xs, Py_ssize_t C, float *acc,
                                                            float *dweight)
{
    for (int xi = 0; xi < 16; xi++) {
        float *a = acc + xi * C;
        memcpy(a, s + xi * xs, C * sizeof(float));
        for (Py_ssize_t p = 1; p < nparts; p++) {
            const float *q = s + p * ps + xi * xs;
            for (Py_ssize_t c = 0; c < C; c++) a[c] += q[c];
        }
    }
    for (Py_ssize_t c = 0; c < C; c++, dweight += 9) {
        float S[4][4], T[3][4];
        for (int xi = 0; xi < 16; xi++) S[xi / 4][xi % 4] = acc[xi * C + c];
        for (int j = 0; j < 4; j++) {               /* G^T S */
            T[0][j] = S[0][j] + (S[1][j] + S[2][j]) * 0.5f;
            T[1][j] = (S[1][j] - S[2][j]) * 0.5f;
            T[2][j] = (S[1][j] + S[2][j]) * 0.5f + S[3][j];
        }
        for (int u = 0; u < 3; u++) {               /* (G^T S) G */
            dweight[3 * u] = T[u][0] + (T[u][1] + T[u][2]) * 0.5f;
            dweight[3 * u + 1] = (T[u][1] - T[u][2]) * 0.5f;
            dweight[3 * u + 2] = (T[u][1] + T[u][2]) * 0.5f + T[u][3];
        }
    }
}

#endif
