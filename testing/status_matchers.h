// GoogleMock matchers for absl::Status and absl::StatusOr<T>.
//
// Contract:
//   IsOk()                      matches an OK Status, or a StatusOr holding a
//                               value.
//   StatusIs(code)              matches a status whose code is `code`, any
//                               message.
//   StatusIs(code, message)     also requires the message to match `message`:
//                               a string (equality) or any std::string matcher
//                               (HasSubstr, StartsWith, AllOf, ...).
// Each works on absl::Status and absl::StatusOr<T> alike, inside EXPECT_THAT /
// ASSERT_THAT and composed with other matchers. A mismatch prints the whole
// status (code and message), so `EXPECT_THAT(st, IsOk())` says as much as
// `EXPECT_TRUE(st.ok()) << st`.
#ifndef DMOE_TESTING_STATUS_MATCHERS_H_
#define DMOE_TESTING_STATUS_MATCHERS_H_

#include <ostream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"

namespace dmoe::testing {
namespace internal_status {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

// What every StatusIs / IsOk matcher checks, on the absl::Status itself.
class StatusCheck {
 public:
  StatusCheck(absl::StatusCode code, ::testing::Matcher<const std::string&> message)
      : code_(code), message_(std::move(message)) {}

  bool MatchAndExplain(const absl::Status& status, ::testing::MatchResultListener* listener) const;
  void DescribeTo(std::ostream* os) const;
  void DescribeNegationTo(std::ostream* os) const;

 private:
  absl::StatusCode code_;
  ::testing::Matcher<const std::string&> message_;
};

template <typename StatusType>
class MonoStatusMatcher : public ::testing::MatcherInterface<StatusType> {
 public:
  explicit MonoStatusMatcher(StatusCheck check) : check_(std::move(check)) {}
  bool MatchAndExplain(StatusType actual, ::testing::MatchResultListener* listener) const override {
    return check_.MatchAndExplain(GetStatus(actual), listener);
  }
  void DescribeTo(std::ostream* os) const override { check_.DescribeTo(os); }
  void DescribeNegationTo(std::ostream* os) const override { check_.DescribeNegationTo(os); }

 private:
  StatusCheck check_;
};

// Converts to a Matcher of absl::Status, absl::StatusOr<T> and references.
class StatusMatcher {
 public:
  explicit StatusMatcher(StatusCheck check) : check_(std::move(check)) {}
  template <typename StatusType>
  operator ::testing::Matcher<StatusType>() const {  // NOLINT: implicit
    return ::testing::Matcher<StatusType>(new MonoStatusMatcher<const StatusType&>(check_));
  }

 private:
  StatusCheck check_;
};

}  // namespace internal_status

internal_status::StatusMatcher IsOk();

internal_status::StatusMatcher StatusIs(absl::StatusCode code);

template <typename MessageMatcher>
internal_status::StatusMatcher StatusIs(absl::StatusCode code, MessageMatcher&& message) {
  return internal_status::StatusMatcher(internal_status::StatusCheck(
      code, ::testing::MatcherCast<const std::string&>(std::forward<MessageMatcher>(message))));
}

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_STATUS_MATCHERS_H_
