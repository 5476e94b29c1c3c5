/* chexcy/_ops_depthwise_lanes.h: depthwise convolutions (groups = C = F) on small planes with the
 * channels in the vector lanes: the DEPTHWISE_LANES path of chexcy._ops' conv planner.
 *
 * On a 7x7 or 14x14 plane, the DEPTHWISE path's work per plane (splitting it into padded phase planes
 * row by row, copying the output rows out) costs more than its multiply-adds: 500 cycles per 14x14
 * plane at stride 2, for 49 outputs of 9 taps. Here L = CHEXCY_VW channels of one sample are turned
 * around in registers, L x L floats at a time (log2 L rounds of interleaves), into a zero-bordered
 * buffer of (Hp, Wp) pixels, each pixel one vector of its L channels. Every tap of every output is then
 * one vector load and one multiply-add with that tap's L weights, at any stride, dilation or padding,
 * and the outputs are turned back into their L planes:
 *
 *   forward   unit (n, channel block): out[q] = bias + sum over taps t in (kh, kw) order of
 *             w[t] xp[pos(q) + off(t)], pos(q) = (oh sh Wp + ow sw) L, off(t) = (kh dil_h Wp + kw dil_w) L;
 *             8 outputs at a time (independent multiply-add chains).
 *   backward  unit: a channel block, its samples in order. dweight[t] += g[q] xp[pos(q) + off(t)] and
 *             dbias += g[q], summed in (n, oh, ow) order; dx spread from each output,
 *             dxp[pos(q) + off(t)] += w[t] g[q] in (oh, ow, t) order, into a zeroed (Hp, Wp) buffer whose
 *             inside is turned back into the dx planes.
 * Each channel is a lane of its own: its sums run in an order fixed by the shape, the same for any
 * thread count. The last block of C % L channels runs with zero lanes (never stored).
 *
 * GCC: the interleaves are chexcy_zip_lo / _hi (_ops_vec.h). */
#ifndef CHEXCY_OPS_DEPTHWISE_LANES_H
#define CHEXCY_OPS_DEPTHWISE_LANES_H

#include <stdint.h>
#include <string.h>
#include "_ops_vec.h"           /* chexcy_vf, loads and stores, chexcy_zip_lo / _hi (brings _ops_config.h) */
#include "_ops_depthwise.h"     /* CHEXCY_DWC_MAX_TAPS */

#define CHEXCY_DWL_L CHEXCY_VW      /* channels per block: one per lane */
#if CHEXCY_VW == 16
#define CHEXCY_DWL_ROUNDS 4
#elif CHEXCY_VW == 8
#define CHEXCY_DWL_ROUNDS 3
#else
#define CHEXCY_DWL_ROUNDS 2
#endif

typedef struct {
    Py_ssize_t C, H, W, OH, OW, T, sh, sw, ph, pw, Hp, Wp;
    Py_ssize_t toff[CHEXCY_DWC_MAX_TAPS];      /* tap t = kh KW + kw: (kh dil_h Wp + kw dil_w) L */
} chexcy_dwl_geom;

/* The geometry of one call; the caller checks KH KW <= CHEXCY_DWC_MAX_TAPS. */
static void chexcy_dwl_init(chexcy_dwl_geom *g, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t KH,
                            Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                            Py_ssize_t dil_h, Py_ssize_t dil_w)
{
    g->C = C; g->H = H; g->W = W; g->sh = sh; g->sw = sw; g->ph = ph; g->pw = pw;
    g->Hp = H + 2 * ph;
    g->Wp = W + 2 * pw;
    g->OH = (g->Hp - dil_h * (KH - 1) - 1) / sh + 1;
    g->OW = (g->Wp - dil_w * (KW - 1) - 1) / sw + 1;
    g->T = KH * KW;
    for (Py_ssize_t kh = 0; kh < KH; kh++)
        for (Py_ssize_t kw = 0; kw < KW; kw++)
            g->toff[kh * KW + kw] = (kh * dil_h * g->Wp + kw * dil_w) * CHEXCY_DWL_L;
}

/* Floats of one thread's scratch: xp | dxp (Hp Wp pixels each) | the outputs or dout (OH OW) | the
 * weights and bias of a block (T + 1 vectors). It must start zeroed: xp's border is never written. */
static inline Py_ssize_t chexcy_dwl_scratch_floats(const chexcy_dwl_geom *g)
{
    return (2 * g->Hp * g->Wp + g->OH * g->OW + g->T + 1) * CHEXCY_DWL_L;
}

/* r[i][j] <- r[j][i]: log2 L rounds, each pairing row i with row i + L/2 into rows 2i, 2i + 1. */
static inline __attribute__((always_inline)) void chexcy_dwl_transpose(chexcy_vf r[CHEXCY_DWL_L])
{
    for (int round = 0; round < CHEXCY_DWL_ROUNDS; round++) {
        chexcy_vf t[CHEXCY_DWL_L];
        CHEXCY_UNROLL
        for (int i = 0; i < CHEXCY_DWL_L / 2; i++) {
            t[2 * i] = chexcy_zip_lo(r[i], r[i + CHEXCY_DWL_L / 2]);
            t[2 * i + 1] = chexcy_zip_hi(r[i], r[i + CHEXCY_DWL_L / 2]);
        }
        CHEXCY_UNROLL
        for (int i = 0; i < CHEXCY_DWL_L; i++) r[i] = t[i];
    }
}

/* Cb planes (H, W) at x, HW floats apart, into pixels (ih + r0, iw + c0) of dst (pitch Wd pixels): lane
 * l of a pixel is plane l (0 past Cb). */
static void chexcy_dwl_gather(const float *x, Py_ssize_t Cb, Py_ssize_t H, Py_ssize_t W, float *dst,
                              Py_ssize_t Wd, Py_ssize_t r0, Py_ssize_t c0)
{
    const Py_ssize_t HW = H * W, L = CHEXCY_DWL_L;
    Py_ssize_t ih = 0, iw = 0;
    for (Py_ssize_t p0 = 0; p0 < HW; p0 += L) {
        const Py_ssize_t m = HW - p0 < L ? HW - p0 : L;
        chexcy_vf r[CHEXCY_DWL_L];
        CHEXCY_UNROLL
        for (int l = 0; l < CHEXCY_DWL_L; l++)
            r[l] = l >= Cb ? chexcy_splat(0.0f)
                 : m == L ? chexcy_load(x + l * HW + p0) : chexcy_load_partial(x + l * HW + p0, m);
        chexcy_dwl_transpose(r);
        for (Py_ssize_t j = 0; j < m; j++) {
            chexcy_store(dst + ((ih + r0) * Wd + iw + c0) * L, r[j]);
            if (++iw == W) { iw = 0; ih++; }
        }
    }
}

/* The inverse: pixels (oh + r0, ow + c0) of src (pitch Ws pixels) into Cb planes (OH, OW) at out. */
static void chexcy_dwl_scatter(const float *src, Py_ssize_t Ws, Py_ssize_t r0, Py_ssize_t c0, Py_ssize_t OH,
                               Py_ssize_t OW, float *out, Py_ssize_t Cb)
{
    const Py_ssize_t HW = OH * OW, L = CHEXCY_DWL_L;
    Py_ssize_t oh = 0, ow = 0;
    for (Py_ssize_t p0 = 0; p0 < HW; p0 += L) {
        const Py_ssize_t m = HW - p0 < L ? HW - p0 : L;
        chexcy_vf r[CHEXCY_DWL_L];
        for (Py_ssize_t j = 0; j < L; j++) {
            if (j < m) {
                r[j] = chexcy_load(src + ((oh + r0) * Ws + ow + c0) * L);
                if (++ow == OW) { ow = 0; oh++; }
            } else {
                r[j] = chexcy_splat(0.0f);
            }
        }
        chexcy_dwl_transpose(r);
        for (Py_ssize_t l = 0; l < Cb; l++) {
            if (m == L) chexcy_store(out + l * HW + p0, r[l]);
            else chexcy_store_partial(out + l * HW + p0, r[l], m);
        }
    }
}

/* wl[t L + l] = w[(c0 + l) T + t] (w (C, T)), then the bias (or zeros) as vector T; 0 past Cb. */
static void chexcy_dwl_weights(const chexcy_dwl_geom *g, const float *w, const float *bias, Py_ssize_t c0,
                               Py_ssize_t Cb, float *wl)
{
    const Py_ssize_t T = g->T, L = CHEXCY_DWL_L;
    for (Py_ssize_t t = 0; t <= T; t++)
        for (Py_ssize_t l = 0; l < L; l++)
            wl[t * L + l] = l >= Cb ? 0.0f : t < T ? w[(c0 + l) * T + t] : bias ? bias[c0 + l] : 0.0f;
}

/* The offset in xp of the pixel that output (oh, ow)'s tap (0, 0) reads. */
#define CHEXCY_DWL_POS(g, oh, ow) (((oh) * (g)->sh * (g)->Wp + (ow) * (g)->sw) * CHEXCY_DWL_L)

static inline __attribute__((always_inline)) void chexcy_dwl_fwd_outputs(
    const chexcy_dwl_geom *g, const float *restrict xp, const float *restrict wl, float *restrict op,
    const Py_ssize_t T)
{
    const Py_ssize_t OHW = g->OH * g->OW, L = CHEXCY_DWL_L;
    const chexcy_vf bias = chexcy_load(wl + T * L);
    Py_ssize_t oh = 0, ow = 0;
    for (Py_ssize_t q0 = 0; q0 < OHW; q0 += 8) {
        const Py_ssize_t m = OHW - q0 < 8 ? OHW - q0 : 8;
        const float *s[8];
        chexcy_vf a[8];
        const float *last = xp;
        for (int j = 0; j < 8; j++) {
            if (j < m) {                /* past the last output: that one again, never stored */
                last = xp + CHEXCY_DWL_POS(g, oh, ow);
                if (++ow == g->OW) { ow = 0; oh++; }
            }
            s[j] = last;
            a[j] = bias;
        }
        for (Py_ssize_t t = 0; t < T; t++) {
            const chexcy_vf wt = chexcy_load(wl + t * L);
            const Py_ssize_t off = g->toff[t];
            CHEXCY_UNROLL
            for (int j = 0; j < 8; j++) a[j] += wt * chexcy_load(s[j] + off);
        }
        for (Py_ssize_t j = 0; j < m; j++) chexcy_store(op + (q0 + j) * L, a[j]);
    }
}

/* Forward unit u = n NCB + cb (NCB = ceil(C / L) blocks per sample): out[n, cb L ..] from x (N, C, H, W),
 * w (C, T), bias (C,) into out (N, C, OH, OW). scratch: chexcy_dwl_scratch_floats, zeroed before this
 * thread's first unit. */
static void chexcy_dwl_forward_unit(const chexcy_dwl_geom *g, Py_ssize_t u, const float *x, const float *w,
                                    const float *bias, float *out, float *scratch)
{
    const Py_ssize_t L = CHEXCY_DWL_L, C = g->C, NCB = (C + L - 1) / L;
    const Py_ssize_t n = u / NCB, c0 = u % NCB * L, Cb = C - c0 < L ? C - c0 : L;
    const Py_ssize_t HW = g->H * g->W, OHW = g->OH * g->OW, HWp = g->Hp * g->Wp;
    float *xp = scratch, *op = scratch + 2 * HWp * L, *wl = op + OHW * L;
    chexcy_dwl_weights(g, w, bias, c0, Cb, wl);
    chexcy_dwl_gather(x + (n * C + c0) * HW, Cb, g->H, g->W, xp, g->Wp, g->ph, g->pw);
    if (g->T == 9) chexcy_dwl_fwd_outputs(g, xp, wl, op, 9);
    else if (g->T == 25) chexcy_dwl_fwd_outputs(g, xp, wl, op, 25);
    else chexcy_dwl_fwd_outputs(g, xp, wl, op, g->T);
    chexcy_dwl_scatter(op, g->OW, 0, 0, g->OH, g->OW, out + (n * C + c0) * OHW, Cb);
}

/* One sample's dweight / dbias sums (acc: T + 1 vectors, carried over the samples) and its dx spread
 * into dxp, from xp and gp (dout's OH OW pixels). */
static inline __attribute__((always_inline)) void chexcy_dwl_bwd_outputs(
    const chexcy_dwl_geom *g, const float *restrict xp, const float *restrict gp, const float *restrict wl,
    float *restrict dxp, chexcy_vf *restrict acc, const Py_ssize_t T)
{
    const Py_ssize_t L = CHEXCY_DWL_L;
    chexcy_vf a[CHEXCY_DWC_MAX_TAPS + 1], wt[CHEXCY_DWC_MAX_TAPS];
    CHEXCY_UNROLL
    for (Py_ssize_t t = 0; t <= T; t++) a[t] = acc[t];
    CHEXCY_UNROLL
    for (Py_ssize_t t = 0; t < T; t++) wt[t] = chexcy_load(wl + t * L);
    Py_ssize_t q = 0;
    for (Py_ssize_t oh = 0; oh < g->OH; oh++)
        for (Py_ssize_t ow = 0; ow < g->OW; ow++, q++) {
            const chexcy_vf gv = chexcy_load(gp + q * L);
            const Py_ssize_t pos = CHEXCY_DWL_POS(g, oh, ow);
            a[T] += gv;
            CHEXCY_UNROLL
            for (Py_ssize_t t = 0; t < T; t++) {
                const Py_ssize_t p = pos + g->toff[t];
                a[t] += gv * chexcy_load(xp + p);
                chexcy_store(dxp + p, chexcy_load(dxp + p) + wt[t] * gv);
            }
        }
    CHEXCY_UNROLL
    for (Py_ssize_t t = 0; t <= T; t++) acc[t] = a[t];
}

/* Backward unit: channel block cb, all N samples in order: dx[:, cb L ..], dweight and dbias of its
 * channels, from dout (N, C, OH, OW), x (N, C, H, W), w (C, T). */
static void chexcy_dwl_backward_block(const chexcy_dwl_geom *g, Py_ssize_t N, Py_ssize_t cb, const float *dout,
                                      const float *x, const float *w, float *dx, float *dweight, float *dbias,
                                      float *scratch)
{
    const Py_ssize_t L = CHEXCY_DWL_L, C = g->C, T = g->T, c0 = cb * L, Cb = C - c0 < L ? C - c0 : L;
    const Py_ssize_t HW = g->H * g->W, OHW = g->OH * g->OW, HWp = g->Hp * g->Wp;
    float *xp = scratch, *dxp = scratch + HWp * L, *gp = dxp + HWp * L, *wl = gp + OHW * L;
    chexcy_vf acc[CHEXCY_DWC_MAX_TAPS + 1];
    for (Py_ssize_t t = 0; t <= T; t++) acc[t] = chexcy_splat(0.0f);
    chexcy_dwl_weights(g, w, NULL, c0, Cb, wl);
    for (Py_ssize_t n = 0; n < N; n++) {
        chexcy_dwl_gather(x + (n * C + c0) * HW, Cb, g->H, g->W, xp, g->Wp, g->ph, g->pw);
        chexcy_dwl_gather(dout + (n * C + c0) * OHW, Cb, g->OH, g->OW, gp, g->OW, 0, 0);
        memset(dxp, 0, (size_t)(HWp * L) * sizeof(float));
        if (T == 9) chexcy_dwl_bwd_outputs(g, xp, gp, wl, dxp, acc, 9);
        else if (T == 25) chexcy_dwl_bwd_outputs(g, xp, gp, wl, dxp, acc, 25);
        else chexcy_dwl_bwd_outputs(g, xp, gp, wl, dxp, acc, T);
        chexcy_dwl_scatter(dxp, g->Wp, g->ph, g->pw, g->H, g->W, dx + (n * C + c0) * HW, Cb);
    }
    float lanes[CHEXCY_DWL_L];
    for (Py_ssize_t t = 0; t <= T; t++) {
        chexcy_store(lanes, acc[t]);
        for (Py_ssize_t l = 0; l < Cb; l++) {
            if (t < T) dweight[(c0 + l) * T + t] = lanes[l];
            else dbias[c0 + l] = lanes[l];
        }
    }
}

#endif
