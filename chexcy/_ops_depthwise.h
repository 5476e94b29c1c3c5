/* chexcy/_ops_depthwise.h: depthwise convolutions (groups = C = F: one input and one output channel
 * per group), the DEPTHWISE path of chexcy._ops' conv planner. Memory-bound: KH KW multiply-adds per
 * value read, so the aim is one pass over each plane with the row in L1, at any stride and dilation.
 *
 * Per (n, c) plane the input is copied into a zero-padded buffer (Hp, Wp); then
 *   forward  out[oh, ow] = bias + sum over (kh, kw) in order of w[kh, kw] xpad[oh sh + kh dil_h, ow sw + kw dil_w]
 *            (a whole output row per tap: the loop over ow vectorises; stride 1 and 2 compiled with the
 *            stride known);
 *   dx       dxpad[oh sh + kh dil_h, ow sw + kw dil_w] += w[kh, kw] dout[oh, ow], rows in order, then
 *            the inside of dxpad copied out;
 *   dweight  per channel, lane sums acc[kh, kw][ow] += dout[n, oh, ow] xpad[...] over (n, oh) in order,
 *            then each tap's OW lanes added in order in float64 (dbias the same over dout).
 * Work: forward and dx over (n, c) planes, dweight over channels; every sum in an order fixed by the
 * shape (bitwise the same for any thread count).
 *
 * Needs _ops_config.h first. */
#ifndef CHEXCY_OPS_DEPTHWISE_H
#define CHEXCY_OPS_DEPTHWISE_H

#include <string.h>

static inline __attribute__((always_inline)) void chexcy_dwc_fma_row(
    float *restrict acc, const float *restrict src, float w, Py_ssize_t SW, Py_ssize_t n)
{
    for (Py_ssize_t j = 0; j < n; j++) acc[j] += w * src[j * SW];
}

static inline void chexcy_dwc_row(float *restrict acc, const float *restrict src, float w, Py_ssize_t sw,
                                  Py_ssize_t n)
{
    if (sw == 1)
        chexcy_dwc_fma_row(acc, src, w, 1, n);
    else if (sw == 2)
        chexcy_dwc_fma_row(acc, src, w, 2, n);
    else
        chexcy_dwc_fma_row(acc, src, w, sw, n);
}

/* out (OH, OW) of one plane from its padded input xp (Hp, Wp) and kernel w (KH, KW). */
static void chexcy_dwc_forward_plane(const float *xp, const float *w, float bias, float *out, Py_ssize_t Wp,
                                     Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t OH, Py_ssize_t OW,
                                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dil_h, Py_ssize_t dil_w)
{
    for (Py_ssize_t oh = 0; oh < OH; oh++) {
        float *o = out + oh * OW;
        for (Py_ssize_t j = 0; j < OW; j++) o[j] = bias;
        for (Py_ssize_t kh = 0; kh < KH; kh++) {
            const float *row = xp + (oh * sh + kh * dil_h) * Wp;
            for (Py_ssize_t kw = 0; kw < KW; kw++)
                chexcy_dwc_row(o, row + kw * dil_w, w[kh * KW + kw], sw, OW);
        }
    }
}

static inline __attribute__((always_inline)) void chexcy_dwc_scatter_row(
    float *restrict dst, const float *restrict g, float w, Py_ssize_t SW, Py_ssize_t n)
{
    for (Py_ssize_t j = 0; j < n; j++) dst[j * SW] += w * g[j];
}

/* dxp (Hp, Wp), zeroed here: the padded input gradient of one plane from dout (OH, OW). */
static void chexcy_dwc_dx_plane(const float *dout, const float *w, float *dxp, Py_ssize_t Hp, Py_ssize_t Wp,
                                Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t sh,
                                Py_ssize_t sw, Py_ssize_t dil_h, Py_ssize_t dil_w)
{
    memset(dxp, 0, Hp * Wp * sizeof(float));
    for (Py_ssize_t oh = 0; oh < OH; oh++) {
        const float *g = dout + oh * OW;
        for (Py_ssize_t kh = 0; kh < KH; kh++) {
            float *row = dxp + (oh * sh + kh * dil_h) * Wp;
            for (Py_ssize_t kw = 0; kw < KW; kw++) {
                const float wv = w[kh * KW + kw];
                if (sw == 1)
                    chexcy_dwc_scatter_row(row + kw * dil_w, g, wv, 1, OW);
                else if (sw == 2)
                    chexcy_dwc_scatter_row(row + kw * dil_w, g, wv, 2, OW);
                else
                    chexcy_dwc_scatter_row(row + kw * dil_w, g, wv, sw, OW);
            }
        }
    }
}

/* acc (KH KW + 1, OW) += the lane sums of one sample's plane: dout (OH, OW) against the padded input
 * xp (Hp, Wp) per tap, and dout itself in the last row (dbias). */
static void chexcy_dwc_dweight_plane(const float *dout, const float *xp, float *acc, Py_ssize_t Wp,
                                     Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t OH, Py_ssize_t OW,
                                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dil_h, Py_ssize_t dil_w)
{
    float *bacc = acc + KH * KW * OW;
    for (Py_ssize_t oh = 0; oh < OH; oh++) {
        const float *restrict g = dout + oh * OW;
        for (Py_ssize_t j = 0; j < OW; j++) bacc[j] += g[j];
        for (Py_ssize_t kh = 0; kh < KH; kh++) {
            const float *row = xp + (oh * sh + kh * dil_h) * Wp;
            for (Py_ssize_t kw = 0; kw < KW; kw++) {
                float *restrict a = acc + (kh * KW + kw) * OW;
                const float *restrict src = row + kw * dil_w;
                if (sw == 1)
                    for (Py_ssize_t j = 0; j < OW; j++) a[j] += g[j] * src[j];
                else if (sw == 2)
                    for (Py_ssize_t j = 0; j < OW; j++) a[j] += g[j] * src[2 * j];
                else
                    for (Py_ssize_t j = 0; j < OW; j++) a[j] += g[j] * src[j * sw];
            }
        }
    }
}

#endif
