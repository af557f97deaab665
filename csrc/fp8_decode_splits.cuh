// How many KV splits (CTAs along the KV length) the FP8 decode attention launches per (sequence, KV head).
#pragma once

namespace adallm_fp8 {

constexpr int kMaxDecodeSplits = 64;   // bounds the partial-output workspace and the final merge's work
// 256, not 128 or 64: at batch 1 a split's chunk costs a near-fixed ~4.5 us, and below ~256 tokens a second chunk
// plus the merge cost more than they save. H200, Qwen3-8B heads, batch 1, us per call with 256 (with 128; with 64)
// (attention_notes.md, seventh session): 130-192 tokens 4.4-4.6 (5.5-6.6; 5.0-5.3), 256 tokens 5.3 (5.5-6.8;
// 5.0-5.2), 1024 tokens 7.3 (7.1; 6.6), 4096 tokens 9.0 (9.5; 10.4).
constexpr int kMinTokensPerSplit = 256;

// The split count is gridDim.x, so it depends on shapes only (never on cache_seqlens): a CUDA graph
// captured once stays valid. Each CTA then sizes its own chunk from the row's actual length
// (chunk = max(ceil(n / splits), kMinTokensPerSplit) rounded up to a tile), so a short row in a long
// cache uses few, short chunks (a row of <= kMinTokensPerSplit tokens one CTA and no merge) and the
// extra CTAs exit at once.
// Aim: one full wave. batch * Hkv rarely fills the GPU at decode, so the splits fill it up to the number
// of CTAs that can be resident at once (`resident` = SMs x CTAs per SM of the kernel), rounding down: a
// second, partial wave would cost a whole chunk's time for a few CTAs (measured on the H100: 320 CTAs
// on 264 slots ran at 0.8x the speed of 264). No more splits than a cache of `length` tokens can give
// kMinTokensPerSplit each, and no more than kMaxDecodeSplits.
//
// Worked example, H100 (132 SMs), Qwen3-8B layer (Hkv = 8, G = 4, D = 128: 3 CTAs per SM, register
// bound at 139-147 registers, so resident = 396), L = 131072:
//   batch 1: 396 / 8 = 49 splits -> 392 CTAs; a 131072-token row gets chunks of 2688 tokens,
//            a 4096-token row chunks of 256 tokens (16 CTAs busy per head, the rest exit at once);
//   batch 8: 396 / 64 = 6 splits -> 384 CTAs;  batch 64: 512 rows > 396 -> 1 split (two waves).
//   L = 512 (a sliding-window ring buffer), batch 1: min(49, 512 / 256) = 2 splits.
// Qwen3-30B-A3B (Hkv = 4, G = 8), batch 1: 396 / 4 = 99 -> kMaxDecodeSplits = 64 splits, 256 CTAs.
inline int decode_num_splits(int batch, int hkv, int length, int resident) {
  const long rows = long(batch) * hkv;
  long splits = long(resident) / (rows > 0 ? rows : 1);
  const long by_length = (long(length) + kMinTokensPerSplit - 1) / kMinTokensPerSplit;
  if (splits > by_length) splits = by_length;
  if (splits > kMaxDecodeSplits) splits = kMaxDecodeSplits;
  return splits < 1 ? 1 : int(splits);
}

}  // namespace adallm_fp8
