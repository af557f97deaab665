// NVFP4 weight-streaming GEMV for few rows (M <= 16): y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
// Also serves routed MoE experts (one "pair" = one (token, expert) row, each with its own weight).
//
// Data (canonical layout, adallm_ops/ops.py; read as stored, no repack):
//   x      T [M, K] row-major (T = half or bf16), 16-byte aligned, K % 32 == 0
//   w      uint8 [E][N, K/2]: row n holds elements k = 2i (low nibble), 2i+1 (high nibble) in byte i
//   ws     e4m3  [E][N, K/16]: one scale per 16 consecutive k of a row
//   gs     fp32  [E]: per-tensor (per-expert) scale, read on the device (no host sync: graph safe)
//   bias   T [N] or null;  y  T [pairs][M, N]
//   residual  T [M, N] or null (plain linear only): y = T(T(x W^T + bias) + residual), the decoder layer's residual
//          add rounded as the separate add rounds it (so the fused and unfused paths give the same bits)
//   norm_w T [K] or null: the rows kernel's RMSNorm prologue (nvfp4_gemv_rows.cuh); this kernel never gets one
//
// Math. The GEMV runs on the tensor cores with A and B swapped: A = 16 weight rows x 16 k (the
// dequantized weights), B = 16 k x 8 columns of x^T (x rows 0..7, or 8..15 for the second "m-tile"),
// C = 16 weight rows x 8 outputs, accumulated in fp32. x rows >= M are zero registers.
//
// Work split.
//   CTA = 8 warps = WN row tiles of 16 rows x WK k groups (WK = 4 or 8, picked by the launcher).
//   Slot = 32 k of one row = one 16-byte vector of packed weights (+ 2 scale bytes).
//   Item = 4 lanes x VEC slots: lane (g = lane / 4, t = lane % 4) loads rows n0 + g and n0 + g + 8 at
//     slots 4 VEC step + 4 v + t, v < VEC: each load instruction reads 64 contiguous bytes per row, and
//     a lane has 2 VEC loads of 16 B in flight (weights streamed with L1::no_allocate + L2 evict_first).
//   Warp (wn, wk) owns steps wk, wk + WK, wk + 2 WK, ... of its tile (its items j = 0, 1, ...).
//
// Order of k inside an MMA. The MMA sums over its 16 k, so any assignment of k to fragment slots works
// as long as A and B agree: block scales are applied to A in registers before the MMA, so the 16 k of
// one MMA need not share a scale block. Lane t's 16-byte vector = 4 words of 8 nibbles e0..e7; word w
// feeds two MMAs (q = 0, 1). For MMA (w, q) the lane's A registers are the pairs (e_2q, e_2q+4) and
// (e_2q+1, e_2q+5) of rows g and g+8 (fp4_pair: one shift per pair), and its B registers are the same
// k of x: (x_2q, x_2q+4), (x_2q+1, x_2q+5), built from one 16-byte load of x with two byte permutes.
//
// Reduction. WK = 1: each lane writes its C fragment directly. WK > 1: the warps' fp32 C go to shared
// memory; the CTA sums the WK partial results in a fixed order (deterministic). Both multiply by
// global * 2^7 (kDequantUnscale), add the bias and store T.
#pragma once

#include "nvfp4_common.cuh"

#include <cuda_runtime.h>


namespace adallm {

struct Nvfp4GemvArgs {
    const void* x;           // T [pairs / x_pair_div][M, K]
    const uint8_t* w;        // uint8 [E][N, K/2]
    const uint8_t* ws;       // e4m3 [E][N, K/16]
    const float* gs;         // fp32 [E]
    const void* bias;        // T [N] or nullptr
    void* y;                 // T [pairs][M, N]
    const void* expert_ids;  // int32 / int64 [pairs] (routed experts) or nullptr (plain linear: expert 0)
    bool ids_int64;
    int num_experts;         // E
    int x_pair_div;          // pair p reads x block p / x_pair_div (MoE: topk when experts share x, else 1)
    int M, N, K;
    const void* residual;    // T [M, N] added to y (see above), or nullptr; M <= 8 only (one m-tile: with the add
                             // in the two m-tile kernel, its main loop scheduled differently and batch 16 decoded
                             // 1.7% slower, so the launcher adds it after that kernel)
    const void* norm_w;      // T [K]: RMSNorm weight applied to x first (rows kernel, M = 1), or nullptr
    float norm_eps;
};

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvMaxM = 16;  // two m-tiles of 8

// One item's loads: VEC 16-byte weight vectors and VEC scale pairs for each of the lane's two rows.
template <int VEC> struct GemvStage {
    uint4 wa[VEC], wb[VEC];
    uint32_t sa[VEC], sb[VEC];
};

// CTAS_PER_SM: the occupancy the register budget is sized for (__launch_bounds__'s minimum blocks per SM).
template <typename T, int MT, int VEC, int CTAS_PER_SM>
__global__ void __launch_bounds__(kGemvThreads, CTAS_PER_SM) nvfp4_gemv_kernel(Nvfp4GemvArgs a, int wk_log2, int pair0) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int WK = 1 << wk_log2, WN = kGemvWarps >> wk_log2;
    const int wk = warp & (WK - 1), wn = warp >> wk_log2;
    const int pair = pair0 + blockIdx.y;
    const int M = a.M, N = a.N, K = a.K;

    int64_t e = 0;
    if (a.expert_ids != nullptr)
        e = a.ids_int64 ? static_cast<const int64_t*>(a.expert_ids)[pair]
                        : static_cast<const int32_t*>(a.expert_ids)[pair];
    // An out-of-range expert id cannot raise on the device without a host sync: its outputs become NaN.
    const bool bad_expert = e < 0 || e >= a.num_experts;
    if (bad_expert) e = 0;

    const int64_t row_bytes = K / 2, row_scales = K / 16;
    const uint8_t* w = a.w + e * N * row_bytes;
    const uint8_t* ws = a.ws + e * N * row_scales;
    const T* x = static_cast<const T*>(a.x) + static_cast<int64_t>(pair / a.x_pair_div) * M * K;

    const int rows_cta = WN * 16;
    const int n0 = blockIdx.x * rows_cta + wn * 16;
    const int nA = n0 + g, nB = n0 + g + 8;

    constexpr int kSlotsPerStep = 4 * VEC;
    const int slots = K / 32;
    const int steps = (slots + kSlotsPerStep - 1) / kSlotsPerStep;
    const int items = (steps + WK - 1) >> wk_log2;  // item j of this warp = step wk + j WK
    const uint64_t policy = l2_evict_first_policy();

    // The lane's two rows in w, in slots of 16 bytes, and their scales (2 bytes per slot) in ws. Rows past N
    // read row 0 (never stored) and slots past the end read the row's slot 0 (their x is zero): no load is
    // guarded. Offsets are 32-bit (the launcher checks N K / 2 < 2^31): one address instruction per load.
    const uint32_t rowA = nA < N ? nA : 0, rowB = nB < N ? nB : 0;
    const uint4* wA = reinterpret_cast<const uint4*>(w) + rowA * slots;
    const uint4* wB = reinterpret_cast<const uint4*>(w) + rowB * slots;
    const uint16_t* sA = reinterpret_cast<const uint16_t*>(ws) + rowA * slots;
    const uint16_t* sB = reinterpret_cast<const uint16_t*>(ws) + rowB * slots;
    // x rows of the lane's B fragment (m = g + 8 mt); rows >= M read zeros.
    const T* xl[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        xl[mt] = g + 8 * mt < M ? x + static_cast<int64_t>(g + 8 * mt) * K + 32 * t : nullptr;
    // Item j covers slots item_slot(j) + [0, kSlotsPerStep); the lane's vector v is slot + 4 v + t.
    auto item_slot = [&](int j) { return (wk + (j << wk_log2)) * kSlotsPerStep; };

    // Issues the loads of item j.
    auto load = [&](GemvStage<VEC>& st, int j) {
        const int s0 = item_slot(j) + t;
        const int left = j < items ? slots - s0 : 0;  // slots of this lane's row from s0 on
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const uint32_t s = 4 * v < left ? s0 + 4 * v : 0;
            st.wa[v] = ld_stream_v4(wA + s, policy);
            st.wb[v] = ld_stream_v4(wB + s, policy);
            st.sa[v] = ld_stream_u16(sA + s, policy);
            st.sb[v] = ld_stream_u16(sB + s, policy);
        }
    };

    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] = 0.0f;

    // Decodes item j and accumulates it.
    auto compute = [&](const GemvStage<VEC>& st, int j) {
        const int s0 = item_slot(j);
        const int left = slots - s0 - t;  // slots of this lane's row from s0 + t on
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const bool ok = 4 * v < left;
            const T* xv[MT];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) xv[mt] = ok && xl[mt] != nullptr ? xl[mt] + 32 * s0 + 128 * v : nullptr;
            // Block scales broadcast to both halves: words 0, 1 of the vector are block 2s, words 2, 3 block 2s + 1.
            const uint32_t scA = scale_pair<T>(st.sa[v]), scB = scale_pair<T>(st.sb[v]);
            const uint32_t bsA[2] = {__byte_perm(scA, scA, 0x1010), __byte_perm(scA, scA, 0x3232)};
            const uint32_t bsB[2] = {__byte_perm(scB, scB, 0x1010), __byte_perm(scB, scB, 0x3232)};
#pragma unroll
            for (int wd = 0; wd < 4; ++wd) {
                // x[m][32 s + 8 wd .. + 8] for this lane's m = g + 8 mt: regs (x0,x1) (x2,x3) (x4,x5) (x6,x7).
                uint4 xr[MT];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    xr[mt] = xv[mt] != nullptr ? ld_x_v4(xv[mt] + 8 * wd) : make_uint4(0, 0, 0, 0);
                uint32_t pa[4], pb[4];
                fp4_pairs<T>((&st.wa[v].x)[wd], pa);
                fp4_pairs<T>((&st.wb[v].x)[wd], pb);
                const uint32_t sa2 = bsA[wd >> 1], sb2 = bsB[wd >> 1];
                {  // q = 0: k (0, 4) and (1, 5) of the word
                    const uint32_t af[4] = {mul2<T>(pa[0], sa2), mul2<T>(pb[0], sb2), mul2<T>(pa[1], sa2),
                                            mul2<T>(pb[1], sb2)};
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        mma_16816<T>(acc[mt], af, __byte_perm(xr[mt].x, xr[mt].z, 0x5410),
                                     __byte_perm(xr[mt].x, xr[mt].z, 0x7632));
                }
                {  // q = 1: k (2, 6) and (3, 7)
                    const uint32_t af[4] = {mul2<T>(pa[2], sa2), mul2<T>(pb[2], sb2), mul2<T>(pa[3], sa2),
                                            mul2<T>(pb[3], sb2)};
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        mma_16816<T>(acc[mt], af, __byte_perm(xr[mt].y, xr[mt].w, 0x5410),
                                     __byte_perm(xr[mt].y, xr[mt].w, 0x7632));
                }
            }
        }
    };

    // One item in flight per warp: measured on the H100, register rings that load 1-3 items ahead of the
    // math were slower (the kernel is bound by instruction issue, see launch_nvfp4_gemv).
    for (int j = 0; j < items; ++j) {
        GemvStage<VEC> st;
        load(st, j);
        if (wk + (j << wk_log2) < steps) compute(st, j);
    }

    const float gscale = a.gs[e] * kDequantUnscale;
    const T* bias = static_cast<const T*>(a.bias);
    const T* residual = static_cast<const T*>(a.residual);
    T* y = static_cast<T*>(a.y) + static_cast<int64_t>(pair) * M * N;
    auto store = [&](int m, int n, float sum) {
        float out = sum * gscale;
        if (bias != nullptr) out += to_float(bias[n]);
        if (bad_expert) out = __int_as_float(0x7fc00000);  // quiet NaN
        const int64_t i = static_cast<int64_t>(m) * N + n;
        if constexpr (MT == 1)  // (see Nvfp4GemvArgs::residual)
            if (residual != nullptr) out = to_float(from_float<T>(out)) + to_float(residual[i]);
        y[i] = from_float<T>(out);
    };

    if (WK == 1) {  // the warp holds whole sums: C fragment (rows g, g + 8; cols 2t, 2t + 1) straight to y
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = 8 * mt + 2 * t + (i & 1), n = n0 + g + 8 * (i >> 1);
                if (m < M && n < N) store(m, n, acc[mt][i]);
            }
        return;
    }

    // C fragment -> shared memory: red[warp][row 0..15][col 0..8 MT).
    __shared__ float red[kGemvWarps][16][MT * 8];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        red[warp][g][8 * mt + 2 * t] = acc[mt][0];
        red[warp][g][8 * mt + 2 * t + 1] = acc[mt][1];
        red[warp][g + 8][8 * mt + 2 * t] = acc[mt][2];
        red[warp][g + 8][8 * mt + 2 * t + 1] = acc[mt][3];
    }
    __syncthreads();
    // Consecutive threads take consecutive rows n (contiguous in y) of one column m.
    for (int idx = threadIdx.x; idx < rows_cta * MT * 8; idx += kGemvThreads) {
        const int nl = idx % rows_cta, m = idx / rows_cta;
        const int n = blockIdx.x * rows_cta + nl;
        if (n >= N || m >= M) continue;
        const int wg = nl / 16, r = nl % 16;
        float sum = 0.0f;
        for (int kk = 0; kk < WK; ++kk) sum += red[wg * WK + kk][r][m];
        store(m, n, sum);
    }
}

// Warps along K (log2). Measured on the H100 (benchmarks/results/linear_notes.md): WK = 4 (32 rows per
// CTA) is best once that gives at least one CTA per SM, else WK = 8 (16 rows per CTA, more CTAs);
// WK = 1 or 2 (long K ranges per warp) was slower everywhere. 132 SMs:
//   4096 x 4096 (q/o): 256 tiles of 16 rows -> 128 CTAs at WK = 4 < 132 -> WK = 8, 256 CTAs
//   6144 x 4096 (qkv): 384 tiles -> WK = 4, 192 CTAs;  24576 x 4096 (gate_up): WK = 4, 768 CTAs
// Long K at M <= 8 (long_k: K >= 8192, one m-tile) takes WK = 8 even with enough CTAs for WK = 4. H200, all
// four WK of each decode shape in one process (linear_notes.md, eighth session): Gemma3-27B's down (5376 x 21504)
// 38.7 -> 34.6 us at M = 1, 39.3 -> 36.0 at M = 4; at M = 16 WK = 8 was 3% slower, and at K <= 5376 WK = 4 stays
// best (Gemma3-27B's qkv 13.8 vs 16.0 us at WK = 8).
// Capped so that every warp has a step of K (steps = K / (32 * 4 VEC)): Qwen3-30B-A3B's expert down
// (K = 768, 2 steps at VEC = 4) gets WK = 2, 64 rows per CTA, instead of half its warps idle and twice the CTAs.
inline int gemv_wk_log2(int64_t tiles, int num_sms, int steps, bool long_k) {
    int wk_log2 = tiles * 4 / kGemvWarps >= num_sms && !long_k ? 2 : 3;
    while (wk_log2 > 0 && (1 << wk_log2) > steps) --wk_log2;
    return wk_log2;
}

// Both GEMV kernels index weights and scales with 32-bit offsets.
inline bool gemv_offsets_fit_32bit(const Nvfp4GemvArgs& a) {
    return static_cast<int64_t>(a.N) * a.K / 2 < (int64_t{1} << 31);
}

template <typename T, int MT, int VEC, int CTAS_PER_SM>
cudaError_t launch_gemv_shape(const Nvfp4GemvArgs& a, int pairs, int num_sms, cudaStream_t stream) {
    if (!gemv_offsets_fit_32bit(a)) return cudaErrorInvalidValue;
    const int64_t tiles = static_cast<int64_t>((a.N + 15) / 16) * pairs;
    const int steps = (a.K / 32 + 4 * VEC - 1) / (4 * VEC);
    const int wk_log2 = gemv_wk_log2(tiles, num_sms, steps, MT == 1 && a.K >= 8192);
    const int rows_cta = (kGemvWarps >> wk_log2) * 16;
    const int grid_x = (a.N + rows_cta - 1) / rows_cta;
    constexpr int kMaxGridY = 65535;  // CUDA's limit on gridDim.y
    for (int p0 = 0; p0 < pairs; p0 += kMaxGridY) {
        const dim3 grid(grid_x, pairs - p0 < kMaxGridY ? pairs - p0 : kMaxGridY);
        nvfp4_gemv_kernel<T, MT, VEC, CTAS_PER_SM><<<grid, kGemvThreads, 0, stream>>>(a, wk_log2, p0);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

// Launches the GEMV for `pairs` independent problems (1 for a plain linear). Returns the launch error.
// One m-tile (M <= 8): 4 vectors per row per lane per item (8 x 16 B loads in flight per lane), 2 CTAs per
// SM (105 registers on sm_90, bf16). Two m-tiles (M > 8) take 4 vectors as well (126 registers, no spills):
// on the H200 at M = 16 they beat 2 vectors by up to 7% (Qwen3-8B gate_up 48.9 -> 47.2 us, down 24.5 -> 22.8;
// Gemma3-27B gate_up 106.1 -> 102.1), never more than 1% slower; 1 CTA per SM was 20-30% slower (exp/m16_sweep.py
// of gemv_m16_sweep.diff, linear_notes.md tenth session). At M = 16 the kernel still runs at about BF16 cuBLAS's
// time: twice the bytes in flight was not the cure, and the cause is open (linear_notes.md).
// Routed experts (one row per pair) take 2 vectors and 3 CTAs per SM (80 registers, no spills): their CTAs
// are short (K = 768 or 2048) and each pays its own load latency, so more resident CTAs win. bench_linear.py on
// the H200 (benchmarks/results/linear.json against linear_14cb60c.json): Qwen3-30B-A3B expert gate_up 14.2 ->
// 10.6 us at one token, expert down 20.6 -> 17.5 us at 4 tokens. In a sweep of uncommitted variants the same
// setting slowed Qwen3-8B's dense shapes by up to 17% (k/v; linear_notes.md, fifth session), so dense layers keep
// 4 vectors.
template <typename T>
cudaError_t launch_nvfp4_gemv(const Nvfp4GemvArgs& a, int pairs, int num_sms, cudaStream_t stream) {
    if (a.M > 8) return launch_gemv_shape<T, 2, 4, 2>(a, pairs, num_sms, stream);
    if (a.expert_ids != nullptr) return launch_gemv_shape<T, 1, 2, 3>(a, pairs, num_sms, stream);
    return launch_gemv_shape<T, 1, 4, 2>(a, pairs, num_sms, stream);
}

}  // namespace adallm
