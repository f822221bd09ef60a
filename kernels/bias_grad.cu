/* bias_grad.cu: db = Σ_rows dY   (MATH.md §2: db = Σ_n dY[n, :]; §5: dB = Σ_rows A)

   Shapes: G (M, N) row-major C-contiguous -> out (chunks, N).
   Deterministic: every output is summed in one fixed order that depends only on M, N and
   rows_per_chunk (never on the device or on timing); no atomics.

   Kernels:
     bias_grad_colsum<T>   block (COLSUM_COLS, COLSUM_LANES) sums rows
                           [c*rows_per_chunk, (c+1)*rows_per_chunk) of COLSUM_COLS
                           consecutive columns (a warp reads 32 consecutive columns:
                           coalesced); grid (ceil(N/COLSUM_COLS), chunks), writes out[c, :].
   Tall inputs use two launches of the same kernel (split-M): rows -> (chunks, N)
   partial sums, then the partials -> (1, N) with one chunk.

   CUDA features used: __global__, static __shared__ arrays, __syncthreads, templates,
   static_assert.
*/

#ifndef COLSUM_COLS
#define COLSUM_COLS 32
#endif
#ifndef COLSUM_LANES
#define COLSUM_LANES 8
#endif
static_assert(COLSUM_COLS * COLSUM_LANES <= 1024, "at most 1024 threads per block");
static_assert((COLSUM_LANES & (COLSUM_LANES - 1)) == 0, "COLSUM_LANES must be a power of two");

template <typename T>
__global__ void bias_grad_colsum(const T* __restrict__ G, T* __restrict__ out,
                                 long long M, int N, long long rows_per_chunk) {
    // G (M, N) -> out (gridDim.y, N): out[c, n] = Σ_{m in chunk c} G[m, n]; block (COLSUM_COLS, COLSUM_LANES).
    __shared__ T partial[COLSUM_LANES][COLSUM_COLS];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long n = (long long)blockIdx.x * COLSUM_COLS + tx;
    const long long row_begin = (long long)blockIdx.y * rows_per_chunk;
    const long long row_end = row_begin + rows_per_chunk < M ? row_begin + rows_per_chunk : M;
    T sum = T(0);
    if (n < N)
        for (long long m = row_begin + ty; m < row_end; m += COLSUM_LANES) sum += G[m * N + n];
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
