// The W4A8 reference on the CPU: the C ABI's CPU entry point and the yardstick for the kernels.
#pragma once

#include <cstdint>

#include "backends/cuda/int4/int4_mm.h"

namespace et_int4::cpu {

// Same operands as et_int4::cuda::PlainMmArgs (tiled weights), host memory, bf16 as raw bits.
void plain_mm(const uint16_t* x, const uint8_t* qdata, const uint16_t* scale, const int8_t* zero,
              uint16_t* out, int64_t m, int64_t n, int64_t k, int64_t group_size, ZeroPoints zero_points);

}  // namespace et_int4::cpu
