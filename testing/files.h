// Files for tests: whole-file reads and writes, and a fresh directory per test.
//
// Contract:
//   ReadFile(path)         the file's bytes, unchanged (binary); "" when it
//                          cannot be opened, so a missing file reads as empty
//                          (check std::filesystem::exists where that matters).
//   WriteFile(path, bytes) creates or truncates `path` and writes `bytes`;
//                          false when the file cannot be written. Parent
//                          directories are not created.
//   FreshDir(suffix)       an empty directory, created anew on every call
//                          (anything there before is removed), at
//                          $DMOE_TEST_TMP/dmoe_tests/<suite>.<test>.<suffix>
//                          ($DMOE_TEST_TMP is set by ctest; gtest's TempDir()
//                          without it). Named after the running test, so two
//                          tests never share one; call it from inside a test.
//   SourceDir()            the repository root: $DMOE_SOURCE_DIR, else the
//                          checkout this library was built from (an absolute
//                          path, whatever the working directory).
#ifndef DMOE_TESTING_FILES_H_
#define DMOE_TESTING_FILES_H_

#include <string>
#include <string_view>

namespace dmoe::testing {

std::string ReadFile(const std::string& path);

bool WriteFile(const std::string& path, std::string_view bytes);

std::string FreshDir(const std::string& suffix);

std::string SourceDir();

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_FILES_H_
