// NVFP4 quantize and dequantize kernels: one thread per block of 16 elements along K.
//
// Data (canonical layout, adallm_ops/ops.py):
//   x / out  T [N, K] row-major, K % 16 == 0, 16-byte aligned (T = float, half or bf16)
//   w        uint8 [N, K/2] (element 2i in the low nibble of byte i), ws e4m3 [N, K/16], gs fp32 []
// Because K % 16 == 0, block b = n * K/16 + j is bytes [8b, 8b + 8) of w and elements [16b, 16b + 16)
// of x: the tensors are walked as flat arrays of blocks.
//
// Quantize is bit-exact with adallm_ops/reference.py nvfp4_quantize (ModelOpt recipe): every rounding
// there is an IEEE fp32 operation, so this code uses the correctly rounded intrinsics (__fdiv_rn,
// __fmul_rn), which --use_fast_math would otherwise replace by approximations.
#pragma once

#include "nvfp4_common.cuh"

#include <cuda_fp8.h>
#include <cuda_runtime.h>

namespace adallm {

constexpr int kQuantThreads = 256;

// 16 consecutive T -> fp32.
template <typename T> __device__ __forceinline__ void load16(const T* p, float (&v)[16]);
template <> __device__ __forceinline__ void load16<float>(const float* p, float (&v)[16]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 f = reinterpret_cast<const float4*>(p)[i];
        v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
    }
}
template <typename T> __device__ __forceinline__ void load16(const T* p, float (&v)[16]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint4 u = reinterpret_cast<const uint4*>(p)[i];
        const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[8 * i + j] = to_float(h[j]);
    }
}

// E2M1 code of y: round to nearest even on {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating; the sign only
// when the magnitude is nonzero. The thresholds are the grid's midpoints; ">" vs ">=" sends each tie
// to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
__device__ __forceinline__ uint32_t e2m1_code(float y) {
    const float a = fabsf(y);
    const uint32_t mag = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) +
                         (a > 5.0f);
    return mag | ((y < 0.0f && mag != 0) ? 8u : 0u);
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads) nvfp4_quantize_kernel(const T* __restrict__ x,
                                                                       const float* __restrict__ gs,
                                                                       uint8_t* __restrict__ w,
                                                                       uint8_t* __restrict__ ws, int64_t blocks) {
    const int64_t b = static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x;
    if (b >= blocks) return;
    float v[16];
    load16<T>(x + 16 * b, v);
    const float g = *gs;
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
    // scale = e4m3(min(amax / (6 g), 448)); "q > 448" keeps a NaN as torch.clamp does.
    float q = __fdiv_rn(amax, __fmul_rn(6.0f, g));
    if (q > 448.0f) q = 448.0f;
    uint32_t sb = __nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);  // round to nearest even
    if ((sb & 0x7Fu) == 0) sb = 0x38u;  // a zero scale (all-zero or underflowing block) becomes 1.0 (0x38)
    const float denom = __fmul_rn(e4m3_to_float(sb), g);
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        lo |= e2m1_code(__fdiv_rn(v[i], denom)) << (4 * i);
        hi |= e2m1_code(__fdiv_rn(v[8 + i], denom)) << (4 * i);
    }
    reinterpret_cast<uint2*>(w)[b] = make_uint2(lo, hi);
    ws[b] = static_cast<uint8_t>(sb);
}

// out = T(e2m1 * float(scale) * global), multiplied in that order in fp32 like the CPU reference's
// dequantize_nvfp4, then rounded once to T. Used by the prefill path (dequantize, then cuBLAS).
// Several experts' weights [E, N, K] at once: blocks_per_global = N K / 16 blocks share gs[b / blocks_per_global].
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) nvfp4_dequantize_kernel(const uint8_t* __restrict__ w,
                                                                         const uint8_t* __restrict__ ws,
                                                                         const float* __restrict__ gs,
                                                                         T* __restrict__ out, int64_t blocks,
                                                                         int64_t blocks_per_global) {
    const int64_t b = static_cast<int64_t>(blockIdx.x) * kQuantThreads + threadIdx.x;
    if (b >= blocks) return;
    const uint2 p = reinterpret_cast<const uint2*>(w)[b];
    const float s = e4m3_to_float(ws[b]), g = gs[b / blocks_per_global];
    uint4 o[2];
    T* h = reinterpret_cast<T*>(o);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        h[i] = from_float<T>(__fmul_rn(__fmul_rn(e2m1_to_float(p.x >> (4 * i)), s), g));
        h[8 + i] = from_float<T>(__fmul_rn(__fmul_rn(e2m1_to_float(p.y >> (4 * i)), s), g));
    }
    reinterpret_cast<uint4*>(out)[2 * b] = o[0];
    reinterpret_cast<uint4*>(out)[2 * b + 1] = o[1];
}

template <typename T>
cudaError_t launch_nvfp4_quantize(const T* x, const float* gs, uint8_t* w, uint8_t* ws, int64_t blocks,
                                  cudaStream_t stream) {
    if (blocks == 0) return cudaSuccess;
    const int64_t grid = (blocks + kQuantThreads - 1) / kQuantThreads;
    nvfp4_quantize_kernel<T><<<static_cast<unsigned>(grid), kQuantThreads, 0, stream>>>(x, gs, w, ws, blocks);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_nvfp4_dequantize(const uint8_t* w, const uint8_t* ws, const float* gs, T* out, int64_t blocks,
                                    int64_t blocks_per_global, cudaStream_t stream) {
    if (blocks == 0) return cudaSuccess;
    const int64_t grid = (blocks + kQuantThreads - 1) / kQuantThreads;
    nvfp4_dequantize_kernel<T><<<static_cast<unsigned>(grid), kQuantThreads, 0, stream>>>(w, ws, gs, out, blocks,
                                                                                           blocks_per_global);
    return cudaGetLastError();
}

}  // namespace adallm
