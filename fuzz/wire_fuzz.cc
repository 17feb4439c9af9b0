// The activation codec (common/wire.h), both directions.
//
// Decode: byte 0 picks the dtype, bytes 1-16 are rows and cols (int64, any
// value), bytes 17-18 the length of the row scales; the rest is scales then
// data. UnpackActivations writes into a buffer of exactly the floats the data
// could hold, so a shape it fails to check is an ASan report.
//
// Encode: the same bytes as float32 values in rows of at most 16; finite
// values (within bf16's range for bf16) must pack and unpack OK in every
// dtype, f32 bit-exactly (the header's one rule).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "common/wire.h"

namespace {

using dmoe::common::WireDType;

constexpr WireDType kTypes[] = {WireDType::kBF16, WireDType::kF32, WireDType::kF8E4M3};

void Decode(const uint8_t* data, size_t size) {
  if (size < 19) return;
  const WireDType type = kTypes[data[0] % 3];
  int64_t rows, cols;
  std::memcpy(&rows, data + 1, 8);
  std::memcpy(&cols, data + 9, 8);
  // Mostly small shapes (so that the fuzzer reaches the element checks),
  // sometimes the raw 64-bit values.
  if (!(data[0] & 0x80)) {
    rows &= 0xff;
    cols &= 0xff;
  }
  size_t nscales = data[17] | (data[18] << 8);
  std::string_view rest(reinterpret_cast<const char*>(data + 19), size - 19);
  if (nscales > rest.size()) nscales = rest.size();
  const std::string scales(rest.substr(0, nscales));  // own allocations: exact bounds for ASan
  const std::string payload(rest.substr(nscales));
  std::vector<float> out(payload.size() / dmoe::common::WireElementSize(type));
  (void)dmoe::common::UnpackActivations(type, payload, scales, rows, cols, out.data());
}

void RoundTrip(const uint8_t* data, size_t size) {
  const int64_t n = static_cast<int64_t>(size / 4);
  if (n == 0) return;
  std::vector<float> x(n);
  std::memcpy(x.data(), data, n * 4);
  const int64_t cols = std::min<int64_t>(n, 1 + data[0] % 16);
  const int64_t rows = n / cols;
  bool finite = true, bf16_range = true;
  for (int64_t i = 0; i < rows * cols; ++i) {
    finite &= std::isfinite(x[i]);
    bf16_range &= std::fabs(x[i]) < 3.38e38f;  // rounds to a finite bf16
  }
  if (!finite) return;
  std::string packed, scales;
  std::vector<float> back(rows * cols);
  for (WireDType type : kTypes) {
    if (type == WireDType::kBF16 && !bf16_range) continue;
    dmoe::common::PackActivations(x.data(), rows, cols, /*ld=*/0, type, &packed, &scales);
    if (!dmoe::common::UnpackActivations(type, packed, scales, rows, cols, back.data()).ok())
      std::abort();
    if (type == WireDType::kF32 && std::memcmp(back.data(), x.data(), back.size() * 4) != 0)
      std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Decode(data, size);
  RoundTrip(data, size);
  return 0;
}
