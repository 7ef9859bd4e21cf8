// Launches ExecuTorch's own W4A8 kernels (backends/cuda/runtime/shims/int4_plain_mm.cuh of the
// checkout named by ET_INT4_EXECUTORCH_SRC) for bench/bench_int4_mm.py, through a C ABI of raw
// device pointers. Nothing of ExecuTorch is copied here: the header is compiled from the checkout.
// ET_INT4_EXECUTORCH_CUH: the header's path in the checkout; its own includes resolve to stubs/.
#include ET_INT4_EXECUTORCH_CUH

namespace et = executorch::backends::cuda;

namespace {

// ExecuTorch's multirow body, instantiated for 8 rows: the weight-stationary design it uses for
// M = 2..4, stretched to an EAGLE verify.
__global__ void __launch_bounds__(et::MV_THREADS)
matvec_m8(const uint8_t* qdata, const uint8_t* scale, const __half* scale_step, const uint8_t* zero,
          const __half* zero_step, const et::Q8Block* q8, __nv_bfloat16* out, int32_t N, int32_t K,
          int32_t gs_shift, int32_t n_groups, int32_t n_super) {
  const int32_t n = blockIdx.x * et::MV_NWARPS + threadIdx.y;
  if (n >= N) return;
  et::int4_w4a8_matvec_coalesced_body<8>(qdata, scale, scale_step, zero, zero_step, q8, out, n, N, K,
                                         gs_shift, n_groups, n_super);
}

}  // namespace

extern "C" {

size_t et_harness_q8_bytes(int m, int k) { return sizeof(et::Q8Block) * m * (k / et::Q8_BLOCK_SIZE); }

// variant 0: the M = 1 matvec launched with grid.y = m (how ExecuTorch runs m > 4 rows today);
// variant 1: the multirow kernel for m in 2..4 (the matvec for m = 1), as ExecuTorch dispatches;
// variant 2: the multirow body for 8 rows (m must be 8).
// Returns a CUDA error code (0: launched).
int et_harness_int4_mm(int variant, const void* x, const uint8_t* qdata, const uint8_t* scale,
                       const void* scale_step, const uint8_t* zero, const void* zero_step, void* q8,
                       void* out, int m, int n, int k, int group_size, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  auto* q8b = static_cast<et::Q8Block*>(q8);
  const int gs_shift = et::log2_pow2(group_size), groups = k / group_size, supers = k / et::SUPER_BLOCK;
  constexpr int kQuantWarps = 8;  // as _int4_plain_mm_cuda
  et::quantize_activations_q8_kernel<<<dim3((k / et::Q8_BLOCK_SIZE + kQuantWarps - 1) / kQuantWarps, m),
                                       dim3(et::MV_WARP_SIZE, kQuantWarps), 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), q8b, k);
  const auto* ss = static_cast<const __half*>(scale_step);
  const auto* zs = static_cast<const __half*>(zero_step);
  auto* o = static_cast<__nv_bfloat16*>(out);
  const dim3 block(et::MV_WARP_SIZE, et::MV_NWARPS), rows((n + et::MV_NWARPS - 1) / et::MV_NWARPS);
  if (variant == 2 && m == 8) {
    matvec_m8<<<rows, block, 0, stream>>>(qdata, scale, ss, zero, zs, q8b, o, n, k, gs_shift, groups, supers);
  } else if (variant == 1 && m == 2) {
    et::int4_w4a8_matvec_m2_coalesced_kernel<<<rows, block, 0, stream>>>(qdata, scale, ss, zero, zs, q8b, o, n, k, gs_shift, groups, supers);
  } else if (variant == 1 && m == 3) {
    et::int4_w4a8_matvec_m3_coalesced_kernel<<<rows, block, 0, stream>>>(qdata, scale, ss, zero, zs, q8b, o, n, k, gs_shift, groups, supers);
  } else if (variant == 1 && m == 4) {
    et::int4_w4a8_matvec_m4_coalesced_kernel<<<rows, block, 0, stream>>>(qdata, scale, ss, zero, zs, q8b, o, n, k, gs_shift, groups, supers);
  } else if (variant == 0 || (variant == 1 && m == 1)) {
    et::int4_w4a8_matvec_coalesced_kernel<<<dim3(rows.x, m), block, 0, stream>>>(qdata, scale, ss, zero, zs, q8b, o, n, k, gs_shift, groups, supers);
  } else {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
