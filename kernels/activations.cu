/* activations.cu: z = f(y) and dL/dy = dL/dz ⊙ f'(y) from the saved output z   (MATH.md §3)

     sigmoid  z = 1/(1+e^{-y}) via e = exp(-|y|) (no overflow at any |y|)   f' = z (1 - z)
     tanh     z = tanh(y)                                                  f' = 1 - z², formed as (1 - z)(1 + z)
     relu     z = max(y, 0) (NaN propagates)                               f' = [z > 0]

   Shapes: flat arrays of n elements (any shape, C-contiguous), n may exceed 2^31.

   Kernels (grid-stride loops, 64-bit indices; ACT is a CUGRAD_ACT_* code):
     activation_fwd<T, ACT>   y (n) -> z (n)
     activation_bwd<T, ACT>   grad_out (n), saved output z (n) -> grad_in (n)

   CUDA features used: __global__, __device__ __forceinline__, templates, expf/exp,
   tanhf/tanh, fabsf/fabs (through common.cuh).
*/
#include "common.cuh"

template <typename T, int ACT>
__global__ void activation_fwd(const T* __restrict__ y, T* __restrict__ z, long long n) {
    // y (n) -> z (n), z = f(y); any 1-D grid.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        z[i] = activate<T, ACT>(y[i]);
}

template <typename T, int ACT>
__global__ void activation_bwd(const T* __restrict__ grad_out, const T* __restrict__ saved,
                               T* __restrict__ grad_in, long long n) {
    // grad_out (n), saved z = f(y) (n) -> grad_in (n) = grad_out * f'(y), f' from z; any 1-D grid.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        grad_in[i] = activate_backward<T, ACT>(grad_out[i], saved[i]);
}
