// A small byte-level BPE tokenizer generated in code, so that a generated
// checkpoint talks text without a download (`dmoe make-model` writes it by
// default; see make_model.h).
//
// The tokenizer is what text::Tokenizer and Hugging Face `tokenizers` load
// (tokenizer.json + tokenizer_config.json, DeepSeek style):
//  - 256 byte tokens in GPT-2's byte-to-unicode alphabet, then the merges a
//    plain BPE training loop learns over an embedded English corpus (a few KB,
//    pre-tokenized like the GPT-2 regex), until the model's vocabulary is full
//    or the corpus has no pair left to merge; ties go to the smaller pair of
//    ids, so the result is byte-identical on every run and machine;
//  - two special added tokens, <｜begin▁of▁sentence｜> and
//    <｜end▁of▁sentence｜>, at the ids the caller gives (the checkpoint's
//    bos_token_id / eos_token_id); the other tokens take the remaining ids in
//    order from 0;
//  - pre-tokenizer ByteLevel (GPT-2 regex, no prefix space), decoder ByteLevel,
//    a TemplateProcessing post-processor adding BOS;
//  - tokenizer_config.json: bos/eos tokens, add_bos_token true, add_eos_token
//    false, model_max_length, and DeepSeek-V2-Chat's chat template
//    ("User: ...\n\nAssistant: ..." with BOS/EOS), which text/chat_template.h
//    renders.
// The tokenizer's ids stay below the model's vocabulary size; a large
// vocabulary (the full-size presets) is not filled (the corpus runs out of
// merges first), and ids past the tokenizer's decode to nothing in the gateway.
#ifndef DMOE_TOOLS_GENERATED_TOKENIZER_H_
#define DMOE_TOOLS_GENERATED_TOKENIZER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::tools {

struct GeneratedTokenizerOptions {
  int64_t vocab_size = 0;  // the model's; the tokenizer's ids stay below it
  int64_t bos_id = 0;
  int64_t eos_id = 1;
  int64_t model_max_length = 4096;  // tokenizer_config.json's model_max_length
};

struct GeneratedTokenizer {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
  int64_t size = 0;    // largest id + 1
  int64_t merges = 0;  // merges learned
};

// The special tokens (DeepSeek's spelling, with U+FF5C and U+2581).
inline constexpr std::string_view kGeneratedBosToken =
    "<\xEF\xBD\x9C"
    "begin\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>";
inline constexpr std::string_view kGeneratedEosToken =
    "<\xEF\xBD\x9C"
    "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>";

// Generates the two files (see the header comment). Deterministic: the same
// options give byte-identical files. InvalidArgument when vocab_size < 258 (the
// bytes and the two special tokens must fit), when bos_id or eos_id is outside
// [0, vocab_size) or when they are equal.
absl::StatusOr<GeneratedTokenizer> GenerateTokenizer(const GeneratedTokenizerOptions& options);

namespace internal {
// The embedded training corpus (ASCII English).
std::string_view TrainingCorpus();
// The corpus split as the GPT-2 regex splits ASCII text ('s|'t|'re|'ve|'m|'ll|
// 'd| ?letters| ?digits| ?other|spaces not before a word|spaces).
std::vector<std::string_view> PreTokenize(std::string_view text);
}  // namespace internal

}  // namespace dmoe::tools

#endif  // DMOE_TOOLS_GENERATED_TOKENIZER_H_
