// moe_kernels::cpu_experts_forward: the whole CPU expert path of a call that records no gradient, in one op:
// the permutation (permute.cpp), GEMM 1 with the activation (expert_up.cpp), GEMM 2 and the weighted
// combine (expert_down_combine.cpp). It runs the very functions the three staged ops run, on the same
// layout, so y is bitwise theirs (and so the same with and without gradients).
//
// Why one op: at decode sizes the experts' arithmetic is a few microseconds, and what a call costs is the
// cold path around it (a benchmark or a server runs other layers between two calls of this one): each op
// called from Python crosses the dispatcher and its Python wrapper, and the Permutation's four tensors are
// made, checked and handed on. Qwen3-30B-A3B/8 at T = 1, 1 thread, caches cold: the three staged ops and
// their Python ~235 µs.
#include <ATen/Parallel.h>

#include "../ops.h"
#include "activation.h"
#include "expert_stages.h"
#include "experts.h"
#include "huge_pages.h"

namespace moe_kernels {
namespace {

constexpr const char* kOp = "moe_kernels::cpu_experts_forward";

}  // namespace

at::Tensor cpu_experts_forward(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                               std::optional<int64_t> capacity, const at::Tensor& up_weight,
                               const std::optional<at::Tensor>& up_bias, const at::Tensor& down_weight,
                               const std::optional<at::Tensor>& down_bias, std::string_view function, bool gated,
                               double alpha, std::optional<double> limit, double up_offset, bool interleaved) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const cpu::Activation activation = cpu::make_activation(kOp, function, gated, alpha, limit, up_offset, interleaved);
  const auto [d, n_up, d_ff] = check_up(kOp, x, up_weight, up_bias, activation);
  const int64_t num_experts = up_weight.size(0);
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == x.size(0), kOp, ": experts must be [T=", x.size(0),
              ", S], got ", experts.sizes());
  TORCH_CHECK(down_weight.dim() == 3 && down_weight.size(0) == num_experts, kOp, ": down_weight must be [E=",
              num_experts, ", d, d_ff], got ", down_weight.sizes());
  const auto [tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments] =
      permute_cpu(experts, num_experts, capacity, /*block_m=*/1);
  // The layout permute_cpu just made: valid by construction, so check_layout's walk over it is skipped.
  const cpu::Layout layout{x.size(0), experts.size(1), num_experts, sorted_assignments.size(0),
                           tokens_per_expert.const_data_ptr<int32_t>(), expert_offsets.const_data_ptr<int32_t>(),
                           sorted_rows.const_data_ptr<int32_t>(), sorted_assignments.const_data_ptr<int32_t>()};
  at::Tensor hidden = cpu::empty_on_huge_pages({layout.num_rows, d_ff}, x.options());
  check_down(kOp, hidden, down_weight, down_bias, weights, layout);
  cpu::expert_up_forward(x, up_weight, up_bias, layout, activation, hidden, /*pre_activation=*/nullptr);
  return cpu::expert_down_combine_forward(hidden, down_weight, down_bias, layout, weights);
}

}  // namespace moe_kernels
