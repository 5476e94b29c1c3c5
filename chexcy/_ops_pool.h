/* chexcy/_ops_pool.h: max pooling for any kernel, stride, padding and dilation (the general path of
 * chexcy._ops' max_pool2d_forward; 2x2 / stride 2 without padding keeps its own row kernel in
 * _ops_config.h).
 *
 * One output row at a time: the row's running maxima and their flat input indices live in two small
 * arrays, and every kernel tap (kh, kw) in scan order updates the whole row at once,
 *     take = idx < 0 || v > best || (v is NaN && best is not),
 * so the rule is the reference's exactly (the first maximum in (kh, kw) order, the first NaN wins,
 * padding never does) while the loop over output columns has no branch and vectorises. Taps outside
 * the input are skipped by clipping the column range (no padded copy).
 *
 * Needs _ops_config.h first.
 */
#ifndef CHEXCY_OPS_POOL_H
#define CHEXCY_OPS_POOL_H

#include <math.h>
#include <stdint.h>

/* best/idx over output columns [lo, hi) of a row for one tap whose column for output 0 is `base`
 * (iw = ow * SW + base), reading row `xr` of an H x W plane at input row ih. SW is a compile-time
 * constant in the common cases, so the strided loads vectorise. */
static inline __attribute__((always_inline)) void chexcy_maxpool_tap(
    const float *xr, Py_ssize_t SW, Py_ssize_t base, Py_ssize_t lo, Py_ssize_t hi, int32_t rowbase,
    float *best, int32_t *idx)
{
    for (Py_ssize_t ow = lo; ow < hi; ow++) {
        const float v = xr[ow * SW + base];
        const float b = best[ow];
        const int32_t i = idx[ow];
        const int take = (i < 0) | (v > b) | ((v != v) & (b == b));
        best[ow] = take ? v : b;
        idx[ow] = take ? rowbase + (int32_t)(ow * SW + base) : i;
    }
}

/* One (n, c) plane: x (H, W) -> out (OH, OW), arg (OH, OW) flat indices ih * W + iw.
 * best, idx: scratch of OW floats / ints (this thread's). H * W < 2^31 (checked by the caller). */
static void chexcy_max_pool_plane(const float *x, float *out, int64_t *arg, Py_ssize_t H, Py_ssize_t W,
                                  Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
                                  Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                  Py_ssize_t dil_h, Py_ssize_t dil_w, float *best, int32_t *idx)
{
    for (Py_ssize_t oh = 0; oh < OH; oh++) {
        for (Py_ssize_t ow = 0; ow < OW; ow++) {
            best[ow] = -INFINITY;
            idx[ow] = -1;
        }
        for (Py_ssize_t kh = 0; kh < KH; kh++) {
            const Py_ssize_t ih = oh * sh - ph + kh * dil_h;
            if (ih < 0 || ih >= H)
                continue;
            const float *xr = x + ih * W;
            for (Py_ssize_t kw = 0; kw < KW; kw++) {
                const Py_ssize_t base = kw * dil_w - pw;       /* iw = ow * sw + base in [0, W) */
                Py_ssize_t lo = base < 0 ? (-base + sw - 1) / sw : 0;
                Py_ssize_t hi = W - base <= 0 ? 0 : (W - base + sw - 1) / sw;
                if (hi > OW)
                    hi = OW;
                if (lo >= hi)
                    continue;
                if (sw == 1)
                    chexcy_maxpool_tap(xr, 1, base, lo, hi, (int32_t)(ih * W), best, idx);
                else if (sw == 2)
                    chexcy_maxpool_tap(xr, 2, base, lo, hi, (int32_t)(ih * W), best, idx);
                else
                    chexcy_maxpool_tap(xr, sw, base, lo, hi, (int32_t)(ih * W), best, idx);
            }
        }
        for (Py_ssize_t ow = 0; ow < OW; ow++) {
            out[oh * OW + ow] = best[ow];
            arg[oh * OW + ow] = idx[ow];
        }
    }
}

/* Average pool 2x2, stride 2, no padding (DenseNet's transitions), one output row: the window summed
 * in the generic loop's order (row 0 left, right, row 1 left, right), then divided by 4. */
static void chexcy_avg_pool_2x2_row(const float *restrict r0, const float *restrict r1, float *restrict out,
                                    Py_ssize_t OW)
{
    for (Py_ssize_t ow = 0; ow < OW; ow++)
        out[ow] = (((r0[2 * ow] + r0[2 * ow + 1]) + r1[2 * ow]) + r1[2 * ow + 1]) / 4.0f;
}

/* Its gradient for one output row: the two input rows written whole (dout / 4 in each cell of the
 * window; the column no window reached, when W is odd, 0). */
static void chexcy_avg_unpool_2x2_row(const float *restrict g, float *restrict d0, float *restrict d1,
                                      Py_ssize_t W, Py_ssize_t OW)
{
    for (Py_ssize_t ow = 0; ow < OW; ow++) {
        const float v = g[ow] / 4.0f;
        d0[2 * ow] = v;
        d0[2 * ow + 1] = v;
        d1[2 * ow] = v;
        d1[2 * ow + 1] = v;
    }
    for (Py_ssize_t j = 2 * OW; j < W; j++) {
        d0[j] = 0.0f;
        d1[j] = 0.0f;
    }
}

#endif
