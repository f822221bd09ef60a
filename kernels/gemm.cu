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
                                          thread GEMM_TM x GEMM_TN outputs in registers;
                                          VEC = 1 reads 16-byte vectors (the launcher
                                          checks alignment and leading dimensions).
   Indices into A, B, C are 64-bit; M, N, K are each below 2^31 (the launcher checks).

   CUDA features used: __global__, __device__ __forceinline__, static __shared__ arrays,
   __syncthreads, float4/double2 loads, #pragma unroll, templates, static_assert,
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

// Copy the ROWS x GEMM_BK tile of op(X) whose corner is (r0, k0) into S[k][r], zero outside
// the R x K matrix. X is stored (R, K) when K_CONTIG, else (K, R). Consecutive threads read
// consecutive addresses of the contiguous dimension (coalesced). With VEC, each thread reads
// a 16-byte vector along the contiguous dimension: the launcher guarantees that X is 16-byte
// aligned and that the contiguous extent (K or R) is a multiple of the vector width, so a
// vector is either wholly inside the matrix or wholly outside it.
template <typename T, int ROWS, bool K_CONTIG, bool VEC>
__device__ __forceinline__ void load_tile(T (*S)[ROWS + GEMM_PAD], const T* __restrict__ X,
                                          long long r0, long long k0, long long R, long long K, int tid) {
    const int W = VEC ? (int)Vec16<T>::width : 1;
    const int per_line = K_CONTIG ? GEMM_BK / W : ROWS / W;       // vectors per contiguous line
    const int count = ROWS * GEMM_BK / W;
#pragma unroll
    for (int it = 0; it < (count + GEMM_THREADS - 1) / GEMM_THREADS; ++it) {
        const int e = tid + it * GEMM_THREADS;
        if (e >= count) break;
        const int line = e / per_line, pos = (e % per_line) * W;
        const int r = K_CONTIG ? line : pos, k = K_CONTIG ? pos : line;
        const long long gr = r0 + r, gk = k0 + k;
        T v[VEC ? Vec16<T>::width : 1];
        if (gr < R && gk < K) {
            if (VEC) {
                const long long off = K_CONTIG ? gr * K + gk : gk * R + gr;
                Vec16<T>::unpack(*reinterpret_cast<const typename Vec16<T>::type*>(X + off), v);
            } else {
                v[0] = load_op<T, K_CONTIG>(X, gr, gk, R, K);
            }
        } else {
#pragma unroll
            for (int q = 0; q < W; ++q) v[q] = T(0);
        }
#pragma unroll
        for (int q = 0; q < W; ++q) {
            if (K_CONTIG) S[k + q][r] = v[q];
            else S[k][r + q] = v[q];
        }
    }
}

template <typename T, int TA, int TB, int EPI, int VEC>
__global__ void gemm_tiled(const T* __restrict__ A, const T* __restrict__ B,
                           const T* __restrict__ bias, T* __restrict__ C, int M, int N, int K) {
    // C (M,N) = epi(op(A) (M,K) op(B) (K,N)); block GEMM_THREADS; grid (ceil(M/GEMM_BM), ceil(N/GEMM_BN)).
    __shared__ T As[GEMM_BK][GEMM_BM + GEMM_PAD];   // As[k][m] = op(A)[m0 + m][k0 + k]
    __shared__ T Bs[GEMM_BK][GEMM_BN + GEMM_PAD];   // Bs[k][n] = op(B)[k0 + k][n0 + n]
    const int tid = threadIdx.x;
    const int TX = GEMM_BN / GEMM_TN, TY = GEMM_BM / GEMM_TM;   // thread grid over the tile
    const int tx = tid % TX, ty = tid / TX;
    const long long m0 = (long long)blockIdx.x * GEMM_BM, n0 = (long long)blockIdx.y * GEMM_BN;
    // Thread (ty, tx) owns rows m0 + ty + i*TY and columns n0 + tx + j*TX: strided ownership
    // makes both shared-memory reads conflict-free and the final stores coalesced.
    T acc[GEMM_TM][GEMM_TN];
#pragma unroll
    for (int i = 0; i < GEMM_TM; ++i)
#pragma unroll
        for (int j = 0; j < GEMM_TN; ++j) acc[i][j] = T(0);

    for (long long k0 = 0; k0 < K; k0 += GEMM_BK) {
        load_tile<T, GEMM_BM, !TA, VEC != 0>(As, A, m0, k0, M, K, tid);
        load_tile<T, GEMM_BN, TB != 0, VEC != 0>(Bs, B, n0, k0, N, K, tid);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < GEMM_BK; ++k) {
            T a[GEMM_TM], b[GEMM_TN];
#pragma unroll
            for (int i = 0; i < GEMM_TM; ++i) a[i] = As[k][ty + i * TY];
#pragma unroll
            for (int j = 0; j < GEMM_TN; ++j) b[j] = Bs[k][tx + j * TX];
#pragma unroll
            for (int i = 0; i < GEMM_TM; ++i)
#pragma unroll
                for (int j = 0; j < GEMM_TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < GEMM_TM; ++i) {
        const long long m = m0 + ty + i * TY;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < GEMM_TN; ++j) {
            const long long n = n0 + tx + j * TX;
            if (n < N) C[m * N + n] = epilogue<T, EPI>(acc[i][j], bias, n);
        }
    }
}
