// model.safetensors.index.json's contents to ParseSafetensorsIndex; on
// success every shard is a plain, non-empty file name with tensors.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto shards = dmoe::core::ParseSafetensorsIndex(
      std::string_view(reinterpret_cast<const char*>(data), size), "index.json");
  if (!shards.ok()) return 0;
  for (const auto& [shard, names] : *shards) {
    if (shard.empty() || shard.find('/') != shard.npos || names.empty()) std::abort();
  }
  return 0;
}
