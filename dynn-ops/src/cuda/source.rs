//! CUDA C sources: the shared prelude and the [`CudaSource`] each op family declares.

/// One op family's CUDA C kernels, compiled with NVRTC on first use (after [`PRELUDE`]).
#[derive(Debug)]
pub struct CudaSource {
    /// The family's name (also the module's cache key).
    pub name: &'static str,
    /// The CUDA C source (kernels are `extern "C"`).
    pub code: &'static str,
    /// Whether the family also compiles for f16 and bf16 data: `scalar` is then the 16-bit
    /// storage type and `acc` (f32) the type its arithmetic runs in, loaded with `ld` and
    /// stored with `st`, as the CPU kernels compute half precision in f32.
    pub half: bool,
}

impl CudaSource {
    /// The full translation unit handed to NVRTC: prelude then the family's code.
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n// ---- {} ----\n{}", self.name, self.code)
    }
}

/// Helpers every kernel may use: element types, the strided-layout descriptor shared with the
/// host ([`crate::cuda::Strided`]), grid-stride loops and warp/block reductions.
pub const PRELUDE: &str = r#"
typedef long long i64;
typedef unsigned int u32;
typedef unsigned char u8;
#define DYNN_MAX_RANK 8

// A tensor view over a buffer: element offset, then dims and strides (in elements).
// contiguous != 0 means element i lives at offset + i.
struct Strided {
    int rank;
    int contiguous;
    i64 offset;
    i64 dims[DYNN_MAX_RANK];
    i64 strides[DYNN_MAX_RANK];
};

__device__ __forceinline__ i64 at(const Strided& s, i64 i) {
    if (s.contiguous) return s.offset + i;
    i64 off = s.offset;
    for (int d = s.rank - 1; d >= 0; --d) {
        i64 n = s.dims[d];
        i64 q = i / n;
        off += (i - q * n) * s.strides[d];
        i = q;
    }
    return off;
}

#define GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename T> __device__ __forceinline__ T warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <typename T> __device__ __forceinline__ T warp_min(T v) {
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reductions for blocks of up to 1024 threads; every thread gets the result.
template <typename T> __device__ T block_sum(T v) {
    __shared__ T shared[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    T r = lane < nw ? shared[lane] : (T)0;
    return warp_sum(r);
}
template <typename T> __device__ T block_max(T v, T lowest) {
    __shared__ T shared[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    T r = lane < nw ? shared[lane] : lowest;
    return warp_max(r);
}

__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }

// 16-bit floats as their bits (no cuda_fp16.h needed), widened to float exactly.
struct h16 { unsigned short x; };
struct b16 { unsigned short x; };
__device__ __forceinline__ float h2f(h16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}
__device__ __forceinline__ float b2f(b16 v) { return __uint_as_float(((u32)v.x) << 16); }

__device__ __forceinline__ h16 f2h(float v) {
    h16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
    return r;
}
// Round to nearest even; branch-free (selects), so a thread's unrolled loads are not held
// behind a branch.
__device__ __forceinline__ b16 f2b(float v) {
    u32 x = __float_as_uint(v);
    u32 nan = (x >> 16) | 0x0040u;  // NaN stays NaN (quiet)
    u32 rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    b16 r;
    r.x = (unsigned short)((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
    return r;
}

// Every family is compiled once per float dtype with DYNN_SCALAR set (float or double; h16 or
// b16 for the families marked `half`, with DYNN_ACC=float). `scalar` is the element type in
// memory, `acc` the type arithmetic runs in: `ld` widens an element, `st` rounds a result
// back (both the identity for float and double).
#ifndef DYNN_SCALAR
#define DYNN_SCALAR float
#endif
#ifndef DYNN_ACC
#define DYNN_ACC DYNN_SCALAR
#endif
typedef DYNN_SCALAR scalar;
typedef DYNN_ACC acc;
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ double ld(double v) { return v; }
__device__ __forceinline__ float ld(h16 v) { return h2f(v); }
__device__ __forceinline__ float ld(b16 v) { return b2f(v); }
__device__ __forceinline__ float to_elem(float v, float*) { return v; }
__device__ __forceinline__ double to_elem(double v, double*) { return v; }
__device__ __forceinline__ h16 to_elem(float v, h16*) { return f2h(v); }
__device__ __forceinline__ b16 to_elem(float v, b16*) { return f2b(v); }
__device__ __forceinline__ scalar st(acc v) { return to_elem(v, (scalar*)0); }
// From f64, rounded once (bf16 through an f32 rounded to odd, which then rounds to nearest
// even exactly once; NaN converts directly).
__device__ __forceinline__ h16 d2h(double v) {
    h16 r;
    asm("cvt.rn.f16.f64 %0, %1;" : "=h"(r.x) : "d"(v));
    return r;
}
__device__ __forceinline__ b16 d2b(double v) {
    float f = __double2float_rz(v);
    u32 odd = __float_as_uint(f) | ((double)f != v && !isinf(f) && v == v ? 1u : 0u);
    return f2b(v != v ? (float)v : __uint_as_float(odd));
}
__device__ __forceinline__ float to_elem(double v, float*) { return (float)v; }
__device__ __forceinline__ h16 to_elem(double v, h16*) { return d2h(v); }
__device__ __forceinline__ b16 to_elem(double v, b16*) { return d2b(v); }
"#;
