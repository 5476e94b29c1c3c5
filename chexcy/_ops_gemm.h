/* chexcy/_ops_gemm.h: the blocked single-precision matrix multiply behind the linear op.
 *
 *   C (M, N) = init (N,) + A (M, K) B (K, N)          (every row of C starts from the same init row)
 *
 * A and B are read through element strides, so one kernel serves the three products of a dense layer:
 *   forward  y  = x W^T + b :  A = x      (rs K, cs 1),  B = W^T (rs 1, cs K),  init = b
 *   dx          = dout W    :  A = dout   (rs O, cs 1),  B = W   (rs K, cs 1),  init = 0
 *   dweight     = dout^T x  :  A = dout^T (rs 1, cs O),  B = x   (rs K, cs 1),  init = 0
 *
 * How it is fast (the classic scheme for a matrix multiply on a CPU):
 * - Register tile: GEMM_MR rows x GEMM_NV vectors of C live in vector registers for a whole block of
 *   K. Each step k loads GEMM_NV vectors of B once and broadcasts GEMM_MR elements of A: GEMM_MR *
 *   GEMM_NV multiply-adds for GEMM_NV + GEMM_MR loads.
 * - Packing: B is copied once per call into strips of GEMM_NR = GEMM_NV * VW columns, each strip
 *   (K, GEMM_NR) contiguous and zero-padded past column N; A is copied, per block of GEMM_KC steps of
 *   K, into strips of GEMM_MR rows, (kc, GEMM_MR) contiguous and zero-padded past row M. The tile loop
 *   then streams contiguous memory whatever the layout of the operands was (a transposed operand costs
 *   only its packing), and the edges of the matrices are zeros the tile multiplies harmlessly.
 * - Cache blocking: K is cut in blocks of GEMM_KC, so a B strip block (kc x GEMM_NR floats, 32 KiB on
 *   AVX-512) stays in L1 while the tile walks down the packed rows of A (mc x kc, in L2).
 * - Edges: a tile whose last rows stick out of C runs on a third or two thirds of the register tile
 *   where that holds them; one whose last columns stick out runs the same tile code on a local
 *   GEMM_MR x GEMM_NR copy and writes back only the part inside C; nothing outside the arrays is read
 *   or written.
 *
 * Reproducibility and accuracy: every element of C is init[n] + s_0 + s_1 + ..., added in that order,
 * where s_p is the sum of the multiply-adds of K block p (steps p * GEMM_KC ...) in k order in one
 * float32 accumulator started at 0 (multiply-adds contracted to FMA where the target has it, no
 * reassociation). The K blocks are fixed by K alone, so the value of an element does not depend on
 * the tiling, the task grid or which thread computed it: results are bitwise identical for any thread
 * count. Summing each block from 0 (as BLAS kernels do) keeps the running sums, and so their rounding
 * errors, at the size of one block's sum instead of letting them grow with K (measured: ~3e-5 absolute
 * at K = 1100 for standard-normal inputs, like the BLAS fallback's).
 *
 * A forward of at most GEMM_DOT_M rows skips all of this for dot products (chexcy_gemm_dot_rows, below).
 *
 * Needs _ops_config.h first (chexcy_vf, CHEXCY_VW, chexcy_load / chexcy_store / chexcy_splat).
 */
#ifndef CHEXCY_OPS_GEMM_H
#define CHEXCY_OPS_GEMM_H

#include <string.h>

/* Tile: GEMM_MR x GEMM_NV accumulators plus GEMM_NV loaded B vectors and one broadcast must fit the
 * register file without spilling. AVX-512 (32 zmm): 12 x 2 = 24 + 2 + 1. AVX2 (16 ymm): 6 x 2 = 12 + 2
 * + 1. SSE2 (16 xmm, no FMA: a temporary per multiply-add): 4 x 2 = 8 + 2 + 1 + temporaries. */
#if CHEXCY_VW == 16
#define GEMM_MR 12
#define GEMM_NV 2
#elif CHEXCY_VW == 8
#define GEMM_MR 6
#define GEMM_NV 2
#else
#define GEMM_MR 4
#define GEMM_NV 2
#endif
#define GEMM_NR (GEMM_NV * CHEXCY_VW)
/* Full unrolling of the packing loops over a strip's GEMM_NR (<= 32) columns or GEMM_MR rows: scalar
 * copies from side-by-side streams. Partly unrolled (CHEXCY_UNROLL's 16), gcc turned the 32-column
 * loop into gathers, 6x slower. */
#define GEMM_UNROLL_ALL _Pragma("GCC unroll 32")
/* K block: a packed B strip block of GEMM_KC x GEMM_NR floats (32 KiB on AVX-512) and one of A
 * (GEMM_KC x GEMM_MR, 12 KiB) fit a 48 KiB L1 together. */
#define GEMM_KC 256
/* Rows of A per task at most (a multiple of every GEMM_MR): the packed A block (GEMM_MC x 256 floats)
 * stays in L2 while every B strip of the task passes over it, and every row block reads all of packed
 * B again. 432 rows (432 KiB) where AVX-512 machines have 1-2 MiB of L2 per core: against 144, dense
 * backward 512 x 4096 -> 1000 35.1 -> 31.5 ms, 256 x 2048 -> 1000 8.4 -> 7.7 ms (2 threads, A/B in one
 * process; forwards unchanged); 144 (144 KiB) elsewhere, for L2s of 256 KiB. */
#if CHEXCY_VW == 16
#define GEMM_MC 432
#else
#define GEMM_MC 144
#endif
/* Products of fewer multiply-adds than this run on one thread: about 1-2 microseconds of work, less
 * than waking and joining a second thread costs (ref-cnn's dense layer: 32 x 128 x 14 = 57344). The
 * result is the same either way (see above). */
#define GEMM_SERIAL_MADDS (1 << 17)

/* One register tile over kc steps of K, its first `rows` (a constant after inlining, <= GEMM_MR) rows:
 *   c[i, j] (i < mr, j < GEMM_NR, row i at c + i * ldc) = start[i, j] + (sum_k a[k, i] * b[k, j])
 *   (the K block summed from 0 in k order, then added to the start value once)
 *   a: packed A strip (kc, GEMM_MR); b: packed B strip block (kc, GEMM_NR), row k at b + k * GEMM_NR
 *   start: the init row `init` (GEMM_NR floats, the same for every row) when init != NULL, else c.
 * Rows mr .. rows - 1 are computed (A's packing is zero there) but neither read nor written in c (mr =
 * GEMM_MR: the test folds away). */
static inline __attribute__((always_inline)) void chexcy_gemm_tile_body(Py_ssize_t kc, const float *restrict a,
                                                                       const float *restrict b, float *c,
                                                                       Py_ssize_t ldc, const float *init,
                                                                       const int rows, Py_ssize_t mr)
{
    chexcy_vf acc[GEMM_MR][GEMM_NV], bv[GEMM_NV];
    CHEXCY_UNROLL for (int i = 0; i < rows; i++)
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) acc[i][v] = chexcy_splat(0.0f);
    for (Py_ssize_t k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) bv[v] = chexcy_load(b + v * CHEXCY_VW);
        CHEXCY_UNROLL for (int i = 0; i < rows; i++) {
            chexcy_vf ai = chexcy_splat(a[i]);
            CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) acc[i][v] += ai * bv[v];
        }
    }
    if (init)
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) bv[v] = chexcy_load(init + v * CHEXCY_VW);
    CHEXCY_UNROLL for (int i = 0; i < rows; i++) {
        if (i >= mr)
            break;
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) {
            float *o = c + i * ldc + v * CHEXCY_VW;
            chexcy_store(o, (init ? bv[v] : chexcy_load(o)) + acc[i][v]);
        }
    }
}

/* The full tile (every row inside C).
 * noinline: compiled on its own the k loop keeps all accumulators in registers (inlined into the
 * OpenMP body, gcc has fewer registers to give it); the call costs nothing next to kc steps. */
static __attribute__((noinline)) void chexcy_gemm_tile(Py_ssize_t kc, const float *restrict a,
                                                       const float *restrict b, float *c,
                                                       Py_ssize_t ldc, const float *init)
{
    chexcy_gemm_tile_body(kc, a, b, c, ldc, init, GEMM_MR, GEMM_MR);
}

/* A tile of whole columns whose first mr (< GEMM_MR) rows lie inside C, on the smallest of the tiles of
 * GEMM_MR / 3 (rounded up to 2) or 2 GEMM_MR / 3 rows that holds them: channel counts are powers of two
 * and GEMM_MR is 12 or 6, so a layer's last row block is 1/3 or 2/3 of a tile (64 rows: 5 tiles and 4
 * rows), and the full tile did up to 3x its multiply-adds there. The sums of each element are those of
 * the full tile. */
#define GEMM_MR_PART (GEMM_MR / 3 > 2 ? GEMM_MR / 3 : 2)
static __attribute__((noinline)) void chexcy_gemm_tile_part(Py_ssize_t kc, const float *restrict a,
                                                            const float *restrict b, float *c,
                                                            Py_ssize_t ldc, const float *init, Py_ssize_t mr)
{
    if (mr <= GEMM_MR_PART)
        chexcy_gemm_tile_body(kc, a, b, c, ldc, init, GEMM_MR_PART, mr);
    else if (2 * GEMM_MR_PART < GEMM_MR && mr <= 2 * GEMM_MR_PART)
        chexcy_gemm_tile_body(kc, a, b, c, ldc, init, 2 * GEMM_MR_PART < GEMM_MR ? 2 * GEMM_MR_PART : GEMM_MR, mr);
    else
        chexcy_gemm_tile_body(kc, a, b, c, ldc, init, GEMM_MR, mr);
}

/* The register tile of the convolution products (chexcy._ops: channel-blocked dweight, _dwc_*, and
 * Winograd, _wino_* / _wdw_*) over a block of `rows` rows of `ow` steps each, K steps k = r * ow + w:
 *   c[i, j] (+)= sum over k of a[k * GEMM_MR + i] * b[r * b_rs + w * GEMM_NR + j]
 * (the block summed from 0 in k order, then added to c once when `add`, else stored). a: a packed
 * strip (k, GEMM_MR); b: rows of GEMM_NR floats, consecutive within a row, rows b_rs floats apart (for
 * dweight, one kernel tap's view of the channel-blocked padded input, its padding columns skipped;
 * for Winograd, ow = 1). The registers are those of chexcy_gemm_tile, and so is the reason for
 * noinline. The body computes `mrows` rows (a constant after inlining) and stores the first mr. */
static inline __attribute__((always_inline)) void chexcy_gemm_tile_rows_body(
    Py_ssize_t rows, Py_ssize_t ow, const float *restrict a, const float *restrict b, Py_ssize_t b_rs, float *c,
    Py_ssize_t ldc, int add, const int mrows, Py_ssize_t mr)
{
    chexcy_vf acc[GEMM_MR][GEMM_NV], bv[GEMM_NV];
    CHEXCY_UNROLL for (int i = 0; i < mrows; i++)
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) acc[i][v] = chexcy_splat(0.0f);
    for (Py_ssize_t r = 0; r < rows; r++, b += b_rs) {
        const float *bw = b;
        for (Py_ssize_t w = 0; w < ow; w++, a += GEMM_MR, bw += GEMM_NR) {
            CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) bv[v] = chexcy_load(bw + v * CHEXCY_VW);
            CHEXCY_UNROLL for (int i = 0; i < mrows; i++) {
                chexcy_vf ai = chexcy_splat(a[i]);
                CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) acc[i][v] += ai * bv[v];
            }
        }
    }
    CHEXCY_UNROLL for (int i = 0; i < mrows; i++) {
        if (i >= mr)
            break;
        CHEXCY_UNROLL for (int v = 0; v < GEMM_NV; v++) {
            float *o = c + i * ldc + v * CHEXCY_VW;
            chexcy_store(o, add ? chexcy_load(o) + acc[i][v] : acc[i][v]);
        }
    }
}

static __attribute__((noinline)) void chexcy_gemm_tile_rows(Py_ssize_t rows, Py_ssize_t ow,
                                                            const float *restrict a,
                                                            const float *restrict b, Py_ssize_t b_rs,
                                                            float *c, Py_ssize_t ldc, int add)
{
    chexcy_gemm_tile_rows_body(rows, ow, a, b, b_rs, c, ldc, add, GEMM_MR, GEMM_MR);
}

/* chexcy_gemm_tile_rows for the first mr (< GEMM_MR) rows only, as chexcy_gemm_tile_part. */
static __attribute__((noinline)) void chexcy_gemm_tile_rows_part(Py_ssize_t rows, Py_ssize_t ow,
                                                                 const float *restrict a,
                                                                 const float *restrict b, Py_ssize_t b_rs,
                                                                 float *c, Py_ssize_t ldc, int add, Py_ssize_t mr)
{
    if (mr <= GEMM_MR_PART)
        chexcy_gemm_tile_rows_body(rows, ow, a, b, b_rs, c, ldc, add, GEMM_MR_PART, mr);
    else if (2 * GEMM_MR_PART < GEMM_MR && mr <= 2 * GEMM_MR_PART)
        chexcy_gemm_tile_rows_body(rows, ow, a, b, b_rs, c, ldc, add,
                                   2 * GEMM_MR_PART < GEMM_MR ? 2 * GEMM_MR_PART : GEMM_MR, mr);
    else
        chexcy_gemm_tile_rows_body(rows, ow, a, b, b_rs, c, ldc, add, GEMM_MR, mr);
}

/* The same tile where only mr (<= GEMM_MR) rows and nr (<= GEMM_NR) columns lie inside C: with all the
 * columns inside, chexcy_gemm_tile_part; else it runs on a local full tile (rows and columns outside C
 * start from 0, or from the init row) and copies back the part inside C. The arithmetic of every
 * element inside C is exactly that of a full tile. */
static void chexcy_gemm_tile_edge(Py_ssize_t kc, const float *a, const float *b, float *c,
                                  Py_ssize_t ldc, const float *init, Py_ssize_t mr, Py_ssize_t nr)
{
    if (nr == GEMM_NR) {
        chexcy_gemm_tile_part(kc, a, b, c, ldc, init, mr);
        return;
    }
    float t[GEMM_MR * GEMM_NR] __attribute__((aligned(64)));
    memset(t, 0, sizeof t);
    if (!init)
        for (Py_ssize_t i = 0; i < mr; i++) memcpy(t + i * GEMM_NR, c + i * ldc, nr * sizeof(float));
    chexcy_gemm_tile(kc, a, b, t, GEMM_NR, init);
    for (Py_ssize_t i = 0; i < mr; i++) memcpy(c + i * ldc, t + i * GEMM_NR, nr * sizeof(float));
}

/* Pack B strip s (columns s * GEMM_NR ...) entirely: dst (K, GEMM_NR) = B[k, j] = src[k * rs + j * cs],
 * columns at or past N set to 0. Two layouts: rows of B contiguous (cs == 1: a copy per k) or columns
 * contiguous (rs == 1, a transposed operand). The transposed one is written row after row, reading the
 * GEMM_NR columns side by side (GEMM_NR sequential streams): twice as fast as reading one column at a
 * time into strided stores (measured, AVX-512: 0.27 vs 0.5 ns per float). */
static void chexcy_gemm_pack_b(const float *src, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t K,
                               Py_ssize_t N, Py_ssize_t s, float *dst)
{
    const Py_ssize_t j0 = s * GEMM_NR;
    const Py_ssize_t nr = N - j0 < GEMM_NR ? N - j0 : GEMM_NR;
    if (cs == 1) {
        for (Py_ssize_t k = 0; k < K; k++) {
            float *d = dst + k * GEMM_NR;
            memcpy(d, src + k * rs + j0, nr * sizeof(float));
            for (Py_ssize_t j = nr; j < GEMM_NR; j++) d[j] = 0.0f;
        }
    } else if (nr == GEMM_NR && rs == 1) {
        const float *col = src + j0 * cs;
        for (Py_ssize_t k = 0; k < K; k++) {
            float *d = dst + k * GEMM_NR;
            GEMM_UNROLL_ALL for (int j = 0; j < GEMM_NR; j++) d[j] = col[j * cs + k];
        }
    } else {
        const float *col = src + j0 * cs;
        for (Py_ssize_t k = 0; k < K; k++, col += rs) {
            float *d = dst + k * GEMM_NR;
            for (Py_ssize_t j = 0; j < nr; j++) d[j] = col[j * cs];
            for (Py_ssize_t j = nr; j < GEMM_NR; j++) d[j] = 0.0f;
        }
    }
}

/* Pack rows m0 .. m0 + mc - 1 and steps k0 .. k0 + kc - 1 of A (A[m, k] = src[m * rs + k * cs]) into
 * ceil(mc / GEMM_MR) strips, strip q at dst + q * kc * GEMM_MR laid out (kc, GEMM_MR); rows at or past
 * m0 + mc are 0. Written step after step, the GEMM_MR rows read side by side (as pack_b above); when
 * A is transposed (rs == 1) each step is a copy of GEMM_MR adjacent floats. */
static void chexcy_gemm_pack_a(const float *src, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t m0,
                               Py_ssize_t mc, Py_ssize_t k0, Py_ssize_t kc, float *dst)
{
    for (Py_ssize_t q = 0; q * GEMM_MR < mc; q++, dst += kc * GEMM_MR) {
        const Py_ssize_t i0 = m0 + q * GEMM_MR;
        const Py_ssize_t mr = mc - q * GEMM_MR < GEMM_MR ? mc - q * GEMM_MR : GEMM_MR;
        const float *p = src + i0 * rs + k0 * cs;
        if (mr == GEMM_MR) {
            for (Py_ssize_t k = 0; k < kc; k++, p += cs) {
                float *d = dst + k * GEMM_MR;
                GEMM_UNROLL_ALL for (int i = 0; i < GEMM_MR; i++) d[i] = p[i * rs];
            }
        } else {
            for (Py_ssize_t k = 0; k < kc; k++, p += cs) {
                float *d = dst + k * GEMM_MR;
                for (Py_ssize_t i = 0; i < mr; i++) d[i] = p[i * rs];
                for (Py_ssize_t i = mr; i < GEMM_MR; i++) d[i] = 0.0f;
            }
        }
    }
}

/* chexcy_gemm_pack_a with row m of A multiplied by scale[m] (a conv weight times a folded BatchNorm's
 * per-channel scale, each product rounded once: the bits of NumPy's w * scale); scale NULL: plain. */
static void chexcy_gemm_pack_a_scaled(const float *src, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t m0,
                                      Py_ssize_t mc, Py_ssize_t k0, Py_ssize_t kc, float *dst,
                                      const float *scale)
{
    if (!scale) {
        chexcy_gemm_pack_a(src, rs, cs, m0, mc, k0, kc, dst);
        return;
    }
    for (Py_ssize_t q = 0; q * GEMM_MR < mc; q++, dst += kc * GEMM_MR) {
        const Py_ssize_t i0 = m0 + q * GEMM_MR;
        const Py_ssize_t mr = mc - q * GEMM_MR < GEMM_MR ? mc - q * GEMM_MR : GEMM_MR;
        const float *p = src + i0 * rs + k0 * cs;
        float sc[GEMM_MR];
        for (Py_ssize_t i = 0; i < GEMM_MR; i++) sc[i] = i < mr ? scale[i0 + i] : 0.0f;
        if (mr == GEMM_MR) {
            for (Py_ssize_t k = 0; k < kc; k++, p += cs) {
                float *d = dst + k * GEMM_MR;
                GEMM_UNROLL_ALL for (int i = 0; i < GEMM_MR; i++) d[i] = p[i * rs] * sc[i];
            }
            continue;
        }
        for (Py_ssize_t k = 0; k < kc; k++, p += cs) {
            float *d = dst + k * GEMM_MR;
            for (Py_ssize_t i = 0; i < mr; i++) d[i] = p[i * rs] * sc[i];
            for (Py_ssize_t i = mr; i < GEMM_MR; i++) d[i] = 0.0f;
        }
    }
}

/* A weight packed whole for the block products of the conv paths: ceil(M / GEMM_MR) strips of GEMM_MR
 * rows for every K block, block kb at kb * GEMM_KC * Mp (Mp = M rounded up to GEMM_MR), strip q of it at
 * q * kc * GEMM_MR from there (kc the block's steps), each (kc, GEMM_MR), rows past M zero. */
static inline Py_ssize_t chexcy_gemm_apack_floats(Py_ssize_t M, Py_ssize_t K)
{
    return (M + GEMM_MR - 1) / GEMM_MR * GEMM_MR * K;
}

/* Strips q0 .. q1 - 1 of K block kb of a weight (M, K) whose element (m, k) is w[m * rs + k * cs], times
 * scale[m] when scale is not NULL, into ap (the layout above): a piece of the packing small enough to
 * share among threads. */
static void chexcy_gemm_pack_a_part(const float *w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t M,
                                    Py_ssize_t K, Py_ssize_t kb, Py_ssize_t q0, Py_ssize_t q1, float *ap,
                                    const float *scale)
{
    const Py_ssize_t Mp = (M + GEMM_MR - 1) / GEMM_MR * GEMM_MR, k0 = kb * GEMM_KC;
    const Py_ssize_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
    const Py_ssize_t m0 = q0 * GEMM_MR, m1 = q1 * GEMM_MR < M ? q1 * GEMM_MR : M;
    if (m1 > m0)
        chexcy_gemm_pack_a_scaled(w, rs, cs, m0, m1 - m0, k0, kc, ap + k0 * Mp + m0 * kc, scale);
}

/* One task: C rows m0 .. m0 + mc - 1, columns of B strips s0 .. s1 - 1 (clipped to N), all of K.
 *   bp: every B strip packed by chexcy_gemm_pack_b, strip s at bp + s * K * GEMM_NR
 *   init: (ceil(N / GEMM_NR) * GEMM_NR,) the start value of every column, zero-padded
 *   abuf: this thread's scratch, at least min(mc rounded up to GEMM_MR, ...) x min(K, GEMM_KC) floats:
 *         chexcy_gemm_abuf_floats(mc, K)
 * Loop order: K blocks outermost (so each element's multiply-adds run in k order), then B strips, then
 * A strips: the B strip block stays in L1 while the packed A block streams from L2. */
static inline Py_ssize_t chexcy_gemm_abuf_floats(Py_ssize_t mc, Py_ssize_t K)
{
    Py_ssize_t rows = (mc + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
    return rows * (K < GEMM_KC ? K : GEMM_KC);
}

static void chexcy_gemm_task(const float *A, Py_ssize_t a_rs, Py_ssize_t a_cs, Py_ssize_t m0,
                             Py_ssize_t mc, Py_ssize_t K, const float *bp, Py_ssize_t s0, Py_ssize_t s1,
                             Py_ssize_t N, const float *init, float *C, Py_ssize_t ldc, float *abuf)
{
    for (Py_ssize_t k0 = 0; k0 < K; k0 += GEMM_KC) {
        const Py_ssize_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
        chexcy_gemm_pack_a(A, a_rs, a_cs, m0, mc, k0, kc, abuf);
        for (Py_ssize_t s = s0; s < s1; s++) {
            const Py_ssize_t j0 = s * GEMM_NR;
            const Py_ssize_t nr = N - j0 < GEMM_NR ? N - j0 : GEMM_NR;
            const float *b = bp + s * K * GEMM_NR + k0 * GEMM_NR;
            const float *ini = k0 == 0 ? init + j0 : NULL;
            for (Py_ssize_t q = 0; q * GEMM_MR < mc; q++) {
                const Py_ssize_t i0 = m0 + q * GEMM_MR;
                const Py_ssize_t mr = mc - q * GEMM_MR < GEMM_MR ? mc - q * GEMM_MR : GEMM_MR;
                const float *a = abuf + q * kc * GEMM_MR;
                /* Spread over this strip's tiles, prefetch the next strip's block (kc x GEMM_NR, from
                 * memory: packed B is re-read by every task) into L2, so its first tile does not wait
                 * for it: 1024 x 4096 x 1000 forward, one thread, 61 -> 54-58 ms. */
                if (s + 1 < s1) {
                    const Py_ssize_t nq = (mc + GEMM_MR - 1) / GEMM_MR;
                    const Py_ssize_t lines = kc * GEMM_NR / 16, per = (lines + nq - 1) / nq;
                    const float *nb = b + K * GEMM_NR;
                    for (Py_ssize_t l = q * per; l < (q + 1) * per && l < lines; l++)
                        __builtin_prefetch(nb + l * 16, 0, 2);
                }
                if (mr == GEMM_MR && nr == GEMM_NR)
                    chexcy_gemm_tile(kc, a, b, C + i0 * ldc + j0, ldc, ini);
                else
                    chexcy_gemm_tile_edge(kc, a, b, C + i0 * ldc + j0, ldc, ini, mr, nr);
            }
        }
    }
}

/* ---- dense layers of a few rows: dot products --------------------------------------------------------
 * y (M, O) = x (M, K) W^T + b for M <= GEMM_DOT_M (a classifier at inference batch sizes): the GEMM
 * above would pack all of W transposed (O x K floats written, then read again) for a product that
 * reuses each weight only M times. Instead every output is a dot product of two contiguous rows,
 * x[m] and W[j], computed GEMM_DOT_MB rows of x by GEMM_DOT_JB rows of W at a time with the sums in
 * vector lanes: W is read once, straight from the caller's array, and x (M x K) stays in cache.
 * Each element is bias[j] + (the lanes' sums totalled by chexcy_lane_total's fixed halving) + (the
 * K % VW tail in k order): fixed by the shape, whichever thread computes it. */
#if CHEXCY_VW == 16
#define GEMM_DOT_MB 8
#define GEMM_DOT_JB 3
#else
#define GEMM_DOT_MB 4
#define GEMM_DOT_JB 2
#endif
#define GEMM_DOT_M 8

/* out[m * ldo + j] for m < M, j0 <= j < j1 (M <= GEMM_DOT_M); bias may be NULL. Rows of x or W past
 * the last are computed on a repeat of the last row and not stored. */
static void chexcy_gemm_dot_rows(const float *x, Py_ssize_t M, Py_ssize_t K, const float *w,
                                 Py_ssize_t j0, Py_ssize_t j1, const float *bias, float *out, Py_ssize_t ldo)
{
    const Py_ssize_t Kv = K / CHEXCY_VW * CHEXCY_VW;
    for (Py_ssize_t m0 = 0; m0 < M; m0 += GEMM_DOT_MB) {
        const float *xr[GEMM_DOT_MB];
        for (int i = 0; i < GEMM_DOT_MB; i++) xr[i] = x + (m0 + i < M ? m0 + i : M - 1) * K;
        for (Py_ssize_t jb = j0; jb < j1; jb += GEMM_DOT_JB) {
            const float *wr[GEMM_DOT_JB];
            for (int jj = 0; jj < GEMM_DOT_JB; jj++) wr[jj] = w + (jb + jj < j1 ? jb + jj : j1 - 1) * K;
            chexcy_vf acc[GEMM_DOT_MB][GEMM_DOT_JB];
            CHEXCY_UNROLL for (int i = 0; i < GEMM_DOT_MB; i++)
                CHEXCY_UNROLL for (int jj = 0; jj < GEMM_DOT_JB; jj++) acc[i][jj] = chexcy_splat(0.0f);
            for (Py_ssize_t k = 0; k < Kv; k += CHEXCY_VW) {
                chexcy_vf wv[GEMM_DOT_JB];
                CHEXCY_UNROLL for (int jj = 0; jj < GEMM_DOT_JB; jj++) wv[jj] = chexcy_load(wr[jj] + k);
                CHEXCY_UNROLL for (int i = 0; i < GEMM_DOT_MB; i++) {
                    chexcy_vf xv = chexcy_load(xr[i] + k);
                    CHEXCY_UNROLL for (int jj = 0; jj < GEMM_DOT_JB; jj++) acc[i][jj] += xv * wv[jj];
                }
            }
            for (int i = 0; i < GEMM_DOT_MB && m0 + i < M; i++)
                for (int jj = 0; jj < GEMM_DOT_JB && jb + jj < j1; jj++) {
                    float l[CHEXCY_VW];
                    chexcy_store(l, acc[i][jj]);
                    float t = chexcy_lane_total(l);
                    for (Py_ssize_t k = Kv; k < K; k++) t += xr[i][k] * wr[jj][k];
                    out[(m0 + i) * ldo + jb + jj] = (bias ? bias[jb + jj] : 0.0f) + t;
                }
        }
    }
}

/* The backward of a dense layer of M <= GEMM_DOT_M rows, without packing (the GEMM would pack O x K
 * floats to reuse each only M times). dweight rows o0 .. o1 - 1 of (O, K) = dout^T x: row o is
 * dout[0, o] x[0] + dout[1, o] x[1] + ..., added in row order over contiguous rows of x.
 * The kernels below take the row count as a constant (one copy per M, chexcy_gemm_rows_switch), so that
 * their M broadcasts and sums stay in registers: with M a variable, gcc kept dx's sums on the stack
 * (a load and a store per multiply-add). */
#define chexcy_gemm_rows_switch(M, CALL) \
    switch (M) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; \
    }

static inline __attribute__((always_inline)) void chexcy_gemm_outer_row(const float *dout, const int rows,
                                                                       Py_ssize_t O, const float *x,
                                                                       Py_ssize_t K, Py_ssize_t o, float *row)
{
    const Py_ssize_t Kv = K / CHEXCY_VW * CHEXCY_VW;
    chexcy_vf d[GEMM_DOT_M];
    CHEXCY_UNROLL for (int m = 0; m < rows; m++) d[m] = chexcy_splat(dout[m * O + o]);
    for (Py_ssize_t k = 0; k < Kv; k += CHEXCY_VW) {
        chexcy_vf acc = d[0] * chexcy_load(x + k);
        /* (a rounded product: unrolled, gcc would otherwise fuse it into the first add instead of the
         * second product, fma(d0, x0, d1 x1) for fma(d1, x1, d0 x0)) */
        CHEXCY_IN_REGISTER(acc);
        CHEXCY_UNROLL for (int m = 1; m < rows; m++) acc += d[m] * chexcy_load(x + m * K + k);
        chexcy_store(row + k, acc);
    }
    for (Py_ssize_t k = Kv; k < K; k++) {
        float t = dout[o] * x[k];
        CHEXCY_IN_REGISTER(t);
        for (int m = 1; m < rows; m++) t += dout[m * O + o] * x[m * K + k];
        row[k] = t;
    }
}

static void chexcy_gemm_outer_rows(const float *dout, Py_ssize_t M, Py_ssize_t O, const float *x, Py_ssize_t K,
                                   Py_ssize_t o0, Py_ssize_t o1, float *dweight)
{
    for (Py_ssize_t o = o0; o < o1; o++) {
#define CHEXCY_OUTER_ROW(R) chexcy_gemm_outer_row(dout, R, O, x, K, o, dweight + o * K)
        chexcy_gemm_rows_switch(M, CHEXCY_OUTER_ROW)
#undef CHEXCY_OUTER_ROW
    }
}

/* dx columns k0 .. k1 - 1 of (M, K) = dout (M, O) W (O, K) for M <= GEMM_DOT_M: each sum over o in order
 * of dout[m, o] W[o, k], in blocks of GEMM_DX_KB columns, each swept in register tiles of M rows by up
 * to GEMM_DX_ACC / M vectors (at most 8: a few rows need several independent sums per row to hide the
 * multiply-add latency) while W's rows of the block (in L2 after the first sweep) stream past. */
#define GEMM_DX_KB 128
#if CHEXCY_VW == 16
#define GEMM_DX_ACC 24      /* sums in a tile: 24 + a row of W + a broadcast in 32 zmm registers */
#else
#define GEMM_DX_ACC 12      /* of 16 ymm / xmm */
#endif

/* dx[m, b0 ..] for m < rows over nv (<= 8) vectors of columns. */
static inline __attribute__((always_inline)) void chexcy_gemm_dx_tile(const float *dout, const int rows,
                                                                     Py_ssize_t O, const float *w,
                                                                     Py_ssize_t K, Py_ssize_t b0,
                                                                     const int nv, float *dx)
{
    chexcy_vf acc[GEMM_DOT_M][8];
    CHEXCY_UNROLL for (int m = 0; m < rows; m++) {
        const chexcy_vf d = chexcy_splat(dout[m * O]);
        CHEXCY_UNROLL for (int v = 0; v < nv; v++) {
            acc[m][v] = d * chexcy_load(w + b0 + v * CHEXCY_VW);
            CHEXCY_IN_REGISTER(acc[m][v]);      /* a rounded product, as chexcy_gemm_outer_row's */
        }
    }
    for (Py_ssize_t o = 1; o < O; o++) {
        const float *wr = w + o * K + b0;
        CHEXCY_UNROLL for (int m = 0; m < rows; m++) {
            const chexcy_vf d = chexcy_splat(dout[m * O + o]);
            CHEXCY_UNROLL for (int v = 0; v < nv; v++) acc[m][v] += d * chexcy_load(wr + v * CHEXCY_VW);
        }
    }
    CHEXCY_UNROLL for (int m = 0; m < rows; m++)
        CHEXCY_UNROLL for (int v = 0; v < nv; v++) chexcy_store(dx + m * K + b0 + v * CHEXCY_VW, acc[m][v]);
}

/* The nv vectors of columns from b0 in tiles as wide as `rows` allows, then one vector at a time. */
static inline __attribute__((always_inline)) void chexcy_gemm_dx_span(const float *dout, const int rows,
                                                                     Py_ssize_t O, const float *w,
                                                                     Py_ssize_t K, Py_ssize_t b0,
                                                                     Py_ssize_t nv, float *dx)
{
    const int wide = GEMM_DX_ACC / rows < 8 ? GEMM_DX_ACC / rows : 8;
    Py_ssize_t v0 = 0;
    for (; v0 + wide <= nv; v0 += wide)
        chexcy_gemm_dx_tile(dout, rows, O, w, K, b0 + v0 * CHEXCY_VW, wide, dx);
    for (; v0 < nv; v0++)
        chexcy_gemm_dx_tile(dout, rows, O, w, K, b0 + v0 * CHEXCY_VW, 1, dx);
}

static void chexcy_gemm_dx_rows(const float *dout, Py_ssize_t M, Py_ssize_t O, const float *w, Py_ssize_t K,
                                Py_ssize_t k0, Py_ssize_t k1, float *dx)
{
    for (Py_ssize_t b0 = k0; b0 < k1; b0 += GEMM_DX_KB) {
        const Py_ssize_t kb = k1 - b0 < GEMM_DX_KB ? k1 - b0 : GEMM_DX_KB, nv = kb / CHEXCY_VW;
#define CHEXCY_DX_SPAN(R) chexcy_gemm_dx_span(dout, R, O, w, K, b0, nv, dx)
        chexcy_gemm_rows_switch(M, CHEXCY_DX_SPAN)
#undef CHEXCY_DX_SPAN
        for (Py_ssize_t m = 0; m < M; m++)
            for (Py_ssize_t k = nv * CHEXCY_VW; k < kb; k++) {     /* the tail, in the same o order */
                float t = dout[m * O] * w[b0 + k];
                for (Py_ssize_t o = 1; o < O; o++) t += dout[m * O + o] * w[o * K + b0 + k];
                dx[m * K + b0 + k] = t;
            }
    }
}

/* out[j] = sum over i < M of d[i * ld + j], j < N, in float64 (rows added in order i = 0, 1, ...),
 * for columns j0 .. j0 + n - 1: the bias gradient, column sums of dout. */
static void chexcy_col_sums(const float *d, Py_ssize_t M, Py_ssize_t ld, Py_ssize_t j0, Py_ssize_t n,
                            float *out)
{
    double acc[64];
    for (Py_ssize_t jb = 0; jb < n; jb += 64) {
        const Py_ssize_t w = n - jb < 64 ? n - jb : 64;
        for (Py_ssize_t j = 0; j < w; j++) acc[j] = 0.0;
        for (Py_ssize_t i = 0; i < M; i++) {
            const float *r = d + i * ld + j0 + jb;
            for (Py_ssize_t j = 0; j < w; j++) acc[j] += (double)r[j];
        }
        for (Py_ssize_t j = 0; j < w; j++) out[j0 + jb + j] = (float)acc[j];
    }
}

#endif
