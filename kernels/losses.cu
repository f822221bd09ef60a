/* losses.cu: softmax, log-softmax, softmax cross-entropy, MSE   (MATH.md §4)

   Row-wise over the last axis of x (rows, C), one warp per row (ROW_WARPS warps a block,
   grid-stride over rows), the row max subtracted first (no overflow):
     s = Σ_j e^{z_j - max z},  held as s - 1 (the terms equal to 1 counted, not added),
     ŷ_i = e^{z_i - max z} / s,   log ŷ_i = (z_i - max z) - log1p(s - 1)
   Cross-entropy per row, with lse = max + ln s, targets t:
     L_row = lse Σ_i t_i - Σ_i t_i z_i        (class index c: L_row = lse - z_c)
           = log1p(s - 1) Σ_i t_i - Σ_i t_i (z_i - max z)
     dL/dz = (ŷ Σ_i t_i - t) · scale          (scale = 1/N for 'mean', 1 for 'sum';
           = ((e^{z - max} Σt - t) - t (s - 1)) / s · scale      Σ t = 1 for class indices: ŷ - t)
   Keeping s - 1 makes a confident row exact: float32 logits [20, 0, 0], class 0, have
   s - 1 = 4.1e-9; ln s and ŷ_0 - 1 formed from s round to 0, log1p(s - 1) and -(s - 1)/s do not.
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
     mse_fwd_bwd<T>                            sum_reduce<T, 1>'s block sums of (pred - target)²
                                               and grad (n) = scale2 (pred - target), one
                                               pass over pred and target (same bits as the two)

   CUDA features used: __global__, __device__ __forceinline__, static __shared__ arrays,
   __syncthreads, __shfl_xor_sync (full mask), templates, static_assert, expf/exp,
   log1pf/log1p, fmaxf/fmax, sqrtf/sqrt.
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

// Row max and r = s - 1 = Σ_j e^{x_j - max} - 1 of one row, computed by a whole warp; every
// lane gets both. The terms equal to 1 (the max itself, and any tie) are counted rather than
// added, so r keeps the small terms that 1 + r would round away: ln s = log1p(r) is then
// accurate for a confident row (e.g. float32 [20, 0, 0]: r = 4.1e-9, s rounds to 1, so
// ln s would be 0). A NaN (or +inf - +inf) term is added, not counted: it still propagates.
// The max starts from x[0] (C >= 1), so no infinity is needed.
// Each lane's sums run over C/32 terms, half a million in a row of 2^24: a plain running sum
// would carry ~C/32 roundings (float32: 2.06e-5 relative error at C = 2^24 + 5), so the lanes sum
// with Kahan's compensation, and the ties are counted in an integer (a float32 count stops
// at 2^24). Column indices are long long: a lane's index passes C - 1 by up to 31, past
// INT32_MAX for C near 2^31.
template <typename T>
__device__ __forceinline__ void row_max_sumexp_m1(const T* __restrict__ x, int C, int lane, T& mx, T& r) {
    T m = x[0];
    for (long long c = lane; c < C; c += 32) m = dmax(m, x[c]);
    mx = warp_max(m);
    T acc = T(0), comp = T(0);
    int ones = 0;
    for (long long c = lane; c < C; c += 32) {
        const T e = dexp(x[c] - mx);
        if (e == T(1)) ones += 1;
        else kahan_add(acc, comp, e);
    }
    r = (warp_sum(acc) - warp_sum(comp)) + T(warp_sum(ones) - 1);
}

template <typename T, int LOG>
__global__ void softmax_rows(const T* __restrict__ x, T* __restrict__ y, long long rows, int C) {
    // x (rows, C) -> y (rows, C); block (32*ROW_WARPS); one warp per row, grid-stride.
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * ROW_WARPS;
    for (long long r = (long long)blockIdx.x * ROW_WARPS + threadIdx.x / 32; r < rows; r += warps) {
        const T* xr = x + r * C;
        T* yr = y + r * C;
        T mx, sm1;
        row_max_sumexp_m1(xr, C, lane, mx, sm1);
        if (LOG) {
            // (x - max) - log1p(s - 1), as the NumPy backend: folding it into max + log s
            // first would round log s away when |max| is large (max = 1e30: every entry 0).
            const T ls = dlog1p(sm1);
            for (long long c = lane; c < C; c += 32) yr[c] = (xr[c] - mx) - ls;
        } else {
            const T inv = T(1) / (T(1) + sm1);
            for (long long c = lane; c < C; c += 32) yr[c] = dexp(xr[c] - mx) * inv;
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
__device__ __forceinline__ T target_weight(const long long* t, long long r, long long c, int C) {
    return t[r] == c ? T(1) : T(0);
}
template <typename T>
__device__ __forceinline__ T target_weight(const T* t, long long r, long long c, int C) {
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
        T mx, sm1;
        row_max_sumexp_m1(zr, C, lane, mx, sm1);
        const bool ok = valid_class(target, r, C);   // an out-of-range class gives NaN, no stray read
        // Σt in two parts, the targets of the classes at the max and the rest (see GRAD).
        // Compensated lane sums, as row_max_sumexp_m1's (a probability row of 2^24 classes).
        T tmax = T(0), trest = T(0), tz = T(0), cmax = T(0), crest = T(0), cz = T(0);
        for (long long c = lane; c < C; c += 32) {
            const T t = target_weight<T>(target, r, c, C);
            if (zr[c] == mx) kahan_add(tmax, cmax, t); else kahan_add(trest, crest, t);
            if (t != T(0)) kahan_add(tz, cz, t * (zr[c] - mx));   // skip 0 * -inf for a -inf logit
        }
        tmax = warp_sum(tmax) - warp_sum(cmax);
        trest = warp_sum(trest) - warp_sum(crest);
        tz = warp_sum(tz) - warp_sum(cz);
        const T tsum = tmax + trest;
        if (lane == 0) row_loss[r] = ok ? dlog1p(sm1) * tsum - tz : quiet_nan<T>();
        if (GRAD) {
            // ŷ_c Σt - t_c = (e_c Σt - t_c s) / s, with t_c s taken as t_c + t_c (s - 1): for the
            // target at the max (e_c = 1, class index) that is exactly -(s - 1) / s, where
            // ŷ_c - 1 would round to 0 for a confident row. At the max, e_c Σt - t_c is
            // Σ_{i != c} t_i, formed as (tmax - t_c) + trest (0 + trest for one class at the
            // max): a rounded Σt less t_c would cancel for a near-one-hot probability row
            // (t_c = 1 - 1e-6 in float32: a 6e-8 rounding against a difference of 1e-6).
            const T inv = T(1) / (T(1) + sm1);
            T* gr = grad + r * C;
            for (long long c = lane; c < C; c += 32) {
                const T t = target_weight<T>(target, r, c, C);
                const T rest = zr[c] == mx ? (tmax - t) + trest : dexp(zr[c] - mx) * tsum - t;
                const T g = (rest - t * sm1) * inv * scale;
                gr[c] = ok ? g : quiet_nan<T>();
            }
        }
    }
}

// The end of every block-sum kernel (sum_reduce, mse_fwd_bwd): block blk covers
// [blk*per_block, min(n, (blk+1)*per_block)), each thread sums its strided share into acc, and
// out[blk] = scale * (the threads' sums by a fixed tree): one order, so the same bits wherever
// it is used. `partial` is the kernel's __shared__ T[REDUCE_THREADS].
__device__ __forceinline__ long long block_end(long long n, long long per_block) {
    const long long end = (long long)blockIdx.x * per_block + per_block;
    return end < n ? end : n;
}

template <typename T>
__device__ __forceinline__ void store_block_sum(T* partial, T acc, T* __restrict__ out, T scale) {
    const int tid = threadIdx.x;
    partial[tid] = acc;
    __syncthreads();
#pragma unroll
    for (int stride = REDUCE_THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = partial[0] * scale;
}

template <typename T, int SQDIFF>
__global__ void sum_reduce(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                           long long n, long long per_block, T scale) {
    // a, b (n) -> out (gridDim.x): out[blk] = scale * Σ over [blk*per_block, min(n, (blk+1)*per_block)); block REDUCE_THREADS.
    __shared__ T partial[REDUCE_THREADS];
    const long long end = block_end(n, per_block);
    T acc = T(0);
    for (long long i = (long long)blockIdx.x * per_block + threadIdx.x; i < end; i += REDUCE_THREADS) {
        if (SQDIFF) {
            const T d = a[i] - b[i];
            acc += d * d;
        } else {
            acc += a[i];
        }
    }
    store_block_sum(partial, acc, out, scale);
}

template <typename T>
__global__ void mse_fwd_bwd(const T* __restrict__ pred, const T* __restrict__ target,
                            T* __restrict__ grad, T* __restrict__ out, long long n,
                            long long per_block, T scale, T scale2) {
    // pred, target (n) -> grad (n) = scale2 (pred - target), and out (gridDim.x): out[blk] =
    // scale * Σ (pred - target)² over block blk's range, in sum_reduce<T, 1>'s order (so the
    // same bits as sum_reduce and mse_grad); block REDUCE_THREADS.
    __shared__ T partial[REDUCE_THREADS];
    const long long end = block_end(n, per_block);
    T acc = T(0);
    for (long long i = (long long)blockIdx.x * per_block + threadIdx.x; i < end; i += REDUCE_THREADS) {
        const T d = pred[i] - target[i];
        grad[i] = scale2 * d;
        acc += d * d;
    }
    store_block_sum(partial, acc, out, scale);
}

template <typename T>
__global__ void mse_grad(const T* __restrict__ pred, const T* __restrict__ target, T* __restrict__ grad,
                         long long n, T scale2) {
    // pred, target (n) -> grad (n) = scale2 * (pred - target); any 1-D grid.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        grad[i] = scale2 * (pred[i] - target[i]);
}
