// runtime/eagle/eagle_loop.cpp driven by a fake model on CPU, for tests/test_eagle_loop.py.
//
// The fake target keeps a KV cache of the tokens written at each position, and row p of a forward
// predicts hash(cache[0..p]) % vocab: a row that attends to a stale or garbage entry predicts
// something else, so a loop that mishandles the cache stops matching greedy decoding. The fake draft
// guesses the target's next token with a given accuracy, and checks that it gets the taps of the
// last accepted position (first step) or its own previous hidden state.
//
// Usage: eagle_loop_fake key=value ...  (keys: see main); prints eagle_loop's reports as
// eagle_runner does (run_batch). abort_after_calls=N aborts the process at the N-th method call,
// as a crashing runtime would.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/eagle/eagle_loop.h"

namespace {

using et_int4::eagle::Forward;

constexpr int64_t kEmpty = -1;

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return h * 0xff51afd7ed558ccdULL;
}

// A feature row: the position it belongs to and which model made it.
std::vector<uint8_t> feature(int64_t position, int64_t kind) {
  std::vector<uint8_t> bytes(2 * sizeof(int64_t));
  std::memcpy(bytes.data(), &position, sizeof position);
  std::memcpy(bytes.data() + sizeof position, &kind, sizeof kind);
  return bytes;
}

constexpr int64_t kTaps = 1, kHidden = 2;

class FakeMethods : public et_int4::eagle::Methods {
 public:
  FakeMethods(const et_int4::eagle::Shape& shape, double accuracy, uint64_t seed, int64_t abort_after_calls)
      : shape_(shape), accuracy_(accuracy), seed_(seed), abort_after_calls_(abort_after_calls),
        cache_(shape.max_seq_len, kEmpty) {}

  Forward prefill(const std::vector<int64_t>& tokens) override {
    // A new sequence: what an earlier prompt left in the cache must not be read.
    std::fill(cache_.begin(), cache_.end(), kEmpty);
    return target(tokens, 0);
  }
  Forward verify(const std::vector<int64_t>& tokens, int64_t start) override {
    if (static_cast<int64_t>(tokens.size()) != shape_.chain_len + 1) {
      throw std::runtime_error("verify got " + std::to_string(tokens.size()) + " tokens");
    }
    return target(tokens, start);
  }
  Forward decode(const std::vector<int64_t>& tokens, int64_t start) override {
    if (static_cast<int64_t>(tokens.size()) != shape_.decode_window) {
      throw std::runtime_error("decode got " + std::to_string(tokens.size()) + " tokens");
    }
    return target(tokens, start);
  }

  Forward draft(int64_t token, int64_t position, const std::vector<uint8_t>& features, bool from_target) override {
    count_call();
    if (features != feature(position - 1, from_target ? kTaps : kHidden)) {
      throw std::runtime_error("draft step at position " + std::to_string(position) + " got the features of another "
                               "position or model");
    }
    if (from_target) {
      draft_context_.assign(cache_.begin(), cache_.begin() + position);  // what the taps summarize
    }
    draft_context_.resize(position);
    draft_context_.push_back(token);
    const int64_t truth = predict(draft_context_, position);
    const bool right = static_cast<double>(mix(seed_, position * 31 + token) % 1000) < accuracy_ * 1000;
    return Forward{{right ? truth : (truth + 1 + token) % shape_.vocab_size}, feature(position, kHidden)};
  }

 private:
  void count_call() {
    if (++calls_ == abort_after_calls_) {
      std::abort();
    }
  }

  Forward target(const std::vector<int64_t>& tokens, int64_t start) {
    count_call();
    const int64_t end = start + static_cast<int64_t>(tokens.size());
    if (start < 0 || end > shape_.max_seq_len) {
      throw std::runtime_error("a forward at positions " + std::to_string(start) + ".." + std::to_string(end - 1) +
                               " overruns the KV cache of " + std::to_string(shape_.max_seq_len));
    }
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] < 0 || tokens[i] >= shape_.vocab_size) {
        throw std::runtime_error("token " + std::to_string(tokens[i]) + " outside the vocabulary");
      }
      cache_[start + i] = tokens[i];  // every row's KV entry is written before any row attends
    }
    Forward f;
    for (int64_t p = start; p < end; ++p) {
      f.argmax.push_back(predict(cache_, p));
      const auto row = feature(p, kTaps);
      f.features.insert(f.features.end(), row.begin(), row.end());
    }
    return f;
  }

  // The next token after the sequence's entries 0..position.
  int64_t predict(const std::vector<int64_t>& sequence, int64_t position) const {
    uint64_t h = seed_;
    for (int64_t p = 0; p <= position; ++p) {
      if (sequence[p] == kEmpty) {
        throw std::runtime_error("position " + std::to_string(position) + " attends to position " + std::to_string(p) +
                                 ", which no forward has written");
      }
      h = mix(h, static_cast<uint64_t>(sequence[p]));
    }
    return static_cast<int64_t>(h % static_cast<uint64_t>(shape_.vocab_size));
  }

  et_int4::eagle::Shape shape_;
  double accuracy_;
  uint64_t seed_;
  int64_t abort_after_calls_, calls_ = 0;
  std::vector<int64_t> cache_;
  std::vector<int64_t> draft_context_;
};

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args = {
      {"chain_len", "7"}, {"max_seq_len", "128"}, {"min_prefill_len", "9"}, {"vocab_size", "50"},
      {"decode_window", "0"},  // 0: chain_len + 1, as target_verify
      {"accuracy", "0.7"}, {"seed", "1"}, {"mode", "speculative"}, {"max_new_tokens", "64"}, {"eos_id", "-1"},
      {"prompt", "1 2 3"}, {"forced_accept", ""}, {"reference", ""},
      // as eagle_runner's flags: instead of prompt and reference, one line per prompt
      {"prompts_file", ""}, {"reference_file", ""}, {"repeat", "1"},
      {"abort_after_calls", "0"}};  // 0: never
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      const size_t eq = arg.find('=');
      if (eq == std::string::npos || !args.count(arg.substr(0, eq))) {
        throw std::invalid_argument("unknown argument '" + arg + "'");
      }
      args[arg.substr(0, eq)] = arg.substr(eq + 1);
    }
    et_int4::eagle::Shape shape;
    shape.chain_len = std::stoll(args["chain_len"]);
    shape.max_seq_len = std::stoll(args["max_seq_len"]);
    shape.min_prefill_len = std::stoll(args["min_prefill_len"]);
    shape.vocab_size = std::stoll(args["vocab_size"]);
    shape.decode_window = std::stoll(args["decode_window"]);
    if (shape.decode_window == 0) {
      shape.decode_window = shape.chain_len + 1;
    }
    et_int4::eagle::Options options;
    options.mode = args["mode"] == "greedy" ? et_int4::eagle::Mode::kGreedy : et_int4::eagle::Mode::kSpeculative;
    options.max_new_tokens = std::stoll(args["max_new_tokens"]);
    options.eos_id = std::stoll(args["eos_id"]);
    options.forced_accept = et_int4::eagle::parse_tokens(args["forced_accept"]);
    et_int4::eagle::Batch batch;
    batch.prompts = args["prompts_file"].empty()
                        ? std::vector<std::vector<int64_t>>{et_int4::eagle::parse_tokens(args["prompt"])}
                        : et_int4::eagle::read_token_lines(args["prompts_file"], "prompts_file");
    if (!args["reference_file"].empty()) {
      batch.references = et_int4::eagle::read_token_lines(args["reference_file"], "reference_file");
    } else if (!args["reference"].empty()) {
      batch.references = {et_int4::eagle::parse_tokens(args["reference"])};
    }
    batch.repeat = std::stoll(args["repeat"]);
    FakeMethods methods(shape, std::stod(args["accuracy"]), std::stoull(args["seed"]),
                        std::stoll(args["abort_after_calls"]));
    et_int4::eagle::run_batch(methods, shape, batch, options, std::cout);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
