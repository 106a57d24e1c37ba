// moe_kernels::cpu_softmax_topk: the selection and weights of the softmax top-k router on the CPU, one pass
// per token (semantics: routers/softmax_topk.py's softmax_top_k, ranking rule: routers/base.py's top_k).
//
// The PyTorch definition is ~10 ATen calls (a sort or top-k on integer keys, gather, softmax or logsumexp,
// casts): at T = 1 they cost more than the experts' GEMMs of a small model. Here each token keeps its k best
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

std::tuple<at::Tensor, at::Tensor> cpu_softmax_topk(const at::Tensor& logits, int64_t k, bool renormalize) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble),
              kOp, ": logits must be a [T, E] float32 or float64 CPU tensor, got ", logits.sizes(), " ",
              logits.scalar_type(), " on ", logits.device());
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= num_experts, kOp, ": k must be in [1, E=", num_experts, "], got ", k);
  const at::Tensor rows = logits.stride(1) == 1 ? logits : logits.contiguous();
  at::Tensor weights = at::empty({num_tokens, k}, logits.options());
  at::Tensor experts = at::empty({num_tokens, k}, logits.options().dtype(at::kInt));
  int32_t* expert_data = experts.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cpu_softmax_topk", [&] {
    const scalar_t* logit_data = rows.const_data_ptr<scalar_t>();
    scalar_t* weight_data = weights.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> kept(k);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = logit_data + t * rows.stride(0);
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
  return {weights, experts};
}

}  // namespace moe_kernels
