// The tensor side of the CUDA ops: check, allocate on the input's device and stream, launch (launch.h).
// Host-compiled; needs only c10/cuda headers, which the CPU wheels of torch ship too.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops.h"
#include "launch.h"

namespace moe_kernels {

constexpr int64_t kMaxPermuteExperts = 2048;  // the scatter kernel keeps 3 ints per expert in shared memory

GatingOutputs gating_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& noise_logits,
                          const std::optional<at::Tensor>& noise, std::string_view router, int64_t k,
                          bool renormalize, double noise_epsilon) {
  const RouterKind kind = check_gating_args(logits, noise_logits, noise, router, k, noise_epsilon);
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  TORCH_CHECK(num_experts <= kMaxExperts && k <= kMaxK, "moe_kernels::gating on CUDA supports E <= ", kMaxExperts,
              " and k <= ", kMaxK, ", got E=", num_experts, ", k=", k, "; route on the CPU or with backend 'torch'");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto options = logits.options();
  at::Tensor weights = at::empty({num_tokens, k}, options);
  at::Tensor experts = at::empty({num_tokens, k}, options.dtype(at::kInt));
  at::Tensor importance = at::empty({num_experts}, options);
  at::Tensor load = at::empty({num_experts}, options);
  at::Tensor probability_sum = at::empty({num_experts}, options);
  at::Tensor logsumexp = at::empty({num_tokens}, options);
  at::Tensor partials = at::empty({gating_partials_size(num_tokens, num_experts)}, options);

  const bool noisy = kind == kNoisyTopK && noise.has_value();
  const GatingLaunch args{logits.data_ptr<float>(),
                          noisy ? noise_logits->data_ptr<float>() : nullptr,
                          noisy ? noise->data_ptr<float>() : nullptr,
                          num_tokens,
                          static_cast<int>(num_experts),
                          static_cast<int>(k),
                          static_cast<int>(kind),
                          renormalize && kind == kTopK,
                          static_cast<float>(noise_epsilon),
                          weights.data_ptr<float>(),
                          experts.data_ptr<int32_t>(),
                          importance.data_ptr<float>(),
                          load.data_ptr<float>(),
                          probability_sum.data_ptr<float>(),
                          logsumexp.data_ptr<float>()};
  C10_CUDA_CHECK(launch_gating(args, partials.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {weights, experts, importance, load, probability_sum, logsumexp};
}

PermuteOutputs permute_cuda(const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
                            int64_t block_m) {
  const int64_t max_kept = check_permute_args(experts, num_experts, capacity, block_m);
  TORCH_CHECK(num_experts <= kMaxPermuteExperts, "moe_kernels::permute on CUDA supports num_experts <= ",
              kMaxPermuteExperts, ", got ", num_experts);
  const c10::cuda::CUDAGuard guard(experts.device());
  const int64_t num_tokens = experts.size(0), k = experts.size(1);
  const int64_t num_rows = num_sorted_rows(num_tokens, k, num_experts, block_m);
  const auto options = experts.options();
  at::Tensor tokens_per_expert = at::empty({num_experts}, options);
  at::Tensor expert_offsets = at::empty({num_experts + 1}, options);
  at::Tensor sorted_rows = at::empty({num_tokens, k}, options);
  at::Tensor sorted_assignments = at::empty({num_rows}, options);
  at::Tensor scratch = at::empty({permute_scratch_size(num_tokens * k, num_experts)}, options);

  const PermuteLaunch args{experts.data_ptr<int32_t>(),
                           experts.stride(0),
                           experts.stride(1),
                           num_tokens,
                           static_cast<int>(k),
                           static_cast<int>(num_experts),
                           max_kept,
                           static_cast<int>(block_m),
                           num_rows,
                           tokens_per_expert.data_ptr<int32_t>(),
                           expert_offsets.data_ptr<int32_t>(),
                           sorted_rows.data_ptr<int32_t>(),
                           sorted_assignments.data_ptr<int32_t>()};
  C10_CUDA_CHECK(launch_permute(args, scratch.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()));
  return {tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments};
}

}  // namespace moe_kernels
