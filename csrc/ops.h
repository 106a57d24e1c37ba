// The native ops' C++ signatures and their argument checks.
// Semantics: moe_kernels/pipeline.py (permutation layout, expert stages).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace moe_kernels {

using PermuteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (tokens_per_expert [E] i32, expert_offsets [E+1] i32, sorted_rows [T,k] i32, sorted_assignments [R] i32).
PermuteOutputs permute_cpu(const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
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

// The whole expert path where no gradient is recorded (csrc/cpu/experts_forward.cpp): permute(experts
// [T, S] i32, E, capacity, block_m=1), then cpu_expert_up and cpu_expert_down_combine: y [T, d] in x's dtype.
at::Tensor cpu_experts_forward(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                               std::optional<int64_t> capacity, const at::Tensor& up_weight,
                               const std::optional<at::Tensor>& up_bias, const at::Tensor& down_weight,
                               const std::optional<at::Tensor>& down_bias, std::string_view function, bool gated,
                               double alpha, std::optional<double> limit, double up_offset, bool interleaved);

// The softmax top-k router (csrc/cpu/softmax_topk.cpp; semantics: routers/softmax_topk.py) on x [T, d] with
// weight [E, d] and bias [E] of x's dtype: (logits [T, E], weights [T, k] in x's dtype, experts [T, k] int32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_softmax_topk(const at::Tensor& x, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias, int64_t k,
                                                                bool renormalize);

// Unmaps the freed weight-gradient mappings the CPU expert path keeps for reuse (csrc/cpu/huge_pages.h
// MappingPool); returns their bytes.
int64_t cpu_release_memory();

// The capacity as an int, -1 for dropless (None), after checking every permute argument; 0 drops everything.
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
  TORCH_CHECK(!capacity.has_value() || *capacity >= 0, "moe_kernels::permute: capacity must be None or >= 0, got ",
              *capacity);
  return capacity.has_value() ? *capacity : -1;
}

// pipeline.num_sorted_rows.
inline int64_t num_sorted_rows(int64_t num_tokens, int64_t k, int64_t num_experts, int64_t block_m) {
  return num_tokens * k + (block_m == 1 ? 0 : num_experts * (block_m - 1));
}

}  // namespace moe_kernels
