// OpenMP spinning for dmoe processes that share one machine's cores.
//
// libgomp's idle threads spin for a while after each parallel region before
// they sleep (GOMP_SPINCOUNT, read once when the process starts). A router
// whose threads spin through an expert round trip, or expert servers whose
// threads spin through the router's attention, take the cores from the process
// that has work. Launchers that start several processes on one machine
// (`dmoe up`, serve_bench's configurations) give them a short spin instead,
// unless the user's environment already sets GOMP_SPINCOUNT or
// OMP_WAIT_POLICY. Measured with serve_bench (bench/README.md, "spin").
#ifndef DMOE_COMMON_COLOCATION_H_
#define DMOE_COMMON_COLOCATION_H_

#include <cstdlib>
#include <string>

namespace dmoe {

inline constexpr int kColocatedSpinCount = 20000;

// True when the environment already chooses how OpenMP threads wait.
inline bool OmpWaitIsSet() {
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  return (spin != nullptr && *spin) || (policy != nullptr && *policy);
}

// "GOMP_SPINCOUNT=N" for co-located processes, or "" when the environment
// already sets it (the user's choice wins).
inline std::string ColocatedSpinEnv() {
  return OmpWaitIsSet() ? "" : "GOMP_SPINCOUNT=" + std::to_string(kColocatedSpinCount);
}

}  // namespace dmoe

#endif  // DMOE_COMMON_COLOCATION_H_
