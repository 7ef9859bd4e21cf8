// Host interface of the W4A8 kernels, kept free of CUDA headers so the shim compiles as plain C++.
#pragma once

#include <cstddef>
#include <cstdint>

namespace et_int4 {

// The tiled weight layout (packing.py writes it and describes it too):
//   qdata [N / kTileRows, K / kBlockK * 512] uint8: per tile of 32 rows and block of 32 k, lane
//         l = 4g + t of a warp owns 16 bytes, the 32-bit words of rows g, g+8, g+16, g+24 that hold
//         k = 8t .. 8t+7 of the block (low nibble first, u = q + 8);
//   scale [N / kTileRows, K / group_size * 32] bf16 and zero (int8, +8 domain) likewise: per tile and
//         group, the values of rows g, g+8, g+16, g+24 at 4g .. 4g+3;
//   or zero [N / kTileRows, 32]: one zero point per row for all its groups, the same tiling with one group;
//   or zero [N / kTileRows, 1]: symmetric weights (torchao's default), every zero point 8; each entry is 8.
inline constexpr int kBlockK = 32;    // activation block: elements per scale d, one mma k step
inline constexpr int kTileRows = 32;  // weight rows per tile: two m16 mma tiles
inline constexpr int kTileBlockBytes = kTileRows * kBlockK / 2;
// What `zero` holds (the layout above), told apart by its shape.
enum class ZeroPoints { kPerGroup, kPerRow, kSymmetric };
inline constexpr int kSymmetricZero = 8;  // every zero point of symmetric weights, in the +8 domain

}  // namespace et_int4

namespace et_int4::cuda {

struct PlainMmArgs {
  const void* x;          // bf16 [m, k], row-major
  const uint8_t* qdata;   // tiled nibbles (above), 16-byte aligned
  const void* scale;      // tiled bf16, 8-byte aligned
  const int8_t* zero;     // tiled int8, 4-byte aligned, as zero_points says
  void* out;              // bf16 [m, n]
  void* workspace;        // workspace_bytes(m, n, k) bytes, 16-byte aligned
  int64_t m, n, k, group_size;
  ZeroPoints zero_points;
};

// Bytes of device memory one call needs: quantized activations and split-K partial sums.
size_t workspace_bytes(int64_t m, int64_t n, int64_t k);

// Quantizes the activations and runs the weight-stationary GEMM on `stream` (a cudaStream_t).
// Returns nullptr on success, else the CUDA error's description. The GEMM may read qdata, scale and
// zero while the kernel ahead of the call in the stream still runs: that kernel must not write them
// (exported weights are constants).
const char* launch_plain_mm(const PlainMmArgs& args, void* stream);

}  // namespace et_int4::cuda
