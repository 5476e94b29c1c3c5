/* chexcy/_ops_batchnorm.h: batch normalisation in training mode over float32 (N, C, H, W) arrays, the
 * kernels behind chexcy._ops' batch_norm2d_* entry points.
 *
 * What it computes. Per channel c, over the M = N * H * W values of x[:, c]:
 *   forward   mean, the biased variance var, and out = (x - mean32) * a + b with
 *             a = weight / sqrt(var + eps), b = bias - (mean - mean32) * a (mean32: the mean rounded to
 *             float32; b absorbs the rounding);
 *   backward  Sg = sum(dout), Sgx = sum(dout * (x - mean)), dbias = Sg, dweight = Sgx * s with
 *             s = 1 / sqrt(var + eps), and dx = A * dout + ((x - mean) * B + K), A = weight * s,
 *             B = -weight * s^3 * Sgx / M, K = -weight * s * Sg / M.
 * The statistics are float64: each float converted exactly, summed in double vector lanes. A plane's
 * sum and its squared deviations from its own mean come from one pass over values shifted by the
 * plane's first one (chexcy_bn_plane_stats says why that is exact enough); the planes of a channel are
 * combined with Chan's formula in plane order n = 0, 1, ... (chexcy_bn_combine, the arithmetic of
 * chexcy.ops.batch_norm2d_combine_stats), so the result does not depend on the thread count, and the
 * split ops of synchronised batch norm (per-plane statistics, exchanged, combined, applied) give the
 * fused kernels' bits.
 *
 * How it is fast.
 * - One thread owns a block of whole channels (chexcy_bn_forward_block / _backward_block): their planes'
 *   statistics, their combination and the elementwise map run back to back, so the map re-reads the
 *   block from L1/L2 (batch 8 at 56 x 56: one channel, 100 KB) rather than from memory. Memory
 *   traffic is a copy's: x read once, out written once (backward: dout and x read once, dx written
 *   once), and a call is one parallel region, not three.
 * - Every loop runs in vectors to the end of its plane: the last partial vector is a masked load
 *   (AVX-512 / AVX2) and, for the deviations, a lane mask. A 7 x 7 plane (49 floats) is 3 vectors
 *   (AVX-512), not 1 vector and a 17-float scalar float64 tail whose 4-cycle add chain was most of the
 *   plane's time. Lanes are summed by halving (3 dependent adds at AVX-512, not 7), in an order fixed
 *   by the plane size alone. Every vector is one register (a float vector's halves widen to two
 *   float64 vectors), so no variant has the compiler split a double-width vector lane by lane.
 * - A plane's statistics take one pass with two independent sums (chexcy_bn_plane_stats), not a sum,
 *   a divide and then a second pass waiting on them.
 * - Channel blocks (up to CHEXCY_BN_BLOCK channels) run each phase over the whole block, so the
 *   channels' dependency chains (sums, divides, a square root) overlap.
 *
 * Self-contained but for chexcy_load_head8 / _store_head8 (_ops_vec.h, AVX2): needs Py_ssize_t
 * (Python.h) and the compiler's target macros. No fast-math:
 * the compiler may contract a multiply and an add into an FMA, the same way in every kernel here.
 */
#ifndef CHEXCY_OPS_BATCHNORM_H
#define CHEXCY_OPS_BATCHNORM_H

#include <math.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
#include "_ops_vec.h"           /* chexcy_load_head8, chexcy_store_head8 */
#endif

#if defined(__AVX512F__)
#define CHEXCY_BN_VW 16
#define CHEXCY_BN_IOTA {0, 1, 2, 3, 4, 5, 6, 7}
#elif defined(__AVX2__)
#define CHEXCY_BN_VW 8
#define CHEXCY_BN_IOTA {0, 1, 2, 3}
#else
#define CHEXCY_BN_VW 4
#define CHEXCY_BN_IOTA {0, 1}
#endif
#define CHEXCY_BN_DW (CHEXCY_BN_VW / 2)     /* doubles per vector: one register, as a float vector */

/* Every vector type is one register of the target: wider ones (16 doubles in two zmm, 8 in two ymm)
 * were lowered lane by lane on AVX2 (vpinsrq, spills), most of a 7 x 7 plane's time on an AMD EPYC. */
typedef float chexcy_bn_vf __attribute__((vector_size(CHEXCY_BN_VW * sizeof(float))));
typedef float chexcy_bn_vh __attribute__((vector_size(CHEXCY_BN_DW * sizeof(float))));
typedef double chexcy_bn_vd __attribute__((vector_size(CHEXCY_BN_DW * sizeof(double))));
typedef long long chexcy_bn_vl __attribute__((vector_size(CHEXCY_BN_DW * sizeof(long long))));
typedef int chexcy_bn_vi __attribute__((vector_size(CHEXCY_BN_VW * sizeof(int))));

static inline chexcy_bn_vf chexcy_bn_load(const float *p)
{
    chexcy_bn_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void chexcy_bn_store(float *p, chexcy_bn_vf v) { memcpy(p, &v, sizeof v); }

/* The first r (0 < r < VW) floats at p, the other lanes 0; memory past p + r is never read. */
static inline chexcy_bn_vf chexcy_bn_load_head(const float *p, Py_ssize_t r)
{
#if defined(__AVX512F__)
    return (chexcy_bn_vf)_mm512_maskz_loadu_ps((__mmask16)((1u << r) - 1), p);
#elif defined(__AVX2__)
    return (chexcy_bn_vf)chexcy_load_head8(p, r);
#else
    chexcy_bn_vf v = {0};
    for (Py_ssize_t j = 0; j < r; j++) v[j] = p[j];
    return v;
#endif
}

/* The first r (0 < r < VW) lanes of v to p; memory past p + r is never written. */
static inline void chexcy_bn_store_head(float *p, chexcy_bn_vf v, Py_ssize_t r)
{
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << r) - 1), (__m512)v);
#elif defined(__AVX2__)
    chexcy_store_head8(p, (__m256)v, r);
#else
    for (Py_ssize_t j = 0; j < r; j++) p[j] = v[j];
#endif
}

/* The low and the high half of v's lanes, widened to float64: one vcvtps2pd each on AVX2 / AVX-512 (GCC
 * 12 lowered __builtin_convertvector of the halves through memory and 128-bit pieces). */
static inline chexcy_bn_vd chexcy_bn_widen_lo(chexcy_bn_vf v)
{
#if defined(__AVX512F__)
    return (chexcy_bn_vd)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)v));
#elif defined(__AVX2__)
    return (chexcy_bn_vd)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v));
#else
    const chexcy_bn_vh h = __builtin_shufflevector(v, v, 0, 1);
    return __builtin_convertvector(h, chexcy_bn_vd);
#endif
}

static inline chexcy_bn_vd chexcy_bn_widen_hi(chexcy_bn_vf v)
{
#if defined(__AVX512F__)
    return (chexcy_bn_vd)_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)v), 1)));
#elif defined(__AVX2__)
    return (chexcy_bn_vd)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1));
#else
    const chexcy_bn_vh h = __builtin_shufflevector(v, v, 2, 3);
    return __builtin_convertvector(h, chexcy_bn_vd);
#endif
}

static inline chexcy_bn_vd chexcy_bn_splat_d(double s)
{
    chexcy_bn_vd v;
    for (int j = 0; j < CHEXCY_BN_DW; j++) v[j] = s;
    return v;
}

static inline chexcy_bn_vf chexcy_bn_splat_f(float s)
{
    chexcy_bn_vf v;
    for (int j = 0; j < CHEXCY_BN_VW; j++) v[j] = s;
    return v;
}

/* v with the lanes from r on set to +0.0 (all kept when r >= DW, none when r <= 0). */
static inline chexcy_bn_vd chexcy_bn_keep_head(chexcy_bn_vd v, Py_ssize_t r)
{
    const chexcy_bn_vl lane = CHEXCY_BN_IOTA;
    const chexcy_bn_vl keep = lane < (long long)r;
    return (chexcy_bn_vd)((chexcy_bn_vl)v & keep);
}

/* Sum of the lanes of (a + b) + (c + d) by halving: lane j + lane j + DW/2, and so on down to one; in
 * registers (through memory, each halving step's loads waited on the previous step's stores). */
static inline double chexcy_bn_total(chexcy_bn_vd a, chexcy_bn_vd b, chexcy_bn_vd c, chexcy_bn_vd d)
{
    chexcy_bn_vd v = (a + b) + (c + d);
#if CHEXCY_BN_DW == 8
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
#elif CHEXCY_BN_DW == 4
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2);
#else
    v += __builtin_shufflevector(v, v, 1, 0);
#endif
    return v[0];
}

/* One plane of n floats: its sum and its sum of squared deviations from its own mean, float64, in one
 * pass. The values are shifted by the plane's first one, k (0 when that is not finite): with
 * d = x - k (exact in float64), sum = S1 + n k and m2 = S2 - S1^2 / n, S1 = sum d, S2 = sum d^2. The
 * subtraction cancels only as much as (mean - k)^2 / var, which for a sample of the plane is a few
 * units: float64 keeps ~13 digits where float32 results need 7. The two sums are independent chains,
 * where the two-pass form (the mean first, then the deviations) made every plane wait for its own sum
 * and a divide before its second pass: most of a 7 x 7 plane's time. */
static inline void chexcy_bn_plane_stats(const float *restrict p, Py_ssize_t n, double *sum, double *m2)
{
    const Py_ssize_t V = CHEXCY_BN_VW;
    const double k = isfinite(p[0]) ? (double)p[0] : 0.0;
    const chexcy_bn_vd kv = chexcy_bn_splat_d(k);
    chexcy_bn_vd s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    chexcy_bn_vd d0, d1, d2, d3;
    chexcy_bn_vf a, b;
    Py_ssize_t i = 0;
    double S1, S2, q;
    for (; i + 2 * V <= n; i += 2 * V) {       /* four independent chains per sum */
        a = chexcy_bn_load(p + i);
        b = chexcy_bn_load(p + i + V);
        d0 = chexcy_bn_widen_lo(a) - kv;
        d1 = chexcy_bn_widen_hi(a) - kv;
        d2 = chexcy_bn_widen_lo(b) - kv;
        d3 = chexcy_bn_widen_hi(b) - kv;
        s0 += d0;
        s1 += d1;
        s2 += d2;
        s3 += d3;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
    }
    if (i + V <= n) {
        a = chexcy_bn_load(p + i);
        d0 = chexcy_bn_widen_lo(a) - kv;
        d1 = chexcy_bn_widen_hi(a) - kv;
        s0 += d0;
        s1 += d1;
        q0 += d0 * d0;
        q1 += d1 * d1;
        i += V;
    }
    if (i < n) {
        a = chexcy_bn_load_head(p + i, n - i);
        d2 = chexcy_bn_keep_head(chexcy_bn_widen_lo(a) - kv, n - i);
        d3 = chexcy_bn_keep_head(chexcy_bn_widen_hi(a) - kv, n - i - CHEXCY_BN_DW);
        s2 += d2;
        s3 += d3;
        q2 += d2 * d2;
        q3 += d3 * d3;
    }
    S1 = chexcy_bn_total(s0, s1, s2, s3);
    S2 = chexcy_bn_total(q0, q1, q2, q3);
    q = S2 - S1 * S1 / (double)n;
    *sum = S1 + (double)n * k;
    *m2 = q < 0 ? 0 : q;          /* rounding can leave -1e-16 S2; a NaN stays NaN */
}

/* Backward sums of one plane: sum(g) and sum(g * (x - mean)), float64. */
static inline void chexcy_bn_plane_grad_sums(const float *restrict g, const float *restrict x, Py_ssize_t n,
                                             double mean, double *sum_g, double *sum_gx)
{
    const Py_ssize_t V = CHEXCY_BN_VW;
    chexcy_bn_vd b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
    chexcy_bn_vd g0, g1, g2, g3;
    chexcy_bn_vf ga, gb, xa, xb;
    const chexcy_bn_vd mv = chexcy_bn_splat_d(mean);
    Py_ssize_t i = 0;
    for (; i + 2 * V <= n; i += 2 * V) {
        ga = chexcy_bn_load(g + i);
        gb = chexcy_bn_load(g + i + V);
        xa = chexcy_bn_load(x + i);
        xb = chexcy_bn_load(x + i + V);
        g0 = chexcy_bn_widen_lo(ga);
        g1 = chexcy_bn_widen_hi(ga);
        g2 = chexcy_bn_widen_lo(gb);
        g3 = chexcy_bn_widen_hi(gb);
        b0 += g0;
        b1 += g1;
        b2 += g2;
        b3 += g3;
        c0 += g0 * (chexcy_bn_widen_lo(xa) - mv);
        c1 += g1 * (chexcy_bn_widen_hi(xa) - mv);
        c2 += g2 * (chexcy_bn_widen_lo(xb) - mv);
        c3 += g3 * (chexcy_bn_widen_hi(xb) - mv);
    }
    if (i + V <= n) {
        ga = chexcy_bn_load(g + i);
        xa = chexcy_bn_load(x + i);
        g0 = chexcy_bn_widen_lo(ga);
        g1 = chexcy_bn_widen_hi(ga);
        b0 += g0;
        b1 += g1;
        c0 += g0 * (chexcy_bn_widen_lo(xa) - mv);
        c1 += g1 * (chexcy_bn_widen_hi(xa) - mv);
        i += V;
    }
    if (i < n) {
        /* g's lanes past the plane are 0 and x - mean's are masked to 0, so they add +0.0 (or, when a
         * real lane is NaN or inf, nothing the real lanes did not already make NaN / inf). */
        ga = chexcy_bn_load_head(g + i, n - i);
        xa = chexcy_bn_load_head(x + i, n - i);
        g2 = chexcy_bn_widen_lo(ga);
        g3 = chexcy_bn_widen_hi(ga);
        b2 += g2;
        b3 += g3;
        c2 += g2 * chexcy_bn_keep_head(chexcy_bn_widen_lo(xa) - mv, n - i);
        c3 += g3 * chexcy_bn_keep_head(chexcy_bn_widen_hi(xa) - mv, n - i - CHEXCY_BN_DW);
    }
    *sum_g = chexcy_bn_total(b0, b1, b2, b3);
    *sum_gx = chexcy_bn_total(c0, c1, c2, c3);
}

/* max(y, 0) lane by lane: the lanes where y < 0 cleared (a NaN compares false and stays). */
static inline chexcy_bn_vf chexcy_bn_relu(chexcy_bn_vf y)
{
    const chexcy_bn_vi neg = y < chexcy_bn_splat_f(0.0f);
    return (chexcy_bn_vf)((chexcy_bn_vi)y & ~neg);
}

/* out = (x - m) * a + b over one plane of n floats, then max(., 0) when relu (a NaN stays NaN, as
 * chexcy_relu). out may be x itself (each value is read before its place is written). */
static inline void chexcy_bn_apply(const float *x, float *out, Py_ssize_t n, float m, float a, float b, int relu)
{
    const Py_ssize_t V = CHEXCY_BN_VW;
    const chexcy_bn_vf mv = chexcy_bn_splat_f(m), av = chexcy_bn_splat_f(a), bv = chexcy_bn_splat_f(b);
    Py_ssize_t i = 0;
    for (; i + V <= n; i += V) {
        const chexcy_bn_vf y = (chexcy_bn_load(x + i) - mv) * av + bv;
        chexcy_bn_store(out + i, relu ? chexcy_bn_relu(y) : y);
    }
    if (i < n) {
        const chexcy_bn_vf y = (chexcy_bn_load_head(x + i, n - i) - mv) * av + bv;
        chexcy_bn_store_head(out + i, relu ? chexcy_bn_relu(y) : y, n - i);
    }
}

/* dx = a * g + ((x - m) * b + c) over one plane of n floats; with add, dx += that value, rounded to
 * float32 first. The compiler may contract the expression differently in the two instantiations (seen
 * in the build without OpenMP), so the sum can differ from adding a fresh dx by a float32 rounding. */
static inline void chexcy_bn_apply_grad(const float *restrict g, const float *restrict x, float *restrict dx,
                                        Py_ssize_t n, float m, float a, float b, float c, int add)
{
    const Py_ssize_t V = CHEXCY_BN_VW;
    const chexcy_bn_vf mv = chexcy_bn_splat_f(m), av = chexcy_bn_splat_f(a), bv = chexcy_bn_splat_f(b),
                       cv = chexcy_bn_splat_f(c);
    chexcy_bn_vf y;
    Py_ssize_t i = 0;
    for (; i + V <= n; i += V) {
        y = av * chexcy_bn_load(g + i) + ((chexcy_bn_load(x + i) - mv) * bv + cv);
        chexcy_bn_store(dx + i, add ? chexcy_bn_load(dx + i) + y : y);
    }
    if (i < n) {
        y = av * chexcy_bn_load_head(g + i, n - i) + ((chexcy_bn_load_head(x + i, n - i) - mv) * bv + cv);
        chexcy_bn_store_head(dx + i, add ? chexcy_bn_load_head(dx + i, n - i) + y : y, n - i);
    }
}

/* A channel's mean and biased variance from its N planes' (sum, m2) of hw values each, in plane order:
 * mean = sum / M, var = sum_n (m2_n + hw * (sum_n / hw - mean)^2) / M, M = N * hw (the arithmetic of
 * chexcy.ops.batch_norm2d_combine_stats, operation for operation). */
static inline void chexcy_bn_combine(const double *ps, const double *pm, Py_ssize_t N, Py_ssize_t hw,
                                     double *mean, double *var)
{
    const double h = (double)hw, M = (double)N * h;
    double total = 0, q = 0, mu, d;
    for (Py_ssize_t n = 0; n < N; n++)
        total += ps[n];
    mu = total / M;
    for (Py_ssize_t n = 0; n < N; n++) {
        d = ps[n] / h - mu;
        q += pm[n] + h * d * d;
    }
    *mean = mu;
    *var = q / M;
}

/* The map's coefficients from float64 channel statistics: k[0] = mean32, k[1] = a, k[2] = b. */
static inline void chexcy_bn_coefficients(double mean, double var, float weight, float bias, double eps,
                                          float *k)
{
    const float m32 = (float)mean;
    const double a = weight * (1.0 / sqrt(var + eps));
    k[0] = m32;
    k[1] = (float)a;
    k[2] = (float)(bias - (mean - (double)m32) * a);
}

/* dx's coefficients (A, B, K) from the channel sums over M values. */
static inline void chexcy_bn_grad_coefficients(float var, float weight, double sg, double sgx, double M,
                                               double eps, float *k)
{
    const double s = 1.0 / sqrt((double)var + eps), w = weight;
    k[0] = (float)(w * s);
    k[1] = (float)(-w * s * s * s * sgx / M);
    k[2] = (float)(-w * s * sg / M);
}

enum { CHEXCY_BN_BLOCK = 16 };   /* most channels per chexcy_bn_forward/backward_block call */

/* Forward of channels [c0, c1) (c1 - c0 <= CHEXCY_BN_BLOCK): the planes of channel c are
 * x + n * xs + c * hw (n < N) of hw floats, written to out at the same offsets; the channel's mean and
 * biased variance to mean[c], var[c] (float32). scratch: 2 N (c1 - c0) doubles.
 * In three phases over the block (statistics of every plane, combine, map) rather than channel by
 * channel: a channel's chain (sums, a divide, the combine's divides, a square root) is long, and with
 * small planes (7 x 7) one channel at a time left the core waiting on it; a block's independent chains
 * overlap. The block's planes stay in L1/L2 between the phases (the caller sizes it). */
static void chexcy_bn_forward_block(const float *x, float *out, Py_ssize_t N, Py_ssize_t xs, Py_ssize_t hw,
                                    Py_ssize_t c0, Py_ssize_t c1, const float *weight, const float *bias,
                                    double eps, double *scratch, float *mean, float *var)
{
    float k[CHEXCY_BN_BLOCK][3];
    double mu, v;
    const Py_ssize_t B = c1 - c0;
    for (Py_ssize_t c = c0; c < c1; c++) {
        double *ps = scratch + 2 * N * (c - c0), *pm = ps + N;
        for (Py_ssize_t n = 0; n < N; n++)
            chexcy_bn_plane_stats(x + n * xs + c * hw, hw, &ps[n], &pm[n]);
    }
    for (Py_ssize_t j = 0; j < B; j++) {
        chexcy_bn_combine(scratch + 2 * N * j, scratch + 2 * N * j + N, N, hw, &mu, &v);
        chexcy_bn_coefficients(mu, v, weight[c0 + j], bias[c0 + j], eps, k[j]);
        mean[c0 + j] = k[j][0];
        var[c0 + j] = (float)v;
    }
    for (Py_ssize_t c = c0; c < c1; c++)
        for (Py_ssize_t n = 0; n < N; n++)
            chexcy_bn_apply(x + n * xs + c * hw, out + n * xs + c * hw, hw, k[c - c0][0], k[c - c0][1],
                            k[c - c0][2], 0);
}

/* Backward of channels [c0, c1) (g: dout; dx written, or added to with add) -> dweight[c], dbias[c];
 * in the same three phases as the forward. Plane (n, c) of each array starts at n * (its sample
 * stride: gs, xs, ds) + c * hw: x and dx may be channel prefixes of larger arrays (a dense block's
 * buffer and its gradient), read and added to in place. */
static void chexcy_bn_backward_block(const float *g, Py_ssize_t gs, const float *x, Py_ssize_t xs, float *dx,
                                     Py_ssize_t ds, int add, Py_ssize_t N, Py_ssize_t hw, Py_ssize_t c0,
                                     Py_ssize_t c1, const float *mean, const float *var, const float *weight,
                                     double eps, float *dweight, float *dbias)
{
    float k[CHEXCY_BN_BLOCK][3];
    double sg[CHEXCY_BN_BLOCK], sgx[CHEXCY_BN_BLOCK], a, b;
    for (Py_ssize_t c = c0; c < c1; c++) {
        double s0 = 0, s1 = 0;
        for (Py_ssize_t n = 0; n < N; n++) {
            chexcy_bn_plane_grad_sums(g + n * gs + c * hw, x + n * xs + c * hw, hw, mean[c], &a, &b);
            s0 += a;
            s1 += b;
        }
        sg[c - c0] = s0;
        sgx[c - c0] = s1;
    }
    for (Py_ssize_t c = c0; c < c1; c++) {
        dbias[c] = (float)sg[c - c0];
        dweight[c] = (float)(sgx[c - c0] * (1.0 / sqrt((double)var[c] + eps)));
        chexcy_bn_grad_coefficients(var[c], weight[c], sg[c - c0], sgx[c - c0], (double)N * hw, eps, k[c - c0]);
    }
    /* add as a constant in each call: with it a run-time value, the no-OpenMP build compiled the plain
     * store's tail to other bits than chexcy_bn_apply_grad(..., 0) elsewhere (the split ops' map) */
    for (Py_ssize_t c = c0; c < c1; c++)
        for (Py_ssize_t n = 0; n < N; n++) {
            if (add)
                chexcy_bn_apply_grad(g + n * gs + c * hw, x + n * xs + c * hw, dx + n * ds + c * hw, hw, mean[c],
                                     k[c - c0][0], k[c - c0][1], k[c - c0][2], 1);
            else
                chexcy_bn_apply_grad(g + n * gs + c * hw, x + n * xs + c * hw, dx + n * ds + c * hw, hw, mean[c],
                                     k[c - c0][0], k[c - c0][1], k[c - c0][2], 0);
        }
}

#endif
