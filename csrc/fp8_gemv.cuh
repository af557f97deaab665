// FP8 weight-only GEMV for few rows (M <= 16): y[M, N] = x[M, K] @ (w * s[:, None])^T, the FP8 lm_head's decode.
//
// Data (adallm_ops/ops.py, read as stored):
//   x  T [M, K] row-major (T = half or bf16), 16-byte aligned, K % 16 == 0
//   w  e4m3 [N, K] row-major, 16-byte aligned;  s  fp32 [N]: w[n, k] = e4m3(w[n, k]) * s[n]
//   y  T [M, N]
//
// Why its own kernel. An lm_head is the largest matrix of a decoder (Qwen3-8B: 151936 x 4096) and is read once
// per token, so at batch 1 it is weight streaming like nvfp4_gemv.cuh. E4M3 has no per-block scale and converts
// to fp16 exactly in one instruction per pair on sm_89+ (cvt.rn.f16x2.e4m3x2; sm_80: a bit trick, e4m3_unpack_factor),
// so the decode that bounds the NVFP4 GEMVs is small here: 250 SASS instructions per 4 KB of weights on sm_90 against
// ~700-900 (benchmarks/sass_mix.py; 83-92% of copy bandwidth on the H200, linear_notes.md, twelfth session).
//
// Math: mma.m16n8k16 in fp16 with A = 16 weight rows x 16 k and B = 16 k x 8 columns of x^T (x rows 0..7, or
// 8..15 for the second m-tile), fp32 accumulation. fp16, not bf16: E4M3 -> fp16 is exact and cheap. bf16 x enters
// fp16 through a power of two per row, 2^xs[m], that puts its largest |x| in [2^14, 2^15): no overflow, and
// every bf16 value down to 2^-24 of that largest stays exact (8 significant bits fit fp16's 11). Smaller ones
// lose bits below the fp32 sum's own rounding. The output multiplies by s[n] 2^-xs[m] (and 256 on sm_80).
//
// Order of k inside an MMA (the MMA sums its 16 k, so A and B only have to agree). Lane (g = lane / 4, t = lane % 4)
// loads 16 consecutive bytes k0 + 16 t + [0, 16) of rows g and g + 8: 4 words. For MMA j (word j), the lane's
// A registers are bytes (4j, 4j+1) of row g (a0), of row g + 8 (a1), and bytes (4j+2, 4j+3) of both (a2, a3);
// its B registers are x[g][k0 + 16 t + 4j + (0, 1)] (b0) and (+2, +3) (b1), i.e. words 2j and 2j + 1 of the
// 32 bytes of fp16 x at k0 + 16 t: two 16-byte shared-memory loads, no permutes.
//
// Work split. One CTA of 16 warps per SM (persistent grid). The CTA first stages x into shared memory as fp16
// (warp m scales row m: one warp per row, no barrier but the one after staging), zero past K up to whole items and
// one zero row for lanes of rows m >= M (so the loop checks no k and no m), each row padded by 16 bytes so that the
// 8 rows g of a B load fall in different banks. Warp i of the grid then takes the 16-row tiles
// i, i + warps, i + 2 warps, ... over all of K (no partial sums to reduce), an item = kFp8GemvVec vectors of 16
// bytes per row per lane (256 k), with the next item's weights loaded before this item's math.
// Warps are numbered warp-major, i = warp * gridDim.x + blockIdx.x, so the warps that get one tile more (the lowest
// tiles % warps of them) are spread over all SMs: every SM then has about tiles / gridDim.x tiles. Numbered CTA-major,
// they filled whole CTAs first: Qwen3-8B's head (9496 tiles, 2112 warps on 132 SMs) gave SMs 0-64 80 tiles each and
// SMs 66-131 64 (a balanced share is 71.9). Measured at M = 1 on the H200: 182.4 -> 175.6 us per call, 85% of copy
// bandwidth (less than 80 / 71.9: within an SM, warps that end early leave their share of issue and bandwidth to the
// others; linear_notes.md, fifteenth session).
#pragma once

#include "dynamic_smem.cuh"
#include "fp8_convert.cuh"
#include "nvfp4_common.cuh"  // mma_16816, ld_stream_v4, ld_x_v4, l2_evict_first_policy

namespace adallm {

struct Fp8GemvArgs {
    const void* x;     // T [M, K]
    const uint8_t* w;  // e4m3 [N, K]
    const float* s;    // fp32 [N]
    void* y;           // T [M, N]
    int M, N, K;
};

constexpr int kFp8GemvWarps = 16;
constexpr int kFp8GemvMaxM = 16;   // two m-tiles of 8
constexpr int kFp8GemvVec = 4;     // 16-byte vectors per row per lane in an item: 64 x 4 = 256 k, 4 KB per warp
constexpr int kFp8ItemK = 64 * kFp8GemvVec;
constexpr int kFp8XPadHalves = 8;  // 16 bytes per staged x row: consecutive rows start 4 banks apart

// Staged x row stride in halves: K rounded up to whole items (zeros past K, so no k is ever checked), plus the pad.
__host__ __device__ inline int fp8_x_stride(int K) { return (K + kFp8ItemK - 1) / kFp8ItemK * kFp8ItemK + kFp8XPadHalves; }

// Dynamic shared memory of a launch: M staged x rows and one zero row (for the lanes of rows m >= M), then one
// fp32 unscale per row.
inline size_t fp8_gemv_smem_bytes(int M, int K) {
    return static_cast<size_t>(M + 1) * fp8_x_stride(K) * sizeof(__half) + kFp8GemvMaxM * sizeof(float);
}

// One item's weights: the 16-byte vectors of the lane's rows g (a) and g + 8 (b).
struct Fp8Stage {
    uint4 a[kFp8GemvVec], b[kFp8GemvVec];
};

template <typename T, int MT>
__global__ void __launch_bounds__(kFp8GemvWarps * 32, 1) fp8_gemv_kernel(Fp8GemvArgs args) {
    extern __shared__ __align__(16) uint8_t smem[];
    constexpr int VEC = kFp8GemvVec;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int M = args.M, N = args.N, K = args.K;
    const int xstride = fp8_x_stride(K);
    __half* xh = reinterpret_cast<__half*>(smem);  // rows 0..M-1: x; row M: zeros
    float* unscale = reinterpret_cast<float*>(smem + static_cast<size_t>(M + 1) * xstride * sizeof(__half));

    const int tiles = (N + 15) / 16;
    const int warps = gridDim.x * kFp8GemvWarps;
    const int items_per_tile = (K + kFp8ItemK - 1) / kFp8ItemK;
    const uint64_t policy = l2_evict_first_policy();
    const int row_vecs = K / 16;

    // Item (tile, c): vector v of the lane's rows is k = 256 c + 64 v + 16 t. Rows past N read row N - 1 and
    // vectors past K read the row's last vector (their x is zero). 32-bit offsets: the launcher checks N K < 2^31.
    auto load = [&](Fp8Stage& st, int tile, int c) {
        const uint4* w = reinterpret_cast<const uint4*>(args.w);
        const uint4* wa = w + min(16 * tile + g, N - 1) * row_vecs;
        const uint4* wb = w + min(16 * tile + g + 8, N - 1) * row_vecs;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const int vec = min(4 * (VEC * c + v) + t, row_vecs - 1);
            st.a[v] = ld_stream_v4(wa + vec, policy);
            st.b[v] = ld_stream_v4(wb + vec, policy);
        }
    };

    // The first item's weights do not depend on x: in flight while x is staged.
    int tile = warp * gridDim.x + blockIdx.x;  // this warp's tiles: tile, tile + warps, ... (warp-major: see the top)
    Fp8Stage cur;
    if (tile < tiles) load(cur, tile, 0);

    // Stage x: warp m converts row m to fp16 times 2^xs[m] (largest |x| in [2^14, 2^15); all-zero, inf or NaN
    // rows: xs = 0, so inf and NaN propagate as in the reference); zeros past K and in row M.
    const T* x = static_cast<const T*>(args.x);
    for (int m = warp; m < M; m += kFp8GemvWarps) {
        const T* xr = x + static_cast<int64_t>(m) * K;
        float mx = 0.0f;
        for (int k = 8 * lane; k < K; k += 8 * 32) {
            const uint4 u = ld_x_v4(xr + k);
            const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
            for (int i = 0; i < 8; ++i) mx = fmaxf(mx, fabsf(to_float(e[i])));  // drops NaN; NaN x still propagates
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
        const int e = static_cast<int>((__float_as_uint(mx) >> 23) & 0xFF) - 127;  // mx in [2^e, 2^(e+1))
        // xs in [-113, 126] (a finite bf16 has e <= 127): 2^xs and 2^-xs are normal floats. mx = 0 or inf: xs = 0.
        const int xs = (mx == 0.0f || e == 128) ? 0 : min(14 - e, 126);
        const float mul = __uint_as_float(static_cast<uint32_t>(127 + xs) << 23);
        for (int k = 8 * lane; k < xstride - kFp8XPadHalves; k += 8 * 32) {
            __align__(16) __half h[8];
            if (k < K) {
                const uint4 u = ld_x_v4(xr + k);
                const T* e8 = reinterpret_cast<const T*>(&u);
#pragma unroll
                for (int i = 0; i < 8; ++i) h[i] = __float2half_rn(to_float(e8[i]) * mul);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) h[i] = __float2half_rn(0.0f);
            }
            *reinterpret_cast<uint4*>(xh + static_cast<int64_t>(m) * xstride + k) = *reinterpret_cast<const uint4*>(h);
        }
        if (lane == 0)
            unscale[m] = __uint_as_float(static_cast<uint32_t>(127 - xs) << 23) * adallm_fp8::e4m3_unpack_factor();
    }
    for (int k = 8 * threadIdx.x; k < xstride; k += 8 * kFp8GemvWarps * 32)
        *reinterpret_cast<uint4*>(xh + static_cast<int64_t>(M) * xstride + k) = make_uint4(0, 0, 0, 0);
    __syncthreads();

    // The lane's B rows: x row g + 8 mt at k = 16 t, or the zero row.
    const __half* xb[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) xb[mt] = xh + static_cast<int64_t>(g + 8 * mt < M ? g + 8 * mt : M) * xstride + 16 * t;

    float acc[MT][4];
    // Accumulates item (tile, c), zeroing the sums at a tile's first item and storing them after its last.
    auto compute = [&](const Fp8Stage& st, int tile, int c) {
        if (c == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[mt][i] = 0.0f;
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            uint4 bx[MT][2];  // the lane's 32 bytes of x at k = 256 c + 64 v + 16 t
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint4* p = reinterpret_cast<const uint4*>(xb[mt] + kFp8ItemK * c + 64 * v);
                bx[mt][0] = p[0];
                bx[mt][1] = p[1];
            }
#pragma unroll
            for (int wd = 0; wd < 4; ++wd) {
                uint32_t a[4];  // (row g, bytes 4wd..+1), (row g+8, same), (row g, 4wd+2..+3), (row g+8, same)
                adallm_fp8::e4m3x4_to_half2x2((&st.a[v].x)[wd], a[0], a[2]);
                adallm_fp8::e4m3x4_to_half2x2((&st.b[v].x)[wd], a[1], a[3]);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const uint32_t* b = &bx[mt][0].x;
                    mma_16816<__half>(acc[mt], a, b[2 * wd], b[2 * wd + 1]);
                }
            }
        }
        if (c == items_per_tile - 1) {
            // C fragment: (row g, cols 2t, 2t + 1), (row g + 8, same); col = x row m.
            T* y = static_cast<T*>(args.y);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int m = 8 * mt + 2 * t + (i & 1), n = 16 * tile + g + 8 * (i >> 1);
                    if (m < M && n < N)
                        y[static_cast<int64_t>(m) * N + n] = from_float<T>(acc[mt][i] * args.s[n] * unscale[m]);
                }
        }
    };

    // Two stages in turn: the next item's weights are in flight during this item's math (no register copies).
    int c = 0;
    auto advance = [&](int& tl, int& ci) {
        if (++ci == items_per_tile) {
            ci = 0;
            tl += warps;
        }
    };
    Fp8Stage nxt;
    while (tile < tiles) {
        int tile1 = tile, c1 = c;
        advance(tile1, c1);
        if (tile1 < tiles) load(nxt, tile1, c1);
        compute(cur, tile, c);
        if (tile1 >= tiles) break;
        int tile2 = tile1, c2 = c1;
        advance(tile2, c2);
        if (tile2 < tiles) load(cur, tile2, c2);
        compute(nxt, tile1, c1);
        tile = tile2;
        c = c2;
    }
}

// Launches the GEMV, or returns cudaErrorNotSupported when the staged x does not fit the device's shared memory per
// CTA (the caller then dequantizes; e.g. M = 16 at K = 4096 needs 140 KB, more than sm_89's 99 KB), or when N K
// overflows the kernel's 32-bit offsets.
template <typename T>
cudaError_t launch_fp8_gemv(const Fp8GemvArgs& a, int num_sms, cudaStream_t stream) {
    const size_t smem = fp8_gemv_smem_bytes(a.M, a.K);
    static int smem_cache[64] = {};
    int optin = 0;
    const cudaError_t err = dynamic_smem_optin(smem_cache, optin, fp8_gemv_kernel<T, 1>, fp8_gemv_kernel<T, 2>);
    if (err != cudaSuccess) return err;
    if (smem > static_cast<size_t>(optin) || static_cast<int64_t>(a.N) * a.K >= (int64_t{1} << 31))
        return cudaErrorNotSupported;
    const int tiles = (a.N + 15) / 16;
    const int grid = min(num_sms, (tiles + kFp8GemvWarps - 1) / kFp8GemvWarps);
    if (a.M > 8)
        fp8_gemv_kernel<T, 2><<<grid, kFp8GemvWarps * 32, smem, stream>>>(a);
    else
        fp8_gemv_kernel<T, 1><<<grid, kFp8GemvWarps * 32, smem, stream>>>(a);
    return cudaGetLastError();
}

}  // namespace adallm
