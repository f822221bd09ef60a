/* optim.cu: in-place optimiser updates, PyTorch's rules   (MATH.md §5: w <- w - lr dw)

   SGD (weight decay wd, momentum mu, buf starting at zero, which equals PyTorch's
   first-step clone of g):
       g = grad + wd p;   if MOMENTUM: buf = mu buf + g, g = buf;   p -= lr g
   Adam (L2 weight decay added to the gradient, as torch.optim.Adam), step t >= 1:
       g = grad + wd p;   m = b1 m + (1 - b1) g;   v = b2 v + ((1 - b2) g) g
       p -= step_size · m / (sqrt(v) / bc2_sqrt + eps)
   with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t), computed in float64 and
   converted to the parameter dtype: on the host from a step number (adam_step), or on the
   device from a step counter in device memory (adam_step_counted), so that a CUDA graph
   replays a step whose t advances (counter_increment, launched before it, counts the step).

   Gradient accumulation (a second backward before zero_grad, MATH.md §5):
       total += grad

   Shapes: every array is a C-contiguous parameter-sized array of n elements; the counter is
   one int64.

   Kernels (grid-stride loops, 64-bit indices):
     sgd_step<T, MOMENTUM>        p, grad, buf (read and written only when MOMENTUM = 1)
     adam_step<T>                 p, grad, m, v; step_size and bc2_sqrt from the host
     adam_step_counted<T>         p, grad, m, v; t read from the counter
     counter_increment<I>         *counter += 1 (one thread)
     accumulate<T>                total += grad

   CUDA features used: __global__, templates, sqrtf/sqrt (through common.cuh), pow (double).
*/
#include "common.cuh"

template <typename T, int MOMENTUM>
__global__ void sgd_step(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ buf, long long n,
                         T lr, T momentum, T weight_decay) {
    // p, grad, buf (n); p and buf updated in place; any 1-D grid.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        T g = grad[i];
        if (weight_decay != T(0)) g += weight_decay * p[i];   // skipped at 0, as PyTorch does
        if (MOMENTUM) {
            g = momentum * buf[i] + g;
            buf[i] = g;
        }
        p[i] -= lr * g;
    }
}

// One Adam update of this thread's grid-stride share of [0, n): the loop of both Adam kernels.
template <typename T>
__device__ __forceinline__ void adam_update(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ m,
                                            T* __restrict__ v, long long n, T step_size, T beta1,
                                            T one_minus_beta1, T beta2, T one_minus_beta2, T eps,
                                            T weight_decay, T bc2_sqrt) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        T g = grad[i];
        if (weight_decay != T(0)) g += weight_decay * p[i];
        const T mi = beta1 * m[i] + one_minus_beta1 * g;
        // ((1 - b2) g) g, PyTorch's order: g * g first overflows float32 for |g| > 1.8e19,
        // where v itself fits (an infinite v would then freeze the parameter for good).
        const T vi = beta2 * v[i] + (one_minus_beta2 * g) * g;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * (mi / (dsqrt(vi) / bc2_sqrt + eps));
    }
}

template <typename T>
__global__ void adam_step(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ m, T* __restrict__ v,
                          long long n, T step_size, T beta1, T one_minus_beta1, T beta2,
                          T one_minus_beta2, T eps, T weight_decay, T bc2_sqrt) {
    // p, grad, m, v (n); p, m, v updated in place; any 1-D grid. 1 - beta comes from the
    // host in float64: float32(0.999) is 0.99900001, so T(1) - beta2 would be 1.3e-5 off.
    adam_update(p, grad, m, v, n, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                weight_decay, bc2_sqrt);
}

template <typename T>
__global__ void adam_step_counted(T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ m,
                                  T* __restrict__ v, long long n, const long long* __restrict__ step,
                                  double lr, double beta1_f64, double beta2_f64, T beta1,
                                  T one_minus_beta1, T beta2, T one_minus_beta2, T eps, T weight_decay) {
    // As adam_step, with t = *step (already counted by counter_increment) and the bias
    // corrections formed here in float64 from the float64 lr and betas, as the host does.
    const double t = (double)*step;
    const T step_size = T(lr / (1.0 - pow(beta1_f64, t)));
    const T bc2_sqrt = T(sqrt(1.0 - pow(beta2_f64, t)));
    adam_update(p, grad, m, v, n, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                weight_decay, bc2_sqrt);
}

template <typename I>
__global__ void counter_increment(I* counter) {
    // One thread adds 1; a launch of its own, so that every block of the kernel after it
    // reads the new count. The count stops at the largest I (long long: 2^63 - 1), past which
    // it would wrap to a negative t; both bias corrections are 1 there in float64.
    const I most = I(~0ULL >> 1);
    if (blockIdx.x == 0 && threadIdx.x == 0 && *counter < most) *counter += I(1);
}

template <typename T>
__global__ void accumulate(T* __restrict__ total, const T* __restrict__ grad, long long n) {
    // total, grad (n); total updated in place; any 1-D grid.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        total[i] += grad[i];
}
