#pragma once  // see ../../aoti/common_shims_slim.h
#include <cuda_runtime.h>

#include <executorch/backends/aoti/common_shims_slim.h>

namespace executorch::backends::cuda {
struct StreamResult {
  bool ok() const { return true; }
  cudaStream_t get() const { return nullptr; }
};
inline StreamResult getCurrentCUDAStream(int) { return {}; }
}  // namespace executorch::backends::cuda
