// Packing of activations for the wire (docs/design.md: packed bytes, never repeated
// floats): bf16 (default), f32 (exact mode) or fp8 e4m3 with one f32 scale per
// row. Little-endian, row-major.
//
// fp8 row scales: scale = max(max|row| / 448, FLT_MIN), or 1 for an all-zero
// row, and element = e4m3(x * (1 / scale)). The floor FLT_MIN (2^-126) keeps
// 1 / scale finite: a row of magnitudes below 448 * 2^-126 (~5.3e-36) is coded
// on the grid of 2^-126 (e4m3 subnormals or 0 for its smallest values) rather
// than losing everything to 0 * Inf = NaN. A valid scale is therefore always a
// positive normal float.
//
// One rule for what Unpack accepts: exactly what Pack writes for finite input.
// It refuses (INVALID_ARGUMENT, naming the row or element) an fp8 scale that is
// not a positive normal float (0, negative, denormal, NaN, Inf), and any
// element that decodes to NaN or Inf in every dtype (NaN codes, bf16/f32 Inf).
// Pack does not check its input (it is on the hot path): NaN or Inf in a row,
// or a bf16 value beyond bf16's range, packs to a payload that Unpack refuses.
//
// Unpack validates the shape (negative counts, and counts whose byte sizes
// overflow 64 bits, are INVALID_ARGUMENT), sizes and scales, and names what is
// wrong; it never reads past the given bytes.
#ifndef DMOE_COMMON_WIRE_H_
#define DMOE_COMMON_WIRE_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace dmoe::common {

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

}  // namespace dmoe::common

#endif  // DMOE_COMMON_WIRE_H_
