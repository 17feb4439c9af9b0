#include "testing/prometheus.h"

#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>

#include "testing/subprocess.h"

namespace dmoe::testing {

std::string FindPrometheus() {
  if (const char* p = std::getenv("DMOE_PROMETHEUS"); p != nullptr && *p) {
    return access(p, X_OK) == 0 ? p : "";
  }
  if (access("/usr/bin/prometheus", X_OK) == 0) return "/usr/bin/prometheus";
  return FindInPath("prometheus");
}

std::string UrlEncode(const std::string& s) {
  std::string out;
  char buf[4];
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      std::snprintf(buf, sizeof buf, "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

}  // namespace dmoe::testing
