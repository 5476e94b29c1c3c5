/* chexcy/_ops_config.h: build facts and register-tile sizes, read by the Cython kernels (_ops.pyx).
 *
 * - An OpenMP shim: without -fopenmp the two OpenMP calls the kernels make answer "one thread",
 *   so the same .pyx compiles and runs serially.
 * - Register-tile sizes chosen by the instruction set the compiler targets. The same _ops.pyx is
 *   compiled once per instruction-set variant (see setup.py); each variant gets tiles that fill its
 *   vector registers without spilling:
 *     FWD_F x FWD_W   output channels x output columns accumulated in registers (forward, dx)
 *     DW_F x 3 x DW_V output channels x kernel columns x lanes (dweight, 3-wide kernels)
 *   and CHEXCY_VW, the floats per vector register (the vector helpers of _ops_vec.h use it).
 * - Build facts for build_info(): variant name, flags, compiler.
 * The kernels live in one header per job; docs/kernels.md maps them.
 */
#ifndef CHEXCY_OPS_CONFIG_H
#define CHEXCY_OPS_CONFIG_H

#ifdef _OPENMP
#include <omp.h>
#define CHEXCY_OPENMP 1
#else
#define CHEXCY_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

#if defined(__AVX512F__)
/* 32 zmm registers. Forward: 8 channels x 2 output rows x 1 vector = 16 accumulators: 2 input
 * loads and 8 broadcasts per 16 FMAs (16 channels x 1 row needed 17 loads per 16 FMAs). dweight: 4 channels x 3 kernel columns = 12 accumulators (8 spill). */
#define CHEXCY_ISA "avx512"
#define CHEXCY_VW 16
#define FWD_F 8
#define FWD_NR 3    /* 8 channels x 3 rows = 24 zmm + 3 inputs + 1 weight */
#define FWD_NV 1
#define FWD_NR3 8   /* one-channel 3-row tile: 8 rows x 3 vectors = 24 zmm + 3 inputs + 3 weights */
#define FWD_NV3 3
#define DW_F 4
#define DWR_F 2
#elif defined(__AVX2__)
/* 16 ymm registers. Forward: 4 channels x 2 vectors = 8 accumulators (2 input loads and 4
 * broadcasts per 8 FMAs: within two loads per cycle). dweight: 4 x 3 = 12 accumulators. */
#define CHEXCY_ISA "avx2"
#define CHEXCY_VW 8
#define FWD_F 4
#define FWD_NR 1
#define FWD_NV 2
#define FWD_NR3 4   /* one-channel 3-row tile: 4 rows x 2 vectors = 8 ymm + 2 inputs + 3 weights */
#define FWD_NV3 2
#define DW_F 4
#define DWR_F 1
#else
/* 16 xmm registers (SSE2 baseline, or any other target). */
#define CHEXCY_ISA "baseline"
#define CHEXCY_VW 4
#define FWD_F 4
#define FWD_NR 1
#define FWD_NV 2
#define FWD_NR3 4   /* one-channel 3-row tile, as AVX2 (no FMA: one temporary per multiply-add) */
#define FWD_NV3 2
#define DW_F 4
#define DWR_F 1
#endif
/* Tile widths in floats. FWD_W1: the one-channel tile used for the channels left over when the
 * output channels of a group are not a multiple of FWD_F (e.g. dx of a 1-channel input); FWD_W3:
 * the one-channel tile of FWD_NR3 rows that takes over from it for 3-row kernels at stride 1.
 * FWD_WMAX: the widest tile, which is also how far past a padded buffer a partial tile may read. */
#define FWD_W (FWD_NV * CHEXCY_VW)
#define FWD_NV1 4
#define FWD_W1 (FWD_NV1 * CHEXCY_VW)
#define FWD_W3 (FWD_NV3 * CHEXCY_VW)
#define DW_V CHEXCY_VW
#define CHEXCY_MAX(a, b) ((a) > (b) ? (a) : (b))
#define FWD_WMAX CHEXCY_MAX(CHEXCY_MAX(FWD_W, FWD_W1), FWD_W3)

#ifndef CHEXCY_VARIANT
#define CHEXCY_VARIANT "unknown"
#endif
#ifndef CHEXCY_CFLAGS
#define CHEXCY_CFLAGS "unknown"
#endif
#ifdef __VERSION__
#define CHEXCY_COMPILER __VERSION__
#else
#define CHEXCY_COMPILER "unknown"
#endif

/* The path headers (_ops_gemm.h, _ops_pool.h, _ops_batchnorm.h, ...) use the vector type and helpers
 * without including them: every unit includes this header first (chexcy/_ops_kernels.pxd). */
#include "_ops_vec.h"
#include <stdint.h>

#endif
