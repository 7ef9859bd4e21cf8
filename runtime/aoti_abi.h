// The AOTI C functions libet_int4 calls, declared here so that building it needs no PyTorch headers.
//
// The library links no torch: these resolve at load time from the host process (libtorch, or an
// ExecuTorch CUDA runtime). Every function named here must be one that every ExecuTorch CUDA runtime
// defines: runtime/aoti_allowed_symbols.txt lists those, and tests/test_shim_abi.py checks both this
// header and the built library's undefined symbols against it. The types and signatures match
// PyTorch's torch/csrc/inductor/aoti_torch/c/shim.h, so a translation unit may include both.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// 0 on success in both hosts (ExecuTorch's enum is 32 bits wide too).
typedef int32_t AOTITorchError;
typedef struct AtenTensorOpaque AtenTensorOpaque;
typedef AtenTensorOpaque* AtenTensorHandle;
typedef struct CUDAGuardOpaque CUDAGuardOpaque;
typedef CUDAGuardOpaque* CUDAGuardHandle;

// c10::ScalarType and c10::DeviceType codes.
int32_t aoti_torch_dtype_bfloat16(void);
int32_t aoti_torch_dtype_uint8(void);
int32_t aoti_torch_device_type_cpu(void);
int32_t aoti_torch_device_type_cuda(void);

// Describing a tensor; sizes, strides and data are borrowed.
AOTITorchError aoti_torch_get_dim(AtenTensorHandle tensor, int64_t* ret_dim);
AOTITorchError aoti_torch_get_dtype(AtenTensorHandle tensor, int32_t* ret_dtype);
AOTITorchError aoti_torch_get_sizes(AtenTensorHandle tensor, int64_t** ret_sizes);
AOTITorchError aoti_torch_get_strides(AtenTensorHandle tensor, int64_t** ret_strides);
AOTITorchError aoti_torch_get_storage_offset(AtenTensorHandle tensor, int64_t* ret_storage_offset);
AOTITorchError aoti_torch_get_storage_size(AtenTensorHandle tensor, int64_t* ret_size);
AOTITorchError aoti_torch_get_data_ptr(AtenTensorHandle tensor, void** ret_data_ptr);
AOTITorchError aoti_torch_get_device_type(AtenTensorHandle tensor, int32_t* ret_device_type);
AOTITorchError aoti_torch_get_device_index(AtenTensorHandle tensor, int32_t* ret_device_index);

// Making and freeing tensors (the caller owns a new handle).
AOTITorchError aoti_torch_empty_strided(int64_t ndim, const int64_t* sizes_ptr, const int64_t* strides_ptr,
                                        int32_t dtype, int32_t device_type, int32_t device_index,
                                        AtenTensorHandle* ret_new_tensor);
AOTITorchError aoti_torch_delete_tensor_object(AtenTensorHandle tensor);

// CUDA only. Weak, so that the library also loads into a host without CUDA, where they are null
// (the CUDA entry point then says so).
#if defined(__GNUC__)
#define ET_INT4_AOTI_WEAK __attribute__((weak))
#else
#define ET_INT4_AOTI_WEAK
#endif
ET_INT4_AOTI_WEAK AOTITorchError aoti_torch_create_cuda_guard(int32_t device_index, CUDAGuardHandle* ret_guard);
ET_INT4_AOTI_WEAK AOTITorchError aoti_torch_delete_cuda_guard(CUDAGuardHandle guard);
ET_INT4_AOTI_WEAK AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);

#ifdef __cplusplus
}
#endif
