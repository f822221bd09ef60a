/* gemm.cu: C = act(op(A) op(B) + bias)   (MATH.md §1 products, §2 linear layer, §3 act)

   Shapes (row-major, every operand C-contiguous):
     op(A) is M x K: A is (M, K), or (K, M) read transposed when TA = 1
     op(B) is K x N: B is (K, N), or (N, K) read transposed when TB = 1
     bias  is (N,) (added to every row), read only when EPI has CUGRAD_EPI_BIAS
     C     is (M, N)
   The four layouts serve every gradient of MATH.md §1-2: forward NT (Y = X Wᵀ + b),
   dX = dY W (NN), dW = dYᵀ X (TN); matmul's TT too. Operands are never transposed in
   memory: the tile loaders read them in place.

   EPI = act | (bias ? CUGRAD_EPI_BIAS : 0), act one of CUGRAD_ACT_* (common.cuh).

   Kernels:
     gemm_reference<T, TA, TB, EPI>       one output per thread, GEMM_REF_TILE² tiles in
                                          shared memory; the simple GPU-side reference.
     gemm_tiled<T, TA, TB, EPI, VEC>      GEMM_BM x GEMM_BN block tile, GEMM_BK deep, each
                                          thread GEMM_TM x GEMM_TN outputs in registers,
                                          double-buffered shared tiles (the next tile's
                                          global loads overlap the multiply), 16-byte
                                          shared reads; VEC = 1 also reads global memory in
                                          16-byte vectors (the launcher checks alignment
                                          and leading dimensions).
   Indices into A, B, C are 64-bit; M, N, K are each below 2^31 (the launcher checks).

   CUDA features used: __global__, __device__ __forceinline__, static __shared__ arrays,
   __syncthreads, __align__, float4/double2 loads, #pragma unroll, templates, static_assert,
   expf/exp, tanhf/tanh, fabsf/fabs (through common.cuh).
*/
#include "common.cuh"

#define CUGRAD_EPI_BIAS 4

// Tunables (defaults; the loader sets them from cugrad/backends/cuda/config.py).
#ifndef GEMM_BM
#define GEMM_BM 128
#endif
#ifndef GEMM_BN
#define GEMM_BN 128
#endif
#ifndef GEMM_BK
#define GEMM_BK 8
#endif
#ifndef GEMM_TM
#define GEMM_TM 8
#endif
#ifndef GEMM_TN
#define GEMM_TN 8
#endif
#ifndef GEMM_MIN_BLOCKS            // resident blocks per SM asked of the compiler (VEC = 1 only)
#define GEMM_MIN_BLOCKS 1
#endif
#ifndef GEMM_REF_TILE
#define GEMM_REF_TILE 16
#endif

#define GEMM_THREADS ((GEMM_BM / GEMM_TM) * (GEMM_BN / GEMM_TN))
// Shared tiles are stored k-major, S[k][row]; the padding keeps the transposing stores
// of the K-contiguous loads free of bank conflicts (row stride = 4 banks apart).
#define GEMM_PAD 4

static_assert(GEMM_BM % GEMM_TM == 0 && GEMM_BN % GEMM_TN == 0, "tile must split into thread tiles");
static_assert(GEMM_THREADS % 32 == 0 && GEMM_THREADS <= 1024, "threads per block: whole warps, at most 1024");
static_assert(GEMM_BK % 4 == 0 && GEMM_BM % 4 == 0 && GEMM_BN % 4 == 0, "16-byte vectors must tile the block");

// op(A)[r][k] for a row-major operand stored as (R, K) (K_CONTIG) or (K, R).
template <typename T, bool K_CONTIG>
__device__ __forceinline__ T load_op(const T* __restrict__ X, long long r, long long k, long long R, long long K) {
    return K_CONTIG ? X[r * K + k] : X[k * R + r];
}

template <typename T, int EPI>
__device__ __forceinline__ T epilogue(T acc, const T* __restrict__ bias, long long n) {
    if (EPI & CUGRAD_EPI_BIAS) acc += bias[n];
    return activate<T, (EPI & 3)>(acc);
}

template <typename T, int TA, int TB, int EPI>
__global__ void gemm_reference(const T* __restrict__ A, const T* __restrict__ B,
                               const T* __restrict__ bias, T* __restrict__ C, int M, int N, int K) {
    // C (M,N) = epi(op(A) (M,K) op(B) (K,N)); block (REF_TILE, REF_TILE); grid (ceil(M/REF_TILE), ceil(N/REF_TILE)).
    __shared__ T As[GEMM_REF_TILE][GEMM_REF_TILE + 1];   // As[m][k]
    __shared__ T Bs[GEMM_REF_TILE][GEMM_REF_TILE + 1];   // Bs[k][n]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long m = (long long)blockIdx.x * GEMM_REF_TILE + ty;
    const long long n = (long long)blockIdx.y * GEMM_REF_TILE + tx;
    T acc = T(0);
    for (long long k0 = 0; k0 < K; k0 += GEMM_REF_TILE) {
        const long long ka = k0 + tx, kb = k0 + ty;
        As[ty][tx] = (m < M && ka < K) ? load_op<T, !TA>(A, m, ka, M, K) : T(0);
        Bs[ty][tx] = (n < N && kb < K) ? load_op<T, TB != 0>(B, n, kb, N, K) : T(0);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < GEMM_REF_TILE; ++k) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();
    }
    if (m < M && n < N) C[m * N + n] = epilogue<T, EPI>(acc, bias, n);
}

// One thread's share of a ROWS x GEMM_BK tile of op(X), held in registers between its
// global load (fetch_tile) and its shared-memory store (stash_tile), so that the next tile's
// loads are in flight while the current tile is multiplied. With VEC each element is a
// 16-byte vector along the stored contiguous dimension.
template <typename T, int ROWS, bool VEC>
struct TileRegs {
    enum {
        W = VEC ? (int)Vec16<T>::width : 1,
        COUNT = ROWS * GEMM_BK / W,                                  // vectors in the tile
        PER_THREAD = (COUNT + GEMM_THREADS - 1) / GEMM_THREADS,
    };
    T v[PER_THREAD][W];
};

// Position of the thread's it-th vector in the tile: op(X) row r and column k (tile-relative).
// X is stored (R, K) when K_CONTIG, else (K, R); consecutive threads take consecutive vectors
// along the contiguous dimension, so a warp's loads are coalesced.
template <int ROWS, bool K_CONTIG, int W>
__device__ __forceinline__ void tile_position(int e, int& r, int& k) {
    const int per_line = K_CONTIG ? GEMM_BK / W : ROWS / W;         // vectors per stored line
    const int line = e / per_line, pos = (e % per_line) * W;
    r = K_CONTIG ? line : pos;
    k = K_CONTIG ? pos : line;
}

// Global -> registers: the tile whose corner is (r0, k0), zero outside the R x K matrix. With
// VEC the launcher guarantees that X is 16-byte aligned and that the contiguous extent (K or R)
// is a multiple of the vector width, so a vector is either wholly inside or wholly outside.
template <typename T, int ROWS, bool K_CONTIG, bool VEC>
__device__ __forceinline__ void fetch_tile(TileRegs<T, ROWS, VEC>& t, const T* __restrict__ X,
                                           long long r0, long long k0, long long R, long long K, int tid) {
    typedef TileRegs<T, ROWS, VEC> Regs;
#pragma unroll
    for (int it = 0; it < Regs::PER_THREAD; ++it) {
        const int e = tid + it * GEMM_THREADS;
        int r, k;
        tile_position<ROWS, K_CONTIG, Regs::W>(e, r, k);
        const long long gr = r0 + r, gk = k0 + k;
        if (e < Regs::COUNT && gr < R && gk < K) {
            if (VEC) {
                const long long off = K_CONTIG ? gr * K + gk : gk * R + gr;
                Vec16<T>::unpack(*reinterpret_cast<const typename Vec16<T>::type*>(X + off), t.v[it]);
            } else {
                t.v[it][0] = load_op<T, K_CONTIG>(X, gr, gk, R, K);
            }
        } else {
#pragma unroll
            for (int q = 0; q < Regs::W; ++q) t.v[it][q] = T(0);
        }
    }
}

// Registers -> shared, k-major: S[k][r] = op(X)[r0 + r][k0 + k].
template <typename T, int ROWS, bool K_CONTIG, bool VEC>
__device__ __forceinline__ void stash_tile(T (*S)[ROWS + GEMM_PAD], const TileRegs<T, ROWS, VEC>& t, int tid) {
    typedef TileRegs<T, ROWS, VEC> Regs;
#pragma unroll
    for (int it = 0; it < Regs::PER_THREAD; ++it) {
        const int e = tid + it * GEMM_THREADS;
        if (Regs::COUNT % GEMM_THREADS != 0 && e >= Regs::COUNT) break;
        int r, k;
        tile_position<ROWS, K_CONTIG, Regs::W>(e, r, k);
#pragma unroll
        for (int q = 0; q < Regs::W; ++q) {
            if (K_CONTIG) S[k + q][r] = t.v[it][q];
            else S[k][r + q] = t.v[it][q];
        }
    }
}

template <typename T, int TA, int TB, int EPI, int VEC>
__global__ void __launch_bounds__(GEMM_THREADS, VEC ? GEMM_MIN_BLOCKS : 1) gemm_tiled(const T* __restrict__ A, const T* __restrict__ B,
                           const T* __restrict__ bias, T* __restrict__ C, int M, int N, int K) {
    // C (M,N) = epi(op(A) (M,K) op(B) (K,N)); block GEMM_THREADS; grid (ceil(M/GEMM_BM), ceil(N/GEMM_BN)).
    //
    // Two shared buffers: while the block multiplies tile t from one, each thread holds tile
    // t+1 in registers (loaded before the multiply, so the loads overlap it) and stores it into
    // the other; one barrier per k-tile.
    //
    // Thread (ty, tx) owns V-wide runs (V = one 16-byte vector of T) of rows and columns:
    // rows m0 + g*TY*V + ty*V + v and columns n0 + h*TX*V + tx*V + v, for g < TM/V, h < TN/V,
    // v < V. Its operands for one k are then TM/V + TN/V 16-byte shared loads; a warp's loads of
    // Bs[k] cover consecutive vectors (no bank conflict) and of As[k] at most two addresses
    // (broadcast).
    const int V = Vec16<T>::width;
    const int TX = GEMM_BN / GEMM_TN, TY = GEMM_BM / GEMM_TM;   // thread grid over the tile
    static_assert(GEMM_TM % Vec16<T>::width == 0 && GEMM_TN % Vec16<T>::width == 0,
                  "thread tiles must be whole 16-byte vectors");
    static_assert((GEMM_BM + GEMM_PAD) * sizeof(T) % 16 == 0 && (GEMM_BN + GEMM_PAD) * sizeof(T) % 16 == 0,
                  "shared rows must keep 16-byte alignment");
    __shared__ __align__(16) T As[2][GEMM_BK][GEMM_BM + GEMM_PAD];   // As[b][k][m] = op(A)[m0 + m][k0 + k]
    __shared__ __align__(16) T Bs[2][GEMM_BK][GEMM_BN + GEMM_PAD];   // Bs[b][k][n] = op(B)[k0 + k][n0 + n]
    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;
    const long long m0 = (long long)blockIdx.x * GEMM_BM, n0 = (long long)blockIdx.y * GEMM_BN;

    T acc[GEMM_TM][GEMM_TN];
#pragma unroll
    for (int i = 0; i < GEMM_TM; ++i)
#pragma unroll
        for (int j = 0; j < GEMM_TN; ++j) acc[i][j] = T(0);

    TileRegs<T, GEMM_BM, VEC != 0> ra;
    TileRegs<T, GEMM_BN, VEC != 0> rb;
    fetch_tile<T, GEMM_BM, !TA, VEC != 0>(ra, A, m0, 0, M, K, tid);
    fetch_tile<T, GEMM_BN, TB != 0, VEC != 0>(rb, B, n0, 0, N, K, tid);
    stash_tile<T, GEMM_BM, !TA, VEC != 0>(As[0], ra, tid);
    stash_tile<T, GEMM_BN, TB != 0, VEC != 0>(Bs[0], rb, tid);
    __syncthreads();

    int buf = 0;
    for (long long k0 = 0; k0 < K; k0 += GEMM_BK) {
        const bool more = k0 + GEMM_BK < K;
        if (more) {                                   // next tile: loads in flight during the multiply
            fetch_tile<T, GEMM_BM, !TA, VEC != 0>(ra, A, m0, k0 + GEMM_BK, M, K, tid);
            fetch_tile<T, GEMM_BN, TB != 0, VEC != 0>(rb, B, n0, k0 + GEMM_BK, N, K, tid);
        }
#pragma unroll
        for (int k = 0; k < GEMM_BK; ++k) {
            T a[GEMM_TM], b[GEMM_TN];
#pragma unroll
            for (int g = 0; g < GEMM_TM / V; ++g)
                Vec16<T>::unpack(*reinterpret_cast<const typename Vec16<T>::type*>(&As[buf][k][g * TY * V + ty * V]), a + g * V);
#pragma unroll
            for (int h = 0; h < GEMM_TN / V; ++h)
                Vec16<T>::unpack(*reinterpret_cast<const typename Vec16<T>::type*>(&Bs[buf][k][h * TX * V + tx * V]), b + h * V);
#pragma unroll
            for (int i = 0; i < GEMM_TM; ++i)
#pragma unroll
                for (int j = 0; j < GEMM_TN; ++j) acc[i][j] += a[i] * b[j];
        }
        if (more) {                                   // the other buffer was last read before the previous barrier
            stash_tile<T, GEMM_BM, !TA, VEC != 0>(As[buf ^ 1], ra, tid);
            stash_tile<T, GEMM_BN, TB != 0, VEC != 0>(Bs[buf ^ 1], rb, tid);
        }
        __syncthreads();
        buf ^= 1;
    }

#pragma unroll
    for (int i = 0; i < GEMM_TM; ++i) {
        const long long m = m0 + (i / V) * TY * V + ty * V + i % V;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < GEMM_TN; ++j) {
            const long long n = n0 + (j / V) * TX * V + tx * V + j % V;
            if (n < N) C[m * N + n] = epilogue<T, EPI>(acc[i][j], bias, n);
        }
    }
}
