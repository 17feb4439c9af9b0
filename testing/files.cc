#include "testing/files.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace dmoe::testing {

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  return out.good();
}

std::string SourceDir() {
  if (const char* d = std::getenv("DMOE_SOURCE_DIR"); d != nullptr && *d) return d;
  return DMOE_TESTING_SOURCE_DIR;  // set by testing/CMakeLists.txt
}

}  // namespace dmoe::testing
