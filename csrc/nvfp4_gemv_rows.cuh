// NVFP4 GEMV for dense layers at M = 1 (batch-1 decode): y[1, N] = x[1, K] @ dequant(W)[N, K]^T (+ bias), or a gated
// MLP's act(gate) * up (the gated epilogue, at the end of this comment).
// Same data and formats as nvfp4_gemv.cuh (read that first). Two changes cut the instructions per weight, which
// bound that kernel (its issue rate stays near 0.56 per cycle however many warps are resident, linear_notes.md);
// a third overlaps the loads with the math. The launcher takes it only for layers with many rows (kRowsMinBlocksPerSm).
//
// 1. Rows, not K, per warp. nvfp4_gemv.cuh's warps walk along K, so every item brings new x (loads, byte permutes,
//    zeroing, addressing: ~15% of its loop). Here warp w keeps k-step s = p W + w of pass p (a step = 8 slots =
//    256 k; lane (g, t) holds slots 8 s + 4 v + t, v = 0, 1) and walks over the CTA's 32-row blocks
//    (block = blockIdx.x + i gridDim.x, two 16-row MMA tiles h), so x is read and arranged once per pass.
//    P passes cover K's steps with W <= 16 warps per CTA, one CTA per SM.
// 2. Block scales on C, not on A. One x row would use one of B's 8 columns; instead B is block-diagonal: column
//    2t + b holds the x of scale block b (words 2b, 2b + 1) of lane t's slot, zeros elsewhere. The MMA for
//    (v, wi, J), wi = 0, 1, J = 0..3, takes A = pair J (e_J, e_J+4) of word wi (a0: row g, a1: row g + 8) and
//    of word 2 + wi (a2, a3), unscaled; B lane (g, t) holds b0 = x pair (J, J + 4) of word wi if g = 2t, and
//    b1 = the pair of word 2 + wi if g = 2t + 1, else zero. After vector v's 8 MMAs, C[row][2t + b] is block
//    (t, b)'s unscaled dot product, and the lane that holds it also holds that block's scale: 4 FFMA per
//    vector instead of an HMUL2 per weight pair.
// 3. One tile ahead. Tile h of block i + 1 is loaded as soon as tile h of block i is decoded, so a tile's loads
//    are always in flight during the math, with no extra registers.
//
// Exactness. A is the shift-decoded E2M1 (fp4_pairs): e2m1 * 2^-14 in fp16, e2m1 * 2^-126 in bf16 (0.5 is a
// 16-bit subnormal, which the tensor cores take exactly: tests/test_cuda_linear.py::test_linear_m1_half_codes...).
// fp16 x enters B as is. bf16 x is multiplied by 2^xs, per warp and pass, so that the largest |x| of the warp's
// 256 k lies in [2^126, 2^127): the products e2m1 2^-126 x 2^xs are then normal fp32 numbers down to 2^-126 of
// the largest (smaller ones may flush; they are below the fp32 sum's rounding). The warp's partial sums are
// multiplied by 2^(134 - xs) (bf16; fp16: 2^22), two normal factors, before they meet the other warps'.
//
// Partial sums: per (block, row), each warp's sum of its 4 lanes t goes to its own shared-memory slot
// (red[i][w][row], added to across passes; no barrier in the loop). After the last pass one barrier, and the CTA
// adds the W partials of each row in a fixed order (deterministic), scales by the global scale, adds the bias.
// Rows past N read row N - 1, never stored; slots past K read slot 0 with zero x: no load is guarded.
//
// Gated epilogue (ACT != kActNone, adallm::nvfp4_linear_glu): W is a fused gate_up weight (gate rows [0, N/2), up
// rows [N/2, N)) and y [1, N/2] = act(gate) * up. The CTA walks, for each of its output blocks, the gate block and
// the up block N/64 blocks later (rows_block), so both sums of an output are in its shared memory at the end: the
// activation costs no launch and no round trip of the 2 N outputs.
//
// RMSNorm prologue (a.norm_w != nullptr; the decoder layer's input_layernorm before q/k/v, post_attention_layernorm
// before gate_up): y = rmsnorm(x) W^T with rmsnorm(x) = x / sqrt(mean(x^2) + eps) * norm_w. The 1 / sqrt(..) is one
// number per row, so it is applied to the sums in the epilogue, and B holds x * norm_w (fp32 product, scaled and
// rounded once, as above; fp16 takes the bf16 path's scaling too, with the largest |x norm_w| in [2^14, 2^15), since
// the product may exceed fp16's range). The CTA's lanes with a B role read every k of x exactly once (over its warps
// and passes), so each CTA sums x^2 from the x it loads anyway; the one barrier before the epilogue publishes the
// warps' sums. The norm kernel this replaces (one launch, ~2 us, per norm) is gone. Rounding differs from the
// separate norm (which rounds x / rms to T before the weight multiply): within the GEMV's own tolerance.
// Residual (a.residual): y = T(T(sum) + residual), as in nvfp4_gemv.cuh.
#pragma once

#include "dynamic_smem.cuh"
#include "nvfp4_gemv.cuh"

#include <type_traits>

namespace adallm {

constexpr int kRowsStepSlots = 8;  // 2 vectors of 4 lanes: 256 k per warp step
constexpr int kRowsMaxWarps = 16;

// The gated epilogue (nvfp4_linear_glu): y[n] = act(gate[n]) * up[n] with gate = rows [0, N/2), up = rows [N/2, N).
enum RowsAct : int { kActNone = 0, kActSilu = 1, kActGeluTanh = 2 };

template <int ACT>
__device__ __forceinline__ float rows_act(float v) {
    if constexpr (ACT == kActSilu) {
        return v / (1.0f + __expf(-v));
    } else {
        constexpr float kSqrt2OverPi = 0.7978845608028654f;
        return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
    }
}

// The CTA's i-th 32-row block. Plain (ACT = kActNone): blockIdx.x + i gridDim.x. Gated: the CTA owns the output
// blocks j' = blockIdx.x + j gridDim.x (32 outputs each) and walks, for each, its gate block j' (i = 2j) and its up
// block j' + half (i = 2j + 1), so both sums of an output meet in the CTA's shared memory.
template <int ACT>
__device__ __forceinline__ int rows_block(int i, int half) {
    if constexpr (ACT == kActNone) return blockIdx.x + i * gridDim.x;
    return blockIdx.x + (i >> 1) * gridDim.x + (i & 1) * half;
}
template <int ACT>
__device__ __forceinline__ bool rows_block_in_range(int i, int blocks) {
    if constexpr (ACT == kActNone) return rows_block<ACT>(i, 0) < blocks;
    return blockIdx.x + (i >> 1) * gridDim.x < blocks / 2;
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kRowsMaxWarps * 32, 1)
nvfp4_gemv_rows_kernel(Nvfp4GemvArgs a, int passes, int blocks_per_cta) {
    extern __shared__ float red[];  // [blocks_per_cta][W][32 rows]
    constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, W = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int N = a.N, K = a.K;
    const int slots = K / 32, steps = (slots + kRowsStepSlots - 1) / kRowsStepSlots;
    const int blocks = (N + 31) / 32;
    const T* x = static_cast<const T*>(a.x);
    const T* norm_w = static_cast<const T*>(a.norm_w);
    const uint4* wv = reinterpret_cast<const uint4*>(a.w);
    const uint16_t* sv = reinterpret_cast<const uint16_t*>(a.ws);
    const uint64_t policy = l2_evict_first_policy();
    // B role of this lane: 0 (g = 2t: words 0, 1 of each slot), 1 (g = 2t + 1: words 2, 3), or none.
    const int role = g == 2 * t ? 0 : g == 2 * t + 1 ? 1 : -1;
    float sum_sq = 0.0f;  // RMSNorm: this lane's sum of x^2 over the k it loads

    for (int p = 0; p < passes; ++p) {
        const int step = p * W + w;
        if (step >= steps) break;  // only in the last pass; no barrier follows inside the loop
        const int s0 = step * kRowsStepSlots + t;
        // The lane's two slots in every row (slot 0 past K: its x is zero), as pointers into row 0: a row's
        // load is then one multiply-add (row * slots on top of these).
        const uint4* wslot[2];
        const uint16_t* sslot[2];
#pragma unroll
        for (int v = 0; v < 2; ++v) {
            const int slot = s0 + 4 * v < slots ? s0 + 4 * v : 0;
            wslot[v] = wv + slot;
            sslot[v] = sv + slot;
        }

        // This lane's x: words 2 role + wi of its two slots (8 elements each), zero past K or without a role; the
        // RMSNorm weight at the same k.
        uint4 xw[2][2], nw[2][2];
#pragma unroll
        for (int v = 0; v < 2; ++v)
#pragma unroll
            for (int wi = 0; wi < 2; ++wi) {
                const bool in = role >= 0 && s0 + 4 * v < slots;
                const int k = 32 * (s0 + 4 * v) + 8 * (2 * role + wi);
                xw[v][wi] = in ? ld_x_v4(x + k) : make_uint4(0, 0, 0, 0);
                nw[v][wi] = in && norm_w != nullptr ? ld_x_v4(norm_w + k) : make_uint4(0, 0, 0, 0);
            }
        // The warp's partials leave scaled by 2^(kPow - xs), two normal floats: kPow undoes the decode's power
        // (2^-14 or 2^-126) and the scales' 2^-8 (e4m3x2_to_half2_bits), so they meet in the output's range.
        constexpr int kTop = kBf16 ? 126 : 14;  // scaled B: largest |value| in [2^kTop, 2^(kTop + 1))
        constexpr int kPow = kTop + 8;
        int xs = 0;  // scaled B: x (* norm_w) * 2^xs
        uint32_t bx[2][2][4];                    // [v][wi][J]: the pair (J, J + 4) of word 2 role + wi
        if (kBf16 || norm_w != nullptr) {
            float f[2][2][8];  // element 2q in the low half of word q
            uint32_t mx = 0;   // largest |f| of the warp's step, as fp32 bits (ordered like the values)
#pragma unroll
            for (int v = 0; v < 2; ++v)
#pragma unroll
                for (int wi = 0; wi < 2; ++wi) {
                    const uint32_t r[4] = {xw[v][wi].x, xw[v][wi].y, xw[v][wi].z, xw[v][wi].w};
                    const uint32_t n[4] = {nw[v][wi].x, nw[v][wi].y, nw[v][wi].z, nw[v][wi].w};
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        float2 e = unpack2<T>(r[q]);
                        if (norm_w != nullptr) {
                            const float2 wn = unpack2<T>(n[q]);
                            sum_sq = fmaf(e.x, e.x, fmaf(e.y, e.y, sum_sq));
                            e.x *= wn.x;
                            e.y *= wn.y;
                        }
                        f[v][wi][2 * q] = e.x;
                        f[v][wi][2 * q + 1] = e.y;
                        mx = max(mx, max(__float_as_uint(e.x) & 0x7FFFFFFFu, __float_as_uint(e.y) & 0x7FFFFFFFu));
                    }
                }
            mx = __reduce_max_sync(0xFFFFFFFFu, mx);
            const int e = static_cast<int>(mx >> 23) - 127;  // largest |f| in [2^e, 2^(e+1)) (0: e = -127)
            // inf / NaN: no scaling, they propagate as in the reference. xs in [-113, 252]: two factors.
            xs = e == 128 ? 0 : min(kTop - e, 252);
            const float mul0 = __uint_as_float(static_cast<uint32_t>(127 + xs / 2) << 23);
            const float mul1 = __uint_as_float(static_cast<uint32_t>(127 + xs - xs / 2) << 23);
#pragma unroll
            for (int v = 0; v < 2; ++v)
#pragma unroll
                for (int wi = 0; wi < 2; ++wi)
#pragma unroll
                    for (int J = 0; J < 4; ++J)
                        bx[v][wi][J] = pack2_rn<T>(f[v][wi][J] * mul0 * mul1, f[v][wi][J + 4] * mul0 * mul1);
        } else {  // fp16 x enters B as is
#pragma unroll
            for (int v = 0; v < 2; ++v)
#pragma unroll
                for (int wi = 0; wi < 2; ++wi) {
                    const uint4 r = xw[v][wi];
                    bx[v][wi][0] = __byte_perm(r.x, r.z, 0x5410);
                    bx[v][wi][1] = __byte_perm(r.x, r.z, 0x7632);
                    bx[v][wi][2] = __byte_perm(r.y, r.w, 0x5410);
                    bx[v][wi][3] = __byte_perm(r.y, r.w, 0x7632);
                }
        }
        const float unscale0 = __uint_as_float(static_cast<uint32_t>(127 + (kPow - xs) / 2) << 23);
        const float unscale1 = __uint_as_float(static_cast<uint32_t>(127 + (kPow - xs) - (kPow - xs) / 2) << 23);
        const uint32_t b0mask = role == 0 ? 0xFFFFFFFFu : 0u, b1mask = role == 1 ? 0xFFFFFFFFu : 0u;
        uint32_t b0[2][2][4], b1[2][2][4];
#pragma unroll
        for (int v = 0; v < 2; ++v)
#pragma unroll
            for (int wi = 0; wi < 2; ++wi)
#pragma unroll
                for (int J = 0; J < 4; ++J) {
                    b0[v][wi][J] = bx[v][wi][J] & b0mask;
                    b1[v][wi][J] = bx[v][wi][J] & b1mask;
                }

        // The lane's rows of a block: tile h = 0, 1 (rows 16 h ..), r = 0, 1 (rows g, g + 8 of the tile); loaded
        // one tile ahead (point 3 above). The CTA's last block loads nothing ahead (a uniform branch): without it, the
        // wasted loads of row N - 1 made the kernel 1.3-1.6x slower than nvfp4_gemv.cuh's at 1-2 blocks per CTA.
        uint4 wq[2][2][2];
        uint32_t sc[2][2][2];
        auto load_tile = [&](int h, int block) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const uint32_t row = min(32 * block + 16 * h + 8 * r + g, N - 1) * slots;
#pragma unroll
                for (int v = 0; v < 2; ++v) {
                    wq[h][r][v] = ld_stream_v4(wslot[v] + row, policy);
                    sc[h][r][v] = ld_stream_u16(sslot[v] + row, policy);
                }
            }
        };
        load_tile(0, blockIdx.x);
        load_tile(1, blockIdx.x);
        for (int i = 0; i < blocks_per_cta; ++i) {
            if (!rows_block_in_range<ACT>(i, blocks)) break;
            const int block = rows_block<ACT>(i, blocks / 2);
            const bool next = rows_block_in_range<ACT>(i + 1, blocks);
            float sum[2][2] = {};  // [h][r]: this lane's slots' scaled sums of rows g, g + 8 of tile h
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int v = 0; v < 2; ++v) {
                    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int wi = 0; wi < 2; ++wi) {
                        uint32_t pa0[4], pb0[4], pa1[4], pb1[4];  // words wi and 2 + wi of rows g, g + 8
                        fp4_pairs<T>((&wq[h][0][v].x)[wi], pa0);
                        fp4_pairs<T>((&wq[h][1][v].x)[wi], pb0);
                        fp4_pairs<T>((&wq[h][0][v].x)[2 + wi], pa1);
                        fp4_pairs<T>((&wq[h][1][v].x)[2 + wi], pb1);
#pragma unroll
                        for (int J = 0; J < 4; ++J) {
                            const uint32_t af[4] = {pa0[J], pb0[J], pa1[J], pb1[J]};
                            mma_16816<T>(c, af, b0[v][wi][J], b1[v][wi][J]);
                        }
                    }
                    // C: (row g; blocks (t, 0), (t, 1)), (row g + 8; same). Scales: e4m3 * 2^-8 as fp16, exact.
                    const uint32_t sA = e4m3x2_to_half2_bits(sc[h][0][v]), sB = e4m3x2_to_half2_bits(sc[h][1][v]);
                    const float2 fA = unpack2<__half>(sA), fB = unpack2<__half>(sB);
                    sum[h][0] = fmaf(c[1], fA.y, fmaf(c[0], fA.x, sum[h][0]));
                    sum[h][1] = fmaf(c[3], fB.y, fmaf(c[2], fB.x, sum[h][1]));
                }
                if (next) load_tile(h, rows_block<ACT>(i + 1, blocks / 2));
            }
            // The 4 lanes t of row g hold its 4 slots' sums: add them, lane t = 0 keeps the warp's partial.
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float s = sum[h][r];
                    s += __shfl_xor_sync(0xFFFFFFFFu, s, 1);
                    s += __shfl_xor_sync(0xFFFFFFFFu, s, 2);
                    if (t == 0) {
                        float& out = red[(i * W + w) * 32 + 16 * h + 8 * r + g];
                        out = (p == 0 ? 0.0f : out) + s * unscale0 * unscale1;
                    }
                }
        }
    }
    float* warp_sum_sq = red + blocks_per_cta * W * 32;  // [W], after the partials (the launcher sizes it)
    if (norm_w != nullptr) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum_sq += __shfl_xor_sync(0xFFFFFFFFu, sum_sq, o);
        if (lane == 0) warp_sum_sq[w] = sum_sq;
    }
    __syncthreads();

    // gscale, times 1 / rms(x) with the RMSNorm prologue: the warps' sums of x^2 added in a fixed order.
    float gscale = a.gs[0];
    if (norm_w != nullptr) {
        float total_sq = 0.0f;
        for (int k = 0; k < W; ++k) total_sq += warp_sum_sq[k];
        gscale *= rsqrtf(total_sq / static_cast<float>(K) + a.norm_eps);
    }
    const T* bias = static_cast<const T*>(a.bias);
    const T* residual = static_cast<const T*>(a.residual);
    T* y = static_cast<T*>(a.y);
    auto total = [&](int i, int row) {  // the W warps' partials of (block slot i, row), in a fixed order
        const float* part = red + i * W * 32 + row;
        float sum = 0.0f;
        for (int k = 0; k < W; ++k) sum += part[32 * k];
        return sum;
    };
    if constexpr (ACT != kActNone) {  // y [1, N/2]: act(gate) * up of each output; no bias (the launcher checks)
        for (int idx = threadIdx.x; idx < blocks_per_cta / 2 * 32; idx += blockDim.x) {
            const int j = idx / 32, row = idx % 32;
            const int out_block = blockIdx.x + j * gridDim.x;
            if (out_block >= blocks / 2) continue;
            y[32 * out_block + row] =
                from_float<T>(rows_act<ACT>(total(2 * j, row) * gscale) * (total(2 * j + 1, row) * gscale));
        }
    } else {
        // Consecutive threads take consecutive rows (contiguous in y).
        for (int idx = threadIdx.x; idx < blocks_per_cta * 32; idx += blockDim.x) {
            const int i = idx / 32, row = idx % 32;
            const int n = 32 * (blockIdx.x + i * gridDim.x) + row;
            if (n >= N) continue;
            float out = total(i, row) * gscale;
            if (bias != nullptr) out += to_float(bias[n]);
            if (residual != nullptr) out = to_float(from_float<T>(out)) + to_float(residual[n]);
            y[n] = from_float<T>(out);
        }
    }
}

// Launches the rows kernel if it suits the shape, else returns cudaErrorNotSupported (the caller then runs
// nvfp4_gemv.cuh's kernel): dense (one pair), M = 1, at least kRowsMinBlocksPerSm 32-row blocks per SM, and the
// partial sums of a CTA within the device's shared memory per CTA.
//   Passes P = ceil(steps / 16), warps W = ceil(steps / P): every warp has a step in every pass but the last
//   (K = 4096: 16 steps, P = 1, W = 16;  K = 12288: 48, P = 3, W = 16;  K = 5376: 21, P = 2, W = 11).
//   Grid = one CTA per SM (the registers allow one 512-thread CTA), ceil(blocks / grid) blocks each.
// Why a minimum of blocks: a warp stages its x once per pass, which only pays over several blocks, and the
// loads of a CTA's first block overlap no math. H200, same-process decode sweep against nvfp4_gemv.cuh
// (linear_notes.md, sixth session): 0.81x the time at Qwen3-8B's gate_up (5.8 blocks per SM), 0.82x at
// Gemma3-27B's (10.2), 0.72x at Qwen3-8B's lm_head (36); at 1-2 blocks per SM 0.99-1.06x, no gain.
constexpr int kRowsMinBlocksPerSm = 4;

// act (RowsAct) != kActNone: the gated epilogue, y [1, N/2]; needs N % 64 == 0 (whole gate and up blocks) and no bias.
// With the RMSNorm prologue (a.norm_w) any N is taken: this is the only kernel that has it, and at 1-2 blocks per SM
// it runs as fast as nvfp4_gemv.cuh (above), so q/k/v (Qwen3-8B: 192 blocks) come here too.
template <typename T>
cudaError_t launch_nvfp4_gemv_rows(const Nvfp4GemvArgs& a, int num_sms, cudaStream_t stream, int act = kActNone) {
    const int blocks = (a.N + 31) / 32;
    const bool norm = a.norm_w != nullptr;
    if (a.expert_ids != nullptr || a.M != 1 || (blocks < num_sms * kRowsMinBlocksPerSm && !norm))
        return cudaErrorNotSupported;
    if (!gemv_offsets_fit_32bit(a)) return cudaErrorNotSupported;
    if (act != kActNone && (a.N % 64 != 0 || a.bias != nullptr || a.residual != nullptr)) return cudaErrorNotSupported;
    const int steps = (a.K / 32 + kRowsStepSlots - 1) / kRowsStepSlots;
    const int passes = (steps + kRowsMaxWarps - 1) / kRowsMaxWarps;
    const int warps = (steps + passes - 1) / passes;
    const int units = act == kActNone ? blocks : blocks / 2;  // what the CTAs share out (gated: output blocks)
    const int grid = units < num_sms ? units : num_sms;      // every CTA has at least one unit
    const int blocks_per_cta = act == kActNone ? (blocks + grid - 1) / grid : 2 * ((units + grid - 1) / grid);
    // The partials [blocks_per_cta][W][32], then the warps' sums of x^2 [W].
    const int smem = static_cast<int>(sizeof(float)) * (blocks_per_cta * warps * 32 + warps);
    static int smem_cache[64] = {};
    int optin = 0;
    const cudaError_t err = dynamic_smem_optin(smem_cache, optin, nvfp4_gemv_rows_kernel<T, kActNone>,
                                               nvfp4_gemv_rows_kernel<T, kActSilu>,
                                               nvfp4_gemv_rows_kernel<T, kActGeluTanh>);
    if (err != cudaSuccess) return err;
    if (smem > optin) return cudaErrorNotSupported;
    const dim3 block(warps * 32);
    switch (act) {
        case kActSilu:
            nvfp4_gemv_rows_kernel<T, kActSilu><<<grid, block, smem, stream>>>(a, passes, blocks_per_cta);
            break;
        case kActGeluTanh:
            nvfp4_gemv_rows_kernel<T, kActGeluTanh><<<grid, block, smem, stream>>>(a, passes, blocks_per_cta);
            break;
        default: nvfp4_gemv_rows_kernel<T, kActNone><<<grid, block, smem, stream>>>(a, passes, blocks_per_cta);
    }
    return cudaGetLastError();
}

}  // namespace adallm
