// Element types found in checkpoints and used by kernels, with exact scalar
// conversions. Conversions to float are exact for every input; F32 -> BF16 rounds
// to nearest even (NaN stays NaN).
#ifndef DMOE_CORE_DTYPE_H_
#define DMOE_CORE_DTYPE_H_

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace dmoe::core {

enum class DType { kF32, kF16, kBF16, kF8E4M3 };

// Safetensors spelling: "F32", "F16", "BF16", "F8_E4M3".
std::string_view DTypeName(DType t);
// Parses a safetensors dtype string; nullopt for anything else.
std::optional<DType> ParseDType(std::string_view s);
size_t DTypeSize(DType t);

inline float BF16ToF32(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

inline uint16_t F32ToBF16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: man * 2^-24.
    float f = std::ldexp(static_cast<float>(man), -24);
    return sign ? -f : f;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}

// Rounds to the nearest F16 value (ties to even), saturating at +-65504
// instead of overflowing to infinity; NaN stays NaN. Subnormals are exact
// IEEE (no flush to zero).
inline uint16_t F32ToF16Sat(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477fe000u) return static_cast<uint16_t>(sign | 0x7bffu);  // >= 65504 (and inf)
  if (a >= 0x38800000u) {                                              // normal: >= 2^-14
    uint32_t r = a - (112u << 23);                                     // rebias 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (a < 0x33000000u) return sign;  // below 2^-25: rounds to zero (2^-25 itself ties to 0)
  // Subnormal: the value in units of 2^-24, rounded to nearest even.
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - (a >> 23);  // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

// OCP FP8 E4M3 ("e4m3fn"): bias 7, no infinities, S.1111.111 is NaN, max 448.
inline float F8E4M3ToF32(uint8_t v) {
  const bool neg = v & 0x80;
  const int exp = (v >> 3) & 0xf;
  const int man = v & 0x7;
  float f;
  if (exp == 0xf && man == 0x7) return std::nanf("");
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  } else {
    f = std::ldexp(1.0f + man / 8.0f, exp - 7);
  }
  return neg ? -f : f;
}

// Rounds to the nearest E4M3 value (ties to even), saturating at +-448. A plain
// scan over all codes: the reference the fast version is tested against.
uint8_t F32ToF8E4M3(float f);
// Same results as F32ToF8E4M3, with bit arithmetic (for bulk conversion).
uint8_t F32ToF8E4M3Fast(float f);

// Converts `n` elements of `src` (dtype `t`) to float.
void ConvertToF32(DType t, const void* src, size_t n, float* dst);
void ConvertF32ToBF16(const float* src, size_t n, uint16_t* dst);
// Returns how many values were saturated (|x| > 65504 or infinite).
size_t ConvertF32ToF16Sat(const float* src, size_t n, uint16_t* dst);

}  // namespace dmoe::core

#endif  // DMOE_CORE_DTYPE_H_
