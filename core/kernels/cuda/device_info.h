// GPU discovery for the CUDA expert backend (the GPU-backend issue builds on it).
// Plain C++ interface; the implementation is the only place that includes CUDA.
#ifndef DMOE_CORE_KERNELS_CUDA_DEVICE_INFO_H_
#define DMOE_CORE_KERNELS_CUDA_DEVICE_INFO_H_

#include <string>

namespace dmoe::core::cuda {

// Number of usable CUDA devices; 0 when there is no GPU or no driver.
int DeviceCount();
// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" or an error description.
std::string DeviceDescription(int device);

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_DEVICE_INFO_H_
