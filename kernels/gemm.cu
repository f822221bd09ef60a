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
     gemm_tiled<T, Tile, TA, TB, EPI, VEC>
                                          Tile = GemmTile<BM, BN, BK, TM, TN, MIN_BLOCKS>:
                                          BM x BN block tile, BK deep, each thread TM x TN
                                          outputs in registers, double-buffered shared tiles
                                          (the next tile's global loads overlap the
                                          multiply), 16-byte shared reads; VEC = 1 also
                                          reads global memory in 16-byte vectors (the
                                          launcher checks alignment and leading dimensions).
                                          Split-K: block z sums k in [z*k_split, (z+1)*k_split)
                                          and writes its partial product to C + z*M*N.
     gemm_split_sum<T, EPI>               C = epi(sum over z of the partial products), z in
                                          order: the second pass of a split-K product
                                          (deterministic: no atomics).
   Indices into A, B, C are 64-bit; M, N, K are each below 2^31 (the launcher checks).
   Which tile and how many K splits a product gets is decided by the launcher
   (cugrad/backends/cuda/config.py, gemm_plan): small outputs take the smaller tile and
   split K so that the grid still covers the GPU, and any K past GEMM_MAX_K_PER_SPLIT (2^17)
   is split whatever the output, so no thread sums more products than that in its register
   (a float32 running sum of 2^20 same-sign products is 1.4e-4 off: MATH.md §7).
   gemm_reference sums the whole K in one thread: a test reference for short K only.

   CUDA features used: __global__, __device__ __forceinline__, static __shared__ arrays,
   __syncthreads, __align__, __launch_bounds__ (template-dependent), float4/double2 loads,
   #pragma unroll, templates, static_assert,
   expf/exp, tanhf/tanh, fabsf/fabs (through common.cuh).
*/
#include "common.cuh"

#define CUGRAD_EPI_BIAS 4

#ifndef GEMM_REF_TILE
#define GEMM_REF_TILE 16
#endif

// Shared tiles are stored k-major, S[k][row]; the padding keeps the transposing stores
// of the K-contiguous loads free of bank conflicts (row stride = 4 banks apart).
#define GEMM_PAD 4

// gemm_tiled's tunables (the table of them is GEMM_TILES in cugrad/backends/cuda/config.py):
// a BM x BN block tile, BK deep, TM x TN outputs per thread; MIN_BLOCKS is the resident blocks
// per SM asked of the compiler for the 16-byte-vector variants (it caps their registers).
template <int BM_, int BN_, int BK_, int TM_, int TN_, int MIN_BLOCKS_>
struct GemmTile {
    enum { BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_, MIN_BLOCKS = MIN_BLOCKS_,
           THREADS = (BM_ / TM_) * (BN_ / TN_) };
    static_assert(BM_ % TM_ == 0 && BN_ % TN_ == 0, "tile must split into thread tiles");
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "threads per block: whole warps, at most 1024");
    static_assert(BK_ % 4 == 0 && BM_ % 4 == 0 && BN_ % 4 == 0, "16-byte vectors must tile the block");
};

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

// One thread's share of a ROWS x Tile::BK tile of op(X), held in registers between its
// global load (fetch_tile) and its shared-memory store (stash_tile), so that the next tile's
// loads are in flight while the current tile is multiplied. With VEC each element is a
// 16-byte vector along the stored contiguous dimension.
template <typename T, typename Tile, int ROWS, bool VEC>
struct TileRegs {
    enum {
        W = VEC ? (int)Vec16<T>::width : 1,
        COUNT = ROWS * Tile::BK / W,                                  // vectors in the tile
        PER_THREAD = (COUNT + Tile::THREADS - 1) / Tile::THREADS,
    };
    T v[PER_THREAD][W];
};

// Position of the thread's it-th vector in the tile: op(X) row r and column k (tile-relative).
// X is stored (R, K) when K_CONTIG, else (K, R); consecutive threads take consecutive vectors
// along the contiguous dimension, so a warp's loads are coalesced.
template <typename Tile, int ROWS, bool K_CONTIG, int W>
__device__ __forceinline__ void tile_position(int e, int& r, int& k) {
    const int per_line = K_CONTIG ? Tile::BK / W : ROWS / W;        // vectors per stored line
    const int line = e / per_line, pos = (e % per_line) * W;
    r = K_CONTIG ? line : pos;
    k = K_CONTIG ? pos : line;
}

// Global -> registers: the tile whose corner is (r0, k0), zero outside the R x K matrix. With
// VEC the launcher guarantees that X is 16-byte aligned and that the contiguous extent (K or R)
// is a multiple of the vector width, so a vector is either wholly inside or wholly outside.
template <typename T, typename Tile, int ROWS, bool K_CONTIG, bool VEC>
__device__ __forceinline__ void fetch_tile(TileRegs<T, Tile, ROWS, VEC>& t, const T* __restrict__ X,
                                           long long r0, long long k0, long long R, long long K, int tid) {
    typedef TileRegs<T, Tile, ROWS, VEC> Regs;
#pragma unroll
    for (int it = 0; it < Regs::PER_THREAD; ++it) {
        const int e = tid + it * Tile::THREADS;
        int r, k;
        tile_position<Tile, ROWS, K_CONTIG, Regs::W>(e, r, k);
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
template <typename T, typename Tile, int ROWS, bool K_CONTIG, bool VEC>
__device__ __forceinline__ void stash_tile(T (*S)[ROWS + GEMM_PAD], const TileRegs<T, Tile, ROWS, VEC>& t, int tid) {
    typedef TileRegs<T, Tile, ROWS, VEC> Regs;
#pragma unroll
    for (int it = 0; it < Regs::PER_THREAD; ++it) {
        const int e = tid + it * Tile::THREADS;
        if (Regs::COUNT % Tile::THREADS != 0 && e >= Regs::COUNT) break;
        int r, k;
        tile_position<Tile, ROWS, K_CONTIG, Regs::W>(e, r, k);
#pragma unroll
        for (int q = 0; q < Regs::W; ++q) {
            if (K_CONTIG) S[k + q][r] = t.v[it][q];
            else S[k][r + q] = t.v[it][q];
        }
    }
}

template <typename T, typename Tile, int TA, int TB, int EPI, int VEC>
__global__ void __launch_bounds__(Tile::THREADS, VEC ? Tile::MIN_BLOCKS : 1)
gemm_tiled(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ bias,
           T* __restrict__ C, int M, int N, int K, int k_split) {
    // C (M,N) = epi(op(A) (M,K) op(B) (K,N)); block Tile::THREADS; grid (ceil(M/BM), ceil(N/BN),
    // splits). Block z sums k in [z*k_split, min(K, (z+1)*k_split)) (k_split a multiple of BK,
    // = K without split) and writes C + z*M*N (the launcher passes EPI = 0 when splitting).
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
    enum { BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, TM = Tile::TM, TN = Tile::TN };
    const int V = Vec16<T>::width;
    const int TX = BN / TN, TY = BM / TM;                       // thread grid over the tile
    static_assert(TM % Vec16<T>::width == 0 && TN % Vec16<T>::width == 0,
                  "thread tiles must be whole 16-byte vectors");
    static_assert((BM + GEMM_PAD) * sizeof(T) % 16 == 0 && (BN + GEMM_PAD) * sizeof(T) % 16 == 0,
                  "shared rows must keep 16-byte alignment");
    __shared__ __align__(16) T As[2][BK][BM + GEMM_PAD];   // As[b][k][m] = op(A)[m0 + m][k0 + k]
    __shared__ __align__(16) T Bs[2][BK][BN + GEMM_PAD];   // Bs[b][k][n] = op(B)[k0 + k][n0 + n]
    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;
    const long long m0 = (long long)blockIdx.x * BM, n0 = (long long)blockIdx.y * BN;
    const long long k_begin = (long long)blockIdx.z * k_split;
    const long long k_end = k_begin + k_split < K ? k_begin + k_split : (long long)K;
    C += (long long)blockIdx.z * M * N;

    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    // The tiles of [k_begin, k_end) lie wholly inside it: k_split is a multiple of BK.
    TileRegs<T, Tile, BM, VEC != 0> ra;
    TileRegs<T, Tile, BN, VEC != 0> rb;
    fetch_tile<T, Tile, BM, !TA, VEC != 0>(ra, A, m0, k_begin, M, K, tid);
    fetch_tile<T, Tile, BN, TB != 0, VEC != 0>(rb, B, n0, k_begin, N, K, tid);
    stash_tile<T, Tile, BM, !TA, VEC != 0>(As[0], ra, tid);
    stash_tile<T, Tile, BN, TB != 0, VEC != 0>(Bs[0], rb, tid);
    __syncthreads();

    int buf = 0;
    for (long long k0 = k_begin; k0 < k_end; k0 += BK) {
        const bool more = k0 + BK < k_end;
        if (more) {                                   // next tile: loads in flight during the multiply
            fetch_tile<T, Tile, BM, !TA, VEC != 0>(ra, A, m0, k0 + BK, M, K, tid);
            fetch_tile<T, Tile, BN, TB != 0, VEC != 0>(rb, B, n0, k0 + BK, N, K, tid);
        }
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            T a[TM], b[TN];
#pragma unroll
            for (int g = 0; g < TM / V; ++g)
                Vec16<T>::unpack(*reinterpret_cast<const typename Vec16<T>::type*>(&As[buf][k][g * TY * V + ty * V]), a + g * V);
#pragma unroll
            for (int h = 0; h < TN / V; ++h)
                Vec16<T>::unpack(*reinterpret_cast<const typename Vec16<T>::type*>(&Bs[buf][k][h * TX * V + tx * V]), b + h * V);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        if (more) {                                   // the other buffer was last read before the previous barrier
            stash_tile<T, Tile, BM, !TA, VEC != 0>(As[buf ^ 1], ra, tid);
            stash_tile<T, Tile, BN, TB != 0, VEC != 0>(Bs[buf ^ 1], rb, tid);
        }
        __syncthreads();
        buf ^= 1;
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const long long m = m0 + (i / V) * TY * V + ty * V + i % V;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const long long n = n0 + (j / V) * TX * V + tx * V + j % V;
            if (n < N) C[m * N + n] = epilogue<T, EPI>(acc[i][j], bias, n);
        }
    }
}

template <typename T, int EPI>
__global__ void gemm_split_sum(const T* __restrict__ P, const T* __restrict__ bias, T* __restrict__ C,
                               long long MN, int N, int splits) {
    // C (M,N) = epi(sum_z P[z] (M,N)), z = 0..splits-1 in order; grid-stride over the M*N outputs.
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < MN;
         i += (long long)gridDim.x * blockDim.x) {
        T acc = P[i];
        for (int z = 1; z < splits; ++z) acc += P[z * MN + i];
        C[i] = epilogue<T, EPI>(acc, bias, i % N);
    }
}
