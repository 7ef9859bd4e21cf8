// quantize_math.cuh's q = rint(v / d) against the IEEE division and cvt.rni on every pair of a finite
// bf16 amax > 0 and a bf16 v with |v| <= amax (the quantizer's whole domain: d = amax / 127), through
// the lanes' paths of 1 and 8 elements. Prints the pairs checked and the mismatches; exits 1 on any.
// Built and run by tests/test_kernels_cuda.py.
#include <cstdio>

#include "backends/cuda/int4/quantize_math.cuh"

using et_int4::cuda::quantize_elements;

constexpr unsigned kLargestFinite = 0x7f7f;  // bf16 bits of the largest finite value

__global__ void check(unsigned long long* counts) {
  const unsigned amax_bits = blockIdx.x + 1;
  const float d = __uint_as_float(amax_bits << 16) / 127.f;
  unsigned long long pairs = 0, wrong = 0;
  for (unsigned base = threadIdx.x * 8; base < 0x10000; base += blockDim.x * 8) {
    float v[8];
    bool inside[8];
    for (int i = 0; i < 8; ++i) {
      inside[i] = ((base + i) & 0x7fff) <= amax_bits;
      v[i] = inside[i] ? __uint_as_float((base + i) << 16) : 0.f;
    }
    int q[8];
    quantize_elements(v, d, q);
    for (int i = 0; i < 8; ++i) {
      if (!inside[i]) continue;
      const int expected = __float2int_rn(__fdiv_rn(v[i], d));
      const float one[1] = {v[i]};
      int q1[1];
      quantize_elements(one, d, q1);
      ++pairs;
      wrong += (q[i] != expected) + (q1[0] != expected);
    }
  }
  atomicAdd(&counts[0], pairs);
  atomicAdd(&counts[1], wrong);
}

int main() {
  unsigned long long* counts = nullptr;
  unsigned long long host[2] = {};
  if (cudaMalloc(&counts, sizeof host) != cudaSuccess || cudaMemset(counts, 0, sizeof host) != cudaSuccess) return 2;
  check<<<kLargestFinite, 256>>>(counts);
  const cudaError_t err = cudaMemcpy(host, counts, sizeof host, cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    std::printf("CUDA error: %s\n", cudaGetErrorString(err));
    return 2;
  }
  std::printf("%llu pairs, %llu mismatches\n", host[0], host[1]);
  return host[1] != 0;
}
