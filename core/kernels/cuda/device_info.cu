#include <cuda_runtime.h>

#include <cstdio>

#include "core/kernels/cuda/device_info.h"

namespace dmoe::core::cuda {

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string DeviceDescription(int device) {
  cudaDeviceProp p{};
  if (cudaError_t e = cudaGetDeviceProperties(&p, device); e != cudaSuccess) {
    return std::string("device ") + std::to_string(device) + ": " + cudaGetErrorString(e);
  }
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s (sm_%d%d, %.1f GiB)", p.name, p.major, p.minor,
                p.totalGlobalMem / 1073741824.0);
  return buf;
}

}  // namespace dmoe::core::cuda
