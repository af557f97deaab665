// device_symbol_address(symbol, cache, device): the address of a __device__ variable (`symbol`, as host code names
// it) on the current device, which must be `device`, looked up once per device in the caller's `cache`. A template
// in a header because cudaGetSymbolAddress only finds a symbol from the translation unit that defines it.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <array>

#include "check.h"

namespace adallm {

template <typename T, typename Symbol>
T* device_symbol_address(const Symbol& symbol, std::array<T*, 64>& cache, int device) {
  ADALLM_CHECK_RUNTIME(device >= 0 && device < int(cache.size()), "adallm: device index ", device, " out of range");
  if (cache[device] == nullptr) {
    void* ptr = nullptr;
    C10_CUDA_CHECK(cudaGetSymbolAddress(&ptr, symbol));
    cache[device] = static_cast<T*>(ptr);
  }
  return cache[device];
}

}  // namespace adallm
