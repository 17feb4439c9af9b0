#include "gateway/text_output.h"

#include <string>
#include <vector>

#include "gateway/testing/tokenizer_fixture.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::gateway {
namespace {

using ::testing::ElementsAre;

// Pushes `ids`, then finishes; returns every returned piece (the last is Finish's).
std::vector<std::string> PushAll(TextOutput& out, const std::vector<int32_t>& ids) {
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(out.Push(id));
  pieces.push_back(out.Finish());
  return pieces;
}

class TextOutputTest : public ::testing::Test {
 protected:
  std::unique_ptr<text::Tokenizer> tok_ = testing::TestTokenizer();
};

TEST_F(TextOutputTest, CharactersSplitAcrossTokensComeOutWhole) {
  ASSERT_NE(tok_, nullptr);
  TextOutput out(*tok_, {}, /*skip_special_tokens=*/true);
  EXPECT_THAT(PushAll(out, {500, 501, 502, 503, 504}), ElementsAre("", "你!", "", "😀", "w504", ""));
  EXPECT_EQ(out.text(), "你!😀w504");
  EXPECT_FALSE(out.stopped());
}

TEST_F(TextOutputTest, SpecialTokensAreSkippedOrKept) {
  TextOutput skip(*tok_, {}, true);
  EXPECT_THAT(PushAll(skip, {1000, 'a', 1003, 1001}),
              ElementsAre("", "a", "<|assistant|>", "", ""));
  TextOutput keep(*tok_, {}, false);
  PushAll(keep, {1000, 'a', 1001});
  EXPECT_EQ(keep.text(), "<s>a</s>");
}

TEST_F(TextOutputTest, UnknownIdsDecodeToNothingAndAnUnfinishedCharacterIsReplaced) {
  TextOutput out(*tok_, {}, true);
  EXPECT_THAT(PushAll(out, {'x', 129000, 500}), ElementsAre("x", "", "", "\xEF\xBF\xBD"));
}

TEST_F(TextOutputTest, StopStringCutsTheTextAndNothingPastItIsReturned) {
  // "w300w301w302...": "1w30" starts at the last character of "w301".
  TextOutput out(*tok_, {"zzz", "1w30"}, true);
  EXPECT_EQ(out.Push(300), "w300");
  EXPECT_EQ(out.Push(301), "w30");  // "1" may start "1w30": held back
  EXPECT_EQ(out.Push(302), "");     // the match completes: nothing past "w30"
  EXPECT_TRUE(out.stopped());
  EXPECT_EQ(out.Push(303), "");
  EXPECT_EQ(out.Finish(), "");
  EXPECT_EQ(out.text(), "w300w30");
}

TEST_F(TextOutputTest, HeldBackTextIsReleasedWhenItCannotMatch) {
  TextOutput out(*tok_, {"1w9"}, true);
  EXPECT_THAT(PushAll(out, {300, 301, 302}), ElementsAre("w300", "w30", "1w302", ""));
  EXPECT_FALSE(out.stopped());
  TextOutput end(*tok_, {"1w"}, true);
  EXPECT_THAT(PushAll(end, {300, 301}), ElementsAre("w300", "w30", "1"));
}

TEST_F(TextOutputTest, StopStringAcrossAMultiByteCharacter) {
  TextOutput out(*tok_, {"你!"}, true);
  EXPECT_THAT(PushAll(out, {'a', 500, 501, 'b'}), ElementsAre("a", "", "", "", ""));
  EXPECT_TRUE(out.stopped());
  EXPECT_EQ(out.text(), "a");
}

}  // namespace
}  // namespace dmoe::gateway
