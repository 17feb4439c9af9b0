// Helpers shared by the multi-process benchmarks (wire_bench, balance_bench).
// Their child processes are testing::ChildProcess (testing/subprocess.h, the
// library dmoe_subprocess): SIGKILLed when the bench dies, logs in files.
#ifndef DMOE_BENCH_BENCH_UTIL_H_
#define DMOE_BENCH_BENCH_UTIL_H_

#include <filesystem>
#include <string>
#include <system_error>

namespace dmoe::bench {

// The directory of this binary (build/bin), where the service binaries are.
inline std::string BinDir() {
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? "build/bin" : exe.parent_path().string();
}

}  // namespace dmoe::bench

#endif  // DMOE_BENCH_BENCH_UTIL_H_
