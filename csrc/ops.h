// The native ops' C++ signatures and the argument checks their CPU and CUDA implementations share.
// Semantics: moe_kernels/routing.py (gating) and moe_kernels/pipeline.py (permutation layout).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "routing_math.h"

namespace moe_kernels {

using GatingOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using PermuteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (weights [T,k] f32, experts [T,k] i32, importance [E], load [E], probability_sum [E], logsumexp [T]).
GatingOutputs gating_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& noise_logits,
                         const std::optional<at::Tensor>& noise, std::string_view router, int64_t k,
                         bool renormalize, double noise_epsilon);
GatingOutputs gating_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& noise_logits,
                          const std::optional<at::Tensor>& noise, std::string_view router, int64_t k,
                          bool renormalize, double noise_epsilon);

// (tokens_per_expert [E] i32, expert_offsets [E+1] i32, sorted_rows [T,k] i32, sorted_assignments [R] i32).
PermuteOutputs permute_cpu(const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
                           int64_t block_m);
PermuteOutputs permute_cuda(const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
                            int64_t block_m);

// The CPU expert path (csrc/cpu/expert_up.cpp, expert_down_combine.cpp); semantics: Backend.expert_up and
// Backend.expert_down_combine of moe_kernels/pipeline.py, the activation's fields of activations.Activation.
// (hidden [R, d_ff], pre_activation [R, N] when keep_pre_activation, else [0, N]).
std::tuple<at::Tensor, at::Tensor> cpu_expert_up(
    const at::Tensor& x, const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
    const at::Tensor& tokens_per_expert, const at::Tensor& expert_offsets, const at::Tensor& sorted_rows,
    const at::Tensor& sorted_assignments, std::string_view function, bool gated, double alpha,
    std::optional<double> limit, double up_offset, bool interleaved, bool keep_pre_activation);
// (grad_x [T, d], grad_up_weight [E, N, d], grad_up_bias [E, N], or [0] without up_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_expert_up_backward(
    const at::Tensor& grad_hidden, const at::Tensor& x, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& up_bias, const at::Tensor& pre_activation, const at::Tensor& tokens_per_expert,
    const at::Tensor& expert_offsets, const at::Tensor& sorted_rows, const at::Tensor& sorted_assignments,
    std::string_view function, bool gated, double alpha, std::optional<double> limit, double up_offset,
    bool interleaved);
// y [T, d] in hidden's dtype.
at::Tensor cpu_expert_down_combine(const at::Tensor& hidden, const at::Tensor& down_weight,
                                   const std::optional<at::Tensor>& down_bias, const at::Tensor& tokens_per_expert,
                                   const at::Tensor& expert_offsets, const at::Tensor& sorted_rows,
                                   const at::Tensor& sorted_assignments, const at::Tensor& weights);
// (grad_hidden [R, d_ff], grad_down_weight [E, d, d_ff], grad_down_bias [E, d] or [0], grad_weights [T, S]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_expert_down_combine_backward(
    const at::Tensor& grad_y, const at::Tensor& hidden, const at::Tensor& down_weight,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& tokens_per_expert, const at::Tensor& expert_offsets,
    const at::Tensor& sorted_rows, const at::Tensor& sorted_assignments, const at::Tensor& weights);

// The router kind, after checking every gating argument; errors name the argument and its value.
inline RouterKind check_gating_args(const at::Tensor& logits, const std::optional<at::Tensor>& noise_logits,
                                    const std::optional<at::Tensor>& noise, std::string_view router,
                                    int64_t k, double noise_epsilon) {
  RouterKind kind;
  if (router == "topk") {
    kind = kTopK;
  } else if (router == "noisy_topk") {
    kind = kNoisyTopK;
  } else if (router == "switch") {
    kind = kSwitch;
  } else {
    TORCH_CHECK(false, "moe_kernels::gating: router must be 'topk', 'noisy_topk' or 'switch', got '", router, "'");
  }
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "moe_kernels::gating: logits must be a [T, E] float32 tensor, got ", logits.sizes(), " ",
              logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous(), "moe_kernels::gating: logits must be contiguous; call .contiguous()");
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1, "moe_kernels::gating: logits must have at least one expert column");
  TORCH_CHECK(k >= 1 && k <= num_experts, "moe_kernels::gating: k must be in [1, E=", num_experts, "], got ", k);
  TORCH_CHECK(kind != kSwitch || k == 1, "moe_kernels::gating: router 'switch' needs k=1, got k=", k);
  TORCH_CHECK(noise_epsilon >= 0, "moe_kernels::gating: noise_epsilon must be >= 0, got ", noise_epsilon);
  TORCH_CHECK(kind == kNoisyTopK || !noise.has_value(),
              "moe_kernels::gating: noise is only used by router 'noisy_topk'; pass None");
  TORCH_CHECK(!noise.has_value() || noise_logits.has_value(),
              "moe_kernels::gating: noise needs noise_logits (the noisy router's x·W_noise)");
  for (const auto* extra : {&noise_logits, &noise}) {
    if (!extra->has_value()) continue;
    const at::Tensor& tensor = **extra;
    TORCH_CHECK(tensor.sizes() == logits.sizes() && tensor.scalar_type() == at::kFloat && tensor.is_contiguous(),
                "moe_kernels::gating: noise_logits and noise must be contiguous float32 tensors shaped like "
                "logits ", logits.sizes(), ", got ", tensor.sizes(), " ", tensor.scalar_type());
    TORCH_CHECK(tensor.device() == logits.device(), "moe_kernels::gating: noise_logits and noise must be on ",
                logits.device(), ", got ", tensor.device());
  }
  return kind;
}

// The capacity as an int, -1 for dropless (None or <= 0), after checking every permute argument.
inline int64_t check_permute_args(const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
                                  int64_t block_m) {
  TORCH_CHECK(experts.dim() == 2 && experts.scalar_type() == at::kInt,
              "moe_kernels::permute: experts must be a [T, k] int32 tensor, got ", experts.sizes(), " ",
              experts.scalar_type());
  TORCH_CHECK(num_experts >= 1, "moe_kernels::permute: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_m >= 1, "moe_kernels::permute: block_m must be >= 1, got ", block_m);
  const int64_t rows = experts.numel() + (block_m == 1 ? 0 : num_experts * (block_m - 1));
  TORCH_CHECK(rows < (int64_t{1} << 31), "moe_kernels::permute: ", rows,
              " sorted rows do not fit the int32 layout; route fewer tokens per call");
  return capacity.has_value() && *capacity > 0 ? *capacity : -1;
}

// pipeline.num_sorted_rows.
inline int64_t num_sorted_rows(int64_t num_tokens, int64_t k, int64_t num_experts, int64_t block_m) {
  return num_tokens * k + (block_m == 1 ? 0 : num_experts * (block_m - 1));
}

}  // namespace moe_kernels
