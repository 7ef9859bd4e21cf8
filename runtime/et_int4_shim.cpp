// The C ABI of et_int4 (see et_int4_shim.h): validate, allocate through the host's AOTI functions,
// run the CPU reference or the CUDA kernels.
#include "runtime/et_int4_shim.h"

#include <cstdio>
#include <string>
#include <tuple>

#include "backends/cuda/int4/int4_mm.h"
#include "runtime/cpu_reference.h"

#if !defined(ET_INT4_SHIM_GEMM_MAX_M) || !defined(ET_INT4_SHIM_GEMM_MAX_M_BOUND)
#error "ET_INT4_SHIM_GEMM_MAX_M and ET_INT4_SHIM_GEMM_MAX_M_BOUND come from CMake"
#endif
#if ET_INT4_SHIM_GEMM_MAX_M < 1 || ET_INT4_SHIM_GEMM_MAX_M > ET_INT4_SHIM_GEMM_MAX_M_BOUND
#error "ET_INT4_SHIM_GEMM_MAX_M must lie in 1..ET_INT4_SHIM_GEMM_MAX_M_BOUND"
#endif

namespace {

constexpr AOTITorchError kOk = 0;
constexpr AOTITorchError kFailure = 1;
// c10::ScalarType codes (stable across PyTorch and ExecuTorch releases).
constexpr int32_t kUInt8 = 0, kInt8 = 1, kBFloat16 = 15;

thread_local std::string last_error;

// Records and prints one line; always returns kFailure so call sites read `return fail(...)`.
AOTITorchError fail(const std::string& what) {
  last_error = "et_int4_plain_mm: " + what;
  std::fprintf(stderr, "%s\n", last_error.c_str());
  return kFailure;
}

// Every successful call clears the thread's last error.
AOTITorchError succeed() {
  last_error.clear();
  return kOk;
}

std::string shape_str(const int64_t* sizes, int64_t dim) {
  std::string s = "[";
  for (int64_t i = 0; i < dim; ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

const char* dtype_name(int32_t code) {
  switch (code) {
    case kUInt8: return "uint8";
    case kInt8: return "int8";
    case 5: return "float16";
    case 6: return "float32";
    case kBFloat16: return "bfloat16";
    default: return "another dtype";
  }
}

struct TensorInfo {
  void* data = nullptr;
  int64_t sizes[2] = {0, 0};
  int32_t device_type = -1, device_index = -1;
};

// Checks one 2-D row-major operand and reads what the kernels need.
AOTITorchError inspect(AtenTensorHandle t, const char* name, int32_t dtype_a, int32_t dtype_b,
                       const char* dtype_expected, TensorInfo& info) {
  if (t == nullptr) return fail(std::string(name) + ": expected a tensor, got a null handle");
  int64_t dim = 0;
  int32_t dtype = 0;
  int64_t *sizes = nullptr, *strides = nullptr;
  int64_t offset = 0, storage_bytes = 0;
  if (aoti_torch_get_dim(t, &dim) || aoti_torch_get_dtype(t, &dtype) ||
      aoti_torch_get_sizes(t, &sizes) || aoti_torch_get_strides(t, &strides) ||
      aoti_torch_get_storage_offset(t, &offset) || aoti_torch_get_storage_size(t, &storage_bytes) ||
      aoti_torch_get_data_ptr(t, &info.data) || aoti_torch_get_device_type(t, &info.device_type) ||
      aoti_torch_get_device_index(t, &info.device_index)) {
    return fail(std::string(name) + ": the runtime could not describe this tensor handle");
  }
  if (dim != 2) {
    return fail(std::string(name) + ": expected a 2-D tensor, got " + std::to_string(dim) +
                "-D " + shape_str(sizes, dim));
  }
  if (dtype != dtype_a && dtype != dtype_b) {
    return fail(std::string(name) + ": expected dtype " + dtype_expected + ", got " + dtype_name(dtype) +
                " (code " + std::to_string(dtype) + ")");
  }
  // Row-major and dense; a dimension of size 1 may have any stride, and so may an empty tensor.
  if (sizes[0] * sizes[1] != 0 &&
      ((sizes[1] > 1 && strides[1] != 1) || (sizes[0] > 1 && strides[0] != sizes[1]))) {
    return fail(std::string(name) + ": expected a contiguous row-major tensor, got shape " +
                shape_str(sizes, 2) + " with strides " + shape_str(strides, 2) +
                "; call .contiguous() first");
  }
  const int64_t element_bytes = dtype == kBFloat16 ? 2 : 1;
  if (sizes[0] < 0 || sizes[1] < 0 ||
      (offset + sizes[0] * sizes[1]) * element_bytes > storage_bytes) {
    return fail(std::string(name) + ": shape " + shape_str(sizes, 2) + " at offset " +
                std::to_string(offset) + " does not fit its storage of " +
                std::to_string(storage_bytes) + " bytes");
  }
  if (sizes[0] * sizes[1] > 0 && info.data == nullptr) {
    return fail(std::string(name) + ": non-empty tensor with a null data pointer");
  }
  info.sizes[0] = sizes[0];
  info.sizes[1] = sizes[1];
  return kOk;
}

struct Problem {
  TensorInfo x, qdata, scale, zero;
  int64_t m = 0, n = 0, k = 0;
  et_int4::ZeroPoints zero_points = et_int4::ZeroPoints::kPerGroup;  // told apart by zero's shape
};

AOTITorchError validate(AtenTensorHandle self, AtenTensorHandle qdata, AtenTensorHandle scale,
                        AtenTensorHandle zero, int64_t group_size, int64_t max_m,
                        AtenTensorHandle* ret0, int32_t device_type, const char* device_name,
                        Problem& p) {
  if (ret0 == nullptr) return fail("ret0: expected a pointer to receive the output, got null");
  if (AOTITorchError e = inspect(self, "self", kBFloat16, kBFloat16, "bfloat16", p.x)) return e;
  if (AOTITorchError e = inspect(qdata, "qdata", kUInt8, kInt8, "uint8 (or int8)", p.qdata)) return e;
  if (AOTITorchError e = inspect(scale, "scale", kBFloat16, kBFloat16, "bfloat16", p.scale)) return e;
  if (AOTITorchError e = inspect(zero, "zero", kInt8, kInt8, "int8", p.zero)) return e;

  for (const auto* t : {&p.x, &p.qdata, &p.scale, &p.zero}) {
    if (t->device_type != device_type) {
      return fail(std::string("expected every tensor on ") + device_name +
                  " for aoti_torch_" + device_name + "_et_int4_plain_mm, got device type " +
                  std::to_string(t->device_type) + "; move the tensors or call the other entry point");
    }
    if (t->device_index != p.x.device_index) {
      return fail("expected every tensor on device " + std::to_string(p.x.device_index) +
                  " (where self is), got one on device " + std::to_string(t->device_index));
    }
  }

  p.m = p.x.sizes[0];
  p.k = p.x.sizes[1];
  if (max_m < 1 || max_m > ET_INT4_SHIM_GEMM_MAX_M) {
    // Suggest a rebuild only where one would serve max_m: CMake refuses limits above the bound.
    const std::string fix =
        max_m < 1 ? "; export with MATVEC_MAX_M >= 1"
        : max_m > ET_INT4_SHIM_GEMM_MAX_M_BOUND
            ? "; export with a lower MATVEC_MAX_M (no build handles more than " +
                  std::to_string(ET_INT4_SHIM_GEMM_MAX_M_BOUND) + " rows)"
            : "; export with a lower MATVEC_MAX_M or rebuild with -DET_INT4_SHIM_GEMM_MAX_M=" +
                  std::to_string(max_m);
    return fail("max_m: expected 1 <= max_m <= SHIM_GEMM_MAX_M = " +
                std::to_string(ET_INT4_SHIM_GEMM_MAX_M) + ", got " + std::to_string(max_m) + fix);
  }
  if (p.m > max_m) {
    return fail("self: expected M <= max_m = " + std::to_string(max_m) + " rows, got M = " +
                std::to_string(p.m));
  }
  if (p.k < et_int4::kBlockK) {
    return fail("self: expected K >= " + std::to_string(et_int4::kBlockK) +
                " (one activation block), got K = " + std::to_string(p.k));
  }
  if (group_size < et_int4::kBlockK || group_size % et_int4::kBlockK != 0 || p.k % group_size != 0) {
    return fail("group_size: expected a multiple of " + std::to_string(et_int4::kBlockK) +
                " that divides K = " + std::to_string(p.k) + ", got " + std::to_string(group_size));
  }
  if (p.qdata.sizes[1] == p.k / 2) {
    return fail("qdata: expected the tiled layout [N/32, 16*K], got shape " + shape_str(p.qdata.sizes, 2) +
                ", the row-major [N, K/2] layout of et-int4 0.1: re-export the program "
                "(rewrite_int4_linears / pack_int4 repack the weights)");
  }
  const int64_t tiles = p.qdata.sizes[0];
  if (tiles < 1) return fail("qdata: expected at least one tile of 32 output rows, got N = 0");
  p.n = tiles * et_int4::kTileRows;
  const int64_t groups = p.k / group_size;
  const auto expect_shape = [&](const TensorInfo& t, const char* name, int64_t rows, int64_t cols,
                                const char* why) -> AOTITorchError {
    if (t.sizes[0] == rows && t.sizes[1] == cols) return kOk;
    return fail(std::string(name) + ": expected shape [" + std::to_string(rows) + ", " +
                std::to_string(cols) + "] " + why + ", got " + shape_str(t.sizes, 2));
  };
  const int64_t record = et_int4::kTileBlockBytes;
  if (AOTITorchError e = expect_shape(p.qdata, "qdata", tiles, p.k / et_int4::kBlockK * record,
                                      "([N/32, 16*K], tiled, for K from self)")) return e;
  if (AOTITorchError e = expect_shape(p.scale, "scale", tiles, groups * et_int4::kTileRows,
                                      "([N/32, 32*K/group_size], tiled)")) return e;
  if (p.zero.sizes[0] == tiles && p.zero.sizes[1] == et_int4::kTileRows) {
    p.zero_points = et_int4::ZeroPoints::kPerRow;
  } else if (p.zero.sizes[0] == tiles && p.zero.sizes[1] == 1) {
    p.zero_points = et_int4::ZeroPoints::kSymmetric;
  } else if (AOTITorchError e = expect_shape(p.zero, "zero", tiles, groups * et_int4::kTileRows,
                                             "([N/32, 32*K/group_size], tiled; or [N/32, 32], one zero point "
                                             "per row; or [N/32, 1], symmetric)")) {
    return e;
  }
  if (p.n > INT32_MAX || p.k > INT32_MAX) {
    return fail("expected N and K below 2^31, got N = " + std::to_string(p.n) + ", K = " + std::to_string(p.k));
  }
  return kOk;
}

AOTITorchError new_output(const Problem& p, int32_t device_type, AtenTensorHandle* ret0) {
  const int64_t sizes[2] = {p.m, p.n}, strides[2] = {p.n, 1};
  if (aoti_torch_empty_strided(2, sizes, strides, aoti_torch_dtype_bfloat16(), device_type,
                               p.x.device_index, ret0)) {
    return fail("could not allocate the [" + std::to_string(p.m) + ", " + std::to_string(p.n) +
                "] output");
  }
  return kOk;
}

void* data_of(AtenTensorHandle t) {
  void* data = nullptr;
  aoti_torch_get_data_ptr(t, &data);
  return data;
}

}  // namespace

extern "C" {

ET_INT4_API AOTITorchError aoti_torch_cpu_et_int4_plain_mm(
    AtenTensorHandle self, AtenTensorHandle qdata, AtenTensorHandle scale, AtenTensorHandle zero,
    int64_t group_size, int64_t max_m, AtenTensorHandle* ret0) {
  Problem p;
  const int32_t cpu = aoti_torch_device_type_cpu();
  if (AOTITorchError e = validate(self, qdata, scale, zero, group_size, max_m, ret0, cpu, "cpu", p)) return e;
  if (AOTITorchError e = new_output(p, cpu, ret0)) return e;
  if (p.m == 0) return succeed();
  if (p.zero_points == et_int4::ZeroPoints::kSymmetric) {
    const auto* zero = static_cast<const int8_t*>(p.zero.data);
    for (int64_t tile = 0; tile < p.zero.sizes[0]; ++tile) {
      if (zero[tile] != et_int4::kSymmetricZero) {
        return fail("zero: the symmetric layout [N/32, 1] holds " + std::to_string(et_int4::kSymmetricZero) +
                    " in every entry, got " + std::to_string(zero[tile]) + " at tile " + std::to_string(tile) +
                    "; re-export the program (pack_int4 writes it)");
      }
    }
  }
  et_int4::cpu::plain_mm(static_cast<const uint16_t*>(p.x.data), static_cast<const uint8_t*>(p.qdata.data),
                         static_cast<const uint16_t*>(p.scale.data), static_cast<const int8_t*>(p.zero.data),
                         static_cast<uint16_t*>(data_of(*ret0)), p.m, p.n, p.k, group_size, p.zero_points);
  return succeed();
}

ET_INT4_API AOTITorchError aoti_torch_cuda_et_int4_plain_mm(
    AtenTensorHandle self, AtenTensorHandle qdata, AtenTensorHandle scale, AtenTensorHandle zero,
    int64_t group_size, int64_t max_m, AtenTensorHandle* ret0) {
#ifndef ET_INT4_WITH_CUDA
  (void)self, (void)qdata, (void)scale, (void)zero, (void)group_size, (void)max_m, (void)ret0;
  return fail("this libet_int4 was built without CUDA; rebuild it where nvcc is found");
#else
  Problem p;
  const int32_t cuda = aoti_torch_device_type_cuda();
  if (AOTITorchError e = validate(self, qdata, scale, zero, group_size, max_m, ret0, cuda, "cuda", p)) return e;
  if (!aoti_torch_create_cuda_guard || !aoti_torch_delete_cuda_guard ||
      !aoti_torch_get_current_cuda_stream) {
    return fail("the host process has no CUDA runtime (its aoti_torch_* CUDA functions are missing); "
                "load libet_int4 into a CUDA build of PyTorch or an ExecuTorch CUDA runtime");
  }
  // No rows: an empty [0, N] output and no launch (a grid of zero CTAs is a launch error).
  if (p.m == 0) return new_output(p, cuda, ret0) ? kFailure : succeed();
  // The kernels load 16 bytes of nibbles, 8 of scales and 4 of zeros at a time.
  for (const auto& [t, name, bytes] : {std::tuple{&p.qdata, "qdata", 16}, std::tuple{&p.scale, "scale", 8},
                                       std::tuple{&p.zero, "zero", 4}}) {
    if (reinterpret_cast<uintptr_t>(t->data) % bytes != 0) {
      return fail(std::string(name) + ": expected " + std::to_string(bytes) +
                  "-byte aligned data, got an offset view; pass a freshly allocated tensor");
    }
  }
  CUDAGuardHandle guard = nullptr;
  if (aoti_torch_create_cuda_guard(p.x.device_index, &guard)) {
    return fail("could not select CUDA device " + std::to_string(p.x.device_index));
  }
  void* stream = nullptr;
  AtenTensorHandle workspace = nullptr;
  AOTITorchError result = kOk;
  const int64_t ws_sizes[1] = {static_cast<int64_t>(et_int4::cuda::workspace_bytes(p.m, p.n, p.k))};
  const int64_t ws_strides[1] = {1};
  if (aoti_torch_get_current_cuda_stream(p.x.device_index, &stream)) {
    result = fail("could not get the current CUDA stream of device " + std::to_string(p.x.device_index));
  } else if (aoti_torch_empty_strided(1, ws_sizes, ws_strides, aoti_torch_dtype_uint8(), cuda,
                                      p.x.device_index, &workspace)) {
    result = fail("could not allocate the " + std::to_string(ws_sizes[0]) + "-byte activation workspace");
  } else if ((result = new_output(p, cuda, ret0)) == kOk) {
    const et_int4::cuda::PlainMmArgs args{p.x.data, static_cast<const uint8_t*>(p.qdata.data),
                                          p.scale.data, static_cast<const int8_t*>(p.zero.data),
                                          data_of(*ret0), data_of(workspace), p.m, p.n, p.k, group_size,
                                          p.zero_points};
    if (const char* err = et_int4::cuda::launch_plain_mm(args, stream)) {
      aoti_torch_delete_tensor_object(*ret0);
      *ret0 = nullptr;
      result = fail(std::string("kernel launch failed: ") + err);
    }
  }
  // Freed in stream order by the host's allocator, so the kernels may still be reading it.
  if (workspace != nullptr) aoti_torch_delete_tensor_object(workspace);
  aoti_torch_delete_cuda_guard(guard);
  return result == kOk ? succeed() : result;
#endif
}

ET_INT4_API int64_t et_int4_shim_gemm_max_m(void) { return ET_INT4_SHIM_GEMM_MAX_M; }

ET_INT4_API int64_t et_int4_shim_gemm_max_m_bound(void) { return ET_INT4_SHIM_GEMM_MAX_M_BOUND; }

ET_INT4_API const char* et_int4_last_error(void) { return last_error.c_str(); }

}  // extern "C"
