// fp8_decode_attention: one new query token per sequence against an e4m3 KV cache with per-(token, head)
// fp32 scales; GQA, ring-buffer slots, sliding window, left padding, logit softcap. Flash-decoding: the
// valid range of each (sequence, KV head) is cut into chunks, one CTA per chunk, and the last CTA of a
// row to finish merges the partial results (log-sum-exp), so the op is a single launch.
//
// Layout:
//   q          T (bf16/fp16)  [B, Hq, D]        contiguous, Hq = Hkv * G (query head hkv*G + g uses KV head hkv)
//   k_cache,   uint8 (e4m3)   [B, Hkv, L, D]    contiguous; position p sits in slot p % L
//   v_cache
//   k_scale,   fp32           [B, Hkv, L]       value = float(cache) * scale
//   v_scale
//   seqlens    int32          [B]               tokens written so far, the new one included
//   starts     int32          [B]               first valid position (left padding before it)
//   out        T              [B, Hq, D]
//   ws_o       fp32           [B, Hq, S, D]     partial outputs (already divided by their sums), S = splits
//   ws_lse     fp32           [B, Hq, S]        log2 of each partial's sum of exp2 (max included)
//   counters   uint32         [B * Hkv]         CTAs of a row that have finished; 0 between launches
// Row b attends to positions [lo, seqlen) with lo = max(start, seqlen - window (if window > 0), seqlen - L, 0).
//
// CTA (split, hkv, b), 4 warps. The chunk streams through shared memory in tiles of 4 KB of K + 4 KB of V
// (+ their scales), kStages tiles in flight with cp.async; each tile is read from global memory once and
// serves all G query heads of the group (GQA costs no extra traffic).
// Inside a tile, a token row of D bytes is read by D/16 lanes, 16 bytes each; a warp covers 32/(D/16)
// tokens per load. Warps are split into HGN head groups of HG heads (G <= 4: one group, all warps on
// different tokens; G up to 8 / 16: 2 / 4 groups, each warp re-reads the tile from shared memory):
//
//     D = 128, G = 4: lanes 0-7 -> token 0, 16-byte slices 0..7; lanes 8-15 -> token 1; ...; 4 tokens a warp,
//                     warp w takes tokens 4w..4w+3 and 16+4w..16+4w+3 of the 32-token tile.
//
// Math in fp32 after converting e4m3 -> fp16 -> fp32 (no fp8 mma: its accumulator loses bits). The
// k scale multiplies the logit, the v scale the probability; logits are kept in the log2 domain
// (q is pre-scaled by sm_scale * log2(e)).
#pragma once

#include "fp8_convert.cuh"
#include "fp8_decode_splits.cuh"

namespace adallm_fp8 {

struct DecodeParams {
  const uint16_t* q;  // bf16/fp16 bits [B, Hq, D]
  const uint8_t* k_cache;
  const uint8_t* v_cache;
  const float* k_scale;
  const float* v_scale;
  const int* seqlens;
  const int* starts;
  uint16_t* out;  // bf16/fp16 bits [B, Hq, D]
  float* ws_o;    // null when splits == 1
  float* ws_lse;
  unsigned* counters;
  int batch, hkv, group, length, splits, window;
  float q_scale;       // sm_scale * log2(e), or sm_scale / softcap with a softcap
  float softcap_log2;  // softcap * log2(e), 0 = no softcap
  bool bf16;
};

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kTileBytes = 4096;  // of K (and as much of V) per pipeline stage
constexpr int kStages = 4;
constexpr int kMaxGroup = 16;

template <int D>
struct DecodeTile {
  static constexpr int kTokens = kTileBytes / D;                  // 64 / 32 / 16 tokens for D = 64 / 128 / 256
  static constexpr int kStageBytes = 2 * kTileBytes + 2 * kTokens * 4;  // K, V, k_scale, v_scale
};

// G query heads per KV head -> (HG heads per warp, HGN head groups).
template <int D, int HG, int HGN>
__global__ void __launch_bounds__(kDecodeThreads) fp8_decode_kernel(const DecodeParams p) {
  constexpr int kLanesPerTok = D / 16;
  constexpr int kTokPerWarp = 32 / kLanesPerTok;
  constexpr int kWarpsPerGroup = kDecodeWarps / HGN;
  constexpr int kTile = DecodeTile<D>::kTokens;
  constexpr int kStage = DecodeTile<D>::kStageBytes;
  constexpr int kRounds = kTile / (kTokPerWarp * kWarpsPerGroup);  // tokens per lane per tile
  static_assert(kRounds * kTokPerWarp * kWarpsPerGroup == kTile, "tile must split evenly over warps");
  static_assert(2 * kTile <= kDecodeThreads, "one scale copy per thread");
  static_assert(kDecodeWarps * HG * D * 4 + 2 * kDecodeWarps * HG * 4 + kMaxGroup * kMaxDecodeSplits * 4 <=
                    kStages * kStage,
                "reduction buffers reuse the pipeline's shared memory");
  __shared__ __align__(16) unsigned char smem[kStages * kStage];
  __shared__ bool s_last;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int G = p.group, hq0 = h * G;
  const int64_t qrow0 = int64_t(b) * p.hkv * G + hq0;  // (b, hq0) row of q / out

  const int seqlen = p.seqlens[b];
  int lo = max(p.starts[b], 0);
  if (p.window > 0) lo = max(lo, seqlen - p.window);
  lo = max(lo, seqlen - p.length);  // never more than L positions (the CPU reference raises instead)
  const int n = seqlen - lo;
  if (n <= 0) {  // nothing to attend to: the output is zero (the CPU reference raises instead)
    if (split == 0)
      for (int i = tid; i < G * D; i += kDecodeThreads) p.out[qrow0 * D + i] = 0;
    return;
  }
  const int chunk = ((n + p.splits - 1) / p.splits + kTile - 1) / kTile * kTile;
  const int n_active = (n + chunk - 1) / chunk;
  if (split >= n_active) return;
  const int c0 = lo + split * chunk, c1 = min(seqlen, c0 + chunk);
  const int ntiles = (c1 - c0 + kTile - 1) / kTile;
  const int slot0 = c0 % p.length;
  const int64_t row = (int64_t(b) * p.hkv + h) * p.length;  // first slot of this (b, hkv) in the cache

  auto load_tile = [&](int j) {
    unsigned char* st = smem + (j % kStages) * kStage;
    const int tp0 = c0 + j * kTile;
    int ts0 = slot0 + j * kTile;  // j * kTile < chunk <= L: one subtraction wraps it
    if (ts0 >= p.length) ts0 -= p.length;
#pragma unroll
    for (int r = 0; r < kTile * kLanesPerTok / kDecodeThreads; ++r) {
      const int e = tid + r * kDecodeThreads, t = e / kLanesPerTok, part = e % kLanesPerTok;
      const bool valid = tp0 + t < c1;
      int slot = ts0 + t;
      if (slot >= p.length) slot -= p.length;
      const int64_t off = valid ? (row + slot) * D + part * 16 : 0;
      cp_async_16(st + t * D + part * 16, p.k_cache + off, valid);
      cp_async_16(st + kTileBytes + t * D + part * 16, p.v_cache + off, valid);
    }
    if (tid < 2 * kTile) {
      const int t = tid % kTile;
      const bool valid = tp0 + t < c1;
      int slot = ts0 + t;
      if (slot >= p.length) slot -= p.length;
      const float* src = tid < kTile ? p.k_scale : p.v_scale;
      cp_async_4(st + 2 * kTileBytes + tid * 4, src + (valid ? row + slot : 0), valid);
    }
  };

  const int hg = warp / kWarpsPerGroup, tw = warp % kWarpsPerGroup;
  const int tok_lane = lane / kLanesPerTok, part = lane % kLanesPerTok;

  // This lane's 16-element slice of each of its HG query heads, pre-scaled (masked heads are zero).
  float q[HG][16];
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    const int head = hg * HG + g;
    uint4 raw[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
    if (head < G) {
      const uint4* src = reinterpret_cast<const uint4*>(p.q + (qrow0 + head) * D + part * 16);
      raw[0] = src[0];
      raw[1] = src[1];
    }
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(raw);
#pragma unroll
    for (int e = 0; e < 16; ++e) q[g][e] = bits16_to_float(bits[e], p.bf16) * (p.q_scale * e4m3_unpack_factor());
  }

  float m[HG], l[HG], acc[HG][16];
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[g][e] = 0.f;
  }

#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < ntiles) load_tile(j);
    cp_async_commit();
  }

  for (int j = 0; j < ntiles; ++j) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile j landed for every thread; stage (j - 1) % kStages is free to refill
    if (j + kStages - 1 < ntiles) load_tile(j + kStages - 1);
    cp_async_commit();

    const unsigned char* st = smem + (j % kStages) * kStage;
    const float* sk = reinterpret_cast<const float*>(st + 2 * kTileBytes);
    const float* sv = sk + kTile;
    const int tp0 = c0 + j * kTile;

    float s[kRounds][HG];  // logits (log2 domain) of this lane's tokens
#pragma unroll
    for (int i = 0; i < kRounds; ++i) {
      const int t = (i * kWarpsPerGroup + tw) * kTokPerWarp + tok_lane;
      float kf[16];
      e4m3x16_to_float(*reinterpret_cast<const uint4*>(st + t * D + part * 16), kf);
      const float ks = sk[t];
      const bool valid = tp0 + t < c1;
#pragma unroll
      for (int g = 0; g < HG; ++g) {
        float dot0 = 0.f, dot1 = 0.f;  // two chains: half the FMA latency on the critical path
#pragma unroll
        for (int e = 0; e < 16; e += 2) {
          dot0 = fmaf(q[g][e], kf[e], dot0);
          dot1 = fmaf(q[g][e + 1], kf[e + 1], dot1);
        }
        float dot = dot0 + dot1;
#pragma unroll
        for (int o = kLanesPerTok / 2; o > 0; o /= 2) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, o);
        float x = dot * ks;
        if (p.softcap_log2 > 0.f) x = p.softcap_log2 * tanhf(x);
        s[i][g] = valid ? x : -INFINITY;
      }
    }

    // Online softmax, once per tile: new running max, rescale only when it grew (rare after a few tiles).
    float pv[kRounds][HG];
#pragma unroll
    for (int g = 0; g < HG; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int i = 1; i < kRounds; ++i) mx = fmaxf(mx, s[i][g]);
#pragma unroll
      for (int o = kLanesPerTok; o < 32; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
      if (mx > m[g]) {  // warp-uniform
        const float f = exp2f(m[g] - mx);  // 0 while m is -inf
        l[g] *= f;
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[g][e] *= f;
        m[g] = mx;
      }
      const float mref = m[g] == -INFINITY ? 0.f : m[g];
#pragma unroll
      for (int i = 0; i < kRounds; ++i) {
        const float pr = exp2f(s[i][g] - mref);
        l[g] += pr;
        pv[i][g] = pr * sv[(i * kWarpsPerGroup + tw) * kTokPerWarp + tok_lane];
      }
    }

#pragma unroll
    for (int i = 0; i < kRounds; ++i) {
      const int t = (i * kWarpsPerGroup + tw) * kTokPerWarp + tok_lane;
      float vf[16];
      e4m3x16_to_float(*reinterpret_cast<const uint4*>(st + kTileBytes + t * D + part * 16), vf);
#pragma unroll
      for (int g = 0; g < HG; ++g)
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[g][e] = fmaf(pv[i][g], vf[e], acc[g][e]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  // Sum over the warp's token lanes (all lanes of a token hold the same l).
#pragma unroll
  for (int o = kLanesPerTok; o < 32; o *= 2) {
#pragma unroll
    for (int g = 0; g < HG; ++g) {
      l[g] += __shfl_xor_sync(0xFFFFFFFFu, l[g], o);
#pragma unroll
      for (int e = 0; e < 16; ++e) acc[g][e] += __shfl_xor_sync(0xFFFFFFFFu, acc[g][e], o);
    }
  }
  float* red_o = reinterpret_cast<float*>(smem);        // [warps][HG][D]
  float* red_m = red_o + kDecodeWarps * HG * D;          // [warps][HG]
  float* red_l = red_m + kDecodeWarps * HG;              // [warps][HG]
  float* merge_w = red_l + kDecodeWarps * HG;            // [kMaxGroup][kMaxDecodeSplits]
  if (tok_lane == 0) {
#pragma unroll
    for (int g = 0; g < HG; ++g) {
#pragma unroll
      for (int e = 0; e < 16; ++e) red_o[(warp * HG + g) * D + part * 16 + e] = acc[g][e];
      if (part == 0) {
        red_m[warp * HG + g] = m[g];
        red_l[warp * HG + g] = l[g];
      }
    }
  }
  __syncthreads();

  // Merge the warps of each head group; write the output (one split) or this split's partial.
  for (int i = tid; i < G * D; i += kDecodeThreads) {
    const int head = i / D, d = i % D, w0 = (head / HG) * kWarpsPerGroup, g = head % HG;
    float mx = -INFINITY;
    for (int w = w0; w < w0 + kWarpsPerGroup; ++w) mx = fmaxf(mx, red_m[w * HG + g]);
    const float mref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, o = 0.f;
    for (int w = w0; w < w0 + kWarpsPerGroup; ++w) {
      const float f = exp2f(red_m[w * HG + g] - mref);
      sum += red_l[w * HG + g] * f;
      o += red_o[(w * HG + g) * D + d] * f;
    }
    o *= e4m3_unpack_factor() / sum;  // sum >= 1: the chunk holds a valid token
    if (n_active == 1) {
      p.out[(qrow0 + head) * D + d] = float_to_bits16(o, p.bf16);
    } else {
      const int64_t prow = (qrow0 + head) * p.splits + split;
      p.ws_o[prow * D + d] = o;
      if (d == 0) p.ws_lse[prow] = mx + __log2f(sum);
    }
  }
  if (n_active == 1) return;

  // The last CTA of this (b, hkv) to get here merges all partials (threadfence-reduction pattern).
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    unsigned* counter = p.counters + int64_t(b) * p.hkv + h;
    s_last = atomicAdd(counter, 1u) == unsigned(n_active - 1);
    if (s_last) *counter = 0;  // every CTA of the row has arrived: ready for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  for (int head = tid; head < G; head += kDecodeThreads) {
    const float* lse = p.ws_lse + (qrow0 + head) * p.splits;
    float mx = -INFINITY;
    for (int sp = 0; sp < n_active; ++sp) mx = fmaxf(mx, __ldcg(lse + sp));
    float sum = 0.f;
    for (int sp = 0; sp < n_active; ++sp) {
      const float w = exp2f(__ldcg(lse + sp) - mx);
      merge_w[head * kMaxDecodeSplits + sp] = w;
      sum += w;
    }
    for (int sp = 0; sp < n_active; ++sp) merge_w[head * kMaxDecodeSplits + sp] /= sum;
  }
  __syncthreads();
  for (int i = tid; i < G * D; i += kDecodeThreads) {
    const int head = i / D, d = i % D;
    const float* po = p.ws_o + (qrow0 + head) * p.splits * D + d;
    float o = 0.f;
    for (int sp = 0; sp < n_active; ++sp) o = fmaf(merge_w[head * kMaxDecodeSplits + sp], __ldcg(po + sp * D), o);
    p.out[(qrow0 + head) * D + d] = float_to_bits16(o, p.bf16);
  }
}

using DecodeKernel = void (*)(DecodeParams);

template <int D>
DecodeKernel decode_kernel_d(int group) {
  if (group == 1) return fp8_decode_kernel<D, 1, 1>;
  if (group == 2) return fp8_decode_kernel<D, 2, 1>;
  if (group <= 4) return fp8_decode_kernel<D, 4, 1>;
  if (group <= 8) return fp8_decode_kernel<D, 4, 2>;
  if (group <= kMaxGroup) return fp8_decode_kernel<D, 4, 4>;
  return nullptr;
}

// The compiled configuration for (head_dim 64/128/256, group <= kMaxGroup), else null.
inline DecodeKernel decode_kernel(int head_dim, int group) {
  switch (head_dim) {
    case 64: return decode_kernel_d<64>(group);
    case 128: return decode_kernel_d<128>(group);
    case 256: return decode_kernel_d<256>(group);
    default: return nullptr;
  }
}

// How many CTAs of that configuration fit on one SM at once (registers, shared memory), for
// decode_num_splits. A host query: no stream work, so it is allowed while a CUDA graph is captured.
inline cudaError_t decode_ctas_per_sm(int head_dim, int group, int* ctas) {
  const DecodeKernel kernel = decode_kernel(head_dim, group);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, kernel, kDecodeThreads, 0);
}

// p.splits must come from decode_num_splits (<= kMaxDecodeSplits); ws_o / ws_lse may be null when
// p.splits == 1. Unsupported head_dim / group: cudaErrorInvalidValue.
inline cudaError_t launch_fp8_decode_attention(const DecodeParams& p, int head_dim, cudaStream_t stream) {
  const DecodeKernel kernel = decode_kernel(head_dim, p.group);
  if (kernel == nullptr || p.splits < 1 || p.splits > kMaxDecodeSplits) return cudaErrorInvalidValue;
  kernel<<<dim3(p.splits, p.hkv, p.batch), kDecodeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace adallm_fp8
