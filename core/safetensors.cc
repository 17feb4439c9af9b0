#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status.h"
#include "nlohmann/json.hpp"

namespace dmoe::core {
namespace {

using json = nlohmann::json;

// Debian's Abseil is built with its own absl::string_view (not
// std::string_view), so std::string_view arguments to absl::StrCat go through
// this.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kScaleSuffix = "_scale_inv";

absl::Status Invalid(const std::string& path, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", Sv(what)));
}

std::string JsonTypeName(const json& j) { return j.type_name(); }

// A non-negative JSON integer that fits in int64, or nullopt.
std::optional<int64_t> NonNegativeInt(const json& j) {
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(v);
  }
  if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0) return std::nullopt;
    return v;
  }
  return std::nullopt;
}

// product(shape) * elem_size, or nullopt on overflow of the size_t range.
std::optional<uint64_t> CheckedBytes(std::span<const int64_t> shape, uint64_t elem_size) {
  uint64_t n = elem_size;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  if (n > std::numeric_limits<size_t>::max()) return std::nullopt;
  return n;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t TensorView::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// ---------------------------------------------------------------------------
// SafetensorsFile

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    return absl::Status(absl::ErrnoToStatusCode(err), absl::StrCat("cannot open safetensors file ",
                                                                   path, ": ", std::strerror(err)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::Status(absl::ErrnoToStatusCode(err),
                        absl::StrCat("cannot stat ", path, ": ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Invalid(path, "not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return Invalid(
        path, absl::StrCat("file is ", file_size, " bytes, shorter than the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) {
    return absl::Status(absl::ErrnoToStatusCode(map_err),
                        absl::StrCat("cannot mmap ", path, ": ", std::strerror(map_err)));
  }

  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = file_size;
  DMOE_RETURN_IF_ERROR(file->Parse(static_cast<const uint8_t*>(map), file_size));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(
    std::string bytes, const std::string& name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = name;
  file->bytes_ = std::move(bytes);
  const std::string& b = file->bytes_;
  if (b.size() < 8) {
    return Invalid(
        name, absl::StrCat("file is ", b.size(), " bytes, shorter than the 8-byte header length"));
  }
  DMOE_RETURN_IF_ERROR(file->Parse(reinterpret_cast<const uint8_t*>(b.data()), b.size()));
  return file;
}

absl::Status SafetensorsFile::Parse(const uint8_t* base, uint64_t file_size) {
  const std::string& path = path_;
  SafetensorsFile* file = this;
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];  // little-endian
  if (header_len > file_size - 8) {
    return Invalid(path,
                   absl::StrCat("header length ", header_len, " exceeds file size ", file_size));
  }
  const uint64_t data_begin = 8 + header_len;
  const uint64_t data_size = file_size - data_begin;
  const uint8_t* data = base + data_begin;

  json header = json::parse(base + 8, base + 8 + header_len, /*cb=*/nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded()) return Invalid(path, "header is not valid JSON");
  if (!header.is_object()) {
    return Invalid(path,
                   absl::StrCat("header is a JSON ", JsonTypeName(header), ", expected an object"));
  }

  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        return Invalid(path, absl::StrCat("'__metadata__' is a JSON ", JsonTypeName(entry),
                                          ", expected an object of strings"));
      }
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return Invalid(path, absl::StrCat("'__metadata__' key '", m.key(), "' is a JSON ",
                                            JsonTypeName(m.value()), ", expected a string"));
        }
        file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor '", name, "'");
    if (!entry.is_object()) {
      return Invalid(path, absl::StrCat(where, ": entry is a JSON ", JsonTypeName(entry),
                                        ", expected an object"));
    }
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(key)) return Invalid(path, absl::StrCat(where, ": missing '", key, "'"));
    }
    const json& jdtype = entry["dtype"];
    if (!jdtype.is_string()) {
      return Invalid(path, absl::StrCat(where, ": 'dtype' is a JSON ", JsonTypeName(jdtype),
                                        ", expected a string"));
    }
    const std::string dtype_name = jdtype.get<std::string>();
    const std::optional<DType> dtype = ParseDType(dtype_name);
    if (!dtype) {
      return Invalid(path, absl::StrCat(where, ": unsupported dtype '", dtype_name,
                                        "' (supported: F32, F16, BF16, F8_E4M3)"));
    }
    const json& jshape = entry["shape"];
    if (!jshape.is_array()) {
      return Invalid(path, absl::StrCat(where, ": 'shape' is a JSON ", JsonTypeName(jshape),
                                        ", expected an array of integers"));
    }
    std::vector<int64_t> shape;
    for (const json& d : jshape) {
      if (!d.is_number_integer()) {
        return Invalid(path, absl::StrCat(where, ": 'shape' has a non-integer element ", d.dump()));
      }
      std::optional<int64_t> v = NonNegativeInt(d);
      if (!v) {
        return Invalid(path,
                       absl::StrCat(where, ": 'shape' has a negative or too large dim ", d.dump()));
      }
      shape.push_back(*v);
    }
    const json& joff = entry["data_offsets"];
    if (!joff.is_array() || joff.size() != 2) {
      return Invalid(path, absl::StrCat(where,
                                        ": 'data_offsets' must be an array of 2 "
                                        "integers, got ",
                                        joff.dump()));
    }
    std::optional<int64_t> begin = NonNegativeInt(joff[0]);
    std::optional<int64_t> end = NonNegativeInt(joff[1]);
    if (!begin || !end) {
      return Invalid(path, absl::StrCat(where,
                                        ": 'data_offsets' must be non-negative "
                                        "integers, got ",
                                        joff.dump()));
    }
    if (*begin > *end) {
      return Invalid(
          path, absl::StrCat(where, ": data_offsets [", *begin, ", ", *end, ") has begin > end"));
    }
    if (static_cast<uint64_t>(*end) > data_size) {
      return Invalid(path, absl::StrCat(where, ": offsets [", *begin, ", ", *end,
                                        ") out of range of data section (", data_size, " bytes)"));
    }
    const uint64_t have = static_cast<uint64_t>(*end - *begin);
    std::optional<uint64_t> need = CheckedBytes(shape, DTypeSize(*dtype));
    if (!need) {
      return Invalid(path, absl::StrCat(where, ": shape ", ShapeString(shape), " ", dtype_name,
                                        " overflows the byte count"));
    }
    if (*need != have) {
      return Invalid(path, absl::StrCat(where, ": shape ", ShapeString(shape), " ", dtype_name,
                                        " needs ", *need, " bytes, data_offsets give ", have));
    }
    TensorView view;
    view.name = name;
    view.dtype = *dtype;
    view.shape = std::move(shape);
    view.data = data + *begin;
    view.nbytes = static_cast<size_t>(have);
    auto [pos, inserted] = file->tensors_.emplace(name, std::move(view));
    if (!inserted) return Invalid(path, absl::StrCat(where, ": duplicate entry"));
  }

  // Overlap check: sort the non-empty ranges by start; each must begin at or
  // after the furthest end seen so far.
  for (const auto& [name, view] : file->tensors_) {
    if (view.nbytes == 0) continue;
    const uint64_t b = static_cast<uint64_t>(view.data - data);
    ranges.push_back({b, b + view.nbytes, &name});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  const Range* furthest = nullptr;
  for (const Range& r : ranges) {
    if (furthest != nullptr && r.begin < furthest->end) {
      return Invalid(path, absl::StrCat("tensors '", *furthest->name, "' and '", *r.name,
                                        "' overlap (data_offsets [", furthest->begin, ", ",
                                        furthest->end, ") and [", r.begin, ", ", r.end, "))"));
    }
    if (furthest == nullptr || r.end > furthest->end) furthest = &r;
  }
  return absl::OkStatus();
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

void SafetensorsFile::Release(const TensorView& t) const {
  if (map_ == nullptr || t.nbytes == 0) return;
  // Only whole pages inside the tensor: neighbours' pages stay resident. The
  // mapping is private and never written, so dropped pages are simply re-read
  // from the file.
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  const uintptr_t end = begin + t.nbytes;
  const uintptr_t first = (begin + page - 1) / page * page;
  const uintptr_t last = end / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

// ---------------------------------------------------------------------------
// Checkpoint

namespace {

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return ss.str();
}

}  // namespace

absl::StatusOr<std::map<std::string, std::vector<std::string>>> ParseSafetensorsIndex(
    std::string_view text, const std::string& ipath) {
  std::map<std::string, std::vector<std::string>> shards;
  json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object()) {
    return Invalid(ipath, "not a JSON object");
  }
  if (!index.contains("weight_map") || !index["weight_map"].is_object()) {
    return Invalid(ipath, "missing object 'weight_map'");
  }
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) {
      return Invalid(ipath, absl::StrCat("weight_map['", it.key(), "'] is a JSON ",
                                         JsonTypeName(it.value()), ", expected a file name"));
    }
    const std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos ||
        shard.find("..") != std::string::npos) {
      return Invalid(ipath, absl::StrCat("weight_map['", it.key(), "']: shard name '", shard,
                                         "' must be a plain file name in the directory"));
    }
    shards[shard].push_back(it.key());
  }
  if (shards.empty()) return Invalid(ipath, "'weight_map' is empty");
  return shards;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory ", dir, " not found"));
  }
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  const fs::path root(dir);

  // Shard file name -> tensors the index says it holds (empty without an
  // index).
  std::map<std::string, std::vector<std::string>> shards;
  const fs::path index_path = root / "model.safetensors.index.json";
  const bool has_index = fs::exists(index_path, ec);
  if (has_index) {
    const std::string ipath = index_path.string();
    DMOE_ASSIGN_OR_RETURN(std::string text, ReadTextFile(ipath));
    DMOE_ASSIGN_OR_RETURN(shards, ParseSafetensorsIndex(text, ipath));
  } else if (fs::exists(root / "model.safetensors", ec)) {
    shards["model.safetensors"];
  } else {
    for (const auto& e : fs::directory_iterator(root, ec)) {
      const std::string fname = e.path().filename().string();
      if (e.path().extension() == ".safetensors" && e.is_regular_file(ec)) shards[fname];
    }
    if (ec) return absl::NotFoundError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
    if (shards.empty()) {
      return absl::NotFoundError(absl::StrCat("no safetensors files in ", dir));
    }
  }

  for (const auto& [fname, listed] : shards) {
    const std::string path = (root / fname).string();
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      if (has_index && absl::IsNotFound(file.status())) {
        return absl::NotFoundError(absl::StrCat("shard ", fname, " listed in ", index_path.string(),
                                                " (for tensor '", listed.front(), "') not found"));
      }
      return file.status();
    }
    const SafetensorsFile* f = file->get();
    for (const std::string& name : listed) {
      if (f->Find(name) == nullptr) {
        return absl::NotFoundError(absl::StrCat("tensor '", name, "' is mapped to shard ", fname,
                                                " by the index but is not in it"));
      }
    }
    for (const auto& [name, view] : f->tensors()) {
      auto [it, inserted] = ckpt->index_.emplace(name, Entry{f, &view});
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is in both ",
                                                       it->second.file->path(), " and ", path));
      }
    }
    ckpt->files_.push_back(std::move(*file));
  }
  return ckpt;
}

bool Checkpoint::Has(std::string_view name) const { return index_.find(name) != index_.end(); }

absl::StatusOr<TensorView> Checkpoint::Get(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", Sv(name), "' not found in checkpoint ", dir_));
  }
  return *it->second.view;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, e] : index_) names.push_back(name);
  return names;
}

size_t Checkpoint::TotalBytes() const {
  size_t total = 0;
  for (const auto& [name, e] : index_) total += e.view->nbytes;
  return total;
}

namespace {

absl::Status CheckShape(const TensorView& t, std::span<const int64_t> expected) {
  if (!std::equal(t.shape.begin(), t.shape.end(), expected.begin(), expected.end())) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': shape ",
                                                   ShapeString(t.shape), ", expected ",
                                                   ShapeString(expected)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Checkpoint::ReadF32(std::string_view name, std::span<const int64_t> expected,
                                 float* out) const {
  DMOE_ASSIGN_OR_RETURN(TensorView t, Get(name));
  DMOE_RETURN_IF_ERROR(CheckShape(t, expected));
  if (t.dtype != DType::kF8E4M3) {
    // Empty tensors skip the conversion: `out` may be null and memcpy(null,
    // ..., 0) is UB.
    const auto n = static_cast<size_t>(t.NumElements());
    if (n > 0) ConvertToF32(t.dtype, t.data, n, out);
    return absl::OkStatus();
  }
  if (t.shape.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", Sv(name), "': F8_E4M3 tensor has shape ", ShapeString(t.shape),
                     "; only 2-D FP8 weights are supported"));
  }
  return ReadRowsF32(name, expected, 0, t.shape[0], out);
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadF32(std::string_view name,
                                                       std::span<const int64_t> expected) const {
  DMOE_ASSIGN_OR_RETURN(TensorView t, Get(name));
  DMOE_RETURN_IF_ERROR(CheckShape(t, expected));
  std::vector<float> out(static_cast<size_t>(t.NumElements()));
  DMOE_RETURN_IF_ERROR(ReadF32(name, expected, out.data()));
  return out;
}

absl::Status Checkpoint::ReadRowsF32(std::string_view name, std::span<const int64_t> expected,
                                     int64_t row_begin, int64_t num_rows, float* out) const {
  DMOE_ASSIGN_OR_RETURN(TensorView t, Get(name));
  DMOE_RETURN_IF_ERROR(CheckShape(t, expected));
  if (t.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", Sv(name), "': shape ", ShapeString(t.shape), " is not 2-D; cannot read rows"));
  }
  const int64_t rows = t.shape[0], cols = t.shape[1];
  if (row_begin < 0 || num_rows < 0 || row_begin > rows || num_rows > rows - row_begin) {
    return absl::OutOfRangeError(absl::StrCat("tensor '", Sv(name), "': rows [", row_begin, ", ",
                                              row_begin + num_rows, ") outside ",
                                              ShapeString(t.shape)));
  }
  const size_t esize = DTypeSize(t.dtype);
  const uint8_t* src = t.data + static_cast<size_t>(row_begin * cols) * esize;
  const size_t n = static_cast<size_t>(num_rows * cols);
  if (n == 0) return absl::OkStatus();
  if (t.dtype != DType::kF8E4M3) {
    ConvertToF32(t.dtype, src, n, out);
    return absl::OkStatus();
  }

  // FP8 block-quantised weight: w[r][c] = q[r][c] * scale_inv[r / br][c / bc].
  const std::string scale_name = absl::StrCat(Sv(name), Sv(kScaleSuffix));
  auto sit = index_.find(scale_name);
  if (sit == index_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", Sv(name),
                                            "' is F8_E4M3 but its scale tensor '", scale_name,
                                            "' is not in checkpoint ", dir_));
  }
  const TensorView& s = *sit->second.view;
  if (s.dtype == DType::kF8E4M3) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", scale_name, "': dtype F8_E4M3, expected F32 or BF16"));
  }
  const int64_t br = fp8_block_rows_, bc = fp8_block_cols_;
  const int64_t srows = CeilDiv(rows, br), scols = CeilDiv(cols, bc);
  const int64_t sshape[2] = {srows, scols};
  if (!std::equal(s.shape.begin(), s.shape.end(), std::begin(sshape), std::end(sshape))) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", scale_name, "': shape ", ShapeString(s.shape), ", expected ",
                     ShapeString(sshape), " (", br, "x", bc, " blocks of '", Sv(name), "' ",
                     ShapeString(t.shape), ")"));
  }
  std::vector<float> scales(static_cast<size_t>(srows * scols));
  ConvertToF32(s.dtype, s.data, scales.size(), scales.data());
  ConvertToF32(DType::kF8E4M3, src, n, out);
  for (int64_t r = 0; r < num_rows; ++r) {
    const float* srow = scales.data() + ((row_begin + r) / br) * scols;
    float* orow = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) orow[c] *= srow[c / bc];
  }
  return absl::OkStatus();
}

void Checkpoint::Release(std::string_view name) const {
  if (auto it = index_.find(name); it != index_.end()) {
    it->second.file->Release(*it->second.view);
  }
  if (auto it = index_.find(absl::StrCat(Sv(name), Sv(kScaleSuffix))); it != index_.end()) {
    it->second.file->Release(*it->second.view);
  }
}

// ---------------------------------------------------------------------------
// SafetensorsWriter

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, std::vector<Decl> tensors,
    const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps the declaration order in the header, matching the data
  // order.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header[std::string(kMetadataKey)] = std::move(m);
  }
  uint64_t offset = 0;
  std::set<std::string_view> seen;
  for (const Decl& d : tensors) {
    if (d.name.empty() || d.name == kMetadataKey) {
      return Invalid(path, absl::StrCat("invalid tensor name '", d.name, "'"));
    }
    if (!seen.insert(d.name).second) {
      return Invalid(path, absl::StrCat("tensor '", d.name, "' declared twice"));
    }
    std::optional<uint64_t> nbytes = CheckedBytes(d.shape, DTypeSize(d.dtype));
    if (!nbytes) {
      return Invalid(path,
                     absl::StrCat("tensor '", d.name, "': invalid shape ", ShapeString(d.shape)));
    }
    header[d.name] = {{"dtype", std::string(DTypeName(d.dtype))},
                      {"shape", d.shape},
                      {"data_offsets", {offset, offset + *nbytes}}};
    offset += *nbytes;
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8,
              ' ');  // keeps the data section 8-byte aligned

  std::unique_ptr<SafetensorsWriter> w(new SafetensorsWriter());
  w->path_ = path;
  w->decls_ = std::move(tensors);
  w->f_ = std::fopen(path.c_str(), "wb");
  if (w->f_ == nullptr) {
    const int err = errno;
    return absl::Status(absl::ErrnoToStatusCode(err),
                        absl::StrCat("cannot create ", path, ": ", std::strerror(err)));
  }
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));
  if (std::fwrite(len, 1, 8, w->f_) != 8 ||
      std::fwrite(text.data(), 1, text.size(), w->f_) != text.size()) {
    const int err = errno;
    return absl::Status(absl::ErrnoToStatusCode(err),
                        absl::StrCat("cannot write header of ", path, ": ", std::strerror(err)));
  }
  return w;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (f_ != nullptr) std::fclose(f_);
}

absl::Status SafetensorsWriter::Write(std::string_view name, const void* data, size_t nbytes) {
  if (f_ == nullptr)
    return absl::FailedPreconditionError(absl::StrCat(path_, ": writer is closed"));
  if (next_ >= decls_.size()) {
    return absl::FailedPreconditionError(absl::StrCat(
        path_, ": tensor '", Sv(name), "' written after all ", decls_.size(), " declared tensors"));
  }
  const Decl& d = decls_[next_];
  if (name != d.name) {
    return absl::FailedPreconditionError(absl::StrCat(
        path_, ": tensor '", Sv(name), "' written out of order; next declared is '", d.name, "'"));
  }
  const uint64_t want = *CheckedBytes(d.shape, DTypeSize(d.dtype));  // checked at Create
  if (nbytes != want) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", Sv(name), "': ", nbytes,
                                                   " bytes given, shape ", ShapeString(d.shape),
                                                   " ", Sv(DTypeName(d.dtype)), " needs ", want));
  }
  if (nbytes > 0 && std::fwrite(data, 1, nbytes, f_) != nbytes) {
    const int err = errno;
    return absl::Status(
        absl::ErrnoToStatusCode(err),
        absl::StrCat(path_, ": writing tensor '", Sv(name), "': ", std::strerror(err)));
  }
  ++next_;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  if (f_ == nullptr)
    return absl::FailedPreconditionError(absl::StrCat(path_, ": writer is closed"));
  if (next_ != decls_.size()) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": only ", next_, " of ",
                                                      decls_.size(), " tensors written; next is '",
                                                      decls_[next_].name, "'"));
  }
  const int rc = std::fclose(f_);
  f_ = nullptr;
  if (rc != 0) {
    const int err = errno;
    return absl::Status(absl::ErrnoToStatusCode(err),
                        absl::StrCat("closing ", path_, ": ", std::strerror(err)));
  }
  return absl::OkStatus();
}

}  // namespace dmoe::core
