/* chexcy/_ops_pad_fill.h: copies into zero-bordered planes (with the plane sums taken on the way),
 * plane fills and read prefetches: the memory-bound helpers of the convolutions and the global pool.
 */
#ifndef CHEXCY_OPS_PAD_FILL_H
#define CHEXCY_OPS_PAD_FILL_H

#include <stdint.h>
#include <string.h>
#include "_ops_vec.h"

/* One row of chexcy_sum_rows (into its accumulators a[4], in its order) while copying the row to d:
 * a sum taken in a copy that reads the data anyway. chexcy_acc_total(a) after the last row gives
 * exactly chexcy_sum_rows of the rows. */
static inline void chexcy_copy_sum_row(float *restrict d, const float *restrict q, Py_ssize_t n,
                                       chexcy_vf a[4])
{
    Py_ssize_t i = 0;
    for (; i + 4 * CHEXCY_VW <= n; i += 4 * CHEXCY_VW) {
        chexcy_vf v0 = chexcy_load(q + i), v1 = chexcy_load(q + i + CHEXCY_VW);
        chexcy_vf v2 = chexcy_load(q + i + 2 * CHEXCY_VW), v3 = chexcy_load(q + i + 3 * CHEXCY_VW);
        chexcy_store(d + i, v0);
        chexcy_store(d + i + CHEXCY_VW, v1);
        chexcy_store(d + i + 2 * CHEXCY_VW, v2);
        chexcy_store(d + i + 3 * CHEXCY_VW, v3);
        a[0] += v0; a[1] += v1; a[2] += v2; a[3] += v3;
    }
    for (; i + CHEXCY_VW <= n; i += CHEXCY_VW) {
        chexcy_vf v = chexcy_load(q + i);
        chexcy_store(d + i, v);
        a[0] += v;
    }
    if (i < n) {
        chexcy_vf v = chexcy_load_partial(q + i, n - i);
        chexcy_store_partial(d + i, v, n - i);
        a[1] += v;
    }
}

/* Copy P planes of H x W floats into zero-bordered planes of (H + 2 ph) x (W + 2 pw). With sums, also
 * sums[p] = chexcy_sum_rows of plane p (bitwise the same), taken while copying: conv1's per-sample
 * backward reads its 33.5 MB dout once this way instead of copying it and then summing the copy. */
static inline void chexcy_pad_planes(const float *restrict src, float *restrict dst, Py_ssize_t P,
                                     Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                                     double *restrict sums)
{
    Py_ssize_t Hp = H + 2 * ph, Wp = W + 2 * pw;
    for (Py_ssize_t p = 0; p < P; p++) {
        chexcy_vf a[4] = {chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f), chexcy_splat(0.0f)};
        for (Py_ssize_t r = 0; r < Hp; r++) {
            float *d = dst + (p * Hp + r) * Wp;
            if (r < ph || r >= ph + H) {
                memset(d, 0, Wp * sizeof(float));
                continue;
            }
            for (Py_ssize_t j = 0; j < pw; j++) {       /* borders are a float or two: no memset per row */
                d[j] = 0;
                d[pw + W + j] = 0;
            }
            const float *q = src + (p * H + r - ph) * W;
            if (sums) {
                chexcy_copy_sum_row(d + pw, q, W, a);
            } else {                                     /* rows are short (16 floats for conv4 at 128x128): */
                for (Py_ssize_t j = 0; j < W; j++)       /* an inline, vectorised copy, no memcpy call */
                    d[pw + j] = q[j];
            }
        }
        if (sums)
            sums[p] = chexcy_acc_total(a);
    }
}

#define CHEXCY_FILL_AHEAD 1024     /* floats: how far ahead the pool fills and sums prefetch (4 KB) */

/* Read prefetches for the lines of [p + ahead, p + ahead + n) floats, n at most CHEXCY_FILL_AHEAD: the
 * global average pool's forward asks, before summing a plane, for min(plane, 4 KB) of data starting 4 KB
 * past the plane's start (the next planes when planes are small, as in ref-cnn's 1 KB ones). The
 * planes are one sequential stream, but the hardware prefetchers alone left a 4 MB read at 2 threads
 * 20% slower (C harness, 47-50 -> 37-42 us). Addresses as integers: past the array they are never
 * dereferenced, and a prefetch does not fault. */
static inline void chexcy_prefetch_ahead(const float *p, Py_ssize_t ahead, Py_ssize_t n)
{
    uintptr_t a = ((uintptr_t)p + 4 * (uintptr_t)ahead) & ~(uintptr_t)63;
    uintptr_t e = (uintptr_t)p + 4 * (uintptr_t)(ahead + (n < CHEXCY_FILL_AHEAD ? n : CHEXCY_FILL_AHEAD));
    for (; a < e; a += 64)
        __builtin_prefetch((const void *)a, 0, 3);
}

/* Floats [j0, j1) of planes of hw floats, plane u filled with vals[u] * scale (the global average pool's
 * backward; a thread's share need not start or end on a plane boundary).
 * Store-bound: every line stored to must first be owned by this core, and a store that misses L1 waits
 * for it. Write prefetches CHEXCY_FILL_AHEAD floats ahead (one per cache line, issued plane by plane in
 * their own loop, never past j1, so never into another thread's lines) overlap those waits: for 4 MB at
 * 2 threads (C harness, the lines in L2/L3), 46-47 -> 39-41 us, with prefetchw or prefetcht0 alike;
 * unchanged on one thread (139 us) and from DRAM. With SSE2's 16-byte stores (4 per line) they cost
 * more than they hide (harness 48 -> 51-52 us, the op 62-70 -> 76-80 us), so that build has none. */
static inline void chexcy_fill_planes(float *dst, const float *vals, Py_ssize_t hw, float scale,
                                      Py_ssize_t j0, Py_ssize_t j1)
{
#if CHEXCY_VW >= 8
    /* Addresses as integers: the prefetch window runs past the share, where pointers may not point. */
    uintptr_t stop = (uintptr_t)(dst + j1);
    uintptr_t pf = ((uintptr_t)(dst + j0) + 4 * CHEXCY_FILL_AHEAD) & ~(uintptr_t)63;
#endif
    Py_ssize_t j = j0, u = j0 / hw, e;
    for (; j < j1; u++) {
        e = (u + 1) * hw < j1 ? (u + 1) * hw : j1;
#if CHEXCY_VW >= 8
        uintptr_t pf_end = (uintptr_t)(dst + e) + 4 * CHEXCY_FILL_AHEAD;
        for (; pf < pf_end && pf < stop; pf += 64)
            __builtin_prefetch((const void *)pf, 1, 3);
#endif
        chexcy_vf z = chexcy_splat(vals[u] * scale);
        float *p = dst + j, *body_end = dst + e - (e - j) % CHEXCY_VW;
        for (; p < body_end; p += CHEXCY_VW)
            chexcy_store(p, z);
        if (p < dst + e)
            chexcy_store_partial(p, z, dst + e - p);
        j = e;
    }
}

#endif
