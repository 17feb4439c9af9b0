#include "testing/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string_view>
#include <thread>

#include "testing/files.h"

namespace dmoe::testing {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<char*> Argv(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  return args;
}

// A new directory for one Run's stdin/stdout/stderr files.
std::string ScratchDir() {
  const char* base = std::getenv("DMOE_TEST_TMP");
  if (base == nullptr || !*base) base = std::getenv("TMPDIR");
  if (base == nullptr || !*base) base = "/tmp";
  std::error_code ec;
  std::filesystem::create_directories(base, ec);
  std::string templ = std::string(base) + "/dmoe_run.XXXXXX";
  return mkdtemp(templ.data()) != nullptr ? templ : "";
}

}  // namespace

std::string BinDir() {
  const char* d = std::getenv("DMOE_BIN_DIR");
  return d != nullptr && *d ? d : "build/bin";
}

ChildProcess::~ChildProcess() { Kill(SIGKILL); }

bool ChildProcess::Start(const std::vector<std::string>& argv, const std::string& log_path,
                         const std::vector<std::string>& env) {
  log_path_ = log_path;
  std::vector<char*> args = Argv(argv);  // before fork: no allocation after it
  // The child's environment: ours, with `env`'s names replaced or added.
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view entry(*e);
    const std::string_view name = entry.substr(0, entry.find('='));
    bool replaced = false;
    for (const std::string& o : env) replaced |= o.substr(0, o.find('=')) == name;
    if (!replaced) envp.push_back(*e);
  }
  for (const std::string& o : env) envp.push_back(const_cast<char*>(o.c_str()));
  envp.push_back(nullptr);
  const pid_t parent = getpid();
  pid_ = fork();
  if (pid_ < 0) return false;
  if (pid_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the test died before prctl
    const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execve(args[0], args.data(), envp.data());
    _exit(127);
  }
  return true;
}

void ChildProcess::Reaped(int status) const {
  pid_ = -1;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int ChildProcess::Kill(int sig, std::chrono::milliseconds wait) {
  if (pid_ <= 0) return exit_status_;
  ::kill(pid_, sig);  // pid_ > 0: never a process group
  return Wait(wait);
}

int ChildProcess::Wait(std::chrono::milliseconds wait) {
  if (pid_ <= 0) return exit_status_;
  const auto end = Clock::now() + wait;
  int status = 0;
  while (waitpid(pid_, &status, WNOHANG) != pid_) {
    if (Clock::now() > end) {
      ::kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  Reaped(status);
  return exit_status_;
}

bool ChildProcess::Running() const {
  if (pid_ <= 0) return false;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) != pid_) return true;
  Reaped(status);  // keep the status for Wait / Kill
  return false;
}

std::string ChildProcess::Log() const { return ReadFile(log_path_); }

int WaitForPortFile(const std::string& path, const ChildProcess& child,
                    std::chrono::milliseconds timeout) {
  const auto end = Clock::now() + timeout;
  while (Clock::now() < end) {
    std::ifstream in(path);
    int port = 0;
    if (in >> port && port > 0) return port;
    if (!child.Running()) return 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return 0;
}

std::string FindInPath(const std::string& name) {
  if (name.find('/') != std::string::npos) return access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    const std::string c = dir + "/" + name;
    if (!dir.empty() && access(c.c_str(), X_OK) == 0) return c;
  }
  return "";
}

RunResult RunCommand(const std::vector<std::string>& argv, const RunOptions& options) {
  RunResult r;
  const std::string dir = ScratchDir();
  if (dir.empty() || argv.empty()) return r;
  const std::string in = dir + "/in", out = dir + "/out", err = dir + "/err";
  if (!WriteFile(in, options.input)) return r;
  std::vector<char*> args = Argv(argv);
  const pid_t pid = fork();
  if (pid < 0) return r;
  if (pid == 0) {
    if (!options.cwd.empty() && chdir(options.cwd.c_str()) != 0) _exit(126);
    if (!freopen(in.c_str(), "r", stdin) || !freopen(out.c_str(), "w", stdout) ||
        !freopen(err.c_str(), "w", stderr)) {
      _exit(126);
    }
    execvp(args[0], args.data());
    _exit(127);
  }
  const auto end = Clock::now() + options.timeout;
  int status = 0;
  bool timed_out = false;
  while (waitpid(pid, &status, WNOHANG) != pid) {
    if (Clock::now() > end) {
      ::kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  r.code = !timed_out && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (timed_out) {
    r.err = "timed out after " + std::to_string(options.timeout.count()) + " s\n";
  }
  r.out = ReadFile(out);
  r.err += ReadFile(err);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return r;
}

}  // namespace dmoe::testing
