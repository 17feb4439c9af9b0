// The CPU expert backend: permute -> per-FFN GEMMs -> unpermute.
//
// Compute(batch):
//   1. Validate everything (offsets, sizes, loaded FFNs, hidden sizes) before
//      any write, so an error leaves `out` untouched.
//   2. Permute: group the assignments per FFN in order of first appearance;
//      inside a group rows keep assignment (= token) order. A group of more
//      than kMaxChunkRows rows is split into near-equal row chunks; a (group,
//      chunk) is a work item.
//   3. Per work item: gather its x rows into a contiguous block, one gate|up
//      GEMM over the block (one oneDNN execute), SwiGLU into a dense h block,
//      one down GEMM into the item's rows of the permuted output.
//   4. Unpermute: out[t] = sum of weight * y over t's assignments, in the
//      batch's order, in fp32.
//
// Threads. With one thread, or when the work items cannot be spread evenly over
// the pool (e.g. one expert), items run one after another and each GEMM uses
// the whole OpenMP pool. Otherwise every thread takes whole items (largest
// first), with oneDNN single-threaded inside: no fork/join per GEMM, and each
// thread streams its own experts' weights. At DeepSeek-V2-Lite shapes on the
// 2-core host, 2 threads, whole items vs GEMM-level threading (moe_layer_bench,
// alternating runs): 5-15% faster at 1 token, 6-11% at 8, 7-19% at 64, 4-11% at
// 512, 5% at 2048 tokens.
//
// Memory. Only the permuted output is batch-sized ([A, hidden]); each thread's
// gather, gate|up and h blocks hold one work item (<= kMaxChunkRows rows),
// reused item after item, so they stay in cache between the two GEMMs.
//
// Determinism: a GEMM row does not depend on the other rows of its call or on
// the thread count (gemm.h's kernels; checked in linear_test.cc), SwiGLU is
// elementwise and the combine order is fixed by the batch, so a token's output
// is bitwise the same alone or batched, whatever the thread count or schedule.

// GCC 12 reports its own _mm512_undefined_*() temporaries inside the intrinsics
// headers as maybe-uninitialized once inlined; the diagnostic is located in the
// header, so it is silenced before the include.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "core/expert_backend.h"
#include "core/isa.h"
#include "core/kernels/cpu/linear.h"
#include "core/kernels/cpu/swiglu.h"
#include "core/status.h"

namespace dmoe::core {
namespace {

// The unpermute's accumulation for one token and up to kCombineRows of its
// assignments:
//   o[j] = (((init ? 0 : o[j]) + w[0] y[0][j]) + w[1] y[1][j]) + ...
// multiply then add, in this order, for every element: vector lanes and scalar
// tail alike (no FMA), so the result is one fixed sequence of fp32 operations.
constexpr int kCombineRows = 8;

__attribute__((target("avx512f"))) void CombineAvx512(const float* const* y, const float* w,
                                                      int count, bool init, float* o, int64_t n) {
  __m512 vw[kCombineRows];
  for (int a = 0; a < count; ++a) vw[a] = _mm512_set1_ps(w[a]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 acc = _mm512_mul_ps(vw[0], _mm512_loadu_ps(y[0] + j));
    if (!init) acc = _mm512_add_ps(_mm512_loadu_ps(o + j), acc);
    for (int a = 1; a < count; ++a) {
      acc = _mm512_add_ps(acc, _mm512_mul_ps(vw[a], _mm512_loadu_ps(y[a] + j)));
    }
    _mm512_storeu_ps(o + j, acc);
  }
  for (; j < n; ++j) {
    float acc = w[0] * y[0][j];
    if (!init) acc = o[j] + acc;
    for (int a = 1; a < count; ++a) acc = acc + w[a] * y[a][j];
    o[j] = acc;
  }
}

void Combine(const float* const* y, const float* w, int count, bool init, float* o, int64_t n) {
  static const bool kAvx512 = IsaAtLeast(IsaLevel::kAvx512);
  if (kAvx512) {
    CombineAvx512(y, w, count, init, o, n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    float acc = w[0] * y[0][j];
    if (!init) acc = o[j] + acc;
    for (int a = 1; a < count; ++a) acc = acc + w[a] * y[a][j];
    o[j] = acc;
  }
}

// Runs body(i) for i in [0, n), over the OpenMP pool when the work (n * unit
// floats) pays for a parallel region.
template <typename F>
void ParallelFor(int64_t n, int64_t unit, const F& body) {
  const bool par = n > 1 && n * unit >= (int64_t{1} << 15) && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// A grow-only float buffer; contents are not preserved on growth.
class FloatBuffer {
 public:
  float* Get(size_t n) {
    if (n > capacity_) {
      data_ = std::make_unique_for_overwrite<float[]>(n);
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float[]> data_;
  size_t capacity_ = 0;
};

class CpuExpertBackend final : public ExpertBackend {
 public:
  explicit CpuExpertBackend(ComputeType type) : type_(type) {}

  std::string Name() const override {
    return type_ == ComputeType::kBF16   ? "cpu-bf16"
           : type_ == ComputeType::kInt8 ? "cpu-int8"
                                         : "cpu-f32";
  }
  bool SupportsPerAssignmentOut() const override { return true; }

  absl::Status LoadFfn(int32_t layer, int32_t ffn_id, const FfnWeights& w) override;
  absl::Status UnloadFfn(int32_t layer, int32_t ffn_id) override;
  bool HasFfn(int32_t layer, int32_t ffn_id) const override;
  absl::Status Compute(const ExpertBatch& batch, float* out) override;
  size_t WeightBytes() const override;
  bool LoadsConcurrently() const override { return true; }

 private:
  struct Ffn {
    int64_t hidden = 0;
    int64_t inter = 0;
    PackedLinear gate_up;  // [2 * inter, hidden]: gate rows then up rows
    PackedLinear down;     // [hidden, inter]
    // Scratch of the Compute in progress (guarded by mu_ through the backend):
    // the call that last saw this FFN and its group index in that call.
    uint64_t seen_in_call = 0;
    int32_t group = -1;
  };
  // ffn_id + 1 -> FFN (slot 0 is the shared FFN); null where none is loaded.
  using Layer = std::vector<std::unique_ptr<Ffn>>;

  Ffn* Find(int32_t layer, int32_t ffn_id) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::Status Validate(const ExpertBatch& batch, const float* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Permute(const ExpertBatch& batch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Rows [first, first + rows) of the permuted order, all of one FFN.
  struct WorkItem {
    const Ffn* ffn;
    int32_t first;
    int32_t rows;
    int64_t cost;  // estimated time, arbitrary units
  };
  // One thread's blocks for one work item, grown only.
  struct Workspace {
    FloatBuffer xg;  // [rows, hidden] gathered x
    FloatBuffer gu;  // [rows, 2 * inter] gate|up output
    FloatBuffer h;   // [rows, inter] silu(gate) * up
  };
  static constexpr int32_t kMaxChunkRows = 256;

  void MakeWorkItems() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // True when the pool is better used by giving threads whole work items.
  bool SpreadItems(int threads) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunItem(const WorkItem& item, const ExpertBatch& batch, Workspace& ws, float* yp)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unpermute(const ExpertBatch& batch, const float* yp, float* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ComputeType type_;

  // Serialises the packing part of LoadFfn; its staging buffer is reused
  // because fresh pages are expensive here (~11 us per 4 KiB first touch).
  absl::Mutex load_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // [2 * inter, hidden] gate rows then up rows, staged for packing
  FloatBuffer fused_ ABSL_GUARDED_BY(load_mu_);

  // Held for the whole of Compute, the bookkeeping of Load and Unload, and the
  // queries: one Compute at a time per backend.
  mutable absl::Mutex mu_;
  absl::flat_hash_map<int32_t, Layer> layers_ ABSL_GUARDED_BY(mu_);
  size_t weight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t calls_ ABSL_GUARDED_BY(mu_) = 0;

  // Workspaces of Compute, grown only. A = assignments, G = distinct FFNs in
  // a batch; "permuted" order = grouped by FFN.
  // [G]
  std::vector<Ffn*> group_ffn_ ABSL_GUARDED_BY(mu_);
  // [A]
  std::vector<int32_t> assignment_to_group_ ABSL_GUARDED_BY(mu_);
  // [G + 1] first permuted row of each group
  std::vector<int32_t> expert_first_offset_ ABSL_GUARDED_BY(mu_);
  // [A] token of each permuted row
  std::vector<int32_t> permuted_to_token_ ABSL_GUARDED_BY(mu_);
  // [A] permuted row of each assignment
  std::vector<int32_t> assignment_to_permuted_ ABSL_GUARDED_BY(mu_);
  // [G]
  std::vector<int32_t> group_cursor_ ABSL_GUARDED_BY(mu_);
  // Work items, largest cost first.
  std::vector<WorkItem> items_ ABSL_GUARDED_BY(mu_);
  std::vector<Workspace> workspaces_ ABSL_GUARDED_BY(mu_);  // [threads]
  std::vector<int64_t> thread_load_ ABSL_GUARDED_BY(mu_);   // [threads]
  // [A, hidden] FFN outputs, permuted order
  FloatBuffer yp_ ABSL_GUARDED_BY(mu_);
};

CpuExpertBackend::Ffn* CpuExpertBackend::Find(int32_t layer, int32_t ffn_id) const {
  if (ffn_id < kSharedFfn) return nullptr;
  auto it = layers_.find(layer);
  if (it == layers_.end()) return nullptr;
  const size_t slot = static_cast<size_t>(ffn_id) + 1;
  return slot < it->second.size() ? it->second[slot].get() : nullptr;
}

absl::Status CpuExpertBackend::LoadFfn(int32_t layer, int32_t ffn_id, const FfnWeights& w) {
  DMOE_RETURN_IF_ERROR(ValidateFfnWeights(layer, ffn_id, w));
  const std::string name = FfnName(layer, ffn_id);
  const size_t expect = static_cast<size_t>(w.hidden * w.intermediate);

  // Pack outside mu_ (tens of milliseconds per expert); Compute is not blocked.
  auto ffn = std::make_unique<Ffn>();
  ffn->hidden = w.hidden;
  ffn->inter = w.intermediate;
  {
    absl::MutexLock load_lock(&load_mu_);
    // Large FFNs (dense layers) stage in a temporary so that the staging buffer
    // does not keep their size resident after loading.
    FloatBuffer own;
    FloatBuffer& staging = 2 * expect * sizeof(float) > (size_t{64} << 20) ? own : fused_;
    float* fused = staging.Get(2 * expect);  // [2 * inter, hidden]: gate rows, up rows
    std::memcpy(fused, w.gate.data(), expect * sizeof(float));
    std::memcpy(fused + expect, w.up.data(), expect * sizeof(float));
    auto gate_up = PackedLinear::Create(fused, 2 * w.intermediate, w.hidden, type_);
    if (!gate_up.ok()) {
      return absl::Status(gate_up.status().code(),
                          absl::StrFormat("%s: gate|up: %s", name, gate_up.status().message()));
    }
    ffn->gate_up = *std::move(gate_up);
  }
  auto down = PackedLinear::Create(w.down.data(), w.hidden, w.intermediate, type_);
  if (!down.ok()) {
    return absl::Status(down.status().code(),
                        absl::StrFormat("%s: down: %s", name, down.status().message()));
  }
  ffn->down = *std::move(down);

  absl::MutexLock lock(&mu_);
  Layer& slots = layers_[layer];
  const size_t slot = static_cast<size_t>(ffn_id) + 1;
  if (slot >= slots.size()) slots.resize(slot + 1);
  if (slots[slot] != nullptr) {
    weight_bytes_ -= slots[slot]->gate_up.weight_bytes() + slots[slot]->down.weight_bytes();
  }
  weight_bytes_ += ffn->gate_up.weight_bytes() + ffn->down.weight_bytes();
  slots[slot] = std::move(ffn);
  return absl::OkStatus();
}

absl::Status CpuExpertBackend::UnloadFfn(int32_t layer, int32_t ffn_id) {
  std::unique_ptr<Ffn> gone;  // freed after the lock is released
  absl::MutexLock lock(&mu_);
  Ffn* f = Find(layer, ffn_id);
  if (f == nullptr) {
    return absl::NotFoundError(
        absl::StrFormat("%s is not loaded on this backend", FfnName(layer, ffn_id)));
  }
  weight_bytes_ -= f->gate_up.weight_bytes() + f->down.weight_bytes();
  gone = std::move(layers_[layer][static_cast<size_t>(ffn_id) + 1]);
  return absl::OkStatus();
}

bool CpuExpertBackend::HasFfn(int32_t layer, int32_t ffn_id) const {
  absl::ReaderMutexLock lock(&mu_);
  return Find(layer, ffn_id) != nullptr;
}

size_t CpuExpertBackend::WeightBytes() const {
  absl::ReaderMutexLock lock(&mu_);
  return weight_bytes_;
}

absl::Status CpuExpertBackend::Validate(const ExpertBatch& b, const float* out) {
  DMOE_RETURN_IF_ERROR(ValidateExpertBatch(b, out));
  if (b.num_tokens == 0) return absl::OkStatus();
  const int32_t layer = b.layer;
  const size_t num_assignments = b.ffn_ids.size();

  // Look every FFN up once; record its group (first-appearance order).
  ++calls_;
  group_ffn_.clear();
  assignment_to_group_.resize(num_assignments);
  for (size_t a = 0; a < num_assignments; ++a) {
    const int32_t id = b.ffn_ids[a];
    Ffn* f = Find(layer, id);
    if (f == nullptr) {
      return FfnNotLoadedError(layer, id);
    }
    if (f->seen_in_call != calls_) {
      if (f->hidden != b.hidden) {
        return absl::InvalidArgumentError(absl::StrFormat("%s: hidden %d != batch hidden %d",
                                                          FfnName(layer, id), f->hidden, b.hidden));
      }
      f->seen_in_call = calls_;
      f->group = static_cast<int32_t>(group_ffn_.size());
      group_ffn_.push_back(f);
    }
    assignment_to_group_[a] = f->group;
  }
  return absl::OkStatus();
}

void CpuExpertBackend::Permute(const ExpertBatch& b) {
  const size_t num_groups = group_ffn_.size();
  const size_t num_assignments = b.ffn_ids.size();
  expert_first_offset_.assign(num_groups + 1, 0);
  for (size_t a = 0; a < num_assignments; ++a) ++expert_first_offset_[assignment_to_group_[a] + 1];
  for (size_t g = 0; g < num_groups; ++g) expert_first_offset_[g + 1] += expert_first_offset_[g];
  group_cursor_.assign(expert_first_offset_.begin(), expert_first_offset_.end() - 1);
  permuted_to_token_.resize(num_assignments);
  assignment_to_permuted_.resize(num_assignments);
  for (int64_t t = 0; t < b.num_tokens; ++t) {
    for (int32_t a = b.token_offsets[t]; a < b.token_offsets[t + 1]; ++a) {
      const int32_t p = group_cursor_[assignment_to_group_[a]]++;
      permuted_to_token_[p] = static_cast<int32_t>(t);
      assignment_to_permuted_[a] = p;
    }
  }
}

void CpuExpertBackend::MakeWorkItems() {
  items_.clear();
  for (size_t g = 0; g < group_ffn_.size(); ++g) {
    const int32_t first = expert_first_offset_[g];
    const int32_t rows = expert_first_offset_[g + 1] - first;
    const int32_t chunks = (rows + kMaxChunkRows - 1) / kMaxChunkRows;
    const int32_t chunk = (rows + chunks - 1) / chunks;
    for (int32_t r = 0; r < rows; r += chunk) {
      const int32_t n = std::min(chunk, rows - r);
      // Time ~ 6 hidden inter (n / FLOP rate + 1 / weight byte rate); the
      // ceilings' ratio is ~12 FLOP per byte here (docs/performance.md), so the
      // cost is ~ inter (n + 12).
      items_.push_back({group_ffn_[g], first + r, n, group_ffn_[g]->inter * (int64_t{n} + 12)});
    }
  }
  // (std::sort: stable_sort would allocate a buffer per call.)
  std::sort(items_.begin(), items_.end(), [](const WorkItem& a, const WorkItem& b) {
    return a.cost != b.cost ? a.cost > b.cost : a.first < b.first;
  });
}

bool CpuExpertBackend::SpreadItems(int threads) {
  if (threads <= 1 || items_.size() < static_cast<size_t>(threads)) return false;
  // Greedy largest-first schedule (what the dynamic loop below does); spread
  // when its makespan is within 10% of a perfect split.
  std::vector<int64_t>& load = thread_load_;
  load.assign(threads, 0);
  int64_t total = 0;
  for (const WorkItem& it : items_) {
    *std::min_element(load.begin(), load.end()) += it.cost;
    total += it.cost;
  }
  const int64_t makespan = *std::max_element(load.begin(), load.end());
  return makespan * threads <= total + total / 10;
}

void CpuExpertBackend::RunItem(const WorkItem& item, const ExpertBatch& b, Workspace& ws,
                               float* yp) {
  const Ffn& f = *item.ffn;
  const int64_t hidden = b.hidden;
  const int64_t inter = f.inter;
  const int64_t rows = item.rows;
  float* xg = ws.xg.Get(rows * hidden);
  float* gu = ws.gu.Get(rows * 2 * inter);
  float* h = ws.h.Get(rows * inter);
  const int32_t* tokens = permuted_to_token_.data() + item.first;  // [rows]
  ParallelFor(rows, hidden, [&](int64_t r) {
    std::memcpy(xg + r * hidden, b.x + int64_t{tokens[r]} * hidden, hidden * sizeof(float));
  });
  f.gate_up.Forward(xg, rows, gu);  // [rows, 2 * inter]
  ParallelFor(rows, inter, [&](int64_t r) { SwiGluRow(gu + r * 2 * inter, h + r * inter, inter); });
  f.down.Forward(h, rows, yp + int64_t{item.first} * hidden);  // [rows, hidden]
}

void CpuExpertBackend::Unpermute(const ExpertBatch& b, const float* yp, float* out) {
  const int64_t hidden = b.hidden;
  // Read by the pool's threads while this one holds mu_ (the lambdas below are
  // not analysed as holding it).
  const int32_t* to_permuted = assignment_to_permuted_.data();
  if (b.per_assignment_out) {
    // Row a = weight_a * y_a: the product Combine forms (one fp32 multiply).
    ParallelFor(static_cast<int64_t>(b.ffn_ids.size()), hidden * 2, [&](int64_t a) {
      const float* row = yp + int64_t{to_permuted[a]} * hidden;
      Combine(&row, &b.weights[a], 1, /*init=*/true, out + a * hidden, hidden);
    });
    return;
  }
  ParallelFor(b.num_tokens, hidden * 4, [&](int64_t t) {
    float* o = out + t * hidden;
    const int32_t begin = b.token_offsets[t], end = b.token_offsets[t + 1];
    if (begin == end) {
      std::memset(o, 0, hidden * sizeof(float));
      return;
    }
    // Up to kCombineRows rows per sweep over o: o is written once per sweep and
    // every row is read as one stream.
    for (int32_t a0 = begin; a0 < end; a0 += kCombineRows) {
      const int count = std::min<int32_t>(kCombineRows, end - a0);
      const float* rows[kCombineRows];
      for (int i = 0; i < count; ++i) {
        rows[i] = yp + int64_t{to_permuted[a0 + i]} * hidden;
      }
      Combine(rows, b.weights.data() + a0, count, /*init=*/a0 == begin, o, hidden);
    }
  });
}

absl::Status CpuExpertBackend::Compute(const ExpertBatch& batch, float* out) {
  absl::MutexLock lock(&mu_);
  DMOE_RETURN_IF_ERROR(Validate(batch, out));
  if (batch.num_tokens == 0) return absl::OkStatus();
  const int64_t hidden = batch.hidden;
  const size_t num_assignments = batch.ffn_ids.size();
  Permute(batch);

  MakeWorkItems();
  float* yp = yp_.Get(num_assignments * hidden);
  const int threads = ComputeThreads();
  if (workspaces_.size() < static_cast<size_t>(threads)) workspaces_.resize(threads);
  if (SpreadItems(threads)) {
#pragma omp parallel num_threads(threads)
    {
      Workspace& ws = workspaces_[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
      for (size_t i = 0; i < items_.size(); ++i) RunItem(items_[i], batch, ws, yp);
    }
  } else {
    for (const WorkItem& item : items_) RunItem(item, batch, workspaces_[0], yp);
  }
  Unpermute(batch, yp, out);
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<ExpertBackend> MakeCpuExpertBackend(ComputeType type) {
  return std::make_unique<CpuExpertBackend>(type);
}

}  // namespace dmoe::core
