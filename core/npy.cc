#include "core/npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace dmoe::core {

absl::Status WriteNpyF32(const std::string& path, std::span<const float> data,
                         std::span<const int64_t> shape) {
  int64_t n = 1;
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) {
    n *= shape[i];
    absl::StrAppend(&dims, shape[i], shape.size() == 1 || i + 1 < shape.size() ? "," : "");
    if (i + 1 < shape.size()) absl::StrAppend(&dims, " ");
  }
  if (n != static_cast<int64_t>(data.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("npy: shape holds ", n, " elements but data has ", data.size()));
  }
  std::string header =
      absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (", dims, "), }");
  // magic(6) + version(2) + len(2) + header + '\n', padded to a multiple of 64.
  const size_t base = 10 + header.size() + 1;
  header.append((64 - base % 64) % 64, ' ');
  header.push_back('\n');
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f)
    return absl::NotFoundError(
        absl::StrCat("npy: cannot create ", path, ": ", std::strerror(errno)));
  const unsigned char pre[10] = {0x93,
                                 'N',
                                 'U',
                                 'M',
                                 'P',
                                 'Y',
                                 1,
                                 0,
                                 static_cast<unsigned char>(header.size() & 0xff),
                                 static_cast<unsigned char>(header.size() >> 8)};
  bool ok = std::fwrite(pre, 1, 10, f) == 10 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            std::fwrite(data.data(), sizeof(float), data.size(), f) == data.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) return absl::DataLossError(absl::StrCat("npy: write to ", path, " failed"));
  return absl::OkStatus();
}

absl::StatusOr<NpyArray> ReadNpyF32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("npy: cannot open ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseNpyF32(bytes, path);
}

absl::StatusOr<NpyArray> ParseNpyF32(std::string_view bytes, const std::string& name) {
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("npy: ", name, " is not a .npy file"));
  }
  const size_t hlen = static_cast<unsigned char>(bytes[8]) |
                      (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
  if (10 + hlen > bytes.size()) return absl::InvalidArgumentError("npy: truncated header");
  const std::string header(bytes.substr(10, hlen));
  if (header.find("'<f4'") == std::string::npos || header.find("False") == std::string::npos) {
    return absl::InvalidArgumentError(
        "npy: only little-endian float32 C-order arrays are supported");
  }
  NpyArray a;
  const size_t lp = header.find('('), rp = header.find(')');
  if (lp == std::string::npos || rp == std::string::npos || rp < lp) {
    return absl::InvalidArgumentError("npy: no shape");
  }
  // The element count is checked for overflow: a lying header must neither
  // wrap the size check nor make us allocate.
  size_t n = 1;
  bool overflow = false;
  for (absl::string_view d :
       absl::StrSplit(header.substr(lp + 1, rp - lp - 1), ',', absl::SkipWhitespace())) {
    int64_t v;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(d), &v))
      return absl::InvalidArgumentError("npy: bad shape");
    if (v < 0) return absl::InvalidArgumentError(absl::StrCat("npy: negative dim ", v));
    a.shape.push_back(v);
    overflow |= __builtin_mul_overflow(n, static_cast<size_t>(v), &n);
  }
  for (int64_t v : a.shape) {
    if (v == 0) n = 0, overflow = false;
  }
  if (overflow || n > (bytes.size() - 10 - hlen) / 4) {
    return absl::InvalidArgumentError("npy: data size mismatch");
  }
  if (10 + hlen + n * 4 != bytes.size())
    return absl::InvalidArgumentError("npy: data size mismatch");
  a.data.resize(n);
  if (n != 0) std::memcpy(a.data.data(), bytes.data() + 10 + hlen, n * 4);
  return a;
}

}  // namespace dmoe::core
