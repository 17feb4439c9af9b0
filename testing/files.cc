#include "testing/files.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"

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

std::string FreshDir(const std::string& suffix) {
  const char* base = std::getenv("DMOE_TEST_TMP");
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info != nullptr ? std::string(info->test_suite_name()) +
                                           "." + info->name()
                                     : std::string("no_test");
  name += "." + suffix;
  for (char& c : name) {
    if (c == '/') c = '_';
  }
  const std::filesystem::path dir =
      std::filesystem::path(base != nullptr && *base ? base
                                                     : ::testing::TempDir()) /
      "dmoe_tests" / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

std::string SourceDir() {
  if (const char* d = std::getenv("DMOE_SOURCE_DIR"); d != nullptr && *d)
    return d;
  return DMOE_TESTING_SOURCE_DIR;  // set by testing/CMakeLists.txt
}

}  // namespace dmoe::testing
