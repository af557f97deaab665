// ADALLM_CHECK(cond, parts...): argument checks that raise a Python ValueError with a message built
// from strings, integers, floats, dtypes, shapes and devices; check_launch: a kernel launch's error.
//
// Why not TORCH_CHECK's own formatting: it streams every argument through std::ostringstream inside
// this extension, and on the GPU image (torch 2.11, CUDA 13) the JIT-built .so carries a private
// copy of libstdc++'s stream code whose locale is never initialised: formatting a number segfaults
// (backtrace: std::basic_ostream::_M_insert<long> in adallm_cuda.so). Numbers are therefore turned
// into text with std::to_string (vsnprintf, no locale object) and only a std::string reaches TORCH_CHECK.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <string>
#include <type_traits>

namespace adallm {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(c10::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const c10::Device& d) { return d.str(); }
inline std::string to_text(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline std::string to_text(T v) { return std::to_string(v); }

template <typename... Parts>
inline std::string cat(const Parts&... parts) { return (std::string() + ... + to_text(parts)); }

}  // namespace adallm

#define ADALLM_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, ::adallm::cat(__VA_ARGS__))
// Same, raised as RuntimeError (failures that are not the caller's arguments, e.g. a kernel launch).
#define ADALLM_CHECK_RUNTIME(cond, ...) TORCH_CHECK(cond, ::adallm::cat(__VA_ARGS__))

namespace adallm {

// A kernel launcher's cudaError_t (cudaGetLastError after the launch), raised as RuntimeError naming the kernel.
inline void check_launch(cudaError_t err, const char* kernel) {
  ADALLM_CHECK_RUNTIME(err == cudaSuccess, "adallm: ", kernel, " kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace adallm
