/* Self-test kernels of the CPU harness (not part of cugrad): each exercises one feature of
 * cuda_shim.h, and some are deliberately broken to show that the harness catches the bug.
 *
 *   block_sum<SYNC>        one block per row, shared-memory tree reduction; SYNC=0 drops
 *                          the barrier inside the tree loop (a race: must give wrong sums)
 *   warp_sum               one warp per row, __shfl_down_sync + __shfl_xor_sync reduction
 *   reverse_dyn            reverse each block's chunk through dynamic shared memory
 *   votes                  __ballot_sync / __all_sync / __any_sync / __syncthreads_count
 *   scale_inplace          x[i] *= s, in place (aliasing, a double scalar)
 *   oob_write              writes out[n] (one past the end): ASan must report it
 *   dyn_smem_overrun       reads one float past the launch's dynamic shared memory
 *   misaligned_float4      a float4 load from a 4-byte-aligned address (UBSan alignment)
 *   warp_deadlock          half a warp at __syncthreads, half in a full-mask shuffle
 *   atomic_hist            atomicAdd into a histogram
 *   bad_mask               a lane calls __shfl_sync with a mask that does not name itself
 *   cross_warp<SYNC>       threads read what a thread of another warp stored in shared
 *                          memory; SYNC=0 puts __syncwarp where __syncthreads belongs
 *   lane_exchange<SYNC>    lanes of one warp exchange through shared memory; SYNC=0 has only
 *                          a shuffle between the store and the load, no __syncwarp
 *   divergent_barrier      threads of one block wait at two different __syncthreads
 * The two SYNC=0 kernels are races on a GPU that still give the right answer here under
 * every schedule (each thread reaches the warp operation before any goes on): only the
 * ThreadSanitizer build (CUGRAD_HARNESS_SANITIZE=thread) reports them.
 */

template <int SYNC>
__global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
    // x (rows, n), out (rows,); blockDim.x a power of 2, one block per row
    __shared__ float partial[1024];
    const float* row = x + (size_t)blockIdx.x * n;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += row[i];
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        if (SYNC) __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

__device__ __forceinline__ float warp_reduce(float v) {
    for (int off = 16; off >= 4; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    // finish with butterflies: every lane ends with the lane-group's total in lane 0
    for (int off = 2; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

extern "C" __global__ void warp_sum(const double* __restrict__ x, double* __restrict__ out, int rows, int n) {
    // x (rows, n), out (rows,); blockDim (32, warps); one warp per row
    int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;   // the whole warp leaves together
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += 32) acc += x[(size_t)row * n + i];
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    float f = warp_reduce((float)threadIdx.x);   // 0 + 1 + ... + 31 = 496 in lane 0
    if (threadIdx.x == 0) out[row] = acc + (f == 496.0f ? 0.0 : 1e30);
}

extern "C" __global__ void reverse_dyn(const float* __restrict__ x, float* __restrict__ y, int n) {
    // x, y (n,); each block reverses its chunk of blockDim.x elements; shared_mem = blockDim.x floats
    extern __shared__ float chunk[];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    chunk[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
    if (j < n) y[j] = chunk[threadIdx.x];
}

extern "C" __global__ void votes(const int* __restrict__ flags, unsigned* __restrict__ out) {
    // flags (blockDim.x,), out (blockDim.x / 32 * 3 + 1,); one block
    int t = threadIdx.x, w = t / 32;
    int p = flags[t];
    unsigned ballot = __ballot_sync(0xffffffffu, p);
    int all = __all_sync(0xffffffffu, p);
    int any = __any_sync(0xffffffffu, p);
    int count = __syncthreads_count(p);
    if (t % 32 == 0) {
        out[3 * w] = ballot;
        out[3 * w + 1] = all;
        out[3 * w + 2] = any;
    }
    if (t == 0) out[3 * (blockDim.x / 32)] = count;
}

extern "C" __global__ void scale_inplace(float* x, const float* x_again, double s, long long n) {
    // x (n,), x_again the same array; x *= s
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) x[i] = (float)(x_again[i] * s);
}

extern "C" __global__ void oob_write(float* out, int n) {
    // out (n,): the bound is off by one on purpose
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

extern "C" __global__ void dyn_smem_overrun(float* out) {
    // shared_mem = blockDim.x floats; reads chunk[blockDim.x]
    extern __shared__ float chunk[];
    chunk[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = chunk[threadIdx.x + 1];
}

extern "C" __global__ void misaligned_float4(const float* x, float* out) {
    // x (8,), out (4,): a float4 read at x + 1 is misaligned on a GPU too
    float4 v = reinterpret_cast<const float4*>(x + 1)[0];
    if (threadIdx.x == 0) { out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w; }
}

extern "C" __global__ void warp_deadlock(float* out) {
    // one warp
    float v = threadIdx.x;
    if (threadIdx.x < 16) __syncthreads();
    else v = __shfl_sync(0xffffffffu, v, 0);
    out[threadIdx.x] = v;
}

extern "C" __global__ void atomic_hist(const int* __restrict__ bins, int n, int* __restrict__ hist) {
    // bins (n,) in [0, nbins); hist (nbins,) zeroed by the caller
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(&hist[bins[i]], 1);
}

extern "C" __global__ void bad_mask(float* out) {
    // one warp; lane 3 names only lanes 0-1
    float v = __shfl_sync(threadIdx.x == 3 ? 0x3u : 0xffffffffu, (float)threadIdx.x, 0);
    out[threadIdx.x] = v;
}

extern "C" __global__ void uninit_shared(float* out) {
    // grid (blocks,), block (32,): every block reads its scratch before writing it, so it
    // must see garbage (the harness fills shared memory with NaN at every block start),
    // not the value the previous block left there.
    __shared__ float scratch[32];
    float seen = scratch[threadIdx.x];
    __syncthreads();
    scratch[threadIdx.x] = 1.0f;
    out[blockIdx.x * 32 + threadIdx.x] = seen;
}

extern "C" __global__ void shared_index_bug(const float* __restrict__ x, float* __restrict__ y, int n) {
    // x, y (n,), block (64,): y = x shifted by one within the block through shared memory,
    // but the read index is off by one (tile[t + 1] instead of tile[t]) - a wrong index
    // must give a wrong result.
    __shared__ float tile[65];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (i < n) y[i] = tile[threadIdx.x + 1];
}

template <int SYNC>
__global__ void cross_warp(float* __restrict__ out) {
    // grid (blocks,), block (n,), n a multiple of 32: out[b * n + t] = n - 1 - t, read from
    // shared memory that thread n - 1 - t (another warp) stored. __syncwarp (SYNC=0) orders
    // the lanes of one warp only: a race.
    __shared__ float v[1024];
    const int t = threadIdx.x, n = blockDim.x;
    v[t] = (float)t;
    if (SYNC) __syncthreads(); else __syncwarp();
    out[blockIdx.x * n + t] = v[n - 1 - t];
}

template <int SYNC>
__global__ void lane_exchange(float* __restrict__ out) {
    // block (32,): out[l] = (31 - l) + (l ^ 1), the first term through shared memory. CUDA
    // promises memory ordering for __syncwarp, not for shuffles: without it (SYNC=0) the
    // load races with the other lane's store.
    __shared__ float v[32];
    const int lane = threadIdx.x;
    v[lane] = (float)lane;
    const float w = __shfl_xor_sync(0xffffffffu, (float)lane, 1);
    if (SYNC) __syncwarp();
    out[lane] = v[31 - lane] + w;
}

extern "C" __global__ void divergent_barrier(float* out) {
    // block (64,): the first warp and the second reach different barriers (undefined in CUDA).
    if (threadIdx.x < 32) {
        out[threadIdx.x] = 1.0f;
        __syncthreads();
    } else {
        out[threadIdx.x] = 2.0f;
        __syncthreads();
    }
}
