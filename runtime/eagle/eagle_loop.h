// The greedy EAGLE-3 decoding loop over the three methods of export/export_eagle.py, independent of
// ExecuTorch: eagle_runner.cpp drives it with the methods of a .pte, tests/eagle_loop_fake.cpp with
// a fake model on CPU.
//
// Positions: the prompt fills 0..L-1; t_n is the newest token, the next one the target has not seen.
// One speculation: draft step i (1..chain_len) takes token t_n, then its own drafts, at position
// n + i - 1, with the target's taps at n - 1 (step 1) or the previous step's hidden state; then
// target_verify runs [t_n, d_1 .. d_c] at n..n+c, the longest prefix of drafts on which the target's
// argmax agrees is accepted, and the target's own next token follows. KV entries the target wrote
// for rejected drafts lie at or past the new n, so the next verify overwrites them before any row
// attends to them; prompt padding to min_prefill_len is handled the same way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace et_int4::eagle {

// One forward of a method: the argmax token of each row, and the feature rows a draft step takes
// next (the target's taps, or the draft's hidden state), as raw bytes in the program's dtype.
struct Forward {
  std::vector<int64_t> argmax;
  std::vector<uint8_t> features;  // argmax.size() rows of row_bytes

  size_t row_bytes() const { return argmax.empty() ? 0 : features.size() / argmax.size(); }
  std::vector<uint8_t> row(size_t i) const;
};

// The program's methods as the loop calls them; failures throw std::runtime_error.
class Methods {
 public:
  virtual ~Methods() = default;
  // `prefill`: tokens at positions 0..T-1 (min_prefill_len <= T <= max_seq_len).
  virtual Forward prefill(const std::vector<int64_t>& tokens) = 0;
  // `target_verify`: chain_len + 1 tokens at positions start...
  virtual Forward verify(const std::vector<int64_t>& tokens, int64_t start) = 0;
  // `draft_decode`: one token at `position`; `features` are the target's taps (from_target) or
  // the previous step's hidden state.
  virtual Forward draft(int64_t token, int64_t position, const std::vector<uint8_t>& features,
                        bool from_target) = 0;
  // Plain decoding: the target over decode_window tokens at positions start..; row 0 counts.
  virtual Forward decode(const std::vector<int64_t>& tokens, int64_t start) = 0;
};

// What the program's constant methods and shapes say.
struct Shape {
  int64_t chain_len = 0;
  int64_t max_seq_len = 0;
  int64_t min_prefill_len = 0;
  int64_t vocab_size = 0;
  // Tokens of one plain decoding forward (chain_len + 1 for target_verify); 0: no decode method
  // (speculative mode needs none).
  int64_t decode_window = 0;

  void check() const;  // throws std::invalid_argument naming what is inconsistent
};

enum class Mode { kSpeculative, kGreedy };

struct Options {
  Mode mode = Mode::kSpeculative;
  int64_t max_new_tokens = 64;
  int64_t eos_id = -1;  // none
  // For tests and benchmarks: speculation k proposes the first forced_accept[k % size] tokens of
  // `reference` (this prompt's continuation, e.g. from greedy mode) and then a wrong one, so that
  // exactly that many are accepted when the loop is lossless; 0 is a draft that is always wrong.
  // The draft model still runs. `reference` must reach as far as forced drafts can
  // (reference_tokens_needed); generate() refuses a shorter one.
  std::vector<int64_t> forced_accept;
  std::vector<int64_t> reference;
};

enum class Stop { kMaxNewTokens, kEndToken, kKvCacheFull };

struct Generation {
  std::vector<int64_t> tokens;    // generated, the first from prefill
  Stop stop = Stop::kMaxNewTokens;
  std::vector<int64_t> accepted;  // drafts accepted by each verify
  int64_t prefill_len = 0;        // the prompt padded to min_prefill_len
  double decode_seconds = 0;      // from the end of prefill to the last token
  // Wall time of each call, seconds.
  std::vector<double> prefill_s, verify_s, draft_s, decode_s;
};

Generation generate(Methods& methods, const Shape& shape, const std::vector<int64_t>& prompt,
                    const Options& options);

// How many tokens of `reference` the forced drafts of a prompt of prompt_len tokens can read: up to
// the last speculation that max_new_tokens and the KV cache allow (0 without forced_accept).
size_t reference_tokens_needed(const Shape& shape, size_t prompt_len, const Options& options);

// What one runner invocation generates: every prompt, `repeat` times.
struct Batch {
  std::vector<std::vector<int64_t>> prompts;
  // None, or one per prompt: its Options::reference (e.g. the tokens of a greedy run).
  std::vector<std::vector<int64_t>> references;
  int64_t repeat = 1;
};

// Throws std::invalid_argument, naming the prompt, for anything generate() would refuse in the batch.
void check_batch(const Shape& shape, const Batch& batch, Options options);

// check_batch (a bad last prompt fails before the first one runs), then generates every prompt with
// `options` (and its reference) and prints its report, flushed, so that a crash later keeps what
// was printed.
void run_batch(Methods& methods, const Shape& shape, const Batch& batch, Options options, std::ostream& out);

// The token ids of each non-blank line of the file that runner flag `flag` names.
std::vector<std::vector<int64_t>> read_token_lines(const std::string& path, const char* flag);

// Token ids separated by spaces or commas; throws std::invalid_argument on anything else.
std::vector<int64_t> parse_tokens(const std::string& text);

// The report that runtime/eagle_runner.py parses: a "== prompt P run R" header, "key: value" lines.
void print_report(std::ostream& out, const Generation& generation, const Shape& shape, size_t prompt_index,
                  int run, size_t prompt_len);

}  // namespace et_int4::eagle
