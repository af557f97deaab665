// CUDA impls of adallm::fp8_kv_write, adallm::qk_norm_rope_kv_write and adallm::fp8_decode_attention (schemas
// in adallm_ops/ops.py): argument checks (the same as ops.py's, raised as ValueError), then the torch-free
// kernels of fp8_kv_write.cuh / qk_norm_rope_kv_write.cuh / fp8_decode_attention.cuh. No op syncs with the
// host: all are CUDA-graph safe.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>

#include "check.h"
#include "device_symbol.h"
#include "fp8_decode_attention.cuh"
#include "fp8_kv_write.cuh"
#include "qk_norm_rope_kv_write.cuh"

namespace {

using adallm_fp8::DecodeParams;
using adallm_fp8::KvWriteParams;
using adallm_fp8::QkNormRopeParams;

constexpr int kMaxCounterRows = 1 << 16;  // batch * Hkv of one decode call
// Arrival counters of the decode kernel's split merge; each launch leaves them at zero. Shared by all
// calls on a device, so decode calls must not run concurrently on two streams of one device.
__device__ unsigned g_decode_counters[kMaxCounterRows];

unsigned* decode_counters(int device) {
  static std::array<unsigned*, 64> cached{};
  return adallm::device_symbol_address(g_decode_counters, cached, device);
}

// CTAs of the decode kernel for (head_dim, group) resident per SM; the kernel is prepared (its shared
// memory limit raised) and queried once per device and config, before its first launch there.
int decode_ctas_per_sm(int device, int head_dim, int group) {
  static std::array<std::array<int, 3 * (adallm_fp8::kMaxGroup + 1)>, 64> cached{};
  ADALLM_CHECK_RUNTIME(device >= 0 && device < int(cached.size()), "adallm: device index ", device, " out of range");
  const int d_index = head_dim == 64 ? 0 : head_dim == 128 ? 1 : 2;  // head_dim is checked by the caller
  int& ctas = cached[device][d_index * (adallm_fp8::kMaxGroup + 1) + group];
  if (ctas == 0) C10_CUDA_CHECK(adallm_fp8::decode_prepare(head_dim, group, &ctas));
  return ctas;
}

// An FP8 cache pair: e4m3 [B, Hkv, L, D] each, one shape, fp32 scales [B, Hkv, L] (ops.check_kv_caches' checks).
void check_kv_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_scale,
                     const at::Tensor& v_scale) {
  for (const auto& [name, cache, scale] : {std::tuple<const char*, const at::Tensor*, const at::Tensor*>{
                                               "k", &k_cache, &k_scale}, {"v", &v_cache, &v_scale}}) {
    ADALLM_CHECK(cache->scalar_type() == at::kFloat8_e4m3fn, "adallm: ", name, "_cache must be float8_e4m3fn, got ",
                 cache->scalar_type());
    ADALLM_CHECK(cache->dim() == 4, "adallm: ", name, "_cache must be [B, Hkv, L, D], got shape ", cache->sizes());
    ADALLM_CHECK(cache->is_contiguous() && scale->is_contiguous(), "adallm: ", name, "_cache and ", name,
                 "_scale must be contiguous");
    ADALLM_CHECK(scale->scalar_type() == at::kFloat && scale->sizes() == cache->sizes().slice(0, 3), "adallm: ", name,
                 "_scale must be float32 ", cache->sizes().slice(0, 3), ", got ", scale->scalar_type(), " ",
                 scale->sizes());
    ADALLM_CHECK(reinterpret_cast<uintptr_t>(cache->data_ptr()) % 16 == 0, "adallm: ", name,
                 "_cache must be 16-byte aligned");
    ADALLM_CHECK(cache->size(2) > 0 && cache->size(2) < (int64_t(1) << 30), "adallm: ", name,
                 "_cache length must be in [1, 2^30), got ", cache->size(2));
  }
  ADALLM_CHECK(k_cache.sizes() == v_cache.sizes(), "adallm: k_cache and v_cache must have one shape");
}

void check_same_device(std::initializer_list<const at::Tensor*> ts, const char* op) {
  for (const at::Tensor* t : ts) {
    ADALLM_CHECK(t->device() == (*ts.begin())->device(), "adallm: all ", op, " tensors must be on one device");
  }
}

// k, v [B, Hkv, S, D] with a contiguous last dim, one stride set and 16-byte aligned rows; else a copy.
bool kv_rows_vectorizable(const at::Tensor& k, const at::Tensor& v) {
  const int64_t align = 16 / k.element_size();
  auto ok = [&](const at::Tensor& t) {
    return t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % align == 0 &&
           t.stride(1) % align == 0 && t.stride(2) % align == 0;
  };
  return ok(k) && ok(v) && k.strides() == v.strides();
}

void fp8_kv_write_cuda(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& positions) {
  check_kv_caches(k_cache, v_cache, k_scale, v_scale);
  ADALLM_CHECK((k_in.scalar_type() == at::kBFloat16 || k_in.scalar_type() == at::kHalf) &&
                        v_in.scalar_type() == k_in.scalar_type(),
                    "adallm: k and v must both be bfloat16 or float16, got ", k_in.scalar_type(), ", ",
                    v_in.scalar_type());
  const int64_t b = k_cache.size(0), h = k_cache.size(1), length = k_cache.size(2), d = k_cache.size(3);
  ADALLM_CHECK(k_in.dim() == 4 && k_in.sizes() == v_in.sizes() && k_in.size(0) == b && k_in.size(1) == h &&
                        k_in.size(3) == d,
                    "adallm: k/v must be [", b, ", ", h, ", S, ", d, "] to match the cache, got ", k_in.sizes(), ", ",
                    v_in.sizes());
  const int64_t s = k_in.size(2);
  ADALLM_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == s,
                    "adallm: positions must be int64 [", s, "], got ", positions.scalar_type(), " ",
                    positions.sizes());
  ADALLM_CHECK(s <= length, "adallm: cannot write ", s, " tokens into a cache of length ", length,
                    " (a ring buffer takes at most its length; pass the last L tokens)");
  check_same_device({&k_in, &v_in, &k_cache, &v_cache, &k_scale, &v_scale, &positions}, "fp8_kv_write");
  ADALLM_CHECK(d == 64 || d == 128 || d == 256, "adallm: the CUDA fp8_kv_write supports head_dim 64, 128 "
                    "and 256, got ", d);
  if (s == 0 || b * h == 0) return;

  const bool direct = kv_rows_vectorizable(k_in, v_in);
  const at::Tensor k = direct ? k_in : k_in.contiguous(), v = direct ? v_in : v_in.contiguous();
  const at::Tensor pos = positions.contiguous();
  const c10::cuda::CUDAGuard guard(k.device());
  KvWriteParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.stride_b = k.stride(0);
  p.stride_h = k.stride(1);
  p.stride_s = k.stride(2);
  p.k_cache = static_cast<uint8_t*>(k_cache.data_ptr());
  p.v_cache = static_cast<uint8_t*>(v_cache.data_ptr());
  p.k_scale = k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  p.positions = pos.data_ptr<int64_t>();
  p.batch = int(b);
  p.heads = int(h);
  p.seq = int(s);
  p.length = int(length);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = k.scalar_type() == at::kBFloat16
                              ? adallm_fp8::launch_fp8_kv_write<__nv_bfloat16>(p, int(d), stream)
                              : adallm_fp8::launch_fp8_kv_write<__half>(p, int(d), stream);
  adallm::check_launch(err, "fp8_kv_write");
}

at::Tensor qk_norm_rope_kv_write_cuda(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& k_scale, const at::Tensor& v_scale,
                                      const at::Tensor& position, double eps, double weight_offset) {
  check_kv_caches(k_cache, v_cache, k_scale, v_scale);
  const int64_t b = k_cache.size(0), hkv = k_cache.size(1), length = k_cache.size(2), d = k_cache.size(3);
  ADALLM_CHECK(qkv.scalar_type() == at::kBFloat16 || qkv.scalar_type() == at::kHalf,
               "adallm: qkv must be bfloat16 or float16, got ", qkv.scalar_type());
  ADALLM_CHECK(qkv.dim() == 2 && qkv.size(0) == b && qkv.size(1) % d == 0 && hkv > 0 &&
                   qkv.size(1) / d > 2 * hkv && (qkv.size(1) / d - 2 * hkv) % hkv == 0,
               "adallm: qkv must be [", b, ", (Hq + 2 * ", hkv, ") * ", d,
               "] with Hq a positive multiple of Hkv to match the cache, got ", qkv.sizes());
  ADALLM_CHECK(qkv.is_contiguous(), "adallm: qkv must be contiguous");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q_norm_weight", &q_weight},
                                {"k_norm_weight", &k_weight}}) {
    ADALLM_CHECK(t->scalar_type() == qkv.scalar_type() && t->dim() == 1 && t->size(0) == d && t->is_contiguous(),
                 "adallm: ", name, " must be a contiguous ", qkv.scalar_type(), " [", d, "], got ",
                 t->scalar_type(), " ", t->sizes());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"cos", &cos}, {"sin", &sin}}) {
    ADALLM_CHECK(t->scalar_type() == qkv.scalar_type() && t->dim() == 2 && (t->size(0) == b || t->size(0) == 1) &&
                     t->size(1) == d && t->is_contiguous(),
                 "adallm: ", name, " must be a contiguous ", qkv.scalar_type(), " [", b, " or 1, ", d, "], got ",
                 t->scalar_type(), " ", t->sizes());
  }
  ADALLM_CHECK(cos.sizes() == sin.sizes(), "adallm: cos and sin must have one shape");
  ADALLM_CHECK(position.scalar_type() == at::kLong && position.numel() == 1 && position.dim() == 1,
               "adallm: position must be int64 [1], got ", position.scalar_type(), " ", position.sizes());
  ADALLM_CHECK(eps >= 0, "adallm: eps must be >= 0");
  check_same_device({&qkv, &q_weight, &k_weight, &cos, &sin, &k_cache, &v_cache, &k_scale, &v_scale, &position},
                    "qk_norm_rope_kv_write");
  ADALLM_CHECK(d == 64 || d == 128 || d == 256, "adallm: the CUDA qk_norm_rope_kv_write supports head_dim 64, 128 "
               "and 256, got ", d);
  for (const at::Tensor* t : {&qkv, &q_weight, &k_weight, &cos, &sin}) {
    ADALLM_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                 "adallm: qkv, the norm weights, cos and sin must be 16-byte aligned");
  }
  const int64_t hq = qkv.size(1) / d - 2 * hkv;
  at::Tensor q = at::empty({b, hq, d}, qkv.options());
  if (b == 0) return q;
  const c10::cuda::CUDAGuard guard(qkv.device());
  QkNormRopeParams p{};
  p.qkv = qkv.data_ptr();
  p.qkv_stride_b = qkv.stride(0);
  p.q_weight = q_weight.data_ptr();
  p.k_weight = k_weight.data_ptr();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.rope_stride_b = cos.size(0) == 1 ? 0 : d;
  p.q_out = q.data_ptr();
  p.k_cache = static_cast<uint8_t*>(k_cache.data_ptr());
  p.v_cache = static_cast<uint8_t*>(v_cache.data_ptr());
  p.k_scale = k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  p.position = position.data_ptr<int64_t>();
  p.eps = float(eps);
  p.weight_offset = float(weight_offset);
  p.batch = int(b);
  p.q_heads = int(hq);
  p.kv_heads = int(hkv);
  p.length = int(length);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = qkv.scalar_type() == at::kBFloat16
                              ? adallm_fp8::launch_qk_norm_rope_kv_write<__nv_bfloat16>(p, int(d), stream)
                              : adallm_fp8::launch_qk_norm_rope_kv_write<__half>(p, int(d), stream);
  adallm::check_launch(err, "qk_norm_rope_kv_write");
  return q;
}

at::Tensor fp8_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& k_scale, const at::Tensor& v_scale,
                                     const at::Tensor& cache_seqlens, const at::Tensor& cache_start,
                                     double sm_scale, int64_t sliding_window, double softcap) {
  check_kv_caches(k_cache, v_cache, k_scale, v_scale);
  const int64_t b = k_cache.size(0), hkv = k_cache.size(1), length = k_cache.size(2), d = k_cache.size(3);
  ADALLM_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                    "adallm: q must be bfloat16 or float16, got ", q.scalar_type());
  ADALLM_CHECK(q.dim() == 3 && q.size(0) == b && q.size(2) == d, "adallm: q must be [", b, ", Hq, ", d,
                    "] to match the cache, got ", q.sizes());
  ADALLM_CHECK(hkv > 0 && q.size(1) % hkv == 0, "adallm: Hq = ", q.size(1), " must be a multiple of Hkv = ",
                    hkv);
  ADALLM_CHECK(q.is_contiguous(), "adallm: q must be contiguous");
  ADALLM_CHECK(d == 64 || d == 128 || d == 256, "adallm: head_dim must be 64, 128 or 256, got ", d);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"cache_seqlens", &cache_seqlens},
                                {"cache_start", &cache_start}}) {
    ADALLM_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) == b, "adallm: ", name,
                      " must be int32 [", b, "], got ", t->scalar_type(), " ", t->sizes());
  }
  ADALLM_CHECK(sliding_window >= 0 && softcap >= 0, "adallm: sliding_window and softcap must be >= 0");
  check_same_device({&q, &k_cache, &v_cache, &k_scale, &v_scale, &cache_seqlens, &cache_start},
                    "fp8_decode_attention");
  const int64_t group = q.size(1) / hkv;
  ADALLM_CHECK(group <= adallm_fp8::kMaxGroup, "adallm: the CUDA fp8_decode_attention supports at most ",
                    adallm_fp8::kMaxGroup, " query heads per KV head, got ", group);
  ADALLM_CHECK(b * hkv <= kMaxCounterRows, "adallm: batch * Hkv = ", b * hkv, " exceeds ", kMaxCounterRows);
  ADALLM_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0, "adallm: q must be 16-byte aligned");

  at::Tensor out = at::empty_like(q);
  if (b == 0 || q.size(1) == 0) return out;
  const c10::cuda::CUDAGuard guard(q.device());
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int ctas_per_sm = decode_ctas_per_sm(q.get_device(), int(d), int(group));
  const int splits = adallm_fp8::decode_num_splits(int(b), int(hkv), int(length), num_sms * ctas_per_sm);
  at::Tensor ws_o, ws_lse;
  if (splits > 1) {
    ws_o = at::empty({b, q.size(1), splits, d}, q.options().dtype(at::kFloat));
    ws_lse = at::empty({b, q.size(1), splits}, q.options().dtype(at::kFloat));
  }
  const auto cs = cache_seqlens.contiguous(), st = cache_start.contiguous();
  const double log2e = 1.4426950408889634;
  DecodeParams p{};
  p.q = static_cast<const uint16_t*>(q.data_ptr());
  p.k_cache = static_cast<const uint8_t*>(k_cache.data_ptr());
  p.v_cache = static_cast<const uint8_t*>(v_cache.data_ptr());
  p.k_scale = k_scale.data_ptr<float>();
  p.v_scale = v_scale.data_ptr<float>();
  p.seqlens = cs.data_ptr<int>();
  p.starts = st.data_ptr<int>();
  p.out = static_cast<uint16_t*>(out.data_ptr());
  p.ws_o = splits > 1 ? ws_o.data_ptr<float>() : nullptr;
  p.ws_lse = splits > 1 ? ws_lse.data_ptr<float>() : nullptr;
  p.counters = decode_counters(q.get_device());
  p.batch = int(b);
  p.hkv = int(hkv);
  p.group = int(group);
  p.length = int(length);
  p.splits = splits;
  p.window = int(std::min<int64_t>(sliding_window, INT32_MAX));
  p.q_scale = float(softcap > 0 ? sm_scale / softcap : sm_scale * log2e);
  p.softcap_log2 = float(softcap > 0 ? softcap * log2e : 0.0);
  p.bf16 = q.scalar_type() == at::kBFloat16;
  adallm::check_launch(adallm_fp8::launch_fp8_decode_attention(p, int(d), at::cuda::getCurrentCUDAStream()),
                       "fp8_decode_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adallm, CUDA, m) {
  m.impl("fp8_kv_write", &fp8_kv_write_cuda);
  m.impl("qk_norm_rope_kv_write", &qk_norm_rope_kv_write_cuda);
  m.impl("fp8_decode_attention", &fp8_decode_attention_cuda);
}
