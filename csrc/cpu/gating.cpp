// moe_kernels::gating on the CPU: every router of moe_kernels/routing.py in one pass over the tokens.
//
// Tokens are split into at most kMaxChunks chunks fixed by T alone; each chunk sums its statistics in
// float64 and the chunks are added in order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../ops.h"

namespace moe_kernels {
namespace {

constexpr int64_t kMaxChunks = 256;
constexpr int kStatistics = 3;  // importance, load, probability_sum

struct GatingArgs {
  const float* logits;        // [T, E]
  const float* noise_logits;  // [T, E] or null
  const float* noise;         // [T, E] or null (no noise)
  int64_t num_experts;
  int64_t k;
  RouterKind router;
  bool renormalize;
  float noise_epsilon;
  float* weights;    // [T, k]
  int32_t* experts;  // [T, k]
  float* logsumexp;  // [T]
};

// Per-thread scratch of one token: E scores, keys, sort order.
struct Scratch {
  std::vector<float> probabilities, keys, noise_std, top_values;
  std::vector<int32_t> order;
  explicit Scratch(int64_t num_experts)
      : probabilities(num_experts), keys(num_experts), noise_std(num_experts), top_values(num_experts),
        order(num_experts) {}
};

struct MaxAndSum {
  float max, sum;  // max of the values, Σ exp(value - max)
};

// softmax(values[0..n)) into out; NaN everywhere when the max is not finite, as torch.softmax gives.
MaxAndSum softmax(const float* values, int64_t n, float* out) {
  float max_value = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) max_value = nan_max(max_value, values[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (out[i] = std::exp(values[i] - max_value));
  for (int64_t i = 0; i < n; ++i) out[i] = std::isfinite(max_value) ? out[i] / sum : NAN;
  return {max_value, sum};
}

// Routes token t and adds its statistics to partial[statistic * E + e].
void route_token(const GatingArgs& args, int64_t t, Scratch& scratch, double* partial) {
  const int64_t num_experts = args.num_experts, k = args.k;
  const float* logits = args.logits + t * num_experts;
  float* probabilities = scratch.probabilities.data();
  float* keys = scratch.keys.data();
  const auto [max_logit, exp_sum] = softmax(logits, num_experts, probabilities);
  // torch.logsumexp of a row whose max is ±inf or NaN is that max.
  args.logsumexp[t] = std::isfinite(max_logit) ? std::log(exp_sum) + max_logit : max_logit;

  const bool noisy = args.noise != nullptr;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (args.router != kNoisyTopK) {
      // Sorting x - max orders like the probabilities; a non-finite max makes every probability NaN (a tie).
      keys[e] = std::isfinite(max_logit) ? logits[e] - max_logit : NAN;
    } else if (noisy) {
      const int64_t i = t * num_experts + e;
      scratch.noise_std[e] = softplus(args.noise_logits[i]) + args.noise_epsilon;
      keys[e] = noisy_logit(logits[e], args.noise[i], scratch.noise_std[e]);
    } else {
      keys[e] = logits[e];
    }
  }
  const int64_t num_top = noisy ? std::min(k + 1, num_experts) : k;
  auto& order = scratch.order;
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + num_top, order.end(),
                    [&](int32_t a, int32_t b) { return precedes(keys[a], a, keys[b], b); });

  float* weights = args.weights + t * k;
  int32_t* experts = args.experts + t * k;
  float* top_values = scratch.top_values.data();
  for (int64_t s = 0; s < num_top; ++s) top_values[s] = keys[order[s]];
  if (args.router == kNoisyTopK) {
    softmax(top_values, k, weights);
  } else {
    float kept_sum = 0.0f;
    for (int64_t s = 0; s < k; ++s) kept_sum += (weights[s] = probabilities[order[s]]);
    if (args.renormalize) {
      for (int64_t s = 0; s < k; ++s) weights[s] /= kept_sum;
    }
  }

  double* importance = partial;
  double* load = partial + num_experts;
  double* probability_sum = partial + 2 * num_experts;
  for (int64_t s = 0; s < k; ++s) {
    experts[s] = order[s];
    importance[order[s]] += weights[s];
    if (!noisy) load[order[s]] += 1.0;
  }
  for (int64_t e = 0; e < num_experts; ++e) probability_sum[e] += probabilities[e];
  if (noisy) {
    // Shazeer et al. (2017), Appendix A: P(e in the top k) with the other experts' noise fixed.
    const float threshold_if_in = k < num_experts ? top_values[k] : -std::numeric_limits<float>::infinity();
    const float threshold_if_out = top_values[k - 1];
    for (int64_t e = 0; e < num_experts; ++e) {
      const float threshold = keys[e] > threshold_if_in ? threshold_if_in : threshold_if_out;
      load[e] += normal_cdf((logits[e] - threshold) / scratch.noise_std[e]);
    }
  }
}

}  // namespace

GatingOutputs gating_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& noise_logits,
                         const std::optional<at::Tensor>& noise, std::string_view router, int64_t k,
                         bool renormalize, double noise_epsilon) {
  const RouterKind kind = check_gating_args(logits, noise_logits, noise, router, k, noise_epsilon);
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  const auto float_options = logits.options();
  at::Tensor weights = at::empty({num_tokens, k}, float_options);
  at::Tensor experts = at::empty({num_tokens, k}, float_options.dtype(at::kInt));
  at::Tensor logsumexp = at::empty({num_tokens}, float_options);

  const bool noisy = kind == kNoisyTopK && noise.has_value();
  const GatingArgs args{logits.data_ptr<float>(),
                        kind == kNoisyTopK && noise_logits.has_value() ? noise_logits->data_ptr<float>() : nullptr,
                        noisy ? noise->data_ptr<float>() : nullptr,
                        num_experts, k, kind, renormalize && kind == kTopK, static_cast<float>(noise_epsilon),
                        weights.data_ptr<float>(), experts.data_ptr<int32_t>(), logsumexp.data_ptr<float>()};

  const int64_t num_chunks = std::min(num_tokens, kMaxChunks);
  const int64_t chunk_size = num_chunks ? (num_tokens + num_chunks - 1) / num_chunks : 0;
  std::vector<double> partials(std::max<int64_t>(num_chunks, 1) * kStatistics * num_experts, 0.0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(num_experts);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* partial = partials.data() + chunk * kStatistics * num_experts;
      const int64_t last = std::min(num_tokens, (chunk + 1) * chunk_size);
      for (int64_t t = chunk * chunk_size; t < last; ++t) route_token(args, t, scratch, partial);
    }
  });

  // Separate tensors, not views of one: an op's outputs must not alias each other.
  at::Tensor statistics[kStatistics];
  for (int statistic = 0; statistic < kStatistics; ++statistic) {
    statistics[statistic] = at::empty({num_experts}, float_options);
    float* totals = statistics[statistic].data_ptr<float>();
    for (int64_t e = 0; e < num_experts; ++e) {
      double total = 0.0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        total += partials[(chunk * kStatistics + statistic) * num_experts + e];
      }
      totals[e] = static_cast<float>(total);
    }
  }
  return {weights, experts, statistics[0], statistics[1], statistics[2], logsumexp};
}

}  // namespace moe_kernels
