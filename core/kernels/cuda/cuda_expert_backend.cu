// The CUDA expert backend (see cuda_expert_backend.h for the pipeline).
//
// Layout of a batch, A assignments, N tokens, G groups (= FFNs of the layer
// this backend holds, numbered shard by shard, slot by slot):
//   permuted rows [0, A): shard 0's groups first, then shard 1's, ...; inside
//   a group, assignment order. Shard d computes rows [first_row, first_row +
//   rows); its GEMMs use local row indices (row - first_row).
// Buffers of a Context (one outstanding ticket), on shard 0's device unless
// said otherwise:
//   in_dev     offsets [N + 1] | ids [A] | weights [A] | slot_to_group [S]
//   x_dev      [N, hidden] f32          out_dev [N, hidden] f32
//   routing    MoeRoutingBuffers' arrays
//   per shard (its device): xp [rows, hidden] elem (shard 0: all A rows),
//   gu [rows, 2 inter_max] gemm-out, h [rows, inter_max] elem,
//   yp [rows, hidden] gemm-out (shard 0: all A rows, the combine's input).
// elem = bf16 or f32 (ComputeType); gemm-out = bf16 only for kBF16 + kGrouped.
// Contexts are reused; they are idle (all their streams drained) whenever they
// are not busy, so a batch never waits on another ticket's buffers.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
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
#include "core/kernels/cuda/convert.cuh"
#include "core/kernels/cuda/cuda_expert_backend.h"
#include "core/kernels/cuda/cuda_util.cuh"
#include "core/kernels/cuda/device_info.h"
#include "core/kernels/cuda/expert_gemm.cuh"
#include "core/kernels/cuda/moe_combine.cuh"
#include "core/kernels/cuda/moe_permute.cuh"
#include "core/kernels/cuda/swiglu.cuh"
#include "core/status.h"

namespace dmoe::core {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceGuard;
using cuda::PinnedBuffer;
using bf16 = __nv_bfloat16;

#define DMOE_CUDA_TRY(expr, what) DMOE_CUDA_RETURN_IF_ERROR(expr, what)

// Tickets of batches without tokens carry this bit and own no context.
constexpr uint64_t kEmptyTicket = uint64_t{1} << 63;
// The activations go up and the result comes down in up to kMaxChunks pieces
// of at least kMinChunkTokens tokens, so host memcpy and DMA overlap.
constexpr int kMaxChunks = 4;
constexpr int64_t kMinChunkTokens = 64;

struct Ffn {
  int shard = 0;
  int64_t hidden = 0, inter = 0;
  DeviceBuffer gate_up;  // [2 * inter, hidden] elem: gate rows, then up rows
  DeviceBuffer down;     // [hidden, inter] elem
  size_t bytes = 0;
};

// What one shard does for one batch, and its buffers (on its device).
struct ShardWork {
  int device = 0;
  cuda::Stream stream;
  cuda::CublasHandle blas;  // bound to `stream`
  cuda::Event gemm_begin, gemm_end, done;
  DeviceBuffer xp, gu, h, yp, params;
  PinnedBuffer params_host;  // image of `params`
  cuda::ExpertGemmRunner runner;
  std::vector<cuda::ExpertGemm> gate_up, down;  // one per group with rows
  std::vector<int32_t> group_first_row;         // [groups + 1] local rows
  std::vector<int32_t> group_inter;             // [groups]
  int32_t first_row = 0, rows = 0;
  int64_t inter_max = 0;
  bool active = false;

  size_t WorkspaceBytes() const {
    return xp.bytes() + gu.bytes() + h.bytes() + yp.bytes() + params.bytes();
  }
};

struct Context {
  bool busy = false;
  uint64_t ticket = 0;
  float* out = nullptr;  // the caller's [N, hidden]
  int64_t num_tokens = 0, hidden = 0, chunk_tokens = 0;
  int chunks = 0;
  int64_t rows = 0;

  cuda::Stream copy_stream;  // shard 0's device: x up, out down
  cuda::Event routed, x_ready, gathered, begin, end;
  cuda::Event combined[kMaxChunks], out_ready[kMaxChunks];
  PinnedBuffer in_host, x_host, out_host, summary_host;
  DeviceBuffer in_dev, x_dev, out_dev, routing;
  std::vector<std::unique_ptr<ShardWork>> shards;

  size_t WorkspaceBytes() const {
    return in_dev.bytes() + x_dev.bytes() + out_dev.bytes() + routing.bytes();
  }
};

class CudaExpertBackendImpl final : public CudaExpertBackend {
 public:
  CudaExpertBackendImpl(ComputeType type, CudaBackendOptions options)
      : type_(type),
        options_(std::move(options)),
        bf16_(type == ComputeType::kBF16),
        gemm_out_bf16_(bf16_ && options_.gemm == CudaGemmMode::kGrouped),
        elem_bytes_(bf16_ ? 2 : 4),
        out_bytes_(gemm_out_bf16_ ? 2 : 4),
        staging_(options_.devices.size()),
        shard_weight_bytes_(options_.devices.size(), 0),
        grouped_(options_.gemm == CudaGemmMode::kGrouped) {}
  ~CudaExpertBackendImpl() override;

  absl::Status Init();

  std::string Name() const override { return bf16_ ? "cuda-bf16" : "cuda-f32"; }
  absl::Status LoadFfn(int32_t layer, int32_t ffn_id, const FfnWeights& w) override;
  absl::Status UnloadFfn(int32_t layer, int32_t ffn_id) override;
  bool HasFfn(int32_t layer, int32_t ffn_id) const override;
  absl::Status Compute(const ExpertBatch& batch, float* out) override {
    DMOE_ASSIGN_OR_RETURN(const uint64_t ticket, Submit(batch, out));
    return Await(ticket);
  }
  absl::StatusOr<uint64_t> Submit(const ExpertBatch& batch, float* out) override;
  absl::Status Await(uint64_t ticket) override;
  void Cancel(uint64_t ticket) override;
  size_t WeightBytes() const override {
    absl::ReaderMutexLock lock(&mu_);
    return weight_bytes_;
  }
  // Uploads run outside mu_ and an FFN is freed only after its device's
  // queued work (FreeSynchronized), so loads need no external serialisation.
  bool LoadsConcurrently() const override { return true; }
  std::vector<DeviceMemory> MemoryPerDevice() const override;
  Timings LastTimings() const override {
    absl::ReaderMutexLock lock(&mu_);
    return last_timings_;
  }
  int ShardOf(int32_t layer, int32_t ffn_id) const override {
    const int64_t n = num_shards();
    return static_cast<int>(((int64_t{layer} + ffn_id + 1) % n + n) % n);
  }
  int num_shards() const override { return static_cast<int>(options_.devices.size()); }

 private:
  using Layer = std::vector<std::unique_ptr<Ffn>>;  // [slot = ffn_id + 1]

  const Ffn* Find(int32_t layer, int32_t ffn_id) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Context*> AcquireContext() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CreateContext(Context& c);
  // Numbers the layer's FFNs into groups (shard by shard) and fills the slot
  // map the routing kernel reads. O(slots x shards).
  void BuildGroups(int32_t layer, int64_t hidden) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status BatchError(const ExpertBatch& b, const int32_t* summary)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::Status Launch(Context& c, const ExpertBatch& b, float* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status LaunchShard(Context& c, int shard, int64_t hidden)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RunGemms(ShardWork& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits for the result chunk by chunk and copies it to the caller's out.
  static absl::Status CopyOut(Context& c);
  // Waits for everything the context queued (after an error or Cancel).
  static void Drain(Context& c);
  static void FreeSynchronized(std::unique_ptr<Ffn> f);
  // Copies (and converts) w into f's device buffers; under load_mu_.
  absl::Status Upload(Ffn& f, const FfnWeights& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(load_mu_);

  const ComputeType type_;
  const CudaBackendOptions options_;
  const bool bf16_, gemm_out_bf16_;
  const size_t elem_bytes_, out_bytes_;

  // Serialises the uploads of LoadFfn; [shard] f32 staging for conversion.
  absl::Mutex load_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::vector<DeviceBuffer> staging_ ABSL_GUARDED_BY(load_mu_);

  mutable absl::Mutex mu_;
  absl::flat_hash_map<int32_t, Layer> layers_ ABSL_GUARDED_BY(mu_);
  size_t weight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<size_t> shard_weight_bytes_ ABSL_GUARDED_BY(mu_);  // [shards]
  std::vector<std::unique_ptr<Context>> contexts_ ABSL_GUARDED_BY(mu_);
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 1;
  bool grouped_ ABSL_GUARDED_BY(mu_);  // false after a fallback
  Timings last_timings_ ABSL_GUARDED_BY(mu_);

  // Per-batch host scratch, O(FFNs of a layer), grown only.
  std::vector<int32_t> slot_to_group_ ABSL_GUARDED_BY(mu_);  // [S]
  std::vector<const Ffn*> group_ffn_ ABSL_GUARDED_BY(mu_);   // [G]
  // [shards + 1] first group of each shard
  std::vector<int32_t> shard_group_begin_ ABSL_GUARDED_BY(mu_);
  // [G + 1] first permuted row of each group (from the device's counts)
  std::vector<int32_t> expert_first_offset_ ABSL_GUARDED_BY(mu_);
};

CudaExpertBackendImpl::~CudaExpertBackendImpl() {
  absl::MutexLock lock(&mu_);
  for (auto& c : contexts_) Drain(*c);
}

absl::Status CudaExpertBackendImpl::Init() {
  // Peer access where the hardware has it (cudaMemcpyPeerAsync works without,
  // through the host).
  for (int a : options_.devices) {
    for (int b : options_.devices) {
      int can = 0;
      if (a == b || cudaDeviceCanAccessPeer(&can, a, b) != cudaSuccess || !can) continue;
      DeviceGuard g(a);
      cudaDeviceEnablePeerAccess(b, 0);  // may say "already enabled"
      cudaGetLastError();
    }
  }
  for (size_t s = 0; s < staging_.size(); ++s) staging_[s].set_device(options_.devices[s]);
  // One context up front: stream and cuBLAS errors surface at creation.
  absl::MutexLock lock(&mu_);
  contexts_.push_back(std::make_unique<Context>());
  return CreateContext(*contexts_.back());
}

absl::Status CudaExpertBackendImpl::CreateContext(Context& c) {
  const bool timing = options_.record_timings;
  const int dev0 = options_.devices[0];
  DMOE_RETURN_IF_ERROR(c.copy_stream.Create(dev0));
  for (cuda::Event* e : {&c.routed, &c.x_ready, &c.gathered})
    DMOE_RETURN_IF_ERROR(e->Create(dev0, false));
  for (cuda::Event* e : {&c.begin, &c.end}) DMOE_RETURN_IF_ERROR(e->Create(dev0, timing));
  for (int k = 0; k < kMaxChunks; ++k) {
    DMOE_RETURN_IF_ERROR(c.combined[k].Create(dev0, false));
    DMOE_RETURN_IF_ERROR(c.out_ready[k].Create(dev0, false));
  }
  for (DeviceBuffer* b : {&c.in_dev, &c.x_dev, &c.out_dev, &c.routing}) b->set_device(dev0);
  for (int dev : options_.devices) {
    auto w = std::make_unique<ShardWork>();
    w->device = dev;
    DMOE_RETURN_IF_ERROR(w->stream.Create(dev));
    DMOE_RETURN_IF_ERROR(w->blas.Create(dev));
    DMOE_RETURN_IF_ERROR(
        cuda::CublasStatus(cublasSetStream(w->blas.get(), w->stream.get()), "cublasSetStream"));
    DMOE_RETURN_IF_ERROR(w->gemm_begin.Create(dev, timing));
    DMOE_RETURN_IF_ERROR(w->gemm_end.Create(dev, timing));
    DMOE_RETURN_IF_ERROR(w->done.Create(dev, false));
    for (DeviceBuffer* b : {&w->xp, &w->gu, &w->h, &w->yp, &w->params}) b->set_device(dev);
    c.shards.push_back(std::move(w));
  }
  return absl::OkStatus();
}

const Ffn* CudaExpertBackendImpl::Find(int32_t layer, int32_t ffn_id) const {
  if (ffn_id < kSharedFfn) return nullptr;
  auto it = layers_.find(layer);
  if (it == layers_.end()) return nullptr;
  const size_t slot = static_cast<size_t>(ffn_id) + 1;
  return slot < it->second.size() ? it->second[slot].get() : nullptr;
}

void CudaExpertBackendImpl::FreeSynchronized(std::unique_ptr<Ffn> f) {
  if (f == nullptr) return;
  // Queued batches may still read these weights.
  DeviceGuard g(f->gate_up.device());
  cudaDeviceSynchronize();
  f.reset();
}

absl::Status CudaExpertBackendImpl::Upload(Ffn& f, const FfnWeights& w) {
  const size_t n = static_cast<size_t>(w.hidden * w.intermediate);
  DMOE_RETURN_IF_ERROR(f.gate_up.Reserve(2 * n * elem_bytes_));
  DMOE_RETURN_IF_ERROR(f.down.Reserve(n * elem_bytes_));
  if (bf16_) DMOE_RETURN_IF_ERROR(staging_[f.shard].Reserve(n * sizeof(float)));
  DeviceGuard g(f.gate_up.device());
  char* gate_up = f.gate_up.get<char>();
  const std::pair<const float*, void*> parts[] = {{w.gate.data(), gate_up},
                                                  {w.up.data(), gate_up + n * elem_bytes_},
                                                  {w.down.data(), f.down.get()}};
  for (const auto& [src, dst] : parts) {
    // Pageable source: cudaMemcpy is synchronous and, on the legacy default
    // stream, ordered after the previous part's conversion.
    void* to = bf16_ ? staging_[f.shard].get() : dst;
    DMOE_CUDA_TRY(cudaMemcpy(to, src, n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    if (bf16_) {
      DMOE_CUDA_TRY(cuda::LaunchF32ToBF16(staging_[f.shard].get<float>(), static_cast<bf16*>(dst),
                                          static_cast<int64_t>(n), nullptr),
                    "f32 -> bf16");
    }
  }
  // Our streams do not synchronise with the legacy stream: finish here.
  DMOE_CUDA_TRY(cudaStreamSynchronize(nullptr), "upload");
  return absl::OkStatus();
}

absl::Status CudaExpertBackendImpl::LoadFfn(int32_t layer, int32_t ffn_id, const FfnWeights& w) {
  DMOE_RETURN_IF_ERROR(ValidateFfnWeights(layer, ffn_id, w));
  const std::string name = FfnName(layer, ffn_id);
  const size_t expect = static_cast<size_t>(w.hidden * w.intermediate);
  if (2 * w.intermediate > std::numeric_limits<int32_t>::max() / 2 ||
      w.hidden > std::numeric_limits<int32_t>::max() / 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: [%d,%d] is too large for 32-bit GEMM dimensions", name, w.intermediate, w.hidden));
  }

  const int shard = ShardOf(layer, ffn_id);
  const int dev = options_.devices[shard];
  auto ffn = std::make_unique<Ffn>();
  ffn->shard = shard;
  ffn->hidden = w.hidden;
  ffn->inter = w.intermediate;
  ffn->gate_up.set_device(dev);
  ffn->down.set_device(dev);
  ffn->bytes = 3 * expect * elem_bytes_;
  {
    // Upload outside mu_: batches are not held up by a load.
    absl::MutexLock load_lock(&load_mu_);
    if (absl::Status s = Upload(*ffn, w); !s.ok()) {
      return absl::Status(s.code(),
                          absl::StrFormat("%s: upload to device %d: %s", name, dev, s.message()));
    }
  }

  std::unique_ptr<Ffn> old;
  {
    absl::MutexLock lock(&mu_);
    Layer& slots = layers_[layer];
    const size_t slot = static_cast<size_t>(ffn_id) + 1;
    if (slot >= slots.size()) slots.resize(slot + 1);
    old = std::move(slots[slot]);
    if (old != nullptr) {
      weight_bytes_ -= old->bytes;
      shard_weight_bytes_[old->shard] -= old->bytes;
    }
    weight_bytes_ += ffn->bytes;
    shard_weight_bytes_[shard] += ffn->bytes;
    slots[slot] = std::move(ffn);
  }
  FreeSynchronized(std::move(old));
  return absl::OkStatus();
}

absl::Status CudaExpertBackendImpl::UnloadFfn(int32_t layer, int32_t ffn_id) {
  std::unique_ptr<Ffn> gone;
  {
    absl::MutexLock lock(&mu_);
    if (Find(layer, ffn_id) == nullptr) {
      return absl::NotFoundError(
          absl::StrFormat("%s is not loaded on this backend", FfnName(layer, ffn_id)));
    }
    gone = std::move(layers_[layer][static_cast<size_t>(ffn_id) + 1]);
    weight_bytes_ -= gone->bytes;
    shard_weight_bytes_[gone->shard] -= gone->bytes;
  }
  FreeSynchronized(std::move(gone));
  return absl::OkStatus();
}

bool CudaExpertBackendImpl::HasFfn(int32_t layer, int32_t ffn_id) const {
  absl::ReaderMutexLock lock(&mu_);
  return Find(layer, ffn_id) != nullptr;
}

std::vector<CudaExpertBackend::DeviceMemory> CudaExpertBackendImpl::MemoryPerDevice() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<DeviceMemory> v(options_.devices.size());
  for (size_t s = 0; s < v.size(); ++s) {
    v[s].device = options_.devices[s];
    v[s].weight_bytes = shard_weight_bytes_[s];
    for (const auto& c : contexts_) {
      v[s].workspace_bytes += c->shards[s]->WorkspaceBytes();
      if (s == 0) v[s].workspace_bytes += c->WorkspaceBytes();
    }
    DeviceGuard g(v[s].device);
    if (cudaMemGetInfo(&v[s].free_bytes, &v[s].total_bytes) != cudaSuccess) cudaGetLastError();
  }
  return v;
}

absl::StatusOr<Context*> CudaExpertBackendImpl::AcquireContext() {
  for (auto& c : contexts_) {
    if (!c->busy) return c.get();
  }
  auto c = std::make_unique<Context>();
  DMOE_RETURN_IF_ERROR(CreateContext(*c));
  contexts_.push_back(std::move(c));
  return contexts_.back().get();
}

void CudaExpertBackendImpl::BuildGroups(int32_t layer, int64_t hidden) {
  const int shards = num_shards();
  slot_to_group_.clear();
  group_ffn_.clear();
  shard_group_begin_.assign(shards + 1, 0);
  auto it = layers_.find(layer);
  if (it == layers_.end()) return;
  const Layer& slots = it->second;
  slot_to_group_.assign(slots.size(), -1);
  for (int d = 0; d < shards; ++d) {
    shard_group_begin_[d] = static_cast<int32_t>(group_ffn_.size());
    for (size_t s = 0; s < slots.size(); ++s) {
      const Ffn* f = slots[s].get();
      if (f == nullptr || f->shard != d) continue;
      if (f->hidden != hidden) {
        slot_to_group_[s] = -2;  // an error if an assignment names it
        continue;
      }
      slot_to_group_[s] = static_cast<int32_t>(group_ffn_.size());
      group_ffn_.push_back(f);
    }
  }
  shard_group_begin_[shards] = static_cast<int32_t>(group_ffn_.size());
}

// The first problem the routing kernel found, in the CPU backend's words.
absl::Status CudaExpertBackendImpl::BatchError(const ExpertBatch& b, const int32_t* summary) {
  const int32_t layer = b.layer;
  if (const int32_t t = summary[cuda::kSummaryBadToken]; t != cuda::kNoError) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: token_offsets decrease at token %d (%d -> %d)", layer, t,
                        b.token_offsets[t], b.token_offsets[t + 1]));
  }
  const int32_t a = summary[cuda::kSummaryBadAssignment];
  if (a == cuda::kNoError) return absl::OkStatus();
  const int32_t id = b.ffn_ids[a];
  if (id < kSharedFfn) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: invalid FFN id %d at assignment %d", layer, id, a));
  }
  const Ffn* f = Find(layer, id);
  if (f == nullptr) {
    return FfnNotLoadedError(layer, id);
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("%s: hidden %d != batch hidden %d", FfnName(layer, id), f->hidden, b.hidden));
}

absl::StatusOr<uint64_t> CudaExpertBackendImpl::Submit(const ExpertBatch& b, float* out) {
  // O(1) checks here; offsets monotonicity and the FFN ids on the device.
  const int32_t layer = b.layer;
  if (b.per_assignment_out) {
    return absl::UnimplementedError(
        absl::StrFormat("layer %d: the CUDA backend has no per-assignment output", layer));
  }
  DMOE_RETURN_IF_ERROR(ValidateExpertBatchShape(b, out));
  absl::MutexLock lock(&mu_);
  const uint64_t ticket = next_ticket_++;
  if (b.num_tokens == 0) return ticket | kEmptyTicket;
  DMOE_ASSIGN_OR_RETURN(Context * c, AcquireContext());
  c->busy = true;
  if (absl::Status s = Launch(*c, b, out); !s.ok()) {
    Drain(*c);
    c->busy = false;
    return s;
  }
  c->ticket = ticket;
  return ticket;
}

absl::Status CudaExpertBackendImpl::Launch(Context& c, const ExpertBatch& b, float* out) {
  const int64_t n = b.num_tokens, hidden = b.hidden;
  const int32_t a_count = static_cast<int32_t>(b.ffn_ids.size());
  BuildGroups(b.layer, hidden);
  const int32_t groups = static_cast<int32_t>(group_ffn_.size());
  const int32_t slots = static_cast<int32_t>(slot_to_group_.size());
  const int64_t tiles = cuda::MoeRoutingTiles(a_count);
  c.out = out;
  c.num_tokens = n;
  c.hidden = hidden;
  c.rows = a_count;

  // Shard 0's buffers, all sized before anything is queued.
  const size_t in_words = (n + 1) + 2 * size_t(a_count) + slots;
  const size_t x_bytes = n * hidden * sizeof(float);
  // routing: a2g [A] | tile offsets [tiles, G + 1] | first offsets [G + 2] |
  // p2t [A] | a2p [A] | summary [2 + G]
  const size_t tgo_words = tiles * (groups + 1);
  const size_t routing_words =
      3 * size_t(a_count) + tgo_words + (groups + 2) + (cuda::kSummaryCounts + groups);
  const size_t summary_bytes = (cuda::kSummaryCounts + groups) * sizeof(int32_t);
  ShardWork& w0 = *c.shards[0];
  DMOE_RETURN_IF_ERROR(c.in_host.Reserve(in_words * 4));
  DMOE_RETURN_IF_ERROR(c.in_dev.Reserve(in_words * 4));
  DMOE_RETURN_IF_ERROR(c.x_host.Reserve(x_bytes));
  DMOE_RETURN_IF_ERROR(c.x_dev.Reserve(x_bytes));
  DMOE_RETURN_IF_ERROR(c.out_host.Reserve(x_bytes));
  DMOE_RETURN_IF_ERROR(c.out_dev.Reserve(x_bytes));
  DMOE_RETURN_IF_ERROR(c.routing.Reserve(routing_words * 4));
  DMOE_RETURN_IF_ERROR(c.summary_host.Reserve(summary_bytes));
  DMOE_RETURN_IF_ERROR(w0.xp.Reserve(size_t(a_count) * hidden * elem_bytes_));
  DMOE_RETURN_IF_ERROR(w0.yp.Reserve(size_t(a_count) * hidden * out_bytes_));

  int32_t* in_host = c.in_host.get<int32_t>();
  const int32_t* in_dev = c.in_dev.get<int32_t>();
  const int32_t* offsets_dev = in_dev;
  const float* weights_dev = reinterpret_cast<const float*>(in_dev + (n + 1) + a_count);
  int32_t* r = c.routing.get<int32_t>();
  cuda::MoeRoutingBuffers rb;
  rb.token_offsets = offsets_dev;
  rb.ffn_ids = in_dev + (n + 1);
  rb.slot_to_group = in_dev + (n + 1) + 2 * size_t(a_count);
  rb.assignment_to_group = r;
  rb.tile_group_offset = r + a_count;
  rb.expert_first_offset = rb.tile_group_offset + tgo_words;
  rb.permuted_to_token = rb.expert_first_offset + (groups + 2);
  rb.assignment_to_permuted = rb.permuted_to_token + a_count;
  rb.summary = rb.assignment_to_permuted + a_count;

  const int dev0 = options_.devices[0];
  DeviceGuard guard(dev0);
  cudaStream_t st = w0.stream.get();
  cudaStream_t cs = c.copy_stream.get();
  if (options_.record_timings) DMOE_CUDA_TRY(cudaEventRecord(c.begin.get(), st), "event");

  // 1. Small inputs, then the routing, which only needs them.
  std::memcpy(in_host, b.token_offsets.data(), (n + 1) * 4);
  std::memcpy(in_host + (n + 1), b.ffn_ids.data(), size_t(a_count) * 4);
  std::memcpy(in_host + (n + 1) + a_count, b.weights.data(), size_t(a_count) * 4);
  if (slots > 0) {
    std::memcpy(in_host + (n + 1) + 2 * size_t(a_count), slot_to_group_.data(), size_t(slots) * 4);
  }
  DMOE_CUDA_TRY(cudaMemcpyAsync(c.in_dev.get(), in_host, in_words * 4, cudaMemcpyHostToDevice, st),
                "upload of the assignments");
  DMOE_CUDA_TRY(cuda::LaunchMoeRouting(rb, n, a_count, slots, groups, st), "MoE routing");
  DMOE_CUDA_TRY(
      cudaMemcpyAsync(c.summary_host.get(), rb.summary, summary_bytes, cudaMemcpyDeviceToHost, st),
      "routing summary");
  DMOE_CUDA_TRY(cudaEventRecord(c.routed.get(), st), "event");

  // 2. x through pinned memory in chunks (host memcpy of one chunk overlaps
  // the DMA of the previous one and the routing), then the gather.
  c.chunks = n >= 2 * kMinChunkTokens
                 ? static_cast<int>(std::min<int64_t>(kMaxChunks, n / kMinChunkTokens))
                 : 1;
  c.chunk_tokens = (n + c.chunks - 1) / c.chunks;
  for (int k = 0; k < c.chunks; ++k) {
    const int64_t t0 = k * c.chunk_tokens;
    const int64_t t1 = std::min(n, t0 + c.chunk_tokens);
    if (t1 <= t0) continue;
    const size_t off = t0 * hidden, bytes = (t1 - t0) * hidden * sizeof(float);
    std::memcpy(c.x_host.get<float>() + off, b.x + off, bytes);
    DMOE_CUDA_TRY(cudaMemcpyAsync(c.x_dev.get<float>() + off, c.x_host.get<float>() + off, bytes,
                                  cudaMemcpyHostToDevice, cs),
                  "upload of x");
  }
  DMOE_CUDA_TRY(cudaEventRecord(c.x_ready.get(), cs), "event");
  DMOE_CUDA_TRY(cudaStreamWaitEvent(st, c.x_ready.get(), 0), "wait");
  DMOE_CUDA_TRY(bf16_ ? cuda::LaunchMoeGather(c.x_dev.get<float>(), hidden, rb.permuted_to_token,
                                              a_count, w0.xp.get<bf16>(), st)
                      : cuda::LaunchMoeGather(c.x_dev.get<float>(), hidden, rb.permuted_to_token,
                                              a_count, w0.xp.get<float>(), st),
                "MoE gather");
  DMOE_CUDA_TRY(cudaEventRecord(c.gathered.get(), st), "event");

  // 3. The GEMM shapes (and any error) to the host.
  DMOE_CUDA_TRY(cudaEventSynchronize(c.routed.get()), "MoE routing");
  const int32_t* summary = c.summary_host.get<int32_t>();
  DMOE_RETURN_IF_ERROR(BatchError(b, summary));
  expert_first_offset_.resize(groups + 1);
  expert_first_offset_[0] = 0;
  for (int32_t g = 0; g < groups; ++g) {
    expert_first_offset_[g + 1] = expert_first_offset_[g] + summary[cuda::kSummaryCounts + g];
  }

  // 4. Per shard: GEMMs (shard 0 on `st`, the others on their streams).
  for (int d = 0; d < num_shards(); ++d) DMOE_RETURN_IF_ERROR(LaunchShard(c, d, hidden));
  for (int d = 1; d < num_shards(); ++d) {
    if (c.shards[d]->active)
      DMOE_CUDA_TRY(cudaStreamWaitEvent(st, c.shards[d]->done.get(), 0), "wait");
  }

  // 5. Combine and download, chunk by chunk.
  for (int k = 0; k < c.chunks; ++k) {
    const int64_t t0 = std::min(n, k * c.chunk_tokens);
    const int64_t t1 = std::min(n, t0 + c.chunk_tokens);
    float* out_dev = c.out_dev.get<float>();
    DMOE_CUDA_TRY(
        gemm_out_bf16_
            ? cuda::LaunchMoeCombine(w0.yp.get<bf16>(), offsets_dev, rb.assignment_to_permuted,
                                     weights_dev, t0, t1, hidden, out_dev, st)
            : cuda::LaunchMoeCombine(w0.yp.get<float>(), offsets_dev, rb.assignment_to_permuted,
                                     weights_dev, t0, t1, hidden, out_dev, st),
        "MoE combine");
    DMOE_CUDA_TRY(cudaEventRecord(c.combined[k].get(), st), "event");
    DMOE_CUDA_TRY(cudaStreamWaitEvent(cs, c.combined[k].get(), 0), "wait");
    if (t1 > t0) {
      DMOE_CUDA_TRY(cudaMemcpyAsync(c.out_host.get<float>() + t0 * hidden, out_dev + t0 * hidden,
                                    (t1 - t0) * hidden * sizeof(float), cudaMemcpyDeviceToHost, cs),
                    "download of the result");
    }
    DMOE_CUDA_TRY(cudaEventRecord(c.out_ready[k].get(), cs), "event");
  }
  if (options_.record_timings) DMOE_CUDA_TRY(cudaEventRecord(c.end.get(), cs), "event");
  return absl::OkStatus();
}

absl::Status CudaExpertBackendImpl::LaunchShard(Context& c, int shard, int64_t hidden) {
  ShardWork& w = *c.shards[shard];
  ShardWork& w0 = *c.shards[0];
  const int32_t gb = shard_group_begin_[shard], ge = shard_group_begin_[shard + 1];
  w.first_row = expert_first_offset_[gb];
  w.rows = expert_first_offset_[ge] - w.first_row;
  w.active = w.rows > 0;
  if (!w.active) return absl::OkStatus();
  w.inter_max = 0;
  for (int32_t g = gb; g < ge; ++g) {
    if (expert_first_offset_[g + 1] > expert_first_offset_[g])
      w.inter_max = std::max(w.inter_max, group_ffn_[g]->inter);
  }
  const size_t rows = w.rows;
  // Shard 0 reads the gathered rows and writes the combine's input in place.
  if (shard != 0) {
    DMOE_RETURN_IF_ERROR(w.xp.Reserve(rows * hidden * elem_bytes_));
    DMOE_RETURN_IF_ERROR(w.yp.Reserve(rows * hidden * out_bytes_));
  }
  DMOE_RETURN_IF_ERROR(w.gu.Reserve(rows * 2 * w.inter_max * out_bytes_));
  DMOE_RETURN_IF_ERROR(w.h.Reserve(rows * w.inter_max * elem_bytes_));
  char* xp = (shard == 0 ? w0.xp : w.xp).get<char>();
  char* yp = (shard == 0 ? w0.yp : w.yp).get<char>();
  char* gu = w.gu.get<char>();
  char* h = w.h.get<char>();

  w.gate_up.clear();
  w.down.clear();
  w.group_first_row.clear();
  w.group_inter.clear();
  const int32_t ld_gu = static_cast<int32_t>(2 * w.inter_max);
  const int32_t ld_h = static_cast<int32_t>(w.inter_max);
  for (int32_t g = gb; g < ge; ++g) {
    const int32_t count = expert_first_offset_[g + 1] - expert_first_offset_[g];
    if (count == 0) continue;
    const Ffn& f = *group_ffn_[g];
    const size_t local = expert_first_offset_[g] - w.first_row;
    const int32_t inter = static_cast<int32_t>(f.inter);
    const int32_t hid = static_cast<int32_t>(hidden);
    w.gate_up.push_back({f.gate_up.get(), xp + local * hidden * elem_bytes_,
                         gu + local * ld_gu * out_bytes_, count, 2 * inter, hid, hid, ld_gu});
    w.down.push_back({f.down.get(), h + local * ld_h * elem_bytes_,
                      yp + local * hidden * out_bytes_, count, hid, inter, ld_h, hid});
    w.group_first_row.push_back(static_cast<int32_t>(local));
    w.group_inter.push_back(inter);
  }
  w.group_first_row.push_back(w.rows);

  // Parameters: pointers of both GEMM lists, then the SwiGLU tables.
  const size_t np = w.gate_up.size();
  const size_t ptr_bytes = cuda::ExpertGemmRunner::PointerArrayBytes(np);
  const size_t param_bytes = 2 * ptr_bytes + (2 * np + 1) * sizeof(int32_t);
  DMOE_RETURN_IF_ERROR(w.params_host.Reserve(param_bytes));
  DMOE_RETURN_IF_ERROR(w.params.Reserve(param_bytes));
  char* ph = w.params_host.get<char>();
  cuda::ExpertGemmRunner::FillPointerArray(w.gate_up, reinterpret_cast<const void**>(ph));
  cuda::ExpertGemmRunner::FillPointerArray(w.down, reinterpret_cast<const void**>(ph + ptr_bytes));
  std::memcpy(ph + 2 * ptr_bytes, w.group_first_row.data(), (np + 1) * 4);
  std::memcpy(ph + 2 * ptr_bytes + (np + 1) * 4, w.group_inter.data(), np * 4);

  DeviceGuard guard(w.device);
  cudaStream_t s = w.stream.get();
  const size_t xp_bytes = rows * hidden * elem_bytes_;
  if (shard != 0) {
    DMOE_CUDA_TRY(cudaStreamWaitEvent(s, c.gathered.get(), 0), "wait");
    DMOE_CUDA_TRY(
        cudaMemcpyPeerAsync(w.xp.get(), w.device,
                            w0.xp.get<char>() + size_t(w.first_row) * hidden * elem_bytes_,
                            w0.device, xp_bytes, s),
        absl::StrFormat("rows of x to device %d", w.device));
  }
  DMOE_CUDA_TRY(cudaMemcpyAsync(w.params.get(), ph, param_bytes, cudaMemcpyHostToDevice, s),
                "upload of the GEMM parameters");
  DMOE_RETURN_IF_ERROR(RunGemms(w));
  if (shard != 0) {
    DMOE_CUDA_TRY(
        cudaMemcpyPeerAsync(w0.yp.get<char>() + size_t(w.first_row) * hidden * out_bytes_,
                            w0.device, w.yp.get(), w.device, rows * hidden * out_bytes_, s),
        absl::StrFormat("FFN outputs from device %d", w.device));
    DMOE_CUDA_TRY(cudaEventRecord(w.done.get(), s), "event");
  }
  return absl::OkStatus();
}

absl::Status CudaExpertBackendImpl::RunGemms(ShardWork& w) {
  cudaStream_t s = w.stream.get();
  const size_t np = w.gate_up.size();
  const size_t ptr_bytes = cuda::ExpertGemmRunner::PointerArrayBytes(np);
  char* params = w.params.get<char>();
  const auto* gate_up_ptrs = reinterpret_cast<const void* const*>(params);
  const auto* down_ptrs = reinterpret_cast<const void* const*>(params + ptr_bytes);
  const auto* first_row = reinterpret_cast<const int32_t*>(params + 2 * ptr_bytes);
  const int32_t* inter = first_row + np + 1;
  const cuda::GemmTypes types{bf16_ ? CUDA_R_16BF : CUDA_R_32F,
                              gemm_out_bf16_ ? CUDA_R_16BF : CUDA_R_32F};
  auto gemms = [&](const std::vector<cuda::ExpertGemm>& list, const void* const* ptrs,
                   const char* what) {
    cublasStatus_t st = w.runner.Run(w.blas.get(), grouped_, types, list, ptrs);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED && grouped_) {
      // Not for these types on this GPU/cuBLAS: issue them one by one from now
      // on (same types, same results up to cuBLAS's kernel choice).
      std::fprintf(stderr,
                   "dmoe cuda backend: cublasGemmGroupedBatchedEx not supported "
                   "here; using one cublasGemmEx per expert\n");
      grouped_ = false;
      st = w.runner.Run(w.blas.get(), false, types, list, ptrs);
    }
    return cuda::CublasStatus(st, what);
  };
  if (options_.record_timings) DMOE_CUDA_TRY(cudaEventRecord(w.gemm_begin.get(), s), "event");
  DMOE_RETURN_IF_ERROR(gemms(w.gate_up, gate_up_ptrs, "gate|up GEMMs"));
  const int64_t ld_gu = 2 * w.inter_max, ld_h = w.inter_max;
  const int32_t groups = static_cast<int32_t>(np);
  cudaError_t e;
  if (!bf16_) {
    e = cuda::LaunchSwiGlu(w.gu.get<float>(), ld_gu, w.h.get<float>(), ld_h, w.rows, first_row,
                           inter, groups, s);
  } else if (gemm_out_bf16_) {
    e = cuda::LaunchSwiGlu(w.gu.get<bf16>(), ld_gu, w.h.get<bf16>(), ld_h, w.rows, first_row, inter,
                           groups, s);
  } else {
    e = cuda::LaunchSwiGlu(w.gu.get<float>(), ld_gu, w.h.get<bf16>(), ld_h, w.rows, first_row,
                           inter, groups, s);
  }
  DMOE_CUDA_TRY(e, "SwiGLU");
  DMOE_RETURN_IF_ERROR(gemms(w.down, down_ptrs, "down GEMMs"));
  if (options_.record_timings) DMOE_CUDA_TRY(cudaEventRecord(w.gemm_end.get(), s), "event");
  return absl::OkStatus();
}

void CudaExpertBackendImpl::Drain(Context& c) {
  for (auto& w : c.shards) {
    DeviceGuard g(w->device);
    cudaStreamSynchronize(w->stream.get());
  }
  DeviceGuard g(c.copy_stream.device());
  cudaStreamSynchronize(c.copy_stream.get());
  cudaGetLastError();
}

absl::Status CudaExpertBackendImpl::CopyOut(Context& c) {
  DeviceGuard g(c.copy_stream.device());
  for (int k = 0; k < c.chunks; ++k) {
    DMOE_CUDA_TRY(cudaEventSynchronize(c.out_ready[k].get()), "expert batch on the GPU");
    const int64_t t0 = std::min(c.num_tokens, k * c.chunk_tokens);
    const int64_t t1 = std::min(c.num_tokens, t0 + c.chunk_tokens);
    if (t1 > t0) {
      std::memcpy(c.out + t0 * c.hidden, c.out_host.get<float>() + t0 * c.hidden,
                  (t1 - t0) * c.hidden * sizeof(float));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaExpertBackendImpl::Await(uint64_t ticket) {
  if (ticket & kEmptyTicket) return absl::OkStatus();
  Context* c = nullptr;
  {
    absl::MutexLock lock(&mu_);
    for (auto& ctx : contexts_) {
      if (ctx->busy && ctx->ticket == ticket) c = ctx.get();
    }
  }
  if (c == nullptr) {
    return absl::NotFoundError(absl::StrFormat("ticket %d is not outstanding", ticket));
  }
  // The context is ours until marked free: copy out without holding mu_.
  const absl::Status status = CopyOut(*c);
  Timings t;
  if (status.ok() && options_.record_timings) {
    float ms = 0;
    {
      DeviceGuard g(c->copy_stream.device());
      if (cudaEventElapsedTime(&ms, c->begin.get(), c->end.get()) == cudaSuccess) t.batch_ms = ms;
    }
    for (auto& w : c->shards) {
      if (!w->active) continue;
      DeviceGuard g(w->device);
      if (cudaEventElapsedTime(&ms, w->gemm_begin.get(), w->gemm_end.get()) == cudaSuccess) {
        t.gemm_ms = std::max<double>(t.gemm_ms, ms);
      }
    }
    t.rows = c->rows;
    cudaGetLastError();
  }
  if (!status.ok()) Drain(*c);
  absl::MutexLock lock(&mu_);
  if (status.ok() && options_.record_timings) last_timings_ = t;
  c->busy = false;
  return status;
}

void CudaExpertBackendImpl::Cancel(uint64_t ticket) {
  if (ticket & kEmptyTicket) return;
  absl::MutexLock lock(&mu_);
  for (auto& c : contexts_) {
    if (c->busy && c->ticket == ticket) {
      Drain(*c);
      c->busy = false;
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaExpertBackend>> MakeCudaExpertBackend(
    ComputeType type, CudaBackendOptions options) {
  const int count = cuda::DeviceCount();
  if (count == 0) {
    return absl::FailedPreconditionError("no CUDA device (none visible, or no CUDA driver)");
  }
  if (options.devices.empty()) {
    for (int d = 0; d < count; ++d) options.devices.push_back(d);
  }
  for (int d : options.devices) {
    if (d < 0 || d >= count) {
      return absl::InvalidArgumentError(
          absl::StrFormat("CUDA device %d does not exist (%d visible)", d, count));
    }
  }
  auto backend = std::make_unique<CudaExpertBackendImpl>(type, std::move(options));
  DMOE_RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<CudaExpertBackend>(std::move(backend));
}

}  // namespace dmoe::core
