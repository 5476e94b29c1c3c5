/* chexcy/_ops_conv_gemm.h: convolution as a matrix product on the dense layer's register tile
 * (the IM2COL_GEMM and POINTWISE_GEMM paths of chexcy._ops' conv planner).
 *
 * Per sample n and group g, the forward convolution is one product
 *
 *   out[n, g] (Fg, P) = bias + W[g] (Fg, K) . B (K, P),   K = Cg KH KW,  P = OH OW,
 *   B[k, p] = xpad[c, oh sh + kh dil_h, ow sw + kw dil_w]   for k = (c, kh, kw), p = (oh, ow),
 *
 * with xpad the input of (n, g) zero-padded by (ph, pw). B (the "im2col" matrix) is never stored:
 * each block of GEMM_KC rows x GEMM_NR columns is gathered straight into the packed layout the
 * register tile reads (chexcy_cg_pack_b), so the stride, the dilation and the kernel taps all fold into
 * the packing. A 1x1 convolution at stride 1 without padding reads x itself (B = x[n] viewed as
 * (C, H W)): the packing is then a copy of contiguous row segments, and that is the whole im2col.
 *
 * Reproducibility: every output element is bias + s_0 + s_1 + ..., s_b the sum of K block b (its
 * GEMM_KC steps in k order, from 0), added in that order; the blocks are fixed by K alone, so the value
 * does not depend on which task or thread computed it (as the linear op, _ops_gemm.h).
 *
 * Needs _ops_config.h and _ops_gemm.h first.
 */
#ifndef CHEXCY_OPS_CONV_GEMM_H
#define CHEXCY_OPS_CONV_GEMM_H

#include <string.h>

/* Where one (sample, group) product reads its input and how B is laid over it. */
typedef struct {
    const float *x;         /* (Cg, Hp, Wp): the zero-padded input of this (n, g) (or x itself) */
    Py_ssize_t Hp, Wp;      /* padded plane size */
    Py_ssize_t KH, KW, sh, sw, dil_h, dil_w;
    Py_ssize_t OW, P;       /* output width, output positions OH * OW */
} chexcy_cg_geom;

/* dst (kc, GEMM_NR) = B[k0 .. k0 + kc - 1, j0 .. j0 + GEMM_NR - 1], columns at or past P set to 0.
 * When the GEMM_NR positions are equally spaced in the input (one output row, or a 1x1 convolution
 * at stride 1 over whole rows) each row of the block is a strided copy (contiguous at column stride 1);
 * otherwise each position's offset is computed once per block and gathered. */
static void chexcy_cg_pack_b(const chexcy_cg_geom *g, Py_ssize_t j0, Py_ssize_t k0, Py_ssize_t kc,
                             float *dst)
{
    Py_ssize_t off[GEMM_NR];
    const Py_ssize_t nr = g->P - j0 < GEMM_NR ? g->P - j0 : GEMM_NR;
    const Py_ssize_t plane = g->Hp * g->Wp, taps = g->KH * g->KW, sw = g->sw;
    for (Py_ssize_t j = 0; j < GEMM_NR; j++) {
        const Py_ssize_t p = j0 + (j < nr ? j : nr - 1);
        off[j] = p / g->OW * g->sh * g->Wp + p % g->OW * sw;
    }
    const int even = nr == GEMM_NR && off[GEMM_NR - 1] - off[0] == (GEMM_NR - 1) * sw;
    Py_ssize_t c = k0 / taps, t = k0 % taps, kh = t / g->KW, kw = t % g->KW;
    for (Py_ssize_t k = 0; k < kc; k++) {
        const float *src = g->x + c * plane + kh * g->dil_h * g->Wp + kw * g->dil_w;
        float *d = dst + k * GEMM_NR;
        if (even) {
            const float *s = src + off[0];
            if (sw == 1) {
                memcpy(d, s, GEMM_NR * sizeof(float));
            } else if (sw == 2) {
                GEMM_UNROLL_ALL for (int j = 0; j < GEMM_NR; j++) d[j] = s[2 * j];
            } else {
                for (Py_ssize_t j = 0; j < GEMM_NR; j++) d[j] = s[j * sw];
            }
        } else {
            for (Py_ssize_t j = 0; j < nr; j++) d[j] = src[off[j]];
            for (Py_ssize_t j = nr; j < GEMM_NR; j++) d[j] = 0.0f;
        }
        if (++kw == g->KW) {
            kw = 0;
            if (++kh == g->KH) {
                kh = 0;
                c++;
            }
        }
    }
}

/* One task: output columns of strips s0 .. s1 - 1 (GEMM_NR positions each) of one (n, g) product,
 * all Fg rows, all of K:
 *   ap: the group's packed weight (chexcy_gemm_pack_a_part's layout), bias: (Fg,) or NULL (zeros),
 *   out: (Fg, P) rows P floats apart, bbuf: this thread's GEMM_KC x GEMM_NR floats.
 * K blocks outermost (each element's sums in k order), then strips, then row strips of the weight:
 * a B block is gathered once and meets every output channel while it is in L1. */
static void chexcy_cg_task(const chexcy_cg_geom *g, const float *ap, const float *bias, Py_ssize_t Fg,
                           Py_ssize_t K, Py_ssize_t s0, Py_ssize_t s1, float *out, float *bbuf)
{
    const Py_ssize_t Fp = (Fg + GEMM_MR - 1) / GEMM_MR * GEMM_MR, P = g->P;
    for (Py_ssize_t k0 = 0; k0 < K; k0 += GEMM_KC) {
        const Py_ssize_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
        const float *ablk = ap + k0 * Fp;
        for (Py_ssize_t s = s0; s < s1; s++) {
            const Py_ssize_t j0 = s * GEMM_NR, nr = P - j0 < GEMM_NR ? P - j0 : GEMM_NR;
            chexcy_cg_pack_b(g, j0, k0, kc, bbuf);
            for (Py_ssize_t i0 = 0; i0 < Fg; i0 += GEMM_MR) {
                const Py_ssize_t mr = Fg - i0 < GEMM_MR ? Fg - i0 : GEMM_MR;
                float *c = out + i0 * P + j0;
                if (k0 == 0)            /* start from the bias: the tile adds the block sums to it */
                    for (Py_ssize_t i = 0; i < mr; i++) {
                        const float b = bias ? bias[i0 + i] : 0.0f;
                        for (Py_ssize_t j = 0; j < nr; j++) c[i * P + j] = b;
                    }
                if (mr == GEMM_MR && nr == GEMM_NR)
                    chexcy_gemm_tile(kc, ablk + i0 * kc, bbuf, c, P, NULL);
                else
                    chexcy_gemm_tile_edge(kc, ablk + i0 * kc, bbuf, c, P, NULL, mr, nr);
            }
        }
    }
}

/* ---- forward on phase planes ---------------------------------------------------------------------
 * The gather above costs a scalar load and store per element of B whenever a strip of GEMM_NR positions
 * spans more than one output row (every strip of a 28-, 14- or 7-wide output): about 40% of the tile's
 * time at 3x3 stride 2, 128 channels. The IM2COL_GEMM forward therefore first splits the padded input
 * of every (n, c) into sh sw phase planes (Hq, Wq), Hq = ceil(Hp / sh), Wq = ceil(Wp / sw):
 *
 *   phase (a, b)[i, j] = xpad[i sh + a, j sw + b]   (0 past the padded plane).
 *
 * Tap (kh, kw) of output (oh, ow) reads xpad[oh sh + r, ow sw + s], r = kh dil_h, s = kw dil_w, which is
 * phase (r % sh, s % sw)[oh + r / sh, ow + s / sw]. Numbering the outputs over whole phase rows,
 * q = oh Wq + ow with ow < Wq (the columns ow >= OW are computed and dropped), B[k, q] is element
 * q + (r / sh) Wq + s / sw of that plane for every q: each row of a packed block is one contiguous copy.
 * Only the Wq - OW dropped columns per row are extra work (1 in 29 at 56x56, 1 in 8 at 14x14).
 * The sums are those of chexcy_cg_task (same B values, same K blocks in the same order), so the results
 * are bitwise those of the gathering path. */

/* The phase planes of one zero-padded plane x (H, W), padding (ph, pw): phase (a, b), (Hq, Wq), at
 * dst + (a sw + b) pstride, element [i, j] = xpad[i sh + a, j sw + b] (zero outside x). */
static void chexcy_cg_phase_split(const float *x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                                  Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t Hq, Py_ssize_t Wq, float *dst,
                                  Py_ssize_t pstride)
{
    for (Py_ssize_t a = 0; a < sh; a++)
        for (Py_ssize_t b = 0; b < sw; b++) {
            float *plane = dst + (a * sw + b) * pstride;
            /* columns j of this phase that fall inside x: j sw + b - pw in [0, W) */
            const Py_ssize_t jlo = pw > b ? (pw - b + sw - 1) / sw : 0;
            Py_ssize_t jhi = W + pw - b > 0 ? (W + pw - b - 1) / sw + 1 : 0;
            if (jhi > Wq) jhi = Wq;
            for (Py_ssize_t i = 0; i < Hq; i++) {
                float *row = plane + i * Wq;
                const Py_ssize_t ih = i * sh + a - ph;
                if (ih < 0 || ih >= H || jhi <= jlo) {
                    memset(row, 0, Wq * sizeof(float));
                    continue;
                }
                const float *xr = x + ih * W + b - pw;
                for (Py_ssize_t j = 0; j < jlo; j++) row[j] = 0.0f;
                if (sw == 1)
                    memcpy(row + jlo, xr + jlo, (jhi - jlo) * sizeof(float));
                else if (sw == 2)   /* a constant stride: vectorized (the variable one ran scalar, 12% of the forward) */
                    for (Py_ssize_t j = jlo; j < jhi; j++) row[j] = xr[2 * j];
                else
                    for (Py_ssize_t j = jlo; j < jhi; j++) row[j] = xr[j * sw];
                for (Py_ssize_t j = jhi; j < Wq; j++) row[j] = 0.0f;
            }
        }
}

/* The inverse for an unpadded split: x (H, W)[ih, iw] = phase (ih % sh, iw % sw)[ih / sh, iw / sw] of
 * planes laid out as chexcy_cg_phase_split's, Wq wide; every element of x written once. */
static void chexcy_cg_phase_merge(const float *src, Py_ssize_t pstride, Py_ssize_t Wq, Py_ssize_t sh,
                                  Py_ssize_t sw, float *x, Py_ssize_t H, Py_ssize_t W)
{
    for (Py_ssize_t ih = 0; ih < H; ih++) {
        float *row = x + ih * W;
        for (Py_ssize_t b = 0; b < sw && b < W; b++) {
            const float *q = src + (ih % sh * sw + b) * pstride + ih / sh * Wq;
            for (Py_ssize_t iw = b, j = 0; iw < W; iw += sw, j++)
                row[iw] = q[j];
        }
    }
}

/* Offsets of the KH KW taps of one channel in its phase planes: off[kh KW + kw] as described above. */
static void chexcy_cg_phase_taps(Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dil_h,
                                 Py_ssize_t dil_w, Py_ssize_t Hq, Py_ssize_t Wq, Py_ssize_t *off)
{
    for (Py_ssize_t kh = 0; kh < KH; kh++)
        for (Py_ssize_t kw = 0; kw < KW; kw++) {
            const Py_ssize_t r = kh * dil_h, s = kw * dil_w;
            off[kh * KW + kw] = ((r % sh) * sw + s % sw) * Hq * Wq + r / sh * Wq + s / sw;
        }
}

/* C (M, (s1 - s0) GEMM_NR), rows ld floats apart, += A B over strips s0 .. s1 - 1 of a product whose B rows
 * are contiguous: row k = (c, t) of B (c = k / taps, t = k % taps) is src + c cs + off[t] + q for the
 * columns q of the strips. ap: A (M, K) in chexcy_gemm_pack_a_part's layout; bbuf: GEMM_KC x GEMM_NR
 * floats.
 * K blocks outermost, each element's block sums added in k order (as chexcy_cg_task). */
static void chexcy_cg_shift_product(const float *src, const Py_ssize_t *off, Py_ssize_t taps, Py_ssize_t cs,
                                    const float *ap, Py_ssize_t M, Py_ssize_t K, Py_ssize_t s0, Py_ssize_t s1,
                                    float *ct, Py_ssize_t ld, float *bbuf)
{
    const Py_ssize_t Mp = (M + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
    for (Py_ssize_t k0 = 0; k0 < K; k0 += GEMM_KC) {
        const Py_ssize_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
        const float *ablk = ap + k0 * Mp;
        for (Py_ssize_t s = s0; s < s1; s++) {
            const Py_ssize_t q = s * GEMM_NR;
            Py_ssize_t c = k0 / taps, t = k0 % taps;
            for (Py_ssize_t k = 0; k < kc; k++) {
                memcpy(bbuf + k * GEMM_NR, src + c * cs + off[t] + q, GEMM_NR * sizeof(float));
                if (++t == taps) {
                    t = 0;
                    c++;
                }
            }
            float *cblk = ct + (s - s0) * GEMM_NR;
            for (Py_ssize_t i0 = 0; i0 < M; i0 += GEMM_MR) {
                const Py_ssize_t mr = M - i0 < GEMM_MR ? M - i0 : GEMM_MR;
                if (mr == GEMM_MR)
                    chexcy_gemm_tile(kc, ablk + i0 * kc, bbuf, cblk + i0 * ld, ld, NULL);
                else
                    chexcy_gemm_tile_edge(kc, ablk + i0 * kc, bbuf, cblk + i0 * ld, ld, NULL, mr, GEMM_NR);
            }
        }
    }
}

/* One task of the phase-plane forward: strips s0 .. s1 - 1 (GEMM_NR columns q each) of one (n, g):
 *   xq: (Cg, sh sw, Hq, Wq) phase planes of the group, readable GEMM_NR + Wq floats past its end;
 *   off: chexcy_cg_phase_taps; cs = sh sw Hq Wq (floats per channel); ap: the packed weight;
 *   bias: (Fg,); out: (Fg, OH, OW) of (n, g) with planes P = OH OW apart;
 *   ct: this thread's Fg x (s1 - s0) GEMM_NR block of C; bbuf: GEMM_KC x GEMM_NR floats. */
static void chexcy_cg_task_phase(const float *xq, const Py_ssize_t *off, Py_ssize_t taps, Py_ssize_t cs,
                                 Py_ssize_t Wq, Py_ssize_t OH, Py_ssize_t OW, const float *ap,
                                 const float *bias, Py_ssize_t Fg, Py_ssize_t K, Py_ssize_t s0, Py_ssize_t s1,
                                 float *out, float *ct, float *bbuf)
{
    const Py_ssize_t ld = (s1 - s0) * GEMM_NR, q0 = s0 * GEMM_NR, q1 = s1 * GEMM_NR, P = OH * OW;
    for (Py_ssize_t i = 0; i < Fg; i++)     /* start from the bias: the tiles add the block sums to it */
        for (Py_ssize_t j = 0; j < ld; j++) ct[i * ld + j] = bias[i];
    chexcy_cg_shift_product(xq, off, taps, cs, ap, Fg, K, s0, s1, ct, ld, bbuf);
    /* the kept columns: output row oh is q in [oh Wq, oh Wq + OW) */
    for (Py_ssize_t oh = q0 / Wq; oh < OH && oh * Wq < q1; oh++) {
        const Py_ssize_t a = oh * Wq > q0 ? oh * Wq : q0;
        const Py_ssize_t b = oh * Wq + OW < q1 ? oh * Wq + OW : q1;
        if (b <= a)
            continue;
        for (Py_ssize_t i = 0; i < Fg; i++)
            memcpy(out + i * P + oh * OW + (a - oh * Wq), ct + i * ld + (a - q0), (b - a) * sizeof(float));
    }
}

/* ---- dx on phase planes ---------------------------------------------------------------------------
 * dx is gathered, not scattered: the padded input gradient's phase (a, b) (its pixels i sh + a, j sw + b)
 * receives exactly the taps with r % sh == a and s % sw == b (r = kh dil_h, s = kw dil_w), from output
 * (i - r / sh, j - s / sw). So phase (a, b) of dxpad (Cg, Hq, Wq) = A_ab (Cg, Fg T_ab) . B_ab, a product
 * of depth Fg T_ab (T_ab taps in that phase) whose B row (f, t) is dout[f] shifted by tap t. With dout
 * zero-padded by (mh, mw) = the largest (r / sh, s / sw) on the top and left into planes (Hd, Wd),
 * Hd = Hq + mh, Wd = Wq + mw, and the columns numbered q = i Wd + j, row (f, t) is the contiguous run
 * doutpad[f] + (mh - r / sh) Wd + (mw - s / sw) + q: chexcy_cg_shift_product again, and every pixel of dx
 * is written once, with a sum over (f, t) in K blocks fixed by the shape (no col2im adds). */

/* dst (Hd, Wd): dout plane (OH, OW) at rows mh .., columns mw .., zeros around it. */
static void chexcy_cg_dout_pad(const float *d, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t mh, Py_ssize_t mw,
                               Py_ssize_t Hd, Py_ssize_t Wd, float *dst)
{
    const Py_ssize_t w = OW < Wd - mw ? OW : Wd - mw;
    for (Py_ssize_t i = 0; i < Hd; i++) {
        float *row = dst + i * Wd;
        const Py_ssize_t oh = i - mh;
        if (oh < 0 || oh >= OH || w <= 0) {
            memset(row, 0, Wd * sizeof(float));
            continue;
        }
        memset(row, 0, mw * sizeof(float));
        memcpy(row + mw, d + oh * OW, w * sizeof(float));
        memset(row + mw + w, 0, (Wd - mw - w) * sizeof(float));
    }
}

/* Pack K block kb of A_ab (Cg, Fg T) of one group straight from its weight w (Fg, Cg, KH KW):
 * A_ab[c, f T + t] = w[f, c, tap[t]], in chexcy_gemm_pack_a_part's layout (strips (kc, GEMM_MR), rows
 * past Cg zero). */
static void chexcy_cg_pack_a_phase(const float *w, Py_ssize_t Fg, Py_ssize_t Cg, Py_ssize_t taps,
                                   const Py_ssize_t *tap, Py_ssize_t T, Py_ssize_t kb, float *ap)
{
    const Py_ssize_t Mp = (Cg + GEMM_MR - 1) / GEMM_MR * GEMM_MR, K = Fg * T, k0 = kb * GEMM_KC;
    const Py_ssize_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
    float *dst = ap + k0 * Mp;
    for (Py_ssize_t i0 = 0; i0 < Mp; i0 += GEMM_MR)
        for (Py_ssize_t k = 0; k < kc; k++) {
            const Py_ssize_t f = (k0 + k) / T, t = (k0 + k) % T;
            float *d = dst + i0 * kc + k * GEMM_MR;
            for (Py_ssize_t i = 0; i < GEMM_MR; i++)
                d[i] = i0 + i < Cg ? w[(f * Cg + i0 + i) * taps + tap[t]] : 0.0f;
        }
}

/* One dx task: strips s0 .. s1 - 1 of phase (a, b) of one (n, g), written into dx (Cg, H, W) of (n, g).
 * Only the phase's rows i in [ilo, ihi) and columns j in [jlo, jhi) that land inside dx are computed:
 * q = (i - ilo) Wd + j - jlo (the Wd - (jhi - jlo) columns past jhi in each row are dropped), so a 14x14
 * dx at stride 2 costs 7 rows of 9 columns per phase instead of 8 of 9 (its padding ring is never made).
 *   dp: doutpad of (n, g) (Fg, Hd, Wd), readable GEMM_NR + Wd floats past its end; off: (T,) offsets of
 *   the phase's taps (T = 0: the phase receives nothing, zeros); ap: A_ab packed (Cg, Fg T);
 *   ct: Cg x (s1 - s0) GEMM_NR floats; bbuf: GEMM_KC x GEMM_NR floats. Strips past the phase's end: none. */
static void chexcy_cg_dx_phase_task(const float *dp, const Py_ssize_t *off, Py_ssize_t T, Py_ssize_t Fg,
                                    Py_ssize_t Hd, Py_ssize_t Wd, Py_ssize_t Hq, Py_ssize_t Wq,
                                    const float *ap, Py_ssize_t Cg, Py_ssize_t a, Py_ssize_t b, Py_ssize_t sh,
                                    Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t H, Py_ssize_t W,
                                    Py_ssize_t s0, Py_ssize_t s1, float *dx, float *ct, float *bbuf)
{
    /* rows i with i sh + a - ph in [0, H), columns j with j sw + b - pw in [0, W) */
    const Py_ssize_t ilo = ph > a ? (ph - a + sh - 1) / sh : 0, jlo = pw > b ? (pw - b + sw - 1) / sw : 0;
    Py_ssize_t ihi = H + ph - a > 0 ? (H + ph - a - 1) / sh + 1 : 0;
    Py_ssize_t jhi = W + pw - b > 0 ? (W + pw - b - 1) / sw + 1 : 0;
    if (ihi > Hq) ihi = Hq;
    if (jhi > Wq) jhi = Wq;
    if (ihi <= ilo || jhi <= jlo)
        return;
    const Py_ssize_t nst = ((ihi - ilo) * Wd + GEMM_NR - 1) / GEMM_NR;
    if (s1 > nst) s1 = nst;
    if (s0 >= s1)
        return;
    const Py_ssize_t ld = (s1 - s0) * GEMM_NR, q0 = s0 * GEMM_NR, q1 = s1 * GEMM_NR;
    memset(ct, 0, Cg * ld * sizeof(float));
    if (T > 0)
        chexcy_cg_shift_product(dp + ilo * Wd + jlo, off, T, Hd * Wd, ap, Cg, Fg * T, s0, s1, ct, ld, bbuf);
    for (Py_ssize_t r = q0 / Wd; r < ihi - ilo && r * Wd < q1; r++) {
        const Py_ssize_t y = (ilo + r) * sh + a - ph;
        const Py_ssize_t lo = r * Wd > q0 ? r * Wd : q0;
        const Py_ssize_t hi = r * Wd + jhi - jlo < q1 ? r * Wd + jhi - jlo : q1;
        if (hi <= lo)
            continue;
        const Py_ssize_t x0 = (jlo + lo - r * Wd) * sw + b - pw;
        for (Py_ssize_t c = 0; c < Cg; c++) {
            float *drow = dx + (c * H + y) * W + x0;
            const float *crow = ct + c * ld + (lo - q0);
            if (sw == 1)
                memcpy(drow, crow, (hi - lo) * sizeof(float));
            else
                for (Py_ssize_t j = 0; j < hi - lo; j++) drow[j * sw] = crow[j];
        }
    }
}

/* ---- backward ------------------------------------------------------------------------------------
 * dweight[g] (Fg, K) = sum over samples n and positions p of dout[n, g] (Fg, P) B_n^T (P, K): a product
 * whose K dimension runs over (n, p), in blocks of at most GEMM_KC positions of one sample, in the order
 * (n, block); each block's sum (from 0, in p order) is added to the running value, which starts at 0.
 * The blocks depend on the shape alone, so the result does not depend on the tasks or threads.
 *
 * dx: dcols (K, P) = W[g]^T (K, Fg) dout[n, g] (Fg, P), then every column block is added into the
 * padded input gradient at the positions its B columns were read from ("col2im"), strip after strip,
 * k after k: a fixed order for every input position. */

/* dst (kc, GEMM_NR): row p - p0 holds B[k0 .. k0 + GEMM_NR - 1, p] for positions p0 .. p0 + kc - 1
 * (B^T packed for the dweight product: its columns are im2col rows), rows k past K set to 0. Written row
 * after row, the GEMM_NR taps read side by side from their own planes (one pointer each, every one at the
 * same position offset): the order chexcy_gemm_pack_b found twice as fast as a column at a time into
 * strided stores. */
static void chexcy_cg_pack_bt(const chexcy_cg_geom *g, Py_ssize_t K, Py_ssize_t k0, Py_ssize_t p0,
                              Py_ssize_t kc, float *dst)
{
    const Py_ssize_t plane = g->Hp * g->Wp, taps = g->KH * g->KW, nr = K - k0 < GEMM_NR ? K - k0 : GEMM_NR;
    const float *src[GEMM_NR];
    Py_ssize_t c = k0 / taps, t = k0 % taps, kh = t / g->KW, kw = t % g->KW;
    for (Py_ssize_t j = 0; j < nr; j++) {
        src[j] = g->x + c * plane + kh * g->dil_h * g->Wp + kw * g->dil_w;
        if (++kw == g->KW) {
            kw = 0;
            if (++kh == g->KH) {
                kh = 0;
                c++;
            }
        }
    }
    Py_ssize_t oh = p0 / g->OW, ow = p0 % g->OW, off = oh * g->sh * g->Wp + ow * g->sw;
    for (Py_ssize_t p = 0; p < kc; p++) {
        float *d = dst + p * GEMM_NR;
        if (nr == GEMM_NR) {
            GEMM_UNROLL_ALL for (int j = 0; j < GEMM_NR; j++) d[j] = src[j][off];
        } else {
            for (Py_ssize_t j = 0; j < nr; j++) d[j] = src[j][off];
            for (Py_ssize_t j = nr; j < GEMM_NR; j++) d[j] = 0.0f;
        }
        if (++ow == g->OW) {
            ow = 0;
            oh++;
            off = oh * g->sh * g->Wp;
        } else {
            off += g->sw;
        }
    }
}

/* One dweight task: columns of strips s0 .. s1 - 1 of dweight[g] (Fg, K), rows K floats apart
 * (already zeroed), over every sample; xs: the padded input's sample stride in floats.
 *   dout: (N, F, P) with this group's rows at dout + g * Fg * P; abuf: ceil(Fg / GEMM_MR) GEMM_MR x GEMM_KC;
 *   bbuf: GEMM_KC x GEMM_NR (this thread's). */
static void chexcy_cg_dweight_task(chexcy_cg_geom g, Py_ssize_t N, Py_ssize_t xs, const float *dout,
                                   Py_ssize_t dout_ns, Py_ssize_t Fg, Py_ssize_t K, Py_ssize_t s0,
                                   Py_ssize_t s1, float *dweight, float *abuf, float *bbuf)
{
    const Py_ssize_t P = g.P;
    const float *x0 = g.x;
    for (Py_ssize_t n = 0; n < N; n++) {
        g.x = x0 + n * xs;
        const float *dn = dout + n * dout_ns;
        for (Py_ssize_t p0 = 0; p0 < P; p0 += GEMM_KC) {
            const Py_ssize_t kc = P - p0 < GEMM_KC ? P - p0 : GEMM_KC;
            chexcy_gemm_pack_a(dn, P, 1, 0, Fg, p0, kc, abuf);
            for (Py_ssize_t s = s0; s < s1; s++) {
                const Py_ssize_t j0 = s * GEMM_NR, nr = K - j0 < GEMM_NR ? K - j0 : GEMM_NR;
                chexcy_cg_pack_bt(&g, K, j0, p0, kc, bbuf);
                for (Py_ssize_t i0 = 0; i0 < Fg; i0 += GEMM_MR) {
                    const Py_ssize_t mr = Fg - i0 < GEMM_MR ? Fg - i0 : GEMM_MR;
                    if (mr == GEMM_MR && nr == GEMM_NR)
                        chexcy_gemm_tile(kc, abuf + i0 * kc, bbuf, dweight + i0 * K + j0, K, NULL);
                    else
                        chexcy_gemm_tile_edge(kc, abuf + i0 * kc, bbuf, dweight + i0 * K + j0, K, NULL, mr, nr);
                }
            }
        }
    }
}

/* dx of one (n, g): dxp (Cg, Hp, Wp), the padded input gradient, zeroed here, then for every strip of
 * GEMM_NR positions in order: t (K, GEMM_NR) = W^T dout block (tiles over K blocks of Fg), added into
 * dxp where the forward read it. wt: packed W^T of the group (chexcy_gemm_pack_a_part's layout of (K, Fg)
 * rows, i.e. K rows of Fg, strips over K; its K-dim blocks are blocks of Fg); dn: dout[n, g] (Fg, P);
 * bbuf: GEMM_KC x GEMM_NR; t: Kp x GEMM_NR (Kp = K rounded up to GEMM_MR). */
static void chexcy_cg_dx_task(const chexcy_cg_geom *g, float *dxp, Py_ssize_t Cg, const float *wt,
                              const float *dn, Py_ssize_t Fg, Py_ssize_t K, float *bbuf, float *t)
{
    const Py_ssize_t P = g->P, plane = g->Hp * g->Wp, taps = g->KH * g->KW;
    const Py_ssize_t Kp = (K + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
    Py_ssize_t off[GEMM_NR];
    memset(dxp, 0, Cg * plane * sizeof(float));
    for (Py_ssize_t j0 = 0; j0 < P; j0 += GEMM_NR) {
        const Py_ssize_t nr = P - j0 < GEMM_NR ? P - j0 : GEMM_NR;
        for (Py_ssize_t f0 = 0; f0 < Fg; f0 += GEMM_KC) {
            const Py_ssize_t kc = Fg - f0 < GEMM_KC ? Fg - f0 : GEMM_KC;
            for (Py_ssize_t f = 0; f < kc; f++) {     /* B block: dout rows f0 .. f0 + kc, GEMM_NR columns */
                float *d = bbuf + f * GEMM_NR;
                memcpy(d, dn + (f0 + f) * P + j0, nr * sizeof(float));
                for (Py_ssize_t j = nr; j < GEMM_NR; j++) d[j] = 0.0f;
            }
            for (Py_ssize_t i0 = 0; i0 < Kp; i0 += GEMM_MR) {
                float *c = t + i0 * GEMM_NR;
                if (f0 == 0)
                    memset(c, 0, GEMM_MR * GEMM_NR * sizeof(float));
                chexcy_gemm_tile(kc, wt + f0 * Kp + i0 * kc, bbuf, c, GEMM_NR, NULL);
            }
        }
        for (Py_ssize_t j = 0; j < nr; j++) {
            const Py_ssize_t p = j0 + j;
            off[j] = p / g->OW * g->sh * g->Wp + p % g->OW * g->sw;
        }
        Py_ssize_t c = 0, kh = 0, kw = 0;
        for (Py_ssize_t k = 0; k < K; k++) {
            float *dst = dxp + c * plane + kh * g->dil_h * g->Wp + kw * g->dil_w;
            const float *src = t + k * GEMM_NR;
            for (Py_ssize_t j = 0; j < nr; j++) dst[off[j]] += src[j];
            if (++kw == g->KW) {
                kw = 0;
                if (++kh == g->KH) {
                    kh = 0;
                    c++;
                }
            }
        }
        (void)taps;
    }
}

#endif
