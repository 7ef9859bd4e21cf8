// Host interface of the W4A8 kernels, kept free of CUDA headers so the shim compiles as plain C++.
#pragma once

#include <cstddef>
#include <cstdint>

namespace et_int4::cuda {

struct PlainMmArgs {
  const void* x;          // bf16 [m, k], row-major
  const uint8_t* qdata;   // [n, k/2] nibbles, low = even k, 16-byte aligned
  const void* scale;      // bf16 [n, k/group_size]
  const int8_t* zero;     // [n, k/group_size], +8 domain
  void* out;              // bf16 [m, n]
  void* workspace;        // workspace_bytes(m, k) bytes, 16-byte aligned
  int64_t m, n, k, group_size;
};

// Bytes of device memory one call needs for the quantized activations.
size_t workspace_bytes(int64_t m, int64_t k);

// Quantizes the activations and runs the weight-stationary GEMM on `stream` (a cudaStream_t).
// Returns nullptr on success, else the CUDA error's description.
const char* launch_plain_mm(const PlainMmArgs& args, void* stream);

}  // namespace et_int4::cuda
