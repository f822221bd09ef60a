/* losses.cu: softmax, log-softmax, softmax cross-entropy, MSE   (MATH.md §4)

   Row-wise over the last axis of x (rows, C), one warp per row (ROW_WARPS warps a block,
   grid-stride over rows), the row max subtracted first (no overflow):
     ŷ_i = e^{z_i - max z} / Σ_j e^{z_j - max z},   log ŷ_i = z_i - max z - ln Σ_j e^{z_j - max z}
   Cross-entropy per row, with s = Σ_j e^{z_j - max}, lse = max + ln s, targets t:
     L_row = lse Σ_i t_i - Σ_i t_i z_i        (class index c: L_row = lse - z_c)
     dL/dz = (ŷ Σ_i t_i - t) · scale          (scale = 1/N for 'mean', 1 for 'sum';
                                               Σ t = 1 for class indices: ŷ - t)
   MSE, n elements, d = pred - target: L = scale Σ d² (scale 1/n, 1, 1/2),
     dL/dpred = 2 scale d.
   Scalars are reduced deterministically: fixed per-block ranges, fixed-order trees.

   Kernels:
     softmax_rows<T, LOG>                      x (rows, C) -> y (rows, C): softmax (LOG=0)
                                               or log-softmax (LOG=1)
     softmax_xent_fwd_bwd<T, Target, GRAD>     logits (rows, C), target (rows,) int64
                                               [Target = long long] or (rows, C)
                                               [Target = T] -> row_loss (rows) and, when
                                               GRAD, grad (rows, C) in the same pass
     sum_reduce<T, SQDIFF>                     out[b] = scale Σ_{i in block b's range} v_i,
                                               v_i = a_i (SQDIFF=0) or (a_i - b_i)²;
                                               block b covers [b*per_block, (b+1)*per_block)
     mse_grad<T>                               grad (n) = scale2 (pred - target)

   CUDA features used: __global__, __device__ __forceinline__, static __shared__ arrays,
   __syncthreads, __shfl_xor_sync (full mask), templates, static_assert, expf/exp,
   logf/log, fmaxf/fmax, sqrtf/sqrt.
*/
#include "common.cuh"

#ifndef ROW_WARPS
#define ROW_WARPS 8
#endif
#ifndef REDUCE_THREADS
#define REDUCE_THREADS 256
#endif
static_assert(ROW_WARPS >= 1 && ROW_WARPS <= 32, "1 to 32 warps per block");
static_assert((REDUCE_THREADS & (REDUCE_THREADS - 1)) == 0 && REDUCE_THREADS <= 1024,
              "REDUCE_THREADS: a power of two, at most 1024");

// Row max and s = Σ exp(x - max) of one row, computed by a whole warp; every lane gets both.
// The max starts from x[0] (C >= 1), so no infinity is needed.
template <typename T>
__device__ __forceinline__ void row_max_sumexp(const T* __restrict__ x, int C, int lane, T& mx, T& s) {
    T m = x[0];
    for (int c = lane; c < C; c += 32) m = dmax(m, x[c]);
    mx = warp_max(m);
    T acc = T(0);
    for (int c = lane; c < C; c += 32) acc += dexp(x[c] - mx);
    s = warp_sum(acc);
}

template <typename T, int LOG>
__global__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, long long rows, int C) {
    // x (rows, C) -> y (rows, C); block (32*ROW_WARPS); one warp per row, grid-stride.
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * ROW_WARPS;
    for (long long r = (long long)blockIdx.x * ROW_WARPS + threadIdx.x / 32; r < rows; r += warps) {
        const T* xr = x + r * C;
        T* yr = y + r * C;
        T mx, s;
        row_max_sumexp(xr, C, lane, mx, s);
        if (LOG) {
            // (x - max) - log s, as the NumPy backend: folding log s into max + log s first
            // would round log s away when |max| is large (e.g. max = 1e30: every entry 0).
            const T ls = dlog(s);
            for (int c = lane; c < C; c += 32) yr[c] = (xr[c] - mx) - ls;
        } else {
            const T inv = T(1) / s;
            for (int c = lane; c < C; c += 32) yr[c] = dexp(xr[c] - mx) * inv;
        }
    }
}

// Target weight t_c of row r: class indices (one-hot) or a probability row.
__device__ __forceinline__ bool valid_class(const long long* t, long long r, int C) {
    return t[r] >= 0 && t[r] < C;
}
template <typename T>
__device__ __forceinline__ bool valid_class(const T*, long long, int) { return true; }
template <typename T>
__device__ __forceinline__ T target_weight(const long long* t, long long r, int c, int C) {
    return t[r] == c ? T(1) : T(0);
}
template <typename T>
__device__ __forceinline__ T target_weight(const T* t, long long r, int c, int C) {
    return t[r * C + c];
}

template <typename T, typename Target, int GRAD>
__global__ void softmax_xent_fwd_bwd(const T* __restrict__ logits, const Target* __restrict__ target,
                                     T* __restrict__ row_loss, T* __restrict__ grad,
                                     long long rows, int C, T scale) {
    // logits (rows, C), target (rows,) or (rows, C) -> row_loss (rows), grad (rows, C) if GRAD; block (32*ROW_WARPS).
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * ROW_WARPS;
    for (long long r = (long long)blockIdx.x * ROW_WARPS + threadIdx.x / 32; r < rows; r += warps) {
        const T* zr = logits + r * C;
        T mx, s;
        row_max_sumexp(zr, C, lane, mx, s);
        const bool ok = valid_class(target, r, C);   // an out-of-range class gives NaN, no stray read
        T tsum = T(0), tz = T(0);
        for (int c = lane; c < C; c += 32) {
            const T t = target_weight<T>(target, r, c, C);
            tsum += t;
            if (t != T(0)) tz += t * (zr[c] - mx);   // skip 0 * -inf for a -inf logit
        }
        tsum = warp_sum(tsum);
        tz = warp_sum(tz);
        if (lane == 0) row_loss[r] = ok ? dlog(s) * tsum - tz : quiet_nan<T>();
        if (GRAD) {
            const T inv = T(1) / s;
            T* gr = grad + r * C;
            for (int c = lane; c < C; c += 32) {
                const T g = (dexp(zr[c] - mx) * inv * tsum - target_weight<T>(target, r, c, C)) * scale;
                gr[c] = ok ? g : quiet_nan<T>();
            }
        }
    }
}

template <typename T, int SQDIFF>
__global__ void sum_reduce(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                           long long n, long long per_block, T scale) {
    // a, b (n) -> out (gridDim.x): out[blk] = scale * Σ over [blk*per_block, min(n, (blk+1)*per_block)); block REDUCE_THREADS.
    __shared__ T partial[REDUCE_THREADS];
    const int tid = threadIdx.x;
    const long long begin = (long long)blockIdx.x * per_block;
    const long long end = begin + per_block < n ? begin + per_block : n;
    T acc = T(0);
    for (long long i = begin + tid; i < end; i += REDUCE_THREADS) {
        if (SQDIFF) {
            const T d = a[i] - b[i];
            acc += d * d;
        } else {
            acc += a[i];
        }
    }
    partial[tid] = acc;
    __syncthreads();
#pragma unroll
    for (int stride = REDUCE_THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = partial[0] * scale;
}

template <typename T>
__global__ void mse_grad(const T* __restrict__ pred, const T* __restrict__ target, T* __restrict__ grad,
                         long long n, T scale2) {
    // pred, target (n) -> grad (n) = scale2 * (pred - target); any 1-D grid.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        grad[i] = scale2 * (pred[i] - target[i]);
}
