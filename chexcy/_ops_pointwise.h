/* chexcy/_ops_pointwise.h: 1x1 convolutions without padding (the POINTWISE_GEMM path of chexcy._ops'
 * conv planner) as products whose columns span the whole batch.
 *
 * Forward, per group g (the same function serves dx at stride 1, on dout with W^T):
 *
 *   out (Fg, N P) = bias + W[g] (Fg, Cg) . X (Cg, N P),   X[c, q] = x[n, g Cg + c, oh sh, ow sw]
 *   for column q = n P + p, p = oh OW + ow.
 *
 * Numbering the columns over the whole batch (instead of one product per sample) means a 7x7 layer is
 * 392 columns, 12.25 strips of GEMM_NR = 32, not 8 x (32 + 17): no half-empty strip per sample, and
 * the two threads share 13 strips instead of 8 products. A strip that crosses a sample boundary (or
 * runs past the last column) is gathered into the packed block like any other and its tile is written
 * back through a local copy, column by column.
 *
 * Memory: the GEMM_NR columns of a strip lie on Cg different rows of x (x[n, c, :] are HW floats
 * apart), too many streams for the hardware prefetchers if each strip were packed alone (128 bytes of
 * each row, then the next row). A task packs all its strips of a K block together, row by row across
 * the strips (chexcy_pw_pack_strips), so each row is one longer sequential read.
 *
 * dweight (Fg, Cg) = sum over columns q of dout[q] (Fg) x[q]^T (Cg): a product whose K dimension is the
 * N P columns, cut into blocks of GEMM_KC columns numbered over the whole batch. Tasks are rectangles of
 * the (Fg, Cg) result (not ranges of samples): a task packs its rows of dout once per K block and
 * reuses them for all its column strips.
 *
 * Reproducibility: every element is (bias +) s_0 + s_1 + ..., s_b the sum of its K block b (in k order,
 * from 0) added in block order; the blocks are fixed by the shape, and an edge tile (local copy) does
 * exactly the arithmetic of a full one, so the value of an element does not depend on the task grid or
 * the thread that computed it: results are bitwise identical for any thread count.
 *
 * Needs _ops_config.h and _ops_gemm.h first.
 */
#ifndef CHEXCY_OPS_POINTWISE_H
#define CHEXCY_OPS_POINTWISE_H

#include <string.h>
#include "_ops_relu.h"

/* Where the columns of a pointwise product live: column q = n P + p of a (C, N P) operand is row c at
 *   base + n * ns + c * cs + (p / OW) * rowstep + (p % OW) * sw. */
typedef struct {
    const float *x;
    Py_ssize_t ns, cs;          /* sample and channel strides (floats) */
    Py_ssize_t OW, P;           /* positions per output row, per sample */
    Py_ssize_t rowstep, sw;     /* input floats per output row (sh * W) and per output column */
    Py_ssize_t NP;              /* columns in all: N * P */
} chexcy_pw_geom;

static inline Py_ssize_t chexcy_pw_off(const chexcy_pw_geom *g, Py_ssize_t q)
{
    const Py_ssize_t n = q / g->P, p = q % g->P;
    return n * g->ns + p / g->OW * g->rowstep + p % g->OW * g->sw;
}

/* One register tile over kc steps (the arithmetic of chexcy_gemm_tile):
 *   c[i, j] = rowinit[i] + s    when rowinit != NULL (the first K block: the bias)
 *   c[i, j] = c[i, j] + s       otherwise
 * s = sum over k of a[k * GEMM_MR + i] * b[k * GEMM_NR + j], from 0 in k order; then max(c[i, j], 0)
 * when relu, after adding res[i, j] (rows ldc apart) when res is not NULL (the last K block of a conv
 * with its residual sum and ReLU: no pass over the output after). noinline for the reason given at
 * chexcy_gemm_tile. */
static __attribute__((noinline)) void chexcy_pw_tile(Py_ssize_t kc, const float *restrict a,
                                                     const float *restrict b, float *c, Py_ssize_t ldc,
                                                     const float *rowinit, int relu, const float *res)
{
    chexcy_vf acc[GEMM_MR][GEMM_NV], bv[GEMM_NV];
    CHEXCY_UNROLL for (int i = 0; i < GEMM_MR; i++)
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) acc[i][v] = chexcy_splat(0.0f);
    for (Py_ssize_t k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) bv[v] = chexcy_load(b + v * CHEXCY_VW);
        CHEXCY_UNROLL for (int i = 0; i < GEMM_MR; i++) {
            chexcy_vf ai = chexcy_splat(a[i]);
            CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) acc[i][v] += ai * bv[v];
        }
    }
    CHEXCY_UNROLL for (int i = 0; i < GEMM_MR; i++) {
        const chexcy_vf s = rowinit ? chexcy_splat(rowinit[i]) : (chexcy_vf){0};
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) {
            float *ci = c + i * ldc + v * CHEXCY_VW;
            chexcy_vf y = rowinit ? s + acc[i][v] : chexcy_load(ci) + acc[i][v];
            if (res)
                y += chexcy_load(res + i * ldc + v * CHEXCY_VW);
            chexcy_store(ci, relu ? chexcy_relu_v(y) : y);
        }
    }
}

/* The runs of strip q0: columns j0 .. j0 + len - 1 of the strip that are equally spaced (sw apart) in
 * the input, the first at input offset src. Returns the number of runs (at most GEMM_NR); columns at or
 * past NP are in none. */
typedef struct {
    Py_ssize_t j0, len, src;
} chexcy_pw_run;

static int chexcy_pw_runs(const chexcy_pw_geom *g, Py_ssize_t q0, chexcy_pw_run *runs)
{
    const Py_ssize_t nr = g->NP - q0 < GEMM_NR ? g->NP - q0 : GEMM_NR;
    int nrun = 0;
    for (Py_ssize_t j = 0; j < nr;) {
        const Py_ssize_t q = q0 + j, p = q % g->P;
        /* to the end of the output row (the end of the sample at column stride 1 and full rows) */
        Py_ssize_t len = g->sw == 1 && g->rowstep == g->OW ? g->P - p : g->OW - p % g->OW;
        if (len > nr - j)
            len = nr - j;
        runs[nrun].j0 = j;
        runs[nrun].len = len;
        runs[nrun].src = chexcy_pw_off(g, q);
        nrun++;
        j += len;
    }
    return nrun;
}

/* dst (kc, GEMM_NR) = X[k0 .. k0 + kc - 1, strip columns], columns at or past NP zero: per row, a copy
 * (column stride 1) or a stride-2 loop per run. */
static void chexcy_pw_pack_b(const chexcy_pw_geom *g, const chexcy_pw_run *runs, int nrun, Py_ssize_t k0,
                             Py_ssize_t kc, float *dst)
{
    const Py_ssize_t sw = g->sw;
    const Py_ssize_t nr = runs[nrun - 1].j0 + runs[nrun - 1].len;
    const float *row = g->x + k0 * g->cs;
    for (Py_ssize_t k = 0; k < kc; k++, row += g->cs) {
        float *d = dst + k * GEMM_NR;
        if (nrun == 1 && nr == GEMM_NR && sw == 1) {
            memcpy(d, row + runs[0].src, GEMM_NR * sizeof(float));
        } else if (nrun == 1 && nr == GEMM_NR && sw == 2) {
            const float *s = row + runs[0].src;
            GEMM_UNROLL_ALL for (int j = 0; j < GEMM_NR; j++) d[j] = s[2 * j];
        } else {
            for (int r = 0; r < nrun; r++) {
                const float *s = row + runs[r].src;
                float *o = d + runs[r].j0;
                if (sw == 1)
                    chexcy_copy_short(o, s, runs[r].len);
                else
                    for (Py_ssize_t j = 0; j < runs[r].len; j++) o[j] = s[j * sw];
            }
            for (Py_ssize_t j = nr; j < GEMM_NR; j++) d[j] = 0.0f;
        }
    }
}

/* Strips s0 .. s1 - 1 of K block (k0, kc), strip s at dst + (s - s0) kc GEMM_NR (chexcy_pw_pack_b's
 * layout each). When the strips are one contiguous run of a sample's input rows (stride 1, whole rows),
 * row by row across the strips: each input row is then read as one run of (s1 - s0) GEMM_NR floats,
 * which the hardware prefetchers follow (strip by strip, every row was a separate 128-byte read). */
static void chexcy_pw_pack_strips(const chexcy_pw_geom *g, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t k0,
                                  Py_ssize_t kc, float *dst)
{
    const Py_ssize_t q0 = s0 * GEMM_NR, q1 = s1 * GEMM_NR, ns = s1 - s0;
    if (g->sw == 1 && g->rowstep == g->OW && q1 <= g->NP && q0 / g->P == (q1 - 1) / g->P) {
        const float *row = g->x + k0 * g->cs + chexcy_pw_off(g, q0);
        for (Py_ssize_t k = 0; k < kc; k++, row += g->cs)
            for (Py_ssize_t s = 0; s < ns; s++)
                memcpy(dst + (s * kc + k) * GEMM_NR, row + s * GEMM_NR, GEMM_NR * sizeof(float));
        return;
    }
    chexcy_pw_run runs[GEMM_NR];
    for (Py_ssize_t s = s0; s < s1; s++) {
        const int nrun = chexcy_pw_runs(g, s * GEMM_NR, runs);
        chexcy_pw_pack_b(g, runs, nrun, k0, kc, dst + (s - s0) * kc * GEMM_NR);
    }
}

/* Where strip q0 of a product goes in its output: pieces r < npc of columns pj[r] .. pj[r + 1] - 1, each
 * within one sample, at out offset pdst[r] (rows P floats apart); inside: one piece of GEMM_NR columns. */
typedef struct {
    Py_ssize_t pj[GEMM_NR + 1], pdst[GEMM_NR];
    int npc, inside;
} chexcy_pw_pieces;

static void chexcy_pw_strip_pieces(const chexcy_pw_geom *g, Py_ssize_t q0, Py_ssize_t out_ns,
                                   chexcy_pw_pieces *pc)
{
    const Py_ssize_t P = g->P, nr = g->NP - q0 < GEMM_NR ? g->NP - q0 : GEMM_NR;
    pc->inside = nr == GEMM_NR && q0 % P + GEMM_NR <= P;   /* one sample, every column */
    pc->npc = 0;
    for (Py_ssize_t j = 0; j < nr; pc->npc++) {
        const Py_ssize_t p = (q0 + j) % P;
        pc->pj[pc->npc] = j;
        pc->pdst[pc->npc] = (q0 + j) / P * out_ns + p;
        j += P - p < nr - j ? P - p : nr - j;
    }
    pc->pj[pc->npc] = nr;
}

/* Ask for the mr rows of the next strip's tile (GEMM_NR floats each, rows P apart) in cache ahead of
 * their use: the output for writing, and r (not NULL) for reading. Rows of a 56x56 plane are 12 KiB
 * apart, a page each: too many streams for the hardware prefetchers to follow, and without this each
 * line of a tile's output was a miss to memory when the tile stored it (1x1 64 -> 256 at 56, batch 16,
 * output not in cache: 10.5 -> 7.8 ms). */
static inline void chexcy_pw_prefetch_rows(const float *y, const float *r, Py_ssize_t P, Py_ssize_t mr)
{
    for (Py_ssize_t i = 0; i < mr; i++)
        for (int l = 0; l < GEMM_NR; l += 16) {
            __builtin_prefetch(y + i * P + l, 1, 3);
            if (r)
                __builtin_prefetch(r + i * P + l, 0, 3);
        }
}

/* Strips per forward task at most (the size of its table of pieces). */
#define PW_MAX_STRIPS 8

/* One forward task: strips s0 .. s1 - 1 (columns s GEMM_NR ...) of one group's product, its row tiles
 * t0 .. t1 - 1 (rows t GEMM_MR ..., the last one cut at Fg), all of K.
 *   g: the group's input columns (g->x at its channel 0); ap: its packed weight; bias: (Fp,) the
 *   group's bias zero-padded to Fp = Fg rounded up to GEMM_MR; out: (N, ...) with this group's row f
 *   of sample n at out + n * out_ns + f * P; bbuf: (s1 - s0) GEMM_KC GEMM_NR floats and cbuf: (s1 - s0)
 *   (t1 - t0) GEMM_MR GEMM_NR floats (this thread's); res: NULL, or an array laid out as out whose
 *   elements the last K block's tiles add to theirs; relu: then max(., 0), in the same stores.
 * K blocks outermost (each element's blocks in order), then strips, then tiles down the rows: a packed
 * strip stays in L1 while the task's rows of the weight block (t1 - t0) GEMM_MR x kc stream from L2. The
 * output rows of the next strip (and of res) are prefetched tile by tile (chexcy_pw_prefetch_rows).
 * A tile that is not GEMM_MR whole rows of one sample (a strip across samples, the last rows) lives in
 * cbuf, GEMM_NR floats a row, for all K blocks, and its pieces go to their samples after the last one
 * (at 7x7, 2 strips in 3 cross a sample boundary). */
static void chexcy_pw_task(const chexcy_pw_geom *g, const float *ap, const float *bias, Py_ssize_t Fg,
                           Py_ssize_t K, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t t0, Py_ssize_t t1,
                           float *out, Py_ssize_t out_ns, float *bbuf, float *cbuf, int relu,
                           const float *res)
{
    const Py_ssize_t Fp = (Fg + GEMM_MR - 1) / GEMM_MR * GEMM_MR, P = g->P;
    chexcy_pw_pieces pcs[PW_MAX_STRIPS];
    for (Py_ssize_t s = s0; s < s1; s++)
        chexcy_pw_strip_pieces(g, s * GEMM_NR, out_ns, &pcs[s - s0]);
    for (Py_ssize_t k0 = 0; k0 < K; k0 += GEMM_KC) {
        const Py_ssize_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
        const int last = k0 + kc == K;
        const float *ablk = ap + k0 * Fp;
        chexcy_pw_pack_strips(g, s0, s1, k0, kc, bbuf);
        for (Py_ssize_t s = s0; s < s1; s++) {
            const chexcy_pw_pieces *pc = &pcs[s - s0];
            const chexcy_pw_pieces *next = s + 1 < s1 && pcs[s + 1 - s0].inside ? &pcs[s + 1 - s0] : NULL;
            const float *bs = bbuf + (s - s0) * kc * GEMM_NR;
            for (Py_ssize_t q = t0; q < t1; q++) {
                const Py_ssize_t i0 = q * GEMM_MR, mr = Fg - i0 < GEMM_MR ? Fg - i0 : GEMM_MR;
                const float *ini = k0 == 0 ? bias + i0 : NULL;
                float *base = out + i0 * P;
                const float *rbase = res ? res + i0 * P : NULL;
                if (next && (ini || (last && rbase)))
                    chexcy_pw_prefetch_rows(base + next->pdst[0], last && rbase ? rbase + next->pdst[0] : NULL, P,
                                            mr);
                if (pc->inside && mr == GEMM_MR) {
                    chexcy_pw_tile(kc, ablk + i0 * kc, bs, base + pc->pdst[0], P, ini, last && relu,
                                   last && rbase ? rbase + pc->pdst[0] : NULL);
                    continue;
                }
                /* edge: the tile in cbuf, its pieces written to their samples after the last K block
                 * (with res: the sum and ReLU on the way) */
                float *t = cbuf + ((s - s0) * (t1 - t0) + q - t0) * (GEMM_MR * GEMM_NR);
                chexcy_pw_tile(kc, ablk + i0 * kc, bs, t, GEMM_NR, ini, last && relu && !rbase, NULL);
                if (last)
                    for (int r = 0; r < pc->npc; r++)
                        for (Py_ssize_t i = 0; i < mr; i++) {
                            const Py_ssize_t len = pc->pj[r + 1] - pc->pj[r];
                            float *y = base + pc->pdst[r] + i * P;
                            const float *tr = t + i * GEMM_NR + pc->pj[r];
                            if (!rbase) {
                                chexcy_copy_short(y, tr, len);
                                continue;
                            }
                            const float *rr = rbase + pc->pdst[r] + i * P;
                            if (relu)
                                chexcy_relu_add(tr, rr, y, len);
                            else
                                for (Py_ssize_t j = 0; j < len; j++) y[j] = tr[j] + rr[j];
                        }
            }
        }
    }
}

/* ---- dweight -------------------------------------------------------------------------------------- */

/* A K block of dweight's operands: columns q0 .. q0 + kc - 1 of the batch, in runs within one sample.
 * Pack rows m0 .. m0 + mc - 1 of dout (row f of sample n at d + n * d_ns + f * P) into strips
 * (kc, GEMM_MR), strip stride kc * GEMM_MR, rows past mc zero. The GEMM_MR rows are read side by side. */
static void chexcy_pw_pack_dout(const float *d, Py_ssize_t d_ns, Py_ssize_t P, Py_ssize_t m0, Py_ssize_t mc,
                                Py_ssize_t q0, Py_ssize_t kc, float *dst)
{
    for (Py_ssize_t q = 0; q * GEMM_MR < mc; q++, dst += kc * GEMM_MR) {
        const Py_ssize_t i0 = m0 + q * GEMM_MR, mr = mc - q * GEMM_MR < GEMM_MR ? mc - q * GEMM_MR : GEMM_MR;
        for (Py_ssize_t k = 0; k < kc;) {
            const Py_ssize_t n = (q0 + k) / P, p = (q0 + k) % P;
            const Py_ssize_t len = P - p < kc - k ? P - p : kc - k;
            const float *src = d + n * d_ns + i0 * P + p;
            float *o = dst + k * GEMM_MR;
            if (mr == GEMM_MR) {
                for (Py_ssize_t e = 0; e < len; e++, o += GEMM_MR)
                    GEMM_UNROLL_ALL for (int i = 0; i < GEMM_MR; i++) o[i] = src[i * P + e];
            } else {
                for (Py_ssize_t e = 0; e < len; e++, o += GEMM_MR) {
                    for (Py_ssize_t i = 0; i < mr; i++) o[i] = src[i * P + e];
                    for (Py_ssize_t i = mr; i < GEMM_MR; i++) o[i] = 0.0f;
                }
            }
            k += len;
        }
    }
}

/* dst (kc, GEMM_NR): row k = x[n, c0 .. c0 + GEMM_NR - 1, p] for column q0 + k = n P + p (channel c at
 * x + n * x_ns + c * P), channels at or past C zero. The GEMM_NR channel rows are read side by side. */
static void chexcy_pw_pack_xt(const float *x, Py_ssize_t x_ns, Py_ssize_t P, Py_ssize_t C, Py_ssize_t c0,
                              Py_ssize_t q0, Py_ssize_t kc, float *dst)
{
    const Py_ssize_t nr = C - c0 < GEMM_NR ? C - c0 : GEMM_NR;
    for (Py_ssize_t k = 0; k < kc;) {
        const Py_ssize_t n = (q0 + k) / P, p = (q0 + k) % P;
        const Py_ssize_t len = P - p < kc - k ? P - p : kc - k;
        const float *src = x + n * x_ns + c0 * P + p;
        float *o = dst + k * GEMM_NR;
        if (nr == GEMM_NR) {
            for (Py_ssize_t e = 0; e < len; e++, o += GEMM_NR)
                GEMM_UNROLL_ALL for (int j = 0; j < GEMM_NR; j++) o[j] = src[j * P + e];
        } else {
            for (Py_ssize_t e = 0; e < len; e++, o += GEMM_NR) {
                for (Py_ssize_t j = 0; j < nr; j++) o[j] = src[j * P + e];
                for (Py_ssize_t j = nr; j < GEMM_NR; j++) o[j] = 0.0f;
            }
        }
        k += len;
    }
}

/* One dweight task: rows m0 .. m0 + mc - 1 and column strips s0 .. s1 - 1 of one group's dweight
 * (Fg, Cg), rows ldw floats apart, summed over columns qa .. qb - 1 of the batch's N P (stride 1; qa a
 * multiple of GEMM_KC): all of them for the whole dweight, or one chunk of them for a partial sum.
 *   dout: the group's row 0 of sample 0 (row f of sample n at + n * d_ns + f * P);
 *   x: the group's channel 0 of sample 0 (channel c of sample n at + n * x_ns + c * P);
 *   abuf: mc rounded up to GEMM_MR times GEMM_KC floats, bbuf: GEMM_KC x GEMM_NR (this thread's).
 * The first strip starts at row tile ta and the last one ends before tile tb (tiles of GEMM_MR rows
 * from m0): ta = 0 and tb = ceil(mc / GEMM_MR) for a rectangle, else a run of the line of (strip, tile)
 * pairs, whose cut strips share their tiles with the neighbouring runs. */
static void chexcy_pw_dweight_task(const float *dout, Py_ssize_t d_ns, const float *x, Py_ssize_t x_ns,
                                   Py_ssize_t P, Py_ssize_t qa, Py_ssize_t qb, Py_ssize_t Cg, Py_ssize_t m0,
                                   Py_ssize_t mc, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t ta, Py_ssize_t tb,
                                   float *dweight, Py_ssize_t ldw, float *abuf, float *bbuf)
{
    float t[GEMM_MR * GEMM_NR] __attribute__((aligned(64)));
    const Py_ssize_t nq = (mc + GEMM_MR - 1) / GEMM_MR;
    /* the rows' tiles any strip needs: one strip only needs its own */
    const Py_ssize_t pa = s1 - s0 == 1 ? ta : 0, pb = s1 - s0 == 1 ? tb : nq;
    const Py_ssize_t pm = pb * GEMM_MR < mc ? pb * GEMM_MR : mc;
    for (Py_ssize_t q0 = qa; q0 < qb; q0 += GEMM_KC) {
        const Py_ssize_t kc = qb - q0 < GEMM_KC ? qb - q0 : GEMM_KC;
        const int add = q0 > qa;
        chexcy_pw_pack_dout(dout, d_ns, P, m0 + pa * GEMM_MR, pm - pa * GEMM_MR, q0, kc,
                            abuf + pa * kc * GEMM_MR);
        for (Py_ssize_t s = s0; s < s1; s++) {
            const Py_ssize_t j0 = s * GEMM_NR, nr = Cg - j0 < GEMM_NR ? Cg - j0 : GEMM_NR;
            const Py_ssize_t qlo = s == s0 ? ta : 0, qhi = s == s1 - 1 ? tb : nq;
            chexcy_pw_pack_xt(x, x_ns, P, Cg, j0, q0, kc, bbuf);
            for (Py_ssize_t q = qlo; q < qhi; q++) {
                const Py_ssize_t i0 = m0 + q * GEMM_MR, mr = mc - q * GEMM_MR < GEMM_MR ? mc - q * GEMM_MR : GEMM_MR;
                float *c = dweight + i0 * ldw + j0;
                if (mr == GEMM_MR && nr == GEMM_NR) {
                    chexcy_gemm_tile_rows(1, kc, abuf + q * kc * GEMM_MR, bbuf, 0, c, ldw, add);
                } else if (nr == GEMM_NR) {
                    chexcy_gemm_tile_rows_part(1, kc, abuf + q * kc * GEMM_MR, bbuf, 0, c, ldw, add, mr);
                } else {
                    memset(t, 0, sizeof t);
                    if (add)
                        for (Py_ssize_t i = 0; i < mr; i++) memcpy(t + i * GEMM_NR, c + i * ldw, nr * sizeof(float));
                    chexcy_gemm_tile_rows(1, kc, abuf + q * kc * GEMM_MR, bbuf, 0, t, GEMM_NR, add);
                    for (Py_ssize_t i = 0; i < mr; i++) memcpy(c + i * ldw, t + i * GEMM_NR, nr * sizeof(float));
                }
            }
        }
    }
}

#endif
