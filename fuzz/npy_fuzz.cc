// A .npy file's bytes to ParseNpyF32; an accepted array holds exactly
// product(shape) floats.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto a = dmoe::core::ParseNpyF32(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!a.ok()) return 0;
  size_t n = 1;
  for (int64_t d : a->shape) n *= static_cast<size_t>(d);
  if (n != a->data.size()) std::abort();
  return 0;
}
