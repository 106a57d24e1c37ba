// moe_kernels::cpu_softmax_topk: the softmax top-k router on the CPU, logits, selection and weights in one op
// (semantics: routers/softmax_topk.py, ranking rule: routers/base.py's top_k).
//
// The PyTorch definition is ~12 ATen calls (the linear, a sort or top-k on integer keys, gather, softmax or
// logsumexp, casts): at T = 1 they cost more than the experts' GEMMs of a small model, most of it in code
// that is cold at every decode step. Up to kDirectRows tokens the logits are direct_gemm's fixed-order dot
// products (bias added after), beyond that at::linear's, as the definition computes them; like any two GEMMs
// the two may differ in the last bits, and the selection and weights are exact functions of the logits the
// op returns. Then each token keeps its k best
// (value, id) pairs by insertion while it walks its E logits in id order: a logit enters only if it ranks
// strictly above the k-th kept one, so of equal logits the lower id stays ahead (ties to the lower id); NaN
// ranks above every number and -0.0 equals 0.0, as in the definition. No autograd: the router calls it only
// where no gradient is recorded. Rows are independent: the same result for any thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"
#include "direct_gemm.h"

namespace moe_kernels {
namespace {

constexpr const char* kOp = "moe_kernels::cpu_softmax_topk";

// Whether logit a ranks strictly above logit b (NaN above every number, NaNs equal).
template <typename scalar_t>
inline bool ranks_above(scalar_t a, scalar_t b) {
  if (std::isnan(b)) return false;
  return std::isnan(a) || a > b;
}

// log Σ_e exp(row[e]) over a unit-stride row, as torch.logsumexp: max, then the shifted exponentials.
template <typename scalar_t>
scalar_t logsumexp(const scalar_t* row, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  scalar_t highest = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t e = 0; e < count; ++e) highest = std::isnan(row[e]) || row[e] > highest ? row[e] : highest;
  if (std::isnan(highest)) return highest;
  if (std::isinf(highest)) return highest;  // torch: +inf stays +inf, a row of -inf gives -inf
  const int64_t vector_count = count - count % Vec::size();
  Vec sums(scalar_t(0));
  for (int64_t e = 0; e < vector_count; e += Vec::size()) sums = sums + (Vec::loadu(row + e) - Vec(highest)).exp();
  scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](Vec x, Vec y) { return x + y; }, sums);
  for (int64_t e = vector_count; e < count; ++e) sum += std::exp(row[e] - highest);
  return highest + std::log(sum);
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
  const int64_t num_tokens = x.size(0), num_experts = weight.size(0), d = x.size(1);
  TORCH_CHECK(!bias.has_value() || (bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == num_experts &&
                                     bias->scalar_type() == dtype),
              kOp, ": bias must be None or an [E=", num_experts, "] ", dtype, " CPU tensor");
  TORCH_CHECK(k >= 1 && k <= num_experts, kOp, ": k must be in [1, E=", num_experts, "], got ", k);
  at::Tensor logits;
  if (num_tokens > cpu::kDirectRows) {
    logits = at::linear(x, weight, bias);
  } else {
    logits = at::empty({num_tokens, num_experts}, x.options());
    const at::Tensor tokens = x.stride(1) == 1 ? x : x.contiguous();
    const at::Tensor rows = weight.stride(1) == 1 ? weight : weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dtype, "cpu_softmax_topk_logits", [&] {
      const scalar_t* a[cpu::kDirectRows];
      for (int64_t t = 0; t < num_tokens; ++t) a[t] = tokens.const_data_ptr<scalar_t>() + t * tokens.stride(0);
      scalar_t* out = logits.data_ptr<scalar_t>();
      cpu::direct_gemm(num_tokens, a, rows.const_data_ptr<scalar_t>(), rows.stride(0), num_experts, d, out, num_experts);
      if (bias.has_value()) {
        const at::Tensor b = bias->contiguous();
        for (int64_t t = 0; t < num_tokens; ++t) {
          for (int64_t e = 0; e < num_experts; ++e) out[t * num_experts + e] += b.const_data_ptr<scalar_t>()[e];
        }
      }
    });
  }
  at::Tensor weights = at::empty({num_tokens, k}, x.options());
  at::Tensor experts = at::empty({num_tokens, k}, x.options().dtype(at::kInt));
  int32_t* expert_data = experts.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES(dtype, "cpu_softmax_topk", [&] {
    const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
    scalar_t* weight_data = weights.data_ptr<scalar_t>();
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
        scalar_t* out = weight_data + t * k;
        if (renormalize) {  // the softmax over the k chosen logits; kept[0] is their largest
          scalar_t sum = 0;
          for (int64_t s = 0; s < k; ++s) sum += (out[s] = std::exp(kept[s] - kept[0]));
          for (int64_t s = 0; s < k; ++s) out[s] /= sum;
        } else {  // the chosen probabilities of the softmax over all E
          const scalar_t normalizer = logsumexp(row, num_experts);
          for (int64_t s = 0; s < k; ++s) out[s] = std::exp(kept[s] - normalizer);
        }
      }
    });
  });
  return {logits, weights, experts};
}

}  // namespace moe_kernels
