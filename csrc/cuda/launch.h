// The CUDA launchers behind moe_kernels::gating and moe_kernels::permute: raw pointers in, no torch types,
// so the .cu files compile with nvcc alone; ops_cuda.cpp checks and allocates the tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_kernels {

struct GatingLaunch {
  const float* logits;        // [T, E], E <= kMaxExperts
  const float* noise_logits;  // [T, E], or null
  const float* noise;         // [T, E] N(0, 1), or null (no noise)
  int64_t num_tokens;
  int num_experts;
  int k;                      // <= kMaxK
  int router;                 // RouterKind
  bool renormalize;           // only read for router topk
  float noise_epsilon;
  float* weights;             // [T, k]
  int32_t* experts;           // [T, k]
  float* importance;          // [E]
  float* load;                // [E]
  float* probability_sum;     // [E]
  float* logsumexp;           // [T]
};

// Floats of scratch that launch_gating needs.
int64_t gating_partials_size(int64_t num_tokens, int64_t num_experts);
cudaError_t launch_gating(const GatingLaunch& args, float* partials, cudaStream_t stream);

struct PermuteLaunch {
  const int32_t* experts;  // [T, k] with strides (stride_t, stride_s); ids outside [0, E) are dropped
  int64_t stride_t, stride_s;
  int64_t num_tokens;
  int k;
  int num_experts;
  int64_t capacity;             // -1: dropless
  int block_m;
  int64_t num_rows;             // R = num_sorted_rows(T, k, E, block_m)
  int32_t* tokens_per_expert;   // [E]
  int32_t* expert_offsets;      // [E + 1]
  int32_t* sorted_rows;         // [T, k] contiguous
  int32_t* sorted_assignments;  // [R]
};

// int32 elements of scratch that launch_permute needs.
int64_t permute_scratch_size(int64_t num_assignments, int64_t num_experts);
cudaError_t launch_permute(const PermuteLaunch& args, int32_t* scratch, cudaStream_t stream);

}  // namespace moe_kernels
