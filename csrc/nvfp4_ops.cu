// CUDA impls of adallm::nvfp4_quantize, adallm::nvfp4_linear, adallm::nvfp4_linear_glu and
// adallm::nvfp4_moe_linear: argument checks (the same as adallm_ops/ops.py, raised as ValueError), dtype dispatch
// and kernel choice. The kernels themselves (raw pointers, no torch) are in nvfp4_gemv.cuh, nvfp4_gemv_rows.cuh and
// nvfp4_quant.cuh.
//
// nvfp4_linear picks its kernel by M = rows of x (flattened):
//   M = 1 and N >= 4 x 32 rows per SM, or any N with the RMSNorm (same conditions) -> the rows GEMV
//                                                   (nvfp4_gemv_rows.cuh)
//   M <= 16, K % 32 == 0, 16-byte aligned x/weight  -> weight-streaming tensor-core GEMV (nvfp4_gemv.cuh)
//   otherwise                                       -> dequantize W to x.dtype in row chunks, cuBLAS per chunk
// Neither path syncs with the host (the global scale is read on the device), so both are CUDA-graph safe.
// nvfp4_linear_glu (a gated MLP's gate_up GEMV and act(gate) * up) is one rows-GEMV launch with the gated epilogue
// at M = 1 on a rows-kernel shape with N % 64 == 0, else nvfp4_linear followed by ATen's activation and product.
// The decoder layer's RMSNorm (norm_weight) and residual add (residual) of nvfp4_linear / nvfp4_linear_glu: at M = 1 the
// rows GEMV applies the norm in its prologue and epilogue (nvfp4_gemv_rows.cuh); other M normalize x first (ATen,
// rms_norm below, the reference's formula). Every path adds the residual after rounding y, as the separate add would.
// nvfp4_moe_linear runs the GEMV per (token, expert) pair, or, for many pairs outside graph capture (a
// prefill), sorts them by expert and runs grouped GEMMs on dequantized experts (one host sync).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "check.h"
#include "linear_common.h"
#include "nvfp4_gemv_rows.cuh"
#include "nvfp4_quant.cuh"

namespace adallm {
namespace {

constexpr int64_t kBlock = 16;  // NVFP4 elements per E4M3 block scale
// Prefill's chunks (kDequantChunkBytes, linear_common.h) come in multiples of 128 rows so every chunk starts
// 16-byte aligned in the packed weight and its scales.
constexpr int64_t kDequantChunkRows = 128;
// nvfp4_moe_linear switches from the GEMV to sorted, dequantized grouped GEMMs at this many (token, expert)
// pairs per expert (see nvfp4_moe_linear_cuda), when the stream is not being captured into a CUDA graph.
constexpr int64_t kGroupedPairsPerExpert = 8;

// Same checks and messages as ops.check_nvfp4_weight. Returns (N, K).
std::pair<int64_t, int64_t> check_nvfp4_weight(const at::Tensor& weight, const at::Tensor& weight_scale,
                                               const at::Tensor& global_scale, bool experts) {
    const int64_t lead = experts ? 1 : 0;
    ADALLM_CHECK(weight.scalar_type() == at::kByte, "adallm: weight must be uint8 (packed FP4), got ",
                      weight.scalar_type());
    ADALLM_CHECK(weight_scale.scalar_type() == at::kFloat8_e4m3fn,
                      "adallm: weight_scale must be float8_e4m3fn, got ", weight_scale.scalar_type());
    ADALLM_CHECK(global_scale.scalar_type() == at::kFloat, "adallm: weight_global_scale must be float32, got ",
                      global_scale.scalar_type());
    ADALLM_CHECK(weight.dim() == 2 + lead, "adallm: weight must be ", 2 + lead, "-D, got shape ",
                      weight.sizes());
    ADALLM_CHECK(weight.is_contiguous() && weight_scale.is_contiguous(),
                      "adallm: weight and weight_scale must be contiguous");
    const int64_t n = weight.size(lead), k = weight.size(lead + 1) * 2;
    ADALLM_CHECK(k % kBlock == 0, "adallm: K = ", k, " must be a multiple of ", kBlock);
    std::vector<int64_t> want(weight.sizes().begin(), weight.sizes().begin() + lead);
    const std::vector<int64_t> want_global = want;
    want.push_back(n);
    want.push_back(k / kBlock);
    ADALLM_CHECK(weight_scale.sizes() == at::IntArrayRef(want), "adallm: weight_scale shape ",
                      weight_scale.sizes(), " does not match weight ", weight.sizes(), " (expected ",
                      at::IntArrayRef(want), ")");
    ADALLM_CHECK(global_scale.sizes() == at::IntArrayRef(want_global),
                      "adallm: weight_global_scale must have shape ", at::IntArrayRef(want_global), ", got ",
                      global_scale.sizes());
    ADALLM_CHECK(weight.device() == weight_scale.device() && weight.device() == global_scale.device(),
                      "adallm: weight, weight_scale and weight_global_scale must be on one device");
    return {n, k};
}

Nvfp4GemvArgs gemv_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                        const at::Tensor& global_scale, const c10::optional<at::Tensor>& bias, at::Tensor& y,
                        const at::Tensor* expert_ids, int x_pair_div, int64_t m, int64_t n, int64_t k) {
    Nvfp4GemvArgs a{};
    a.x = x.data_ptr();
    a.w = weight.data_ptr<uint8_t>();
    a.ws = static_cast<const uint8_t*>(weight_scale.data_ptr());
    a.gs = global_scale.data_ptr<float>();
    a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
    a.y = y.data_ptr();
    a.expert_ids = expert_ids != nullptr ? expert_ids->data_ptr() : nullptr;
    a.ids_int64 = expert_ids != nullptr && expert_ids->scalar_type() == at::kLong;
    a.num_experts = weight.dim() == 3 ? static_cast<int>(weight.size(0)) : 1;
    a.x_pair_div = x_pair_div;
    a.M = static_cast<int>(m);
    a.N = static_cast<int>(n);
    a.K = static_cast<int>(k);
    return a;
}

// The decoder layer's extras of a plain linear: the residual added to y (T [M, N], contiguous) and the RMSNorm
// weight (T [K]) with its epsilon; the GEMV kernels read them (Nvfp4GemvArgs).
struct LayerExtras {
    const at::Tensor* residual = nullptr;
    const at::Tensor* norm_weight = nullptr;
    double norm_eps = 0.0;
};

// Launches a GEMV. Returns false, launching nothing, if `extras` asks for the RMSNorm prologue and the rows kernel
// does not take the shape: the caller then normalizes x itself.
template <typename T>
bool run_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
              const at::Tensor& global_scale, const c10::optional<at::Tensor>& bias, at::Tensor& y,
              const at::Tensor* expert_ids, int pairs, int x_pair_div, int64_t m, int64_t n, int64_t k,
              const LayerExtras& extras = {}, int act = kActNone) {
    Nvfp4GemvArgs a = gemv_args(x, weight, weight_scale, global_scale, bias, y, expert_ids, x_pair_div, m, n, k);
    a.residual = extras.residual != nullptr ? extras.residual->data_ptr() : nullptr;
    a.norm_w = extras.norm_weight != nullptr ? extras.norm_weight->data_ptr() : nullptr;
    a.norm_eps = static_cast<float>(extras.norm_eps);
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;  // x's device (guarded)
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // M = 1 over many rows, the RMSNorm prologue and the gated epilogue: nvfp4_gemv_rows.cuh; every other shape (and
    // MoE): nvfp4_gemv.cuh.
    cudaError_t err = launch_nvfp4_gemv_rows<T>(a, sms, stream, act);
    if (err == cudaErrorNotSupported) {
        if (a.norm_w != nullptr || act != kActNone) return false;
        err = launch_nvfp4_gemv<T>(a, pairs, sms, stream);
    }
    check_launch(err, act != kActNone ? "nvfp4_gemv_rows (gated)" : "nvfp4_gemv");
    return true;
}

// Qwen3's RMSNorm (transformers' Qwen3RMSNorm), the reference's rms_norm: w * T(x / sqrt(mean(x^2) + eps)).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
    const at::Tensor xf = x.to(at::kFloat);
    return w * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
}

// Same checks and messages as ops.check_layer_extras. n: the linear's N (y [..., n]).
void check_layer_extras(const at::Tensor& x, int64_t n, int64_t k, const c10::optional<at::Tensor>& residual,
                        const c10::optional<at::Tensor>& norm_weight, double norm_eps) {
    if (residual.has_value()) {
        std::vector<int64_t> want(x.sizes().begin(), x.sizes().end() - 1);
        want.push_back(n);
        ADALLM_CHECK(residual->sizes() == at::IntArrayRef(want) && residual->scalar_type() == x.scalar_type(),
                     "adallm: residual must be ", x.scalar_type(), " ", at::IntArrayRef(want), " (the output's shape), "
                     "got ", residual->scalar_type(), " ", residual->sizes());
        ADALLM_CHECK(residual->device() == x.device(), "adallm: residual is on ", residual->device(), " but x is on ",
                     x.device());
    }
    if (norm_weight.has_value()) {
        ADALLM_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == k &&
                         norm_weight->scalar_type() == x.scalar_type(),
                     "adallm: norm_weight must be ", x.scalar_type(), " [", k, "], got ", norm_weight->scalar_type(),
                     " ", norm_weight->sizes());
        ADALLM_CHECK(norm_weight->device() == x.device(), "adallm: norm_weight is on ", norm_weight->device(),
                     " but x is on ", x.device());
        ADALLM_CHECK(std::isfinite(norm_eps) && norm_eps >= 0.0, "adallm: norm_eps must be finite and >= 0, got ",
                     norm_eps);
    }
}

// Dequantizes NVFP4 weights to dtype (for cuBLAS): one [N, K] weight with global scale [], or E experts'
// [E, N, K] with global scales [E].
at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& weight_scale, const at::Tensor& global_scale,
                      int64_t n, int64_t k, at::ScalarType dtype) {
    std::vector<int64_t> shape = weight.sizes().vec();  // [(E,) N, K/2] -> [(E,) N, K]
    shape.back() = k;
    at::Tensor out = at::empty(shape, weight.options().dtype(dtype));
    const auto* w = weight.data_ptr<uint8_t>();
    const auto* ws = static_cast<const uint8_t*>(weight_scale.data_ptr());
    const float* gs = global_scale.data_ptr<float>();
    const int64_t per_expert = n * k / kBlock, blocks = out.numel() / kBlock;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const cudaError_t err =
        dtype == at::kHalf
            ? launch_nvfp4_dequantize<__half>(w, ws, gs, reinterpret_cast<__half*>(out.data_ptr()), blocks,
                                              per_expert, stream)
            : launch_nvfp4_dequantize<__nv_bfloat16>(w, ws, gs, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                                                     blocks, per_expert, stream);
    check_launch(err, "nvfp4_dequantize");
    return out;
}

// Routed experts for many (token, expert) pairs, e.g. a prefill: the GEMV would stream an expert's weights
// once per pair routed to it (a 2k-token prompt of Qwen3-30B-A3B: 16k pairs re-reading 128 experts).
// Instead the pairs are sorted by expert, a chunk of experts (kDequantChunkBytes) is dequantized at a time,
// and one grouped GEMM (at::_grouped_mm) multiplies each expert's rows. Cutting the pairs into chunks needs
// the per-expert counts on the host: one sync, so callers keep the GEMV inside CUDA-graph capture.
//   x  T [T, K] (shared_x: every expert of a token reads its row) or [T, topk, K];  y  T [T, topk, N]
void moe_grouped(const at::Tensor& x, bool shared_x, const at::Tensor& weight, const at::Tensor& weight_scale,
                 const at::Tensor& weight_global_scale, const at::Tensor& ids, at::Tensor& y, int64_t n, int64_t k) {
    const int64_t experts = weight.size(0), topk = ids.size(1), pairs = ids.numel();
    const at::Tensor flat = ids.reshape({pairs}).to(at::kLong);
    const at::Tensor range = at::stack({flat.min(), flat.max()}).cpu();
    ADALLM_CHECK(range[0].item<int64_t>() >= 0 && range[1].item<int64_t>() < experts,
                 "adallm: expert_ids must lie in [0, ", experts, "), got values in [", range[0].item<int64_t>(),
                 ", ", range[1].item<int64_t>(), "]");
    const at::Tensor order = std::get<1>(at::sort(flat, /*stable=*/true, 0, false));
    const at::Tensor counts = at::bincount(flat, {}, experts).cpu();
    const auto* cnt = counts.data_ptr<int64_t>();
    const at::Tensor xs = shared_x ? x.index_select(0, at::floor_divide(order, topk))
                                   : x.reshape({pairs, k}).index_select(0, order);
    at::Tensor ys = at::empty({pairs, n}, x.options());
    const int64_t per_chunk = std::max<int64_t>(1, kDequantChunkBytes / (2 * n * k));
    int64_t row = 0;
    for (int64_t e0 = 0; e0 < experts; e0 += per_chunk) {
        const int64_t e1 = std::min(experts, e0 + per_chunk);
        std::vector<int32_t> offs;  // end row of each expert's group, relative to the chunk's first row
        int64_t rows = 0;
        for (int64_t e = e0; e < e1; ++e) offs.push_back(static_cast<int32_t>(rows += cnt[e]));
        if (rows == 0) continue;
        const at::Tensor w = dequantize(weight.narrow(0, e0, e1 - e0), weight_scale.narrow(0, e0, e1 - e0),
                                        weight_global_scale.narrow(0, e0, e1 - e0), n, k, x.scalar_type());
        const at::Tensor offs_dev = at::tensor(offs, at::kInt).to(x.device());
        ys.narrow(0, row, rows).copy_(at::_grouped_mm(xs.narrow(0, row, rows), w.transpose(1, 2), offs_dev));
        row += rows;
    }
    y.view({pairs, n}).index_copy_(0, order, ys);
}

// ---------------------------------------------------------------------------------------------------

at::Tensor nvfp4_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                             const at::Tensor& weight_global_scale, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& norm_weight,
                             double norm_eps) {
    const auto [n, k] = check_nvfp4_weight(weight, weight_scale, weight_global_scale, false);
    check_activation(x, k, weight);
    check_layer_extras(x, n, k, residual, norm_weight, norm_eps);
    if (bias.has_value())
        ADALLM_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == x.scalar_type(),
                          "adallm: bias must be ", x.scalar_type(), " [", n, "]");
    ADALLM_CHECK(!bias.has_value() || bias->device() == x.device(), "adallm: bias is on ", bias->device(),
                      " but x is on ", x.device());
    const c10::cuda::CUDAGuard guard(x.device());
    auto [x2, out_shape] = linear_rows(x, k, n);
    const int64_t m = x2.size(0);
    if (m == 0 || n == 0) return at::zeros(out_shape, x.options());

    const bool gemv = m <= kGemvMaxM && k % 32 == 0 && aligned16(weight);
    at::Tensor y = at::empty({m, n}, x.options());
    const at::Tensor res = residual.has_value() ? contiguous16(residual->reshape({m, n})) : at::Tensor();
    const at::Tensor nw = norm_weight.has_value() ? norm_weight->contiguous() : at::Tensor();
    LayerExtras extras;
    const bool add_residual_after = residual.has_value() && (!gemv || m > 8);  // (Nvfp4GemvArgs::residual)
    extras.residual = residual.has_value() && !add_residual_after ? &res : nullptr;
    if (norm_weight.has_value()) {
        if (gemv && m == 1) {  // the rows kernel's prologue, if it takes the shape (run_gemv below)
            extras.norm_weight = &nw;
            extras.norm_eps = norm_eps;
        } else {
            x2 = contiguous16(rms_norm(x2, nw, norm_eps));
        }
    }
    if (!gemv) {
        // Prefill (and awkward K): dequantize W to x.dtype a chunk of output rows at a time and let cuBLAS
        // write that chunk's columns of y in place (a row-major slice with stride n: no copy). The dense W
        // never exists whole (Qwen3-8B's gate_up would be 192 MiB), so prefill needs at most
        // kDequantChunkBytes on top of the packed weights.
        const int64_t rows = std::max<int64_t>(kDequantChunkRows, kDequantChunkBytes / (2 * k) / kDequantChunkRows *
                                                                      kDequantChunkRows);
        for (int64_t n0 = 0; n0 < n; n0 += rows) {
            const int64_t nc = std::min(rows, n - n0);
            const at::Tensor w = dequantize(weight.narrow(0, n0, nc), weight_scale.narrow(0, n0, nc),
                                            weight_global_scale, nc, k, x.scalar_type());
            at::Tensor yc = y.narrow(1, n0, nc);
            if (bias.has_value())
                at::addmm_out(yc, bias->narrow(0, n0, nc), x2, w.t());
            else
                at::mm_out(yc, x2, w.t());
        }
        if (add_residual_after) y.add_(res);
        return y.reshape(out_shape);
    }
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->contiguous();
    auto run = [&, n = n, k = k](const at::Tensor& xin) {  // (structured bindings are not captured before C++20)
        return x.scalar_type() == at::kHalf
                   ? run_gemv<__half>(xin, weight, weight_scale, weight_global_scale, b, y, nullptr, 1, 1, m, n, k,
                                      extras)
                   : run_gemv<__nv_bfloat16>(xin, weight, weight_scale, weight_global_scale, b, y, nullptr, 1, 1, m, n,
                                             k, extras);
    };
    if (!run(x2)) {  // the rows kernel does not take the shape: normalize x first
        extras.norm_weight = nullptr;
        run(contiguous16(rms_norm(x2, nw, norm_eps)));
    }
    if (add_residual_after) y.add_(res);
    return y.reshape(out_shape);
}

// y = act(x' W_gate^T) * (x' W_up^T), W = [W_gate; W_up] one NVFP4 weight [N, K] (gate rows then up rows), x' = x or
// rms_norm(x). M = 1 on a rows-kernel shape: one launch, the activation in the rows kernel's epilogue (and the RMSNorm
// in its prologue); otherwise the linear, then the activation and the product (ATen).
at::Tensor nvfp4_linear_glu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                                 const at::Tensor& weight_global_scale, c10::string_view activation,
                                 const c10::optional<at::Tensor>& norm_weight, double norm_eps) {
    const auto [n, k] = check_nvfp4_weight(weight, weight_scale, weight_global_scale, false);
    check_activation(x, k, weight);
    const bool silu = activation == "silu";
    ADALLM_CHECK(silu || activation == "gelu_tanh", "adallm: activation must be 'silu' or 'gelu_tanh', got '",
                 std::string(activation), "'");
    ADALLM_CHECK(n % 2 == 0, "adallm: N = ", n, " must be even (gate rows, then as many up rows)");
    check_layer_extras(x, n, k, c10::nullopt, norm_weight, norm_eps);
    const c10::cuda::CUDAGuard guard(x.device());
    const auto [x2, full_shape] = linear_rows(x, k, n);
    std::vector<int64_t> out_shape = full_shape;
    out_shape.back() = n / 2;
    const int64_t m = x2.size(0);
    if (m == 0 || n == 0) return at::zeros(out_shape, x.options());
    const at::Tensor nw = norm_weight.has_value() ? norm_weight->contiguous() : at::Tensor();
    if (m == 1 && k % 32 == 0 && aligned16(weight)) {
        at::Tensor y = at::empty({1, n / 2}, x.options());
        LayerExtras extras;
        extras.norm_weight = norm_weight.has_value() ? &nw : nullptr;
        extras.norm_eps = norm_eps;
        const int act = silu ? kActSilu : kActGeluTanh;
        const bool done =
            x.scalar_type() == at::kHalf
                ? run_gemv<__half>(x2, weight, weight_scale, weight_global_scale, c10::nullopt, y, nullptr, 1, 1, 1,
                                   n, k, extras, act)
                : run_gemv<__nv_bfloat16>(x2, weight, weight_scale, weight_global_scale, c10::nullopt, y, nullptr, 1,
                                          1, 1, n, k, extras, act);
        if (done) return y.reshape(out_shape);
    }
    const at::Tensor xin = norm_weight.has_value() ? rms_norm(x2, nw, norm_eps) : x2;
    const at::Tensor full = nvfp4_linear_cuda(xin, weight, weight_scale, weight_global_scale, c10::nullopt,
                                              c10::nullopt, c10::nullopt, 0.0);
    const at::Tensor gate = full.narrow(1, 0, n / 2), up = full.narrow(1, n / 2, n / 2);
    return (silu ? at::silu(gate) : at::gelu(gate, "tanh")).mul_(up).reshape(out_shape);
}

at::Tensor nvfp4_moe_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                                 const at::Tensor& weight_global_scale, const at::Tensor& expert_ids) {
    const auto [n, k] = check_nvfp4_weight(weight, weight_scale, weight_global_scale, true);
    check_activation(x, k, weight);
    ADALLM_CHECK((expert_ids.scalar_type() == at::kInt || expert_ids.scalar_type() == at::kLong) &&
                          expert_ids.dim() == 2,
                      "adallm: expert_ids must be int32/int64 [T, topk], got ", expert_ids.scalar_type(), " ",
                      expert_ids.sizes());
    const int64_t t = expert_ids.size(0), topk = expert_ids.size(1);
    const bool shared_x = x.dim() == 2 && x.size(0) == t;
    ADALLM_CHECK(shared_x || (x.dim() == 3 && x.size(0) == t && x.size(1) == topk), "adallm: x must be [", t,
                      ", ", k, "] or [", t, ", ", topk, ", ", k, "] to match expert_ids, got ",
                      x.sizes());
    ADALLM_CHECK(expert_ids.device() == weight.device(), "adallm: expert_ids is on ", expert_ids.device(),
                      " but the weight is on ", weight.device());
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor y = at::empty({t, topk, n}, x.options());
    const int64_t pairs = t * topk;
    if (pairs == 0 || n == 0) return y;
    ADALLM_CHECK_RUNTIME(pairs <= std::numeric_limits<int>::max(), "adallm: too many (token, expert) pairs: ", pairs);
    const at::Tensor ids = expert_ids.contiguous();
    if (k % 32 != 0 || !aligned16(weight)) {
        // Awkward K: dequantize each routed expert (correct, slow; real models have K % 32 == 0).
        // Host-side loop over the experts: this path syncs and is not CUDA-graph safe.
        const at::Tensor xs = (shared_x ? x.unsqueeze(1).expand({t, topk, k}) : x).reshape({pairs, k});
        const at::Tensor flat = ids.reshape({pairs}).to(at::kLong);
        at::Tensor yf = y.view({pairs, n});
        const at::Tensor uniq = std::get<0>(at::_unique(flat.cpu()));
        for (int64_t i = 0; i < uniq.numel(); ++i) {
            const int64_t e = uniq[i].item<int64_t>();
            ADALLM_CHECK(e >= 0 && e < weight.size(0), "adallm: expert_ids must lie in [0, ", weight.size(0),
                              ")");
            const at::Tensor sel = (flat == e).nonzero().squeeze(1);
            const at::Tensor w = dequantize(weight[e], weight_scale[e], weight_global_scale[e], n, k, x.scalar_type());
            yf.index_copy_(0, sel, at::matmul(xs.index_select(0, sel), w.t()));
        }
        return y;
    }
    // The GEMV reads an expert once per pair, the grouped GEMM dequantizes every expert once (~8x the
    // packed bytes: read + bf16 write + read): past ~8 pairs per expert the grouped path moves less.
    if (pairs >= kGroupedPairsPerExpert * weight.size(0) && n % 8 == 0) {  // not for decode-sized batches
        cudaStreamCaptureStatus capture;
        C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
        if (capture == cudaStreamCaptureStatusNone) {
            moe_grouped(x, shared_x, weight, weight_scale, weight_global_scale, ids, y, n, k);
            return y;
        }
    }
    const at::Tensor x2 = contiguous16(x);
    if (x.scalar_type() == at::kHalf)
        run_gemv<__half>(x2, weight, weight_scale, weight_global_scale, c10::nullopt, y, &ids,
                         static_cast<int>(pairs), shared_x ? static_cast<int>(topk) : 1, 1, n, k);
    else
        run_gemv<__nv_bfloat16>(x2, weight, weight_scale, weight_global_scale, c10::nullopt, y, &ids,
                                static_cast<int>(pairs), shared_x ? static_cast<int>(topk) : 1, 1, n, k);
    return y;
}

std::tuple<at::Tensor, at::Tensor> nvfp4_quantize_cuda(const at::Tensor& x, const at::Tensor& global_scale) {
    // Same checks and messages as ops.check_quantize_args.
    ADALLM_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                          x.scalar_type() == at::kFloat,
                      "adallm: x must be bfloat16, float16 or float32, got ", x.scalar_type());
    ADALLM_CHECK(x.dim() == 2, "adallm: x must be 2-D [N, K], got shape ", x.sizes());
    ADALLM_CHECK(x.size(1) % kBlock == 0, "adallm: K = ", x.size(1), " must be a multiple of ", kBlock);
    ADALLM_CHECK(global_scale.scalar_type() == at::kFloat && global_scale.dim() == 0,
                      "adallm: global_scale must be a float32 scalar tensor, got ", global_scale.scalar_type(), " ",
                      global_scale.sizes());
    ADALLM_CHECK(x.device() == global_scale.device(), "adallm: x and global_scale must be on one device");
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t n = x.size(0), k = x.size(1);
    const at::Tensor xc = contiguous16(x);
    at::Tensor w = at::empty({n, k / 2}, x.options().dtype(at::kByte));
    at::Tensor ws = at::empty({n, k / kBlock}, x.options().dtype(at::kFloat8_e4m3fn));
    const float* gs = global_scale.data_ptr<float>();
    auto* wp = w.data_ptr<uint8_t>();
    auto* sp = static_cast<uint8_t*>(ws.data_ptr());
    const int64_t blocks = n * k / kBlock;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cudaError_t err;
    switch (x.scalar_type()) {
        case at::kFloat: err = launch_nvfp4_quantize<float>(xc.data_ptr<float>(), gs, wp, sp, blocks, stream); break;
        case at::kHalf:
            err = launch_nvfp4_quantize<__half>(reinterpret_cast<const __half*>(xc.data_ptr()), gs, wp, sp, blocks,
                                                stream);
            break;
        default:
            err = launch_nvfp4_quantize<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(xc.data_ptr()), gs, wp,
                                                       sp, blocks, stream);
    }
    check_launch(err, "nvfp4_quantize");
    return {w, ws};
}

}  // namespace

TORCH_LIBRARY_IMPL(adallm, CUDA, m) {
    m.impl("nvfp4_linear", &nvfp4_linear_cuda);
    m.impl("nvfp4_linear_glu", &nvfp4_linear_glu_cuda);
    m.impl("nvfp4_moe_linear", &nvfp4_moe_linear_cuda);
    m.impl("nvfp4_quantize", &nvfp4_quantize_cuda);
}

}  // namespace adallm
