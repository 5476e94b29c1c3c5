/* chexcy/_ops_pool.h: the row kernels of chexcy._ops' max and average pooling over float32 (N, C, H, W)
 * planes (the entry points split the work over (n, c) planes; each plane is one thread's).
 *
 * Max pooling, general (any kernel, stride, padding, dilation): one output row at a time. The row's
 * running maxima and their flat input indices live in two small arrays, and every kernel tap (kh, kw)
 * in scan order updates the whole row at once,
 *     take = idx < 0 || v > best || (v is NaN && best is not),
 * so the rule is the reference's exactly (the first maximum in (kh, kw) order, the first NaN wins,
 * padding never does) while the loop over output columns has no branch and vectorises. Taps outside
 * the input are skipped by clipping the column range (no padded copy). At column stride 2 (dilation
 * 1) each input row is split into even and odd columns first, so every tap reads contiguous floats.
 *
 * Max pooling 2 x 2, stride 2, no padding (VGG-style and ref-cnn's pools): one output row from two input
 * rows as if-converted selects on int64 indices, and its backward writing both input rows whole when
 * every argmax lies in its own cell (no zeroing pass, no scatter).
 *
 * Average pooling 2 x 2, stride 2, no padding (DenseNet's transitions): one output row from two input
 * rows, and its backward writing both input rows whole.
 *
 * Self-contained: needs only Py_ssize_t (Python.h).
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

/* The same update for a tap whose value for output ow is v[ow + e] (contiguous) and whose flat input
 * index is i0 + 2 * ow: the stride-2 taps after chexcy_pool_split_row. */
static inline __attribute__((always_inline)) void chexcy_maxpool_tap2(
    const float *v, Py_ssize_t e, Py_ssize_t lo, Py_ssize_t hi, int32_t i0, float *best, int32_t *idx)
{
    for (Py_ssize_t ow = lo; ow < hi; ow++) {
        const float x = v[ow + e];
        const float b = best[ow];
        const int32_t i = idx[ow];
        const int take = (i < 0) | (x > b) | ((x != x) & (b == b));
        best[ow] = take ? x : b;
        idx[ow] = take ? i0 + 2 * (int32_t)ow : i;
    }
}

/* The values alone (no index: an eval-mode forward, which no backward reads): the same choice of value as
 * the two taps above. best starts at -inf; a tap replaces it when greater, or when NaN over a number. */
static inline __attribute__((always_inline)) void chexcy_maxpool_tap_values(
    const float *v, Py_ssize_t step, Py_ssize_t base, Py_ssize_t lo, Py_ssize_t hi, float *best)
{
    for (Py_ssize_t ow = lo; ow < hi; ow++) {
        const float x = v[ow * step + base];
        const float b = best[ow];
        best[ow] = (x > b) | ((x != x) & (b == b)) ? x : b;
    }
}

/* Row r of W floats split by column parity: even[j] = r[2j], odd[j] = r[2j + 1]. */
static inline void chexcy_pool_split_row(const float *restrict r, float *restrict even, float *restrict odd,
                                       Py_ssize_t W)
{
    const Py_ssize_t half = W / 2;
    for (Py_ssize_t j = 0; j < half; j++) {
        even[j] = r[2 * j];
        odd[j] = r[2 * j + 1];
    }
    if (W & 1)
        even[half] = r[W - 1];
}

/* One (n, c) plane: x (H, W) -> out (OH, OW), arg (OH, OW) flat indices ih * W + iw; with arg NULL the
 * values alone, each output row built in place (chexcy_maxpool_tap_values).
 * best, idx: scratch of OW floats / ints; row: scratch of W + 2 floats (this thread's). H * W < 2^31
 * (checked by the caller).
 * Column stride 2 with column dilation 1 (ResNet's 3 x 3 / stride 2 stem pool): each input row is first
 * split into its even and odd columns, so that every tap reads a contiguous run (tap kw's column for
 * output ow, 2 ow + kw - pw, is even[ow + e] or odd[ow + e]); strided loads had made the forward
 * compute-bound at 2-3x the time of its memory traffic. */
static void chexcy_max_pool_plane(const float *x, float *out, int64_t *arg, Py_ssize_t H, Py_ssize_t W,
                                  Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
                                  Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                                  Py_ssize_t dil_h, Py_ssize_t dil_w, float *best, int32_t *idx, float *row)
{
    const int split = sw == 2 && dil_w == 1;
    float *even = row, *odd = row + (W + 1) / 2 + 1;
    for (Py_ssize_t oh = 0; oh < OH; oh++) {
        if (!arg)
            best = out + oh * OW;           /* values only: straight into the output row */
        for (Py_ssize_t ow = 0; ow < OW; ow++) {
            best[ow] = -INFINITY;
            idx[ow] = -1;
        }
        for (Py_ssize_t kh = 0; kh < KH; kh++) {
            const Py_ssize_t ih = oh * sh - ph + kh * dil_h;
            if (ih < 0 || ih >= H)
                continue;
            const float *xr = x + ih * W;
            if (split)
                chexcy_pool_split_row(xr, even, odd, W);
            for (Py_ssize_t kw = 0; kw < KW; kw++) {
                const Py_ssize_t base = kw * dil_w - pw;       /* iw = ow * sw + base in [0, W) */
                Py_ssize_t lo = base < 0 ? (-base + sw - 1) / sw : 0;
                Py_ssize_t hi = W - base <= 0 ? 0 : (W - base + sw - 1) / sw;
                if (hi > OW)
                    hi = OW;
                if (lo >= hi)
                    continue;
                if (split) {
                    /* iw = 2 ow + base: even[ow + base / 2] when base is even, odd[ow + (base - 1) / 2]
                     * when odd (floor division; lo keeps the index >= 0) */
                    const Py_ssize_t e = base >= 0 ? base / 2 : -((1 - base) / 2);
                    if (!arg)
                        chexcy_maxpool_tap_values((base % 2) == 0 ? even : odd, 1, e, lo, hi, best);
                    else
                        chexcy_maxpool_tap2((base % 2) == 0 ? even : odd, e, lo, hi, (int32_t)(ih * W + base),
                                            best, idx);
                } else if (!arg)
                    chexcy_maxpool_tap_values(xr, sw, base, lo, hi, best);
                else if (sw == 1)
                    chexcy_maxpool_tap(xr, 1, base, lo, hi, (int32_t)(ih * W), best, idx);
                else
                    chexcy_maxpool_tap(xr, sw, base, lo, hi, (int32_t)(ih * W), best, idx);
            }
        }
        if (arg)
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

/* A whole plane of it, x (H, W) -> out (OH, OW): one call a plane, not a row (a 14x14 plane has 7 rows
 * of 7 outputs: the calls cost more than the sums). */
static void chexcy_avg_pool_2x2_plane(const float *restrict x, Py_ssize_t W, float *restrict out,
                                      Py_ssize_t OH, Py_ssize_t OW)
{
    for (Py_ssize_t oh = 0; oh < OH; oh++)
        chexcy_avg_pool_2x2_row(x + 2 * oh * W, x + (2 * oh + 1) * W, out + oh * OW, OW);
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

/* Its gradient for a whole plane: dx (H, W) from g (OH, OW), the row below the last window (H odd) 0. */
static void chexcy_avg_unpool_2x2_plane(const float *restrict g, float *restrict dx, Py_ssize_t H, Py_ssize_t W,
                                        Py_ssize_t OH, Py_ssize_t OW)
{
    for (Py_ssize_t oh = 0; oh < OH; oh++)
        chexcy_avg_unpool_2x2_row(g + oh * OW, dx + 2 * oh * W, dx + (2 * oh + 1) * W, W, OW);
    if (H > 2 * OH)
        memset(dx + 2 * OH * W, 0, W * sizeof(float));
}

#endif
