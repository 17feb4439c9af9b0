// A small command-line parser for the dmoe CLI's subcommands and the service
// binaries.
//
// Accepts "--name value", "--name=value" and bare boolean "--name". Every flag
// must be declared; an unknown flag, a missing value or a value that does not
// parse is an error naming the flag. "--help" prints the generated usage.
#ifndef DMOE_COMMON_ARGS_H_
#define DMOE_COMMON_ARGS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::common {

class Args {
 public:
  // A subcommand of the dmoe CLI: Usage() says "usage: dmoe <command> [flags]".
  Args(std::string command, std::string summary);
  // A program of its own (dmoe-router, ...): Usage() says
  // "usage: <program> [flags]". Errors name the program either way.
  static Args ForProgram(std::string program, std::string summary);

  // Declares a flag. `value_name` empty = boolean switch. `def` empty = no default.
  Args& Flag(const std::string& name, const std::string& value_name, const std::string& help,
             std::optional<std::string> def = std::nullopt, bool required = false);

  // Parses argv[first..argc). Returns false with help_requested() when --help was
  // given (usage already printed to stdout).
  absl::Status Parse(int argc, char** argv, int first);
  bool help_requested() const { return help_; }
  // Whether --help or -h is anywhere in argv[first..argc), before any other
  // argument is checked (the services answer --help even with bad flags).
  static bool HelpAsked(int argc, char** argv, int first);
  std::string Usage() const;

  bool Has(const std::string& name) const;
  std::string Str(const std::string& name) const;
  absl::StatusOr<int64_t> Int(const std::string& name) const;
  // Int(name) within [lo, hi]; outside it InvalidArgument
  // "<prefix>: --<name> must be in [lo, hi], got v".
  absl::StatusOr<int64_t> IntIn(const std::string& name, int64_t lo, int64_t hi,
                                std::string_view prefix) const;
  absl::StatusOr<double> Double(const std::string& name) const;
  bool Bool(const std::string& name) const;
  // Comma-separated integers ("1,2,3").
  absl::StatusOr<std::vector<int64_t>> IntList(const std::string& name) const;

 private:
  struct Spec {
    std::string value_name, help;
    std::optional<std::string> def;
    bool required = false;
  };
  std::string command_, summary_;
  bool program_ = false;  // ForProgram
  std::vector<std::string> order_;
  std::map<std::string, Spec> specs_;
  std::map<std::string, std::string> values_;
  bool help_ = false;
};

}  // namespace dmoe::common

#endif  // DMOE_COMMON_ARGS_H_
