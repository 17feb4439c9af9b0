// Writes and reads NumPy .npy files (format 1.0, little-endian float32 '<f4',
// C order) for logits dumps and tests.
#ifndef DMOE_CORE_NPY_H_
#define DMOE_CORE_NPY_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::core {

absl::Status WriteNpyF32(const std::string& path, std::span<const float> data,
                         std::span<const int64_t> shape);

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
absl::StatusOr<NpyArray> ReadNpyF32(const std::string& path);
// The same from a file's contents; `name` stands for the path in errors.
absl::StatusOr<NpyArray> ParseNpyF32(std::string_view bytes, const std::string& name = "<memory>");

}  // namespace dmoe::core

#endif  // DMOE_CORE_NPY_H_
