// PackedLinear: dmoe's batch-invariant kernels (gemm.h), with oneDNN 2.6's
// matmul kept only as the batch-variant comparison of the benchmarks.
//
// Which kernel runs (chosen once per process, capped by DMOE_MAX_ISA):
// - bf16 on AVX512_BF16: RunAvx512Bf16 (vdpbf16ps) on weights packed in k
//   pairs, after a load-time probe shows it gives the FMA levels' bits. It
//   replaced oneDNN's brgemm (+ a small-M kernel of ours on brgemm's layout):
//   on the 2-core Zen 5 host, moe_layer_bench at T = 1..2048 ran 1-20% faster
//   per call (T = 64: 49 vs 57 ms on one thread, 23 vs 29 ms on two), is
//   invariant by construction instead of by a per-shape probe, and gives the
//   same bits as every other level.
// - otherwise the AVX-512 / AVX2 FMA kernels or the generic one (gemm.h).
// - x for bf16 layers is rounded to bf16 (or packed into bf16 pairs) once per
//   call into a per-thread buffer; threads own whole column panels.
//
// oneDNN (AllowBatchVariantOneDnnForBenchmarks), measured on Zen 5 with 2.6.3:
// - With `format_tag::any` weights, brgemm matmul picks the same packed
//   weight layout for every M from 1 to 2048 (bf16: BA16a64b2a, f32:
//   BA16a64b), so the weights are packed once and every M gets its own
//   primitive built against that layout. A runtime M (DNNL_RUNTIME_DIM_VAL)
//   falls back to `gemm:jit`, which repacks per call.
// - Creating a primitive for a new M costs ~40-80 us (descriptor) plus
//   0.2-1 ms (JIT); a hit in oneDNN's own cache still costs ~5 us per call.
//   Primitives therefore sit in a process-wide, bounded cache keyed by shape
//   (M, N, K, thread count, weight layout), and each thread keeps its own
//   small map of them with ready memory objects.
// - brgemm takes neither a strided source nor a strided destination (it
//   silently falls back to `ref:any`, ~100x slower): strided x and y go
//   through dense per-thread buffers.
// Packed weights live in 2 MiB-aligned memory advised for transparent huge
// pages: 512x fewer first-touch faults (~11 us each here), so loading the
// bench's 1.14 GB takes 2.8-3.9 s instead of 4.0-4.4 s.
#include "core/kernels/cpu/linear.h"

// GCC 12 reports its own _mm512_undefined_*() temporaries inside the intrinsics
// headers as maybe-uninitialized once inlined; the diagnostic is located in the
// header, so it is silenced before the include.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "core/dtype.h"
#include "core/isa.h"
#include "core/kernels/cpu/gemm.h"
#include "core/status.h"
#include "dnnl.hpp"

namespace dmoe::core {
namespace {

using dnnl::memory;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// CPU streams execute synchronously on the calling thread (plus its OpenMP
// team); the object carries no per-call state, so one is shared.
dnnl::stream& Stream() {
  static dnnl::stream* stream = new dnnl::stream(Engine());
  return *stream;
}

// The pool size before any SetComputeThreads (OMP_NUM_THREADS or all cores).
const int g_default_threads = omp_get_max_threads();
// 0: never set. OpenMP's nthreads-var is per thread, so Forward applies the
// setting on whichever thread calls it.
std::atomic<int> g_compute_threads{0};

void ApplyComputeThreads() {
  const int n = g_compute_threads.load(std::memory_order_relaxed);
  if (n > 0 && !omp_in_parallel() && omp_get_max_threads() != n) omp_set_num_threads(n);
}

// ---- Aligned buffers -------------------------------------------------------

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedPtr = std::unique_ptr<char, FreeDeleter>;

AlignedPtr AllocWeights(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t align = bytes >= kHuge ? kHuge : 64;
  const size_t size = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, size);
  if (p != nullptr && align == kHuge) madvise(p, size, MADV_HUGEPAGE);
  return AlignedPtr(static_cast<char*>(p));
}

// A per-thread grow-only buffer (activation copies, oneDNN scratchpads).
class ThreadBuffer {
 public:
  void* Get(size_t bytes) {
    if (bytes > capacity_) {
      capacity_ = (bytes + 4095) / 4096 * 4096;
      ptr_.reset(static_cast<char*>(std::aligned_alloc(64, capacity_)));
      if (ptr_ == nullptr) {
        std::fprintf(stderr, "dmoe PackedLinear: out of memory (%zu bytes)\n", bytes);
        std::abort();
      }
    }
    return ptr_.get();
  }

 private:
  AlignedPtr ptr_;
  size_t capacity_ = 0;
};

// ---- f32 -> bf16: round to nearest even, NaN stays NaN (as F32ToBF16) ----

__attribute__((target("avx512f,avx512bw"))) inline __m512i ToBF16Bits(__m512i u) {
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_srli_epi32(r, 16);
}

__attribute__((target("avx512f,avx512bw"))) void ToBF16Avx512(const float* src, int64_t n,
                                                              uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(src + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(ToBF16Bits(u)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512i u = _mm512_maskz_loadu_epi32(m, src + i);
    _mm512_mask_cvtepi32_storeu_epi16(dst + i, m, ToBF16Bits(u));
  }
}

void ToBF16(const float* src, int64_t n, uint16_t* dst) {
  static const bool kAvx512 = IsaAtLeast(IsaLevel::kAvx512);
  if (kAvx512) {
    ToBF16Avx512(src, n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = F32ToBF16(src[i]);
  }
}

void RoundToBF16(const float* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = BF16ToF32(F32ToBF16(src[i]));
}

// Runs body(row) for rows [0, m), over the OpenMP pool when the work is large
// enough to pay for a parallel region and we are not already inside one.
template <typename F>
void ForRows(int64_t m, int64_t row_elems, const F& body) {
  const bool par = m > 1 && m * row_elems >= (int64_t{1} << 16) && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (int64_t r = 0; r < m; ++r) body(r);
}

// ---- Process-wide primitive cache ------------------------------------------

// Source and destination are always dense row-major (see Forward). `nthr` is
// part of the key because oneDNN plans a primitive's work split for the thread
// count it sees at creation.
struct PrimKey {
  memory::data_type dt;
  int64_t m, n, k;
  int nthr;
  memory::desc weights;
  bool operator==(const PrimKey& o) const {
    return dt == o.dt && m == o.m && n == o.n && k == o.k && nthr == o.nthr && weights == o.weights;
  }
};

struct PrimKeyHash {
  size_t operator()(const PrimKey& key) const {
    size_t h = std::hash<int>()(static_cast<int>(key.dt));
    for (int64_t v : {key.m, key.n, key.k, static_cast<int64_t>(key.nthr)}) {
      h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    // The weight layout only disambiguates: it is a function of (dt, n, k).
    return h;
  }
};

struct PrimEntry {
  dnnl::matmul prim;
  memory::desc src_md, dst_md, scratch_md;
};

class PrimCache {
 public:
  // A primitive is a few KiB of JIT code. The expert backend's M is at most 256
  // per call, so this holds every M for a handful of shapes at two thread
  // counts; beyond it an arbitrary entry goes (oneDNN's own cache may still
  // hold it).
  static constexpr size_t kCapacity = 2048;

  std::shared_ptr<const PrimEntry> Get(const PrimKey& key) {
    {
      absl::MutexLock lock(&mu_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second;
    }
    auto entry = Create(key);  // outside the lock: JIT can take a millisecond
    absl::MutexLock lock(&mu_);
    if (map_.size() >= kCapacity) map_.erase(map_.begin());
    return map_.emplace(key, std::move(entry)).first->second;
  }

 private:
  static std::shared_ptr<const PrimEntry> Create(const PrimKey& key) {
    const memory::desc src({key.m, key.k}, key.dt, memory::format_tag::ab);
    const memory::desc dst({key.m, key.n}, memory::data_type::f32, memory::format_tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    try {
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, key.weights, dst), attr, Engine());
      return std::make_shared<const PrimEntry>(
          PrimEntry{dnnl::matmul(pd), src, dst, pd.scratchpad_desc()});
    } catch (const dnnl::error& e) {
      // The layout came from a matmul of the same problem, and oneDNN's
      // reference matmul takes any layout, so only a broken build or OOM gets
      // here. Forward has no error channel: die loudly.
      std::fprintf(stderr, "dmoe PackedLinear: cannot create matmul m=%lld n=%lld k=%lld: %s\n",
                   static_cast<long long>(key.m), static_cast<long long>(key.n),
                   static_cast<long long>(key.k), e.what());
      std::abort();
    }
  }

  absl::Mutex mu_;
  std::unordered_map<PrimKey, std::shared_ptr<const PrimEntry>, PrimKeyHash> map_
      ABSL_GUARDED_BY(mu_);
};

PrimCache& Cache() {
  static PrimCache* cache = new PrimCache();
  return *cache;
}

// Per thread: the primitive and memory objects of each shape this thread ran,
// so a call after warm-up takes no lock and creates no oneDNN objects (it
// re-points the memories at this call's buffers). oneDNN's execute still makes
// ~6 small internal allocations per call (its argument map); there is no API
// around that.
struct ThreadPrim {
  std::shared_ptr<const PrimEntry> entry;
  dnnl::memory src, dst, scratch;
};

ThreadPrim& GetThreadPrim(const PrimKey& key) {
  constexpr size_t kCapacity = 512;
  thread_local std::unordered_map<PrimKey, ThreadPrim, PrimKeyHash> prims;
  auto it = prims.find(key);
  if (it != prims.end()) return it->second;
  if (prims.size() >= kCapacity) prims.clear();
  ThreadPrim tp;
  tp.entry = Cache().Get(key);
  tp.src = dnnl::memory(tp.entry->src_md, Engine(), nullptr);
  tp.dst = dnnl::memory(tp.entry->dst_md, Engine(), nullptr);
  if (tp.entry->scratch_md.get_size() > 0) {
    tp.scratch = dnnl::memory(tp.entry->scratch_md, Engine(), nullptr);
  }
  return prims.emplace(key, std::move(tp)).first->second;
}

// The packed weight layout the matmul picks for `any` weights at a mid-sized M.
memory::desc ChooseWeightsLayout(memory::data_type dt, int64_t n, int64_t k) {
  constexpr int64_t kProbeM = 256;
  const memory::desc src({kProbeM, k}, dt, memory::format_tag::ab);
  const memory::desc wei({k, n}, dt, memory::format_tag::any);
  const memory::desc dst({kProbeM, n}, memory::data_type::f32, memory::format_tag::ab);
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, dst), Engine());
  return pd.weights_desc();
}

// ---- Load-time probes
// ---------------------------------------------------------

// Seeded values in [-1, 1) for the probes below (a fixed LCG: the same probe
// in every process).
std::vector<float> ProbeValues(int64_t count, uint32_t seed) {
  std::vector<float> v(count);
  for (float& f : v) {
    seed = seed * 1664525u + 1013904223u;
    f = static_cast<float>(static_cast<int32_t>(seed)) * 0x1p-31f;
  }
  return v;
}

// Everything a PackedLinear holds (PackedLinear::Impl is this; the helpers
// below take it by its public name).
struct PackedWeights {
  int64_t n = 0;
  int64_t k = 0;
  ComputeType type = ComputeType::kF32;
  // kBF16 on a CPU where oneDNN has no bf16 matmul (no AVX-512): f32 math on
  // bf16-rounded weights and activations - the same numbers, twice the bytes.
  bool emulate_bf16 = false;
  memory::data_type dt = memory::data_type::f32;
  memory::desc weights_md;
  AlignedPtr weights_buf;  // [packed layout of weights_md]
  dnnl::memory weights;    // view of weights_buf
  // The weights are in gemm.h's panel layout (weights_buf, invariant_bytes
  // long) and every call runs our batch-invariant kernels; oneDNN is unused.
  bool invariant = false;
  size_t invariant_bytes = 0;
  // kInt8: the per-column scales (gemm.h PackInt8), NumPanels(n) * 16.
  std::vector<float> scales;
  // bf16 weights in gemm.h's pair layout, run by RunAvx512Bf16 (vdpbf16ps).
  bool pairs = false;
};

thread_local ThreadBuffer t_src_buf;      // converted / dense copy of x
thread_local ThreadBuffer t_dst_buf;      // dense staging of a strided y
thread_local ThreadBuffer t_scratch_buf;  // oneDNN scratchpad

void ForwardOneDnn(const PackedWeights& im, const float* x, int64_t m, float* y, int64_t ldx,
                   int64_t ldy) {
  const int64_t k = im.k, n = im.n;
  // oneDNN 2.6 brgemm takes neither a strided source nor a strided destination
  // (it falls back to ref:any, ~100x slower): both are dense here, staged
  // through per-thread buffers when the caller's are not (a copy costs m*k or
  // m*n of the GEMM's 2*m*n*k). bf16 needs a converted copy of x anyway.
  const void* src = x;
  if (im.dt == memory::data_type::bf16) {
    auto* xb = static_cast<uint16_t*>(t_src_buf.Get(m * k * sizeof(uint16_t)));
    ForRows(m, k, [&](int64_t r) { ToBF16(x + r * ldx, k, xb + r * k); });
    src = xb;
  } else if (im.emulate_bf16) {
    auto* xr = static_cast<float*>(t_src_buf.Get(m * k * sizeof(float)));
    ForRows(m, k, [&](int64_t r) { RoundToBF16(x + r * ldx, k, xr + r * k); });
    src = xr;
  } else if (m > 1 && ldx != k) {
    auto* xd = static_cast<float*>(t_src_buf.Get(m * k * sizeof(float)));
    ForRows(m, k, [&](int64_t r) { std::memcpy(xd + r * k, x + r * ldx, k * sizeof(float)); });
    src = xd;
  }
  const bool stage_dst = m > 1 && ldy != n;
  float* dst = stage_dst ? static_cast<float*>(t_dst_buf.Get(m * n * sizeof(float))) : y;

  const int nthr = omp_in_parallel() ? 1 : omp_get_max_threads();
  ThreadPrim& tp = GetThreadPrim(PrimKey{im.dt, m, n, k, nthr, im.weights_md});
  const size_t scratch_bytes = tp.entry->scratch_md.get_size();
  dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, tp.src.get()},
                             {DNNL_ARG_WEIGHTS, im.weights.get()},
                             {DNNL_ARG_DST, tp.dst.get()},
                             {DNNL_ARG_SCRATCHPAD, tp.scratch ? tp.scratch.get() : nullptr}};
  dnnl_status_t st = dnnl_memory_set_data_handle(tp.src.get(), const_cast<void*>(src));
  if (st == dnnl_success) st = dnnl_memory_set_data_handle(tp.dst.get(), dst);
  if (st == dnnl_success && scratch_bytes > 0) {
    st = dnnl_memory_set_data_handle(tp.scratch.get(), t_scratch_buf.Get(scratch_bytes));
  }
  if (st == dnnl_success) {
    st = dnnl_primitive_execute(tp.entry->prim.get(), Stream().get(), scratch_bytes > 0 ? 4 : 3,
                                args);
  }
  if (st != dnnl_success) {
    std::fprintf(stderr, "dmoe PackedLinear: matmul m=%lld n=%lld k=%lld failed: status %d\n",
                 static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
                 static_cast<int>(st));
    std::abort();
  }
  if (stage_dst) {
    ForRows(m, n, [&](int64_t r) { std::memcpy(y + r * ldy, dst + r * n, n * sizeof(float)); });
  }
}

// ---- Our batch-invariant kernels (gemm.h) -----------------------------------

using GemmFn = void (*)(const gemm::Args&);

// The widest kernel the active ISA level allows. The AVX-512 kernel computes
// the same chains as the AVX2 one, so before it is trusted a seeded probe
// must give identical bits through both (it falls back to AVX2 otherwise).
GemmFn ChooseGemm() {
  if (!IsaAtLeast(IsaLevel::kAvx2)) return gemm::RunGeneric;
  if (!IsaAtLeast(IsaLevel::kAvx512)) return gemm::RunAvx2;
  constexpr int64_t m = 7, n = 37, k = 45;
  // bf16-representable values: the bf16 kernels take them as they are.
  std::vector<float> w = ProbeValues(n * k, 2024), x = ProbeValues(m * k, 2025);
  std::vector<float> a(m * n), b(m * n);
  RoundToBF16(w.data(), n * k, w.data());
  RoundToBF16(x.data(), m * k, x.data());
  std::vector<float> pf(gemm::PackedElems(n, k));
  std::vector<uint16_t> pb(gemm::PackedElems(n, k));
  gemm::PackF32(w.data(), n, k, pf.data());
  gemm::PackBf16(w.data(), n, k, pb.data());
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    gemm::Args args;
    args.w = bf16 ? static_cast<const void*>(pb.data()) : pf.data();
    args.bf16 = bf16 != 0;
    args.n = n;
    args.k = k;
    args.x = x.data();
    args.ldx = k;
    args.ldy = n;
    args.m = m;
    args.panel_end = gemm::NumPanels(n);
    args.y = a.data();
    gemm::RunAvx512(args);
    args.y = b.data();
    gemm::RunAvx2(args);
    if (std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0) {
      std::fprintf(stderr,
                   "dmoe PackedLinear: the AVX-512 GEMM differs from the AVX2 "
                   "one on this CPU; using AVX2\n");
      return gemm::RunAvx2;
    }
  }
  return gemm::RunAvx512;
}

GemmFn Gemm() {
  static const GemmFn fn = ChooseGemm();
  return fn;
}

// The kernel of bf16 layers on the pair layout, or null (the panel layout and
// Gemm()): RunAvx512Bf16 where the active level has AVX512_BF16, else
// RunAvx512Pairs where it has AVX-512 - each kept only if a seeded probe (odd
// K, a partial panel, several row blocks) gives the bits of Gemm() (for
// vdpbf16ps: this CPU adds its two products one after the other as gemm.h
// assumes). Decided once per process.
GemmFn ChoosePairs() {
  if (!IsaAtLeast(IsaLevel::kAvx512) || Gemm() != gemm::RunAvx512) return nullptr;
  const bool dp = IsaAtLeast(IsaLevel::kAvx512Bf16);
  const GemmFn fn = dp ? gemm::RunAvx512Bf16 : gemm::RunAvx512Pairs;
  constexpr int64_t m = 9, n = 37, k = 45;
  std::vector<float> w = ProbeValues(n * k, 2026), x = ProbeValues(m * k, 2027);
  RoundToBF16(w.data(), n * k, w.data());
  RoundToBF16(x.data(), m * k, x.data());
  std::vector<uint16_t> pb(gemm::PackedElems(n, k)), pp(gemm::PackedPairElems(n, k));
  gemm::PackBf16(w.data(), n, k, pb.data());
  gemm::PackBf16Pairs(w.data(), n, k, pp.data());
  const int64_t pairs = gemm::NumPairs(k);
  std::vector<uint32_t> xp(m * pairs);
  for (int64_t r = 0; r < m; ++r) gemm::PackXPairs(x.data() + r * k, k, xp.data() + r * pairs);
  std::vector<float> a(m * n), b(m * n);
  gemm::Args args;
  args.bf16 = true;
  args.n = n;
  args.k = k;
  args.ldy = n;
  args.m = m;
  args.panel_end = gemm::NumPanels(n);
  args.w = pp.data();
  args.xpairs = xp.data();
  args.ldxp = pairs;
  args.x = x.data();
  args.ldx = k;
  args.y = a.data();
  fn(args);
  args.w = pb.data();
  args.y = b.data();
  Gemm()(args);
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0) {
    std::fprintf(stderr,
                 "dmoe PackedLinear: the %s kernel does not give the FMA chain's bits on this "
                 "CPU; bf16 layers use the AVX-512 panel kernel\n",
                 dp ? "vdpbf16ps" : "AVX-512 pair");
    return nullptr;
  }
  return fn;
}

GemmFn PairGemm() {
  static const GemmFn fn = ChoosePairs();
  return fn;
}

}  // namespace

gemm::Fn gemm::Best() { return Gemm(); }

namespace {

void ForwardInvariant(const PackedWeights& im, const float* x, int64_t m, float* y, int64_t ldx,
                      int64_t ldy) {
  const int64_t k = im.k, n = im.n;
  gemm::Args args;
  args.w = im.weights_buf.get();
  args.bf16 = im.type == ComputeType::kBF16;
  args.int8 = im.type == ComputeType::kInt8;
  args.scales = args.int8 ? im.scales.data() : nullptr;
  args.n = n;
  args.k = k;
  args.x = x;
  args.ldx = ldx;
  args.y = y;
  args.ldy = ldy;
  args.m = m;
  const int64_t panels = gemm::NumPanels(n);
  const GemmFn run = im.pairs ? PairGemm() : Gemm();
  if (run == gemm::RunAvx512Bf16) {
    // x as bf16 pairs, converted once per call (m * k of the 2 * m * n * k).
    const int64_t pairs = gemm::NumPairs(k);
    auto* xp = static_cast<uint32_t*>(t_src_buf.Get(m * pairs * sizeof(uint32_t)));
    ForRows(m, k, [&](int64_t r) { gemm::PackXPairs(x + r * ldx, k, xp + r * pairs); });
    args.xpairs = xp;
    args.ldxp = pairs;
  } else if (args.bf16 || args.int8) {
    // The kernels multiply bf16 or int8 weights by bf16-rounded activations
    // (exact products in f32).
    auto* xr = static_cast<float*>(t_src_buf.Get(m * k * sizeof(float)));
    ForRows(m, k, [&](int64_t r) { RoundToBF16(x + r * ldx, k, xr + r * k); });
    args.x = xr;
    args.ldx = k;
  }
  // Threads own whole column panels: the split never changes an output.
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (threads > 1 && panels > 1 && m * n * k >= (int64_t{1} << 18)) {
#pragma omp parallel num_threads(threads)
    {
      const int nt = omp_get_num_threads(), id = omp_get_thread_num();
      gemm::Args part = args;
      part.panel_begin = panels * id / nt;
      part.panel_end = panels * (id + 1) / nt;
      if (part.panel_end > part.panel_begin) run(part);
    }
  } else {
    args.panel_begin = 0;
    args.panel_end = panels;
    run(args);
  }
}

std::atomic<bool> g_allow_variant_onednn{false};

// Packs `w` for our kernels.
absl::Status PackInvariant(const float* w, PackedWeights& im) {
  im.pairs = im.type == ComputeType::kBF16 && PairGemm() != nullptr;
  const size_t elems = im.pairs ? gemm::PackedPairElems(im.n, im.k) : gemm::PackedElems(im.n, im.k);
  const size_t bytes = elems * (im.type == ComputeType::kBF16   ? sizeof(uint16_t)
                                : im.type == ComputeType::kInt8 ? sizeof(int8_t)
                                                                : sizeof(float));
  im.weights_buf = AllocWeights(bytes);
  if (im.weights_buf == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("PackedLinear: cannot allocate %d bytes of weights", bytes));
  }
  if (im.type == ComputeType::kInt8) {
    im.scales.resize(gemm::NumPanels(im.n) * gemm::kPanel);
    if (!gemm::PackInt8(w, im.n, im.k, reinterpret_cast<int8_t*>(im.weights_buf.get()),
                        im.scales.data())) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "PackedLinear: [%d,%d] has a non-finite weight; int8 needs finite ones", im.n, im.k));
    }
  } else if (im.pairs) {
    gemm::PackBf16Pairs(w, im.n, im.k, reinterpret_cast<uint16_t*>(im.weights_buf.get()));
  } else if (im.type == ComputeType::kBF16) {
    gemm::PackBf16(w, im.n, im.k, reinterpret_cast<uint16_t*>(im.weights_buf.get()));
  } else {
    gemm::PackF32(w, im.n, im.k, reinterpret_cast<float*>(im.weights_buf.get()));
  }
  im.invariant = true;
  im.invariant_bytes = bytes + im.scales.size() * sizeof(float);
  im.dt = im.type == ComputeType::kBF16 ? memory::data_type::bf16 : memory::data_type::f32;
  return absl::OkStatus();
}

}  // namespace

void AllowBatchVariantOneDnnForBenchmarks(bool allow) {
  g_allow_variant_onednn.store(allow, std::memory_order_relaxed);
}

struct PackedLinear::Impl : PackedWeights {};

PackedLinear::PackedLinear() = default;
PackedLinear::~PackedLinear() = default;
PackedLinear::PackedLinear(PackedLinear&&) noexcept = default;
PackedLinear& PackedLinear::operator=(PackedLinear&&) noexcept = default;

absl::StatusOr<PackedLinear> PackedLinear::Create(const float* w, int64_t n, int64_t k,
                                                  ComputeType type) {
  if (n <= 0 || k <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PackedLinear: shape [%d,%d] must be positive", n, k));
  }
  if (w == nullptr) return absl::InvalidArgumentError("PackedLinear: null weights");
  auto impl = std::make_unique<Impl>();
  impl->n = n;
  impl->k = k;
  impl->type = type;
  // Our batch-invariant kernels; oneDNN only where a benchmark asked for its
  // batch-variant matmul (AllowBatchVariantOneDnnForBenchmarks) - never for
  // int8 weights, which only our kernels take.
  if (!g_allow_variant_onednn.load(std::memory_order_relaxed) || type == ComputeType::kInt8) {
    DMOE_RETURN_IF_ERROR(PackInvariant(w, *impl));
    PackedLinear out;
    out.impl_ = std::move(impl);
    return out;
  }
  try {
    // The converted [n, k] copy lives in a reused per-thread buffer: loading a
    // model packs thousands of matrices, and fresh pages cost ~11 us each here.
    // Matrices over 64 MiB (embeddings, output heads) get a temporary of their
    // own instead, so one of them does not pin its size for the process's life.
    thread_local ThreadBuffer pooled_buf;
    ThreadBuffer own_buf;
    ThreadBuffer& convert_buf = n * k * sizeof(float) > (size_t{64} << 20) ? own_buf : pooled_buf;
    const void* plain = w;
    if (type == ComputeType::kBF16) {
      try {
        impl->weights_md = ChooseWeightsLayout(memory::data_type::bf16, n, k);
        impl->dt = memory::data_type::bf16;
        auto* wb = static_cast<uint16_t*>(convert_buf.Get(n * k * sizeof(uint16_t)));
        ForRows(n, k, [&](int64_t r) { ToBF16(w + r * k, k, wb + r * k); });
        plain = wb;
      } catch (const dnnl::error&) {
        impl->emulate_bf16 = true;
        auto* wr = static_cast<float*>(convert_buf.Get(n * k * sizeof(float)));
        ForRows(n, k, [&](int64_t r) { RoundToBF16(w + r * k, k, wr + r * k); });
        plain = wr;
      }
    }
    if (impl->dt == memory::data_type::f32) {
      impl->weights_md = ChooseWeightsLayout(memory::data_type::f32, n, k);
    }
    // The HF weight W[n, k] row-major is the logical [k, n] matrix in tag `ba`.
    const memory::desc plain_md({k, n}, impl->dt, memory::format_tag::ba);
    dnnl::memory src(plain_md, Engine(), const_cast<void*>(plain));
    impl->weights_buf = AllocWeights(impl->weights_md.get_size());
    if (impl->weights_buf == nullptr) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "PackedLinear: cannot allocate %d bytes of weights", impl->weights_md.get_size()));
    }
    impl->weights = dnnl::memory(impl->weights_md, Engine(), impl->weights_buf.get());
    dnnl::reorder(src, impl->weights).execute(Stream(), src, impl->weights);
    Stream().wait();
  } catch (const dnnl::error& e) {
    return absl::InternalError(
        absl::StrFormat("PackedLinear: oneDNN failed packing [%d,%d]: %s", n, k, e.what()));
  }
  PackedLinear out;
  out.impl_ = std::move(impl);
  return out;
}

void PackedLinear::Forward(const float* x, int64_t m, float* y, int64_t ldx, int64_t ldy) const {
  if (m <= 0) return;
  if (ldx == 0) ldx = impl_->k;
  if (ldy == 0) ldy = impl_->n;
  ApplyComputeThreads();
  if (impl_->invariant) {
    ForwardInvariant(*impl_, x, m, y, ldx, ldy);
  } else {
    ForwardOneDnn(*impl_, x, m, y, ldx, ldy);
  }
}

std::string PackedLinear::KernelName() const {
  if (impl_ == nullptr) return "empty";
  if (impl_->invariant) {
    if (impl_->pairs && PairGemm() == gemm::RunAvx512Bf16) return "dmoe-avx512-bf16";
    const GemmFn fn = Gemm();
    return fn == gemm::RunAvx512 ? "dmoe-avx512"
           : fn == gemm::RunAvx2 ? "dmoe-avx2"
                                 : "dmoe-generic";
  }
  return "onednn";
}

bool PackedLinear::batch_invariant() const { return impl_ != nullptr && impl_->invariant; }

int64_t PackedLinear::n() const { return impl_->n; }
int64_t PackedLinear::k() const { return impl_->k; }
ComputeType PackedLinear::type() const { return impl_->type; }
size_t PackedLinear::weight_bytes() const {
  if (impl_ == nullptr) return 0;
  return impl_->invariant ? impl_->invariant_bytes : impl_->weights_md.get_size();
}

void SetComputeThreads(int n) {
  const int threads = n > 0 ? n : g_default_threads;
  g_compute_threads.store(threads, std::memory_order_relaxed);
  omp_set_num_threads(threads);
}

int ComputeThreads() {
  ApplyComputeThreads();
  return omp_get_max_threads();
}

}  // namespace dmoe::core
