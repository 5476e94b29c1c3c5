/* chexcy/_ops_depthwise.h: depthwise convolutions (groups = C = F: one input and one output channel
 * per group), the DEPTHWISE path of chexcy._ops' conv planner, at every stride up to
 * CHEXCY_DWC_MAX_STRIDE and kernels of up to CHEXCY_DWC_MAX_TAPS taps.
 *
 * Memory-bound: KH KW multiply-adds per value read. Each (n, c) plane is handled in cache in one pass,
 * as flat loops over whole planes so that tiny planes (7x7) still fill the vectors:
 *
 *   phase planes  the zero-padded input xpad (Hp, Wp) split by the stride into sh sw phase planes,
 *                 phase (rh, rw) = xpad[rh::sh, rw::sw], each (Hr, Wr) with pitch Wr = ceil(Wp / sw).
 *                 Tap (kh, kw) of output (oh, ow) reads phase ((kh dil_h) % sh, (kw dil_w) % sw) at
 *                 flat index q + off(kh, kw), q = oh Wr + ow, off = (kh dil_h / sh) Wr + kw dil_w / sw:
 *                 one constant offset per tap over the whole plane, so every tap is a contiguous vector
 *                 loop (for stride 2 the split is the even/odd deinterleave, done once per plane).
 *                 Only the inside of the planes is written per plane: the zero padding is written once
 *                 per thread and call (the scratch starts zeroed).
 *   forward       out[q] = bias + sum over taps in (kh, kw) order of w[tap] phase[q + off], CHEXCY_DWC_VB
 *                 outputs at a time in registers; the Q = OH Wr positions of pitch Wr are then copied
 *                 out (the Wr - OW extra columns per row are discarded).
 *   dx            dout in a pitched buffer (pitch Wr, zeros in the extra columns, before and after): each
 *                 phase plane of dxpad is the gather dxphase[p] = sum over its taps of w[tap] g[p - off]
 *                 (the transposed conv), and the inside of dxpad is copied out (the inverse split).
 *   dweight       per channel: lane sums acc[tap][l] += g[q] phase[q + off] over blocks of VB positions
 *                 and over the samples in order, then each tap's VB lanes added in order (dbias the same
 *                 over g). The extra columns of g are zero, so they add nothing.
 * Work: forward over (n, c) planes, backward (dx and dweight together) over channels; every sum in an
 * order fixed by the shape: bitwise the same for any thread count.
 *
 * Needs _ops_config.h first. */
#ifndef CHEXCY_OPS_DEPTHWISE_H
#define CHEXCY_OPS_DEPTHWISE_H

#include <stdint.h>
#include <string.h>
#include <immintrin.h>

/* The copy loops below are short rows (7 floats at 7x7): calls to memmove would cost more than the copy. */
#pragma GCC push_options
#pragma GCC optimize("no-tree-loop-distribute-patterns")

#define CHEXCY_DWC_VB 32            /* positions per register block: 2 zmm, 4 ymm, 8 xmm accumulators */
#define CHEXCY_DWC_MAX_TAPS 49      /* KH KW up to 7x7 */
#define CHEXCY_DWC_MAX_STRIDE 4     /* sh, sw up to 4: at most 16 phase planes */

/* GCC vector extensions, one register of the target each: a 64-byte vector on AVX2 was kept in memory
 * (accumulators on the stack, every w[t] splatted through four scalar stores), a third of torch's
 * speed on an AMD EPYC. CHEXCY_DWC_NT taps share a pass of the dweight sums: 3 x 2 zmm accumulators
 * on AVX-512, 2 x 4 ymm on AVX2 (3 x 4 did not fit in 16 registers). */
#if defined(__AVX512F__)
#define CHEXCY_DWC_VL 16
#define CHEXCY_DWC_NT 3
#elif defined(__AVX2__)
#define CHEXCY_DWC_VL 8
#define CHEXCY_DWC_NT 2
#else
#define CHEXCY_DWC_VL 4
#define CHEXCY_DWC_NT 2
#endif
#define CHEXCY_DWC_K (CHEXCY_DWC_VB / CHEXCY_DWC_VL)     /* vectors per register block */
typedef float chexcy_dwc_v __attribute__((vector_size(CHEXCY_DWC_VL * sizeof(float))));
typedef float chexcy_dwc_vu __attribute__((vector_size(CHEXCY_DWC_VL * sizeof(float)), aligned(4), may_alias));

typedef struct {
    Py_ssize_t H, W, OH, OW, T, sh, sw, ph, pw;
    Py_ssize_t B;                   /* planes (samples of one channel) per unit, stacked in the phase planes */
    Py_ssize_t PS;                  /* Hr Wr: the floats of one plane in a phase plane */
    Py_ssize_t Wr;                  /* pitch of the phase planes and of the pitched output / dout */
    Py_ssize_t nph;                 /* sh sw phase planes */
    Py_ssize_t P;                   /* floats per phase plane (a multiple of VB, covers every read) */
    Py_ssize_t Q;                   /* (B - 1) PS + OH Wr rounded up to VB: the positions computed */
    Py_ssize_t PR;                  /* B PS rounded up to VB: the dx positions computed per phase */
    Py_ssize_t lead;                /* zeros before the pitched dout (the dx gather reaches back) */
    Py_ssize_t toff[CHEXCY_DWC_MAX_TAPS];   /* tap (kh KW + kw): phase P + off */
    Py_ssize_t poff[CHEXCY_DWC_MAX_TAPS];   /* tap: off within its phase plane */
    Py_ssize_t ptap[CHEXCY_DWC_MAX_TAPS];   /* the taps ordered by phase, (kh, kw) order within one */
    Py_ssize_t pstart[CHEXCY_DWC_MAX_STRIDE * CHEXCY_DWC_MAX_STRIDE + 1];   /* phase r: ptap[pstart[r]..) */
} chexcy_dwc_geom;

static inline Py_ssize_t chexcy_dwc_round(Py_ssize_t n) { return (n + CHEXCY_DWC_VB - 1) / CHEXCY_DWC_VB * CHEXCY_DWC_VB; }

/* The geometry of one call; the caller checks KH KW <= MAX_TAPS and sh, sw <= MAX_STRIDE. Small planes
 * are stacked B at a time (B the largest divisor of N with B nph PS <= CHEXCY_DWC_STACK floats) so that
 * the flat loops stay long: row OH.. of a plane's output and the rows past the input of its phase
 * planes are the gap that keeps the stacked planes apart (a tap reaches at most Hr - OH rows down). */
#define CHEXCY_DWC_STACK 4096
static void chexcy_dwc_init(chexcy_dwc_geom *g, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t KH, Py_ssize_t KW,
                            Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dil_h,
                            Py_ssize_t dil_w)
{
    const Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw, Hr = (Hp + sh - 1) / sh, Wr = (Wp + sw - 1) / sw;
    g->H = H; g->W = W; g->sh = sh; g->sw = sw; g->ph = ph; g->pw = pw;
    g->OH = (Hp - dil_h * (KH - 1) - 1) / sh + 1;
    g->OW = (Wp - dil_w * (KW - 1) - 1) / sw + 1;
    g->T = KH * KW; g->Wr = Wr; g->nph = sh * sw;
    const Py_ssize_t max_off = (dil_h * (KH - 1) / sh) * Wr + dil_w * (KW - 1) / sw;
    g->PS = Hr * Wr;
    g->B = 1;
    for (Py_ssize_t b = 2; b <= N && b * g->nph * g->PS <= CHEXCY_DWC_STACK; b++)
        if (N % b == 0) g->B = b;
    g->Q = chexcy_dwc_round((g->B - 1) * g->PS + g->OH * Wr);
    g->PR = chexcy_dwc_round(g->B * g->PS);
    g->P = chexcy_dwc_round((g->PR > g->Q + max_off ? g->PR : g->Q + max_off));
    g->lead = chexcy_dwc_round(max_off);
    Py_ssize_t k = 0;
    for (Py_ssize_t r = 0; r < g->nph; r++) {
        g->pstart[r] = k;
        for (Py_ssize_t kh = 0; kh < KH; kh++)
            for (Py_ssize_t kw = 0; kw < KW; kw++) {
                const Py_ssize_t t = kh * KW + kw, a = kh * dil_h, b = kw * dil_w;
                if ((a % sh) * sw + b % sw != r) continue;
                g->poff[t] = (a / sh) * Wr + b / sw;
                g->toff[t] = r * g->P + g->poff[t];
                g->ptap[k++] = t;
            }
    }
    g->pstart[g->nph] = k;
}

/* Floats of one thread's scratch: phase planes | pitched dout | dx phase planes (forward: the pitched
 * output) | dweight lanes. It must start zeroed (the padding of the first two is never written). */
static inline Py_ssize_t chexcy_dwc_scratch_floats(const chexcy_dwc_geom *g)
{
    return 2 * g->nph * g->P + g->lead + g->P + (CHEXCY_DWC_MAX_TAPS + 1) * CHEXCY_DWC_VB;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
/* The first n (0 <= n <= 8) floats at p, the other lanes 0; and the first n lanes of v to p. */
static inline __m256 chexcy_dwc_load8(const float *p, Py_ssize_t n)
{
    return n >= 8 ? _mm256_loadu_ps(p) : chexcy_load_head8(p, n);
}

static inline void chexcy_dwc_store8(float *p, __m256 v, Py_ssize_t n)
{
    if (n >= 8) _mm256_storeu_ps(p, v);
    else chexcy_store_head8(p, v, n);
}
#endif

/* Stride 2: a row s (n floats) split into its even columns d0 and odd columns d1 (merge = 0), or the
 * inverse (merge = 1), by permutes: 32 columns at a time, masked at the row's end, on AVX-512; 16 at a
 * time, the row's end in 4-, 2- and 1-float pieces, on AVX2; the caller's scalar loops otherwise. */
static inline int chexcy_dwc_copy_row2(float *s, Py_ssize_t n, float *d0, float *d1, const int merge)
{
#if defined(__AVX512F__)
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (Py_ssize_t j = 0; j < n; j += 32) {
        const Py_ssize_t rem = n - j, ra = rem < 16 ? rem : 16, rb = rem < 32 ? rem - ra : 16;
        const Py_ssize_t ne = (rem < 32 ? rem + 1 : 32) / 2, no = (rem < 32 ? rem : 32) / 2;
        const __mmask16 ma = (__mmask16)((1u << ra) - 1), mb = (__mmask16)((1u << rb) - 1);
        const __mmask16 me = (__mmask16)((1u << ne) - 1), mo = (__mmask16)((1u << no) - 1);
        if (merge) {
            const __m512 e = _mm512_maskz_loadu_ps(me, d0 + j / 2), o = _mm512_maskz_loadu_ps(mo, d1 + j / 2);
            _mm512_mask_storeu_ps(s + j, ma, _mm512_permutex2var_ps(e, lo, o));
            _mm512_mask_storeu_ps(s + j + 16, mb, _mm512_permutex2var_ps(e, hi, o));
        } else {
            const __m512 a = _mm512_maskz_loadu_ps(ma, s + j), b = _mm512_maskz_loadu_ps(mb, s + j + 16);
            _mm512_mask_storeu_ps(d0 + j / 2, me, _mm512_permutex2var_ps(a, ev, b));
            _mm512_mask_storeu_ps(d1 + j / 2, mo, _mm512_permutex2var_ps(a, od, b));
        }
    }
    return 1;
#elif defined(__AVX2__)
    /* 16 columns at a time: each 8-float half sorted to (evens | odds) by one permute, then the halves'
     * 128-bit lanes paired; the merge unpacks and pairs the lanes back. */
    const __m256i eo = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (Py_ssize_t j = 0; j < n; j += 16) {
        const Py_ssize_t rem = n - j, ra = rem < 8 ? rem : 8, rb = rem < 16 ? rem - ra : 8;
        const Py_ssize_t ne = (rem < 16 ? rem + 1 : 16) / 2, no = (rem < 16 ? rem : 16) / 2;
        if (merge) {
            const __m256 e = chexcy_dwc_load8(d0 + j / 2, ne), o = chexcy_dwc_load8(d1 + j / 2, no);
            const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);
            chexcy_dwc_store8(s + j, _mm256_permute2f128_ps(lo, hi, 0x20), ra);
            chexcy_dwc_store8(s + j + 8, _mm256_permute2f128_ps(lo, hi, 0x31), rb);
        } else {
            const __m256 a = _mm256_permutevar8x32_ps(chexcy_dwc_load8(s + j, ra), eo);
            const __m256 b = _mm256_permutevar8x32_ps(chexcy_dwc_load8(s + j + 8, rb), eo);
            chexcy_dwc_store8(d0 + j / 2, _mm256_permute2f128_ps(a, b, 0x20), ne);
            chexcy_dwc_store8(d1 + j / 2, _mm256_permute2f128_ps(a, b, 0x31), no);
        }
    }
    return 1;
#else
    (void)s; (void)n; (void)d0; (void)d1; (void)merge;
    return 0;       /* the caller's loops */
#endif
}

/* Where row i of xpad starts in the phase planes (for its column phase 0): row phase i % sh, row i / sh;
 * and for each column offset r < SW within a stride, the phase plane and column of x's column r and
 * how many of x's columns r, r + SW, ... there are. No divisions per row: 7x7 planes have 7-float rows. */
typedef struct { Py_ssize_t off[CHEXCY_DWC_MAX_STRIDE], n[CHEXCY_DWC_MAX_STRIDE], nr; } chexcy_dwc_cols;

static inline void chexcy_dwc_col_split(const chexcy_dwc_geom *g, chexcy_dwc_cols *cs)
{
    cs->nr = g->sw < g->W ? g->sw : g->W;
    for (Py_ssize_t r = 0; r < cs->nr; r++) {
        const Py_ssize_t j = g->pw + r;
        cs->off[r] = (j % g->sw) * g->P + j / g->sw;
        cs->n[r] = (g->W - r + g->sw - 1) / g->sw;
    }
}

/* x: B planes (H, W), xstride floats apart, into the inside of the phase planes xs (or, with merge,
 * the inverse: the inside of xs into x). */
static inline __attribute__((always_inline)) void chexcy_dwc_copy_sw(
    const chexcy_dwc_geom *g, float *x, Py_ssize_t xstride, float *xs, const Py_ssize_t SW, const int merge)
{
    chexcy_dwc_cols cs = {{0}, {0}, 0};
    chexcy_dwc_col_split(g, &cs);
    const Py_ssize_t W = g->W, Wr = g->Wr, P = g->P;
    for (Py_ssize_t b = 0; b < g->B; b++) {
        Py_ssize_t rh = g->ph % g->sh, ir = g->ph / g->sh;
        for (Py_ssize_t ih = 0; ih < g->H; ih++) {
            float *base = xs + rh * SW * P + b * g->PS + ir * Wr;
            float *row = x + b * xstride + ih * W;
            if (SW == 2 && cs.nr == 2 && chexcy_dwc_copy_row2(row, W, base + cs.off[0], base + cs.off[1], merge)) {
                if (++rh == g->sh) { rh = 0; ir++; }
                continue;
            }
            for (Py_ssize_t r = 0; r < cs.nr; r++) {
                float *restrict d = base + cs.off[r];
                float *restrict s = row + r;
                const Py_ssize_t n = cs.n[r];
                if (SW == 1 && merge)
                    chexcy_copy_short(s, d, n);
                else if (SW == 1)
                    chexcy_copy_short(d, s, n);
                else if (merge)
                    for (Py_ssize_t m = 0; m < n; m++) s[m * SW] = d[m];
                else
                    for (Py_ssize_t m = 0; m < n; m++) d[m] = s[m * SW];
            }
            if (++rh == g->sh) { rh = 0; ir++; }
        }
    }
}

static void chexcy_dwc_split(const chexcy_dwc_geom *g, const float *x, Py_ssize_t xstride, float *xs)
{
    float *xw = (float *)x;     /* only read (merge = 0) */
    if (g->sw == 1) chexcy_dwc_copy_sw(g, xw, xstride, xs, 1, 0);
    else if (g->sw == 2) chexcy_dwc_copy_sw(g, xw, xstride, xs, 2, 0);
    else chexcy_dwc_copy_sw(g, xw, xstride, xs, g->sw, 0);
}

static void chexcy_dwc_merge(const chexcy_dwc_geom *g, const float *ds, float *dx, Py_ssize_t xstride)
{
    float *src = (float *)ds;   /* only read (merge = 1) */
    if (g->sw == 1) chexcy_dwc_copy_sw(g, dx, xstride, src, 1, 1);
    else if (g->sw == 2) chexcy_dwc_copy_sw(g, dx, xstride, src, 2, 1);
    else chexcy_dwc_copy_sw(g, dx, xstride, src, g->sw, 1);
}

#define CHEXCY_DWC_LOAD(p) (*(const chexcy_dwc_vu *)(p))
#define CHEXCY_DWC_STORE(p, v) (*(chexcy_dwc_vu *)(p) = (v))

/* ob[q] = bias + sum over taps of w[t] xs[toff[t] + q], q < Q: 64 positions (2 K vectors, independent
 * FMA chains) in registers at a time, then a last 32. */
static inline __attribute__((always_inline)) void chexcy_dwc_fwd_blocks(
    const chexcy_dwc_geom *g, const float *restrict xs, const float *restrict w, float bias,
    float *restrict ob, const Py_ssize_t T)
{
    const int K = CHEXCY_DWC_K, V = CHEXCY_DWC_VL;
    Py_ssize_t q = 0;
    for (; q + 2 * CHEXCY_DWC_VB <= g->Q; q += 2 * CHEXCY_DWC_VB) {
        chexcy_dwc_v a[2 * CHEXCY_DWC_K];
        for (int j = 0; j < 2 * K; j++) { a[j] = (chexcy_dwc_v){0}; a[j] += bias; }
        for (Py_ssize_t t = 0; t < T; t++) {
            const float *s = xs + g->toff[t] + q;
            for (int j = 0; j < 2 * K; j++) a[j] += w[t] * CHEXCY_DWC_LOAD(s + j * V);
        }
        for (int j = 0; j < 2 * K; j++) CHEXCY_DWC_STORE(ob + q + j * V, a[j]);
    }
    if (q < g->Q) {
        chexcy_dwc_v a[CHEXCY_DWC_K];
        for (int j = 0; j < K; j++) { a[j] = (chexcy_dwc_v){0}; a[j] += bias; }
        for (Py_ssize_t t = 0; t < T; t++) {
            const float *s = xs + g->toff[t] + q;
            for (int j = 0; j < K; j++) a[j] += w[t] * CHEXCY_DWC_LOAD(s + j * V);
        }
        for (int j = 0; j < K; j++) CHEXCY_DWC_STORE(ob + q + j * V, a[j]);
    }
}

/* Unit u of the forward, u = (n / B) C + c: out[n, c] for the B samples n of its block, from x
 * (N, C, H, W), w (C, T) in (kh, kw) order and bias (C,), into out (N, C, OH, OW); scratch per
 * chexcy_dwc_scratch_floats, zeroed before this thread's first unit of the call. */
static void chexcy_dwc_forward_unit(const chexcy_dwc_geom *g, Py_ssize_t C, Py_ssize_t u, const float *x,
                                    const float *w, const float *bias, float *out, float *scratch)
{
    const Py_ssize_t c = u % C, n0 = u / C * g->B, HW = g->H * g->W, OHW = g->OH * g->OW;
    float *xs = scratch, *ob = scratch + g->nph * g->P + g->lead + g->P;
    const float *wc = w + c * g->T;
    chexcy_dwc_split(g, x + (n0 * C + c) * HW, C * HW, xs);
    if (g->T == 9) chexcy_dwc_fwd_blocks(g, xs, wc, bias[c], ob, 9);
    else if (g->T == 25) chexcy_dwc_fwd_blocks(g, xs, wc, bias[c], ob, 25);
    else chexcy_dwc_fwd_blocks(g, xs, wc, bias[c], ob, g->T);
    const Py_ssize_t OW = g->OW, Wr = g->Wr;
    for (Py_ssize_t b = 0; b < g->B; b++)
        for (Py_ssize_t oh = 0; oh < g->OH; oh++) {
            chexcy_copy_short(out + ((n0 + b) * C + c) * OHW + oh * OW, ob + b * g->PS + oh * Wr, OW);
        }
}

/* acc[t][l] += sum over blocks of g[q + l] xs[toff[t] + q + l] for taps t0 .. t0 + NT - 1, and
 * acc[T][l] += g[q + l] (dbias) when with_bias: the taps of a group share the loads of g, and their
 * K NT (+ K) accumulators are independent FMA chains. Each lane l sums its positions in block order
 * whatever the vector width, so the result does not depend on it. */
static inline __attribute__((always_inline)) void chexcy_dwc_dweight_group(
    const chexcy_dwc_geom *g, const float *restrict gp, const float *restrict xs, float *restrict acc,
    Py_ssize_t t0, const int NT, const int with_bias)
{
    const int K = CHEXCY_DWC_K, V = CHEXCY_DWC_VL;
    chexcy_dwc_v a[CHEXCY_DWC_NT][CHEXCY_DWC_K], b[CHEXCY_DWC_K], gv[CHEXCY_DWC_K];
    const float *s[CHEXCY_DWC_NT];
    for (int k = 0; k < NT; k++) {
        for (int j = 0; j < K; j++) a[k][j] = CHEXCY_DWC_LOAD(acc + (t0 + k) * CHEXCY_DWC_VB + j * V);
        s[k] = xs + g->toff[t0 + k];
    }
    float *bacc = acc + g->T * CHEXCY_DWC_VB;
    if (with_bias)
        for (int j = 0; j < K; j++) b[j] = CHEXCY_DWC_LOAD(bacc + j * V);
    for (Py_ssize_t q = 0; q < g->Q; q += CHEXCY_DWC_VB) {
        for (int j = 0; j < K; j++) gv[j] = CHEXCY_DWC_LOAD(gp + q + j * V);
        for (int k = 0; k < NT; k++)
            for (int j = 0; j < K; j++) a[k][j] += gv[j] * CHEXCY_DWC_LOAD(s[k] + q + j * V);
        if (with_bias)
            for (int j = 0; j < K; j++) b[j] += gv[j];
    }
    for (int k = 0; k < NT; k++)
        for (int j = 0; j < K; j++) CHEXCY_DWC_STORE(acc + (t0 + k) * CHEXCY_DWC_VB + j * V, a[k][j]);
    if (with_bias)
        for (int j = 0; j < K; j++) CHEXCY_DWC_STORE(bacc + j * V, b[j]);
}

/* Every tap's lanes and dbias's, CHEXCY_DWC_NT taps per pass over the plane (the first pass also dbias). */
static void chexcy_dwc_dweight_lanes(const chexcy_dwc_geom *g, const float *gp, const float *xs, float *acc)
{
    const Py_ssize_t T = g->T;
    Py_ssize_t t0 = 0;
    if (T >= CHEXCY_DWC_NT) { chexcy_dwc_dweight_group(g, gp, xs, acc, 0, CHEXCY_DWC_NT, 1); t0 = CHEXCY_DWC_NT; }
    else { chexcy_dwc_dweight_group(g, gp, xs, acc, 0, 1, 1); t0 = 1; }
    for (; t0 + CHEXCY_DWC_NT <= T; t0 += CHEXCY_DWC_NT) chexcy_dwc_dweight_group(g, gp, xs, acc, t0, CHEXCY_DWC_NT, 0);
#if CHEXCY_DWC_NT > 2
    if (T - t0 >= 2) { chexcy_dwc_dweight_group(g, gp, xs, acc, t0, 2, 0); t0 += 2; }
#endif
    if (T - t0 == 1) chexcy_dwc_dweight_group(g, gp, xs, acc, t0, 1, 0);
}

/* ds (nph phase planes): ds_r[p] = sum over the taps of phase r of w[t] gp[p - poff[t]], p < PR, 64
 * positions at a time (2 K independent FMA chains), then a last 32. */
static void chexcy_dwc_dx_phases(const chexcy_dwc_geom *g, const float *restrict gp, const float *restrict w,
                                 float *restrict ds)
{
    const int K = CHEXCY_DWC_K, V = CHEXCY_DWC_VL;
    for (Py_ssize_t r = 0; r < g->nph; r++) {
        const Py_ssize_t k0 = g->pstart[r], k1 = g->pstart[r + 1];
        float *d = ds + r * g->P;
        Py_ssize_t p = 0;
        for (; p + 2 * CHEXCY_DWC_VB <= g->PR; p += 2 * CHEXCY_DWC_VB) {
            chexcy_dwc_v a[2 * CHEXCY_DWC_K];
            for (int j = 0; j < 2 * K; j++) a[j] = (chexcy_dwc_v){0};
            for (Py_ssize_t k = k0; k < k1; k++) {
                const Py_ssize_t t = g->ptap[k];
                const float *s = gp + p - g->poff[t];
                for (int j = 0; j < 2 * K; j++) a[j] += w[t] * CHEXCY_DWC_LOAD(s + j * V);
            }
            for (int j = 0; j < 2 * K; j++) CHEXCY_DWC_STORE(d + p + j * V, a[j]);
        }
        if (p < g->PR) {
            chexcy_dwc_v a[CHEXCY_DWC_K];
            for (int j = 0; j < K; j++) a[j] = (chexcy_dwc_v){0};
            for (Py_ssize_t k = k0; k < k1; k++) {
                const Py_ssize_t t = g->ptap[k];
                const float *s = gp + p - g->poff[t];
                for (int j = 0; j < K; j++) a[j] += w[t] * CHEXCY_DWC_LOAD(s + j * V);
            }
            for (int j = 0; j < K; j++) CHEXCY_DWC_STORE(d + p + j * V, a[j]);
        }
    }
}

/* Channel c of a depthwise conv's backward: dx[n, c] for every n, dweight[c] (T,) and dbias[c].
 * dout (N, C, OH, OW), x and dx (N, C, H, W); w and dweight point at channel c's T weights. */
static void chexcy_dwc_backward_channel(const chexcy_dwc_geom *g, Py_ssize_t N, Py_ssize_t C, Py_ssize_t c,
                                        const float *dout, const float *x, const float *w, float *dx,
                                        float *dweight, float *dbias, float *scratch)
{
    const Py_ssize_t T = g->T, OH = g->OH, OW = g->OW, Wr = g->Wr, HW = g->H * g->W;
    float *xs = scratch;
    float *gb = xs + g->nph * g->P;               /* lead zeros, then the pitched dout */
    float *gp = gb + g->lead;
    float *ds = gp + g->P;
    float *acc = ds + g->nph * g->P;
    memset(acc, 0, (T + 1) * CHEXCY_DWC_VB * sizeof(float));
    for (Py_ssize_t n0 = 0; n0 < N; n0 += g->B) {
        const Py_ssize_t plane = n0 * C + c;
        chexcy_dwc_split(g, x + plane * HW, C * HW, xs);
        for (Py_ssize_t b = 0; b < g->B; b++)
            for (Py_ssize_t oh = 0; oh < OH; oh++) {
                chexcy_copy_short(gp + b * g->PS + oh * Wr, dout + (plane + b * C) * OH * OW + oh * OW, OW);
            }
        chexcy_dwc_dweight_lanes(g, gp, xs, acc);
        chexcy_dwc_dx_phases(g, gp, w, ds);
        chexcy_dwc_merge(g, ds, dx + plane * HW, C * HW);
    }
    for (Py_ssize_t t = 0; t <= T; t++) {
        float s = 0;
        for (Py_ssize_t l = 0; l < CHEXCY_DWC_VB; l++) s += acc[t * CHEXCY_DWC_VB + l];
        if (t < T) dweight[t] = s;
        else dbias[c] = s;
    }
}

#pragma GCC pop_options

#endif
