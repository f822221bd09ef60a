// cuda_shim.h: what a kernels/*.cu file sees when the CPU harness compiles it with g++.
//
// Every CUDA thread of a block is a fiber; a block's fibers run on ONE OS thread and the
// blocks of a grid run one after another. Hence:
//   * `__shared__` is `thread_local`: block-scope `thread_local` has static storage, so one
//     copy is shared by all fibers of the block (= per block, since blocks do not overlap),
//     and `extern __shared__ T smem[]` becomes an `extern thread_local` declaration that the
//     module resolves to its dynamic shared-memory buffer (see cuh_runtime.h).
//   * threadIdx/blockIdx/blockDim/gridDim are plain globals that the scheduler rewrites on
//     every fiber switch.
//   * __syncthreads() and every warp-level intrinsic (shuffles, votes, __syncwarp) are
//     scheduling points: the fiber parks there until the participating threads have all
//     arrived, so they have real barrier semantics. Between scheduling points the threads
//     of a block run in a seeded pseudo-random order that changes at every phase, which
//     makes a missing barrier or a wrong shared-memory index produce wrong results.
// See tests/cuda_harness/README.md.
#pragma once

#include <cfloat>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <cmath>
#include <type_traits>

#define CUGRAD_CPU_HARNESS 1
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDACC_RTC__
#define __CUDACC_RTC__ 1   // the real loader compiles with NVRTC (cupy.RawModule)
#endif
// __CUDA_ARCH__ is deliberately NOT defined: code under `#if __CUDA_ARCH__ >= ...` is a
// device-specific path the harness does not claim to run (the test run lists such files).

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __grid_constant__

// ---------------------------------------------------------------- built-in types
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define CUH_VEC2(T, N, A) struct __attribute__((aligned(A))) N { T x, y; }; \
    static inline N make_##N(T x, T y) { N v; v.x = x; v.y = y; return v; }
#define CUH_VEC3(T, N) struct N { T x, y, z; }; \
    static inline N make_##N(T x, T y, T z) { N v; v.x = x; v.y = y; v.z = z; return v; }
#define CUH_VEC4(T, N, A) struct __attribute__((aligned(A))) N { T x, y, z, w; }; \
    static inline N make_##N(T x, T y, T z, T w) { N v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
CUH_VEC2(float, float2, 8)
CUH_VEC3(float, float3)
CUH_VEC4(float, float4, 16)
CUH_VEC2(double, double2, 16)
CUH_VEC3(double, double3)
CUH_VEC4(double, double4, 16)   // CUDA 13 spells the 32-byte one double4_32a; 16 is the legacy alignment
CUH_VEC2(int, int2, 8)
CUH_VEC4(int, int4, 16)
CUH_VEC2(unsigned int, uint2, 8)
CUH_VEC4(unsigned int, uint4, 16)
CUH_VEC2(long long, longlong2, 16)
CUH_VEC2(unsigned long long, ulonglong2, 16)
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
#undef CUH_VEC2
#undef CUH_VEC3
#undef CUH_VEC4

// ---------------------------------------------------------------- the runtime's hooks
namespace cuh {
enum WarpOp : int {
    W_SHFL_IDX, W_SHFL_UP, W_SHFL_DOWN, W_SHFL_XOR, W_BALLOT, W_ALL, W_ANY, W_SYNC,
    W_MATCH_ANY, W_REDUCE_ADD, W_REDUCE_MIN, W_REDUCE_MAX, W_REDUCE_AND, W_REDUCE_OR, W_REDUCE_XOR,
};
enum BlockSync : int { B_PLAIN, B_COUNT, B_AND, B_OR };
// Park the calling CUDA thread at a block barrier (the one at file:line); returns the
// count/and/or result.
int block_sync(int kind, int pred, const char* file, int line);
// Park at a warp-level operation over `mask`; returns this lane's result (raw bits).
unsigned long long warp_op(int op, unsigned mask, unsigned long long bits, int arg, int width, int is_signed);
unsigned active_mask();
[[noreturn]] void trap(const char* what);
unsigned long long clock_ticks();
}  // namespace cuh

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- synchronisation
// Macros, so that a barrier knows its source line: the threads of a block waiting at
// different __syncthreads (a barrier in divergent code, undefined behaviour in CUDA, which
// compute-sanitizer's synccheck reports) are a harness fault.
#define __syncthreads() ((void)cuh::block_sync(cuh::B_PLAIN, 0, __FILE__, __LINE__))
#define __syncthreads_count(p) cuh::block_sync(cuh::B_COUNT, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_and(p) cuh::block_sync(cuh::B_AND, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_or(p) cuh::block_sync(cuh::B_OR, (p) ? 1 : 0, __FILE__, __LINE__)
static inline void __syncwarp(unsigned mask = 0xffffffffu) { cuh::warp_op(cuh::W_SYNC, mask, 0, 0, 32, 0); }
static inline void __threadfence() {}
static inline void __threadfence_block() {}
static inline void __threadfence_system() {}
static inline unsigned __activemask() { return cuh::active_mask(); }
static inline void __nanosleep(unsigned) {}
[[noreturn]] static inline void __trap() { cuh::trap("__trap() called"); }
[[noreturn]] static inline void __brkpt() { cuh::trap("__brkpt() called"); }
static inline long long clock64() { return (long long)cuh::clock_ticks(); }
static inline long long __clock64() { return clock64(); }

namespace cuh {
template <class T> static inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp intrinsics move at most 8 trivially copyable bytes");
    unsigned long long b = 0; std::memcpy(&b, &v, sizeof(T)); return b;
}
template <class T> static inline T from_bits(unsigned long long b) {
    T v; std::memcpy(&v, &b, sizeof(T)); return v;
}
template <class T> static inline T shfl(int op, unsigned mask, T v, int arg, int width) {
    return from_bits<T>(warp_op(op, mask, to_bits(v), arg, width, 0));
}
}  // namespace cuh

template <class T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
    return cuh::shfl(cuh::W_SHFL_IDX, mask, v, src, width);
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return cuh::shfl(cuh::W_SHFL_UP, mask, v, (int)delta, width);
}
template <class T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return cuh::shfl(cuh::W_SHFL_DOWN, mask, v, (int)delta, width);
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    return cuh::shfl(cuh::W_SHFL_XOR, mask, v, lane_mask, width);
}
static inline unsigned __ballot_sync(unsigned mask, int p) { return (unsigned)cuh::warp_op(cuh::W_BALLOT, mask, p != 0, 0, 32, 0); }
static inline int __all_sync(unsigned mask, int p) { return (int)cuh::warp_op(cuh::W_ALL, mask, p != 0, 0, 32, 0); }
static inline int __any_sync(unsigned mask, int p) { return (int)cuh::warp_op(cuh::W_ANY, mask, p != 0, 0, 32, 0); }
template <class T> static inline unsigned __match_any_sync(unsigned mask, T v) {
    return (unsigned)cuh::warp_op(cuh::W_MATCH_ANY, mask, cuh::to_bits(v), 0, 32, 0);
}
static inline unsigned __reduce_add_sync(unsigned mask, unsigned v) { return (unsigned)cuh::warp_op(cuh::W_REDUCE_ADD, mask, v, 0, 32, 0); }
static inline int __reduce_add_sync(unsigned mask, int v) { return (int)cuh::warp_op(cuh::W_REDUCE_ADD, mask, (unsigned)v, 0, 32, 1); }
static inline unsigned __reduce_min_sync(unsigned mask, unsigned v) { return (unsigned)cuh::warp_op(cuh::W_REDUCE_MIN, mask, v, 0, 32, 0); }
static inline int __reduce_min_sync(unsigned mask, int v) { return (int)cuh::warp_op(cuh::W_REDUCE_MIN, mask, (unsigned)v, 0, 32, 1); }
static inline unsigned __reduce_max_sync(unsigned mask, unsigned v) { return (unsigned)cuh::warp_op(cuh::W_REDUCE_MAX, mask, v, 0, 32, 0); }
static inline int __reduce_max_sync(unsigned mask, int v) { return (int)cuh::warp_op(cuh::W_REDUCE_MAX, mask, (unsigned)v, 0, 32, 1); }
static inline unsigned __reduce_and_sync(unsigned mask, unsigned v) { return (unsigned)cuh::warp_op(cuh::W_REDUCE_AND, mask, v, 0, 32, 0); }
static inline unsigned __reduce_or_sync(unsigned mask, unsigned v) { return (unsigned)cuh::warp_op(cuh::W_REDUCE_OR, mask, v, 0, 32, 0); }
static inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) { return (unsigned)cuh::warp_op(cuh::W_REDUCE_XOR, mask, v, 0, 32, 0); }

// ---------------------------------------------------------------- atomics
// One OS thread runs a block and blocks run one after another, so any read-modify-write is
// atomic here; they are still function calls, so a fiber never switches inside one. They
// are written with GCC's __atomic built-ins (relaxed, as CUDA's atomics are) so that the
// ThreadSanitizer build (CUGRAD_HARNESS_SANITIZE=thread) sees atomics, not data races, and
// an atomic orders no other memory there, as on the GPU.
template <class T, class F> static inline T __cuh_rmw(T* p, F f) {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    T val = f(old);
    while (!__atomic_compare_exchange(p, &old, &val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) val = f(old);
    return old;
}
template <class T> static inline T __cuh_atomic_add(T* p, T v) { return __cuh_rmw(p, [v](T o) { return (T)(o + v); }); }
static inline float atomicAdd(float* p, float v) { return __cuh_atomic_add(p, v); }
static inline double atomicAdd(double* p, double v) { return __cuh_atomic_add(p, v); }
static inline int atomicAdd(int* p, int v) { return (int)__cuh_atomic_add((unsigned*)p, (unsigned)v); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __cuh_atomic_add(p, v); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __cuh_atomic_add(p, v); }
static inline float2 atomicAdd(float2* p, float2 v) {   // per component, as sm_90 does it
    return make_float2(atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y));
}
static inline float4 atomicAdd(float4* p, float4 v) {
    return make_float4(atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y), atomicAdd(&p->z, v.z), atomicAdd(&p->w, v.w));
}
template <class T> static inline T atomicSub(T* p, T v) { return __cuh_rmw(p, [v](T o) { return (T)(o - v); }); }
template <class T> static inline T atomicExch(T* p, T v) { return __cuh_rmw(p, [v](T) { return v; }); }
template <class T> static inline T atomicMax(T* p, T v) { return __cuh_rmw(p, [v](T o) { return v > o ? v : o; }); }
template <class T> static inline T atomicMin(T* p, T v) { return __cuh_rmw(p, [v](T o) { return v < o ? v : o; }); }
template <class T> static inline T atomicAnd(T* p, T v) { return __cuh_rmw(p, [v](T o) { return (T)(o & v); }); }
template <class T> static inline T atomicOr(T* p, T v) { return __cuh_rmw(p, [v](T o) { return (T)(o | v); }); }
template <class T> static inline T atomicXor(T* p, T v) { return __cuh_rmw(p, [v](T o) { return (T)(o ^ v); }); }
template <class T> static inline T atomicCAS(T* p, T cmp, T v) { return __cuh_rmw(p, [cmp, v](T o) { return o == cmp ? v : o; }); }
static inline unsigned atomicInc(unsigned* p, unsigned lim) {
    return __cuh_rmw(p, [lim](unsigned o) { return (o >= lim) ? 0u : o + 1u; });
}
#define CUH_SCOPED(name) template <class... A> static inline auto name##_block(A... a) { return name(a...); } \
                         template <class... A> static inline auto name##_system(A... a) { return name(a...); }
CUH_SCOPED(atomicAdd) CUH_SCOPED(atomicMax) CUH_SCOPED(atomicMin) CUH_SCOPED(atomicExch) CUH_SCOPED(atomicCAS)
#undef CUH_SCOPED

// ---------------------------------------------------------------- memory access
template <class T> static inline T __ldg(const T* p) { return *p; }
template <class T> static inline T __ldca(const T* p) { return *p; }
template <class T> static inline T __ldcg(const T* p) { return *p; }
template <class T> static inline T __ldcs(const T* p) { return *p; }
template <class T> static inline T __ldlu(const T* p) { return *p; }
template <class T> static inline T __ldcv(const T* p) { return *p; }
template <class T> static inline void __stwb(T* p, T v) { *p = v; }
template <class T> static inline void __stcg(T* p, T v) { *p = v; }
template <class T> static inline void __stcs(T* p, T v) { *p = v; }
template <class T> static inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------- math
// <math.h> gives the C functions and the float/double overloads in the global namespace.
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
// glibc already declares __expf, __logf, ... (its own internal names, same meaning):
// macros, so that they resolve to the public functions.
#define __expf(x) expf(x)
#define __exp10f(x) exp10f(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __powf(x, y) powf(x, y)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __sincosf(x, s, c) sincosf(x, s, c)
#define __tanhf(x) tanhf(x)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline double __drcp_rn(double x) { return 1.0 / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x != x ? 0.0f : x)); }
static inline float saturate(float x) { return __saturatef(x); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline int __double2int_rn(double x) { return (int)nearbyint(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
static inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
static inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
static inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
static inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
static inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
static inline int __mul24(int a, int b) { return a * b; }
static inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// CUDA's device min/max accept mixed arithmetic types in the global namespace.
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
static inline constexpr std::common_type_t<A, B> max(A a, B b) { return a > b ? a : b; }
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
static inline constexpr std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }

// math_constants.h
#define CUDART_INF_F __builtin_huge_valf()
#define CUDART_NAN_F __builtin_nanf("")
#define CUDART_INF __builtin_huge_val()
#define CUDART_NAN __builtin_nan("")
#define CUDART_PI_F 3.141592654f
#define CUDART_PI 3.1415926535897931e+0
