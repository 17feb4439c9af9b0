// Safetensors files and Hugging Face checkpoints (single file or sharded).
//
// A SafetensorsFile maps one file read-only and validates its header completely
// at Open: 8-byte little-endian header length inside the file, the header is a
// JSON object, every entry has a known dtype, non-negative shape, data_offsets
// [begin, end) with end - begin == product(shape) * dtype size, inside the data
// section, and no two tensors overlapping. "__metadata__" is accepted and kept.
// Errors name the file and the tensor.
//
// A Checkpoint is a model directory: config.json plus either model.safetensors or
// the shards listed in model.safetensors.index.json ("weight_map"), or, without an
// index, every *.safetensors file in the directory. Tensor names must be unique
// across shards.
//
// Thread safety: all const methods are safe to call concurrently.
#ifndef DMOE_CORE_SAFETENSORS_H_
#define DMOE_CORE_SAFETENSORS_H_

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"

namespace dmoe::core {

struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the mapping; valid while the file lives
  size_t nbytes = 0;
  int64_t NumElements() const;
};

// "[1408, 2048]"
std::string ShapeString(std::span<const int64_t> shape);

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // The same validation over a file's contents held in memory (kept by the
  // object); `name` stands for the path in errors. For tests and fuzzing.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(
      std::string bytes, const std::string& name = "<memory>");
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView, std::less<>>& tensors() const { return tensors_; }
  const TensorView* Find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Tells the kernel the pages of `t` are no longer needed (MADV_DONTNEED), so that
  // loading a model tensor by tensor does not keep the whole file resident.
  void Release(const TensorView& t) const;

 private:
  SafetensorsFile() = default;
  // Validates the header of the `size` bytes at `base` (the mapping or bytes_)
  // and fills tensors_ and metadata_.
  absl::Status Parse(const uint8_t* base, uint64_t size);
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::string bytes_;  // the contents when made by FromBytes (no mapping)
  std::map<std::string, TensorView, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

// The "weight_map" of model.safetensors.index.json's contents `text`: shard
// file name -> the tensors the index puts in it. INVALID_ARGUMENT naming
// `path` when it is not an object with a non-empty "weight_map" of plain file
// names.
absl::StatusOr<std::map<std::string, std::vector<std::string>>> ParseSafetensorsIndex(
    std::string_view text, const std::string& path);

class Checkpoint {
 public:
  // Opens `dir` (see the file comment). Does not parse config.json.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  bool Has(std::string_view name) const;
  absl::StatusOr<TensorView> Get(std::string_view name) const;
  std::vector<std::string> TensorNames() const;
  size_t TotalBytes() const;

  // Reads `name` as float32 into `out` after checking its shape equals `expected`
  // (error: "tensor 'X': shape [a, b], expected [c, d]"). F8_E4M3 tensors are
  // dequantised with the block scales in "<name>_scale_inv" (F32, shape
  // [ceil(rows/block), ceil(cols/block)]; block 128x128 unless set with
  // set_fp8_block), which must exist. `out` must hold product(expected) floats.
  absl::Status ReadF32(std::string_view name, std::span<const int64_t> expected, float* out) const;
  absl::StatusOr<std::vector<float>> ReadF32(std::string_view name,
                                             std::span<const int64_t> expected) const;
  // Rows [row_begin, row_begin + num_rows) of a 2-D tensor, as float32.
  absl::Status ReadRowsF32(std::string_view name, std::span<const int64_t> expected,
                           int64_t row_begin, int64_t num_rows, float* out) const;
  // Drops the file pages of `name` (and of its scales) from memory.
  void Release(std::string_view name) const;

  void set_fp8_block(int64_t rows, int64_t cols) {
    fp8_block_rows_ = rows;
    fp8_block_cols_ = cols;
  }

 private:
  Checkpoint() = default;
  struct Entry {
    const SafetensorsFile* file;
    const TensorView* view;
  };
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry, std::less<>> index_;
  int64_t fp8_block_rows_ = 128;
  int64_t fp8_block_cols_ = 128;
};

// Writes a safetensors file tensor by tensor (data is never all in memory): the
// caller declares every tensor first, then writes each one's bytes in the
// declared order. Used by `dmoe make-model` and by tests.
class SafetensorsWriter {
 public:
  struct Decl {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  // Creates `path` and writes the header (offsets are assigned in declaration order).
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, std::vector<Decl> tensors,
      const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  // Appends the next declared tensor's bytes; `nbytes` must match its declaration.
  absl::Status Write(std::string_view name, const void* data, size_t nbytes);
  // Checks every tensor was written and closes the file.
  absl::Status Finish();

 private:
  SafetensorsWriter() = default;
  std::string path_;
  std::FILE* f_ = nullptr;
  std::vector<Decl> decls_;
  size_t next_ = 0;
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_SAFETENSORS_H_
