#include "core/dtype.h"

#include <cmath>
#include <cstring>

namespace dmoe::core {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF8E4M3:
      return "F8_E4M3";
  }
  return "?";
}

std::optional<DType> ParseDType(std::string_view s) {
  if (s == "F32") return DType::kF32;
  if (s == "F16") return DType::kF16;
  if (s == "BF16") return DType::kBF16;
  if (s == "F8_E4M3") return DType::kF8E4M3;
  return std::nullopt;
}

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF8E4M3:
      return 1;
  }
  return 0;
}

uint8_t F32ToF8E4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;
  // Search the 127 non-negative finite codes for the nearest (ties to even code).
  // Table-free and only used by the checkpoint writer, so clarity beats speed.
  uint8_t best = 0;
  float best_err = a;
  for (int code = 1; code <= 0x7e; ++code) {
    const float v = F8E4M3ToF32(static_cast<uint8_t>(code));
    const float err = std::fabs(v - a);
    if (err < best_err || (err == best_err && (code & 1) == 0)) {
      best = static_cast<uint8_t>(code);
      best_err = err;
    }
  }
  return sign | best;
}

uint8_t F32ToF8E4M3Fast(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  const float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;
  if (a < 0x1p-6f) {
    // Subnormal range: multiples of 2^-9. Scaling by 2^9 is exact and nearbyint
    // rounds half to even in the default rounding mode; 8 lands on the smallest
    // normal code (0x08), so the ranges join up.
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  // Normal: round the 23-bit mantissa to 3 bits (nearest even; a carry moves
  // into the exponent) and rebias the exponent from 127 to 7. a < 448 keeps the
  // result at or below 0x7e (448).
  const uint32_t x = std::bit_cast<uint32_t>(a);
  const uint32_t r = x + 0x7ffffu + ((x >> 20) & 1u) - (120u << 23);
  return sign | static_cast<uint8_t>(r >> 20);
}

void ConvertToF32(DType t, const void* src, size_t n, float* dst) {
  if (n == 0) return;
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = BF16ToF32(s[i]);
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      return;
    }
    case DType::kF8E4M3: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = F8E4M3ToF32(s[i]);
      return;
    }
  }
}

void ConvertF32ToBF16(const float* src, size_t n, uint16_t* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = F32ToBF16(src[i]);
}

size_t ConvertF32ToF16Sat(const float* src, size_t n, uint16_t* dst) {
  size_t saturated = 0;
  for (size_t i = 0; i < n; ++i) {
    dst[i] = F32ToF16Sat(src[i]);
    saturated += std::fabs(src[i]) > 65504.0f ? 1 : 0;
  }
  return saturated;
}

}  // namespace dmoe::core
