#include "core/wire.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"

namespace dmoe::core {

size_t WireElementSize(WireDType t) {
  switch (t) {
    case WireDType::kBF16: return 2;
    case WireDType::kF32: return 4;
    case WireDType::kF8E4M3: return 1;
  }
  return 0;
}

void PackActivations(const float* x, int64_t rows, int64_t cols, int64_t ld, WireDType type,
                     std::string* data, std::string* scales) {
  if (ld == 0) ld = cols;
  data->resize(static_cast<size_t>(rows * cols) * WireElementSize(type));
  scales->clear();
  char* out = data->data();
  switch (type) {
    case WireDType::kF32:
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * cols * 4, x + r * ld, cols * 4);
      return;
    case WireDType::kBF16: {
      auto* o = reinterpret_cast<uint16_t*>(out);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = F32ToBF16(x[r * ld + c]);
      }
      return;
    }
    case WireDType::kF8E4M3: {
      scales->resize(static_cast<size_t>(rows) * 4);
      auto* o = reinterpret_cast<uint8_t*>(out);
      for (int64_t r = 0; r < rows; ++r) {
        float mx = 0;
        for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, std::fabs(x[r * ld + c]));
        const float scale = mx > 0 ? mx / 448.0f : 1.0f;
        std::memcpy(scales->data() + r * 4, &scale, 4);
        const float inv = 1.0f / scale;
        for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = F32ToF8E4M3Fast(x[r * ld + c] * inv);
      }
      return;
    }
  }
}

absl::Status UnpackActivations(WireDType type, std::string_view data, std::string_view scales,
                               int64_t rows, int64_t cols, float* out) {
  if (rows < 0 || cols < 0) return absl::InvalidArgumentError("activations: negative shape");
  const size_t want = static_cast<size_t>(rows) * cols * WireElementSize(type);
  if (data.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("activations: [", rows, ", ", cols, "] needs ",
                                                   want, " bytes, got ", data.size()));
  }
  const size_t n = static_cast<size_t>(rows) * cols;
  switch (type) {
    case WireDType::kF32:
      if (n) std::memcpy(out, data.data(), n * 4);
      break;
    case WireDType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, data.data() + 2 * i, 2);
        out[i] = BF16ToF32(v);
      }
      break;
    case WireDType::kF8E4M3: {
      if (scales.size() != static_cast<size_t>(rows) * 4) {
        return absl::InvalidArgumentError(absl::StrCat("activations: fp8 needs ", rows * 4,
                                                       " bytes of row scales, got ", scales.size()));
      }
      for (int64_t r = 0; r < rows; ++r) {
        float s;
        std::memcpy(&s, scales.data() + r * 4, 4);
        if (!std::isfinite(s) || s <= 0) {
          return absl::InvalidArgumentError(absl::StrCat("activations: row ", r, " scale ", s,
                                                         " is not a positive finite number"));
        }
        for (int64_t c = 0; c < cols; ++c) {
          out[r * cols + c] = F8E4M3ToF32(static_cast<uint8_t>(data[r * cols + c])) * s;
        }
      }
      break;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(out[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("activations: element ", i, " is not finite (", out[i], ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace dmoe::core
