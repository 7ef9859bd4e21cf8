// eagle_runner: greedy EAGLE-3 speculative decoding (eagle_loop.h) over the methods of one .pte made
// by export/export_eagle.py, on ExecuTorch's runtime with the CUDA backend and libet_int4.so linked in.
//
//   eagle_runner --model_path out/eagle.pte --data_path out/aoti_cuda_blob.ptd --prompt "1 2 3"
//
// The methods share the target's weights and KV cache (the CUDA backend's option
// weight_sharing_across_methods, on by default here). Prints one report per prompt
// (runtime/eagle_runner.py parses it), flushed. It loads only the methods its --mode runs: prefill
// and --decode_method (greedy), or prefill, target_verify and draft_decode (speculative).
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/core/exec_aten/util/scalar_type_util.h>
#include <executorch/runtime/platform/runtime.h>
#include <gflags/gflags.h>

#include "eagle_loop.h"

DEFINE_string(model_path, "", "The .pte of export/export_eagle.py.");
DEFINE_string(data_path, "", "Its weights (.ptd), when they are kept outside the .pte.");
DEFINE_string(prompt, "", "Prompt token ids, separated by spaces or commas.");
DEFINE_string(prompts_file, "", "A file with one prompt per line (token ids), instead of --prompt.");
DEFINE_int64(max_new_tokens, 64, "Stop after this many generated tokens.");
DEFINE_int64(eos_id, -1, "Stop after this token (-1: none).");
DEFINE_string(mode, "speculative",
              "speculative: draft_decode + target_verify; greedy: the target alone, one token per "
              "--decode_method forward (the lossless reference).");
DEFINE_string(decode_method, "target_verify",
              "The target method of greedy mode; its row 0 gives the next token. target_verify "
              "(chain_len + 1 tokens) is the reference for losslessness; a method over 1 token "
              "(target_decode, which export_eagle.py --target-decode adds) is plain decoding.");
DEFINE_string(forced_accept, "",
              "Tests and benchmarks: speculation k proposes the first forced_accept[k mod n] tokens of "
              "the reference and then a wrong one (0: a draft that is always wrong). Needs "
              "--reference_file, each line as long as the forced drafts read (the runner says so).");
DEFINE_string(reference_file, "",
              "The reference continuation of each prompt, one line per prompt (e.g. the tokens of a "
              "greedy run).");
DEFINE_int64(repeat, 1, "Run every prompt this many times, at least 1 (later runs are warm, e.g. CUDA graphs).");
// --cuda_graph_methods, --shared_cuda_stream and --share_weights_across_methods come from
// tools/runner/cuda_backend_flags.cpp.
DECLARE_bool(share_weights_across_methods);

namespace {

namespace eagle = et_int4::eagle;
using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;

constexpr char kPrefill[] = "prefill";
constexpr char kVerify[] = "target_verify";
constexpr char kDraft[] = "draft_decode";

void check(executorch::runtime::Error error, const std::string& what) {
  if (error != executorch::runtime::Error::Ok) {
    throw std::runtime_error(what + " failed: ExecuTorch error " + std::to_string(static_cast<int>(error)) + " (" +
                             executorch::runtime::to_string(error) + "); its log above says more");
  }
}

template <typename T>
T check(executorch::runtime::Result<T> result, const std::string& what) {
  check(result.error(), what);
  return std::move(result.get());
}

// Output 0 of every method: the greedy token of each row, argmax computed on the GPU inside the
// program, so that neither the logits nor a scan of them cross to the host (int64, which
// ExecuTorchMethods::read_shape checks; -1 where the row's logits hold a NaN).
std::vector<int64_t> tokens_of(const executorch::aten::Tensor& tokens, const char* method) {
  const auto* data = tokens.const_data_ptr<int64_t>();
  for (size_t row = 0; row < static_cast<size_t>(tokens.numel()); ++row) {
    if (data[row] < 0) {
      throw std::runtime_error(std::string(method) + ": the logits of row " + std::to_string(row) + " hold NaN");
    }
  }
  return {data, data + tokens.numel()};
}

// The methods a mode runs, which are the only ones it loads: prefill and the decode method
// (greedy), or prefill, target_verify and draft_decode (speculative).
std::vector<std::string> methods_of(bool speculative, const std::string& decode_method) {
  return speculative ? std::vector<std::string>{kPrefill, kVerify, kDraft}
                     : std::vector<std::string>{kPrefill, decode_method};
}

std::vector<uint8_t> bytes_of(const executorch::aten::Tensor& t) {
  const auto* data = t.const_data_ptr<uint8_t>();
  return {data, data + t.nbytes()};
}

executorch::runtime::TensorInfo tensor_meta(Module& module, const char* method, size_t index, bool input) {
  auto meta = check(module.method_meta(method), std::string("method_meta(") + method + ")");
  return check(input ? meta.input_tensor_meta(index) : meta.output_tensor_meta(index),
               std::string(method) + (input ? " input " : " output ") + std::to_string(index));
}

// The program's methods through ExecuTorch's Module: inputs are host tensors over this object's
// buffers, outputs host tensors the loop copies what it keeps from.
class ExecuTorchMethods : public eagle::Methods {
 public:
  ExecuTorchMethods(Module& module, std::string decode_method)
      : module_(module), decode_method_(std::move(decode_method)) {}

  // The program's shape from its constant methods and method_meta (which needs no method loaded);
  // the decode method's window in greedy mode, target_verify's and draft_decode's in speculative.
  eagle::Shape read_shape(bool speculative) {
    eagle::Shape shape;
    shape.chain_len = constant("get_chain_len");
    shape.max_seq_len = constant("get_max_seq_len");
    shape.min_prefill_len = constant("get_min_prefill_len");
    shape.vocab_size = constant("get_vocab_size");
    for (const auto& method : methods_of(speculative, decode_method_)) {
      const auto type = tensor_meta(module_, method.c_str(), 0, false).scalar_type();
      if (type != ScalarType::Long) {
        throw std::runtime_error(method + " returns " + executorch::runtime::toString(type) +
                                 " first, not the int64 greedy tokens of each row: the program predates them; "
                                 "re-export it with export/export_eagle.py");
      }
    }
    if (!speculative) {
      shape.decode_window = tensor_meta(module_, decode_method_.c_str(), 0, true).sizes()[1];
      return shape;
    }
    const auto verify_tokens = tensor_meta(module_, kVerify, 0, true).sizes()[1];
    if (verify_tokens != shape.chain_len + 1) {
      throw std::runtime_error("target_verify takes " + std::to_string(verify_tokens) + " tokens, but get_chain_len + 1 is " +
                               std::to_string(shape.chain_len + 1) + ": the program is inconsistent; re-export it");
    }
    target_hidden_.resize(tensor_meta(module_, kDraft, 2, true).nbytes());
    draft_hidden_.resize(tensor_meta(module_, kDraft, 3, true).nbytes());
    hidden_type_ = tensor_meta(module_, kDraft, 2, true).scalar_type();
    const auto taps = tensor_meta(module_, kPrefill, 1, false);
    if (taps.sizes()[2] * executorch::runtime::elementSize(taps.scalar_type()) != target_hidden_.size()) {
      throw std::runtime_error("prefill's taps rows and draft_decode's target_hidden differ in size: re-export");
    }
    return shape;
  }

  eagle::Forward prefill(const std::vector<int64_t>& tokens) override { return target(kPrefill, tokens, 0); }
  eagle::Forward verify(const std::vector<int64_t>& tokens, int64_t start) override {
    return target(kVerify, tokens, start);
  }
  eagle::Forward decode(const std::vector<int64_t>& tokens, int64_t start) override {
    return target(decode_method_.c_str(), tokens, start);
  }

  eagle::Forward draft(int64_t token, int64_t position, const std::vector<uint8_t>& features,
                       bool from_target) override {
    std::vector<uint8_t>& into = from_target ? target_hidden_ : draft_hidden_;
    if (features.size() != into.size()) {
      throw std::runtime_error("draft_decode's hidden input takes " + std::to_string(into.size()) + " bytes, got " +
                               std::to_string(features.size()));
    }
    into = features;
    int64_t token_data = token, position_data = position;
    bool from_target_data = from_target;
    const auto dims = [](size_t bytes, ScalarType type) {
      return static_cast<executorch::aten::SizesType>(bytes / executorch::runtime::elementSize(type));
    };
    std::vector<TensorPtr> inputs{
        executorch::extension::from_blob(&token_data, {1, 1}, ScalarType::Long),
        executorch::extension::from_blob(&position_data, {1}, ScalarType::Long),
        executorch::extension::from_blob(target_hidden_.data(), {1, 1, dims(target_hidden_.size(), hidden_type_)},
                                         hidden_type_),
        executorch::extension::from_blob(draft_hidden_.data(), {1, 1, dims(draft_hidden_.size(), hidden_type_)},
                                         hidden_type_),
        executorch::extension::from_blob(&from_target_data, {1}, ScalarType::Bool)};
    auto outputs = run(kDraft, inputs);
    return {tokens_of(outputs[0].toTensor(), kDraft), bytes_of(outputs[1].toTensor())};
  }

 private:
  int64_t constant(const char* method) {
    return check(module_.get(method), std::string("the constant method ") + method).toInt();
  }

  eagle::Forward target(const char* method, const std::vector<int64_t>& tokens, int64_t start) {
    std::vector<int64_t> token_data = tokens, positions(tokens.size());
    for (size_t i = 0; i < positions.size(); ++i) {
      positions[i] = start + static_cast<int64_t>(i);
    }
    const auto n = static_cast<executorch::aten::SizesType>(tokens.size());
    std::vector<TensorPtr> inputs{executorch::extension::from_blob(token_data.data(), {1, n}, ScalarType::Long),
                                  executorch::extension::from_blob(positions.data(), {n}, ScalarType::Long)};
    auto outputs = run(method, inputs);
    return {tokens_of(outputs[0].toTensor(), method), bytes_of(outputs[1].toTensor())};
  }

  std::vector<EValue> run(const char* method, const std::vector<TensorPtr>& inputs) {
    std::vector<EValue> values;
    for (const auto& input : inputs) {
      values.emplace_back(*input);
    }
    return check(module_.execute(method, values), std::string("executing ") + method);
  }

  Module& module_;
  std::string decode_method_;
  // draft_decode's hidden inputs: the one a step does not use keeps its last value.
  std::vector<uint8_t> target_hidden_, draft_hidden_;
  ScalarType hidden_type_ = ScalarType::BFloat16;
};

int run_prompts() {
  if (FLAGS_model_path.empty()) {
    throw std::invalid_argument("--model_path is required: the .pte of export/export_eagle.py");
  }
  if (!FLAGS_share_weights_across_methods) {
    throw std::invalid_argument("--share_weights_across_methods=false: the loop needs prefill, target_verify and "
                                "draft_decode to share the target's KV cache; leave it on");
  }
  if (FLAGS_mode != "speculative" && FLAGS_mode != "greedy") {
    throw std::invalid_argument("--mode " + FLAGS_mode + ": expected speculative or greedy");
  }
  if (FLAGS_prompt.empty() == FLAGS_prompts_file.empty()) {
    throw std::invalid_argument("give the prompt with exactly one of --prompt and --prompts_file");
  }
  eagle::Batch batch;
  batch.prompts = FLAGS_prompt.empty() ? eagle::read_token_lines(FLAGS_prompts_file, "prompts_file")
                                       : std::vector<std::vector<int64_t>>{eagle::parse_tokens(FLAGS_prompt)};
  if (!FLAGS_reference_file.empty()) {
    batch.references = eagle::read_token_lines(FLAGS_reference_file, "reference_file");
  }
  batch.repeat = FLAGS_repeat;
  eagle::Options options;
  options.mode = FLAGS_mode == "greedy" ? eagle::Mode::kGreedy : eagle::Mode::kSpeculative;
  options.max_new_tokens = FLAGS_max_new_tokens;
  options.eos_id = FLAGS_eos_id;
  options.forced_accept = eagle::parse_tokens(FLAGS_forced_accept);

  // Mapped, not read: the weights go to the GPU once, and a large .ptd need not fit in host memory twice.
  Module module(FLAGS_model_path,
                FLAGS_data_path.empty() ? std::vector<std::string>{} : std::vector<std::string>{FLAGS_data_path},
                Module::LoadMode::Mmap);
  const auto names = check(module.method_names(), "loading " + FLAGS_model_path);
  const bool speculative = options.mode == eagle::Mode::kSpeculative;
  // Only the methods this mode runs: less to load, and in ExecuTorch 1.4.1's CUDA backend a method
  // that both shares and adds weights leaves the cache entries of the ones it added dangling for the
  // methods loaded after it (bench/RESULTS.md). Our exports have no such method since prefill reads
  // the packed weights too; a program with one still runs here as long as its mode skips it.
  const std::vector<std::string> needed = methods_of(speculative, FLAGS_decode_method);
  for (const auto& name : needed) {
    if (!names.count(name)) {
      throw std::invalid_argument(FLAGS_model_path + " has no method " + name +
                                  ": export it with export/export_eagle.py (--target-decode adds target_decode), "
                                  "or name another --decode_method");
    }
  }
  ExecuTorchMethods methods(module, FLAGS_decode_method);
  const eagle::Shape shape = methods.read_shape(speculative);
  eagle::check_batch(shape, batch, options);  // before the weights go to the GPU
  for (const auto& name : needed) {
    check(module.load_method(name), "loading " + name);
  }
  std::cout << "eagle_runner: " << FLAGS_mode << ", chain_len " << shape.chain_len << ", max_seq_len "
            << shape.max_seq_len << ", min_prefill_len " << shape.min_prefill_len << ", vocab " << shape.vocab_size;
  if (!speculative) {
    std::cout << ", decode_method " << FLAGS_decode_method << " (" << shape.decode_window << " tokens)";
  }
  std::cout << ", loaded";
  for (const auto& name : needed) {
    std::cout << ' ' << name;
  }
  std::cout << std::endl;
  eagle::run_batch(methods, shape, batch, options, std::cout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  executorch::runtime::runtime_init();
  // On unless the command line says otherwise; the flag's validator sets the backend option.
  gflags::SetCommandLineOptionWithMode("share_weights_across_methods", "true", gflags::SET_FLAGS_DEFAULT);
  gflags::SetUsageMessage("Greedy EAGLE-3 speculative decoding over a .pte of export/export_eagle.py");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc > 1) {
    std::cerr << "error: unexpected argument " << argv[1] << "; see --help\n";
    return 2;
  }
  try {
    return run_prompts();
  } catch (const std::invalid_argument& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
}
