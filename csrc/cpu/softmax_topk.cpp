// moe_kernels::cpu_softmax_topk: the softmax top-k router on the CPU, logits, selection and weights in one op
// (semantics: routers/softmax_topk.py, ranking rule: routers/base.py's top_k).
//
// The PyTorch definition is ~12 ATen calls from Python (the linear, a sort or top-k on integer keys, gather,
// softmax or logsumexp, casts). Here the logits and the weights are the very ATen kernels the definition runs
// (at::linear's at::mm / at::addmm, at::softmax / at::logsumexp and at::exp, with autocast off as the router's
// linear has it; the gather, a copy, by hand): the same bits with and without gradients (one answer in every
// grad mode). The selection
// replaces the sort: each token keeps its k best (value, id) pairs by insertion while it walks its E logits
// in id order: a logit enters only if it ranks strictly above the k-th kept one, so of equal logits the
// lower id stays ahead (ties to the lower id); NaN ranks above every number and -0.0 equals 0.0, as in the
// definition. No autograd: the router calls it only where no gradient is recorded. Rows are independent:
// the same result for any thread count.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include "../ops.h"

namespace moe_kernels {
namespace {

constexpr const char* kOp = "moe_kernels::cpu_softmax_topk";

// Whether logit a ranks strictly above logit b (NaN above every number, NaNs equal).
template <typename scalar_t>
inline bool ranks_above(scalar_t a, scalar_t b) {
  if (std::isnan(b)) return false;
  return std::isnan(a) || a > b;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_softmax_topk(const at::Tensor& x, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias, int64_t k,
                                                                bool renormalize) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (dtype == at::kFloat || dtype == at::kDouble), kOp,
              ": x must be a [T, d] float32 or float64 CPU tensor, got ", x.sizes(), " ", dtype, " on ", x.device());
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.size(1) == x.size(1) &&
                  weight.scalar_type() == dtype,
              kOp, ": weight must be an [E, d=", x.size(1), "] ", dtype, " CPU tensor, got ", weight.sizes(), " ",
              weight.scalar_type(), " on ", weight.device());
  const int64_t num_tokens = x.size(0), num_experts = weight.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == num_experts &&
                                     bias->scalar_type() == dtype),
              kOp, ": bias must be None or an [E=", num_experts, "] ", dtype, " CPU tensor");
  TORCH_CHECK(k >= 1 && k <= num_experts, kOp, ": k must be in [1, E=", num_experts, "], got ", k);
  // The router's linear runs with autocast off (routers/base.py's linear): float32 whatever autocast says.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // What at::linear runs for a 2-D x (aten::linear -> aten::t, then aten::addmm with a bias, else aten::matmul
  // -> aten::mm), called directly: the same kernel and bits, without linear's and matmul's cold dispatch hops.
  const at::Tensor weight_t = weight.t();
  const at::Tensor logits = bias.has_value() ? at::addmm(*bias, x, weight_t) : at::mm(x, weight_t);
  at::Tensor experts = at::empty({num_tokens, k}, x.options().dtype(at::kInt));
  int32_t* expert_data = experts.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES(dtype, "cpu_softmax_topk", [&] {
    const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> kept(k);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = logit_data + t * num_experts;
        int32_t* ids = expert_data + t * k;
        int64_t filled = 0;
        for (int64_t e = 0; e < num_experts; ++e) {
          const scalar_t value = row[e];
          if (filled == k && !ranks_above(value, kept[k - 1])) continue;
          int64_t slot = filled < k ? filled++ : k - 1;  // the new one replaces the k-th, then moves up
          for (; slot > 0 && ranks_above(value, kept[slot - 1]); --slot) {
            kept[slot] = kept[slot - 1];
            ids[slot] = ids[slot - 1];
          }
          kept[slot] = value;
          ids[slot] = static_cast<int32_t>(e);
        }
      }
    });
  });
  // The weights as the definition computes them, after selection. The gather of the chosen logits is a copy
  // (exact), by hand: at::gather would first convert the ids to int64, two more cold ATen calls at T = 1.
  at::Tensor chosen = at::empty({num_tokens, k}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "cpu_softmax_topk_gather", [&] {
    const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
    scalar_t* chosen_data = chosen.data_ptr<scalar_t>();
    for (int64_t i = 0; i < num_tokens * k; ++i) chosen_data[i] = logit_data[(i / k) * num_experts + expert_data[i]];
  });
  const at::Tensor weights =
      renormalize ? at::softmax(chosen, -1) : at::exp(chosen - at::logsumexp(logits, {-1}, /*keepdim=*/true));
  return {logits, weights, experts};
}

}  // namespace moe_kernels
