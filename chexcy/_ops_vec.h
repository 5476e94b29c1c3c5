/* chexcy/_ops_vec.h: the vector helpers every kernel header builds on.
 *
 * chexcy_vf (one vector register of CHEXCY_VW floats, as a GCC/Clang vector extension), its loads and
 * stores (whole and partial), the broadcast, the unroll and keep-in-register hints, and the fixed-order
 * sums (chexcy_sum_rows, chexcy_sum) whose order depends on the shape alone.
 */
/* CHEXCY_VW comes from _ops_config.h. Included before this header's guard: _ops_config.h includes this
 * header for the kernels it still holds, and whichever of the two comes first, the vector width is then
 * defined before the vector type. */
#include "_ops_config.h"
#ifndef CHEXCY_OPS_VEC_H
#define CHEXCY_OPS_VEC_H

/* ---------------------------------------------------------------------------------------------
 * Register-tile micro-kernels. Why C here and not in _ops.pyx: gcc does not keep a Cython-generated
 * float accumulator array in registers (measured: the same loops written in Cython vectorised to
 * 128-bit with spills, 3.7 GFLOP/s). GCC/Clang vector extensions make each accumulator a register
 * value. All blocking, padding, threading and ownership stay in _ops.pyx; these only do the
 * innermost multiply-adds of one tile. Multiply-adds contract to FMA where the target has it
 * (-ffp-contract=fast is GCC's default; this is not fast-math: no reassociation, lanes are summed
 * in a fixed order, so results are bitwise reproducible for a given build).
 * ------------------------------------------------------------------------------------------- */
#include <string.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
typedef float chexcy_vf __attribute__((vector_size(CHEXCY_VW * sizeof(float))));
static inline chexcy_vf chexcy_load(const float *p) { chexcy_vf v; memcpy(&v, p, sizeof v); return v; }
static inline void chexcy_store(float *p, chexcy_vf v) { memcpy(p, &v, sizeof v); }
typedef int chexcy_vmask __attribute__((vector_size(CHEXCY_VW * sizeof(int))));
/* max(v, 0) lane by lane, as chexcy_relu: the lanes where v < 0 cleared (a NaN compares false and
 * stays, -0 stays -0). */
static inline chexcy_vf chexcy_relu_v(chexcy_vf v)
{
    const chexcy_vmask neg = v < (chexcy_vf){0};
    return (chexcy_vf)((chexcy_vmask)v & ~neg);
}
/* Broadcast with the target's own set1 (one vbroadcastss from memory). Not `zero + s`: without
 * fast-math that is a real scalar add (0 + -0 is +0) plus a shuffle per weight; an element-wise
 * init compiles to 16 masked broadcasts. */
#include <immintrin.h>
static inline chexcy_vf chexcy_splat(float s)
{
#if CHEXCY_VW == 16
    return (chexcy_vf)_mm512_set1_ps(s);
#elif CHEXCY_VW == 8
    return (chexcy_vf)_mm256_set1_ps(s);
#else
    return (chexcy_vf)_mm_set1_ps(s);
#endif
}
#define CHEXCY_UNROLL _Pragma("GCC unroll 16")
/* Keep a loaded vector in a register: otherwise gcc folds the same load into each of the FMAs that
 * use it (3 load uops instead of 1 in the dweight loop, which is load-bound). */
#define CHEXCY_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#error "chexcy's kernels need GCC or Clang vector extensions"
#endif

#if defined(__AVX2__)
/* The first n (0 <= n < 8) lanes of v to p in 4-, 2- and 1-float stores; memory past p + n is never
 * touched. Not vmaskmovps: on AMD's Zen 1 a masked 256-bit store is microcoded and took 44% of a
 * depthwise conv's 7-float row copies. */
static inline void chexcy_store_head8(float *p, __m256 v, Py_ssize_t n)
{
    __m128 q = _mm256_castps256_ps128(v);
    if (n >= 4) {
        _mm_storeu_ps(p, q);
        q = _mm256_extractf128_ps(v, 1);
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        _mm_storel_pi((__m64 *)p, q);
        q = _mm_movehl_ps(q, q);
        p += 2;
        n -= 2;
    }
    if (n)
        _mm_store_ss(p, q);
}

/* The first n (0 <= n < 8) floats at p in a vector, the other lanes 0, read in 4-, 2- and 1-float loads;
 * memory past p + n is never read. Not vmaskmovps, which on Zen 1 stalled for tens of cycles when it
 * read what a full-width store had just written (a depthwise conv's output rows). */
static inline __m256 chexcy_load_head8(const float *p, Py_ssize_t n)
{
    __m128 a = _mm_setzero_ps(), t = _mm_setzero_ps();
    const float *q = n >= 4 ? p + 4 : p;
    const Py_ssize_t m = n & 3;
    if (n >= 4)
        a = _mm_loadu_ps(p);
    if (m >= 2) {
        t = _mm_castpd_ps(_mm_load_sd((const double *)q));
        if (m == 3)
            t = _mm_movelh_ps(t, _mm_load_ss(q + 2));
    } else if (m == 1) {
        t = _mm_load_ss(q);
    }
    return n >= 4 ? _mm256_set_m128(t, a) : _mm256_set_m128(_mm_setzero_ps(), t);
}
#endif

/* The first n (< VW) floats at p, other lanes 0; memory past p + n is never touched. */
static inline chexcy_vf chexcy_load_partial(const float *p, Py_ssize_t n)
{
#if CHEXCY_VW == 16
    return (chexcy_vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#elif CHEXCY_VW == 8
    return (chexcy_vf)chexcy_load_head8(p, n);
#else
    float t[CHEXCY_VW] = {0};
    for (Py_ssize_t j = 0; j < n; j++) t[j] = p[j];
    return chexcy_load(t);
#endif
}

/* The first n (< VW) lanes of v to p; memory past p + n is never touched. */
static inline void chexcy_store_partial(float *p, chexcy_vf v, Py_ssize_t n)
{
#if CHEXCY_VW == 16
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#elif CHEXCY_VW == 8
    chexcy_store_head8(p, (__m256)v, n);
#else
    float t[CHEXCY_VW];
    chexcy_store(t, v);
    for (Py_ssize_t j = 0; j < n; j++) p[j] = t[j];
#endif
}
/* dst[0 .. n - 1] = src[0 .. n - 1] (not overlapping) in whole vectors and one partial one, without a
 * call: the packings copy runs of at most a strip (GEMM_NR floats) per row, and a 7x7 plane's strips
 * are two or three such runs, where memcpy's call and size dispatch cost about as much as the copy. */
static inline void chexcy_copy_short(float *dst, const float *src, Py_ssize_t n)
{
    Py_ssize_t j = 0;
    for (; j + CHEXCY_VW <= n; j += CHEXCY_VW) chexcy_store(dst + j, chexcy_load(src + j));
    if (j < n) chexcy_store_partial(dst + j, chexcy_load_partial(src + j, n - j), n - j);
}

/* The four lane accumulators of chexcy_sum_rows to one double: (a0 + a1) + (a2 + a3), then its lanes in
 * order. */
static inline double chexcy_acc_total(const chexcy_vf a[4])
{
    float lanes[CHEXCY_VW];
    double s = 0;
    chexcy_store(lanes, (a[0] + a[1]) + (a[2] + a[3]));
    for (int j = 0; j < CHEXCY_VW; j++) s += lanes[j];
    return s;
}

/* Sum of a rows x n block whose rows are `stride` floats apart: the same lane scheme as chexcy_sum, the
 * lanes carried across rows and added in double once at the end. The order is fixed by the shape. */
static inline double chexcy_sum_rows(const float *p, Py_ssize_t rows, Py_ssize_t n, Py_ssize_t stride)
{
    chexcy_vf a[4] = {chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f)};
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *q = p + r * stride;
        Py_ssize_t i = 0;
        for (; i + 4 * CHEXCY_VW <= n; i += 4 * CHEXCY_VW) {
            a[0] += chexcy_load(q + i);
            a[1] += chexcy_load(q + i + CHEXCY_VW);
            a[2] += chexcy_load(q + i + 2 * CHEXCY_VW);
            a[3] += chexcy_load(q + i + 3 * CHEXCY_VW);
        }
        for (; i + CHEXCY_VW <= n; i += CHEXCY_VW) a[0] += chexcy_load(q + i);
        if (i < n) a[1] += chexcy_load_partial(q + i, n - i);
    }
    return chexcy_acc_total(a);
}

/* Sum of n floats: chexcy_sum_rows over one row. The order is fixed by n alone. */
static inline double chexcy_sum(const float *p, Py_ssize_t n)
{
    return chexcy_sum_rows(p, 1, n, n);
}

#if defined(__GNUC__) && !defined(__clang__)
typedef int chexcy_vi __attribute__((vector_size(CHEXCY_VW * sizeof(int))));   /* shuffle masks (GCC) */

/* The lanes of a and b interleaved: zip_lo = a[0] b[0] a[1] b[1] ... a[VW/2 - 1] b[VW/2 - 1], zip_hi
 * the same from lane VW/2 (one two-source permute each on AVX-512). */
static inline chexcy_vf chexcy_zip_lo(chexcy_vf a, chexcy_vf b)
{
#if CHEXCY_VW == 16
    const chexcy_vi m = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
#elif CHEXCY_VW == 8
    const chexcy_vi m = {0, 8, 1, 9, 2, 10, 3, 11};
#else
    const chexcy_vi m = {0, 4, 1, 5};
#endif
    return __builtin_shuffle(a, b, m);
}

static inline chexcy_vf chexcy_zip_hi(chexcy_vf a, chexcy_vf b)
{
#if CHEXCY_VW == 16
    const chexcy_vi m = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
#elif CHEXCY_VW == 8
    const chexcy_vi m = {4, 12, 5, 13, 6, 14, 7, 15};
#else
    const chexcy_vi m = {2, 6, 3, 7};
#endif
    return __builtin_shuffle(a, b, m);
}
#endif

#endif
