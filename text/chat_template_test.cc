#include "text/chat_template.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::text {
namespace {

using json = nlohmann::ordered_json;
using ::testing::HasSubstr;

// DeepSeek-V3's chat_template, verbatim from its tokenizer_config.json.
const char* const kDeepSeekV3 =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt "
    "= fals"
    "e %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, "
    "is_output_fi"
    "rst=true, system_prompt='', is_first_sp=true) %}{%- for message in "
    "messages %}{%"
    "- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set "
    "ns.system_prom"
    "pt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = "
    "false %}{%-"
    " else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + "
    "message['content']"
    " %}{%- endif %}{%- endif %}{%- endfor "
    "%}{{bos_token}}{{ns.system_prompt}}{%- for"
    " message in messages %}{%- if message['role'] == 'user' %}{%- set "
    "ns.is_tool = f"
    "alse -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if "
    "message['role'] =="
    " 'assistant' and message['content'] is none %}{%- set ns.is_tool = false "
    "-%}{%- "
    "for tool in message['tool_calls']%}{%- if not ns.is_first "
    "%}{{'<｜Assistant｜><｜to"
    "ol▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' "
    "+ tool['fun"
    "ction']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] "
    "+ '\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else "
    "%}{{'\n' "
    "+ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name"
    "'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + "
    "'```' + '<"
    "｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- "
    "endif %}{%- en"
    "dfor %}{%- endif %}{%- if message['role'] == 'assistant' and "
    "message['content'] "
    "is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + "
    "message['content'] "
    "+ '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else "
    "%}{{'<｜Assistant"
    "｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- "
    "endif %}{%- if"
    " message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if "
    "ns.is_output_fi"
    "rst %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜"
    "tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else "
    "%}{{'\n<｜tool▁"
    "output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- "
    "endif %}{%- en"
    "dif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% "
    "endif %}{% i"
    "f add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% "
    "endif %}";

// DeepSeek-V2-Chat's template (the "User: ... Assistant:" format).
const char* const kDeepSeekV2 =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt "
    "= false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == "
    "'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == "
    "'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif "
    "message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

std::string Render(const std::string& tmpl, const json& context = json::object()) {
  auto t = ChatTemplate::Parse(tmpl);
  if (!t.ok()) return "PARSE ERROR: " + std::string(t.status().message());
  auto out = (*t)->Render(context);
  if (!out.ok()) return "RENDER ERROR: " + std::string(out.status().message());
  return *out;
}

json Chat(bool add_generation_prompt) {
  return {{"messages", json::array({{{"role", "system"}, {"content", "You are helpful."}},
                                    {{"role", "user"}, {"content", "Hi"}},
                                    {{"role", "assistant"}, {"content", "Hello!"}},
                                    {{"role", "user"}, {"content", "2+2?"}}})},
          {"add_generation_prompt", add_generation_prompt},
          {"bos_token", "<｜begin▁of▁sentence｜>"},
          {"eos_token", "<｜end▁of▁sentence｜>"}};
}

TEST(ChatTemplate, DeepSeekV3Conversation) {
  EXPECT_EQ(Render(kDeepSeekV3, Chat(true)),
            "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi<｜Assistant｜>Hello!"
            "<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>");
  EXPECT_EQ(Render(kDeepSeekV3, Chat(false)),
            "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi<｜Assistant｜>Hello!"
            "<｜end▁of▁sentence｜><｜User｜>2+2?");
}

TEST(ChatTemplate, DeepSeekV3ToolCallsAndOutputs) {
  json c = Chat(true);
  c["messages"] = json::array(
      {{{"role", "user"}, {"content", "Weather?"}},
       {{"role", "assistant"},
        {"content", nullptr},
        {"tool_calls",
         json::array({{{"type", "function"},
                       {"function", {{"name", "get"}, {"arguments", "{\"c\": 1}"}}}}})}},
       {{"role", "tool"}, {"content", "sunny"}},
       {{"role", "tool"}, {"content", "warm"}}});
  EXPECT_EQ(Render(kDeepSeekV3, c),
            "<｜begin▁of▁sentence｜><｜User｜>Weather?<｜Assistant｜><"
            "｜tool▁calls▁begin｜>"
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\n{\"c\": "
            "1}\n```<｜tool▁call▁end｜>"
            "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<"
            "｜tool▁output▁end｜>"
            "\n<｜tool▁output▁begin｜>warm<｜tool▁output▁end｜><"
            "｜tool▁outputs▁end｜>");
}

TEST(ChatTemplate, DeepSeekV2Conversation) {
  EXPECT_EQ(Render(kDeepSeekV2, Chat(true)),
            "<｜begin▁of▁sentence｜>You are helpful.\n\nUser: Hi\n\nAssistant: Hello!"
            "<｜end▁of▁sentence｜>User: 2+2?\n\nAssistant:");
}

TEST(ChatTemplate, ReasoningTemplateDropsThinking) {
  // The DeepSeek-R1 idiom: only what follows </think> of earlier answers is
  // kept.
  const std::string r1 =
      "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set content "
      "= m['content'] %}"
      "{% if '</think>' in content %}{% set content = "
      "content.split('</think>')[-1] %}{% endif %}"
      "{{ '<A>' + content }}{% else %}{{ '<U>' + m.content }}{% endif %}{% "
      "endfor %}"
      "{% if add_generation_prompt %}{{ '<A><think>\\n' }}{% endif %}";
  json c = {{"messages",
             json::array({{{"role", "user"}, {"content", "q"}},
                          {{"role", "assistant"}, {"content", "<think>x</think>\n\nanswer"}}})},
            {"add_generation_prompt", true}};
  EXPECT_EQ(Render(r1, c), "<U>q<A>\n\nanswer<A><think>\n");
}

TEST(ChatTemplate, WhitespaceControlAsTransformersConfiguresJinja) {
  // trim_blocks: the newline after a block tag goes; lstrip_blocks: indentation
  // before a block tag goes; one trailing newline of the template goes.
  EXPECT_EQ(Render("{% if true %}\n  a\n{% endif %}\n"), "  a\n");
  EXPECT_EQ(Render("x\n  {% if true %}y{% endif %}"), "x\ny");
  EXPECT_EQ(Render("x  {% if true %}y{% endif %}"),
            "x  y");  // not at a line start
  EXPECT_EQ(Render("x\n  {%+ if true %}y{% endif %}"), "x\n  y");
  EXPECT_EQ(Render("a {%- if true -%} b {%- endif %}"), "ab");
  EXPECT_EQ(Render("{{ 'x' }}\ny\n"), "x\ny");
  EXPECT_EQ(Render("a {{- 'x' -}}\n b"), "axb");
  EXPECT_EQ(Render("a{# note #}\nb {#- x -#} c"), "abc");
  EXPECT_EQ(Render("a\r\nb"), "a\nb");
}

TEST(ChatTemplate, LoopScopesAndNamespaces) {
  EXPECT_EQ(Render("{% set c = 0 %}{% for i in range(3) %}{% set c = c + 1 "
                   "%}{{ c }}{% endfor %}{{ c }}"),
            "1110");
  EXPECT_EQ(Render("{% set ns = namespace(c=0) %}{% for i in range(3) %}{% set "
                   "ns.c = ns.c + 1 %}"
                   "{{ ns.c }}{% endfor %}{{ ns.c }}"),
            "1233");
  EXPECT_EQ(Render("{% for x in xs %}{{ loop.index }}{% if not loop.last %},{% "
                   "endif %}{% endfor %}",
                   {{"xs", {"a", "b", "c"}}}),
            "1,2,3");
  EXPECT_EQ(Render("{% for x in xs if x != 'b' %}{{ loop.index0 }}{{ x }}{% "
                   "else %}none{% endfor %}",
                   {{"xs", {"a", "b", "c"}}}),
            "0a1c");
  EXPECT_EQ(Render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(Render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}",
                   {{"d", {{"b", 1}, {"a", 2}}}}),
            "b=1;a=2;");
  EXPECT_EQ(Render("{% for i in range(5) %}{% if i == 1 %}{% continue %}{% "
                   "endif %}{% if i == 3 %}"
                   "{% break %}{% endif %}{{ i }}{% endfor %}"),
            "02");
  EXPECT_EQ(Render("{% set x %}a{{ 1 + 1 }}{% endset %}[{{ x }}]"), "[a2]");
}

TEST(ChatTemplate, TestsAndUndefined) {
  json c = {{"y", nullptr}, {"m", {{"content", nullptr}}}};
  EXPECT_EQ(Render("{{ x is defined }} {{ y is none }} {{ not x is defined }} "
                   "{{ y is not none }}",
                   c),
            "False True True False");
  EXPECT_EQ(Render("{{ m['content'] is none }} {{ m['tool_calls'] is defined "
                   "}}[{{ x }}]",
                   c),
            "True False[]");
  EXPECT_EQ(Render("{% for t in m['tool_calls'] %}x{% endfor %}ok", c), "ok");
  EXPECT_EQ(Render("{{ 3 is odd }} {{ 'a' is string }} {{ m is mapping }} {{ 1 "
                   "is eq 1 }}",
                   c),
            "True True True True");
  EXPECT_EQ(Render("{{ x | default('d') }} {{ '' | default('e', true) }}", c), "d e");
}

TEST(ChatTemplate, ValuesPrintAsPython) {
  EXPECT_EQ(Render("{{ none }}|{{ true }}|{{ [1, 'a'] }}|{{ {'k': 1.5} }}|{{ "
                   "1e20 }}|{{ 3 / 2 }}|"
                   "{{ 7 // 2 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 2 ** 10 }}|{{ "
                   "0.1 + 0.2 }}|{{ 1.0 }}"),
            "None|True|[1, 'a']|{'k': "
            "1.5}|1e+20|1.5|3|-4|2|1024|0.30000000000000004|1.0");
  EXPECT_EQ(Render("{{ 'a' ~ 1 ~ none }}|{{ 'ab' * 2 }}|{{ [1] + [2] }}|{{ 'x' "
                   "if false }}|"
                   "{{ 'y' if 0 else 'z' }}"),
            "a1None|abab|[1, 2]||z");
}

TEST(ChatTemplate, StringsMethodsAndFilters) {
  EXPECT_EQ(Render("{{ 'a</think>b'.split('</think>')[-1] }}|{{ '  x  '.strip() }}|{{ "
                   "'héllo'[1:3] }}|"
                   "{{ 'abc'[::-1] }}|{{ 'héllo' | length }}|{{ 'Ab'.lower() }}{{ 'Ab' "
                   "| upper }}|"
                   "{{ 'a b'.startswith('a') }}|{{ ' t ' | trim }}|{{ ['a', 'b'] | "
                   "join('-') }}|"
                   "{{ [3, 4] | first }}{{ [3, 4] | last }}|{{ 'a\\tb\\u00e9\\x41' }}"),
            "b|x|él|cba|5|abAB|True|t|a-b|34|a\tbéA");
  EXPECT_EQ(Render("{{ d.get('k', 'none') }}{{ d.get('z', 'dflt') }}{{ d | length }}",
                   {{"d", {{"k", "v"}}}}),
            "vdflt1");
}

TEST(ChatTemplate, ToJsonIsTransformersJsonDumps) {
  EXPECT_EQ(Render("{{ {'name': 'f', 'args': [1, 2.0, none, true, 'é\"\\n']} | "
                   "tojson }}"),
            "{\"name\": \"f\", \"args\": [1, 2.0, null, true, \"é\\\"\\n\"]}");
  EXPECT_EQ(Render("{{ t | tojson(indent=2) }}", {{"t", {{"a", json::array({1})}}}}),
            "{\n  \"a\": [\n    1\n  ]\n}");
}

TEST(ChatTemplate, UnsupportedConstructsAreErrorsWithPositions) {
  EXPECT_EQ(Render("{{ x|foo }}"),
            "RENDER ERROR: chat template line 1 col 5: unsupported filter 'foo'");
  EXPECT_EQ(Render("a\nb {{ x is sorted }}"),
            "RENDER ERROR: chat template line 2 col 8: unsupported test 'sorted'");
  EXPECT_EQ(Render("{% macro f() %}x{% endmacro %}"),
            "PARSE ERROR: chat template line 1 col 1: unsupported tag 'macro'");
  EXPECT_EQ(Render("{% include 'x' %}"),
            "PARSE ERROR: chat template line 1 col 1: unsupported tag 'include'");
  EXPECT_EQ(Render("{% if x %}"), "PARSE ERROR: chat template line 1 col 11: missing {% endif %}");
  EXPECT_EQ(Render("{% endfor %}"),
            "PARSE ERROR: chat template line 1 col 1: unexpected {% endfor %}");
  EXPECT_EQ(Render("{% break %}"),
            "PARSE ERROR: chat template line 1 col 1: 'break' outside a for loop");
  EXPECT_EQ(Render("{{ 'a'.zfill(3) }}"),
            "RENDER ERROR: chat template line 1 col 13: unsupported method "
            "'zfill' of a string");
  EXPECT_EQ(Render("{{ cycler() }}"),
            "RENDER ERROR: chat template line 1 col 10: unsupported function "
            "'cycler'");
  EXPECT_EQ(Render("{{ x.y }}"),
            "RENDER ERROR: chat template line 1 col 5: 'x' is undefined "
            "(attribute 'y')");
  EXPECT_EQ(Render("{{ 'a' + x }}"),
            "RENDER ERROR: chat template line 1 col 4: 'x' is undefined "
            "(operand of '+')");
  EXPECT_EQ(Render("{{ 'a' }"), "PARSE ERROR: chat template line 1 col 9: missing '}}'");
  EXPECT_EQ(Render("{% if m['role'] not in ['user'] %}{{ raise_exception('bad "
                   "role ' + m['role']) }}{% endif %}",
                   {{"m", {{"role", "robot"}}}}),
            "RENDER ERROR: chat template raised: bad role robot");
}

TEST(ChatTemplate, HostileTemplatesAreErrorsNotCrashes) {
  EXPECT_THAT(Render("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"),
              HasSubstr("nests too deep"));
  EXPECT_THAT(Render("{{ " + std::string(5000, '-') + "1 }}"), HasSubstr("nests too deep"));
  EXPECT_THAT(Render([] {
                std::string t;
                for (int i = 0; i < 1000; ++i) t += "{% if true %}";
                return t;
              }()),
              HasSubstr("too deep"));
  EXPECT_THAT(Render("{% set ns = namespace(a=1) %}{% set ns.self = ns %}{{ ns "
                     "| tojson }}"),
              HasSubstr("not JSON serializable"));
}

// A template that builds strings or lists geometrically gets an error naming
// the limit, not an exhausted memory (chat_template_fuzz found chained
// split/join with a long separator reaching gigabytes).
TEST(ChatTemplate, GeometricGrowthHitsALimitNotTheMemory) {
  const std::string sep(1000, ',');
  // Each join multiplies the length by ~1000.
  EXPECT_THAT(Render("{{ 'a,b,c,d,e,f,g,h'.split(',') | join('" + sep + "') | list | join('" + sep +
                     "') | list | join('" + sep + "') }}"),
              HasSubstr("over the limit of"));
  EXPECT_THAT(Render("{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
              HasSubstr("a string of 33554432 bytes is over the limit of 16777216 bytes"));
  EXPECT_THAT(Render("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}"
                     "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}"),
              HasSubstr("a list of 2097152 items is over the limit of 1048576 items"));
  EXPECT_THAT(Render("{{ ('x' * 1000000).replace('x', '" + sep + "') }}"),
              HasSubstr("over the limit of 16777216 bytes"));
  EXPECT_THAT(Render("{% for i in range(100) %}{{ 'y' * 1000000 }}{% endfor %}"),
              HasSubstr("the rendered text reached"));
  // Below the limits nothing changes.
  EXPECT_EQ(Render("{{ ('x' * 1000) | length }}|{{ 'a,b'.split(',') | join('-') }}"), "1000|a-b");
}

TEST(ChatTemplate, OutOfRangeLiteralsAreParseErrorsNotAborts) {
  // std::stod threw std::out_of_range on 1e999 and terminated the process.
  EXPECT_EQ(Render("{{ 1e999 }}"),
            "PARSE ERROR: chat template line 1 col 4: float literal '1e999' "
            "is beyond the range of a double");
  EXPECT_THAT(Render("{{ 1.5e+99999999999999999999 }}"),
              HasSubstr("col 4: float literal '1.5e+99999999999999999999' is "
                        "beyond the range of a double"));
  // An exponent of INT64_MAX: lead digit + exponent overflowed int64 (UBSan,
  // found by chat_template_fuzz).
  EXPECT_THAT(Render("{{ 5e9223372036854775807 }}|{{ 55.5e009223372036854775807 }}"),
              HasSubstr("col 4: float literal '5e9223372036854775807' is beyond the range"));
  EXPECT_EQ(Render("{{ 0.5e-9223372036854775807 }}"), "0.0");
  EXPECT_THAT(Render("{{ " + std::string(400, '9') + ".0 }}"),
              HasSubstr("float literal '9999999999999999999999999999999999999"
                        "999...' (402 characters) is beyond"));
  // Below the range is 0.0, as in Python.
  EXPECT_EQ(Render("{{ 1e-999 }}|{{ 0.00001e-99999999999999999999 }}|{{ "
                   "4e-320 > 0 }}"),
            "0.0|0.0|True");
  // Python's ints are unbounded, ours are int64: a clear error beyond.
  EXPECT_EQ(Render("{{ 99999999999999999999 }}"),
            "PARSE ERROR: chat template line 1 col 4: integer literal "
            "'99999999999999999999' is too large (at most "
            "9223372036854775807)");
  EXPECT_EQ(Render("{{ 9223372036854775807 }}|{{ 1_000 }}"), "9223372036854775807|1000");
}

TEST(ChatTemplate, IntArithmeticIsExactOrAnErrorNeverOverflows) {
  // Each of these overflowed int64 (undefined behaviour, UBSan) or cast an
  // out-of-range double to int64 before.
  EXPECT_EQ(Render("{{ 2 ** 64 }}"),
            "RENDER ERROR: chat template line 1 col 4: integer overflow: 2 ** "
            "64 is beyond the 64-bit range");
  EXPECT_THAT(Render("{{ 9223372036854775807 + 1 }}"),
              HasSubstr("integer overflow: 9223372036854775807 + 1 is beyond "
                        "the 64-bit range"));
  EXPECT_THAT(Render("{{ -9223372036854775807 - 2 }}"),
              HasSubstr("integer overflow: -9223372036854775807 - 2"));
  EXPECT_THAT(Render("{{ 3037000500 * 3037000500 }}"),
              HasSubstr("integer overflow: 3037000500 * 3037000500"));
  EXPECT_THAT(Render("{{ 3 ** 40 }}"), HasSubstr("integer overflow: 3 ** 40"));
  EXPECT_THAT(Render("{{ (-9223372036854775807 - 1) // -1 }}"),
              HasSubstr("integer overflow: -9223372036854775808 // -1"));
  EXPECT_THAT(Render("{{ -(-9223372036854775807 - 1) }}"),
              HasSubstr("integer overflow: -(-9223372036854775808) is beyond "
                        "the 64-bit range"));
  EXPECT_THAT(Render("{{ 0 ** -1 }}"), HasSubstr("0 cannot be raised to a negative power"));
  EXPECT_THAT(Render("{{ 1 // 0 }}"), HasSubstr("division by zero"));
  // Exact where the result fits, also beyond 2^53 (no trip through double).
  EXPECT_EQ(Render("{{ 9223372036854775807 - 1 }}|{{ 9007199254740993 + 0 }}|"
                   "{{ 2 ** 62 }}|{{ (-2) ** 63 }}|{{ (-1) ** "
                   "9223372036854775807 }}|{{ 0 ** 0 }}|{{ 2 ** -1 }}"),
            "9223372036854775806|9007199254740993|4611686018427387904|"
            "-9223372036854775808|-1|1|0.5");
  EXPECT_EQ(Render("{{ (-9223372036854775807 - 1) % -1 }}|{{ -7 // 2 }}|{{ "
                   "-7 % 3 }}|{{ 7 % -3 }}|{{ true + true }}|{{ 7 / 2 }}"),
            "0|-4|2|-2|2|3.5");
}

TEST(ChatTemplate, FloatArithmeticIsPythons) {
  // 1e300 was cast to int64 (undefined behaviour) before the sum was taken.
  EXPECT_EQ(Render("{{ 1e300 + 1 }}|{{ 1 + 0.5 }}|{{ 1e300 * 1e300 }}|{{ -1e300 "
                   "* 1e300 }}|{{ 2 ** 0.5 }}|{{ 7.5 // 2 }}|{{ -7.5 % 2 }}"),
            "1e+300|1.5|inf|-inf|1.4142135623730951|3.0|0.5");
  // Where Python raises.
  EXPECT_EQ(Render("{{ 10.0 ** 400 }}"),
            "RENDER ERROR: chat template line 1 col 4: float overflow: 10.0 ** "
            "400.0");
  EXPECT_THAT(Render("{{ 0.0 ** -1 }}"), HasSubstr("0.0 cannot be raised to a negative power"));
  EXPECT_THAT(Render("{{ (-8.0) ** 0.5 }}"), HasSubstr("-8.0 ** 0.5 is complex (unsupported)"));
  EXPECT_THAT(Render("{{ 1.0 % 0 }}"), HasSubstr("division by zero"));
}

TEST(ChatTemplate, ComparisonsAreExactAndNaNIsUnordered) {
  // Equal cast 2^63 (9223372036854775807 as a double) to int64 before.
  EXPECT_EQ(Render("{{ 9223372036854775807 == 9223372036854775807 }}|{{ "
                   "9223372036854775807 > 9223372036854775806 }}|{{ "
                   "9007199254740993 == 9007199254740992.0 }}|{{ "
                   "9007199254740993 > 9007199254740992.0 }}|{{ 1e300 > "
                   "9223372036854775807 }}|{{ 1 == 1.0 }}|{{ true == 1 }}|{{ "
                   "2.5 > 2 }}|{{ -2.5 < -2 }}"),
            "True|True|False|True|True|True|True|True|True");
  EXPECT_EQ(Render("{% set n = 'nan' | float %}{{ n == n }}|{{ n < 1 }}|{{ n "
                   ">= 1 }}|{{ n != n }}|{{ n == 1 }}"),
            "False|False|False|True|False");
}

TEST(ChatTemplate, IntAndFloatFiltersAreJinjasNeverAnOverflowingCast) {
  // The int filter cast any float to int64 (undefined beyond its range).
  EXPECT_EQ(Render("{{ 1e300 | int }}"),
            "RENDER ERROR: chat template line 1 col 10: int: 1e+300 is beyond "
            "the 64-bit integer range");
  EXPECT_THAT(Render("{{ (1e300 * 1e300) | int }}"),
              HasSubstr("int: inf is beyond the 64-bit integer range"));
  EXPECT_THAT(Render("{{ 9223372036854775807.0 | int }}"),
              HasSubstr("int: 9.223372036854776e+18 is beyond"));
  EXPECT_THAT(Render("{{ '1e300' | int }}"), HasSubstr("int: 1e+300 is beyond"));
  EXPECT_THAT(Render("{{ '99999999999999999999' | int }}"),
              HasSubstr("int: '99999999999999999999' is beyond the 64-bit "
                        "integer range"));
  EXPECT_EQ(Render("{{ 42.9 | int }}|{{ -42.9 | int }}|{{ '42' | int }}|{{ ' "
                   "-7 ' | int }}|{{ '42.5' | int }}|{{ 'abc' | int }}|{{ "
                   "'abc' | int(5) }}|{{ none | int }}|{{ true | int }}|{{ "
                   "'nan' | int }}|{{ '+3' | int }}|{{ '+-3' | int }}|{{ "
                   "'42abc' | int }}|{{ (-9223372036854775808.0) | int }}"),
            "42|-42|42|-7|42|0|5|0|1|0|3|0|0|-9223372036854775808");
  // float: Python's float(), the default when it fails.
  EXPECT_EQ(Render("{{ '1e999' | float }}|{{ ' 2.5 ' | float }}|{{ 'x' | "
                   "float }}|{{ '1.5x' | float }}|{{ '-inf' | float }}|{{ "
                   "'1e-999' | float }}|{{ 3 | float }}|{{ 'x' | float(1.5) "
                   "}}|{{ '+-1' | float }}"),
            "inf|2.5|0.0|0.0|-inf|0.0|3.0|1.5|0.0");
}

TEST(ChatTemplate, HugeCountsAreBoundedNotOverflowed) {
  // k += step overflowed int64 in range() and slicing.
  EXPECT_EQ(Render("{{ range(9223372036854775806, 9223372036854775807, 5) | list }}"),
            "[9223372036854775806]");
  EXPECT_EQ(Render("{{ [1, 2, 3][2::9223372036854775807] }}|{{ 'abc'[1::"
                   "9223372036854775807] }}"),
            "[3]|b");
  // An empty string repeated 2^63 - 1 times is empty, at once.
  EXPECT_EQ(Render("[{{ '' * 9223372036854775807 }}]"), "[]");
  // indent * depth overflowed int and asked for gigabytes.
  EXPECT_THAT(Render("{{ [[1]] | tojson(indent=2147483647) }}"),
              HasSubstr("tojson: indent 2147483647 is too large (at most "
                        "1024)"));
  // Above int64 a JSON number is the nearest double, not a wrapped negative.
  EXPECT_EQ(
      Render("{{ n }}|{{ m }}", {{"n", 18446744073709551615ULL}, {"m", 9223372036854775807ULL}}),
      "1.8446744073709552e+19|9223372036854775807");
}

TEST(ChatTemplate, MutatedTemplatesNeverCrash) {
  // Random edits of the V3 template: each either parses and renders or fails
  // with a status; run under ASan this is a small fuzzer.
  const std::string base = kDeepSeekV3;
  const std::string alphabet = "{}%#-+'\"()[]|.:,=!<>~ \nabcnsot01";
  uint32_t seed = 12345;
  auto next = [&seed] {
    seed = seed * 1664525u + 1013904223u;
    return seed >> 8;
  };
  int rendered = 0;
  for (int k = 0; k < 3000; ++k) {
    std::string t = base;
    for (int edits = 1 + next() % 4; edits > 0; --edits) {
      const size_t at = next() % (t.size() + 1);
      switch (next() % 3) {
        case 0:
          t.insert(at, 1, alphabet[next() % alphabet.size()]);
          break;
        case 1:
          if (at < t.size()) t.erase(at, 1);
          break;
        default:
          if (at < t.size()) t[at] = alphabet[next() % alphabet.size()];
      }
    }
    auto parsed = ChatTemplate::Parse(t);
    if (!parsed.ok()) continue;
    rendered += (*parsed)->Render(Chat(true)).ok();
  }
  EXPECT_GT(rendered, 0);
}

}  // namespace
}  // namespace dmoe::text
