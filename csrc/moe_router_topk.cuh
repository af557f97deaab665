// moe_router_topk: the Qwen3-MoE router of a decode step in one launch, where transformers runs four (a cuBLAS
// GEMV, softmax, topk, the renormalization). CPU reference: adallm_ops/reference.py::moe_router_topk.
//
//   logits = x @ W^T           fp32 sums, rounded to T (as F.linear returns them)
//   p      = softmax(logits)   fp32, per token over the E experts
//   ids    = the k experts of largest logit (equal logits: the lower expert first), in decreasing order
//   w      = p[ids], divided by its sum when `renormalize`, rounded to T
// Selecting by the T-rounded logit is selecting by p (softmax is monotonic), as transformers' topk of p does.
//
// Layout (all contiguous): x T [tokens, H]; weight T [E, H]; logits T [tokens, E]; topk_weights T [tokens, k];
// topk_ids int64 [tokens, k]. Limits: tokens <= kMaxTokens (a decode batch), H % 8 == 0 (16-byte vectors),
// E <= kMaxExperts, k <= kMaxTopK.
//
// Work split. Phase 1, one warp per expert (kRouterWarps per CTA, ceil(E / kRouterWarps) CTAs): the lanes walk W's
// row in 16-byte vectors, kRouterUnroll loads at a time, and use each vector for every token's x (x is a few KB,
// served by L1/L2). Phase 2, in the last CTA to finish phase 1 (a device-wide arrival counter that this CTA resets,
// the pattern of fp8_decode_attention's split merge): warp w takes tokens w, w + kRouterWarps, ...; lane l holds the
// logits of experts l, l + 32, ...; k rounds of a warp arg-max pick the experts. The counter is shared by all calls
// on a device: router calls must not run concurrently on two streams of one device.
#pragma once

#include <cstdint>

#include "float16_convert.cuh"

namespace adallm_moe {

using adallm::from_float;
using adallm::to_float;

constexpr int kRouterWarps = 4;
constexpr int kRouterUnroll = 8;  // 16-byte vectors in flight per lane: a 2048-wide row (Qwen3-30B-A3B) in one go
constexpr int kMaxTokens = 16;
constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 32;  // one lane per pick

struct RouterParams {
  const void* x;       // T [tokens, H]
  const void* weight;  // T [E, H]
  void* logits;        // T [tokens, E]
  void* topk_weights;  // T [tokens, k]
  int64_t* topk_ids;   // [tokens, k]
  unsigned* arrivals;  // one counter, zero between launches
  int tokens, hidden, experts, top_k;
  bool renormalize;
};

template <typename T>
__global__ void __launch_bounds__(kRouterWarps * 32) moe_router_topk_kernel(const RouterParams p) {
  struct alignas(16) Vec { T x[8]; };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int vectors = p.hidden / 8;

  // Phase 1: logits of one expert for every token.
  const int e = blockIdx.x * kRouterWarps + warp;
  if (e < p.experts) {
    float acc[kMaxTokens] = {};
    const Vec* w_row = static_cast<const Vec*>(p.weight) + int64_t(e) * vectors;
    for (int i0 = lane; i0 < vectors; i0 += 32 * kRouterUnroll) {
      Vec w[kRouterUnroll];  // all loads of a chunk issued before any use: one round trip per chunk
#pragma unroll
      for (int u = 0; u < kRouterUnroll; ++u) {
        if (i0 + 32 * u < vectors) w[u] = w_row[i0 + 32 * u];
      }
#pragma unroll
      for (int u = 0; u < kRouterUnroll; ++u) {
        const int i = i0 + 32 * u;
        if (i >= vectors) break;
#pragma unroll
        for (int t = 0; t < kMaxTokens; ++t) {
          if (t < p.tokens) {
            const Vec xv = static_cast<const Vec*>(p.x)[int64_t(t) * vectors + i];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[t] += to_float(xv.x[j]) * to_float(w[u].x[j]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < p.tokens) {
        float s = acc[t];
        for (int m = 16; m > 0; m /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, m);
        if (lane == 0) static_cast<T*>(p.logits)[int64_t(t) * p.experts + e] = from_float<T>(s);
      }
    }
    __threadfence();  // this warp's logits are visible device-wide before its CTA arrives
  }

  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.arrivals, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  if (threadIdx.x == 0) *p.arrivals = 0;  // for the next launch, which stream order puts after this one
  __threadfence();

  // Phase 2: softmax and top k per token.
  constexpr int kPerLane = kMaxExperts / 32;
  for (int t = warp; t < p.tokens; t += kRouterWarps) {
    float v[kPerLane];
    float mx = -INFINITY;
#pragma unroll
    for (int s = 0; s < kPerLane; ++s) {
      const int ex = lane + 32 * s;
      // L2 loads (__ldcg): the other CTAs' stores are not in this SM's L1.
      v[s] = ex < p.experts ? to_float(__ldcg(static_cast<const T*>(p.logits) + int64_t(t) * p.experts + ex))
                            : -INFINITY;
      mx = fmaxf(mx, v[s]);
    }
    for (int m = 16; m > 0; m /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, m));
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < kPerLane; ++s) sum += v[s] == -INFINITY ? 0.f : expf(v[s] - mx);
    for (int m = 16; m > 0; m /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, m);

    unsigned taken = 0;  // bit s: expert lane + 32 s is picked
    float mine = 0.f;    // lane j keeps the probability of pick j
    float picked_sum = 0.f;
    for (int j = 0; j < p.top_k; ++j) {
      // This lane's best unpicked expert (scanning upwards keeps the lower expert on equal logits) ...
      float best = -INFINITY;
      int best_ex = INT32_MAX;
#pragma unroll
      for (int s = 0; s < kPerLane; ++s) {
        const int ex = lane + 32 * s;
        if (ex < p.experts && !((taken >> s) & 1u) && (best_ex == INT32_MAX || v[s] > best)) best = v[s], best_ex = ex;
      }
      // ... then the warp's: the larger logit, or the lower expert on equal logits.
      for (int m = 16; m > 0; m /= 2) {
        const float other = __shfl_xor_sync(0xFFFFFFFFu, best, m);
        const int other_ex = __shfl_xor_sync(0xFFFFFFFFu, best_ex, m);
        if (other_ex != INT32_MAX &&
            (best_ex == INT32_MAX || other > best || (other == best && other_ex < best_ex))) {
          best = other, best_ex = other_ex;
        }
      }
      if (best_ex % 32 == lane) taken |= 1u << (best_ex / 32);
      const float prob = expf(best - mx) / sum;
      picked_sum += prob;
      if (lane == j) mine = prob;
      if (lane == 0) p.topk_ids[int64_t(t) * p.top_k + j] = best_ex;
    }
    if (lane < p.top_k) {
      const float w = p.renormalize ? mine / picked_sum : mine;
      static_cast<T*>(p.topk_weights)[int64_t(t) * p.top_k + lane] = from_float<T>(w);
    }
  }
}

// T: __nv_bfloat16 or __half. The caller checks the limits above.
template <typename T>
cudaError_t launch_moe_router_topk(const RouterParams& p, cudaStream_t stream) {
  const int blocks = (p.experts + kRouterWarps - 1) / kRouterWarps;
  moe_router_topk_kernel<T><<<blocks, kRouterWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace adallm_moe
