// CUDA device discovery (see cuda_device.h).
#include "cuda_device.h"

#include <cstdio>
#include <cuda_runtime.h>

extern "C" int rp_cuda_device_count(void) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no device" error
        return 0;
    }
    return count;
}

extern "C" void rp_cuda_device_describe(int index, char *out, size_t out_size) {
    cudaDeviceProp prop;
    cudaError_t rc = cudaGetDeviceProperties(&prop, index);
    if (rc != cudaSuccess) {
        snprintf(out, out_size, "device %d: %s", index, cudaGetErrorString(rc));
        return;
    }
    snprintf(out, out_size, "%s (sm_%d%d, %zu MiB)", prop.name, prop.major, prop.minor,
             (size_t)(prop.totalGlobalMem >> 20));
}

extern "C" int rp_cuda_device_select(int index, char *out, size_t out_size) {
    cudaError_t rc = cudaSetDevice(index);
    if (rc != cudaSuccess) {
        snprintf(out, out_size, "cudaSetDevice(%d): %s", index, cudaGetErrorString(rc));
        cudaGetLastError();
        return (int)rc;
    }
    return 0;
}

extern "C" void rp_cuda_versions(char *out, size_t out_size) {
    int runtime = 0, driver = 0;
    cudaRuntimeGetVersion(&runtime);
    cudaDriverGetVersion(&driver);
    snprintf(out, out_size, "CUDA runtime %d.%d, driver %d.%d", runtime / 1000,
             (runtime % 1000) / 10, driver / 1000, (driver % 1000) / 10);
}
