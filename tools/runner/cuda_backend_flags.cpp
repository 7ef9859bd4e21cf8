// Command-line flags for the CUDA backend's runtime options, linked into the project's runners.
// ExecuTorch's executor_runner sets no backend option; gflags calls a flag's validator while main()
// parses the command line, which is after the backend registered itself (static initialization)
// and before any method is loaded, where the options take effect.
#include <cstdio>
#include <string>

#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <gflags/gflags.h>

namespace {

constexpr char kBackend[] = "CudaBackend";

template <size_t N, typename T>
bool set_backend_option(const char (&key)[N], T value) {
  executorch::runtime::BackendOptions<1> options;
  if (options.set_option(key, value) != executorch::runtime::Error::Ok ||
      executorch::runtime::set_option(kBackend, options.view()) !=
          executorch::runtime::Error::Ok) {
    std::fprintf(stderr, "error: %s rejected its option %s; is the runner built with the CUDA "
                 "backend (EXECUTORCH_BUILD_CUDA=ON)?\n", kBackend, key);
    return false;
  }
  return true;
}

bool cuda_graph_methods(const char*, const std::string& methods) {
  return methods.empty() || set_backend_option("enable_cuda_graph_for_method", methods.c_str());
}

bool shared_cuda_stream(const char*, bool on) {
  return !on || set_backend_option("use_shared_cuda_stream", true);
}

bool share_weights(const char*, bool on) {
  return !on || set_backend_option("weight_sharing_across_methods", true);
}

}  // namespace

DEFINE_string(cuda_graph_methods, "",
              "Comma-separated methods the CUDA backend runs as a CUDA graph (its option "
              "enable_cuda_graph_for_method): 3 runs to warm up, the 4th is captured, later "
              "runs replay it.");
DEFINE_validator(cuda_graph_methods, &cuda_graph_methods);
DEFINE_bool(shared_cuda_stream, false,
            "All methods run on one CUDA stream (option use_shared_cuda_stream) instead of a "
            "stream per method.");
DEFINE_validator(shared_cuda_stream, &shared_cuda_stream);
DEFINE_bool(share_weights_across_methods, false,
            "Methods share weights and mutable buffers (the KV cache) by name (option "
            "weight_sharing_across_methods).");
DEFINE_validator(share_weights_across_methods, &share_weights);
