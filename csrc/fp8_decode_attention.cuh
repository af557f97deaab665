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
// CTA (split, hkv, b), 4 warps. The chunk streams through shared memory in tiles of kTile = 64 tokens of
// K and V (+ their scales) in a ring of kStages stages filled with cp.async: kStages - 1 tiles (at least
// kInFlightBytes) load while one is consumed; each tile is read from global memory once and serves all
// G query heads of the group (GQA costs no extra traffic).
//
// Math on tensor cores, mma.sync.m16n8k16 with f16 operands and fp32 accumulators (no fp8 mma: its
// accumulator loses bits, KERNELS.md). e4m3 converts to f16 exactly; q is exact in f16 after a per-head
// power-of-two rescale; the probabilities enter the PV product as a two-term f16 sum (hi + lo, ~22 bits:
// in a CPU emulation of the GPU tests, one f16 term alone brought the error at fp16 output to 1.98x the
// fp32 reference's, at the tests' 2x bound; with both terms it matched the reference's).
// So the roundings beyond the fp32 reference's are the tensor core's fp32 accumulation, that split and
// the fast exp2.
//
// One warp step = 16 tokens x the 8 heads of the warp's head group (G <= 8: one group, heads >= G are
// zero padding; 8 < G <= 16: two groups, warps 0-1 and 2-3, each pair covering the whole tile).
// Lane = 4 * gid + tid4 (gid 0..7, tid4 0..3), the PTX ISA names groupID / threadID_in_group.
// m16n8k16 fragments (PTX ISA 9.7.14.5.8, f16 A/B in f16x2 registers, the lower index in the lower half):
//   A 16x16 row-major: a0a1 = (row gid,   cols 2tid4, 2tid4+1)   a2a3 = (row gid+8, same cols)
//                      a4a5 = (row gid,   cols 2tid4+8, +9)      a6a7 = (row gid+8, cols 2tid4+8, +9)
//   B 16x8:            b0b1 = (rows 2tid4, 2tid4+1; col gid)      b2b3 = (rows 2tid4+8, +9; col gid)
//   C 16x8 fp32:       c0 c1 = (row gid; cols 2tid4, 2tid4+1)     c2 c3 = (row gid+8; same cols)
//
//   S = Q K^T:   M = heads (rows 8..15 zero), N = 8 tokens (two N tiles per step), K = 16 dims per k-slice.
//                C (head gid; tokens 2tid4, 2tid4+1) is exactly the B fragment the PV product needs,
//                so probabilities never leave registers; the per-token k scale multiplies C's columns.
//   O^T = V^T P^T: M = 16 dims (one m-block each), N = 8 heads, K = the step's 16 tokens; the per-token
//                v scale is folded into P before the f16 rounding. C (dims; heads 2tid4, 2tid4+1).
// The dot products do not care which dimension is which, so the mma's d index is permuted to make every
// lane's share of a token row contiguous (one 16-byte shared-memory load feeds 4 k-slices or 4 m-blocks):
//   QK, k-slice kk = 4c + w, mma col k: d = 16 * k_chunk(tid4, c) + 4w + 2 (k >= 8) + (k & 1), tid4 = (k % 8) / 2
//           k_chunk(t, c) = t (D = 64), 2t + (c & 1) + 8 (c >> 1) (D >= 128); lane loads q and K there.
//   PV, m-block mb, mma row r: byte j = 2 mb + (r >= 8) of lane gid's slice, d = v_byte(gid, j) =
//           8 gid + j (D = 64), 16 (gid + 8 (j / 16)) + j % 16 (D >= 128); the same d for the output.
// A V word of token rows t, t+1 becomes (t, t+1) byte pairs with one byte_perm (0x5140 / 0x7362), which
// is the f16x2 order of a0a1 / a2a3 (and, from rows t+8, t+9, of a4a5 / a6a7).
//
// Shared memory: a token row of D bytes is kChunks = D/16 chunks of 16 bytes; chunk c is stored at
// c ^ (row & kSwizzle), kSwizzle = min(kChunks, 8) - 1, so that both read patterns (K: rows r, r+1 x
// four tid4; V: rows 2tid4 (+1, +8, +9) x eight gid) hit distinct banks for D >= 128 (D = 64's 8-byte
// V reads keep a 2-way conflict: four 64-byte rows of one parity share 16 banks).
//
// Softmax in the log2 domain (q's scale carries sm_scale * log2(e)), online per tile and per warp: a
// running max m of the logits of the lane's head and a running max R of |v_scale| over the warp's tokens;
// P = exp2(s - m) * v_scale / R is in [-1, 1], so its f16 terms neither overflow nor lose the leading
// bits; the accumulator is rescaled (warp-uniform branch) only when m or R grows.
#pragma once

#include <cfloat>

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
constexpr int kWarpTokens = 16;                       // tokens of one warp step (the PV mma's K)
constexpr int kTile = kDecodeWarps * kWarpTokens;     // tokens per pipeline stage
constexpr int kHeadsPerGroup = 8;                     // N of the PV mma; QK uses rows 0..7 of its M = 16
constexpr int kMaxGroup = 2 * kHeadsPerGroup;         // two head groups at most
constexpr int kInFlightBytes = 32 * 1024;             // per CTA; with >= 2 CTAs per SM this covers the
                                                      // H100's latency-bandwidth product (~25 KB per SM)
constexpr float kMinVScale = FLT_MIN;                 // R's start: a normal float, so 1 / R is finite

template <int D>
struct DecodeTile {
  static constexpr int kKvBytes = kTile * D;                          // of K (and as much of V) per stage
  static constexpr int kStageBytes = 2 * kKvBytes + 2 * kTile * 4;    // K, V, k_scale, v_scale
  static constexpr int kStages = 1 + (kInFlightBytes + kStageBytes - 1) / kStageBytes;  // 5 / 3 / 2
  static constexpr int kSmemBytes = kStages * kStageBytes;            // 43.5 / 49.5 / 65 KB (D 64/128/256)
  static constexpr int kChunks = D / 16;
  static constexpr int kSwizzle = (kChunks < 8 ? kChunks : 8) - 1;
  static constexpr int kKChunks = D / 64;                 // 16-byte K loads per lane and token row
  static constexpr int kVPiece = D == 64 ? 8 : 16;        // bytes of one V load
  static constexpr int kVPieces = D / 8 / kVPiece;        // V loads per lane and token row
};

template <int D>
__device__ __forceinline__ int smem_offset(int row, int byte) {  // byte of a token row -> tile offset
  return row * D + ((((byte >> 4) ^ (row & DecodeTile<D>::kSwizzle))) << 4) + (byte & 15);
}

template <int D>
__device__ __forceinline__ int k_chunk(int tid4, int c) {
  return D == 64 ? tid4 : 2 * tid4 + (c & 1) + 8 * (c >> 1);
}

template <int D>
__device__ __forceinline__ int v_byte(int gid, int j) {
  return D == 64 ? 8 * gid + j : 16 * (gid + 8 * (j >> 4)) + (j & 15);
}

// c += A B, m16n8k16, f16 operands, fp32 accumulators (fragment layout above).
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t half2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// (a, b) -> two f16x2 words whose sum is a, b to ~22 bits: hi = round(a, b), lo = round(rest).
__device__ __forceinline__ void split_half2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  const float2 hf = __half22float2(h);
  hi = half2_bits(h);
  lo = half2_bits(__floats2half2_rn(a - hf.x, b - hf.y));
}

// HGN head groups of 8 heads (1: G <= 8, 2: G <= 16).
template <int D, int HGN>
__global__ void __launch_bounds__(kDecodeThreads) fp8_decode_kernel(const DecodeParams p) {
  using Tile = DecodeTile<D>;
  constexpr int kWarpsPerGroup = kDecodeWarps / HGN;
  constexpr int kSteps = kTile / (kWarpTokens * kWarpsPerGroup);  // 16-token steps per warp and tile
  constexpr int kMb = D / 16;                                      // QK k-slices = PV m-blocks
  static_assert(2 * kTile == kDecodeThreads, "one scale copy per thread");
  static_assert(kMaxDecodeSplits == 64, "the final merge: two splits per lane, rounds of 8");
  static_assert((kDecodeWarps * kHeadsPerGroup * (D + 2) + kMaxGroup * kMaxDecodeSplits) * 4 <= Tile::kSmemBytes,
                "reduction buffers reuse the pipeline's shared memory");
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ bool s_last;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, gid = lane / 4, tid4 = lane % 4;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int G = p.group;
  const int64_t qrow0 = (int64_t(b) * p.hkv + h) * G;  // (b, first head of KV head h) row of q / out
  const int hg = warp / kWarpsPerGroup, tw = warp % kWarpsPerGroup;
  const int head = hg * kHeadsPerGroup + gid;  // this lane's QK row / softmax head (>= G: padding)

  // q first: its latency overlaps the seqlens load and the pipeline prologue.
  uint4 q_raw[Tile::kKChunks][2];
#pragma unroll
  for (int c = 0; c < Tile::kKChunks; ++c) {
    q_raw[c][0] = q_raw[c][1] = make_uint4(0, 0, 0, 0);
    if (head < G) {
      const uint4* src = reinterpret_cast<const uint4*>(p.q + (qrow0 + head) * D + 16 * k_chunk<D>(tid4, c));
      q_raw[c][0] = src[0];
      q_raw[c][1] = src[1];
    }
  }

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
  // Chunks of at least kMinTokensPerSplit tokens: a short row runs on few CTAs (one: no merge at all).
  const int per_split = max((n + p.splits - 1) / p.splits, kMinTokensPerSplit);
  const int chunk = (per_split + kTile - 1) / kTile * kTile;
  const int n_active = (n + chunk - 1) / chunk;
  if (split >= n_active) return;
  const int c0 = lo + split * chunk, c1 = min(seqlen, c0 + chunk);
  const int ntiles = (c1 - c0 + kTile - 1) / kTile;
  const int slot0 = c0 % p.length;
  const int64_t row = (int64_t(b) * p.hkv + h) * p.length;  // first slot of this (b, hkv) in the cache

  // Copy duties: thread tid moves 16-byte chunk `part` of tile rows t0 + r * kRowStep (same swizzle for
  // every r, so the shared-memory offsets differ by constants), and the k (tid < kTile) or v scale of
  // row tid % kTile.
  constexpr int kRowStep = kDecodeThreads / Tile::kChunks, kCopies = kTile / kRowStep;
  static_assert(kRowStep % (Tile::kSwizzle + 1) == 0, "rows t0 + r * kRowStep share a swizzle");
  const int part = tid % Tile::kChunks, t0 = tid / Tile::kChunks, dst0 = smem_offset<D>(t0, 16 * part);
  const uint8_t* k_src = p.k_cache + row * D + 16 * part;
  const uint8_t* v_src = p.v_cache + row * D + 16 * part;
  const float* s_src = (tid < kTile ? p.k_scale : p.v_scale) + row;
  auto load_tile = [&](int j) {
    unsigned char* st = smem + (j % Tile::kStages) * Tile::kStageBytes;
    const int tp0 = c0 + j * kTile;
    int ts0 = slot0 + j * kTile;  // j * kTile < c1 - c0 <= n <= L: one subtraction wraps it
    if (ts0 >= p.length) ts0 -= p.length;
#pragma unroll
    for (int r = 0; r < kCopies; ++r) {
      const int t = t0 + r * kRowStep;
      const bool valid = tp0 + t < c1;
      int slot = ts0 + t;
      if (slot >= p.length) slot -= p.length;
      const size_t off = size_t(unsigned(valid ? slot : 0)) * D;
      cp_async_16(st + dst0 + r * kRowStep * D, k_src + off, valid);
      cp_async_16(st + Tile::kKvBytes + dst0 + r * kRowStep * D, v_src + off, valid);
    }
    const int t = tid % kTile;
    const bool valid = tp0 + t < c1;
    int slot = ts0 + t;
    if (slot >= p.length) slot -= p.length;
    cp_async_4(st + 2 * Tile::kKvBytes + tid * 4, s_src + (valid ? slot : 0), valid);
  };

#pragma unroll
  for (int j = 0; j < Tile::kStages - 1; ++j) {
    if (j < ntiles) load_tile(j);
    cp_async_commit();
  }

  // q as A fragments (rows 0..7 of the QK mma), times 2^e with e chosen per head so that its largest
  // |element| lies in [2^14, 2^15): no bf16 value overflows f16 and every one down to 2^-28 times the
  // row's largest stays exact (f16 normals start at 2^-14); 2^-e goes into the logit scale qs.
  uint32_t qa[kMb][2];
  float qs;
  {
    float qf[Tile::kKChunks][16], amax = 0.f;
#pragma unroll
    for (int c = 0; c < Tile::kKChunks; ++c) {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(q_raw[c]);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        qf[c][i] = bits16_to_float(bits[i], p.bf16);
        amax = fmaxf(amax, fabsf(qf[c][i]));
      }
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 2));
    // amax in [2^(E-127), 2^(E-126)) for its biased exponent E, so e = 127 + 14 - E; at most 126 keeps
    // 2^-e a normal float (rows below 2^-112, zero padding included, are merely scaled less).
    const int e = min(141 - ((__float_as_int(amax) >> 23) & 0xFF), 126);
    const float up = __int_as_float((127 + e) << 23), down = __int_as_float((127 - e) << 23);
    qs = p.q_scale * e4m3_unpack_factor() * down;
#pragma unroll
    for (int c = 0; c < Tile::kKChunks; ++c)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        qa[4 * c + w][0] = half2_bits(__floats2half2_rn(qf[c][4 * w] * up, qf[c][4 * w + 1] * up));
        qa[4 * c + w][1] = half2_bits(__floats2half2_rn(qf[c][4 * w + 2] * up, qf[c][4 * w + 3] * up));
      }
  }

  float o[kMb][4];  // O^T fragments: (dims of m-block mb; heads 2tid4, 2tid4+1) times R
#pragma unroll
  for (int mb = 0; mb < kMb; ++mb) o[mb][0] = o[mb][1] = o[mb][2] = o[mb][3] = 0.f;
  float m = -INFINITY, l = 0.f, vmax_run = kMinVScale, v_rcp = 1.f / kMinVScale;

  for (int j = 0; j < ntiles; ++j) {
    cp_async_wait<Tile::kStages - 2>();
    __syncthreads();  // tile j landed for every thread; stage (j - 1) % kStages is free to refill
    if (j + Tile::kStages - 1 < ntiles) load_tile(j + Tile::kStages - 1);
    cp_async_commit();

    const unsigned char* sk = smem + (j % Tile::kStages) * Tile::kStageBytes;
    const unsigned char* sv = sk + Tile::kKvBytes;
    const float* sks = reinterpret_cast<const float*>(sk + 2 * Tile::kKvBytes);
    const float* svs = sks + kTile;
    const int tp0 = c0 + j * kTile;

    // Logits (log2 domain) of head `head` for tokens tok0(s) + 8 nt + 2 tid4 + i, and their v scales.
    float x[kSteps][2][2], vsc[kSteps][2][2];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int tok0 = (s * kWarpsPerGroup + tw) * kWarpTokens;
      float acc[2][4] = {};
#pragma unroll
      for (int c = 0; c < Tile::kKChunks; ++c) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int r = tok0 + 8 * nt + gid;
          const uint4 kw = *reinterpret_cast<const uint4*>(sk + smem_offset<D>(r, 16 * k_chunk<D>(tid4, c)));
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            uint32_t b0, b1;
            e4m3x4_to_half2x2(word_of(kw, w), b0, b1);
            mma_16816(acc[nt], qa[4 * c + w][0], 0u, qa[4 * c + w][1], 0u, b0, b1);
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int t = tok0 + 8 * nt + 2 * tid4;
        const float2 ks = *reinterpret_cast<const float2*>(sks + t);
        const float2 vs = *reinterpret_cast<const float2*>(svs + t);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          float xv = acc[nt][i] * qs * (i ? ks.y : ks.x);
          if (p.softcap_log2 > 0.f) xv = p.softcap_log2 * tanhf(xv);
          x[s][nt][i] = tp0 + t + i < c1 ? xv : -INFINITY;
          vsc[s][nt][i] = i ? vs.y : vs.x;  // 0 for tokens past c1 (zero-filled)
        }
      }
    }

    // Online softmax, once per tile: rescale only when the logit max or the v-scale max grew.
    float mx = -INFINITY, vmx = 0.f;
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mx = fmaxf(mx, x[s][nt][i]);
          vmx = fmaxf(vmx, fabsf(vsc[s][nt][i]));
        }
#pragma unroll
    for (int o_ = 1; o_ < 4; o_ *= 2) {  // over tid4: the 4 lanes of a head, the warp's tokens
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o_));
      vmx = fmaxf(vmx, __shfl_xor_sync(0xFFFFFFFFu, vmx, o_));
    }
    if (__any_sync(0xFFFFFFFFu, mx > m || vmx > vmax_run)) {
      const float m_new = fmaxf(m, mx), r_new = fmaxf(vmax_run, vmx);
      const float f = m_new == -INFINITY ? 1.f : exp2f(m - m_new);  // 0 while m is -inf
      l *= f;
      const float fr = vmax_run / r_new;
      // O's columns are heads 2tid4, 2tid4+1, whose factors live in lanes 4 * head.
      const float f0 = __shfl_sync(0xFFFFFFFFu, f, 8 * tid4) * fr;
      const float f1 = __shfl_sync(0xFFFFFFFFu, f, 8 * tid4 + 4) * fr;
#pragma unroll
      for (int mb = 0; mb < kMb; ++mb) {
        o[mb][0] *= f0;
        o[mb][1] *= f1;
        o[mb][2] *= f0;
        o[mb][3] *= f1;
      }
      m = m_new;
      vmax_run = r_new;
      v_rcp = 1.f / r_new;
    }
    const float mref = m == -INFINITY ? 0.f : m;

#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      // P^T as B fragments: b0b1 = tokens 2tid4, +1 (N tile 0), b2b3 = tokens 8 + 2tid4, +1 (N tile 1).
      uint32_t p_hi[2], p_lo[2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const float p0 = exp2f(x[s][nt][0] - mref), p1 = exp2f(x[s][nt][1] - mref);
        l += p0 + p1;
        split_half2(p0 * (vsc[s][nt][0] * v_rcp), p1 * (vsc[s][nt][1] * v_rcp), p_hi[nt], p_lo[nt]);
      }
      const int r0 = (s * kWarpsPerGroup + tw) * kWarpTokens + 2 * tid4;  // A cols 2tid4, +1 / +8, +9
#pragma unroll
      for (int c = 0; c < Tile::kVPieces; ++c) {
        uint32_t vw[4][Tile::kVPiece / 4];  // rows r0, r0+1, r0+8, r0+9
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int r = r0 + (k & 1) + 8 * (k >> 1);
          const unsigned char* src = sv + smem_offset<D>(r, v_byte<D>(gid, c * Tile::kVPiece));
          if constexpr (Tile::kVPiece == 16) {
            const uint4 v = *reinterpret_cast<const uint4*>(src);
            vw[k][0] = v.x, vw[k][1] = v.y, vw[k][2] = v.z, vw[k][3] = v.w;
          } else {
            const uint2 v = *reinterpret_cast<const uint2*>(src);
            vw[k][0] = v.x, vw[k][1] = v.y;
          }
        }
#pragma unroll
        for (int w = 0; w < Tile::kVPiece / 4; ++w) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {  // bytes (0, 1) -> m-block 2w, (2, 3) -> 2w + 1
            const int mb = c * Tile::kVPiece / 2 + 2 * w + half;
            const uint32_t sel = half ? 0x7362u : 0x5140u;
            uint32_t a01, a23, a45, a67;
            e4m3x4_to_half2x2(__byte_perm(vw[0][w], vw[1][w], sel), a01, a23);
            e4m3x4_to_half2x2(__byte_perm(vw[2][w], vw[3][w], sel), a45, a67);
            mma_16816(o[mb], a01, a23, a45, a67, p_hi[0], p_hi[1]);
            mma_16816(o[mb], a01, a23, a45, a67, p_lo[0], p_lo[1]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  l += __shfl_xor_sync(0xFFFFFFFFu, l, 1);
  l += __shfl_xor_sync(0xFFFFFFFFu, l, 2);
  float* red_o = reinterpret_cast<float*>(smem);                 // [warps][8 heads][D], true scale
  float* red_m = red_o + kDecodeWarps * kHeadsPerGroup * D;      // [warps][8]
  float* red_l = red_m + kDecodeWarps * kHeadsPerGroup;          // [warps][8]
  float* merge_w = red_l + kDecodeWarps * kHeadsPerGroup;        // [kMaxGroup][kMaxDecodeSplits]
  const float o_scale = vmax_run * e4m3_unpack_factor();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float* dst = red_o + (warp * kHeadsPerGroup + 2 * tid4 + i) * D;
#pragma unroll
    for (int j4 = 0; j4 < D / 32; ++j4) {  // slice bytes 4 j4 .. +3 = m-blocks 2 j4, 2 j4 + 1
      const float4 v = make_float4(o[2 * j4][i] * o_scale, o[2 * j4][2 + i] * o_scale,
                                   o[2 * j4 + 1][i] * o_scale, o[2 * j4 + 1][2 + i] * o_scale);
      *reinterpret_cast<float4*>(dst + v_byte<D>(gid, 4 * j4)) = v;
    }
  }
  if (tid4 == 0) {
    red_m[warp * kHeadsPerGroup + gid] = m;
    red_l[warp * kHeadsPerGroup + gid] = l;
  }
  __syncthreads();

  // Merge the warps of each head group; write the output (one split) or this split's partial, 4 dims
  // per thread.
  for (int i = tid; i < G * D / 4; i += kDecodeThreads) {
    const int hd = i / (D / 4), d = 4 * (i % (D / 4));
    const int w0 = (hd / kHeadsPerGroup) * kWarpsPerGroup, g = hd % kHeadsPerGroup;
    float mx = -INFINITY;
    for (int w = w0; w < w0 + kWarpsPerGroup; ++w) mx = fmaxf(mx, red_m[w * kHeadsPerGroup + g]);
    const float mref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int w = w0; w < w0 + kWarpsPerGroup; ++w) {
      const float f = exp2f(red_m[w * kHeadsPerGroup + g] - mref);
      sum += red_l[w * kHeadsPerGroup + g] * f;
      const float4 v = *reinterpret_cast<const float4*>(red_o + (w * kHeadsPerGroup + g) * D + d);
      acc.x += v.x * f, acc.y += v.y * f, acc.z += v.z * f, acc.w += v.w * f;
    }
    const float inv = 1.f / sum;  // sum >= 1: the chunk holds a valid token
    acc.x *= inv, acc.y *= inv, acc.z *= inv, acc.w *= inv;
    if (n_active == 1) {
      const uint2 bits = make_uint2(float_to_bits16(acc.x, p.bf16) | uint32_t(float_to_bits16(acc.y, p.bf16)) << 16,
                                    float_to_bits16(acc.z, p.bf16) | uint32_t(float_to_bits16(acc.w, p.bf16)) << 16);
      *reinterpret_cast<uint2*>(p.out + (qrow0 + hd) * D + d) = bits;
    } else {
      const int64_t prow = (qrow0 + hd) * p.splits + split;
      *reinterpret_cast<float4*>(p.ws_o + prow * D + d) = acc;
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

  for (int hd = warp; hd < G; hd += kDecodeWarps) {  // one warp per head, two splits per lane
    const float* lse = p.ws_lse + (qrow0 + hd) * p.splits;
    const float l0 = lane < n_active ? __ldcg(lse + lane) : -INFINITY;
    const float l1 = lane + 32 < n_active ? __ldcg(lse + lane + 32) : -INFINITY;
    float mx = fmaxf(l0, l1);
#pragma unroll
    for (int o_ = 16; o_ > 0; o_ /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o_));
    const float w0 = exp2f(l0 - mx), w1 = exp2f(l1 - mx);  // mx is finite: split 0 is active
    float sum = w0 + w1;
#pragma unroll
    for (int o_ = 16; o_ > 0; o_ /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o_);
    merge_w[hd * kMaxDecodeSplits + lane] = w0 / sum;
    merge_w[hd * kMaxDecodeSplits + lane + 32] = w1 / sum;
  }
  __syncthreads();
  for (int i = tid; i < G * D / 4; i += kDecodeThreads) {
    const int hd = i / (D / 4), d = 4 * (i % (D / 4));
    const float4* po = reinterpret_cast<const float4*>(p.ws_o + (qrow0 + hd) * p.splits * D + d);
    const float* w = merge_w + hd * kMaxDecodeSplits;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    // Eight loads in flight per round trip (this loop is the latency tail of every split call); weights
    // past n_active are 0 and sp0 + 8 <= kMaxDecodeSplits.
    for (int sp0 = 0; sp0 < n_active; sp0 += 8) {
      float4 v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k)
        v[k] = sp0 + k < n_active ? __ldcg(po + (sp0 + k) * (D / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float wk = w[sp0 + k];
        acc.x = fmaf(wk, v[k].x, acc.x), acc.y = fmaf(wk, v[k].y, acc.y);
        acc.z = fmaf(wk, v[k].z, acc.z), acc.w = fmaf(wk, v[k].w, acc.w);
      }
    }
    const uint2 bits = make_uint2(float_to_bits16(acc.x, p.bf16) | uint32_t(float_to_bits16(acc.y, p.bf16)) << 16,
                                  float_to_bits16(acc.z, p.bf16) | uint32_t(float_to_bits16(acc.w, p.bf16)) << 16);
    *reinterpret_cast<uint2*>(p.out + (qrow0 + hd) * D + d) = bits;
  }
}

using DecodeKernel = void (*)(DecodeParams);

struct DecodeConfig {
  DecodeKernel kernel;  // null: unsupported head_dim / group
  int smem_bytes;       // dynamic shared memory of a CTA
};

template <int D>
DecodeConfig decode_config_d(int group) {
  if (group >= 1 && group <= kHeadsPerGroup) return {fp8_decode_kernel<D, 1>, DecodeTile<D>::kSmemBytes};
  if (group > kHeadsPerGroup && group <= kMaxGroup) return {fp8_decode_kernel<D, 2>, DecodeTile<D>::kSmemBytes};
  return {nullptr, 0};
}

// The compiled configuration for (head_dim 64/128/256, group <= kMaxGroup).
inline DecodeConfig decode_config(int head_dim, int group) {
  switch (head_dim) {
    case 64: return decode_config_d<64>(group);
    case 128: return decode_config_d<128>(group);
    case 256: return decode_config_d<256>(group);
    default: return {nullptr, 0};
  }
}

// Prepares the configuration on the current device and says how many of its CTAs fit on one SM
// (registers, shared memory), for decode_num_splits: the kernel takes more than the 48 KB of shared
// memory a launch gets by default, so its limit is raised here (cudaFuncSetAttribute: per device, no
// stream work, so it is allowed while a CUDA graph is captured). Call it on each device before the
// first launch there (fp8_kv_ops.cu does, once per device and configuration).
inline cudaError_t decode_prepare(int head_dim, int group, int* ctas) {
  const DecodeConfig cfg = decode_config(head_dim, group);
  if (cfg.kernel == nullptr) return cudaErrorInvalidValue;
  const cudaError_t err = cudaFuncSetAttribute(cfg.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cfg.smem_bytes);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, cfg.kernel, kDecodeThreads, cfg.smem_bytes);
}

// p.splits must come from decode_num_splits (<= kMaxDecodeSplits); ws_o / ws_lse may be null when
// p.splits == 1. Unsupported head_dim / group: cudaErrorInvalidValue.
inline cudaError_t launch_fp8_decode_attention(const DecodeParams& p, int head_dim, cudaStream_t stream) {
  const DecodeConfig cfg = decode_config(head_dim, p.group);
  if (cfg.kernel == nullptr || p.splits < 1 || p.splits > kMaxDecodeSplits) return cudaErrorInvalidValue;
  cfg.kernel<<<dim3(p.splits, p.hkv, p.batch), kDecodeThreads, cfg.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace adallm_fp8
