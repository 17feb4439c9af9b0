#include "common/args.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace dmoe::common {

Args::Args(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

Args Args::ForProgram(std::string program, std::string summary) {
  Args a(std::move(program), std::move(summary));
  a.program_ = true;
  return a;
}

bool Args::HelpAsked(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") return true;
  }
  return false;
}

Args& Args::Flag(const std::string& name, const std::string& value_name, const std::string& help,
                 std::optional<std::string> def, bool required) {
  order_.push_back(name);
  specs_[name] = Spec{value_name, help, std::move(def), required};
  return *this;
}

absl::Status Args::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      help_ = true;
      std::fputs(Usage().c_str(), stdout);
      return absl::OkStatus();
    }
    if (a.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(command_, ": unexpected argument '", a, "' (flags start with --)"));
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    auto it = specs_.find(name);
    if (it == specs_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(command_, ": unknown flag --", name, " (see --help)"));
    }
    if (it->second.value_name.empty()) {
      if (has_value && value != "true" && value != "false" && value != "1" && value != "0") {
        return absl::InvalidArgumentError(
            absl::StrCat(command_, ": --", name, " is a switch and takes no value"));
      }
      values_[name] = has_value ? value : "true";
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) {
        return absl::InvalidArgumentError(
            absl::StrCat(command_, ": --", name, " needs a value (", it->second.value_name, ")"));
      }
      value = argv[++i];
    }
    values_[name] = value;
  }
  for (const auto& name : order_) {
    if (specs_[name].required && !values_.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(command_, ": --", name, " is required (see --help)"));
    }
  }
  return absl::OkStatus();
}

std::string Args::Usage() const {
  std::string s = absl::StrCat("usage: ", program_ ? "" : "dmoe ", command_, " [flags]\n  ",
                               summary_, "\n\nflags:\n");
  for (const auto& name : order_) {
    const Spec& sp = specs_.at(name);
    std::string left = absl::StrCat("  --", name);
    if (!sp.value_name.empty()) absl::StrAppend(&left, " ", sp.value_name);
    if (left.size() < 30) left.resize(30, ' ');
    absl::StrAppend(&s, left, " ", sp.help);
    if (sp.required) absl::StrAppend(&s, " (required)");
    if (sp.def) absl::StrAppend(&s, " [default: ", *sp.def, "]");
    absl::StrAppend(&s, "\n");
  }
  absl::StrAppend(&s, "  --help                       show this help\n");
  return s;
}

bool Args::Has(const std::string& name) const { return values_.count(name) > 0; }

std::string Args::Str(const std::string& name) const {
  if (auto it = values_.find(name); it != values_.end()) return it->second;
  auto sp = specs_.find(name);
  if (sp != specs_.end() && sp->second.def) return *sp->second.def;
  return "";
}

absl::StatusOr<int64_t> Args::Int(const std::string& name) const {
  const std::string v = Str(name);
  int64_t out;
  if (!absl::SimpleAtoi(v, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat(command_, ": --", name, " must be an integer, got '", v, "'"));
  }
  return out;
}

absl::StatusOr<double> Args::Double(const std::string& name) const {
  const std::string v = Str(name);
  double out;
  if (!absl::SimpleAtod(v, &out)) {
    return absl::InvalidArgumentError(
        absl::StrCat(command_, ": --", name, " must be a number, got '", v, "'"));
  }
  return out;
}

bool Args::Bool(const std::string& name) const {
  const std::string v = Str(name);
  return v == "true" || v == "1";
}

absl::StatusOr<std::vector<int64_t>> Args::IntList(const std::string& name) const {
  const std::string v = Str(name);
  std::vector<int64_t> out;
  if (v.empty()) return out;
  for (absl::string_view part : absl::StrSplit(v, ',')) {
    int64_t x;
    if (!absl::SimpleAtoi(part, &x)) {
      return absl::InvalidArgumentError(absl::StrCat(command_, ": --", name,
                                                     " must be comma-separated integers, got '",
                                                     std::string(part), "'"));
    }
    out.push_back(x);
  }
  return out;
}

absl::StatusOr<int64_t> Args::IntIn(const std::string& name, int64_t lo, int64_t hi,
                                    std::string_view prefix) const {
  absl::StatusOr<int64_t> v = Int(name);
  if (!v.ok()) return v.status();
  if (*v < lo || *v > hi) {
    return absl::InvalidArgumentError(absl::StrCat(absl::string_view(prefix.data(), prefix.size()),
                                                   ": --", name, " must be in [", lo, ", ", hi,
                                                   "], got ", *v));
  }
  return *v;
}

}  // namespace dmoe::common
