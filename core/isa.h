// The x86-64 instruction-set level every hand-written kernel and oneDNN run at.
//
// The level is the host's best, capped by the environment variable
// DMOE_MAX_ISA (read once, on the first call of any function here):
//   generic     - baseline x86-64 (SSE2): the portable path, slow but correct
//   avx2        - AVX2 + FMA (+ F16C)
//   avx512      - AVX-512 F/BW/VL/DQ (Skylake-SP and later, Zen 4+)
//   avx512_bf16 - avx512 + AVX512_BF16 (vdpbf16ps: Cooper Lake, Zen 4+)
//   amx         - avx512_bf16 + AMX-BF16 tiles (Sapphire Rapids and later)
// A cap above what the host has changes nothing; a cap below it makes every
// kernel dispatch (GEMMs, SwiGLU, combine, the wire codec) and oneDNN (through
// dnnl::set_max_cpu_isa, applied before its first primitive) use at most that
// level, so one AVX-512 machine also proves the AVX2 and generic paths.
//
// An unknown DMOE_MAX_ISA value is a configuration error: IsaConfigStatus()
// returns it (the binaries check it at start and exit with the message), and
// the kernels run at the host's level meanwhile.
//
// Thread safety: every function is safe to call from any thread.
#ifndef DMOE_CORE_ISA_H_
#define DMOE_CORE_ISA_H_

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace dmoe::core {

enum class IsaLevel : int {
  kGeneric = 0,
  kAvx2 = 1,
  kAvx512 = 2,
  kAvx512Bf16 = 3,
  kAmx = 4,
};

// "generic", "avx2", "avx512", "avx512_bf16", "amx".
const char* IsaName(IsaLevel level);

// The level named `name` (as IsaName spells it), or nullopt.
std::optional<IsaLevel> ParseIsaLevel(std::string_view name);

// The best level this CPU (and OS: AVX state enabled) supports.
IsaLevel HostIsa();

// min(HostIsa(), DMOE_MAX_ISA): the level the kernels use.
IsaLevel ActiveIsa();
inline bool IsaAtLeast(IsaLevel level) {
  return static_cast<int>(ActiveIsa()) >= static_cast<int>(level);
}

// OK, or InvalidArgument naming the bad DMOE_MAX_ISA value and the valid ones.
absl::Status IsaConfigStatus();

// One line for logs and benchmark headers, e.g.
// "isa avx2 (host avx2, DMOE_MAX_ISA unset), oneDNN max avx2".
std::string IsaSummary();

// Checks DMOE_MAX_ISA and logs the instruction-set level the kernels run at
// ("<name>: isa avx2 (host avx2, ...)"); the error names a bad DMOE_MAX_ISA
// value. Service mains call it once at start, before loading a model.
absl::Status CheckAndLogIsa(const char* name);

}  // namespace dmoe::core

#endif  // DMOE_CORE_ISA_H_
