// How many KV splits (CTAs along the KV length) the FP8 decode attention launches per (sequence, KV head).
#pragma once

namespace adallm_fp8 {

constexpr int kMaxDecodeSplits = 64;   // bounds the partial-output workspace and the final merge's work
constexpr int kMinTokensPerSplit = 128;

// The split count is gridDim.x, so it depends on shapes only (never on cache_seqlens): a CUDA graph
// captured once stays valid. Each CTA then sizes its own chunk from the row's actual length
// (chunk = ceil(n / splits) rounded up to a tile), so a short row in a long cache uses few, short
// chunks and the extra CTAs exit at once.
// Aim: about two CTAs per SM in total, since batch * Hkv alone rarely fills the GPU at decode, but no
// more splits than a cache of `length` tokens can give kMinTokensPerSplit each.
//
// Worked example, H100 (132 SMs), Qwen3-8B layer (Hkv = 8), L = 131072:
//   batch 1: ceil(2 * 132 / 8) = 33 splits -> 264 CTAs; a 131072-token row gets chunks of 4000 tokens,
//            a 4096-token row chunks of 128 tokens (32 CTAs busy per head, the rest exit);
//   batch 8: ceil(264 / 64) = 5 splits -> 320 CTAs.
//   L = 512 (a sliding-window ring buffer), batch 1: min(33, 512 / 128) = 4 splits.
inline int decode_num_splits(int batch, int hkv, int length, int num_sms) {
  const long rows = long(batch) * hkv;
  long splits = (2L * num_sms + rows - 1) / rows;
  const long by_length = (long(length) + kMinTokensPerSplit - 1) / kMinTokensPerSplit;
  if (splits > by_length) splits = by_length;
  if (splits > kMaxDecodeSplits) splits = kMaxDecodeSplits;
  return splits < 1 ? 1 : int(splits);
}

}  // namespace adallm_fp8
