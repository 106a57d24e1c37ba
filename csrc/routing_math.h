// The per-element math of routing, shared by the CPU ops and the CUDA kernels so that both order experts
// identically (moe_kernels/routing.py is the definition). Plain C++: no torch, no CUDA headers needed.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOE_HOST_DEVICE inline
#endif

namespace moe_kernels {

// Router kinds, in the order of routing.ROUTERS.
enum RouterKind : int { kTopK = 0, kNoisyTopK = 1, kSwitch = 2 };

constexpr int kMaxExperts = 256;  // gating keeps one token's scores in one warp: 8 per lane
constexpr int kMaxK = 8;

// True when (key_a, id_a) comes before (key_b, id_b) in a token's expert order: descending key, NaN first
// (torch.sort(descending=True) puts NaN first), equal keys to the lower expert id.
MOE_HOST_DEVICE bool precedes(float key_a, int id_a, float key_b, int id_b) {
  const bool nan_a = key_a != key_a, nan_b = key_b != key_b;
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && key_a != key_b) return key_a > key_b;
  return id_a < id_b;
}

// max that propagates NaN, like torch.amax (fmaxf would drop it).
MOE_HOST_DEVICE float nan_max(float a, float b) {
  return (a != a || a > b) ? a : b;
}

// torch.nn.functional.softplus with beta 1 and threshold 20. Evaluated in double and rounded once, so the
// CPU's libm and CUDA's agree on the float (they could differ by an ulp in float), and with them the noisy
// router's expert ids.
MOE_HOST_DEVICE float softplus(float x) {
  return x > 20.0f ? x : static_cast<float>(log1p(exp(static_cast<double>(x))));
}

// clean + noise·std with two roundings, as PyTorch computes it: nvcc would otherwise fuse it into an fma.
MOE_HOST_DEVICE float noisy_logit(float clean, float noise, float noise_std) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(clean, __fmul_rn(noise, noise_std));
#else
  return clean + noise * noise_std;
#endif
}

// Standard normal CDF, the formula of torch.distributions.Normal(0, 1).cdf.
MOE_HOST_DEVICE float normal_cdf(float z) {
  return 0.5f * (1.0f + erff(z / 1.41421356237309515f));
}

}  // namespace moe_kernels
