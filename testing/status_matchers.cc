#include "testing/status_matchers.h"

namespace dmoe::testing {
namespace internal_status {

bool StatusCheck::MatchAndExplain(const absl::Status& status,
                                  ::testing::MatchResultListener* listener) const {
  *listener << "whose status is " << status;
  if (status.code() != code_) return false;
  const std::string message(status.message());
  ::testing::StringMatchResultListener inner;
  if (!message_.MatchAndExplain(message, &inner)) {
    if (!inner.str().empty()) *listener << ", and the message " << inner.str();
    return false;
  }
  return true;
}

void StatusCheck::DescribeTo(std::ostream* os) const {
  *os << "has status code " << absl::StatusCodeToString(code_);
  if (code_ != absl::StatusCode::kOk) {
    *os << " and a message that ";
    message_.DescribeTo(os);
  }
}

void StatusCheck::DescribeNegationTo(std::ostream* os) const {
  *os << "does not have status code " << absl::StatusCodeToString(code_);
  if (code_ != absl::StatusCode::kOk) {
    *os << " or has a message that ";
    message_.DescribeNegationTo(os);
  }
}

}  // namespace internal_status

internal_status::StatusMatcher IsOk() {
  return internal_status::StatusMatcher(
      internal_status::StatusCheck(absl::StatusCode::kOk, ::testing::_));
}

internal_status::StatusMatcher StatusIs(absl::StatusCode code) {
  return internal_status::StatusMatcher(internal_status::StatusCheck(code, ::testing::_));
}

}  // namespace dmoe::testing
