// NVFP4 device helpers shared by the NVFP4 kernels (no torch here: raw pointers and registers only).
//
// Formats (the canonical layout of adallm_ops/ops.py):
//   E2M1 nibble  = sign (bit 3) | magnitude code m (bits 0..2): m = e1 e0 m0 (2 exponent bits, 1 mantissa
//                  bit); values {0, .5, 1, 1.5, 2, 3, 4, 6}. A packed byte holds element 2i in its low
//                  nibble and 2i+1 in its high one, so a little-endian 32-bit word holds 8 consecutive
//                  elements e0..e7 at bits [4j, 4j+4).
//   E4M3 scale   = sign | 4 exponent bits (bias 7) | 3 mantissa bits; subnormals when the exponent is 0.
//                  0x7F / 0xFF are NaN; NVFP4 scales are never NaN, and these helpers decode them as 480.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "float16_convert.cuh"  // to_float, from_float

namespace adallm {

// ---------------------------------------------------------------------------------------------------
// Scalar conversions (used where speed does not matter: quantize, dequantize).

// E4M3 byte -> float, exact. The 7 low bits moved up by 7 form an fp16 whose 5-bit exponent field
// holds E4M3's 4 exponent bits (bias 15 instead of 7) and whose mantissa starts with E4M3's 3 bits:
// that fp16 is the E4M3 value times 2^-8, E4M3 subnormals landing on fp16 subnormals. The fp16 -> fp32
// conversion is exact, and 256 = 2^8 puts the power back (the result is a normal float: no flush).
__device__ __forceinline__ float e4m3_to_float(uint32_t b) {
    const uint16_t h = static_cast<uint16_t>(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7));
    return __half2float(__ushort_as_half(h)) * 256.0f;
}

// E2M1 nibble -> float, exact: the magnitude moved up by 9 is an fp16 equal to the E2M1 value times
// 2^-14 (code 1 = 0.5 lands on the fp16 subnormal 2^-15); 16384 = 2^14 puts the power back.
__device__ __forceinline__ float e2m1_to_float(uint32_t nib) {
    const uint16_t h = static_cast<uint16_t>(((nib & 0x8u) << 12) | ((nib & 0x7u) << 9));
    return __half2float(__ushort_as_half(h)) * 16384.0f;
}

// ---------------------------------------------------------------------------------------------------
// Vector dequantization into 16-bit pairs for the tensor cores.
//
// fp4_pair<T, J>(w) turns elements (e_J, e_{J+4}) of the packed word w into one T2 register (low half
// e_J, high half e_{J+4}): nibbles 16 bits apart can be moved by one shift. After shifting the word so
// that e_J sits at bits 12..15 (and e_{J+4} at 28..31), the sign bit already sits at bit 15 (31) and
// the 3 magnitude bits move down into the exponent/mantissa boundary of the 16-bit type:
//   fp16: magnitude to bits 9..11  -> value = e2m1 * 2^-14   (0.5 becomes the fp16 subnormal 2^-15)
//   bf16: magnitude to bits 6..8   -> value = e2m1 * 2^-126  (0.5 becomes the bf16 subnormal 2^-127)
// The missing power of two is put back by the block-scale multiply (see scale_pair): products of
// 16-bit floats keep subnormals (PTX fma.rn.{f16x2,bf16x2} support them), and the product is normal.
template <typename T> struct Fp4Traits;

template <> struct Fp4Traits<__half> {
    static constexpr uint32_t kMagShift = 3;           // bits 12..14 -> 9..11
    static constexpr uint32_t kMagMask = 0x0E000E00u;  // bits 9..11 of each half
};
template <> struct Fp4Traits<__nv_bfloat16> {
    static constexpr uint32_t kMagShift = 6;           // bits 12..14 -> 6..8
    static constexpr uint32_t kMagMask = 0x01C001C0u;  // bits 6..8 of each half
};

template <typename T, int J>
__device__ __forceinline__ uint32_t fp4_pair(uint32_t w) {
    static_assert(J >= 0 && J < 4, "a word holds pairs (e_J, e_J+4) for J = 0..3");
    const uint32_t v = w << (12 - 4 * J);
    return (v & 0x80008000u) | ((v >> Fp4Traits<T>::kMagShift) & Fp4Traits<T>::kMagMask);
}

// All four pairs of a word: out[J] = fp4_pair<T, J>(w). For bf16 one multiply does both shifts: with
// only nibbles j and j + 4 kept (j = 0, 1; nibbles 2, 3 come from w >> 8), m * (2^(12-4j) + 2^(6-4j))
// is the sum of two copies of m whose bits do not overlap (nibble j lands at bits 12..15 and 6..9), so
// the sum is their OR: the sign is at bit 15 (31) of the first copy and the magnitude at bits 6..8
// (22..24) of the second, and one mask keeps exactly those. Three instructions per pair instead of four.
// (fp16 needs magnitude shift 3: the copies would overlap by one bit, so it keeps fp4_pair.)
template <typename T>
__device__ __forceinline__ void fp4_pairs(uint32_t w, uint32_t (&out)[4]) {
    out[0] = fp4_pair<T, 0>(w);
    out[1] = fp4_pair<T, 1>(w);
    out[2] = fp4_pair<T, 2>(w);
    out[3] = fp4_pair<T, 3>(w);
}
template <>
__device__ __forceinline__ void fp4_pairs<__nv_bfloat16>(uint32_t w, uint32_t (&out)[4]) {
    constexpr uint32_t kKeep = 0x80008000u | Fp4Traits<__nv_bfloat16>::kMagMask;
    const uint32_t w8 = w >> 8;
    out[0] = ((w & 0x000F000Fu) * ((1u << 12) + (1u << 6))) & kKeep;
    out[1] = ((w & 0x00F000F0u) * ((1u << 8) + (1u << 2))) & kKeep;
    out[2] = ((w8 & 0x000F000Fu) * ((1u << 12) + (1u << 6))) & kKeep;
    out[3] = ((w8 & 0x00F000F0u) * ((1u << 8) + (1u << 2))) & kKeep;
}

// Two E4M3 block scales (bytes 0 and 1 of u) -> one T2 register (s0, s1) holding each scale times a
// power of two chosen so that (fp4_pair value) * (scale_pair value) = e2m1 * e4m3 * 2^-7 in both types:
//   fp16: e4m3 * 2^7   (largest 448 * 2^7 = 57344 < 65504),    times e2m1 * 2^-14
//   bf16: e4m3 * 2^119 (largest 448 * 2^119 < 2^128 = overflow), times e2m1 * 2^-126
// The products then lie in [2^-17, 2688 * 2^-7] and carry at most 6 significant bits (2 from E2M1,
// 4 from E4M3): exact in either type, none overflow. The kernel multiplies its fp32 sums by 2^7.
constexpr float kDequantUnscale = 128.0f;  // 2^7, see above

template <typename T> __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b);
template <> __device__ __forceinline__ uint32_t mul2<__half>(uint32_t a, uint32_t b) {
    const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t mul2<__nv_bfloat16>(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
}

// Bytes 0 and 1 of u (two E4M3) -> an fp16 pair equal to them times 2^-8 (see e4m3_to_float).
__device__ __forceinline__ uint32_t e4m3x2_to_half2_bits(uint32_t u) {
    const uint32_t b = __byte_perm(u, 0u, 0x4140);  // [b0, 0, b1, 0]: one byte per 16-bit half
    return ((b & 0x007F007Fu) << 7) | ((b & 0x00800080u) << 8);
}

template <typename T> __device__ __forceinline__ uint32_t scale_pair(uint32_t u);

template <> __device__ __forceinline__ uint32_t scale_pair<__half>(uint32_t u) {
    constexpr uint32_t k2p15x2 = 0x78007800u;  // fp16 pair (2^15, 2^15): e4m3 * 2^-8 -> e4m3 * 2^7, exact
    return mul2<__half>(e4m3x2_to_half2_bits(u), k2p15x2);
}

template <> __device__ __forceinline__ uint32_t scale_pair<__nv_bfloat16>(uint32_t u) {
    const uint32_t h = e4m3x2_to_half2_bits(u);
    const __half2 hh = *reinterpret_cast<const __half2*>(&h);
    // fp16 -> fp32 is exact; * 2^127 turns e4m3 * 2^-8 into e4m3 * 2^119 (a normal float, < 2^128);
    // the conversion to bf16 is exact because the value has at most 4 significant bits.
    constexpr float k2p127 = 1.7014118346046923e38f;
    const __nv_bfloat162 s = __floats2bfloat162_rn(__low2float(hh) * k2p127, __high2float(hh) * k2p127);
    return *reinterpret_cast<const uint32_t*>(&s);
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core MMA m16n8k16, fp32 accumulation (sm_80+). Fragments (PTX ISA, "mma.m16n8k16"), lane =
// 4 * g + t:  A (16x16, row-major): a[0] = (row g, k 2t..2t+1), a[1] = (row g+8, k 2t..2t+1),
// a[2] = (row g, k 2t+8..2t+9), a[3] = (row g+8, k 2t+8..2t+9);  B (16x8): b[0] = (k 2t..2t+1, col g),
// b[1] = (k 2t+8..2t+9, col g);  C (16x8): c[0..1] = (row g, cols 2t..2t+1), c[2..3] = (row g+8, same).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <> __device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                                uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                                       uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------------
// Memory access.

// Weights are read exactly once per call: keep them out of L1 and mark them first to leave L2, so they
// do not push out the activations and the KV cache that the next kernels reuse (sm_80+).
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// volatile: the loads stay where the software pipeline issues them (ahead of the math that is ordered
// after them by the volatile MMAs), instead of sinking toward their first use.
__device__ __forceinline__ uint4 ld_stream_v4(const void* ptr, uint64_t policy) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr), "l"(policy));
    return v;
}

// Activations: small and re-read by every warp, so cached in L1. volatile keeps each load next to its
// use instead of hoisted a whole item ahead, which would cost registers the weight pipeline needs.
__device__ __forceinline__ uint4 ld_x_v4(const void* ptr) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

__device__ __forceinline__ uint32_t ld_stream_u16(const void* ptr, uint64_t policy) {
    uint16_t v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.u16 %0, [%1], %2;\n" : "=h"(v) : "l"(ptr), "l"(policy));
    return v;
}

}  // namespace adallm
