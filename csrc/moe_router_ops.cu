// CUDA impl of adallm::moe_router_topk (schema in adallm_ops/ops.py): argument checks (the same as ops.py's, raised
// as ValueError), then moe_router_topk.cuh's kernel for a decode batch (tokens <= kMaxTokens), or, for more tokens
// (a prefill), cuBLAS and ATen ops with the same definition. Neither path syncs with the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "check.h"
#include "device_symbol.h"
#include "moe_router_topk.cuh"

namespace {

// Arrival counter of the kernel's last-CTA selection; each launch leaves it at zero.
__device__ unsigned g_router_arrivals;

unsigned* router_arrivals(int device) {
  static std::array<unsigned*, 64> cached{};
  return adallm::device_symbol_address(g_router_arrivals, cached, device);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_router_topk_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   int64_t top_k, bool renormalize) {
  ADALLM_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
               "adallm: x must be bfloat16 or float16, got ", x.scalar_type());
  ADALLM_CHECK(weight.scalar_type() == x.scalar_type(), "adallm: the router weight must be ", x.scalar_type(),
               " like x, got ", weight.scalar_type());
  ADALLM_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
               "adallm: x must be [T, H] and the router weight [E, H], got ", x.sizes(), " and ", weight.sizes());
  ADALLM_CHECK(x.is_contiguous() && weight.is_contiguous(), "adallm: x and the router weight must be contiguous");
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = weight.size(0);
  ADALLM_CHECK(top_k >= 1 && top_k <= experts, "adallm: top_k = ", top_k, " must be in [1, E = ", experts, "]");
  ADALLM_CHECK(x.device() == weight.device(), "adallm: all moe_router_topk tensors must be on one device");
  const at::TensorOptions ids_options = x.options().dtype(at::kLong);
  if (tokens > adallm_moe::kMaxTokens) {
    const at::Tensor logits = at::linear(x, weight);
    const at::Tensor probs = at::softmax(logits, -1, at::kFloat);
    // A stable descending sort of the logits: equal logits keep the lower expert first, as the kernel does.
    const at::Tensor ids = std::get<1>(at::sort(logits, /*stable=*/true, /*dim=*/-1, /*descending=*/true))
                               .narrow(-1, 0, top_k).contiguous();
    at::Tensor w = probs.gather(-1, ids);
    if (renormalize) w = w / w.sum(-1, /*keepdim=*/true);
    return {logits, w.to(x.scalar_type()), ids};
  }
  ADALLM_CHECK(hidden % 8 == 0, "adallm: the CUDA moe_router_topk needs H % 8 == 0, got H = ", hidden);
  ADALLM_CHECK(experts <= adallm_moe::kMaxExperts && top_k <= adallm_moe::kMaxTopK,
               "adallm: the CUDA moe_router_topk supports at most ", adallm_moe::kMaxExperts, " experts and top_k <= ",
               adallm_moe::kMaxTopK, ", got E = ", experts, ", top_k = ", top_k);
  ADALLM_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
               "adallm: x and the router weight must be 16-byte aligned");
  at::Tensor logits = at::empty({tokens, experts}, x.options());
  at::Tensor topk_weights = at::empty({tokens, top_k}, x.options());
  at::Tensor topk_ids = at::empty({tokens, top_k}, ids_options);
  if (tokens == 0) return {logits, topk_weights, topk_ids};
  const c10::cuda::CUDAGuard guard(x.device());
  adallm_moe::RouterParams p{};
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.logits = logits.data_ptr();
  p.topk_weights = topk_weights.data_ptr();
  p.topk_ids = topk_ids.data_ptr<int64_t>();
  p.arrivals = router_arrivals(x.get_device());
  p.tokens = int(tokens);
  p.hidden = int(hidden);
  p.experts = int(experts);
  p.top_k = int(top_k);
  p.renormalize = renormalize;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = x.scalar_type() == at::kBFloat16
                              ? adallm_moe::launch_moe_router_topk<__nv_bfloat16>(p, stream)
                              : adallm_moe::launch_moe_router_topk<__half>(p, stream);
  adallm::check_launch(err, "moe_router_topk");
  return {logits, topk_weights, topk_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(adallm, CUDA, m) { m.impl("moe_router_topk", &moe_router_topk_cuda); }
