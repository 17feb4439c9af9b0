// Helpers shared by the multi-process benchmarks (wire_bench, balance_bench):
// child processes that die with the bench, and port-file discovery.
#ifndef DMOE_BENCH_BENCH_UTIL_H_
#define DMOE_BENCH_BENCH_UTIL_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace dmoe::bench {

// The directory of this binary (build/bin), where the service binaries are.
inline std::string BinDir() {
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? "build/bin" : exe.parent_path().string();
}

// A child process with stdout and stderr in a log file. It is SIGKILLed when
// the bench exits by any path (PR_SET_PDEATHSIG) and by the destructor.
class Child {
 public:
  using Clock = std::chrono::steady_clock;
  Child() = default;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() { Stop(SIGKILL, std::chrono::seconds(5)); }

  bool Start(const std::vector<std::string>& argv, const std::string& log) {
    log_ = log;
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ < 0) return false;
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);  // the bench died before prctl
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    return true;
  }

  // Sends `sig` (0 = none) and waits up to `wait` for the exit, then SIGKILLs.
  // Returns the exit status, -1 when killed by a signal or never started.
  int Stop(int sig, std::chrono::milliseconds wait) {
    if (pid_ <= 0) return -1;
    if (sig != 0) ::kill(pid_, sig);  // pid_ > 0: never a process group
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
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  bool Running() const { return pid_ > 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
  pid_t pid() const { return pid_; }
  std::string Log() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  pid_t pid_ = -1;
  std::string log_;
};

// The port number written to `path` (common/service_main.h WritePortFile); 0 on
// timeout or when `child` exited.
inline int WaitForPortFile(const std::string& path, const Child& child,
                           std::chrono::milliseconds timeout) {
  const auto end = Child::Clock::now() + timeout;
  while (Child::Clock::now() < end) {
    std::ifstream in(path);
    int port = 0;
    if (in >> port && port > 0) return port;
    if (!child.Running()) return 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return 0;
}

}  // namespace dmoe::bench

#endif  // DMOE_BENCH_BENCH_UTIL_H_
