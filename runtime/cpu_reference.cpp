#include "runtime/cpu_reference.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backends/cuda/int4/int4_mm.h"

namespace et_int4::cpu {
namespace {

float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

void plain_mm(const uint16_t* x, const uint8_t* qdata, const uint16_t* scale, const int8_t* zero,
              uint16_t* out, int64_t m, int64_t n, int64_t k, int64_t group_size, ZeroPoints zero_points) {
  const int64_t blocks = k / kBlockK, groups = k / group_size, blocks_per_group = group_size / kBlockK;
  std::vector<int8_t> q(m * k);
  std::vector<float> d(m * blocks);
  std::vector<int32_t> qsum(m * blocks);
  for (int64_t i = 0; i < m * blocks; ++i) {  // i = row * blocks + block: x is row-major
    const int64_t base = i * kBlockK;
    float amax = 0.f;
    bool finite = true;
    for (int64_t e = 0; e < kBlockK; ++e) {
      const float v = bf16_to_float(x[base + e]);
      finite = finite && std::isfinite(v);
      amax = std::fmax(amax, std::fabs(v));
    }
    // A NaN or Inf anywhere in the block makes d NaN, so every output it feeds is NaN.
    d[i] = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
    int32_t sum = 0;
    for (int64_t e = 0; e < kBlockK; ++e) {
      const float v = bf16_to_float(x[base + e]);
      const int32_t qv = !finite || d[i] == 0.f ? 0 : static_cast<int32_t>(std::nearbyint(v / d[i]));
      q[base + e] = static_cast<int8_t>(qv);
      sum += qv;
    }
    qsum[i] = sum;
  }
  std::vector<uint8_t> u(k);
  std::vector<float> s(groups);
  std::vector<int32_t> z(groups);
  const int64_t tile_bytes = blocks * kTileBlockBytes, tile_groups = groups * kTileRows;
  for (int64_t row = 0; row < n; ++row) {
    // Tiled layout (int4_mm.h): row 8i + g of a tile is word i of the lanes 4g + t.
    const int64_t tile = row / kTileRows, i = row % kTileRows / 8, g = row % 8;
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t b = kk / kBlockK, t = kk % kBlockK / 8, j = kk % 8;
      const uint8_t byte = qdata[tile * tile_bytes + b * kTileBlockBytes + (4 * g + t) * 16 + 4 * i + j / 2];
      u[kk] = j % 2 ? byte >> 4 : byte & 0x0f;
    }
    for (int64_t grp = 0; grp < groups; ++grp) {
      s[grp] = bf16_to_float(scale[tile * tile_groups + grp * kTileRows + 4 * g + i]);
      switch (zero_points) {
        case ZeroPoints::kPerGroup: z[grp] = zero[tile * tile_groups + grp * kTileRows + 4 * g + i]; break;
        case ZeroPoints::kPerRow: z[grp] = zero[tile * kTileRows + 4 * g + i]; break;
        case ZeroPoints::kSymmetric: z[grp] = zero[tile]; break;  // kSymmetricZero, checked by the caller
      }
    }
    for (int64_t col = 0; col < m; ++col) {
      float y = 0.f;
      for (int64_t grp = 0; grp < groups; ++grp) {
        float group_sum = 0.f;
        for (int64_t b = grp * blocks_per_group; b < (grp + 1) * blocks_per_group; ++b) {
          int32_t dot = 0;
          for (int64_t e = 0; e < kBlockK; ++e) dot += u[b * kBlockK + e] * q[col * k + b * kBlockK + e];
          group_sum += d[col * blocks + b] * static_cast<float>(dot - z[grp] * qsum[col * blocks + b]);
        }
        y += s[grp] * group_sum;
      }
      out[col * n + row] = float_to_bf16(y);
    }
  }
}

}  // namespace et_int4::cpu
