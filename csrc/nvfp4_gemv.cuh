// NVFP4 weight-streaming GEMV for few rows (M <= 16): y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
// Also serves routed MoE experts (one "pair" = one (token, expert) row, each with its own weight).
//
// Data (canonical layout, adallm_ops/ops.py; read as stored, no repack):
//   x      T [M, K] row-major (T = half or bf16), 16-byte aligned, K % 32 == 0
//   w      uint8 [E][N, K/2]: row n holds elements k = 2i (low nibble), 2i+1 (high nibble) in byte i
//   ws     e4m3  [E][N, K/16]: one scale per 16 consecutive k of a row
//   gs     fp32  [E]: per-tensor (per-expert) scale, read on the device (no host sync: graph safe)
//   bias   T [N] or null;  y  T [pairs][M, N]
//
// Work split. The GEMV runs on the tensor cores with A and B swapped: A = 16 weight rows x 16 k (the
// dequantized weights), B = 16 k x 8 columns of x^T (x rows 0..7, or 8..15 for the second "m-tile"),
// C = 16 weight rows x 8 outputs, accumulated in fp32. x rows >= M are zero registers.
//
//   CTA = 8 warps = WN row groups x WK k groups (WK a power of two picked from K, see gemv_wk_log2).
//   Warp (wn, wk) owns 16 weight rows n0 + [0, 16) and every WK-th "warp step" of K.
//   Warp step = 4 VEC slots of 32 k (one 16-byte vector of packed weights per row), VEC = 4 (M <= 8)
//     or 2: lane (g = lane / 4, t = lane % 4) loads rows n0 + g and n0 + g + 8 at slots step + 4v + t,
//     v < VEC: each load instruction reads 64 contiguous bytes per row (4 lanes), 2 VEC loads of 16 B in
//     flight per lane, weights streamed with L1::no_allocate + L2 evict_first.
//
// Order of k inside an MMA. The MMA sums over its 16 k, so any assignment of k to fragment slots works
// as long as A and B agree: block scales are applied to A in registers before the MMA, so the 16 k of
// one MMA need not share a scale block. Lane t's 16-byte vector = 4 words of 8 nibbles e0..e7; word w
// feeds two MMAs (q = 0, 1). For MMA (w, q) the lane's A registers are the pairs (e_2q, e_2q+4) and
// (e_2q+1, e_2q+5) of rows g and g+8 (fp4_pair: one shift per pair), and its B registers are the same
// k of x: (x_2q, x_2q+4), (x_2q+1, x_2q+5), built from one 16-byte load of x with two byte permutes.
//
// Reduction: each warp's fp32 C goes to shared memory; the CTA sums the WK partial results in a fixed
// order (deterministic), multiplies by global * 2^7 (kDequantUnscale), adds the bias and stores T.
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
};

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvMaxM = 16;                         // two m-tiles of 8
// 16-byte weight vectors per row per lane per step (loads in flight: 2 rows x VEC). With two m-tiles
// the x fragments of a step take twice the registers, so the step halves to stay within 128 registers
// (2 CTAs of 256 threads per SM) without spilling.
template <int MT> constexpr int gemv_vecs() { return MT == 1 ? 4 : 2; }

// Warps along K (log2). Enough warp steps for every k-group, else rows. With VEC = 4 a step is 4 lanes
// x 4 vectors = 16 slots of 32 k: K = 4096 -> 128 slots = 8 steps -> WK = 8 (16 rows per CTA, 256 CTAs
// for N = 4096); K = 2048 -> 4 steps -> WK = 4, WN = 2; K = 768 -> 24 slots = 2 steps -> WK = 2, WN = 4.
inline int gemv_wk_log2(int K, int slots_per_step) {
    const int steps = (K / 32 + slots_per_step - 1) / slots_per_step;
    int lg = 0;
    while ((1 << lg) < steps && (1 << lg) < kGemvWarps) ++lg;
    return lg;
}

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvThreads, 2) nvfp4_gemv_kernel(Nvfp4GemvArgs a, int wk_log2, int pair0) {
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
    const bool okA = nA < N, okB = nB < N;
    const uint8_t* wA = w + static_cast<int64_t>(okA ? nA : 0) * row_bytes;
    const uint8_t* wB = w + static_cast<int64_t>(okB ? nB : 0) * row_bytes;
    const uint8_t* sA = ws + static_cast<int64_t>(okA ? nA : 0) * row_scales;
    const uint8_t* sB = ws + static_cast<int64_t>(okB ? nB : 0) * row_scales;

    constexpr int kGemvVecs = gemv_vecs<MT>(), kGemvSlotsPerStep = 4 * kGemvVecs;
    const int slots = K / 32;
    const uint64_t policy = l2_evict_first_policy();
    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] = 0.0f;

    for (int step = wk * kGemvSlotsPerStep; step < slots; step += WK * kGemvSlotsPerStep) {
        uint4 va[kGemvVecs], vb[kGemvVecs];
        uint32_t ua[kGemvVecs], ub[kGemvVecs];
#pragma unroll
        for (int v = 0; v < kGemvVecs; ++v) {
            const int s = step + 4 * v + t;
            const bool ok = s < slots;
            va[v] = (ok && okA) ? ld_stream_v4(wA + 16 * s, policy) : make_uint4(0, 0, 0, 0);
            vb[v] = (ok && okB) ? ld_stream_v4(wB + 16 * s, policy) : make_uint4(0, 0, 0, 0);
            // The two scales of the slot's 32 k (2-byte aligned: K % 32 == 0).
            ua[v] = (ok && okA) ? __ldg(reinterpret_cast<const uint16_t*>(sA + 2 * s)) : 0u;
            ub[v] = (ok && okB) ? __ldg(reinterpret_cast<const uint16_t*>(sB + 2 * s)) : 0u;
        }
#pragma unroll
        for (int v = 0; v < kGemvVecs; ++v) {
            const int s = step + 4 * v + t;
            const uint32_t scA = scale_pair<T>(ua[v]), scB = scale_pair<T>(ub[v]);
#pragma unroll
            for (int wd = 0; wd < 4; ++wd) {
                // x[m][32 s + 8 wd .. + 8] for this lane's m = g + 8 mt: regs (x0,x1) (x2,x3) (x4,x5) (x6,x7).
                uint4 xr[MT];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int m = g + 8 * mt;
                    xr[mt] = (s < slots && m < M)
                                 ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + 32 * s) + wd)
                                 : make_uint4(0, 0, 0, 0);
                }
                // Words 0, 1 of the vector are scale block 2s (low byte), words 2, 3 block 2s + 1.
                const uint32_t sel = wd < 2 ? 0x1010 : 0x3232;
                const uint32_t bsA = __byte_perm(scA, scA, sel), bsB = __byte_perm(scB, scB, sel);
                const uint32_t qa = (&va[v].x)[wd], qb = (&vb[v].x)[wd];
                {  // q = 0: k (0, 4) and (1, 5) of the word
                    const uint32_t af[4] = {mul2<T>(fp4_pair<T, 0>(qa), bsA), mul2<T>(fp4_pair<T, 0>(qb), bsB),
                                            mul2<T>(fp4_pair<T, 1>(qa), bsA), mul2<T>(fp4_pair<T, 1>(qb), bsB)};
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        mma_16816<T>(acc[mt], af, __byte_perm(xr[mt].x, xr[mt].z, 0x5410),
                                     __byte_perm(xr[mt].x, xr[mt].z, 0x7632));
                }
                {  // q = 1: k (2, 6) and (3, 7)
                    const uint32_t af[4] = {mul2<T>(fp4_pair<T, 2>(qa), bsA), mul2<T>(fp4_pair<T, 2>(qb), bsB),
                                            mul2<T>(fp4_pair<T, 3>(qa), bsA), mul2<T>(fp4_pair<T, 3>(qb), bsB)};
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        mma_16816<T>(acc[mt], af, __byte_perm(xr[mt].y, xr[mt].w, 0x5410),
                                     __byte_perm(xr[mt].y, xr[mt].w, 0x7632));
                }
            }
        }
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

    const float gscale = a.gs[e] * kDequantUnscale;
    const T* bias = static_cast<const T*>(a.bias);
    T* y = static_cast<T*>(a.y) + static_cast<int64_t>(pair) * M * N;
    // Consecutive threads take consecutive rows n (contiguous in y) of one column m.
    for (int idx = threadIdx.x; idx < rows_cta * MT * 8; idx += kGemvThreads) {
        const int nl = idx % rows_cta, m = idx / rows_cta;
        const int n = blockIdx.x * rows_cta + nl;
        if (n >= N || m >= M) continue;
        const int wg = nl / 16, r = nl % 16;
        float sum = 0.0f;
        for (int kk = 0; kk < WK; ++kk) sum += red[wg * WK + kk][r][m];
        float out = sum * gscale;
        if (bias != nullptr) out += to_float(bias[n]);
        if (bad_expert) out = __int_as_float(0x7fc00000);  // quiet NaN
        y[static_cast<int64_t>(m) * N + n] = from_float<T>(out);
    }
}

// Launches the GEMV for `pairs` independent problems (1 for a plain linear). Returns the launch error.
template <typename T>
cudaError_t launch_nvfp4_gemv(const Nvfp4GemvArgs& a, int pairs, cudaStream_t stream) {
    const int mt = a.M <= 8 ? 1 : 2;
    const int wk_log2 = gemv_wk_log2(a.K, 4 * (mt == 1 ? gemv_vecs<1>() : gemv_vecs<2>()));
    const int rows_cta = (kGemvWarps >> wk_log2) * 16;
    const int grid_x = (a.N + rows_cta - 1) / rows_cta;
    constexpr int kMaxGridY = 65535;  // CUDA's limit on gridDim.y
    for (int p0 = 0; p0 < pairs; p0 += kMaxGridY) {
        const dim3 grid(grid_x, pairs - p0 < kMaxGridY ? pairs - p0 : kMaxGridY);
        if (mt == 1)
            nvfp4_gemv_kernel<T, 1><<<grid, kGemvThreads, 0, stream>>>(a, wk_log2, p0);
        else
            nvfp4_gemv_kernel<T, 2><<<grid, kGemvThreads, 0, stream>>>(a, wk_log2, p0);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

}  // namespace adallm
