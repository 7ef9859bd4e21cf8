// et_int4: the C ABI that AOTInductor-generated code calls for torch.ops.et_int4.et_int4_plain_mm.
//
// AOTInductor names the C function after the op (`et_int4::et_int4_plain_mm` ->
// `aoti_torch_cuda_et_int4_plain_mm`); the `et_int4_` prefix keeps it clear of ExecuTorch's own
// `aoti_torch_cuda_int4_plain_mm`. The library calls only the AOTI functions that every ExecuTorch
// CUDA runtime defines (aoti_abi.h declares them), resolved from the host process.
#pragma once

#include <stdint.h>

#include "aoti_abi.h"

#if defined(__GNUC__)
#define ET_INT4_API __attribute__((visibility("default")))
#else
#define ET_INT4_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

// y[M, N] = x[M, K] @ W^T with W4A8 numerics: activations quantized per 32-element block to
// int8, int32 block dot products, fp32 accumulation, bf16 output. A block holding NaN or Inf
// makes every output it feeds NaN.
//   self  [M, K]                     bfloat16, row-major, K >= 32
//   qdata [N/32, 16*K]               uint8 (int8 accepted): u = q + 8 nibbles in the tiled layout of
//                                    backends/cuda/int4/int4_mm.h (N a multiple of 32)
//   scale [N/32, 32*K/group_size]    bfloat16, tiled likewise
//   zero  [N/32, 32*K/group_size]    int8, zero point in the +8 domain of qdata, tiled likewise;
//         or [N/32, 32]              one zero point per row for all its groups, tiled as one group;
//         or [N/32, 1]               symmetric weights (torchao's default): every zero point is 8, and so
//                                    is every entry (the CUDA kernels make a tile's outputs NaN if not; the
//                                    CPU path refuses); the scales then lie below 2^100 in magnitude
//   group_size                       a multiple of 32 that divides K
//   max_m                            MATVEC_MAX_M at export time: M <= max_m <= et_int4_shim_gemm_max_m()
//   ret0                             receives a new [M, N] bfloat16 tensor owned by the caller; M = 0
//                                    gives an empty [0, N] tensor and launches nothing
// Runs on the current CUDA stream, where it may read qdata, scale and zero before the kernel ahead of
// it has ended: that kernel must not write them (an exported program's weights are constants).
// Returns 0 on success. On bad input (a qdata of the old row-major [N, K/2] layout included) nothing
// runs, the result is non-zero, and one line saying what was expected and what came is printed to
// stderr and kept for et_int4_last_error().
ET_INT4_API AOTITorchError aoti_torch_cuda_et_int4_plain_mm(
    AtenTensorHandle self, AtenTensorHandle qdata, AtenTensorHandle scale, AtenTensorHandle zero,
    int64_t group_size, int64_t max_m, AtenTensorHandle* ret0);

// The same on CPU tensors: the reference path, bit-compatible with the Python reference.
ET_INT4_API AOTITorchError aoti_torch_cpu_et_int4_plain_mm(
    AtenTensorHandle self, AtenTensorHandle qdata, AtenTensorHandle scale, AtenTensorHandle zero,
    int64_t group_size, int64_t max_m, AtenTensorHandle* ret0);

// SHIM_GEMM_MAX_M, the largest M this library handles: CMake's ET_INT4_SHIM_GEMM_MAX_M when it was built.
ET_INT4_API int64_t et_int4_shim_gemm_max_m(void);

// The largest SHIM_GEMM_MAX_M any build accepts (CMake refuses more): limit messages suggest no
// rebuild above it.
ET_INT4_API int64_t et_int4_shim_gemm_max_m_bound(void);

// The message of the calling thread's last failed call, or "" if it has none.
ET_INT4_API const char* et_int4_last_error(void);

#ifdef __cplusplus
}
#endif
