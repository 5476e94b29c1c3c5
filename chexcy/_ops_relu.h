/* chexcy/_ops_relu.h: the rectifier, forward and backward, over flat float32 arrays (chexcy._ops'
 * relu_forward / relu_backward split them into fixed chunks, one per loop iteration). Plain loops the
 * compiler vectorises (a compare and a blend per vector): memory-bound, like a copy. */
#ifndef CHEXCY_OPS_RELU_H
#define CHEXCY_OPS_RELU_H

/* ReLU (elementwise; any shape flattened): y = x where x >= 0 or x is NaN, else 0 (as np.maximum(x, 0)
 * up to the sign of zero); dx = dout where y > 0, else 0 (the derivative at 0 taken as 0, PyTorch's
 * choice; a NaN y gives 0). x may be y (in place). */
static void chexcy_relu(const float *x, float *y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = x[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

/* y = max(x + r, 0) (a residual block's sum and ReLU in one pass; NaN stays NaN); y may be x. */
static void chexcy_relu_add(const float *x, const float *r, float *y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = x[i] + r[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

static void chexcy_relu_grad(const float *g, const float *y, float *dx, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        dx[i] = y[i] > 0.0f ? g[i] : 0.0f;
}

#endif
