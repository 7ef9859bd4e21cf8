// W4A8 weight-stationary GEMM for M = 1..16 activation rows on int8 tensor cores.
//
// y[m, n] = sum_g s[n, g] * sum_{b in g} d[m, b] * (dot(u[n, b], q[m, b]) - z[n, g] * sum(q[m, b]))
// over 32-element blocks b (the numerics are specified in reference.py). Symmetric weights (z = 8)
// take the block sums with no zero-point term and scale each as d * (s * S) (accumulate_stage).
//
// Two kernels, chained with programmatic dependent launch: the quantizer lets the GEMM launch before
// it waits for the kernel ahead of it, so the GEMM is resident and streams its first weights while
// that kernel ends and the activations are quantized (the weights are constants: nothing writes them):
//   quantize_activations: bf16 [m, k] -> per block: int8 q (in the mma's k order), fp32 d, -sum(q).
//   w4a8_gemm: a warp owns a tile of 32 weight rows and a strided share of its blocks; per block one
//     16-byte load per lane brings both m16 halves of the tile already in mma fragment order (the
//     tiled layout, packing.py), and two mma.m16n8k32 multiply them with all (up to 8) activation
//     rows: each weight byte is read once whatever m is. Up to m = 4 each activation row fills two
//     neighbouring mma columns, so that a lane scales one output per weight row, as at m = 1.
// A CTA's warps split the tile's blocks and reduce through shared memory; where the row tiles are
// too few to fill the GPU, K is split further: over a wide CTA (twice the warps, one per SM) and, where
// that is still too few, over CTAs too, the last of which adds the tile's partial sums. Small CTAs
// (half the warps, twice as many per SM) run grids whose tiles would leave a partial second wave in
// one wave instead (make_plan).
#include "backends/cuda/int4/int4_mm.h"
#include "backends/cuda/int4/quantize_math.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#ifndef ET_INT4_SHIM_GEMM_MAX_M
#error "ET_INT4_SHIM_GEMM_MAX_M comes from CMake"
#endif
// Tuning knobs: compile definitions, so that bench/sweep_variants.sh builds and times variants of
// this very source. The defaults are the fastest measured (bench/RESULTS.md).
#ifndef ET_INT4_STAGE_BLOCKS
#define ET_INT4_STAGE_BLOCKS 4
#endif
#ifndef ET_INT4_PREFETCH
#define ET_INT4_PREFETCH 1
#endif
#ifndef ET_INT4_CTA_WARPS
#define ET_INT4_CTA_WARPS 8
#endif
#ifndef ET_INT4_CTAS_PER_SM
#define ET_INT4_CTAS_PER_SM 2
#endif
#ifndef ET_INT4_WIDE_CTAS
#define ET_INT4_WIDE_CTAS 1
#endif
#ifndef ET_INT4_SMALL_CTAS
#define ET_INT4_SMALL_CTAS 1
#endif
#ifndef ET_INT4_MAX_SHARED
#define ET_INT4_MAX_SHARED 1
#endif

namespace et_int4::cuda {
namespace {

// kBlockK (one mma k step) and kTileRows (two m16 mma tiles) come with the layout, in int4_mm.h.
constexpr int kColTile = 8;                   // mma n: activation rows per B fragment
// Up to this many activation rows (columns of B), column c fills the mma's columns 2c and 2c + 1 and
// lane t of each quad scales only the output of mma column 2t, i.e. column t: one output per weight
// row and lane, so m = 2..4 cost the instructions of m = 1 (m = 5..8 keep two per lane and take
// 0.4-1.5 us more than m = 4 on the benchmark's shapes at gs 32; bench/RESULTS.md, 2026-11-27).
constexpr int kLaneCols = 4;
constexpr int kStageBlocks = ET_INT4_STAGE_BLOCKS;  // blocks a warp loads before it computes
constexpr bool kPrefetch = ET_INT4_PREFETCH;  // load the next stage before computing this one
constexpr int kCtaWarps = ET_INT4_CTA_WARPS;
constexpr int kCtasPerSm = ET_INT4_CTAS_PER_SM;  // register budget: 65536 / (kCtasPerSm * threads)
// A wide CTA holds the warps of kCtasPerSm CTAs (the same registers each) and takes a tile's K that
// would otherwise be split over as many CTAs: it adds their sums in shared memory, not through the
// partial sums' L2 round trips. Not where the build allows m > 8: the 16-column kernel needs ~190
// registers, which a wide CTA's warps do not have.
constexpr int kWideWarps = kCtasPerSm * kCtaWarps;
constexpr bool kWideCtas = ET_INT4_WIDE_CTAS && kCtasPerSm > 1 && kWideWarps <= 32 && ET_INT4_SHIM_GEMM_MAX_M <= 8;
// Small CTAs: half the warps, twice as many resident (the same registers each). Their finer grain
// runs some grids in fewer waves: 448 row tiles (4096 x 14336) are one wave of 4-warp CTAs and two
// of 8-warp ones, whose second wave starts cold and leaves slots idle (3-26% faster where the plan
// picks them; bench/RESULTS.md, 2026-11-27). Not where the build allows m > 8, as for wide CTAs.
constexpr int kSmallWarps = kCtaWarps / 2;
constexpr bool kSmallCtas = ET_INT4_SMALL_CTAS && kCtaWarps % 2 == 0 && ET_INT4_SHIM_GEMM_MAX_M <= 8;
// Where a wide CTA's warps load both of their stages (all of K) before the wait, with no split (K of
// 65..128 blocks over one wave, e.g. 4096 x 4096), the quantizer and the GEMM launch as kernels that
// prefer the largest shared-memory carveout, though neither needs it: on 4096 x 4096 0.3-0.7 us faster
// at m = 2..8 and at gs 32's m = 1, 0.1 us slower at gs 128's m = 1 (bench/RESULTS.md, 2026-11-27). A
// per-CTA trace: the GEMM's prefetch then issues over ~2 us rather than ~0.6 (fewer bytes queued at
// once), and the quantizer's loads, on the chain's critical path, return ~1 us sooner. Not elsewhere:
// slower on the long-K shapes and on 4096 x 2048 (split K).
constexpr bool kMaxSharedPlans = ET_INT4_MAX_SHARED;
// A CTA split of K covers a multiple of this many blocks, so that a stage's run (at most 4 blocks,
// within one group) never straddles two splits.
constexpr int kSplitAlign = 4;
constexpr unsigned kInfinityBits = 0x7f800000u;  // +Inf; every finite |x| has fewer

static_assert(kStageBlocks % kSplitAlign == 0 || kSplitAlign % kStageBlocks == 0);

// Per activation row and block: the dequantization scale and -sum(q), for the zero-point term.
struct BlockMeta {
  float d;
  int32_t neg_sum;
};

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

// Byte of a 32-element block where element e is stored: lane t of a quad holds elements 8t..8t+7;
// their even elements feed the B register b0 (k slots 4t..4t+3), the odd ones b1, matching the
// low and high nibbles of the weight word that lane loads.
__device__ __forceinline__ int permuted_position(int e) {
  return (e & ~7) + (e & 1) * 4 + ((e & 7) >> 1);
}

// Elements of x a quantizer lane takes where the GEMM is a single wave of wide CTAs (Plan::few_quant_ctas);
// 1 elsewhere.
constexpr int kFewCtasLaneElems = 8;
// Blocks (a CTA's) that one quantizer warp covers.
constexpr int quant_warp_blocks(int lane_elems) { return 32 * lane_elems / kBlockK; }

// One warp per column written, of `cols` per block, and kLaneElems elements per lane: one CTA per
// quant_warp_blocks(kLaneElems) blocks. For m <= kLaneCols the CTA writes the m real columns only (the GEMM
// reads no others); beyond, it writes every column, those past m as zero padding (d = 0, q = 0).
// - One element per lane (one block per warp): many small CTAs, which spread the divisions over the
//   SMs as the kernel ahead leaves them (8 per lane were up to 1.4 us slower at m = 8 on every other
//   benchmark shape, and 0.3-0.6 us at every m on 4096 x 14336).
// - Eight (one 16-byte load; eight blocks per warp) where the GEMM is one wave of wide CTAs that each
//   need a whole SM (Plan::few_quant_ctas, e.g. 4096 x 4096): the few CTAs fit on the SMs that the GEMM
//   ahead leaves idle at every m, rather than holding SMs that the next GEMM's CTAs wait for (0.2-0.6 us
//   faster there). Not where the wide CTAs run in two waves: 4096 x 5376 (168 of them) measured 0.2-0.3 us
//   slower at m = 4 and 8, though a branch around the loads may have cost that (bench/RESULTS.md, 2026-11-27).
// The GEMM launches first thing, so that it is resident and loading weights before the kernel ahead ends.
// kMaxShared: a kernel of its own, whose launches prefer the largest shared-memory carveout (Plan::max_shared).
template <int kLaneElems, bool kMaxShared>
__global__ void __launch_bounds__(2 * kColTile * 32)
quantize_activations(const __nv_bfloat16* __restrict__ x, bool x_aligned, int m, int64_t k, int cols,
                     BlockMeta* __restrict__ meta, int8_t* __restrict__ xq,
                     unsigned* __restrict__ counters, int n_counters) {
  static_assert(kLaneElems == 1 || kLaneElems == 8, "a lane stores one byte or an 8-byte word");
  constexpr int kBlockLanes = kBlockK / kLaneElems;
  // Before its griddepcontrol.wait the GEMM reads only the weights, which no kernel writes.
  launch_dependents();
  // x may come from the kernel before us, and our workspace may be the one it just freed.
  wait_for_prerequisites();
  // Split K's tickets, one per row tile: fewer than the GPU's CTA slots (split K runs only then), so
  // one CTA zeroes them with 32-bit indices. A 64-bit loop over the grid made the compiler divide
  // 64-bit integers for its trip count, and was 0.1-0.2 us slower on 4096 x 4096 at m = 8 (bench/RESULTS.md).
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < n_counters; i += blockDim.x) counters[i] = 0;
  const int col = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first = kLaneElems * (lane % kBlockLanes);  // the lane's first element of its block
  const int64_t block = static_cast<int64_t>(blockIdx.x) * quant_warp_blocks(kLaneElems) + lane / kBlockLanes;
  const bool inside = kLaneElems == 1 || block < k / kBlockK;  // a run of several blocks may pass the end of K
  const int64_t item = block * cols + col;
  int8_t* const q_out = xq + item * kBlockK;
  // The lane's bytes at their places in the mma's k order: of eight elements, the even ones' word (b0),
  // then the odd ones' (b1).
  auto store = [&](const int (&q)[kLaneElems]) {
    if constexpr (kLaneElems == 1) {
      q_out[permuted_position(first)] = static_cast<int8_t>(q[0]);
    } else {
      uint32_t words[2] = {};
#pragma unroll
      for (int i = 0; i < kLaneElems; ++i) words[i % 2] |= (static_cast<uint32_t>(q[i]) & 0xffu) << (8 * (i / 2));
      *reinterpret_cast<uint2*>(q_out + first) = make_uint2(words[0], words[1]);
    }
  };
  if (col >= m) {
    if (inside) {
      if (first == 0) meta[item] = BlockMeta{0.f, 0};
      store({});
    }
    return;
  }
  float v[kLaneElems] = {};
  if (inside) {
    const __nv_bfloat16* src = x + col * k + block * kBlockK + first;
    if (kLaneElems == 8 && x_aligned) {  // x's rows are 64-byte multiples: its base decides every lane's alignment
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < kLaneElems; ++i)
        v[i] = __uint_as_float(i % 2 ? words[i / 2] & 0xffff0000u : words[i / 2] << 16);
    } else {
#pragma unroll
      for (int i = 0; i < kLaneElems; ++i) v[i] = __bfloat162float(src[i]);
    }
  }
  // Over the block's lanes (the warp, or a quad): one redux where it is the warp (this kernel's latency
  // is on the chain's critical path: one redux in place of five shuffle rounds).
  auto reduce = [](auto value, auto op, auto redux) {
    if constexpr (kBlockLanes == 32) {
      return redux(value);
    } else {
#pragma unroll
      for (int offset = 1; offset < kBlockLanes; offset *= 2)
        value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
      return value;
    }
  };
  // The bits of |v| order as the values do, with Inf and NaN above every finite value: integer maxima
  // give amax and whether the block is finite at once.
  unsigned amax = 0;
#pragma unroll
  for (int i = 0; i < kLaneElems; ++i) amax = max(amax, __float_as_uint(fabsf(v[i])));
  amax = reduce(amax, [](unsigned a, unsigned b) { return max(a, b); },
                [](unsigned a) { return __reduce_max_sync(0xffffffffu, a); });
  // A NaN or Inf anywhere in the block makes d NaN, so every output it feeds is NaN.
  const bool finite = amax < kInfinityBits;
  const float d = finite ? __uint_as_float(amax) / 127.f : __int_as_float(0x7fffffff);  // IEEE division, as the reference
  int q[kLaneElems] = {}, sum = 0;
  if (finite) quantize_elements(v, d, q);
#pragma unroll
  for (int i = 0; i < kLaneElems; ++i) sum += q[i];
  sum = reduce(sum, [](int a, int b) { return a + b; }, [](int a) { return __reduce_add_sync(0xffffffffu, a); });
  if (!inside) return;
  if (first == 0) meta[item] = BlockMeta{d, -sum};
  store(q);
}

// Weights are streamed once: keep them out of L1, which holds the re-read activations. (Scales
// and zeros go through L1: streaming them too measured even at gs 32 and 3-5% slower at gs 128.)
__device__ __forceinline__ uint4 load_stream_16(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// A tile's ticket, with release semantics for the partial sums this CTA stored (ordered before it
// by __syncthreads, as CUTLASS's semaphores do) and acquire semantics for the other CTAs': one L2
// round trip, where __threadfence + atomicAdd + __threadfence waited on three.
__device__ __forceinline__ unsigned take_ticket(unsigned* counter) {
  unsigned ticket;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(ticket) : "l"(counter) : "memory");
  return ticket;
}

struct GemmParams {
  const uint4* qdata;     // [tiles][blocks][32 lanes] x 16 bytes
  const uint2* scale;     // [tiles][groups][8 quads] x 4 bf16: rows g, g+8, g+16, g+24
  const uint32_t* zero;   // [tiles][groups][8 quads] x 4 int8, the same rows; or [tiles][8 quads]; or [tiles] int8
  const BlockMeta* meta;  // [blocks][Cols::kStored]
  const int8_t* xq;       // [blocks][Cols::kStored][32]
  __nv_bfloat16* out;     // [m][n]
  float* partial;         // [splits][tiles][kAcc * 32], when splits > 1
  unsigned* counters;     // [tiles], zeroed by quantize_activations
  int m, n, tiles, blocks, groups;
  int group_shift;        // log2(blocks per group), or -1 when that is not a power of two
  int blocks_per_group;
  int splits, split_blocks;
};

__device__ __forceinline__ int group_of(const GemmParams& p, int block) {
  return p.group_shift >= 0 ? block >> p.group_shift : block / p.blocks_per_group;
}

// What a warp loads ahead for kStageBlocks blocks of its tile: each lane's 16 bytes of nibbles per
// block, and the scales and zeros of its four rows once per run of kGroupBlocks blocks (a run never
// spans two groups; zeros only where they vary by group). Blocks past the end of the warp's share
// load the last block again (their activation scale is then zeroed): no branch keeps the loads from
// being issued together.
template <int kGroupBlocks>
struct Stage {
  static constexpr int kRuns = kStageBlocks / kGroupBlocks;
  uint4 w[kStageBlocks];
  uint2 s[kRuns];
  uint32_t z[kRuns];
};

// Where a warp's stage starts in its tile's weights: pointers that advance by a fixed stride, so that
// a whole stage loads at immediate offsets from them. With exact groups (a run of kGroupBlocks blocks
// is one whole group) the stage's scales and zeros are consecutive too; otherwise each run finds its
// group from the block.
struct WeightCursor {
  const uint4* q;      // this lane's 16 bytes of the stage's first block
  const uint2* s;      // exact groups: this quad's scales of the stage's first group
  const uint32_t* z;   // ... and zeros
};

// Loads the stage `ahead` strides past the cursor's; valid = blocks of it inside the warp's share
// (only the last stage has fewer than kStageBlocks: it loads its last block again in their place,
// no branch keeps the loads of a stage from being issued together).
template <int kWarps, int kGroupBlocks, bool kExactGroups, ZeroPoints kZeros, int kAhead>
__device__ __forceinline__ Stage<kGroupBlocks> load_stage(const GemmParams& p, const WeightCursor& c,
                                                          const uint2* ws, const uint32_t* wz,
                                                          int first, int valid) {
  constexpr int kRuns = Stage<kGroupBlocks>::kRuns;
  constexpr int kStride = kWarps * kStageBlocks;
  constexpr int kGroupStride = kStride / kGroupBlocks * 8;
  const uint4* q = c.q + kAhead * kStride * 32;
  Stage<kGroupBlocks> st;
  // block(j): the block loaded in slot j; a whole stage's are compile-time offsets.
  auto fill = [&](auto block) {
#pragma unroll
    for (int j = 0; j < kStageBlocks; ++j) st.w[j] = load_stream_16(q + block(j) * 32);
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      if constexpr (kExactGroups) {
        const int run = block(r * kGroupBlocks) / kGroupBlocks;
        st.s[r] = __ldg(c.s + kAhead * kGroupStride + run * 8);
        if constexpr (kZeros == ZeroPoints::kPerGroup) st.z[r] = __ldg(c.z + kAhead * kGroupStride + run * 8);
      } else {
        const int group = group_of(p, first + kAhead * kStride + block(r * kGroupBlocks));
        st.s[r] = __ldg(ws + group * 8);
        if constexpr (kZeros == ZeroPoints::kPerGroup) st.z[r] = __ldg(wz + group * 8);
      }
    }
  };
  if (valid >= kStageBlocks) {
    fill([](int j) { return j; });
  } else {
    fill([valid](int j) { return min(j, valid - 1); });
  }
  return st;
}

// The columns one lane accumulates: up to kLaneCols stored columns, mma column 2t only (column t);
// otherwise the mma's two, 2t and 2t + 1, of each 8-column tile.
constexpr int col_tiles(int cols) { return cols > kColTile ? 2 : 1; }
constexpr int cols_per_tile(int cols) { return cols <= kLaneCols ? 1 : 2; }
constexpr int acc_slots(int cols) { return 2 * 2 * col_tiles(cols) * cols_per_tile(cols); }  // m16 halves x row halves x columns

template <int kCols>
struct Cols {
  static constexpr int kTiles = col_tiles(kCols);
  static constexpr int kPerTile = cols_per_tile(kCols);
  static constexpr int kAcc = acc_slots(kCols);
  // Columns per block in the quantized activations and their (d, -sum): up to kLaneCols only the
  // first m are written; otherwise those past m are zero padding.
  static constexpr int kStored = kCols;
  using Meta = std::conditional_t<kPerTile == 2, uint4, uint2>;  // (d, -sum) of the lane's columns
};

// A stage's activations: B fragments and (d, -sum) per block and column tile (L1/L2 hits, loaded
// together so their latencies overlap).
template <int kCols>
struct Acts {
  uint2 b[kStageBlocks][Cols<kCols>::kTiles];
  typename Cols<kCols>::Meta meta[kStageBlocks][Cols<kCols>::kTiles];
};

// The stage's activations start at x (this lane's B fragment of the first block, per column tile)
// and mt ((d, -sum) of its columns); blocks are kStored * 32 bytes and kStored entries apart.
template <int kCols>
__device__ __forceinline__ Acts<kCols> load_acts(const int8_t* const (&x)[Cols<kCols>::kTiles],
                                                 const BlockMeta* mt, int valid) {
  using C = Cols<kCols>;
  Acts<kCols> a;
  auto fill = [&](auto block) {
#pragma unroll
    for (int j = 0; j < kStageBlocks; ++j)
#pragma unroll
      for (int ct = 0; ct < C::kTiles; ++ct) {
        a.b[j][ct] = __ldg(reinterpret_cast<const uint2*>(x[ct] + block(j) * C::kStored * kBlockK));
        a.meta[j][ct] = __ldg(reinterpret_cast<const typename C::Meta*>(mt + block(j) * C::kStored + ct * kColTile));
      }
  };
  if (valid >= kStageBlocks) {
    fill([](int j) { return j; });
  } else {
    fill([valid](int j) { return min(j, valid - 1); });
  }
  return a;
}

// Byte `i` of v as a signed int in one PRMT (its sign mode; __byte_perm has none).
__device__ __forceinline__ int sign_extended_byte(uint32_t v, int i) {
  int out;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(out) : "r"(v), "r"(0x8880 + 0x1111 * i));
  return out;
}

// d = a * b + c (c: a magic float's bits, whose FADD or FFMA then gives each integer's float), a: 16 x 32
// weights, b: 32 x 8 activations.
__device__ __forceinline__ void mma_s8(const uint32_t (&a)[4], const uint2& b, int c, int (&d)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %10, %10, %10};"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "r"(c));
}

// fn(half, h, ct, e) for each of a lane's accumulators, in slot order (see slot_position).
template <int CT, int E, typename Fn>
__device__ __forceinline__ void for_each_acc(Fn&& fn) {
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ct = 0; ct < CT; ++ct)
#pragma unroll
        for (int e = 0; e < E; ++e) fn(half, h, ct, e);
}

// Symmetric weights: (u ^ 8) << 4 as an int8 is 16 (u - 8), so the mma gives 16 S, S = dot(u - 8, q), with
// no zero-point term; magic bits of ULP 1/16 (1.5 * 2^19; |16 S| < 2^20) turn 16 S into the float S.
constexpr int kMagicSymBits = 0x49400000;
constexpr float kMagicSym = 786432.f;

// A fragment byte per nibble of `word` at `shift` (0: low nibbles, 4: high), as the mma's int8 operand:
// u itself, or for symmetric weights 16 (u - 8), in one LOP3 (the compiler's code takes two).
template <bool kSymmetric, int kShift>
__device__ __forceinline__ uint32_t nibble_bytes(uint32_t word) {
  uint32_t out;
  if constexpr (kSymmetric) {
    asm("lop3.b32 %0, %1, 0xf0f0f0f0, 0x80808080, 0x6a;" : "=r"(out) : "r"(word << (4 - kShift)));  // (a & b) ^ c
  } else {
    out = (word >> kShift) & 0x0f0f0f0fu;
  }
  return out;
}

// zeros(r): the zero points of run r (the lane's four rows, one byte each); unused for symmetric weights.
template <int kCols, int kGroupBlocks, bool kSymmetric, typename Zeros>
__device__ __forceinline__ void accumulate_stage(
    const Stage<kGroupBlocks>& st, Zeros&& zeros, const Acts<kCols>& a, int valid,
    float (&acc)[2][2][Cols<kCols>::kTiles][Cols<kCols>::kPerTile]) {
  constexpr int CT = Cols<kCols>::kTiles, E = Cols<kCols>::kPerTile;
#pragma unroll
  for (int r = 0; r < Stage<kGroupBlocks>::kRuns; ++r) {
    int zero[2][2] = {};
    if constexpr (!kSymmetric) {
#pragma unroll
      for (int i = 0; i < 4; ++i) zero[i / 2][i % 2] = sign_extended_byte(zeros(r), i);
    }
    const uint2 s = st.s[r];
    const float scale[2][2] = {{__uint_as_float(s.x << 16), __uint_as_float(s.x & 0xffff0000u)},
                               {__uint_as_float(s.y << 16), __uint_as_float(s.y & 0xffff0000u)}};
    // Symmetric: s * S exactly, as fmaf(s, magic + S, -s * magic) (s is a bf16 and |S| < 2^16, so s * S
    // fits fp32's 24 bits; s * kMagicSym is finite for |s| < 2^108, pack_int4 keeps |s| < 2^100).
    float neg_s_magic[2][2] = {};
    if constexpr (kSymmetric) {
#pragma unroll
      for (int i = 0; i < 4; ++i) neg_s_magic[i / 2][i % 2] = -kMagicSym * scale[i / 2][i % 2];
    }
    float run[2][2][CT][E];
#pragma unroll
    for (int jj = 0; jj < kGroupBlocks; ++jj) {
      const int j = r * kGroupBlocks + jj;
      const uint4 w = st.w[j];
      // Lane words: rows g, g+8 (first m16 half), g+16, g+24 (second); low nibbles are the
      // even elements of the lane's 8-element run, high nibbles the odd ones.
      const uint32_t frag[2][4] = {
          {nibble_bytes<kSymmetric, 0>(w.x), nibble_bytes<kSymmetric, 0>(w.y), nibble_bytes<kSymmetric, 4>(w.x),
           nibble_bytes<kSymmetric, 4>(w.y)},
          {nibble_bytes<kSymmetric, 0>(w.z), nibble_bytes<kSymmetric, 0>(w.w), nibble_bytes<kSymmetric, 4>(w.z),
           nibble_bytes<kSymmetric, 4>(w.w)}};
#pragma unroll
      for (int ct = 0; ct < CT; ++ct) {
        const auto mm = a.meta[j][ct];
        // A block past the warp's share repeats the last one: d = 0 adds nothing.
        const float d[2] = {j < valid ? __uint_as_float(mm.x) : 0.f,
                            j < valid && E == 2 ? __uint_as_float(reinterpret_cast<const uint32_t*>(&mm)[2]) : 0.f};
        const int neg_sum[2] = {static_cast<int>(mm.y),
                                E == 2 ? static_cast<int>(reinterpret_cast<const uint32_t*>(&mm)[3]) : 0};
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          int dot[4];
          mma_s8(frag[half], a.b[j][ct], kSymmetric ? kMagicSymBits : kMagicBits, dot);
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < E; ++e) {
              if constexpr (kSymmetric) {
                // Two FFMAs an output in place of four instructions: 3-5% faster on 4096 x 4096 at every M,
                // and t(8) / t(1) 0.01-0.02 lower there (bench/RESULTS.md, 2026-11-28).
                const float s_sum = fmaf(scale[half][h], __int_as_float(dot[2 * h + e]), neg_s_magic[half][h]);
                acc[half][h][ct][e] = fmaf(d[e], s_sum, acc[half][h][ct][e]);
              } else {
                // dot - z * sum(q), exact, then its float: one IMAD and one FADD.
                const float f = __int_as_float(dot[2 * h + e] + zero[half][h] * neg_sum[e]) - kMagic;
                run[half][h][ct][e] = jj == 0 ? d[e] * f : fmaf(d[e], f, run[half][h][ct][e]);
              }
            }
        }
      }
    }
    if constexpr (!kSymmetric)
      for_each_acc<CT, E>([&](int half, int h, int ct, int e) {
        acc[half][h][ct][e] = fmaf(scale[half][h], run[half][h][ct][e], acc[half][h][ct][e]);
      });
  }
}

// Output element of accumulator slot `slot` (kAcc of them per lane) of lane `lane`.
template <int kCols>
__device__ __forceinline__ void slot_position(int tile, int slot, int lane, int& row, int& col) {
  constexpr int CT = Cols<kCols>::kTiles, E = Cols<kCols>::kPerTile;
  const int e = slot % E, ct = (slot / E) % CT, h = (slot / (E * CT)) % 2, half = slot / (2 * E * CT);
  row = tile * kTileRows + half * 16 + h * 8 + lane / 4;
  col = E == 1 ? lane % 4 : ct * kColTile + 2 * (lane % 4) + e;
}

// Resident CTAs per SM that the register budget is set for.
constexpr int ctas_per_sm(int warps, int cols) {
  return warps == kWideWarps ? 1 : warps == kSmallWarps ? 2 * kCtasPerSm : cols > kColTile ? kCtasPerSm / 2 : kCtasPerSm;
}

// kMaxShared: a kernel of its own, whose launches prefer the largest shared-memory carveout (Plan::max_shared).
template <int kWarps, int kCols, int kGroupBlocks, bool kExactGroups, ZeroPoints kZeros, bool kMaxShared>
__global__ void __launch_bounds__(kWarps * 32, ctas_per_sm(kWarps, kCols))
w4a8_gemm(const GemmParams p) {
  using C = Cols<kCols>;
  constexpr bool kRowZeros = kZeros == ZeroPoints::kPerRow, kSymmetric = kZeros == ZeroPoints::kSymmetric;
  constexpr int CT = C::kTiles, E = C::kPerTile, kAcc = C::kAcc;
  static_assert(kStageBlocks % kGroupBlocks == 0, "a stage holds whole runs");
  __shared__ float reduced[kWarps][kAcc][32];
  __shared__ unsigned ticket;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int tile = blockIdx.x % p.tiles, split = blockIdx.x / p.tiles;
  const int begin = split * p.split_blocks, end = min(begin + p.split_blocks, p.blocks);

  int first = begin + warp * kStageBlocks;
  const uint2* ws = p.scale + static_cast<int64_t>(tile) * p.groups * 8 + g;
  const uint32_t* wz = p.zero + static_cast<int64_t>(tile) * (kRowZeros ? 1 : p.groups) * 8 + g;
  // One zero point per row: loaded once, not per group.
  const uint32_t row_zero = kRowZeros ? __ldg(wz) : 0u;
  // Symmetric weights: the tile's one zero byte must be 8 (the layout's contract, which the host cannot
  // check without reading device memory); any other value makes the tile's outputs NaN, not wrong numbers.
  const bool zeros_as_declared =
      !kSymmetric || __ldg(reinterpret_cast<const signed char*>(p.zero) + tile) == kSymmetricZero;
  auto output = [&](float sum) {
    return __float2bfloat16_rn(zeros_as_declared ? sum : __int_as_float(0x7fffffff));
  };
  const int first_group = kExactGroups ? first / kGroupBlocks : 0;
  WeightCursor c{p.qdata + (static_cast<int64_t>(tile) * p.blocks + first) * 32 + lane, ws + first_group * 8,
                 wz + first_group * 8};
  // Up to kLaneCols columns, lane g reads column g / 2 and lane t scales column t; lanes past column
  // m - 1 read that one again (only the m written columns are read), for outputs never stored.
  // Otherwise lane g reads column g of each tile (padding columns are zeros, and their d is 0).
  const int8_t* x[CT];
#pragma unroll
  for (int ct = 0; ct < CT; ++ct)
    x[ct] = p.xq + (static_cast<int64_t>(first) * C::kStored + (E == 1 ? min(g / 2, p.m - 1) : ct * kColTile + g)) * kBlockK +
            8 * t;
  const BlockMeta* mt = p.meta + static_cast<int64_t>(first) * C::kStored + (E == 1 ? min(t, p.m - 1) : 2 * t);

  float acc[2][2][CT][E] = {};
  constexpr int kStride = kWarps * kStageBlocks;
  // One stage: compute `cur` (loaded by the step before, or now without prefetch) while the next
  // stage's weights load into `nxt` (unless already loaded). Two steps per trip swap the stages'
  // roles: no register copies.
  auto step = [&](Stage<kGroupBlocks>& cur, Stage<kGroupBlocks>& nxt, bool nxt_loaded = false) {
    const int valid = end - first;
    if constexpr (kPrefetch) {
      if (valid > kStride && !nxt_loaded)
        nxt = load_stage<kWarps, kGroupBlocks, kExactGroups, kZeros, 1>(p, c, ws, wz, first, valid - kStride);
    } else {
      cur = load_stage<kWarps, kGroupBlocks, kExactGroups, kZeros, 0>(p, c, ws, wz, first, valid);
    }
    accumulate_stage<kCols, kGroupBlocks, kSymmetric>(cur, [&](int r) { return kRowZeros ? row_zero : cur.z[r]; },
                                                      load_acts<kCols>(x, mt, valid), valid, acc);
    first += kStride;
    c.q += kStride * 32;
    c.s += kStride / kGroupBlocks * 8;
    c.z += kStride / kGroupBlocks * 8;
#pragma unroll
    for (int ct = 0; ct < CT; ++ct) x[ct] += kStride * C::kStored * kBlockK;
    mt += kStride * C::kStored;
  };
  // A warp's first two stages load before the wait, so that they stream while the kernels ahead end
  // (up to 0.6 us faster than the first alone on the one-wave grids of long K, 14336 x 4096 and
  // 21504 x 5376; bench/RESULTS.md, 2026-11-27). A wide CTA's warp whose share is just those two
  // (4096 x 4096) keeps its own load and two steps: in the loop it measured 0.4 us slower, and one
  // load for both cases compiled the long-K wide kernels 0.5-0.8 us slower (14336 x 4096).
  Stage<kGroupBlocks> even, odd;
  if (kPrefetch && first < end)
    even = load_stage<kWarps, kGroupBlocks, kExactGroups, kZeros, 0>(p, c, ws, wz, first, end - first);
  const bool both_early = kPrefetch && kWarps == kWideWarps && end - first > kStride && end - first <= 2 * kStride;
  if (both_early)
    odd = load_stage<kWarps, kGroupBlocks, kExactGroups, kZeros, 1>(p, c, ws, wz, first, end - first - kStride);
  bool odd_loaded = false;
  if (kPrefetch && !both_early && end - first > kStride) {
    odd = load_stage<kWarps, kGroupBlocks, kExactGroups, kZeros, 1>(p, c, ws, wz, first, end - first - kStride);
    odd_loaded = true;
  }
  wait_for_prerequisites();  // weights never depend on the kernel before us; activations do
  // The next call's activation quantizer may launch now; it waits for us before it writes.
  launch_dependents();
  if (both_early) {
    step(even, odd, true);
    step(odd, even);
  } else {
    while (first < end) {
      step(even, odd, odd_loaded);
      odd_loaded = false;
      if (first >= end) break;
      step(odd, even);
    }
  }

  // Reduce the warps' shares; thread i then owns slot i / 32 of lane i % 32.
  int slot = 0;
  for_each_acc<CT, E>([&](int half, int h, int ct, int e) { reduced[warp][slot++][lane] = acc[half][h][ct][e]; });
  __syncthreads();
  float* mine = p.partial + (static_cast<int64_t>(split) * p.tiles + tile) * (kAcc * 32);
  for (int i = threadIdx.x; i < kAcc * 32; i += kWarps * 32) {
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += reduced[v][i / 32][i % 32];
    int row, col;
    slot_position<kCols>(tile, i / 32, i % 32, row, col);
    if (p.splits > 1) {
      mine[i] = sum;
    } else if (col < p.m) {
      p.out[static_cast<int64_t>(col) * p.n + row] = output(sum);
    }
  }
  if (p.splits == 1) return;

  // Split K: the last CTA of the tile adds the partial sums, in split order (deterministic).
  __syncthreads();
  if (threadIdx.x == 0) ticket = take_ticket(p.counters + tile);
  __syncthreads();
  if (ticket != static_cast<unsigned>(p.splits - 1)) return;
  for (int i = threadIdx.x; i < kAcc * 32; i += kWarps * 32) {
    int row, col;
    slot_position<kCols>(tile, i / 32, i % 32, row, col);
    if (col >= p.m) continue;
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s)
      sum += __ldcg(p.partial + (static_cast<int64_t>(s) * p.tiles + tile) * (kAcc * 32) + i);
    p.out[static_cast<int64_t>(col) * p.n + row] = output(sum);
  }
}

int cols_for(int64_t m) { return m <= kLaneCols ? kLaneCols : m <= kColTile ? kColTile : 2 * kColTile; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t align16(int64_t bytes) { return ceil_div(bytes, 16) * 16; }

// What the plan and the launch need of the current device, read once per device.
struct DeviceInfo {
  int device = -1;
  int multiprocessors = 1;
  bool pdl = false;  // programmatic dependent launch (compute capability 9.0+)
};

DeviceInfo device_info() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 2 * multiprocessors + pdl; 0 until read
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return {};
  int packed = device < kMaxDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (packed == 0) {
    int count = 0, major = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1 ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
      return {};
    packed = 2 * count + (major >= 9);
    if (device < kMaxDevices) cache[device].store(packed, std::memory_order_relaxed);
  }
  return {device, packed / 2, (packed & 1) != 0};
}

// How one call divides its work and its workspace; a pure function of the shapes and the device.
struct Plan {
  int cols, warps;
  bool max_shared;  // its kernels prefer the largest shared-memory carveout (kMaxSharedPlans)
  bool few_quant_ctas;  // the quantizer's lanes take kFewCtasLaneElems elements (quantize_activations)
  int64_t tiles, blocks, splits, split_blocks;
  int64_t meta_bytes, xq_bytes, partial_bytes, counter_bytes;
  int64_t workspace() const { return meta_bytes + xq_bytes + partial_bytes + counter_bytes; }
};

Plan make_plan(int64_t m, int64_t n, int64_t k) {
  Plan pl{};
  pl.cols = cols_for(m);
  pl.tiles = n / kTileRows;
  pl.blocks = k / kBlockK;
  // Split K only when the row tiles cannot fill one wave of resident CTAs (a split costs a
  // partial-sum round trip and shortens each warp's stream): then the fewest splits whose CTAs fill
  // the waves to 90%, each warp keeping at least one stage. The same splits for every m (two column
  // tiles, with half the CTAs resident, then run in more waves): a row's sums are added in the same
  // order whatever the other rows, so a verify's row equals a decode's bit for bit.
  const int64_t sms = device_info().multiprocessors;
  auto most_splits = [&](int64_t slots, int warps) {
    return pl.tiles >= slots ? int64_t{1} : std::clamp<int64_t>(pl.blocks / (warps * kStageBlocks), 1, 64);
  };
  auto split_blocks_of = [&](int64_t s) { return ceil_div(ceil_div(pl.blocks, s), kSplitAlign) * kSplitAlign; };
  const int64_t slots = sms * kCtasPerSm;
  const int64_t most = most_splits(slots, kCtaWarps);
  int64_t splits = 1;
  double best = 0.;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t ctas = pl.tiles * s;
    const double filled = static_cast<double>(ctas) / (ceil_div(ctas, slots) * slots);
    if (filled > best + 1e-9) best = filled, splits = s;
    if (filled >= 0.9) break;
  }
  // A split count that kCtasPerSm divides runs as wide CTAs of kCtasPerSm splits each (kWideWarps).
  pl.warps = kCtaWarps;
  if (kWideCtas && splits % kCtasPerSm == 0) pl.warps = kWideWarps, splits /= kCtasPerSm;
  if constexpr (kSmallCtas) {
    // Small CTAs where they cost less, in stage times: per wave, a warp's share of its split, one
    // stage for the CTA's start (its first loads) and end, and one for split K's partial sums. Only
    // strictly less: the 8-warp and wide plans above are the measured defaults.
    auto cost = [&](int warps, int64_t s) {
      const int64_t split_blocks = split_blocks_of(s), real_splits = ceil_div(pl.blocks, split_blocks);
      const int64_t waves = ceil_div(pl.tiles * real_splits, sms * ctas_per_sm(warps, pl.cols));
      return waves * (ceil_div(split_blocks, warps * kStageBlocks) + 1 + (real_splits > 1));
    };
    int64_t least = cost(pl.warps, splits);
    const int64_t small_most = most_splits(sms * ctas_per_sm(kSmallWarps, pl.cols), kSmallWarps);
    for (int64_t s = 1; s <= small_most; ++s) {
      const int64_t c = cost(kSmallWarps, s);
      if (c < least) least = c, splits = s, pl.warps = kSmallWarps;
    }
  }
  pl.split_blocks = split_blocks_of(splits);
  pl.splits = ceil_div(pl.blocks, pl.split_blocks);
  constexpr int64_t kWideStage = kWideWarps * kStageBlocks;  // blocks one stage of a wide CTA covers
  pl.max_shared = kMaxSharedPlans && kPrefetch && kWideCtas && pl.warps == kWideWarps && pl.splits == 1 &&
                  pl.blocks > kWideStage && pl.blocks <= 2 * kWideStage;
  // One wave of wide CTAs leaves SMs idle, where the quantizer's few CTAs run.
  pl.few_quant_ctas = pl.max_shared && pl.tiles <= sms;
  pl.meta_bytes = align16(pl.blocks * pl.cols * static_cast<int64_t>(sizeof(BlockMeta)));
  pl.xq_bytes = align16(pl.blocks * pl.cols * kBlockK);
  pl.partial_bytes = pl.splits > 1 ? pl.splits * pl.tiles * acc_slots(pl.cols) * 32 * 4 : 0;
  pl.counter_bytes = pl.splits > 1 ? align16(pl.tiles * 4) : 0;
  return pl;
}

int run_blocks(int64_t group_size) {  // kGroupBlocks: the largest of 4, 2, 1 that divides a group
  const int64_t blocks = group_size / kBlockK;
  const int run = blocks % 4 == 0 ? 4 : blocks % 2 == 0 ? 2 : 1;
  return std::min(run, kStageBlocks);
}

// Launches `kernel` so that it may start before the kernel ahead of it in the stream ends
// (programmatic dependent launch), where the device has it: both kernels call griddepcontrol.wait
// before they touch what the kernel ahead of them writes.
template <typename... Params, typename... Args>
cudaError_t launch_chained(void (*kernel)(Params...), int64_t grid, int block, cudaStream_t stream,
                           bool pdl, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(block);
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// How the kernels of one call launch: stream, device, whether chained, and the plan's CTAs.
struct Launch {
  cudaStream_t stream;
  int device;
  bool pdl;
  int warps;
  bool max_shared;
};

// Sets kKernel's preference for the largest shared-memory carveout on `device`, once per device. A
// preference that cannot be set costs only speed: its error is cleared, so that the launch reports its own.
template <auto kKernel>
void prefer_max_shared(int device) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d (devices past 63: every call)
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if ((done.load(std::memory_order_relaxed) & bit) != 0) return;
  if (cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared) ==
      cudaSuccess)
    done.fetch_or(bit, std::memory_order_relaxed);
  else
    (void)cudaGetLastError();
}

template <auto kKernel, bool kMaxShared, typename... Args>
cudaError_t launch(int64_t grid, int block, const Launch& l, Args... args) {
  if constexpr (kMaxShared) prefer_max_shared<kKernel>(l.device);
  return launch_chained(kKernel, grid, block, l.stream, l.pdl, args...);
}

template <int kWarps, int kCols, int kGroupBlocks, ZeroPoints kZeros, bool kMaxShared = false>
cudaError_t launch_gemm(const GemmParams& p, const Launch& l) {
  const int64_t grid = static_cast<int64_t>(p.tiles) * p.splits;
  return p.blocks_per_group == kGroupBlocks
             ? launch<w4a8_gemm<kWarps, kCols, kGroupBlocks, true, kZeros, kMaxShared>, kMaxShared>(
                   grid, kWarps * 32, l, p)
             : launch<w4a8_gemm<kWarps, kCols, kGroupBlocks, false, kZeros, kMaxShared>, kMaxShared>(
                   grid, kWarps * 32, l, p);
}

template <int kCols, int kGroupBlocks, ZeroPoints kZeros>
cudaError_t dispatch_warps(const GemmParams& p, const Launch& l) {
  if constexpr (kWideCtas) {
    if (l.warps == kWideWarps)
      return l.max_shared ? launch_gemm<kWideWarps, kCols, kGroupBlocks, kZeros, true>(p, l)
                          : launch_gemm<kWideWarps, kCols, kGroupBlocks, kZeros>(p, l);
  }
  if constexpr (kSmallCtas) {
    if (l.warps == kSmallWarps) return launch_gemm<kSmallWarps, kCols, kGroupBlocks, kZeros>(p, l);
  }
  return launch_gemm<kCtaWarps, kCols, kGroupBlocks, kZeros>(p, l);
}

template <int kCols, int kGroupBlocks>
cudaError_t dispatch_zeros(const GemmParams& p, ZeroPoints zeros, const Launch& l) {
  switch (zeros) {
    case ZeroPoints::kPerRow: return dispatch_warps<kCols, kGroupBlocks, ZeroPoints::kPerRow>(p, l);
    case ZeroPoints::kSymmetric: return dispatch_warps<kCols, kGroupBlocks, ZeroPoints::kSymmetric>(p, l);
    default: return dispatch_warps<kCols, kGroupBlocks, ZeroPoints::kPerGroup>(p, l);
  }
}

template <int kCols>
cudaError_t dispatch_groups(const GemmParams& p, int group_blocks, ZeroPoints zeros, const Launch& l) {
  if constexpr (kStageBlocks % 4 == 0) {
    if (group_blocks == 4) return dispatch_zeros<kCols, 4>(p, zeros, l);
  }
  return group_blocks == 2 ? dispatch_zeros<kCols, 2>(p, zeros, l) : dispatch_zeros<kCols, 1>(p, zeros, l);
}

}  // namespace

size_t workspace_bytes(int64_t m, int64_t n, int64_t k) {
  return static_cast<size_t>(make_plan(m, n, k).workspace());
}

const char* launch_plain_mm(const PlainMmArgs& a, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Plan pl = make_plan(a.m, a.n, a.k);
  auto* base = static_cast<uint8_t*>(a.workspace);
  auto* meta = reinterpret_cast<BlockMeta*>(base);
  auto* xq = reinterpret_cast<int8_t*>(base + pl.meta_bytes);
  auto* partial = reinterpret_cast<float*>(base + pl.meta_bytes + pl.xq_bytes);
  auto* counters = reinterpret_cast<unsigned*>(base + pl.meta_bytes + pl.xq_bytes + pl.partial_bytes);
  const DeviceInfo dev = device_info();
  const Launch l{stream, dev.device, dev.pdl, pl.warps, pl.max_shared};

  const int quant_threads = static_cast<int>((pl.cols == kLaneCols ? a.m : pl.cols) * 32);  // see quantize_activations
  auto quantize = [&](auto lane_elems, auto max_shared) {
    constexpr int kLaneElems = decltype(lane_elems)::value;
    constexpr bool kMaxShared = decltype(max_shared)::value;
    return launch<quantize_activations<kLaneElems, kMaxShared>, kMaxShared>(
        ceil_div(pl.blocks, quant_warp_blocks(kLaneElems)), quant_threads, l, static_cast<const __nv_bfloat16*>(a.x),
        reinterpret_cast<uintptr_t>(a.x) % 16 == 0, static_cast<int>(a.m), a.k, pl.cols, meta, xq, counters,
        static_cast<int>(pl.splits > 1 ? pl.tiles : 0));
  };
  using One = std::integral_constant<int, 1>;
  using Few = std::integral_constant<int, kFewCtasLaneElems>;
  cudaError_t err = pl.few_quant_ctas ? quantize(Few{}, std::true_type{})
                    : pl.max_shared   ? quantize(One{}, std::true_type{})
                                      : quantize(One{}, std::false_type{});
  if (err != cudaSuccess) return cudaGetErrorString(err);

  const int64_t group_blocks = a.group_size / kBlockK;
  int group_shift = -1;
  for (int s = 0; s < 31; ++s)
    if ((int64_t{1} << s) == group_blocks) group_shift = s;
  const GemmParams p{reinterpret_cast<const uint4*>(a.qdata),
                     static_cast<const uint2*>(a.scale),
                     reinterpret_cast<const uint32_t*>(a.zero),
                     meta, xq, static_cast<__nv_bfloat16*>(a.out), partial, counters,
                     static_cast<int>(a.m), static_cast<int>(a.n),
                     static_cast<int>(pl.tiles), static_cast<int>(pl.blocks),
                     static_cast<int>(a.k / a.group_size), group_shift,
                     static_cast<int>(group_blocks), static_cast<int>(pl.splits),
                     static_cast<int>(pl.split_blocks)};
  const int run = run_blocks(a.group_size);
  switch (pl.cols) {
    case kLaneCols: err = dispatch_groups<kLaneCols>(p, run, a.zero_points, l); break;
#if ET_INT4_SHIM_GEMM_MAX_M > 8  // a second column tile only where the build allows m > 8
    case 2 * kColTile: err = dispatch_groups<2 * kColTile>(p, run, a.zero_points, l); break;
#endif
    default: err = dispatch_groups<kColTile>(p, run, a.zero_points, l); break;
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace et_int4::cuda
