#include "eagle_loop.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <sstream>
#include <stdexcept>

namespace et_int4::eagle {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Calls fn() and appends its wall time to `times`.
template <typename Fn>
Forward timed(std::vector<double>& times, Fn&& fn) {
  const auto start = Clock::now();
  Forward result = fn();
  times.push_back(seconds_since(start));
  return result;
}

void expect_rows(const Forward& f, size_t rows, const char* method) {
  if (f.argmax.size() != rows) {
    throw std::runtime_error(std::string(method) + " returned " + std::to_string(f.argmax.size()) +
                             " rows, expected " + std::to_string(rows));
  }
}

// Appends `token` unless generation is over; returns whether it continues.
bool append(Generation& g, int64_t token, const Options& options) {
  g.tokens.push_back(token);
  if (token == options.eos_id) {
    g.stop = Stop::kEndToken;
    return false;
  }
  if (static_cast<int64_t>(g.tokens.size()) >= options.max_new_tokens) {
    g.stop = Stop::kMaxNewTokens;
    return false;
  }
  return true;
}

void check_prompt(const Shape& shape, const std::vector<int64_t>& prompt) {
  if (prompt.empty()) {
    throw std::invalid_argument("the prompt is empty: give at least one token id");
  }
  if (static_cast<int64_t>(prompt.size()) > shape.max_seq_len) {
    throw std::invalid_argument("the prompt has " + std::to_string(prompt.size()) +
                                " tokens, more than the program's max_seq_len " +
                                std::to_string(shape.max_seq_len));
  }
  for (int64_t token : prompt) {
    if (token < 0 || token >= shape.vocab_size) {
      throw std::invalid_argument("prompt token " + std::to_string(token) + " is outside the vocabulary [0, " +
                                  std::to_string(shape.vocab_size) + ")");
    }
  }
}

void check_options(const Shape& shape, size_t prompt_len, const Options& options) {
  if (options.max_new_tokens < 1) {
    throw std::invalid_argument("max_new_tokens must be at least 1, got " + std::to_string(options.max_new_tokens));
  }
  if (options.mode == Mode::kGreedy && shape.decode_window < 1) {
    throw std::invalid_argument("greedy decoding needs a decode method (a decode window of at least 1 token)");
  }
  for (int64_t a : options.forced_accept) {
    if (a < 0 || a > shape.chain_len) {
      throw std::invalid_argument("forced_accept " + std::to_string(a) + " must lie in 0..chain_len (" +
                                  std::to_string(shape.chain_len) + ")");
    }
  }
  if (!options.forced_accept.empty() && options.reference.empty()) {
    throw std::invalid_argument("forced_accept needs the reference continuation of the prompt");
  }
  const size_t needed = reference_tokens_needed(shape, prompt_len, options);
  if (options.reference.size() < needed) {
    throw std::invalid_argument(
        "the reference has " + std::to_string(options.reference.size()) + " tokens, but the forced drafts of " +
        std::to_string(options.max_new_tokens) + " new tokens read up to " + std::to_string(needed) +
        ": give a longer reference (e.g. a greedy run with max_new_tokens >= " + std::to_string(needed) + ")");
  }
}

// The draft proposal of step i (1-based) of speculation k, when the options force one: the
// reference token while i <= forced_accept[k], then one that differs from it.
int64_t forced_proposal(const Options& options, const Shape& shape, size_t speculation, size_t generated, int64_t i,
                        int64_t model_token) {
  if (options.forced_accept.empty()) {
    return model_token;
  }
  const int64_t accept = options.forced_accept[speculation % options.forced_accept.size()];
  if (i > accept + 1) {
    return model_token;
  }
  // t_{n+i}; check_options made sure that the reference reaches it.
  const int64_t truth = options.reference.at(generated + static_cast<size_t>(i));
  return i <= accept ? truth : (truth + 1) % shape.vocab_size;
}

// Prefill of the prompt padded to min_prefill_len; returns the forward of its last real row.
Forward run_prefill(Methods& methods, const Shape& shape, const std::vector<int64_t>& prompt, Generation& g) {
  std::vector<int64_t> padded = prompt;
  // Padding positions are overwritten before a later row attends to them (see the top of eagle_loop.h).
  padded.resize(std::max<size_t>(prompt.size(), static_cast<size_t>(shape.min_prefill_len)), prompt.back());
  g.prefill_len = static_cast<int64_t>(padded.size());
  Forward f = timed(g.prefill_s, [&] { return methods.prefill(padded); });
  expect_rows(f, padded.size(), "prefill");
  const size_t last = prompt.size() - 1;
  return Forward{{f.argmax[last]}, f.row(last)};
}

void greedy(Methods& methods, const Shape& shape, int64_t n, const Options& options, Generation& g) {
  for (;;) {
    if (n + shape.decode_window > shape.max_seq_len) {
      g.stop = Stop::kKvCacheFull;
      return;
    }
    // One real token; the rest of the window only fills the method's static shape.
    std::vector<int64_t> window(shape.decode_window, g.tokens.back());
    Forward f = timed(g.decode_s, [&] { return methods.decode(window, n); });
    expect_rows(f, window.size(), "decode");
    ++n;
    if (!append(g, f.argmax[0], options)) {
      return;
    }
  }
}

void speculative(Methods& methods, const Shape& shape, int64_t n, std::vector<uint8_t> taps, const Options& options,
                 Generation& g) {
  const int64_t c = shape.chain_len;
  for (size_t k = 0;; ++k) {
    if (n + c + 1 > shape.max_seq_len) {
      g.stop = Stop::kKvCacheFull;
      return;
    }
    const size_t generated = g.tokens.size() - 1;  // t_n is tokens[generated]
    std::vector<int64_t> window{g.tokens.back()};
    std::vector<uint8_t> features = taps;
    for (int64_t i = 1; i <= c; ++i) {
      Forward d = timed(g.draft_s, [&] { return methods.draft(window.back(), n + i - 1, features, i == 1); });
      expect_rows(d, 1, "draft_decode");
      window.push_back(forced_proposal(options, shape, k, generated, i, d.argmax[0]));
      features = std::move(d.features);
    }
    Forward v = timed(g.verify_s, [&] { return methods.verify(window, n); });
    expect_rows(v, window.size(), "target_verify");
    int64_t accepted = 0;
    while (accepted < c && window[accepted + 1] == v.argmax[accepted]) {
      ++accepted;
    }
    g.accepted.push_back(accepted);
    for (int64_t i = 1; i <= accepted + 1; ++i) {
      // The accepted drafts equal the target's argmax, so v.argmax[i - 1] is each new token.
      if (!append(g, v.argmax[i - 1], options)) {
        return;
      }
    }
    taps = v.row(accepted);
    n += accepted + 1;
  }
}

std::vector<int64_t> reference_of(const Batch& batch, size_t prompt) {
  return batch.references.empty() ? std::vector<int64_t>{} : batch.references[prompt];
}

const char* stop_name(Stop stop) {
  switch (stop) {
    case Stop::kMaxNewTokens: return "max_new_tokens";
    case Stop::kEndToken: return "end_token";
    case Stop::kKvCacheFull: return "kv_cache_full";
  }
  return "?";
}

// "calls, median ms, mean ms" of one method's call times.
std::string time_summary(std::vector<double> s) {
  if (s.empty()) {
    return "0 calls";
  }
  const double mean = std::accumulate(s.begin(), s.end(), 0.0) / s.size();
  std::nth_element(s.begin(), s.begin() + s.size() / 2, s.end());
  char text[96];
  std::snprintf(text, sizeof text, "%zu calls, median %.4f ms, mean %.4f ms", s.size(), s[s.size() / 2] * 1e3,
                mean * 1e3);
  return text;
}

}  // namespace

std::vector<uint8_t> Forward::row(size_t i) const {
  const size_t bytes = row_bytes();
  return {features.begin() + i * bytes, features.begin() + (i + 1) * bytes};
}

void Shape::check() const {
  if (chain_len < 1) {
    throw std::invalid_argument("get_chain_len is " + std::to_string(chain_len) + "; a chain needs at least 1 draft");
  }
  if (min_prefill_len < 1 || min_prefill_len > max_seq_len) {
    throw std::invalid_argument("get_min_prefill_len " + std::to_string(min_prefill_len) +
                                " must lie in 1..get_max_seq_len (" + std::to_string(max_seq_len) + ")");
  }
  if (chain_len + 1 > max_seq_len || decode_window < 0 || decode_window > max_seq_len) {
    throw std::invalid_argument("a verify window of chain_len + 1 = " + std::to_string(chain_len + 1) +
                                " or a decode window of " + std::to_string(decode_window) +
                                " does not fit max_seq_len " + std::to_string(max_seq_len));
  }
  if (vocab_size < 2) {
    throw std::invalid_argument("get_vocab_size is " + std::to_string(vocab_size) + "; expected a vocabulary of 2 or more");
  }
}

Generation generate(Methods& methods, const Shape& shape, const std::vector<int64_t>& prompt,
                    const Options& options) {
  shape.check();
  check_prompt(shape, prompt);
  check_options(shape, prompt.size(), options);
  Generation g;
  Forward first = run_prefill(methods, shape, prompt, g);
  const auto start = Clock::now();
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (append(g, first.argmax[0], options)) {
    if (options.mode == Mode::kGreedy) {
      greedy(methods, shape, n, options, g);
    } else {
      speculative(methods, shape, n, std::move(first.features), options, g);
    }
  }
  g.decode_seconds = seconds_since(start);
  return g;
}

size_t reference_tokens_needed(const Shape& shape, size_t prompt_len, const Options& options) {
  if (options.forced_accept.empty()) {
    return 0;
  }
  // A speculation starts with generated = n - prompt_len tokens after the first, only while
  // max_new_tokens is not reached and n + chain_len + 1 <= max_seq_len; its step i reads
  // reference[generated + i] for i <= min(forced + 1, chain_len) (see forced_proposal).
  const int64_t last_generated =
      std::min(options.max_new_tokens - 2, shape.max_seq_len - static_cast<int64_t>(prompt_len) - shape.chain_len - 1);
  if (last_generated < 0) {
    return 0;
  }
  const int64_t forced = *std::max_element(options.forced_accept.begin(), options.forced_accept.end());
  return static_cast<size_t>(last_generated + std::min(forced + 1, shape.chain_len) + 1);
}

void check_batch(const Shape& shape, const Batch& batch, Options options) {
  if (batch.prompts.empty()) {
    throw std::invalid_argument("no prompt given: the prompts file has no line of token ids");
  }
  if (batch.repeat < 1) {
    throw std::invalid_argument("repeat must be at least 1, got " + std::to_string(batch.repeat));
  }
  if (!batch.references.empty() && batch.references.size() != batch.prompts.size()) {
    throw std::invalid_argument("reference_file has " + std::to_string(batch.references.size()) +
                                " line(s) for " + std::to_string(batch.prompts.size()) +
                                " prompt(s): give one reference line per prompt");
  }
  if (!options.forced_accept.empty() && batch.references.empty()) {
    throw std::invalid_argument("forced_accept needs reference_file, one reference line per prompt");
  }
  shape.check();
  for (size_t p = 0; p < batch.prompts.size(); ++p) {
    try {
      check_prompt(shape, batch.prompts[p]);
      options.reference = reference_of(batch, p);
      check_options(shape, batch.prompts[p].size(), options);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("prompt " + std::to_string(p) + ": " + e.what());
    }
  }
}

void run_batch(Methods& methods, const Shape& shape, const Batch& batch, Options options, std::ostream& out) {
  check_batch(shape, batch, options);
  for (int64_t r = 0; r < batch.repeat; ++r) {
    for (size_t p = 0; p < batch.prompts.size(); ++p) {
      options.reference = reference_of(batch, p);
      const auto generation = generate(methods, shape, batch.prompts[p], options);
      print_report(out, generation, shape, p, static_cast<int>(r), batch.prompts[p].size());
      out.flush();
    }
  }
}

std::vector<std::vector<int64_t>> read_token_lines(const std::string& path, const char* flag) {
  std::ifstream in(path);
  if (!in) {
    throw std::invalid_argument(std::string("--") + flag + " " + path + " cannot be read");
  }
  std::vector<std::vector<int64_t>> lines;
  for (std::string line; std::getline(in, line);) {
    auto tokens = parse_tokens(line);
    if (!tokens.empty()) {
      lines.push_back(std::move(tokens));
    }
  }
  return lines;
}

std::vector<int64_t> parse_tokens(const std::string& text) {
  std::string spaced = text;
  std::replace(spaced.begin(), spaced.end(), ',', ' ');
  std::istringstream in(spaced);
  std::vector<int64_t> tokens;
  std::string word;
  while (in >> word) {
    size_t used = 0;
    int64_t value = -1;
    try {
      value = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != word.size() || value < 0) {
      throw std::invalid_argument("'" + word + "' is not a token id (a non-negative integer) in '" + text + "'");
    }
    tokens.push_back(value);
  }
  return tokens;
}

void print_report(std::ostream& out, const Generation& g, const Shape& shape, size_t prompt_index, int run,
                  size_t prompt_len) {
  out << "== prompt " << prompt_index << " run " << run << ": " << prompt_len << " tokens\ntokens:";
  for (int64_t t : g.tokens) {
    out << ' ' << t;
  }
  // The first token comes from prefill; the rate counts the tokens the decode loop made.
  const size_t decoded = g.tokens.size() - 1;
  char rate[128];
  std::snprintf(rate, sizeof rate, "%zu tokens in %.6f s, %.1f tokens/s", decoded, g.decode_seconds,
                g.decode_seconds > 0 ? decoded / g.decode_seconds : 0.0);
  out << "\nstop: " << stop_name(g.stop) << "\ndecode_rate: " << rate << "\nprefill: " << g.prefill_len
      << " tokens, " << time_summary(g.prefill_s) << '\n';
  if (!g.decode_s.empty()) {
    out << "decode: " << time_summary(g.decode_s) << '\n';
  }
  if (g.accepted.empty()) {
    return;
  }
  out << "verify: " << time_summary(g.verify_s) << "\ndraft: " << time_summary(g.draft_s) << '\n';
  const double mean = std::accumulate(g.accepted.begin(), g.accepted.end(), 0.0) / g.accepted.size();
  std::vector<int64_t> histogram(shape.chain_len + 1, 0);
  for (int64_t a : g.accepted) {
    ++histogram[a];
  }
  char line[96];
  std::snprintf(line, sizeof line, "mean %.3f of %lld drafts per verify", mean, static_cast<long long>(shape.chain_len));
  out << "accepted: " << line << "\nhistogram:";
  for (size_t a = 0; a < histogram.size(); ++a) {
    out << ' ' << a << ':' << histogram[a];
  }
  out << '\n';
}

}  // namespace et_int4::eagle
