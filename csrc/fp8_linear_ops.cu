// CUDA impl of adallm::fp8_linear (the FP8 lm_head): argument checks (the same as adallm_ops/ops.py, raised as
// ValueError), dtype dispatch and the choice of path:
//   M <= 16 and the staged x fits shared memory  -> fp8_gemv.cuh (weight streaming, tensor cores)
//   otherwise (prefill, awkward alignment)        -> dequantize W * s to x.dtype in row chunks, cuBLAS per chunk
// Neither path syncs with the host, so both are CUDA-graph safe.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check.h"
#include "fp8_gemv.cuh"
#include "linear_common.h"

namespace adallm {
namespace {

at::Tensor fp8_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale) {
    // Same checks and messages as ops.check_fp8_weight.
    ADALLM_CHECK(weight.scalar_type() == at::kFloat8_e4m3fn, "adallm: weight must be float8_e4m3fn, got ",
                 weight.scalar_type());
    ADALLM_CHECK(weight_scale.scalar_type() == at::kFloat, "adallm: weight_scale must be float32, got ",
                 weight_scale.scalar_type());
    ADALLM_CHECK(weight.dim() == 2, "adallm: weight must be 2-D [N, K], got shape ", weight.sizes());
    const int64_t n = weight.size(0), k = weight.size(1);
    ADALLM_CHECK(k % 16 == 0, "adallm: K = ", k, " must be a multiple of 16");
    ADALLM_CHECK(weight_scale.dim() == 1 && weight_scale.size(0) == n, "adallm: weight_scale must have shape (", n,
                 ",), got ", weight_scale.sizes());
    ADALLM_CHECK(weight.is_contiguous() && weight_scale.is_contiguous(),
                 "adallm: weight and weight_scale must be contiguous");
    ADALLM_CHECK(weight.device() == weight_scale.device(), "adallm: weight and weight_scale must be on one device");
    check_activation(x, k, weight);
    ADALLM_CHECK(n < (int64_t{1} << 31) && k < (int64_t{1} << 31), "adallm: weight too large: ", weight.sizes());

    const c10::cuda::CUDAGuard guard(x.device());
    const auto [x2, out_shape] = linear_rows(x, k, n);
    const int64_t m = x2.size(0);
    if (m == 0 || n == 0) return at::zeros(out_shape, x.options());
    at::Tensor y = at::empty({m, n}, x.options());

    if (m <= kFp8GemvMaxM && aligned16(weight)) {
        Fp8GemvArgs a{};
        a.x = x2.data_ptr();
        a.w = static_cast<const uint8_t*>(weight.data_ptr());
        a.s = weight_scale.data_ptr<float>();
        a.y = y.data_ptr();
        a.M = static_cast<int>(m);
        a.N = static_cast<int>(n);
        a.K = static_cast<int>(k);
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;  // x's device (guarded)
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        const cudaError_t err = x.scalar_type() == at::kHalf ? launch_fp8_gemv<__half>(a, sms, stream)
                                                              : launch_fp8_gemv<__nv_bfloat16>(a, sms, stream);
        if (err != cudaErrorNotSupported) {
            check_launch(err, "fp8_gemv");
            return y.reshape(out_shape);
        }
    }
    // W * s rounded to x.dtype a chunk of output rows at a time; cuBLAS writes that chunk's columns of y in place.
    const int64_t rows = std::max<int64_t>(1, kDequantChunkBytes / (2 * k));
    for (int64_t n0 = 0; n0 < n; n0 += rows) {
        const int64_t nc = std::min(rows, n - n0);
        const at::Tensor w = (weight.narrow(0, n0, nc).to(at::kFloat) * weight_scale.narrow(0, n0, nc).unsqueeze(1))
                                 .to(x.scalar_type());
        at::Tensor yc = y.narrow(1, n0, nc);
        at::mm_out(yc, x2, w.t());
    }
    return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(adallm, CUDA, m) { m.impl("fp8_linear", &fp8_linear_cuda); }

}  // namespace adallm
