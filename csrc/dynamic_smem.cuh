// dynamic_smem_optin(cache, optin, kernels...): the current device's opt-in limit of dynamic shared memory per CTA
// (sm_90: 227 KB, sm_89: 99 KB, sm_80: 163 KB), after allowing `kernels` to use all of it. The attribute is set once
// per device (the caller's `cache`, one per set of kernels); kernels that stage more than 48 KB need it.
#pragma once

#include <cuda_runtime_api.h>

namespace adallm {

template <typename... Kernels>
cudaError_t dynamic_smem_optin(int (&cache)[64], int& optin, Kernels... kernels) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device >= 64) return cudaErrorNotSupported;
    if (cache[device] == 0) {
        int limit = 0;
        err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        ((err = err == cudaSuccess ? cudaFuncSetAttribute(kernels, cudaFuncAttributeMaxDynamicSharedMemorySize, limit)
                                   : err),
         ...);
        if (err != cudaSuccess) return err;
        cache[device] = limit;
    }
    optin = cache[device];
    return cudaSuccess;
}

}  // namespace adallm
