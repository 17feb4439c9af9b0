#include "core/isa.h"

#include <cpuid.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_format.h"
#include "dnnl.hpp"

namespace dmoe::core {
namespace {

constexpr const char* kNames[] = {"generic", "avx2", "avx512", "avx512_bf16", "amx"};

// XCR0 bits 17 and 18: the OS saves AMX tile state.
bool OsSavesAmxState() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return false;
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & (3u << 17)) == (3u << 17);
}

IsaLevel DetectHost() {
  __builtin_cpu_init();
  // __builtin_cpu_supports checks the OS's XSAVE state for AVX and AVX-512.
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    return IsaLevel::kGeneric;
  }
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq")) {
    return IsaLevel::kAvx2;
  }
  if (!__builtin_cpu_supports("avx512bf16")) return IsaLevel::kAvx512;
  unsigned a, b, c, d;
  const bool amx = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) != 0 &&  // AMX-BF16
                   (d & (1u << 24)) != 0 &&                                             // AMX-TILE
                   OsSavesAmxState();
  return amx ? IsaLevel::kAmx : IsaLevel::kAvx512Bf16;
}

struct IsaState {
  IsaLevel host = IsaLevel::kGeneric;
  IsaLevel active = IsaLevel::kGeneric;
  std::string env;      // DMOE_MAX_ISA as given ("" when unset)
  absl::Status config;  // the env value's verdict
  std::string onednn;   // what oneDNN was capped to, or why not
};

dnnl::cpu_isa OneDnnIsa(IsaLevel level) {
  switch (level) {
    case IsaLevel::kGeneric:
      return dnnl::cpu_isa::sse41;
    case IsaLevel::kAvx2:
      return dnnl::cpu_isa::avx2;
    case IsaLevel::kAvx512:
      return dnnl::cpu_isa::avx512_core;
    case IsaLevel::kAvx512Bf16:
      return dnnl::cpu_isa::avx512_core_bf16;
    case IsaLevel::kAmx:
      return dnnl::cpu_isa::avx512_core_amx;
  }
  return dnnl::cpu_isa::all;
}

IsaState MakeState() {
  IsaState s;
  s.host = DetectHost();
  s.active = s.host;
  const char* env = std::getenv("DMOE_MAX_ISA");
  if (env != nullptr && *env != '\0') {
    s.env = env;
    const std::optional<IsaLevel> found = ParseIsaLevel(s.env);
    if (!found) {
      s.config = absl::InvalidArgumentError(
          absl::StrFormat("DMOE_MAX_ISA=%s is not an instruction-set level; "
                          "use one of generic, "
                          "avx2, avx512, avx512_bf16, amx",
                          s.env));
      std::fprintf(stderr, "dmoe: %s (running at the host's level, %s)\n",
                   std::string(s.config.message()).c_str(), kNames[static_cast<int>(s.host)]);
    } else if (static_cast<int>(*found) < static_cast<int>(s.host)) {
      s.active = *found;
    }
  }
  // Before any primitive exists (this runs before the first PackedLinear).
  if (s.active == s.host && s.env.empty()) {
    s.onednn = "uncapped";
  } else {
    try {
      dnnl::set_max_cpu_isa(OneDnnIsa(s.active));
      s.onednn = absl::StrFormat("max %s", kNames[static_cast<int>(s.active)]);
    } catch (const dnnl::error& e) {
      // Only fails once oneDNN has already dispatched (too late to cap).
      s.onednn = absl::StrFormat("NOT capped (%s)", e.what());
      std::fprintf(stderr, "dmoe: cannot cap oneDNN's ISA: %s\n", e.what());
    }
  }
  return s;
}

const IsaState& State() {
  static const IsaState* state = new IsaState(MakeState());
  return *state;
}

}  // namespace

std::optional<IsaLevel> ParseIsaLevel(std::string_view name) {
  for (int i = 0; i < 5; ++i) {
    if (name == kNames[i]) return static_cast<IsaLevel>(i);
  }
  return std::nullopt;
}

const char* IsaName(IsaLevel level) {
  const int i = static_cast<int>(level);
  return i >= 0 && i < 5 ? kNames[i] : "unknown";
}

IsaLevel HostIsa() { return State().host; }
IsaLevel ActiveIsa() { return State().active; }
absl::Status IsaConfigStatus() { return State().config; }

std::string IsaSummary() {
  const IsaState& s = State();
  return absl::StrFormat("isa %s (host %s, DMOE_MAX_ISA %s), oneDNN %s", IsaName(s.active),
                         IsaName(s.host), s.env.empty() ? std::string("unset") : s.env, s.onednn);
}

absl::Status CheckAndLogIsa(const char* name) {
  if (absl::Status st = IsaConfigStatus(); !st.ok()) return st;
  std::fprintf(stderr, "%s: %s\n", name, IsaSummary().c_str());
  return absl::OkStatus();
}

}  // namespace dmoe::core
