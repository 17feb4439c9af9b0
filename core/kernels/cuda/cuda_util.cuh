// RAII wrappers for CUDA and cuBLAS resources and their errors as
// absl::Status. Included only by .cu files of core/kernels/cuda.
//
// Every wrapper remembers the device it belongs to and makes that device
// current around the calls that need it (DeviceGuard), so callers never depend
// on which device happens to be current. None of them is thread-safe; their
// owners serialise access.
#ifndef DMOE_CORE_KERNELS_CUDA_CUDA_UTIL_CUH_
#define DMOE_CORE_KERNELS_CUDA_CUDA_UTIL_CUH_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace dmoe::core::cuda {

// `what`: cudaGetErrorString(e). Out of memory is ResourceExhausted, a missing
// device or driver FailedPrecondition, anything else Internal.
inline absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg =
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  switch (e) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(msg);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
      return absl::FailedPreconditionError(msg);
    default:
      return absl::InternalError(msg);
  }
}

inline absl::Status CublasStatus(cublasStatus_t s, absl::string_view what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string msg =
      absl::StrCat(what, ": ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ")");
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(msg);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_ARCH_MISMATCH)
    return absl::UnimplementedError(msg);
  return absl::InternalError(msg);
}

#define DMOE_CUDA_RETURN_IF_ERROR(expr, what)                                                     \
  do {                                                                                            \
    const cudaError_t dmoe_cuda_e_ = (expr);                                                      \
    if (dmoe_cuda_e_ != cudaSuccess) return ::dmoe::core::cuda::CudaStatus(dmoe_cuda_e_, (what)); \
  } while (0)

// Makes `device` current for its lifetime, then restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
    device_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int device_ = 0;
};

// Device memory on one device; grow-only through Reserve (contents are not
// kept on growth).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(int device) : device_(device) {}
  ~DeviceBuffer() { Free(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Free();
      device_ = std::exchange(o.device_, 0);
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }

  void set_device(int device) {
    Free();
    device_ = device;
  }
  // At least `bytes` (rounded up to 256) allocated; frees the old block on
  // growth (cudaFree waits for the device's queued work).
  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    Free();
    bytes = (bytes + 255) & ~size_t{255};
    DeviceGuard g(device_);
    DMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&data_, bytes),
                              absl::StrCat("cudaMalloc of ", bytes, " bytes on device ", device_));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Free() {
    if (data_ != nullptr) {
      DeviceGuard g(device_);
      cudaFree(data_);
    }
    data_ = nullptr;
    bytes_ = 0;
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  int device() const { return device_; }

 private:
  int device_ = 0;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (fast, asynchronous copies); grow-only.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() { Free(); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    Free();
    bytes = (bytes + 4095) & ~size_t{4095};
    DMOE_CUDA_RETURN_IF_ERROR(cudaMallocHost(&data_, bytes),
                              absl::StrCat("cudaMallocHost of ", bytes, " bytes"));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Free() {
    if (data_ != nullptr) cudaFreeHost(data_);
    data_ = nullptr;
    bytes_ = 0;
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A non-blocking stream (does not synchronise with the legacy default stream).
class Stream {
 public:
  Stream() = default;
  ~Stream() {
    if (s_ != nullptr) {
      DeviceGuard g(device_);
      cudaStreamDestroy(s_);
    }
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  absl::Status Create(int device) {
    device_ = device;
    DeviceGuard g(device);
    DMOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking),
                              absl::StrCat("cudaStreamCreate on device ", device));
    return absl::OkStatus();
  }
  cudaStream_t get() const { return s_; }
  int device() const { return device_; }

 private:
  int device_ = 0;
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() = default;
  ~Event() {
    if (e_ != nullptr) {
      DeviceGuard g(device_);
      cudaEventDestroy(e_);
    }
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  // `timing`: the event can be used with cudaEventElapsedTime (slower record).
  absl::Status Create(int device, bool timing) {
    device_ = device;
    DeviceGuard g(device);
    DMOE_CUDA_RETURN_IF_ERROR(
        cudaEventCreateWithFlags(&e_, timing ? cudaEventDefault : cudaEventDisableTiming),
        absl::StrCat("cudaEventCreate on device ", device));
    return absl::OkStatus();
  }
  cudaEvent_t get() const { return e_; }

 private:
  int device_ = 0;
  cudaEvent_t e_ = nullptr;
};

class CublasHandle {
 public:
  CublasHandle() = default;
  ~CublasHandle() {
    if (h_ != nullptr) {
      DeviceGuard g(device_);
      cublasDestroy(h_);
    }
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;

  absl::Status Create(int device) {
    device_ = device;
    DeviceGuard g(device);
    if (absl::Status s =
            CublasStatus(cublasCreate(&h_), absl::StrCat("cublasCreate on device ", device));
        !s.ok()) {
      h_ = nullptr;
      return s;
    }
    return absl::OkStatus();
  }
  cublasHandle_t get() const { return h_; }

 private:
  int device_ = 0;
  cublasHandle_t h_ = nullptr;
};

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_CUDA_UTIL_CUH_
