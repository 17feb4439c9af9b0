// Child processes for tests that run the real binaries.
//
// Contract:
//   BinDir()          $DMOE_BIN_DIR (ctest sets it to build/bin), else
//                     "build/bin".
//   ChildProcess      one long-running child (a server):
//     Start(argv, log, env)  forks and execs argv[0] (a path; PATH is not
//                       searched) with stdout and stderr appended to `log`,
//                       in this process's environment plus `env`
//                       ("NAME=VALUE" entries, replacing NAME if set).
//                       The child is SIGKILLed when the test process dies
//                       (PR_SET_PDEATHSIG), so a crashed test leaves no server
//                       behind. False only when fork fails; a failed exec shows
//                       as exit status 127. One child per object.
//     Kill(sig, wait)   sends `sig`, then Wait(wait).
//     Wait(wait)        waits up to `wait` for the exit, then SIGKILLs. Returns
//                       the exit status; -1 when the child died of a signal or
//                       was never started. Later calls return the same value.
//     Running()         started and not yet exited.
//     Log()             the log file's contents so far.
//     The destructor SIGKILLs a child that is still running.
//   WaitForPortFile(path, child, timeout)
//                     the port number written to `path` (the services'
//                     --port-file); 0 on timeout or as soon as `child` exited.
//   FindInPath(name)  the executable `name` in $PATH (/usr/bin:/bin without
//                     it); a name with a '/' is taken as a path. "" when there
//                     is none or it is not executable.
//   RunCommand(argv, options)
//                     one short command to completion: argv[0] is looked up
//                     in PATH (execvp), stdin is options.input, stdout and
//                     stderr are captured whole. code: the exit status, -1
//                     when it could not start, died of a signal or ran past
//                     options.timeout (then SIGKILLed, and `err` begins with
//                     "timed out after N s").
#ifndef DMOE_TESTING_SUBPROCESS_H_
#define DMOE_TESTING_SUBPROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace dmoe::testing {

std::string BinDir();

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();

  bool Start(const std::vector<std::string>& argv, const std::string& log_path,
             const std::vector<std::string>& env = {});
  int Kill(int sig, std::chrono::milliseconds wait = std::chrono::seconds(20));
  int Wait(std::chrono::milliseconds wait);
  bool Running() const;
  pid_t pid() const { return pid_; }
  std::string Log() const;

 private:
  // Records how the child ended once waitpid has reaped it.
  void Reaped(int status) const;

  mutable pid_t pid_ = -1;
  mutable int exit_status_ = -1;
  std::string log_path_;
};

int WaitForPortFile(const std::string& path, const ChildProcess& child,
                    std::chrono::milliseconds timeout = std::chrono::seconds(60));

std::string FindInPath(const std::string& name);

struct RunOptions {
  std::string input{};               // stdin
  std::chrono::seconds timeout{60};  // then SIGKILL
  std::string cwd{};                 // "" = the test's
};

struct RunResult {
  int code = -1;  // exit status; -1: could not run, killed or timed out
  std::string out, err;
};

RunResult RunCommand(const std::vector<std::string>& argv, const RunOptions& options = {});

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_SUBPROCESS_H_
