// fp8_kv_write: quantize new K/V rows to e4m3 with one fp32 scale per (token, head) and write them into
// the cache slots positions % L, in place. Bit-exact with adallm_ops/reference.py::fp8_kv_write.
//
// Layout (element strides; the last dim of k/v must be contiguous):
//   k, v       T (bf16/fp16)  [B, Hkv, S, D]   strides (stride_b, stride_h, stride_s, 1)
//   k_cache,   uint8 (e4m3)   [B, Hkv, L, D]   contiguous; token at position p sits in slot p % L
//   v_cache
//   k_scale,   fp32           [B, Hkv, L]      contiguous; value = float(cache) * scale
//   v_scale
//   positions  int64          [S]              absolute cache positions of the S new tokens
// Recipe per row x[0..D): amax = max|x|; scale = amax / 448 (1 if amax == 0); q = e4m3_rne_sat(x / scale).
//
// Work split: one warp per (k|v, b, h, s) row; lane i holds the D/32 consecutive elements starting at
// i*D/32 (4..16 bytes, one vector load). positions is read on the device: no host sync, graph-safe.
#pragma once

#include "fp8_convert.cuh"

namespace adallm_fp8 {

struct KvWriteParams {
  const void* k;  // T [B, Hkv, S, D]
  const void* v;
  int64_t stride_b, stride_h, stride_s;  // element strides shared by k and v
  uint8_t* k_cache;                      // e4m3 [B, Hkv, L, D]
  uint8_t* v_cache;
  float* k_scale;  // [B, Hkv, L]
  float* v_scale;
  const int64_t* positions;  // [S]
  int batch, heads, seq, length;
};

constexpr int kKvWriteWarps = 4;

// The cache slot of absolute position `position`: position % length, as Python's % (never negative).
__device__ __forceinline__ int64_t cache_slot(int64_t position, int length) {
  const int64_t slot = position % length;
  return slot < 0 ? slot + length : slot;
}

// The recipe above for one row held by a warp (lane i: x = elements i*D/32 .. of the row, in fp32): e4m3 codes
// into cache row `row` (b * Hkv * L + h * L + slot) of `cache`, its scale into scale[row]. Also used by
// qk_norm_rope_kv_write.cuh, so that both writes stay bit-exact with the one reference recipe.
template <int D>
__device__ __forceinline__ void write_e4m3_row(const float (&x)[D / 32], uint8_t* cache, float* scale, int64_t row,
                                               int lane) {
  constexpr int kPerLane = D / 32;
  struct alignas(kPerLane) OutVec { uint16_t x[kPerLane / 2]; };
  uint32_t amax_bits = 0;  // |x| compared as integers: exact for subnormals even under flush-to-zero
  for (int i = 0; i < kPerLane; ++i) amax_bits = max(amax_bits, __float_as_uint(x[i]) & 0x7FFFFFFFu);
  amax_bits = __reduce_max_sync(0xFFFFFFFFu, amax_bits);
  const float s = amax_bits != 0 ? div_rn(__uint_as_float(amax_bits), kE4m3Max) : 1.f;
  OutVec out;
  for (int i = 0; i < kPerLane; i += 2) out.x[i / 2] = float2_to_e4m3x2(div_rn(x[i], s), div_rn(x[i + 1], s));
  reinterpret_cast<OutVec*>(cache + row * D)[lane] = out;
  if (lane == 0) scale[row] = s;
}

template <typename T, int D>
__global__ void __launch_bounds__(kKvWriteWarps * 32) fp8_kv_write_kernel(const KvWriteParams p) {
  constexpr int kPerLane = D / 32;
  static_assert(kPerLane == 2 || kPerLane == 4 || kPerLane == 8, "D must be 64, 128 or 256");
  struct alignas(kPerLane * sizeof(T)) InVec { T x[kPerLane]; };

  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.heads * p.seq;
  const int64_t row = int64_t(blockIdx.x) * kKvWriteWarps + threadIdx.x / 32;
  if (row >= 2 * rows) return;
  const bool is_v = row >= rows;
  const int64_t r = is_v ? row - rows : row;
  const int s = int(r % p.seq);
  const int64_t bh = r / p.seq;  // b * heads + h
  const int64_t b = bh / p.heads, h = bh % p.heads;

  const T* src = static_cast<const T*>(is_v ? p.v : p.k) + b * p.stride_b + h * p.stride_h + s * p.stride_s;
  const InVec in = reinterpret_cast<const InVec*>(src)[lane];
  float x[kPerLane];
  for (int i = 0; i < kPerLane; ++i) x[i] = to_float(in.x[i]);
  write_e4m3_row<D>(x, is_v ? p.v_cache : p.k_cache, is_v ? p.v_scale : p.k_scale,
                    bh * p.length + cache_slot(p.positions[s], p.length), lane);
}

template <typename T, int D>
cudaError_t launch_fp8_kv_write_d(const KvWriteParams& p, cudaStream_t stream) {
  const int64_t warps = 2 * int64_t(p.batch) * p.heads * p.seq;
  const int64_t blocks = (warps + kKvWriteWarps - 1) / kKvWriteWarps;
  fp8_kv_write_kernel<T, D><<<unsigned(blocks), kKvWriteWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// T: __nv_bfloat16 or __half; head_dim: 64, 128 or 256 (else cudaErrorInvalidValue).
template <typename T>
cudaError_t launch_fp8_kv_write(const KvWriteParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_fp8_kv_write_d<T, 64>(p, stream);
    case 128: return launch_fp8_kv_write_d<T, 128>(p, stream);
    case 256: return launch_fp8_kv_write_d<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace adallm_fp8
