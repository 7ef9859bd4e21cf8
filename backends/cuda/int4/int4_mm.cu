// W4A8 weight-stationary GEMM for M = 1..16 activation rows on int8 tensor cores.
//
// y[m, n] = sum_b s[n, g(b)] * d[m, b] * (dot(u[n, b], q[m, b]) - z[n, g(b)] * sum(q[m, b]))
// over 32-element blocks b (ARCHITECTURE.md, "Numerics").
//
// Two kernels, chained with programmatic dependent launch so the GEMM streams its first weights
// while the activations are still being quantized:
//   quantize_activations: bf16 [m, k] -> per block: int8 q (in the GEMM's k order), fp32 d, int32 sum(q).
//   w4a8_gemm: each warp owns 16 weight rows and a strided share of k; one mma.m16n8k32 per
//     activation block multiplies a 16 x 32 weight tile with all (up to 8) activation rows, so
//     each weight byte is read once and costs the same instructions whatever m is.
#include "backends/cuda/int4/int4_mm.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#ifndef ET_INT4_SHIM_GEMM_MAX_M
#error "ET_INT4_SHIM_GEMM_MAX_M comes from CMake"
#endif

namespace et_int4::cuda {
namespace {

constexpr int kBlockK = 32;                 // activation quantization block = one mma k step
constexpr int kChunkBlocks = 4;             // blocks per 16-byte weight load of one row
constexpr int kTileRows = 16;               // mma M: weight rows per tile
constexpr int kTilesPerWarp = 1;            // >1 reuses activation fragments, at a register cost
constexpr int kCtaRows = kTileRows * kTilesPerWarp;
constexpr int kWarps = 8;                   // warps of a CTA split k and reduce through smem
constexpr int kStages = 2;                  // chunks of weights per warp loaded or in flight
constexpr int kCtasPerSm = 3;               // occupancy over registers: 65536 / (3 * 256) = 85 each
constexpr int kColTile = 8;                 // mma N: activation rows per fragment
constexpr int kQuantThreads = 256;

// Per activation row and block: the dequantization scale and sum(q), for the zero-point term.
struct BlockMeta {
  float d;
  int32_t sum;
};

int cols_for(int64_t m) { return m <= kColTile ? kColTile : 2 * kColTile; }

// Byte of a 32-element block where element e is stored: each 8-element word of weights unpacks
// into (even k, odd k) halves that feed the A registers a0/a2, so q is stored in that order.
__device__ __forceinline__ int permuted_position(int e) {
  return (e & ~7) + (e & 1) * 4 + ((e & 7) >> 1);
}

__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void wait_for_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__global__ void __launch_bounds__(kQuantThreads)
quantize_activations(const __nv_bfloat16* __restrict__ x, int m, int k, int cols,
                     BlockMeta* __restrict__ meta, int8_t* __restrict__ xq) {
  launch_dependents();
  const int item = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // one warp per (block, column)
  const int lane = threadIdx.x % 32;
  const int blocks = k / kBlockK;
  if (item >= blocks * cols) return;
  const int block = item / cols, col = item % cols;
  if (col >= m) {  // padding columns contribute nothing: d = 0
    if (lane == 0) meta[item] = BlockMeta{0.f, 0};
    return;
  }
  const float v = __bfloat162float(x[static_cast<int64_t>(col) * k + block * kBlockK + lane]);
  float amax = fabsf(v);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float d = amax / 127.f;  // IEEE division, as the reference
  const int q = d == 0.f ? 0 : __float2int_rn(v / d);
  int sum = q;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) meta[item] = BlockMeta{d, sum};
  xq[(static_cast<int64_t>(block) * m + col) * kBlockK + permuted_position(lane)] =
      static_cast<int8_t>(q);
}

// Weights are streamed once: keep them out of L1, which holds the re-read activations.
__device__ __forceinline__ uint4 load_stream_16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Group layout of the scales and zeros seen from one chunk of 4 blocks:
//   4: one group per block (gs 32), 2: gs 64, 1: gs a multiple of 128 (vector loads, k % 128 == 0);
//   0: anything else (one scalar load per block, handles a k that is not a multiple of 128).
template <int GPC>
__device__ __forceinline__ int group_slot(int j) {
  return GPC == 0 || GPC == 4 ? j : (GPC == 2 ? j / 2 : 0);
}

struct GemmParams {
  const uint8_t* qdata;
  const uint16_t* scale;  // bf16 bits
  const int8_t* zero;
  const BlockMeta* meta;
  const int8_t* xq;
  __nv_bfloat16* out;
  int m, n, k, group_size;
};

// Where one weight row is read; rows past n are clamped to n - 1 (read, never stored), so the
// loads need no guard.
struct RowPointers {
  const uint8_t* q;
  const uint16_t* s;
  const int8_t* z;
};

__device__ __forceinline__ RowPointers row_pointers(const GemmParams& p, int row) {
  const int64_t r = min(row, p.n - 1);
  const int groups = p.k / p.group_size;
  return {p.qdata + r * (p.k / 2), p.scale + r * groups, p.zero + r * groups};
}

// One row's share of a chunk: 16 bytes of nibbles (block 4c + t) and the scales/zeros of the
// chunk's 4 blocks (up to 4 bf16 and 4 int8, packed).
struct RowChunk {
  uint4 q;
  uint32_t s[2];
  uint32_t z;
};

template <int GPC>
__device__ __forceinline__ RowChunk load_row_chunk(const GemmParams& p, const RowPointers& row,
                                                   int chunk, int t) {
  const int first = chunk * kChunkBlocks;
  const int blocks = p.k / kBlockK;
  RowChunk r;
  if constexpr (GPC == 0) r = RowChunk{};  // zeros past the last block: they add nothing
  if (GPC != 0 || first + t < blocks) r.q = load_stream_16(row.q + (first + t) * (kBlockK / 2));
  if constexpr (GPC == 4) {
    const uint2 s = *reinterpret_cast<const uint2*>(row.s + first);
    r.s[0] = s.x;
    r.s[1] = s.y;
    r.z = *reinterpret_cast<const uint32_t*>(row.z + first);
  } else if constexpr (GPC == 2) {
    r.s[0] = *reinterpret_cast<const uint32_t*>(row.s + first / 2);
    r.z = *reinterpret_cast<const uint16_t*>(row.z + first / 2);
  } else if constexpr (GPC == 1) {
    const int group = first * kBlockK / p.group_size;
    r.s[0] = row.s[group];
    r.z = static_cast<uint8_t>(row.z[group]);
  } else {
#pragma unroll
    for (int j = 0; j < kChunkBlocks; ++j) {
      if (first + j >= blocks) break;
      const int group = (first + j) * kBlockK / p.group_size;
      r.s[j / 2] |= static_cast<uint32_t>(row.s[group]) << (16 * (j % 2));
      r.z |= static_cast<uint32_t>(static_cast<uint8_t>(row.z[group])) << (8 * j);
    }
  }
  return r;
}

// Activation fragments of a chunk for every column tile: B operands and the (d, sum) of columns
// 2t and 2t + 1.
template <int CT>
struct ActChunk {
  uint2 b[kChunkBlocks][CT];
  uint4 meta[kChunkBlocks][CT];
};

// This thread's first B fragment and (d, sum) pair per column tile. Columns past m read row
// m - 1: their d is 0 and an mma output column depends only on its own B column.
template <int CT>
struct ActPointers {
  const int8_t* b[CT];
  const BlockMeta* meta[CT];
};

template <int CT>
__device__ __forceinline__ ActPointers<CT> act_pointers(const GemmParams& p, int g, int t) {
  ActPointers<CT> a;
#pragma unroll
  for (int ct = 0; ct < CT; ++ct) {
    a.b[ct] = p.xq + min(ct * kColTile + g, p.m - 1) * kBlockK + 8 * t;
    a.meta[ct] = p.meta + ct * kColTile + 2 * t;
  }
  return a;
}

template <int CT, int GPC>
__device__ __forceinline__ ActChunk<CT> load_act_chunk(const GemmParams& p, const ActPointers<CT>& at,
                                                       int chunk) {
  ActChunk<CT> a;
  const int blocks = p.k / kBlockK;
#pragma unroll
  for (int j = 0; j < kChunkBlocks; ++j) {
    const int block = chunk * kChunkBlocks + j;
    if (GPC == 0 && block >= blocks) break;  // the only path with a partial chunk
#pragma unroll
    for (int ct = 0; ct < CT; ++ct) {
      a.b[j][ct] = __ldg(reinterpret_cast<const uint2*>(at.b[ct] + block * p.m * kBlockK));
      a.meta[j][ct] = __ldg(reinterpret_cast<const uint4*>(at.meta[ct] + block * (CT * kColTile)));
    }
  }
  return a;
}

// 4x4 transpose of 32-bit words across the 4 threads of a quad: thread t loaded block t of a
// chunk (words 0..3); afterwards it holds word t of blocks 0..3, the mma A-fragment layout.
__device__ __forceinline__ void transpose_quad(uint4& v, int t) {
  constexpr unsigned kAll = 0xffffffffu;
  const bool upper = t & 2;
  uint32_t s0 = upper ? v.x : v.z, s1 = upper ? v.y : v.w;
  s0 = __shfl_xor_sync(kAll, s0, 2);
  s1 = __shfl_xor_sync(kAll, s1, 2);
  if (upper) { v.x = s0; v.y = s1; } else { v.z = s0; v.w = s1; }
  const bool odd = t & 1;
  s0 = odd ? v.x : v.y;
  s1 = odd ? v.z : v.w;
  s0 = __shfl_xor_sync(kAll, s0, 1);
  s1 = __shfl_xor_sync(kAll, s1, 1);
  if (odd) { v.x = s0; v.z = s1; } else { v.y = s0; v.w = s1; }
}

// Byte `i` of v as a signed int in one PRMT (its sign mode; __byte_perm has none).
__device__ __forceinline__ int sign_extended_byte(uint32_t v, int i) {
  int out;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(out) : "r"(v), "r"(0x8880 + 0x1111 * i));
  return out;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

__device__ __forceinline__ void mma_s8(const uint32_t (&a)[4], const uint2& b, int (&d)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %10, %10, %10};"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "r"(0));
}

template <int CT, int GPC>
__device__ __forceinline__ void accumulate_chunk(RowChunk (&w)[kTilesPerWarp][2],
                                                 const ActChunk<CT>& a, int blocks_left, int t,
                                                 float (&acc)[kTilesPerWarp][2][CT][2]) {
#pragma unroll
  for (int tile = 0; tile < kTilesPerWarp; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h) transpose_quad(w[tile][h].q, t);
#pragma unroll
  for (int j = 0; j < kChunkBlocks; ++j) {
    if (GPC == 0 && j >= blocks_left) break;
    const int slot = group_slot<GPC>(j);
#pragma unroll
    for (int tile = 0; tile < kTilesPerWarp; ++tile) {
      const uint32_t w0 = word(w[tile][0].q, j), w1 = word(w[tile][1].q, j);
      const uint32_t frag[4] = {w0 & 0x0f0f0f0fu, w1 & 0x0f0f0f0fu, (w0 >> 4) & 0x0f0f0f0fu,
                                (w1 >> 4) & 0x0f0f0f0fu};
      float scale[2];
      int zero[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t bits = w[tile][h].s[slot / 2];
        scale[h] = __uint_as_float(slot % 2 ? bits & 0xffff0000u : bits << 16);
        zero[h] = sign_extended_byte(w[tile][h].z, slot);
      }
#pragma unroll
      for (int ct = 0; ct < CT; ++ct) {
        int dot[4];
        mma_s8(frag, a.b[j][ct], dot);
        const uint4 meta = a.meta[j][ct];
        const float d[2] = {__uint_as_float(meta.x), __uint_as_float(meta.z)};
        const int sum[2] = {static_cast<int>(meta.y), static_cast<int>(meta.w)};
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int exact = dot[2 * h + e] - zero[h] * sum[e];
            acc[tile][h][ct][e] = fmaf(scale[h] * d[e], static_cast<float>(exact), acc[tile][h][ct][e]);
          }
      }
    }
  }
}

// A second column tile doubles accumulators and fragments: one CTA less per SM, no spills.
template <int CT, int GPC>
__global__ void __launch_bounds__(kWarps * 32, CT == 1 ? kCtasPerSm : kCtasPerSm - 1)
w4a8_gemm(GemmParams p) {
  constexpr int kAcc = kTilesPerWarp * 2 * CT * 2;
  __shared__ float partial[kWarps][kAcc][32];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = blockIdx.x * kCtaRows;
  const int blocks = p.k / kBlockK;
  const int chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;

  float acc[kTilesPerWarp][2][CT][2] = {};
  // A ring of kStages chunks of weights in registers: kStages - 1 stay in flight during the math.
  // The warp's i-th chunk lives in slot i % kStages; unrolling by kStages keeps slots static.
  RowPointers rows[kTilesPerWarp][2];
#pragma unroll
  for (int tile = 0; tile < kTilesPerWarp; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[tile][h] = row_pointers(p, row0 + tile * kTileRows + h * 8 + g);
  const ActPointers<CT> act = act_pointers<CT>(p, g, t);
  RowChunk w[kStages][kTilesPerWarp][2];
  auto load_weights = [&](RowChunk (&dst)[kTilesPerWarp][2], int chunk) {
#pragma unroll
    for (int tile = 0; tile < kTilesPerWarp; ++tile)
#pragma unroll
      for (int h = 0; h < 2; ++h) dst[tile][h] = load_row_chunk<GPC>(p, rows[tile][h], chunk, t);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (warp + s * kWarps < chunks) load_weights(w[s], warp + s * kWarps);
  // Weights never depend on the previous kernel; the activations do.
  wait_for_prerequisites();
  for (int first = warp; first < chunks; first += kStages * kWarps) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      const int chunk = first + s * kWarps;
      if (chunk >= chunks) break;
      const int ahead = chunk + (kStages - 1) * kWarps;
      if (ahead < chunks) load_weights(w[(s + kStages - 1) % kStages], ahead);
      // Activations are not prefetched: they are small, re-read by every CTA and served from
      // L1/L2, and the registers are worth more as occupancy (bench/RESULTS.md, sweep).
      accumulate_chunk<CT, GPC>(w[s], load_act_chunk<CT, GPC>(p, act, chunk),
                                blocks - chunk * kChunkBlocks, t, acc);
    }
  }

  // Reduce the warps' k-slices; thread i then owns output slot i / 32 of lane i % 32.
  int slot = 0;
#pragma unroll
  for (int tile = 0; tile < kTilesPerWarp; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ct = 0; ct < CT; ++ct)
#pragma unroll
        for (int e = 0; e < 2; ++e) partial[warp][slot++][lane] = acc[tile][h][ct][e];
  __syncthreads();
  for (int i = threadIdx.x; i < kAcc * 32; i += kWarps * 32) {
    const int s = i / 32, l = i % 32;
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += partial[v][s][l];
    const int e = s % 2, ct = (s / 2) % CT, h = (s / (2 * CT)) % 2, tile = s / (4 * CT);
    const int row = row0 + tile * kTileRows + h * 8 + l / 4;
    const int col = ct * kColTile + 2 * (l % 4) + e;
    if (row < p.n && col < p.m) p.out[static_cast<int64_t>(col) * p.n + row] = __float2bfloat16_rn(sum);
  }
}

int groups_per_chunk(const PlainMmArgs& a) {
  const auto aligned = [](const void* ptr, size_t bytes) {
    return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
  };
  if (a.k % (kChunkBlocks * kBlockK) != 0) return 0;
  if (a.group_size == 32 && aligned(a.scale, 8) && aligned(a.zero, 4)) return 4;
  if (a.group_size == 64 && aligned(a.scale, 4) && aligned(a.zero, 2)) return 2;
  if (a.group_size % (kChunkBlocks * kBlockK) == 0) return 1;
  return 0;
}

template <int CT, int GPC>
cudaError_t launch_gemm(const GemmParams& p, cudaStream_t stream, bool pdl) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((p.n + kCtaRows - 1) / kCtaRows);
  config.blockDim = dim3(kWarps * 32);
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, w4a8_gemm<CT, GPC>, p);
}

template <int CT>
cudaError_t dispatch_groups(const GemmParams& p, int gpc, cudaStream_t stream, bool pdl) {
  switch (gpc) {
    case 4: return launch_gemm<CT, 4>(p, stream, pdl);
    case 2: return launch_gemm<CT, 2>(p, stream, pdl);
    case 1: return launch_gemm<CT, 1>(p, stream, pdl);
    default: return launch_gemm<CT, 0>(p, stream, pdl);
  }
}

bool device_supports_pdl() {
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         major >= 9;
}

}  // namespace

size_t workspace_bytes(int64_t m, int64_t k) {
  const int64_t blocks = k / kBlockK;
  return static_cast<size_t>(blocks * cols_for(m) * sizeof(BlockMeta) + blocks * m * kBlockK);
}

const char* launch_plain_mm(const PlainMmArgs& a, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int cols = cols_for(a.m);
  const int64_t blocks = a.k / kBlockK;
  auto* meta = static_cast<BlockMeta*>(a.workspace);
  auto* xq = reinterpret_cast<int8_t*>(meta + blocks * cols);

  const int64_t quant_threads = blocks * cols * 32;
  quantize_activations<<<static_cast<unsigned>((quant_threads + kQuantThreads - 1) / kQuantThreads),
                         kQuantThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(a.x),
                                                     static_cast<int>(a.m), static_cast<int>(a.k),
                                                     cols, meta, xq);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cudaGetErrorString(err);

  const GemmParams p{a.qdata, static_cast<const uint16_t*>(a.scale), a.zero, meta, xq,
                     static_cast<__nv_bfloat16*>(a.out), static_cast<int>(a.m),
                     static_cast<int>(a.n), static_cast<int>(a.k), static_cast<int>(a.group_size)};
  const int gpc = groups_per_chunk(a);
  const bool pdl = device_supports_pdl();
#if ET_INT4_SHIM_GEMM_MAX_M > 8  // a second column tile only where the build allows m > 8
  err = cols == kColTile ? dispatch_groups<1>(p, gpc, stream, pdl)
                         : dispatch_groups<2>(p, gpc, stream, pdl);
#else
  err = dispatch_groups<1>(p, gpc, stream, pdl);
#endif
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace et_int4::cuda
