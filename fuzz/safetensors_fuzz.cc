// A safetensors file's bytes (header length, JSON header, data section) to
// SafetensorsFile::FromBytes; on success every tensor view must lie inside the
// input and hold product(shape) * dtype size bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = dmoe::core::SafetensorsFile::FromBytes(
      std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  for (const auto& [name, t] : (*file)->tensors()) {
    if (t.nbytes != static_cast<size_t>(t.NumElements()) * dmoe::core::DTypeSize(t.dtype))
      std::abort();
    // Touch the first and last byte: ASan checks they are inside the copy.
    if (t.nbytes != 0 && (t.data[0] ^ t.data[t.nbytes - 1]) == 0x100) std::abort();
    (*file)->Release(t);
  }
  return 0;
}
