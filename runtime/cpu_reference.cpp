#include "runtime/cpu_reference.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace et_int4::cpu {
namespace {

constexpr int64_t kBlockK = 32;

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
              uint16_t* out, int64_t m, int64_t n, int64_t k, int64_t group_size) {
  const int64_t blocks = k / kBlockK, groups = k / group_size, blocks_per_group = group_size / kBlockK;
  std::vector<int8_t> q(m * k);
  std::vector<float> d(m * blocks);
  std::vector<int32_t> qsum(m * blocks);
  for (int64_t i = 0; i < m * blocks; ++i) {  // i = row * blocks + block: x is row-major
    const int64_t base = i * kBlockK;
    float amax = 0.f;
    for (int64_t e = 0; e < kBlockK; ++e) amax = std::fmax(amax, std::fabs(bf16_to_float(x[base + e])));
    d[i] = amax / 127.f;
    int32_t sum = 0;
    for (int64_t e = 0; e < kBlockK; ++e) {
      const int32_t v = d[i] == 0.f ? 0 : static_cast<int32_t>(std::nearbyint(bf16_to_float(x[base + e]) / d[i]));
      q[base + e] = static_cast<int8_t>(v);
      sum += v;
    }
    qsum[i] = sum;
  }
  std::vector<uint8_t> u(k);
  for (int64_t row = 0; row < n; ++row) {
    for (int64_t kk = 0; kk < k; ++kk) {
      const uint8_t byte = qdata[row * (k / 2) + kk / 2];
      u[kk] = kk % 2 ? byte >> 4 : byte & 0x0f;
    }
    for (int64_t col = 0; col < m; ++col) {
      float y = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const int32_t z = zero[row * groups + g];
        float group_sum = 0.f;
        for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
          int32_t dot = 0;
          for (int64_t e = 0; e < kBlockK; ++e) dot += u[b * kBlockK + e] * q[col * k + b * kBlockK + e];
          group_sum += d[col * blocks + b] * static_cast<float>(dot - z * qsum[col * blocks + b]);
        }
        y += bf16_to_float(scale[row * groups + g]) * group_sum;
      }
      out[col * n + row] = float_to_bf16(y);
    }
  }
}

}  // namespace et_int4::cpu
