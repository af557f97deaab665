// E4M3 conversions and cp.async helpers for the FP8 KV-cache kernels (fp8_kv_write.cuh,
// fp8_decode_attention.cuh). No torch here: raw pointers and CUDA intrinsics only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "float16_convert.cuh"

namespace adallm_fp8 {

constexpr float kE4m3Max = 448.f;  // largest finite float8_e4m3fn

// e4m3x4_to_half2x2 turns the four e4m3 bytes of a word into two f16x2 words, bytes (0, 1) -> lo and
// (2, 3) -> hi, the lower byte in the lower half (the operand order of mma.sync's f16 fragments), times
// 1 / e4m3_unpack_factor(): sm_89+ converts exactly with `cvt.rn.f16x2.e4m3x2`; sm_80 has no such
// instruction and uses a bit trick whose results are 2^-8 too small (e4m3 subnormals become f16
// subnormals, which the f16 tensor-core path keeps, as Marlin's FP4 dequant relies on too). Callers
// multiply the factor back once (into q's scale or the final output), never per element.
__device__ __forceinline__ constexpr float e4m3_unpack_factor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  return 256.f;
#else
  return 1.f;
#endif
}

__device__ __forceinline__ void e4m3x4_to_half2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n\t.reg .b16 a, b;\n\tmov.b32 {a, b}, %2;\n\t"
      "cvt.rn.f16x2.e4m3x2 %0, a;\n\tcvt.rn.f16x2.e4m3x2 %1, b;\n\t}"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
#else
  // Put bytes (0,1) / (2,3) in the high byte of each 16-bit half, then move the 7 exponent+mantissa
  // bits down by one: E4M3 seeeemmm becomes the FP16 s0eeeemmm0000000, i.e. the value x 2^-8
  // (FP16 exponent bias 15 vs 7), subnormals included (both formats read exponent 0 the same way).
  const uint32_t x0 = __byte_perm(w, 0, 0x1404), x1 = __byte_perm(w, 0, 0x3424);
  lo = ((x0 >> 1) & 0x3F803F80u) | (x0 & 0x80008000u);
  hi = ((x1 >> 1) & 0x3F803F80u) | (x1 & 0x80008000u);
#endif
}

// IEEE division, correctly rounded and without flushing subnormals, whatever --use_fast_math says: the
// quantizer must match the CPU reference's fp32 division bit for bit.
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// (a, b) -> two e4m3 bytes (a in the low byte), round-to-nearest-even, saturating at +-448.
__device__ __forceinline__ uint16_t float2_to_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

using adallm::from_float;  // float16_convert.cuh
using adallm::to_float;

__device__ __forceinline__ float bits16_to_float(uint16_t bits, bool bf16) {
  return bf16 ? __uint_as_float(uint32_t(bits) << 16) : __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ uint16_t float_to_bits16(float x, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x)) : __half_as_ushort(__float2half_rn(x));
}

// Asynchronous global -> shared copies; with valid == false nothing is read and the bytes are zeroed.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace adallm_fp8
