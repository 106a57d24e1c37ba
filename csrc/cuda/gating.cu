// moe_kernels::gating on CUDA: one warp routes one token at a time (E <= 256 scores, 8 per lane).
//
// Launch 1 routes the tokens and leaves each warp's statistics, summed over its tokens, in `partials`;
// launch 2 adds the warps' partials in warp order, so the statistics are deterministic. Expert order comes
// from routing_math.h, the same comparisons the CPU op makes. Only CUDA headers here: the tensor side is in
// ops_cuda.cpp, so this file compiles with nvcc against any torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../routing_math.h"
#include "launch.h"

namespace moe_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kPerLane = kMaxExperts / kWarp;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxWarps = 2048;  // fixed by T alone, never by the device, so sums keep their order
constexpr int kStatistics = 3;   // importance, load, probability_sum
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_nan_max(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value = nan_max(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// Whether candidate (key, id) beats the current best; id -1 is "no candidate".
__device__ __forceinline__ bool beats(float key, int id, float best_key, int best_id) {
  return id >= 0 && (best_id < 0 || precedes(key, id, best_key, best_id));
}

// Every lane gets the warp's first (key, id) in expert order.
__device__ __forceinline__ void warp_best(float& key, int& id) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float other_key = __shfl_xor_sync(kFullMask, key, offset);
    const int other_id = __shfl_xor_sync(kFullMask, id, offset);
    if (beats(other_key, other_id, key, id)) {
      key = other_key;
      id = other_id;
    }
  }
}

__global__ void gating_kernel(GatingLaunch args, int num_warps, float* __restrict__ partials /* [W, 3, E] */) {
  const int lane = threadIdx.x % kWarp;
  const int warp = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (warp >= num_warps) return;
  const int num_experts = args.num_experts, k = args.k;
  const bool noisy = args.noise != nullptr;
  const int num_top = noisy ? min(k + 1, num_experts) : k;
  float importance[kPerLane] = {}, load[kPerLane] = {}, probability_sum[kPerLane] = {};

  for (int64_t t = warp; t < args.num_tokens; t += num_warps) {
    const int64_t row = t * num_experts;
    float logits[kPerLane], keys[kPerLane], noise_std[kPerLane];
    float max_logit = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = j * kWarp + lane;
      logits[j] = e < num_experts ? args.logits[row + e] : -INFINITY;
      max_logit = nan_max(max_logit, logits[j]);
    }
    max_logit = warp_nan_max(max_logit);
    const bool finite_max = isfinite(max_logit);
    float exps[kPerLane], exp_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = j * kWarp + lane;
      exps[j] = e < num_experts ? expf(logits[j] - max_logit) : 0.0f;
      exp_sum += exps[j];
      if (args.router != kNoisyTopK) {
        keys[j] = finite_max ? logits[j] - max_logit : NAN;
      } else if (noisy) {
        noise_std[j] = e < num_experts ? softplus(args.noise_logits[row + e]) + args.noise_epsilon : 1.0f;
        keys[j] = e < num_experts ? noisy_logit(logits[j], args.noise[row + e], noise_std[j]) : 0.0f;
      } else {
        keys[j] = logits[j];
      }
    }
    exp_sum = warp_sum(exp_sum);

    // k (+1 for the noisy load) rounds of a warp-wide arg-best; the winner's lane retires it.
    float top_keys[kMaxK + 1];
    int top_ids[kMaxK + 1];
    unsigned retired = 0;
#pragma unroll
    for (int r = 0; r < kMaxK + 1; ++r) {
      if (r >= num_top) break;
      float best_key = 0.0f;
      int best_id = -1;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int e = j * kWarp + lane;
        if (e < num_experts && !(retired >> j & 1u) && beats(keys[j], e, best_key, best_id)) {
          best_key = keys[j];
          best_id = e;
        }
      }
      warp_best(best_key, best_id);
      if (best_id % kWarp == lane) retired |= 1u << (best_id / kWarp);
      top_keys[r] = best_key;
      top_ids[r] = best_id;
    }

    // Gates, as every lane sees them: the probabilities (from the keys x - max) or a softmax over the top k.
    float gates[kMaxK], gate_sum = 0.0f, top_max = -INFINITY;
#pragma unroll
    for (int r = 0; r < kMaxK; ++r) {
      if (r < k) top_max = nan_max(top_max, top_keys[r]);
    }
#pragma unroll
    for (int r = 0; r < kMaxK; ++r) {
      if (r >= k) break;
      if (args.router == kNoisyTopK) {
        gates[r] = expf(top_keys[r] - top_max);
      } else {
        gates[r] = finite_max ? expf(top_keys[r]) / exp_sum : NAN;
      }
      gate_sum += gates[r];
    }
    const bool divide = args.router == kNoisyTopK ? isfinite(top_max) : args.renormalize;
#pragma unroll
    for (int r = 0; r < kMaxK; ++r) {
      if (r >= k) break;
      if (args.router == kNoisyTopK && !isfinite(top_max)) {
        gates[r] = NAN;
      } else if (divide) {
        gates[r] /= gate_sum;
      }
      if (lane == 0) {
        args.weights[t * k + r] = gates[r];
        args.experts[t * k + r] = top_ids[r];
      }
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (top_ids[r] == j * kWarp + lane) {
          importance[j] += gates[r];
          if (!noisy) load[j] += 1.0f;
        }
      }
    }
    if (lane == 0) args.logsumexp[t] = finite_max ? logf(exp_sum) + max_logit : max_logit;

    const float threshold_if_in = k < num_experts ? top_keys[k] : -INFINITY;
    const float threshold_if_out = top_keys[k - 1];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (j * kWarp + lane >= num_experts) continue;
      probability_sum[j] += finite_max ? exps[j] / exp_sum : NAN;
      if (noisy) {
        // Shazeer et al. (2017), Appendix A: P(expert in the top k) with the other experts' noise fixed.
        const float threshold = keys[j] > threshold_if_in ? threshold_if_in : threshold_if_out;
        load[j] += normal_cdf((logits[j] - threshold) / noise_std[j]);
      }
    }
  }

  float* partial = partials + static_cast<int64_t>(warp) * kStatistics * num_experts;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = j * kWarp + lane;
    if (e >= num_experts) continue;
    partial[e] = importance[j];
    partial[num_experts + e] = load[j];
    partial[2 * num_experts + e] = probability_sum[j];
  }
}

// statistics[s][e] = Σ_w partials[w][s][e], in warp order.
__global__ void sum_partials_kernel(const float* __restrict__ partials, int num_warps, int num_experts,
                                    float* importance, float* load, float* probability_sum) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= kStatistics * num_experts) return;
  double total = 0.0;
  for (int w = 0; w < num_warps; ++w) total += partials[static_cast<int64_t>(w) * kStatistics * num_experts + index];
  float* outputs[kStatistics] = {importance, load, probability_sum};
  outputs[index / num_experts][index % num_experts] = static_cast<float>(total);
}

}  // namespace

int64_t gating_partials_size(int64_t num_tokens, int64_t num_experts) {
  const int64_t num_warps = num_tokens < kMaxWarps ? (num_tokens > 0 ? num_tokens : 1) : kMaxWarps;
  return num_warps * kStatistics * num_experts;
}

cudaError_t launch_gating(const GatingLaunch& args, float* partials, cudaStream_t stream) {
  const int num_warps = static_cast<int>(gating_partials_size(args.num_tokens, args.num_experts) /
                                         (kStatistics * args.num_experts));
  const int blocks = (num_warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  gating_kernel<<<blocks, kWarpsPerBlock * kWarp, 0, stream>>>(args, num_warps, partials);
  const int threads = 256, sums = kStatistics * args.num_experts;
  sum_partials_kernel<<<(sums + threads - 1) / threads, threads, 0, stream>>>(
      partials, num_warps, args.num_experts, args.importance, args.load, args.probability_sum);
  return cudaGetLastError();
}

}  // namespace moe_kernels
