// Stand-in for ExecuTorch's header: only what int4_plain_mm.cuh names, so that its kernels compile
// outside an ExecuTorch build (bench/executorch_harness/README.md).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define ET_CHECK(cond) \
  do { if (!(cond)) { std::fprintf(stderr, "ET_CHECK failed: %s\n", #cond); std::abort(); } } while (0)
#define ET_CHECK_MSG(cond, ...) \
  do { if (!(cond)) { std::fprintf(stderr, __VA_ARGS__); std::abort(); } } while (0)

namespace executorch::backends::aoti {
namespace slim::c10 {
enum class ScalarType { Byte, Char, Half, BFloat16 };
}
// The harness never calls the host entry point; the kernels are launched directly.
struct Tensor {
  int64_t size(int) const { return 0; }
  int64_t dim() const { return 0; }
  slim::c10::ScalarType dtype() const { return slim::c10::ScalarType::Byte; }
  void* data_ptr() const { return nullptr; }
};
}  // namespace executorch::backends::aoti
