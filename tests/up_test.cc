// `dmoe up` and the expert server's stop signals with real binaries: a
// whole-cluster stop (Ctrl-C on `dmoe up`) is fast and clean, while a SIGTERM
// sent to one expert server keeps its graceful scale-in leave.
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "testing/files.h"
#include "testing/subprocess.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;
using testing::BinDir;
using testing::ChildProcess;
using testing::ReadFile;

bool HaveServices() {
  return std::filesystem::exists(BinDir() + "/dmoe-expert") &&
         std::filesystem::exists(BinDir() + "/dmoe-router") &&
         std::filesystem::exists(BinDir() + "/dmoe-gateway");
}

// Polls `child`'s log until it contains `text`; false on timeout or exit.
bool WaitForLog(const ChildProcess& child, const std::string& text, std::chrono::seconds timeout) {
  const auto end = Clock::now() + timeout;
  while (Clock::now() < end) {
    if (child.Log().find(text) != std::string::npos) return true;
    if (!child.Running()) return child.Log().find(text) != std::string::npos;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Before the fix the experts, started with --leave-timeout-s 10, waited out
// the leave for a controller that had already stopped: ~12 s.
TEST(Up, CtrlCStopsTheWholeClusterWithinSecondsAndExpertsDoNotLeave) {
  if (!HaveServices()) GTEST_SKIP() << "built without the services";
  const std::string work = testing::FreshDir("up");
  ChildProcess up;
  ASSERT_TRUE(
      up.Start({BinDir() + "/dmoe", "up", "--servers", "2", "--threads", "1", "--work-dir", work},
               work + "/up.log"));
  ASSERT_TRUE(WaitForLog(up, "dmoe is up", std::chrono::seconds(120))) << up.Log();

  const auto t0 = Clock::now();
  // 30 s: a slow stop fails the time check below rather than leaving orphans.
  const int code = up.Kill(SIGINT, std::chrono::seconds(30));
  const double stop_s = SecondsSince(t0);
  EXPECT_EQ(code, 0) << up.Log();
  EXPECT_LT(stop_s, 5.0) << up.Log();
  for (int i = 0; i < 2; ++i) {
    const std::string log = ReadFile(work + "/expert-" + std::to_string(i) + ".log");
    EXPECT_NE(log.find("stopped"), std::string::npos) << log;
    EXPECT_EQ(log.find("leaving"), std::string::npos) << log;
  }
}

class ExpertStop : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveServices()) GTEST_SKIP() << "built without the services";
    const std::string model = testing::MakeModel("tiny-v2lite");
    dir_ = testing::FreshDir("expert");
    // No controller polls this server: a SIGTERM leave would wait all 60 s.
    ASSERT_TRUE(expert_.Start({BinDir() + "/dmoe-expert", "--model", model, "--num-servers", "1",
                               "--server-index", "0", "--port", "0", "--port-file", dir_ + "/port",
                               "--metrics-port", "0", "--threads", "1", "--leave-timeout-s", "60"},
                              dir_ + "/expert.log"));
    ASSERT_GT(testing::WaitForPortFile(dir_ + "/port", expert_), 0) << expert_.Log();
  }

  std::string dir_;
  ChildProcess expert_;
};

TEST_F(ExpertStop, SigtermLeavesFirstAndSigintEndsTheLeave) {
  ::kill(expert_.pid(), SIGTERM);
  ASSERT_TRUE(WaitForLog(expert_, "leaving", std::chrono::seconds(10))) << expert_.Log();
  // Scale-in: still serving while it waits for the controller.
  std::this_thread::sleep_for(std::chrono::seconds(1));
  EXPECT_TRUE(expert_.Running()) << expert_.Log();

  const auto t0 = Clock::now();
  EXPECT_EQ(expert_.Kill(SIGINT, std::chrono::seconds(30)), 0) << expert_.Log();
  EXPECT_LT(SecondsSince(t0), 5.0) << expert_.Log();
  EXPECT_NE(expert_.Log().find("leave interrupted"), std::string::npos) << expert_.Log();
}

TEST_F(ExpertStop, SigintStopsWithoutLeaving) {
  const auto t0 = Clock::now();
  EXPECT_EQ(expert_.Kill(SIGINT, std::chrono::seconds(30)), 0) << expert_.Log();
  EXPECT_LT(SecondsSince(t0), 5.0) << expert_.Log();
  EXPECT_EQ(expert_.Log().find("leaving"), std::string::npos) << expert_.Log();
  EXPECT_NE(expert_.Log().find("stopped"), std::string::npos) << expert_.Log();
}

}  // namespace
}  // namespace dmoe
