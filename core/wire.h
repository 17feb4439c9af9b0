// Packing of activations for the wire (DESIGN.md: packed bytes, never repeated
// floats): bf16 (default), f32 (exact mode) or fp8 e4m3 with one f32 scale per
// row (scale = max|row| / 448). Little-endian, row-major.
//
// Unpack validates sizes and scales and names what is wrong; it never reads past
// the given bytes.
#ifndef DMOE_CORE_WIRE_H_
#define DMOE_CORE_WIRE_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace dmoe::core {

enum class WireDType { kBF16, kF32, kF8E4M3 };

size_t WireElementSize(WireDType t);

// Writes rows x cols floats (row stride `ld`, 0 = cols) into `data` (resized) and,
// for fp8, the per-row scales into `scales` (else cleared). Reuses the strings'
// capacity: no allocation once they are large enough.
void PackActivations(const float* x, int64_t rows, int64_t cols, int64_t ld, WireDType type,
                     std::string* data, std::string* scales);

// Inverse of PackActivations into out[rows, cols].
absl::Status UnpackActivations(WireDType type, std::string_view data, std::string_view scales,
                               int64_t rows, int64_t cols, float* out);

}  // namespace dmoe::core

#endif  // DMOE_CORE_WIRE_H_
