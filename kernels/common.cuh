/* common.cuh: small device helpers shared by the kernel files (MATH.md §3 activations).

   Included as `#include "common.cuh"`: nvcc and host compilers resolve it next to the
   including file; for NVRTC the cugrad loader (cugrad/backends/cuda/loader.py) pastes
   this text in place of the include line. It must therefore stay self-contained: no
   system headers, no include guards needed beyond the one below.

   CUDA features used: __device__ __forceinline__, templates, float4/double2,
   __shfl_xor_sync (full mask), expf/exp, tanhf/tanh, logf/log, log1pf/log1p, sqrtf/sqrt, fabsf/fabs,
   fmaxf/fmax.

   Float/double overloads (dexp, dlog, ...) keep every kernel a template over T without
   relying on C++ overloads of the C math functions, which a host shim may lack.
*/
#ifndef CUGRAD_COMMON_CUH
#define CUGRAD_COMMON_CUH

// Activation codes, shared with cugrad/backends/cuda/config.py (ACTIVATIONS).
#define CUGRAD_ACT_NONE 0
#define CUGRAD_ACT_SIGMOID 1
#define CUGRAD_ACT_TANH 2
#define CUGRAD_ACT_RELU 3

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return log1p(x); }
__device__ __forceinline__ float dtanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dtanh(double x) { return tanh(x); }
__device__ __forceinline__ float dsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dsqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dabs(float x) { return fabsf(x); }
__device__ __forceinline__ double dabs(double x) { return fabs(x); }
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

// A quiet NaN of type T, for results that have no meaning (an out-of-range class index).
template <typename T>
__device__ __forceinline__ T quiet_nan() { return dsqrt(T(-1)); }

// sigmoid without overflow: e = exp(-|x|) <= 1, so neither branch overflows for any x.
template <typename T>
__device__ __forceinline__ T sigmoid_of(T x) {
    const T e = dexp(-dabs(x));
    return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

// relu as numpy.maximum(x, 0): NaN propagates (NaN <= 0 is false), -0.0 becomes +0.0 (and,
// under CuPy's -ftz=true, so does a float32 subnormal of either sign, never a negative).
template <typename T>
__device__ __forceinline__ T relu_of(T x) { return x <= T(0) ? T(0) : x; }

template <typename T, int ACT>
__device__ __forceinline__ T activate(T x) {
    if (ACT == CUGRAD_ACT_SIGMOID) return sigmoid_of(x);
    if (ACT == CUGRAD_ACT_TANH) return dtanh(x);
    if (ACT == CUGRAD_ACT_RELU) return relu_of(x);
    return x;
}

// dL/dy from dL/dz and the saved forward output z = f(y) (MATH.md §3).
template <typename T, int ACT>
__device__ __forceinline__ T activate_backward(T grad_out, T z) {
    if (ACT == CUGRAD_ACT_SIGMOID) return grad_out * (z * (T(1) - z));
    if (ACT == CUGRAD_ACT_TANH) return grad_out * ((T(1) - z) * (T(1) + z));  // no cancellation near |z| = 1
    if (ACT == CUGRAD_ACT_RELU) return z > T(0) ? grad_out : T(0);
    return grad_out;
}

// 16-byte vector type of T: 4 floats or 2 doubles.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
    typedef float4 type;
    enum { width = 4 };
    static __device__ __forceinline__ void unpack(const float4 v, float* out) {
        out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
    }
};
template <> struct Vec16<double> {
    typedef double2 type;
    enum { width = 2 };
    static __device__ __forceinline__ void unpack(const double2 v, double* out) {
        out[0] = v.x; out[1] = v.y;
    }
};

// Sum over the 32 lanes of a warp, same order on every run; every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Kahan's compensated running sum: s += v, with c carrying what the additions rounded away
// (the sum is s - c). An infinite or NaN sum leaves c at 0, so inf stays inf (inf - inf in
// the compensation would turn it into NaN) and NaN stays NaN.
template <typename T>
__device__ __forceinline__ void kahan_add(T& s, T& c, T v) {
    const T y = v - c;
    const T t = s + y;
    c = (t - t == T(0)) ? (t - s) - y : T(0);      // t - t == 0: t is finite
    s = t;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = dmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

#endif  // CUGRAD_COMMON_CUH
