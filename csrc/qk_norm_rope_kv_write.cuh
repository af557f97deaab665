// qk_norm_rope_kv_write: the decode step's attention prologue in one launch. From the fused q/k/v projection
// of one new token per row it RMSNorms q and k per head, rotates them (RoPE, rotate-half form), writes K and V
// into the FP8 cache (fp8_kv_write's recipe) and returns q for fp8_decode_attention. Unfused, the same work is
// two inductor kernels (q, k), fp8_kv_write and a copy per layer (~6 us at batch 1 on the H200, mostly launch
// latency); CPU reference: adallm_ops/reference.py::qk_norm_rope_kv_write.
//
// Layout (element strides; every last dim contiguous):
//   qkv        T     [B, (Hq + 2 Hkv) * D]   row b: Hq q heads, then Hkv k heads, then Hkv v heads, D each
//   q_weight,  T     [D]                     RMSNorm weights; the multiplier is weight + weight_offset
//   k_weight                                 (0 for Qwen3, 1 for Gemma3's (1 + w))
//   cos, sin   T     [Bc, D]                 Bc = B, or 1 for one row shared by the batch (stride 0)
//   q_out      T     [B, Hq, D]
//   caches and scales as in fp8_kv_write.cuh; position: int64 [1], the new token's absolute position
//
// Math per q or k head, in fp32 from the T inputs, rounded once at the end (to T for q, to e4m3 for k):
//   x = x * rsqrt(mean(x^2) + eps) * (w + weight_offset);   y = x * cos + rotate_half(x) * sin
// where rotate_half(x)[i] = -x[i + D/2] (i < D/2), x[i - D/2] (i >= D/2). Products and sums use the _rn
// intrinsics so that no FMA contraction changes the rounding against the reference; only the sum of squares
// (a warp butterfly here, torch's own order there) and rsqrtf differ from it, by a few fp32 ulps.
//
// Work split: one warp per (b, head), heads in qkv's order (q, k, v); lane i holds the D/32 consecutive
// elements from i*D/32, so the partner of element j in rotate_half (j +- D/2) sits in lane i ^ 16.
#pragma once

#include "fp8_convert.cuh"
#include "fp8_kv_write.cuh"  // write_e4m3_row, cache_slot

namespace adallm_fp8 {

struct QkNormRopeParams {
  const void* qkv;  // T [B, (Hq + 2 Hkv) * D]
  int64_t qkv_stride_b;
  const void* q_weight;  // T [D]
  const void* k_weight;
  const void* cos;  // T [Bc, D]
  const void* sin;
  int64_t rope_stride_b;  // D, or 0 when one cos/sin row serves every batch row
  void* q_out;            // T [B, Hq, D]
  uint8_t* k_cache;       // e4m3 [B, Hkv, L, D]
  uint8_t* v_cache;
  float* k_scale;  // [B, Hkv, L]
  float* v_scale;
  const int64_t* position;  // [1]
  float eps, weight_offset;
  int batch, q_heads, kv_heads, length;
};

constexpr int kQkNormRopeWarps = 4;

template <typename T, int D>
__global__ void __launch_bounds__(kQkNormRopeWarps * 32) qk_norm_rope_kv_write_kernel(const QkNormRopeParams p) {
  constexpr int kPerLane = D / 32;
  static_assert(kPerLane == 2 || kPerLane == 4 || kPerLane == 8, "D must be 64, 128 or 256");
  struct alignas(kPerLane * sizeof(T)) Vec { T x[kPerLane]; };

  const int lane = threadIdx.x % 32;
  const int heads = p.q_heads + 2 * p.kv_heads;
  const int64_t row = int64_t(blockIdx.x) * kQkNormRopeWarps + threadIdx.x / 32;
  if (row >= int64_t(p.batch) * heads) return;
  const int64_t b = row / heads;
  const int head = int(row % heads);
  const bool is_q = head < p.q_heads, is_v = head >= p.q_heads + p.kv_heads;

  const Vec in = reinterpret_cast<const Vec*>(static_cast<const T*>(p.qkv) + b * p.qkv_stride_b + head * D)[lane];
  float x[kPerLane];
  for (int i = 0; i < kPerLane; ++i) x[i] = to_float(in.x[i]);

  if (!is_v) {
    float ss = 0.f;
    for (int i = 0; i < kPerLane; ++i) ss = __fadd_rn(ss, __fmul_rn(x[i], x[i]));
    for (int m = 16; m > 0; m /= 2) ss = __fadd_rn(ss, __shfl_xor_sync(0xFFFFFFFFu, ss, m));
    const float inv_rms = rsqrtf(__fadd_rn(div_rn(ss, float(D)), p.eps));
    const Vec w = reinterpret_cast<const Vec*>(is_q ? p.q_weight : p.k_weight)[lane];
    const Vec c = reinterpret_cast<const Vec*>(static_cast<const T*>(p.cos) + b * p.rope_stride_b)[lane];
    const Vec s = reinterpret_cast<const Vec*>(static_cast<const T*>(p.sin) + b * p.rope_stride_b)[lane];
    for (int i = 0; i < kPerLane; ++i) x[i] = __fmul_rn(__fmul_rn(x[i], inv_rms), __fadd_rn(to_float(w.x[i]), p.weight_offset));
    for (int i = 0; i < kPerLane; ++i) {
      const float partner = __shfl_xor_sync(0xFFFFFFFFu, x[i], 16);
      const float rotated = lane < 16 ? -partner : partner;
      x[i] = __fadd_rn(__fmul_rn(x[i], to_float(c.x[i])), __fmul_rn(rotated, to_float(s.x[i])));
    }
  }

  if (is_q) {
    Vec out;
    for (int i = 0; i < kPerLane; ++i) out.x[i] = from_float<T>(x[i]);
    reinterpret_cast<Vec*>(static_cast<T*>(p.q_out) + (b * p.q_heads + head) * D)[lane] = out;
    return;
  }

  // K or V: fp8_kv_write's recipe on the fp32 values (k is quantized before any rounding to T).
  const int kv_head = head - p.q_heads - (is_v ? p.kv_heads : 0);
  write_e4m3_row<D>(x, is_v ? p.v_cache : p.k_cache, is_v ? p.v_scale : p.k_scale,
                    (b * p.kv_heads + kv_head) * p.length + cache_slot(*p.position, p.length), lane);
}

template <typename T, int D>
cudaError_t launch_qk_norm_rope_kv_write_d(const QkNormRopeParams& p, cudaStream_t stream) {
  const int64_t warps = int64_t(p.batch) * (p.q_heads + 2 * p.kv_heads);
  const int64_t blocks = (warps + kQkNormRopeWarps - 1) / kQkNormRopeWarps;
  qk_norm_rope_kv_write_kernel<T, D><<<unsigned(blocks), kQkNormRopeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// T: __nv_bfloat16 or __half; head_dim: 64, 128 or 256 (else cudaErrorInvalidValue).
template <typename T>
cudaError_t launch_qk_norm_rope_kv_write(const QkNormRopeParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_qk_norm_rope_kv_write_d<T, 64>(p, stream);
    case 128: return launch_qk_norm_rope_kv_write_d<T, 128>(p, stream);
    case 256: return launch_qk_norm_rope_kv_write_d<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace adallm_fp8
