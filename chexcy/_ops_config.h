/* chexcy/_ops_config.h: compile-time facts read by the Cython kernels (_ops.pyx).
 *
 * - An OpenMP shim: without -fopenmp the two OpenMP calls the kernels make answer "one thread",
 *   so the same .pyx compiles and runs serially.
 * - Register-tile sizes chosen by the instruction set the compiler targets. The same _ops.pyx is
 *   compiled once per instruction-set variant (see setup.py); each variant gets tiles that fill its
 *   vector registers without spilling:
 *     FWD_F x FWD_W   output channels x output columns accumulated in registers (forward, dx)
 *     DW_F x 3 x DW_V output channels x kernel columns x lanes (dweight, 3-wide kernels)
 * - Build facts for build_info(): variant name, flags, compiler.
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
/* 32 zmm registers: 8 channels x 16 columns = 8 accumulators, 1 input load + 8 broadcasts per step. */
#define CHEXCY_ISA "avx512"
#define FWD_F 8
#define FWD_W 16
#define DW_F 4
#define DW_V 16
#elif defined(__AVX2__)
/* 16 ymm registers: 4 x 16 = 8 ymm accumulators for forward, 4 x 3 x 8 = 12 for dweight. */
#define CHEXCY_ISA "avx2"
#define FWD_F 4
#define FWD_W 16
#define DW_F 4
#define DW_V 8
#else
/* 16 xmm registers (SSE2 baseline). */
#define CHEXCY_ISA "baseline"
#define FWD_F 4
#define FWD_W 8
#define DW_F 4
#define DW_V 4
#endif

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

#endif
