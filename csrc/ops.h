// The native ops' C++ signatures and their argument checks.
// Semantics: moe_kernels/pipeline.py (permutation layout).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace moe_kernels {

using PermuteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (tokens_per_expert [E] i32, expert_offsets [E+1] i32, sorted_rows [T,k] i32, sorted_assignments [R] i32).
PermuteOutputs permute_cpu(const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
                           int64_t block_m);

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
