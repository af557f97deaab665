// Host helpers shared by the linear ops (nvfp4_ops.cu, fp8_linear_ops.cu): the activation check, alignment, and the
// size of prefill's dequantized weight chunks.
#pragma once

#include <ATen/ATen.h>

#include "check.h"

namespace adallm {

// Prefill's dequantized weight chunk: 32 MiB (4096 rows at K = 4096) keeps cuBLAS's GEMMs large (N >= 4096
// columns per call for K <= 4096) while cutting the temporary of a big weight ~6x (Qwen3-8B's fused gate_up would
// be 192 MiB, an lm_head over 1 GiB).
constexpr int64_t kDequantChunkBytes = int64_t{32} << 20;

// Same checks and messages as ops.check_activation.
inline void check_activation(const at::Tensor& x, int64_t k, const at::Tensor& weight) {
    ADALLM_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                 "adallm: x must be bfloat16 or float16, got ", x.scalar_type());
    ADALLM_CHECK(x.dim() >= 1 && x.size(-1) == k, "adallm: x has K = ", (x.dim() ? x.size(-1) : int64_t(0)),
                 " but the weight has K = ", k);
    ADALLM_CHECK(x.device() == weight.device(), "adallm: x is on ", x.device(), " but the weight is on ",
                 weight.device());
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// A tensor whose data pointer is 16-byte aligned and contiguous (copies only when needed).
inline at::Tensor contiguous16(const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    return aligned16(c) ? c : c.clone();
}

// A linear's x [..., K] as a contiguous, 16-byte aligned [M, K], and its output's shape [..., N].
inline std::pair<at::Tensor, std::vector<int64_t>> linear_rows(const at::Tensor& x, int64_t k, int64_t n) {
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
    out_shape.push_back(n);
    return {contiguous16(x.reshape({-1, k})), out_shape};
}

}  // namespace adallm
