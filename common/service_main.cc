#include "common/service_main.h"

#include <pthread.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"

// gperftools tcmalloc's C API; weak, so null where no tcmalloc is linked.
extern "C" int MallocExtension_SetNumericProperty(const char* property, size_t value)
    __attribute__((weak));

namespace dmoe::common {

size_t CapMallocThreadCaches() {
  constexpr size_t kCap = size_t{8} << 20;
  if (MallocExtension_SetNumericProperty == nullptr ||
      std::getenv("TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES") != nullptr) {
    return 0;
  }
  return MallocExtension_SetNumericProperty("tcmalloc.max_total_thread_cache_bytes", kCap) != 0
             ? kCap
             : 0;
}

sigset_t BlockStopSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

std::string AdvertiseAddress(const std::string& advertise, const std::string& host, int port) {
  if (!advertise.empty()) return advertise;
  std::string h = host;
  if (h == "0.0.0.0" || h == "::" || h == "[::]") {
    char name[256] = {};
    gethostname(name, sizeof name - 1);
    h = name;
  }
  return absl::StrCat(h, ":", port);
}

absl::Status WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!(out << port << "\n")) {
      return absl::InternalError(absl::StrCat("--port-file: cannot write '", tmp, "'"));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("--port-file: cannot rename '", tmp, "' to '", path, "': ", ec.message()));
  }
  return absl::OkStatus();
}

std::optional<int> ParseFlagsOrExit(Args& args, int argc, char** argv) {
  if (Args::HelpAsked(argc, argv, 1)) {
    std::fputs(args.Usage().c_str(), stdout);
    return 0;
  }
  if (absl::Status st = args.Parse(argc, argv, 1); !st.ok()) {
    std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
    return 2;
  }
  return std::nullopt;
}

}  // namespace dmoe::common
