# chexcy/_ops_kernels.pxd: every C declaration _ops.pyx uses, one block per header (docs/kernels.md maps
# the headers to their jobs). _ops.pyx cimports all of it; the headers are found through the include path
# setup.py gives every instruction-set variant (chexcy/), and ship with the package (pyproject.toml
# package-data). The blocks come in include order: _ops_config.h (build facts, tile sizes, and through it
# the vector helpers) first, because _ops_gemm.h, _ops_winograd.h and the other path headers use its
# vector type without including it.

from libc.stdint cimport int32_t, int64_t

# build facts, OpenMP shim, register-tile sizes
cdef extern from "_ops_config.h" nogil:
    int omp_get_max_threads()
    int omp_get_thread_num()
    int CHEXCY_OPENMP
    const char* CHEXCY_ISA
    const char* CHEXCY_VARIANT
    const char* CHEXCY_CFLAGS
    const char* CHEXCY_COMPILER
    enum:
        FWD_F       # output channels per forward register tile
        FWD_NR      # output rows per forward register tile
        FWD_W       # output columns per forward register tile
        FWD_W1      # output columns of the one-channel tile (leftover channels)
        FWD_NR3     # output rows of the one-channel tile for 3-row kernels at stride 1
        FWD_W3      # output columns of that tile
        FWD_WMAX    # widest tile: the slack a padded buffer needs after its last row
        DW_F        # output channels per dweight tile (x 3 kernel columns x DW_V lanes)
        DWR_F       # output channels per 3-kernel-row dweight tile (x 3 x 3 x DW_V lanes)
        DW_V

# vector helpers: fixed-order sums
cdef extern from "_ops_vec.h" nogil:
    double chexcy_sum(const float* p, Py_ssize_t n)
    double chexcy_sum_rows(const float* p, Py_ssize_t rows, Py_ssize_t n, Py_ssize_t stride)

# the direct conv's register tiles (DIRECT path, _conv_rows)
cdef extern from "_ops_conv_tiles.h" nogil:
    # register tiles: FWD_F channels x FWD_NR, 2 or 1 rows; 1 channel x 1 row;
    # 1 channel x FWD_NR3 rows (KH = 3, stride 1, row dilation 1)
    void chexcy_fwd_tile_rows(Py_ssize_t nr, const float* xt, const float* wt, Py_ssize_t Cg, Py_ssize_t KH,
                              Py_ssize_t KW, Py_ssize_t plane, Py_ssize_t Wp, Py_ssize_t dil_h, Py_ssize_t dil_w,
                              Py_ssize_t xrow_step, const float* bias, float* dst, Py_ssize_t dst_fstride,
                              Py_ssize_t dst_rstride)
    void chexcy_fwd_tile1(const float* xt, const float* wt, Py_ssize_t Cg, Py_ssize_t KH, Py_ssize_t KW,
                          Py_ssize_t plane, Py_ssize_t Wp, Py_ssize_t dil_h, Py_ssize_t dil_w, Py_ssize_t xrow_step,
                          const float* bias, float* dst, Py_ssize_t dst_fstride, Py_ssize_t dst_rstride)
    void chexcy_fwd_tile1_k3(const float* xt, const float* wt, Py_ssize_t Cg, Py_ssize_t KW,
                             Py_ssize_t plane, Py_ssize_t Wp, Py_ssize_t dil_w, float bias, float* dst,
                             Py_ssize_t dst_rstride)

# zero-bordered plane copies, plane fills, prefetches
cdef extern from "_ops_pad_fill.h" nogil:
    void chexcy_pad_planes(const float* src, float* dst, Py_ssize_t P, Py_ssize_t H, Py_ssize_t W,
                           Py_ssize_t ph, Py_ssize_t pw, double* sums)
    enum:
        CHEXCY_FILL_AHEAD
    void chexcy_prefetch_ahead(const float* p, Py_ssize_t ahead, Py_ssize_t n)
    void chexcy_fill_planes(float* dst, const float* vals, Py_ssize_t hw, float scale, Py_ssize_t j0,
                            Py_ssize_t j1)

# the lane-sum dweight tiles (LANE_SUM path, _dw_block)
cdef extern from "_ops_dweight_tiles.h" nogil:
    float chexcy_lane_total(const float* p)
    void chexcy_dw_rows3(const float* xr0, const float** drows, Py_ssize_t NB, Py_ssize_t x_nstride,
                         Py_ssize_t d_nstride, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t ds,
                         Py_ssize_t xstep, Py_ssize_t dil_w, float* part)
    void chexcy_dw_rows33(const float* xr0, const float** drows, Py_ssize_t NB, Py_ssize_t x_nstride,
                          Py_ssize_t d_nstride, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t ds, Py_ssize_t Wp,
                          Py_ssize_t dil_w, float* part, Py_ssize_t kh_stride, const float* pf)

# the blocked matrix product (linear, POINTWISE_GEMM, CHANNEL_BLOCKED dweight)
cdef extern from "_ops_gemm.h" nogil:
    enum:
        GEMM_MR     # rows of C per register tile
        GEMM_NR     # columns of C per register tile (and per packed B strip)
    void chexcy_gemm_pack_a(const float* src, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t m0, Py_ssize_t mc,
                            Py_ssize_t k0, Py_ssize_t kc, float* dst)
    void chexcy_gemm_pack_b(const float* src, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t K, Py_ssize_t N,
                            Py_ssize_t s, float* dst)
    Py_ssize_t chexcy_gemm_apack_floats(Py_ssize_t M, Py_ssize_t K)
    void chexcy_gemm_pack_a_part(const float* w, Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t M, Py_ssize_t K,
                                 Py_ssize_t kb, Py_ssize_t q0, Py_ssize_t q1, float* ap, const float* scale)
    void chexcy_gemm_tile_rows(Py_ssize_t rows, Py_ssize_t ow, const float* a, const float* b,
                               Py_ssize_t b_rs, float* c, Py_ssize_t ldc, int add)
    void chexcy_gemm_tile_rows_part(Py_ssize_t rows, Py_ssize_t ow, const float* a, const float* b,
                                    Py_ssize_t b_rs, float* c, Py_ssize_t ldc, int add, Py_ssize_t mr)

    enum:
        GEMM_MC     # rows of C per task at most
        GEMM_SERIAL_MADDS   # below this many multiply-adds a product runs on one thread
    Py_ssize_t chexcy_gemm_abuf_floats(Py_ssize_t mc, Py_ssize_t K)
    void chexcy_gemm_task(const float* A, Py_ssize_t a_rs, Py_ssize_t a_cs, Py_ssize_t m0, Py_ssize_t mc,
                          Py_ssize_t K, const float* bp, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t N,
                          const float* init, float* C, Py_ssize_t ldc, float* abuf)
    void chexcy_col_sums(const float* d, Py_ssize_t M, Py_ssize_t ld, Py_ssize_t j0, Py_ssize_t n, float* out)
    void chexcy_gemm_outer_rows(const float* dout, Py_ssize_t M, Py_ssize_t O, const float* x, Py_ssize_t K,
                                Py_ssize_t o0, Py_ssize_t o1, float* dweight)
    void chexcy_gemm_dx_rows(const float* dout, Py_ssize_t M, Py_ssize_t O, const float* w, Py_ssize_t K,
                             Py_ssize_t k0, Py_ssize_t k1, float* dx)
    enum:
        GEMM_DOT_M  # dense layers of at most this many rows run as dot products
    void chexcy_gemm_dot_rows(const float* x, Py_ssize_t M, Py_ssize_t K, const float* w, Py_ssize_t j0,
                              Py_ssize_t j1, const float* bias, float* out, Py_ssize_t ldo)

# Winograd F(2x2, 3x3) transforms (WINOGRAD path)
cdef extern from "_ops_winograd.h" nogil:
    void chexcy_wino_cols(const float* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                          Py_ssize_t r0, Py_ssize_t rows, Py_ssize_t TW, float* pe, float* po, Py_ssize_t ps)
    void chexcy_wino_rows(const float* pe, const float* po, Py_ssize_t ps, Py_ssize_t TW, Py_ssize_t n,
                          float* v, Py_ssize_t vs)
    void chexcy_wino_weight_pack(const float* w, Py_ssize_t rs, Py_ssize_t cs, int flip, Py_ssize_t F,
                                 Py_ssize_t C, Py_ssize_t q, float* up, Py_ssize_t xstride, const float* scale)
    void chexcy_wdw_dout_rows(const float* dout, Py_ssize_t F, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t r0,
                              Py_ssize_t rows, Py_ssize_t W2, Py_ssize_t Fs, float* dt)
    void chexcy_wdw_dout_tiles(const float* dt, Py_ssize_t Fs, Py_ssize_t TW, Py_ssize_t nty, Py_ssize_t nfb,
                               Py_ssize_t tq, float* z)
    void chexcy_wdw_input_tiles(const float* xt, Py_ssize_t wq, Py_ssize_t TW, Py_ssize_t nty, float* v,
                                Py_ssize_t xs)
    void chexcy_wdw_weight_row(const float* s, Py_ssize_t nparts, Py_ssize_t ps, Py_ssize_t xs, Py_ssize_t C,
                               float* acc, float* dweight)
    void chexcy_wino_output(const float* m, Py_ssize_t ms, Py_ssize_t n, float bias, float* y, Py_ssize_t ys,
                            int relu)
    void chexcy_wino_store_rows(const float* y, Py_ssize_t ys, Py_ssize_t TW, float* row, float* out0,
                                float* out1, Py_ssize_t width)

# implicit im2col products (IM2COL_GEMM path)
cdef extern from "_ops_conv_gemm.h" nogil:
    ctypedef struct chexcy_cg_geom:
        const float* x
        Py_ssize_t Hp, Wp, KH, KW, sh, sw, dil_h, dil_w, OW, P
    enum:
        GEMM_KC     # K steps per block of the products
    void chexcy_cg_task(const chexcy_cg_geom* g, const float* ap, const float* bias, Py_ssize_t Fg,
                        Py_ssize_t K, Py_ssize_t s0, Py_ssize_t s1, float* out, float* bbuf)
    void chexcy_cg_dweight_task(chexcy_cg_geom g, Py_ssize_t N, Py_ssize_t xs, const float* dout,
                                Py_ssize_t dout_ns, Py_ssize_t Fg, Py_ssize_t K, Py_ssize_t s0,
                                Py_ssize_t s1, float* dweight, float* abuf, float* bbuf)
    void chexcy_cg_dx_task(const chexcy_cg_geom* g, float* dxp, Py_ssize_t Cg, const float* wt,
                           const float* dn, Py_ssize_t Fg, Py_ssize_t K, float* bbuf, float* t)
    void chexcy_cg_phase_split(const float* x, Py_ssize_t H, Py_ssize_t W, Py_ssize_t ph, Py_ssize_t pw,
                               Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t Hq, Py_ssize_t Wq, float* dst,
                               Py_ssize_t pstride)
    void chexcy_cg_phase_merge(const float* src, Py_ssize_t pstride, Py_ssize_t Wq, Py_ssize_t sh,
                               Py_ssize_t sw, float* x, Py_ssize_t H, Py_ssize_t W)
    void chexcy_cg_phase_taps(Py_ssize_t KH, Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dil_h,
                              Py_ssize_t dil_w, Py_ssize_t Hq, Py_ssize_t Wq, Py_ssize_t* off)
    void chexcy_cg_pack_a_phase(const float* w, Py_ssize_t Fg, Py_ssize_t Cg, Py_ssize_t taps,
                                const Py_ssize_t* tap, Py_ssize_t T, Py_ssize_t kb, float* ap)
    void chexcy_cg_dout_pad(const float* d, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t mh, Py_ssize_t mw,
                            Py_ssize_t Hd, Py_ssize_t Wd, float* dst)
    void chexcy_cg_dx_phase_task(const float* dp, const Py_ssize_t* off, Py_ssize_t T, Py_ssize_t Fg,
                                 Py_ssize_t Hd, Py_ssize_t Wd, Py_ssize_t Hq, Py_ssize_t Wq,
                                 const float* ap, Py_ssize_t Cg, Py_ssize_t a, Py_ssize_t b, Py_ssize_t sh,
                                 Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t H, Py_ssize_t W,
                                 Py_ssize_t s0, Py_ssize_t s1, float* dx, float* ct, float* bbuf)
    void chexcy_cg_task_phase(const float* xq, const Py_ssize_t* off, Py_ssize_t taps, Py_ssize_t cs,
                              Py_ssize_t Wq, Py_ssize_t OH, Py_ssize_t OW, const float* ap,
                              const float* bias, Py_ssize_t Fg, Py_ssize_t K, Py_ssize_t s0, Py_ssize_t s1,
                              float* out, float* ct, float* bbuf)

# 1x1 convs as one product per group over the batch (POINTWISE_GEMM path)
cdef extern from "_ops_pointwise.h" nogil:
    ctypedef struct chexcy_pw_geom:
        const float* x
        Py_ssize_t ns, cs, OW, P, rowstep, sw, NP
    enum: PW_MAX_STRIPS
    void chexcy_pw_task(const chexcy_pw_geom* g, const float* ap, const float* bias, Py_ssize_t Fg,
                        Py_ssize_t K, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t t0, Py_ssize_t t1,
                        float* out, Py_ssize_t out_ns, float* bbuf, float* cbuf, int relu, const float* res)
    void chexcy_pw_dweight_task(const float* dout, Py_ssize_t d_ns, const float* x, Py_ssize_t x_ns,
                                Py_ssize_t P, Py_ssize_t qa, Py_ssize_t qb, Py_ssize_t Cg, Py_ssize_t m0,
                                Py_ssize_t mc, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t ta, Py_ssize_t tb,
                                float* dweight, Py_ssize_t ldw, float* abuf, float* bbuf)

# batch-norm statistics and apply passes, channel blocks
cdef extern from "_ops_batchnorm.h" nogil:
    void chexcy_bn_plane_stats(const float* p, Py_ssize_t n, double* sum, double* m2)
    void chexcy_bn_plane_grad_sums(const float* g, const float* x, Py_ssize_t n, double mean,
                                   double* sum_g, double* sum_gx)
    void chexcy_bn_apply(const float* x, float* out, Py_ssize_t n, float m, float a, float b, int relu)
    void chexcy_bn_apply_grad(const float* g, const float* x, float* dx, Py_ssize_t n, float m, float a,
                              float b, float c, int add)
    void chexcy_bn_combine(const double* ps, const double* pm, Py_ssize_t N, Py_ssize_t hw, double* mean,
                           double* var)
    void chexcy_bn_coefficients(double mean, double var, float weight, float bias, double eps, float* k)
    void chexcy_bn_grad_coefficients(float var, float weight, double sg, double sgx, double M, double eps,
                                     float* k)
    enum:
        CHEXCY_BN_BLOCK
    void chexcy_bn_forward_block(const float* x, float* out, Py_ssize_t N, Py_ssize_t xs, Py_ssize_t hw,
                                 Py_ssize_t c0, Py_ssize_t c1, const float* weight, const float* bias,
                                 double eps, double* scratch, float* mean, float* var)
    void chexcy_bn_backward_block(const float* g, Py_ssize_t gs, const float* x, Py_ssize_t xs, float* dx,
                                  Py_ssize_t ds, int add, Py_ssize_t N, Py_ssize_t hw, Py_ssize_t c0,
                                  Py_ssize_t c1, const float* mean, const float* var, const float* weight,
                                  double eps, float* dweight, float* dbias)

# max / average pool planes and rows
cdef extern from "_ops_pool.h" nogil:
    void chexcy_max_pool_plane(const float* x, float* out, int64_t* arg, Py_ssize_t H, Py_ssize_t W,
                               Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t KH, Py_ssize_t KW,
                               Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                               Py_ssize_t dil_h, Py_ssize_t dil_w, float* best, int32_t* idx, float* row)
    void chexcy_avg_pool_2x2_plane(const float* x, Py_ssize_t W, float* out, Py_ssize_t OH, Py_ssize_t OW)
    void chexcy_avg_unpool_2x2_plane(const float* g, float* dx, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                                     Py_ssize_t OW)
    void chexcy_max_pool_2x2_row(const float* r0, const float* r1, float* out, int64_t* arg,
                                 int64_t base, Py_ssize_t W, Py_ssize_t OW)
    void chexcy_max_unpool_2x2_row(const float* g, const int64_t* arg, float* d0, float* d1, int64_t base,
                                   Py_ssize_t W, Py_ssize_t OW)
    int chexcy_argmax_in_2x2_cells(const int64_t* arg, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW)

# depthwise planes (DEPTHWISE path)
cdef extern from "_ops_depthwise.h" nogil:
    enum:
        CHEXCY_DWC_MAX_TAPS     # kernels of up to this many taps take the DEPTHWISE path
        CHEXCY_DWC_MAX_STRIDE   # and strides up to this
    ctypedef struct chexcy_dwc_geom:
        Py_ssize_t OH, OW, T, B
    void chexcy_dwc_init(chexcy_dwc_geom* g, Py_ssize_t N, Py_ssize_t H, Py_ssize_t W, Py_ssize_t KH, Py_ssize_t KW,
                         Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t dil_h,
                         Py_ssize_t dil_w)
    Py_ssize_t chexcy_dwc_scratch_floats(const chexcy_dwc_geom* g)
    void chexcy_dwc_forward_unit(const chexcy_dwc_geom* g, Py_ssize_t C, Py_ssize_t u, const float* x,
                                 const float* w, const float* bias, float* out, float* scratch)
    void chexcy_dwc_backward_channel(const chexcy_dwc_geom* g, Py_ssize_t N, Py_ssize_t C, Py_ssize_t c,
                                     const float* dout, const float* x, const float* w, float* dx,
                                     float* dweight, float* dbias, float* scratch)

# depthwise on small planes, channels in the vector lanes (DEPTHWISE_LANES path)
cdef extern from "_ops_depthwise_lanes.h" nogil:
    enum:
        CHEXCY_DWL_L            # channels per block (the floats of one vector register)
    ctypedef struct chexcy_dwl_geom:
        Py_ssize_t OH, OW, T
    void chexcy_dwl_init(chexcy_dwl_geom* g, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t KH,
                         Py_ssize_t KW, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                         Py_ssize_t dil_h, Py_ssize_t dil_w)
    Py_ssize_t chexcy_dwl_scratch_floats(const chexcy_dwl_geom* g)
    void chexcy_dwl_forward_unit(const chexcy_dwl_geom* g, Py_ssize_t u, const float* x, const float* w,
                                 const float* bias, float* out, float* scratch)
    void chexcy_dwl_backward_block(const chexcy_dwl_geom* g, Py_ssize_t N, Py_ssize_t cb, const float* dout,
                                   const float* x, const float* w, float* dx, float* dweight, float* dbias,
                                   float* scratch)

# ReLU
cdef extern from "_ops_relu.h" nogil:
    void chexcy_relu(const float* x, float* y, Py_ssize_t n)
    void chexcy_relu_add(const float* x, const float* r, float* y, Py_ssize_t n)
    void chexcy_relu_grad(const float* g, const float* y, float* dx, Py_ssize_t n)

# whole pages from the system (the block cache)
cdef extern from "_ops_pages.h" nogil:
    int chexcy_populate(void* addr, size_t n)
    void* chexcy_map(size_t n)
    void chexcy_unmap(void* p, size_t n)

# A CHEXCY_DEBUG=1 build (bounds checks on) also defines the C macro CHEXCY_DEBUG; build_info reports it.
cdef extern from *:
    """
    #ifdef CHEXCY_DEBUG
    #define CHEXCY_DEBUG_BUILD 1
    #else
    #define CHEXCY_DEBUG_BUILD 0
    #endif
    """
    int CHEXCY_DEBUG_BUILD
