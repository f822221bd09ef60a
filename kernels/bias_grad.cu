/* bias_grad.cu: db = Σ_rows dY   (MATH.md §2: db = Σ_n dY[n, :]; §5: dB = Σ_rows A)
   and, fused, the activation's backward before it: G = dZ ⊙ f'(Y) from the saved output
   Z = f(Y) (MATH.md §3), written out for dX and dW, and db = Σ_rows G in the same pass.

   Shapes: dZ, Z, G (M, N) row-major C-contiguous -> out (chunks, N).
   Deterministic: every output is summed in one fixed order that depends only on M, N and
   rows_per_chunk (never on the device or on timing); no atomics.

   Kernels:
     bias_grad_colsum<T, ACT>  block (COLSUM_COLS, COLSUM_LANES) sums rows
                               [c*rows_per_chunk, (c+1)*rows_per_chunk) of COLSUM_COLS
                               consecutive columns (a warp reads 32 consecutive columns:
                               coalesced); grid (ceil(N/COLSUM_COLS), chunks), writes out[c, :].
                               ACT = CUGRAD_ACT_NONE sums its first argument (Z and G unused);
                               otherwise it sums G = dZ ⊙ f'(Z) and writes G.
   Tall inputs use two launches (split-M): rows -> (chunks, N) partial sums (fused with the
   activation's backward when asked), then the partials -> (1, N) with one chunk, ACT_NONE.

   CUDA features used: __global__, static __shared__ arrays, __syncthreads, templates,
   static_assert (and through common.cuh: expf/exp, tanhf/tanh, fabsf/fabs).
*/
#include "common.cuh"

#ifndef COLSUM_COLS
#define COLSUM_COLS 32
#endif
#ifndef COLSUM_LANES
#define COLSUM_LANES 8
#endif
static_assert(COLSUM_COLS * COLSUM_LANES <= 1024, "at most 1024 threads per block");
static_assert((COLSUM_LANES & (COLSUM_LANES - 1)) == 0, "COLSUM_LANES must be a power of two");

template <typename T, int ACT>
__global__ void bias_grad_colsum(const T* __restrict__ dZ, const T* __restrict__ Z, T* __restrict__ G,
                                 T* __restrict__ out, long long M, int N, long long rows_per_chunk) {
    // dZ (M, N) [, Z (M, N) -> G (M, N)] -> out (gridDim.y, N): out[c, n] = Σ_{m in chunk c} G[m, n],
    // G = dZ without ACT; block (COLSUM_COLS, COLSUM_LANES).
    __shared__ T partial[COLSUM_LANES][COLSUM_COLS];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long n = (long long)blockIdx.x * COLSUM_COLS + tx;
    const long long row_begin = (long long)blockIdx.y * rows_per_chunk;
    const long long row_end = row_begin + rows_per_chunk < M ? row_begin + rows_per_chunk : M;
    T sum = T(0);
    if (n < N)
        for (long long m = row_begin + ty; m < row_end; m += COLSUM_LANES) {
            const long long i = m * N + n;
            if (ACT == CUGRAD_ACT_NONE) {
                sum += dZ[i];
            } else {
                const T g = activate_backward<T, ACT>(dZ[i], Z[i]);
                G[i] = g;
                sum += g;
            }
        }
    partial[ty][tx] = sum;
    __syncthreads();
    // Fixed-order tree over the lanes.
#pragma unroll
    for (int stride = COLSUM_LANES / 2; stride > 0; stride >>= 1) {
        if (ty < stride) partial[ty][tx] += partial[ty + stride][tx];
        __syncthreads();
    }
    if (ty == 0 && n < N) out[(long long)blockIdx.y * N + n] = partial[0][tx];
}
