// FreshDir (testing/files.h) names its directory after the running GoogleTest
// test, so it lives apart from files.cc, which the benchmarks link without
// GoogleTest (dmoe_subprocess).
#include <cstdlib>
#include <filesystem>
#include <string>

#include "gtest/gtest.h"
#include "testing/files.h"

namespace dmoe::testing {

std::string FreshDir(const std::string& suffix) {
  const char* base = std::getenv("DMOE_TEST_TMP");
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info != nullptr ? std::string(info->test_suite_name()) + "." + info->name()
                                     : std::string("no_test");
  name += "." + suffix;
  for (char& c : name) {
    if (c == '/') c = '_';
  }
  const std::filesystem::path dir =
      std::filesystem::path(base != nullptr && *base ? base : ::testing::TempDir()) / "dmoe_tests" /
      name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

}  // namespace dmoe::testing
