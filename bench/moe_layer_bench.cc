// MoE layer benchmark at DeepSeek-V2-Lite shapes through the CPU expert backend
// (the product path), with the machine's ceilings measured in the same run.
//
//   moe_layer_bench [--quick] [--threads=1,2] [--tokens=1,8,64,512,2048]
//                   [--dtype=bf16|int8|f32] [--min_time=1.0] [--json=FILE]
//                   [--isa=all|LEVEL,...]   (also --isa all)
//
// Shapes: hidden 2048, 64 routed experts (moe_intermediate 1408), top-6, 2
// shared experts fused into one shared FFN (intermediate 2816). Random weights;
// random routing (6 distinct experts per token, seeded) plus the shared FFN per
// token.
//
// For each (threads, tokens): median time per layer call over calls with
// different routings, tokens/s, GFLOP/s (2 * 3 * hidden * inter per token-FFN
// assignment), weight bytes touched per call (distinct FFNs used x their weight
// bytes) and GB/s, and the ratios to two ceilings measured at that thread count
// in the same run, right before and after the row's calls: a 2048^3 GEMM
// through PackedLinear and an AVX-512 read of 1 GiB, each the best of several
// repetitions (what the machine can do; conservative on this shared host, where
// a disturbed repetition would lower a ceiling and flatter the ratio). The
// bound is the roofline's: bandwidth when the call's arithmetic intensity (FLOP
// per weight byte) is below the ceilings' ratio, else compute; "%roof" is
// achieved GFLOP/s over min(GEMM ceiling, intensity x bandwidth ceiling).
// Activations (a few MB) are not counted as bytes. The compute ceiling is the
// f32 FMA peak measured in the same run (register-only FMA chains at the
// active ISA level) wherever the kernels' arithmetic is f32 FMA - f32 weights,
// and bf16 weights below AVX512_BF16, which are widened to f32 - and the bf16
// GEMM where the CPU multiplies bf16 natively (vdpbf16ps, AMX).
//
// Goals (issue 17, docs/performance.md): T <= 8 at >= 90% of the read ceiling;
// 8 < T < 512 at >= 85% of the roofline; T >= 512 at >= 85% of the compute
// ceiling; at every ISA level, 1 and 2 threads.
//
// --isa=all (or a list of levels) runs the whole benchmark once per level the
// host has (each in a child process with DMOE_MAX_ISA set, so every kernel,
// oneDNN and the ceilings run at that level) and ends with one table of %roof
// per level. --json=FILE writes the rows (and the ceilings) as JSON.
//
//   moe_layer_bench --backend=cuda [--shapes=v2lite,v3]
//   [--gemm=grouped,per-expert]
//                   [--tokens=1,2,...,8192] [--dtype=bf16|f32] [--device=0]
//                   [--min_time=0.3] [--json=FILE]
//
// The CUDA expert backend on one GPU, at DeepSeek-V2-Lite (above) and V3
// expert shapes (hidden 7168, 256 experts x inter 2048, top-8, one shared
// expert of inter 2048). Per row: wall time per Compute (host x in, host out),
// the device time of the batch and of its GEMMs (CUDA events: gate|up GEMMs,
// SwiGLU, down GEMMs), their TFLOP/s against one dense cuBLAS GEMM with the
// same FLOPs measured in the same run (M = the batch's assignment rows,
// K = hidden, N = FLOPs / 2MK; goal >= 75%), and the weight bytes the GEMMs
// read per second against a device-to-device copy (read + write; goal
// >= 70%). The goal that applies is the roofline's: bandwidth when the
// weights take longer to read at copy speed than the dense GEMM takes, else
// FLOPs. --json writes the rows for bench/torch_moe_baseline.py --ours.
// Without CUDA in the build or without a GPU it says so and exits 1.

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bench/ceilings.h"
#include "core/expert_backend.h"
#include "core/isa.h"
#include "core/kernels/backend_factory.h"
#include "core/kernels/cpu/linear.h"
#include "core/kernels/cuda/ceilings.h"
#include "core/kernels/cuda/cuda_expert_backend.h"
#include "core/kernels/cuda/device_info.h"
#include "nlohmann/json.hpp"

namespace {

using dmoe::core::ComputeType;
using Clock = std::chrono::steady_clock;

constexpr int64_t kHidden = 2048;
constexpr int64_t kInter = 1408;
constexpr int64_t kSharedInter = 2 * 1408;
constexpr int kExperts = 64;
constexpr int kTopK = 6;
constexpr int32_t kLayer = 0;

// Expert shapes of a MoE layer.
struct Shape {
  const char* name;
  int64_t hidden, inter, shared_inter;
  int experts, top_k;
};
constexpr Shape kV2Lite{"V2-Lite", kHidden, kInter, kSharedInter, kExperts, kTopK};
constexpr Shape kV3{"V3", 7168, 2048, 2048, 256, 8};

struct Options {
  bool quick = false;
  std::vector<int> threads = {1, 2};
  std::vector<int> tokens = {1, 8, 64, 512, 2048};
  ComputeType type = ComputeType::kBF16;
  double min_time = 1.0;  // seconds of timed calls per configuration
  // --backend=cuda
  bool cuda = false;
  bool tokens_given = false, min_time_given = false;
  std::vector<std::string> shapes = {"v2lite", "v3"};
  std::vector<std::string> gemm = {"grouped", "per-expert"};
  int device = 0;
  std::string json;
  // --invariance-cost: also run every row on a backend whose layers may use
  // oneDNN's batch-variant kernels, and print the ratio.
  bool invariance_cost = false;
  // --isa: the levels to run, each in a child process; empty: this process.
  std::vector<std::string> isa_levels;
};

std::vector<std::string> ParseNames(std::string_view s) {
  std::vector<std::string> v;
  while (!s.empty()) {
    const size_t comma = s.find(',');
    v.emplace_back(s.substr(0, comma));
    if (comma == std::string_view::npos) break;
    s.remove_prefix(comma + 1);
  }
  return v;
}

std::vector<int> ParseList(std::string_view s) {
  std::vector<int> v;
  while (!s.empty()) {
    const size_t comma = s.find(',');
    v.push_back(std::atoi(std::string(s.substr(0, comma)).c_str()));
    if (comma == std::string_view::npos) break;
    s.remove_prefix(comma + 1);
  }
  return v;
}

bool ParseOptions(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto value = [&](std::string_view flag) -> const char* {
      return a.substr(0, flag.size()) == flag ? argv[i] + flag.size() : nullptr;
    };
    if (a == "--quick") {
      o->quick = true;
    } else if (a == "--invariance-cost") {
      o->invariance_cost = true;
    } else if (const char* v = value("--threads=")) {
      o->threads = ParseList(v);
    } else if (const char* v = value("--tokens=")) {
      o->tokens = ParseList(v);
      o->tokens_given = true;
    } else if (const char* v = value("--backend=")) {
      if (std::string_view(v) == "cuda") {
        o->cuda = true;
      } else if (std::string_view(v) != "cpu") {
        std::fprintf(stderr, "--backend must be cpu or cuda\n");
        return false;
      }
    } else if (const char* v = value("--shapes=")) {
      o->shapes = ParseNames(v);
      for (const std::string& n : o->shapes) {
        if (n != "v2lite" && n != "v3") {
          std::fprintf(stderr, "--shapes takes v2lite and/or v3\n");
          return false;
        }
      }
    } else if (const char* v = value("--gemm=")) {
      o->gemm = ParseNames(v);
      for (const std::string& n : o->gemm) {
        if (n != "grouped" && n != "per-expert") {
          std::fprintf(stderr, "--gemm takes grouped and/or per-expert\n");
          return false;
        }
      }
    } else if (const char* v = value("--device=")) {
      o->device = std::atoi(v);
    } else if (const char* v = value("--json=")) {
      o->json = v;
    } else if (const char* v = a == "--isa" && i + 1 < argc ? argv[++i] : value("--isa=")) {
      o->isa_levels = ParseNames(v);
      if (o->isa_levels.empty()) {
        std::fprintf(stderr, "--isa takes all or a list of levels\n");
        return false;
      }
    } else if (const char* v = value("--dtype=")) {
      if (std::string_view(v) == "f32") {
        o->type = ComputeType::kF32;
      } else if (std::string_view(v) == "bf16") {
        o->type = ComputeType::kBF16;
      } else if (std::string_view(v) == "int8") {
        o->type = ComputeType::kInt8;
      } else {
        std::fprintf(stderr, "--dtype must be bf16, int8 or f32\n");
        return false;
      }
    } else if (const char* v = value("--min_time=")) {
      o->min_time = std::atof(v);
      o->min_time_given = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--threads=1,2] [--tokens=1,8,64,512,2048] "
                   "[--dtype=bf16|int8|f32] [--min_time=SECONDS] [--invariance-cost] "
                   "[--json=FILE] [--isa=all|LEVEL,...]\n"
                   "       %s --backend=cuda [--shapes=v2lite,v3] "
                   "[--gemm=grouped,per-expert] [--tokens=...] [--dtype=bf16|f32] "
                   "[--device=0] [--min_time=SECONDS] [--json=FILE]\n",
                   argv[0], argv[0]);
      return false;
    }
  }
  for (const std::vector<int>* list : {&o->threads, &o->tokens}) {
    if (list->empty() || *std::min_element(list->begin(), list->end()) <= 0) {
      std::fprintf(stderr, "--threads and --tokens take positive integers\n");
      return false;
    }
  }
  if (o->cuda && !o->tokens_given) {
    o->tokens = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
  }
  if (o->cuda && !o->min_time_given) o->min_time = 0.3;
  if (o->quick) o->min_time = 0;
  return true;
}

// xorshift64*: fast enough to fill 1.2 GB of weights in about a second.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t Next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1Dull;
  }
  float Uniform(float a) {  // [-a, a)
    return a * (static_cast<float>(Next() >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
};

void Fill(std::vector<float>* v, float a, Rng* rng) {
  for (float& f : *v) f = rng->Uniform(a);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// One routed batch and what it costs.
struct Batch {
  int64_t tokens = 0;
  int64_t hidden = kHidden;
  std::vector<float> x;  // [tokens, hidden]
  std::vector<int32_t> offsets, ids;
  std::vector<float> weights;
  double flops = 0;         // 2 * 3 * hidden * inter per assignment
  double weight_bytes = 0;  // distinct FFNs used x their weight bytes

  dmoe::core::ExpertBatch View() const {
    return {kLayer, tokens, hidden, x.data(), offsets, ids, weights};
  }
};

Batch MakeShapeBatch(const Shape& shape, int64_t tokens, uint64_t seed, size_t elem_bytes) {
  const int64_t hidden = shape.hidden;
  const int experts = shape.experts, top_k = shape.top_k;
  Rng rng(seed);
  Batch b;
  b.tokens = tokens;
  b.hidden = hidden;
  b.x.resize(tokens * hidden);
  Fill(&b.x, 1.0f, &rng);
  b.offsets.push_back(0);
  std::vector<bool> used(experts, false);
  std::vector<int32_t> perm(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    float sum = 0;
    std::vector<float> w(top_k);
    // Partial Fisher-Yates: top_k distinct experts.
    for (int k = 0; k < top_k; ++k) {
      const int j = k + static_cast<int>(rng.Next() % (experts - k));
      std::swap(perm[k], perm[j]);
      b.ids.push_back(perm[k]);
      used[perm[k]] = true;
      w[k] = 0.05f + 0.5f * (rng.Uniform(1.0f) + 1.0f);
      sum += w[k];
    }
    for (float f : w) b.weights.push_back(f / sum);
    b.ids.push_back(dmoe::core::kSharedFfn);
    b.weights.push_back(1.0f);
    b.offsets.push_back(static_cast<int32_t>(b.ids.size()));
  }
  const double per_inter = 2.0 * 3 * hidden;
  b.flops = per_inter * (top_k * shape.inter + shape.shared_inter) * static_cast<double>(tokens);
  const int distinct = static_cast<int>(std::count(used.begin(), used.end(), true));
  b.weight_bytes = 3.0 * hidden * (distinct * shape.inter + shape.shared_inter) * elem_bytes;
  return b;
}

Batch MakeBatch(int64_t tokens, uint64_t seed, size_t elem_bytes) {
  return MakeShapeBatch(kV2Lite, tokens, seed, elem_bytes);
}

// ---- MoE layer --------------------------------------------------------------

struct Result {
  int threads = 0, tokens = 0, calls = 0;
  double ms = 0, tok_s = 0, gflops = 0, weight_mb = 0, gbs = 0, intensity = 0;
  // The fastest call's rates: what the kernels reach when the shared host
  // leaves them alone (the ceilings are best-of too).
  double gflops_best = 0, gbs_best = 0;
  double gemm_ceiling = 0, read_ceiling = 0;  // measured around this run
  double fma_ceiling = 0;
  double dot_ceiling = 0;  // vdpbf16ps peak; 0 below AVX512_BF16
  // The ceiling of this row's arithmetic: fma_ceiling, or, where the CPU
  // multiplies bf16 natively, the higher of the vdpbf16ps peak and oneDNN's
  // bf16 GEMM.
  double compute_ceiling = 0;
};

// Whether the kernels multiply bf16 natively here (else they widen to f32 and
// the f32 FMA peak bounds them).
bool NativeBf16(ComputeType type) {
  return type == ComputeType::kBF16 && dmoe::core::IsaAtLeast(dmoe::core::IsaLevel::kAvx512Bf16);
}

Result RunMoe(dmoe::core::ExpertBackend& backend, dmoe::bench::HostCeilings& ceilings, int tokens,
              int threads, const Options& o, size_t elem_bytes) {
  dmoe::core::SetComputeThreads(threads);
  // Ceilings right before and right after the timed calls (best of both): the
  // host is shared, and a ratio is only meaningful against what the machine
  // gave at about the same time.
  const int ceiling_reps = o.quick ? 1 : 3;
  double gemm_ceiling = ceilings.GemmGflops(ceiling_reps + 1);  // +1: warm-up
  double read_ceiling = ceilings.ReadGBs(threads, ceiling_reps + 1);
  double fma_ceiling = ceilings.FmaGflops(threads, ceiling_reps + 1);
  double dot_ceiling = ceilings.Bf16DotGflops(threads, ceiling_reps + 1);
  const int num_batches = o.quick ? 2 : (tokens >= 512 ? 5 : 16);
  std::vector<Batch> batches;
  for (int i = 0; i < num_batches; ++i)
    batches.push_back(MakeBatch(tokens, 1000 * tokens + i, elem_bytes));
  std::vector<float> out(static_cast<size_t>(tokens) * kHidden);
  auto call = [&](const Batch& b) {
    const absl::Status s = backend.Compute(b.View(), out.data());
    if (!s.ok()) {
      std::fprintf(stderr, "Compute: %s\n", std::string(s.message()).c_str());
      std::exit(1);
    }
  };
  for (const Batch& b : batches) call(b);  // warm-up: primitives for every M, workspaces

  std::vector<double> secs, gflops, gbs;
  const auto start = Clock::now();
  // Whole passes over the routings until min_time has passed (one in --quick).
  for (int pass = 0; pass == 0 || (!o.quick && pass < 1000); ++pass) {
    for (const Batch& b : batches) {
      const auto t0 = Clock::now();
      call(b);
      const double s = Seconds(t0, Clock::now());
      secs.push_back(s);
      gflops.push_back(b.flops / s / 1e9);
      gbs.push_back(b.weight_bytes / s / 1e9);
    }
    if (Seconds(start, Clock::now()) >= o.min_time) break;
  }
  gemm_ceiling = std::max(gemm_ceiling, ceilings.GemmGflops(ceiling_reps));
  read_ceiling = std::max(read_ceiling, ceilings.ReadGBs(threads, ceiling_reps));
  fma_ceiling = std::max(fma_ceiling, ceilings.FmaGflops(threads, ceiling_reps));
  dot_ceiling = std::max(dot_ceiling, ceilings.Bf16DotGflops(threads, ceiling_reps));
  Result r;
  r.gemm_ceiling = gemm_ceiling;
  r.fma_ceiling = fma_ceiling;
  r.dot_ceiling = dot_ceiling;
  r.compute_ceiling = NativeBf16(o.type) ? std::max(gemm_ceiling, dot_ceiling) : fma_ceiling;
  r.read_ceiling = read_ceiling;
  r.threads = threads;
  r.tokens = tokens;
  r.calls = static_cast<int>(secs.size());
  r.ms = Median(secs) * 1e3;
  r.tok_s = tokens / Median(secs);
  r.gflops = Median(gflops);
  r.gbs = Median(gbs);
  r.gflops_best = *std::max_element(gflops.begin(), gflops.end());
  r.gbs_best = *std::max_element(gbs.begin(), gbs.end());
  double bytes = 0, flops = 0;
  for (const Batch& b : batches) {
    bytes += b.weight_bytes;
    flops += b.flops;
  }
  r.weight_mb = bytes / batches.size() / 1e6;
  r.intensity = flops / bytes;
  return r;
}

long PeakRssMiB() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024;  // KiB on Linux
}

long CurrentRssMiB() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return resident * (sysconf(_SC_PAGESIZE) / 1024) / 1024;
}

// ---- CUDA backend
// ------------------------------------------------------------
// (In a build without CUDA the CUDA functions are dmoe_backends' stubs and
// RunCudaBench stops at CudaBuilt().)

struct CudaRow {
  std::string shape, gemm;
  int tokens = 0, calls = 0;
  int64_t rows = 0;
  double wall_ms = 0, device_ms = 0, gemm_ms = 0;
  double flops = 0, weight_bytes = 0;
  double dense_tflops = 0;  // same FLOPs as one dense GEMM, same run
  int64_t dense_n = 0;
};

void Die(const std::string& what, const absl::Status& s) {
  std::fprintf(stderr, "moe_layer_bench: %s: %s\n", what.c_str(), std::string(s.message()).c_str());
  std::exit(1);
}

// Loads one MoE layer of `shape` into a fresh backend; routed experts share
// two random weight sets (their values do not change the timing).
std::unique_ptr<dmoe::core::CudaExpertBackend> LoadCudaLayer(const Shape& shape,
                                                             dmoe::core::CudaGemmMode mode,
                                                             const Options& o) {
  auto made = dmoe::core::MakeExpertBackend(
      dmoe::core::BackendKind::kCuda,
      {.compute = o.type, .cuda = {.devices = {o.device}, .gemm = mode, .record_timings = true}});
  if (!made.ok()) Die("--backend=cuda", made.status());
  // kCuda always makes a CudaExpertBackend (its timings are used below).
  std::unique_ptr<dmoe::core::CudaExpertBackend> backend(
      dynamic_cast<dmoe::core::CudaExpertBackend*>(made->get()));
  if (backend == nullptr) Die("--backend=cuda", absl::InternalError("not a CUDA backend"));
  made->release();
  const int64_t h = shape.hidden;
  Rng rng(42);
  auto make = [&](int64_t inter) {
    std::vector<float> gate(inter * h), up(inter * h), down(h * inter);
    Fill(&gate, 1.0f / std::sqrt(float(h)), &rng);
    Fill(&up, 1.0f / std::sqrt(float(h)), &rng);
    Fill(&down, 1.0f / std::sqrt(float(inter)), &rng);
    return std::array<std::vector<float>, 3>{std::move(gate), std::move(up), std::move(down)};
  };
  const auto sets = std::array{make(shape.inter), make(shape.inter)};
  const auto shared = make(shape.shared_inter);
  auto load = [&](int32_t id, int64_t inter, const auto& w) {
    const absl::Status s = backend->LoadFfn(kLayer, id, {h, inter, w[0], w[1], w[2]});
    if (!s.ok()) Die("LoadFfn", s);
  };
  for (int e = 0; e < shape.experts; ++e) load(e, shape.inter, sets[e % 2]);
  load(dmoe::core::kSharedFfn, shape.shared_inter, shared);
  return backend;
}

CudaRow RunCudaRow(dmoe::core::CudaExpertBackend& backend, const Shape& shape,
                   const std::string& gemm, int tokens, const Options& o, size_t elem_bytes) {
  const int num_batches = o.quick ? 2 : (tokens >= 512 ? 3 : 8);
  std::vector<Batch> batches;
  for (int i = 0; i < num_batches; ++i)
    batches.push_back(MakeShapeBatch(shape, tokens, 1000 * tokens + i, elem_bytes));
  std::vector<float> out(static_cast<size_t>(tokens) * shape.hidden);
  auto call = [&](const Batch& b) {
    const absl::Status s = backend.Compute(b.View(), out.data());
    if (!s.ok()) Die("Compute", s);
  };
  for (const Batch& b : batches) call(b);  // warm-up: workspaces, cuBLAS
  std::vector<double> wall, device, gemm_s;
  const auto start = Clock::now();
  for (int pass = 0; pass == 0 || (!o.quick && pass < 1000); ++pass) {
    for (const Batch& b : batches) {
      const auto t0 = Clock::now();
      call(b);
      wall.push_back(Seconds(t0, Clock::now()));
      const auto t = backend.LastTimings();
      device.push_back(t.batch_ms * 1e-3);
      gemm_s.push_back(t.gemm_ms * 1e-3);
    }
    if (Seconds(start, Clock::now()) >= o.min_time) break;
  }
  CudaRow r;
  r.shape = shape.name;
  r.gemm = gemm;
  r.tokens = tokens;
  r.calls = static_cast<int>(wall.size());
  r.rows = static_cast<int64_t>(tokens) * (shape.top_k + 1);
  r.wall_ms = Median(wall) * 1e3;
  r.device_ms = Median(device) * 1e3;
  r.gemm_ms = Median(gemm_s) * 1e3;
  for (const Batch& b : batches) {
    r.flops += b.flops / batches.size();
    r.weight_bytes += b.weight_bytes / batches.size();
  }
  // The dense GEMM with the same FLOPs: M = assignment rows, K = hidden.
  const int64_t m = r.rows, k = shape.hidden;
  r.dense_n = std::max<int64_t>(1, std::llround(r.flops / (2.0 * m * k)));
  const bool bf16 = o.type == ComputeType::kBF16;
  auto dense = dmoe::core::cuda::DenseGemmSeconds(o.device, bf16, bf16 && gemm == "grouped", m,
                                                  r.dense_n, k, o.quick ? 1 : 5);
  if (!dense.ok()) Die("dense GEMM ceiling", dense.status());
  r.dense_tflops = 2.0 * m * r.dense_n * k / *dense / 1e12;
  return r;
}

int RunCudaBench(const Options& o) {
  if (!dmoe::core::CudaBuilt()) {
    std::fprintf(stderr,
                 "moe_layer_bench: --backend=cuda: this build has no CUDA "
                 "support (nvcc not found at configure time, or "
                 "-DDMOE_CUDA=OFF)\n");
    return 1;
  }
  const int devices = dmoe::core::cuda::DeviceCount();
  if (devices == 0) {
    std::fprintf(stderr,
                 "moe_layer_bench: --backend=cuda: no CUDA device on this "
                 "machine (none visible, or no driver)\n");
    return 1;
  }
  if (o.device < 0 || o.device >= devices) {
    std::fprintf(stderr, "moe_layer_bench: --device=%d: %d CUDA devices\n", o.device, devices);
    return 1;
  }
  const bool bf16 = o.type == ComputeType::kBF16;
  const size_t elem_bytes = bf16 ? 2 : 4;
  std::printf("MoE layer bench, CUDA backend, %s weights, on %s%s\n", bf16 ? "bf16" : "f32",
              dmoe::core::cuda::DeviceDescription(o.device).c_str(),
              o.quick ? " [--quick: smoke only, numbers not meaningful]" : "");
  auto copy = dmoe::core::cuda::DeviceCopyGBs(o.device, size_t{1} << 30, o.quick ? 1 : 5);
  if (!copy.ok()) Die("copy ceiling", copy.status());
  const double copy_gbs = *copy;
  std::printf("device-to-device copy of 1 GiB: %.0f GB/s (read + write)\n", copy_gbs);

  std::vector<CudaRow> rows;
  for (const std::string& shape_name : o.shapes) {
    const Shape& shape = shape_name == "v3" ? kV3 : kV2Lite;
    for (const std::string& gemm : o.gemm) {
      const auto mode = gemm == "grouped" ? dmoe::core::CudaGemmMode::kGrouped
                                          : dmoe::core::CudaGemmMode::kPerExpert;
      const auto t0 = Clock::now();
      auto backend = LoadCudaLayer(shape, mode, o);
      std::printf("%s, %s GEMMs: loaded %.2f GB in %.1f s\n", shape.name, gemm.c_str(),
                  backend->WeightBytes() / 1e9, Seconds(t0, Clock::now()));
      std::fflush(stdout);
      for (int tokens : o.tokens)
        rows.push_back(RunCudaRow(*backend, shape, gemm, tokens, o, elem_bytes));
    }
  }

  std::printf(
      "\nMedians over `calls` (routing changes from call to call). wall: "
      "Compute from host x to host out; dev: the batch on the GPU; GEMM: "
      "gate|up GEMMs + SwiGLU + down GEMMs. dense: one cuBLAS GEMM with the "
      "same FLOPs (M = rows, K = hidden). BW: weight bytes / GEMM time vs the "
      "copy. bnd: the roofline's bound (BW when reading the weights at copy "
      "speed takes longer than the dense GEMM).\n");
  std::printf("%-7s %-10s %6s %5s %6s %9s %8s %8s %9s %9s %6s %8s %8s %5s %4s %s\n", "shape",
              "gemm", "tokens", "calls", "rows", "wall ms", "dev ms", "GEMM ms", "TFLOP/s", "dense",
              "%dense", "weightGB", "GB/s", "%copy", "bnd", "goal");
  for (const CudaRow& r : rows) {
    const double tflops = r.flops / (r.gemm_ms * 1e-3) / 1e12;
    const double gbs = r.weight_bytes / (r.gemm_ms * 1e-3) / 1e9;
    const double pct_dense = 100 * tflops / r.dense_tflops;
    const double pct_copy = 100 * gbs / copy_gbs;
    const bool bw_bound = r.weight_bytes / (copy_gbs * 1e9) > r.flops / (r.dense_tflops * 1e12);
    const std::string goal = bw_bound
                                 ? (pct_copy >= 70 ? "met: >=70% copy" : "MISSED: >=70% copy")
                                 : (pct_dense >= 75 ? "met: >=75% dense" : "MISSED: >=75% dense");
    std::printf(
        "%-7s %-10s %6d %5d %6lld %9.3f %8.3f %8.3f %9.1f %9.1f %5.0f%% %8.3f "
        "%8.0f %4.0f%% %4s %s\n",
        r.shape.c_str(), r.gemm.c_str(), r.tokens, r.calls, static_cast<long long>(r.rows),
        r.wall_ms, r.device_ms, r.gemm_ms, tflops, r.dense_tflops, pct_dense, r.weight_bytes / 1e9,
        gbs, pct_copy, bw_bound ? "BW" : "FLOP", goal.c_str());
  }
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "moe_layer_bench: cannot write %s\n", o.json.c_str());
      return 1;
    }
    std::fprintf(f, "{\"dtype\": \"%s\", \"device\": \"%s\", \"rows\": [\n", bf16 ? "bf16" : "f32",
                 dmoe::core::cuda::DeviceDescription(o.device).c_str());
    for (size_t i = 0; i < rows.size(); ++i) {
      const CudaRow& r = rows[i];
      std::fprintf(f,
                   "  {\"shape\": \"%s\", \"gemm\": \"%s\", \"tokens\": %d, "
                   "\"wall_ms\": %.6f, \"device_ms\": %.6f, \"gemm_ms\": "
                   "%.6f, \"flops\": %.6g}%s\n",
                   r.shape.c_str(), r.gemm.c_str(), r.tokens, r.wall_ms, r.device_ms, r.gemm_ms,
                   r.flops, i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
    std::printf("\nrows written to %s\n", o.json.c_str());
  }
  return 0;
}

// The layer's 64 experts and its shared FFN, seeded (the same weights on every
// call).
std::unique_ptr<dmoe::core::ExpertBackend> LoadBackend(ComputeType type) {
  dmoe::core::BackendOptions options;
  options.compute = type;
  auto made = dmoe::core::MakeExpertBackend(dmoe::core::BackendKind::kCpu, options);
  if (!made.ok()) {
    std::fprintf(stderr, "moe_layer_bench: %s\n", std::string(made.status().message()).c_str());
    std::exit(1);
  }
  std::unique_ptr<dmoe::core::ExpertBackend> backend = *std::move(made);
  Rng rng(42);
  std::vector<float> gate, up, down;
  auto load = [&](int32_t id, int64_t inter) {
    gate.resize(inter * kHidden);
    up.resize(inter * kHidden);
    down.resize(kHidden * inter);
    Fill(&gate, 1.0f / std::sqrt(float(kHidden)), &rng);
    Fill(&up, 1.0f / std::sqrt(float(kHidden)), &rng);
    Fill(&down, 1.0f / std::sqrt(float(inter)), &rng);
    const absl::Status s = backend->LoadFfn(kLayer, id, {kHidden, inter, gate, up, down});
    if (!s.ok()) {
      std::fprintf(stderr, "LoadFfn: %s\n", std::string(s.message()).c_str());
      std::exit(1);
    }
  };
  for (int e = 0; e < kExperts; ++e) load(e, kInter);
  load(dmoe::core::kSharedFfn, kSharedInter);
  return backend;
}

// What a row achieved against its ceilings, and the goal that applies.
struct Judged {
  double pct_compute = 0, pct_bw = 0, pct_roof = 0;
  // The goal's percentage for the median call (judged) and the fastest one.
  double pct_goal = 0, pct_goal_best = 0;
  bool bw_bound = false;
  bool met = false;
  std::string goal;
};

Judged Judge(const Result& r) {
  Judged j;
  j.pct_compute = 100 * r.gflops / r.compute_ceiling;
  j.pct_bw = 100 * r.gbs / r.read_ceiling;
  j.bw_bound = r.intensity < r.compute_ceiling / r.read_ceiling;
  const double roof = std::min(r.compute_ceiling, r.intensity * r.read_ceiling);
  j.pct_roof = 100 * r.gflops / roof;
  std::string target;
  double need = 0;
  if (r.tokens <= 8) {
    j.pct_goal = j.pct_bw;
    j.pct_goal_best = 100 * r.gbs_best / r.read_ceiling;
    need = 90;
    target = ">=90% BW";
  } else if (r.tokens >= 512) {
    j.pct_goal = j.pct_compute;
    j.pct_goal_best = 100 * r.gflops_best / r.compute_ceiling;
    need = 85;
    target = ">=85% compute";
  } else {
    j.pct_goal = j.pct_roof;
    j.pct_goal_best = 100 * r.gflops_best / roof;
    need = 85;
    target = ">=85% roofline";
  }
  j.met = j.pct_goal >= need;
  j.goal = (j.met ? "met: " : "MISSED: ") + target;
  return j;
}

const char* IsaWord() {
  using dmoe::core::IsaAtLeast;
  using dmoe::core::IsaLevel;
  return IsaAtLeast(IsaLevel::kAvx512) ? "AVX-512" : IsaAtLeast(IsaLevel::kAvx2) ? "AVX2" : "SSE2";
}

// Writes `doc` to `path` and says so; false (with the reason) when it cannot.
bool WriteJson(const std::string& path, const nlohmann::json& doc, const char* what) {
  std::ofstream f(path);
  f << doc.dump(1) << "\n";
  if (!f) {
    std::fprintf(stderr, "moe_layer_bench: cannot write %s\n", path.c_str());
    return false;
  }
  std::printf("\n%s written to %s\n", what, path.c_str());
  return true;
}

bool WriteCpuJson(const Options& o, const std::vector<Result>& results) {
  nlohmann::json rows = nlohmann::json::array();
  for (const Result& r : results) {
    const Judged j = Judge(r);
    rows.push_back({{"threads", r.threads},
                    {"tokens", r.tokens},
                    {"calls", r.calls},
                    {"ms", r.ms},
                    {"tok_s", r.tok_s},
                    {"gflops", r.gflops},
                    {"weight_gbs", r.gbs},
                    {"flop_per_byte", r.intensity},
                    {"gemm_ceiling_gflops", r.gemm_ceiling},
                    {"fma_ceiling_gflops", r.fma_ceiling},
                    {"bf16_dot_ceiling_gflops", r.dot_ceiling},
                    {"compute_ceiling_gflops", r.compute_ceiling},
                    {"read_ceiling_gbs", r.read_ceiling},
                    {"pct_compute", j.pct_compute},
                    {"pct_bw", j.pct_bw},
                    {"pct_roof", j.pct_roof},
                    {"pct_goal", j.pct_goal},
                    {"pct_goal_fastest_call", j.pct_goal_best},
                    {"bound", j.bw_bound ? "BW" : "FLOP"},
                    {"goal", j.goal},
                    {"goal_met", j.met}});
  }
  const nlohmann::json doc = {{"benchmark", "moe_layer_bench"},
                              {"shape", "V2-Lite"},
                              {"dtype", o.type == ComputeType::kBF16   ? "bf16"
                                        : o.type == ComputeType::kInt8 ? "int8"
                                                                       : "f32"},
                              {"isa", dmoe::core::IsaName(dmoe::core::ActiveIsa())},
                              {"host_isa", dmoe::core::IsaName(dmoe::core::HostIsa())},
                              {"isa_summary", dmoe::core::IsaSummary()},
                              {"quick", o.quick},
                              {"rows", rows}};
  return WriteJson(o.json, doc, "rows");
}

// --isa: this benchmark once per level, each in a child process whose kernels,
// oneDNN and ceilings are capped by DMOE_MAX_ISA, then one %roof table.
int RunPerIsa(const Options& o, int argc, char** argv) {
  using dmoe::core::IsaLevel;
  const int host = static_cast<int>(dmoe::core::HostIsa());
  std::vector<std::string> levels;
  for (const std::string& name : o.isa_levels) {
    if (name == "all") {
      for (int l = 0; l <= host; ++l) levels.push_back(IsaName(static_cast<IsaLevel>(l)));
      continue;
    }
    const std::optional<IsaLevel> found = dmoe::core::ParseIsaLevel(name);
    if (!found) {
      std::fprintf(stderr,
                   "--isa: unknown level '%s' (all, generic, avx2, avx512, avx512_bf16, amx)\n",
                   name.c_str());
      return 2;
    }
    if (static_cast<int>(*found) > host) {
      std::fprintf(stderr, "--isa: this host has no %s (its best level is %s)\n", name.c_str(),
                   IsaName(static_cast<IsaLevel>(host)));
      return 2;
    }
    levels.push_back(name);
  }
  char dir_template[] = "/tmp/moe_layer_bench.XXXXXX";
  const char* dir = mkdtemp(dir_template);
  if (dir == nullptr) {
    std::perror("moe_layer_bench: mkdtemp");
    return 1;
  }
  nlohmann::json all = nlohmann::json::array();
  int status_all = 0;
  for (const std::string& level : levels) {
    const std::string json = std::string(dir) + "/" + level + ".json";
    std::vector<std::string> args = {argv[0]};
    for (int i = 1; i < argc; ++i) {
      const std::string_view a = argv[i];
      if (a == "--isa") {
        ++i;  // and its value
      } else if (a.substr(0, 6) != "--isa=" && a.substr(0, 7) != "--json=") {
        args.emplace_back(a);
      }
    }
    args.push_back("--json=" + json);
    std::printf("\n==== DMOE_MAX_ISA=%s ====\n", level.c_str());
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
      setenv("DMOE_MAX_ISA", level.c_str(), 1);
      std::vector<char*> cargs;
      for (std::string& a : args) cargs.push_back(a.data());
      cargs.push_back(nullptr);
      execv("/proc/self/exe", cargs.data());
      std::perror("moe_layer_bench: execv");
      _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
        WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "moe_layer_bench: the run at DMOE_MAX_ISA=%s failed\n", level.c_str());
      status_all = 1;
      continue;
    }
    std::ifstream f(json);
    nlohmann::json doc = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
    std::remove(json.c_str());
    if (doc.is_discarded()) {
      std::fprintf(stderr, "moe_layer_bench: unreadable results from DMOE_MAX_ISA=%s\n",
                   level.c_str());
      status_all = 1;
      continue;
    }
    all.push_back(std::move(doc));
  }
  rmdir(dir);

  std::printf(
      "\n==== %% of the goal's ceiling per ISA level, median call (fastest call), * where the "
      "goal is met: T<=8 %%BW >= 90, 8<T<512 %%roofline >= 85, T>=512 %%compute >= 85 ====\n");
  std::printf("%-12s %3s", "isa", "thr");
  for (int t : o.tokens) std::printf(" %12s", ("T=" + std::to_string(t)).c_str());
  std::printf("\n");
  for (const nlohmann::json& doc : all) {
    for (int threads : o.threads) {
      std::printf("%-12s %3d", doc["isa"].get<std::string>().c_str(), threads);
      for (int t : o.tokens) {
        std::string cell = "-";
        for (const nlohmann::json& r : doc["rows"]) {
          if (r["threads"] != threads || r["tokens"] != t) continue;
          char buf[48];
          std::snprintf(buf, sizeof buf, "%.0f%s (%.0f)", r["pct_goal"].get<double>(),
                        r["goal_met"].get<bool>() ? "*" : "",
                        r["pct_goal_fastest_call"].get<double>());
          cell = buf;
        }
        std::printf(" %12s", cell.c_str());
      }
      std::printf("\n");
    }
  }
  if (!o.json.empty() &&
      !WriteJson(o.json, {{"benchmark", "moe_layer_bench"}, {"levels", all}}, "all levels")) {
    return 1;
  }
  return status_all;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!ParseOptions(argc, argv, &o)) return 2;
  if (o.cuda && o.type == ComputeType::kInt8) {
    std::fprintf(stderr, "--dtype=int8 runs on the CPU backend only (for now)\n");
    return 2;
  }
  if (o.cuda) return RunCudaBench(o);
  if (!o.isa_levels.empty()) return RunPerIsa(o, argc, argv);
  const bool int8 = o.type == ComputeType::kInt8;
  // int8 weights are widened to f32 like bf16 ones: the GEMM ceiling is
  // oneDNN's bf16 GEMM, the compute ceiling the FMA peak.
  const bool bf16 = o.type == ComputeType::kBF16 || int8;
  const size_t elem_bytes = int8 ? 1 : bf16 ? 2 : 4;
  const char* dtype = int8 ? "int8" : bf16 ? "bf16" : "f32";

  std::printf(
      "MoE layer bench: DeepSeek-V2-Lite shapes (hidden %lld, %d experts x "
      "inter %lld, "
      "top-%d, shared inter %lld), %s weights, backend cpu-%s%s\n",
      static_cast<long long>(kHidden), kExperts, static_cast<long long>(kInter), kTopK,
      static_cast<long long>(kSharedInter), dtype, dtype,
      o.quick ? " [--quick: smoke only, numbers not meaningful]" : "");

  const auto load_start = Clock::now();
  auto backend = LoadBackend(o.type);
  std::printf("loaded %.2f GB of packed weights in %.1f s (kernels: %s)\n",
              backend->WeightBytes() / 1e9, Seconds(load_start, Clock::now()),
              dmoe::core::IsaSummary().c_str());

  // --invariance-cost: the same weights on layers allowed to run oneDNN's
  // matmul wherever it exists, batch-invariant or not.
  std::unique_ptr<dmoe::core::ExpertBackend> variant;
  if (o.invariance_cost) {
    dmoe::core::AllowBatchVariantOneDnnForBenchmarks(true);
    variant = LoadBackend(o.type);
    dmoe::core::AllowBatchVariantOneDnnForBenchmarks(false);
  }

  dmoe::bench::HostCeilings ceilings(int8 ? ComputeType::kBF16 : o.type);
  std::vector<Result> results, variant_results;
  for (int threads : o.threads) {
    for (int tokens : o.tokens) {
      results.push_back(RunMoe(*backend, ceilings, tokens, threads, o, elem_bytes));
      if (variant != nullptr) {
        variant_results.push_back(RunMoe(*variant, ceilings, tokens, threads, o, elem_bytes));
      }
    }
  }
  ceilings.FreeProbe();

  std::printf(
      "\nCeilings, measured around each row (best of %d before + %d after): "
      "%s GEMM 2048^3 through oneDNN (the fastest dense GEMM it has here, "
      "batch-invariant or not); f32 FMA peak (register-only chains, %s); read of "
      "1 GiB (%s sum, huge pages)%s. The compute ceiling is the %s. Best per "
      "thread count:\n",
      o.quick ? 2 : 4, o.quick ? 1 : 3, bf16 ? "bf16" : "f32", IsaWord(), IsaWord(),
      NativeBf16(o.type) ? "; vdpbf16ps peak (register-only chains)" : "",
      NativeBf16(o.type) ? "higher of the vdpbf16ps peak and the bf16 GEMM (native bf16 here)"
                         : "FMA peak (the kernels widen bf16 to f32 here)");
  std::printf("%7s %14s %13s %13s %10s %18s\n", "threads", "GEMM GFLOP/s", "FMA GFLOP/s",
              "dot GFLOP/s", "read GB/s", "balance FLOP/B");
  for (int threads : o.threads) {
    double gemm = 0, fma = 0, dot = 0, compute = 0, read = 0;
    for (const Result& r : results) {
      if (r.threads != threads) continue;
      gemm = std::max(gemm, r.gemm_ceiling);
      fma = std::max(fma, r.fma_ceiling);
      dot = std::max(dot, r.dot_ceiling);
      compute = std::max(compute, r.compute_ceiling);
      read = std::max(read, r.read_ceiling);
    }
    std::printf("%7d %14.1f %13.1f %13.1f %10.1f %18.1f\n", threads, gemm, fma, dot, read,
                compute / read);
  }

  std::printf(
      "\nMoE layer through CpuExpertBackend (median over `calls`; the routing "
      "changes from call to call)\n");
  std::printf("%3s %6s %5s %9s %9s %8s %6s %6s %9s %7s %5s %5s %7s %4s %6s %s\n", "thr", "tokens",
              "calls", "ms/call", "tok/s", "GFLOP/s", "ceil", "%comp", "weight MB", "GB/s", "ceil",
              "%BW", "FLOP/B", "bnd", "%roof",
              "goal on the median call (docs/performance.md); the fastest call's %");
  for (const Result& r : results) {
    const Judged j = Judge(r);
    std::printf(
        "%3d %6d %5d %9.2f %9.1f %8.1f %6.0f %5.0f%% %9.0f %7.1f %5.1f %4.0f%% "
        "%7.1f %4s %5.0f%% %s; fastest %.0f%%\n",
        r.threads, r.tokens, r.calls, r.ms, r.tok_s, r.gflops, r.compute_ceiling, j.pct_compute,
        r.weight_mb, r.gbs, r.read_ceiling, j.pct_bw, r.intensity, j.bw_bound ? "BW" : "FLOP",
        j.pct_roof, j.goal.c_str(), j.pct_goal_best);
  }
  if (!o.json.empty() && !WriteCpuJson(o, results)) return 1;
  std::printf(
      "\nRSS: %ld MiB at the end (packed weights %.0f MiB + workspaces + GEMM "
      "ceiling buffers); peak %ld MiB (includes the 1 GiB bandwidth probe)\n",
      CurrentRssMiB(), backend->WeightBytes() / 1048576.0, PeakRssMiB());

  if (variant != nullptr) {
    std::printf(
        "\nCost of batch invariance (%s): each row also ran, right after, on "
        "layers that may use oneDNN's batch-variant matmul (%.2f GB packed); "
        "ratio > 1.00: the invariant kernels are faster\n",
        dmoe::core::IsaSummary().c_str(), variant->WeightBytes() / 1e9);
    std::printf("%3s %6s %16s %14s %7s\n", "thr", "tokens", "invariant tok/s", "oneDNN tok/s",
                "ratio");
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      const Result& v = variant_results[i];
      std::printf("%3d %6d %16.1f %14.1f %7.2f\n", r.threads, r.tokens, r.tok_s, v.tok_s,
                  r.tok_s / v.tok_s);
    }
  }
  return 0;
}
