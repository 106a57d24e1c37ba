// The expert activation of moe_kernels/activations.py on rows of the CPU expert path, forward and backward.
//
// Math in the opmath type (float for float/bfloat16/half, double for double), vectorised with ATen's
// Vectorized (AVX2 when setup.py builds for it). Semantics follow the PyTorch definition `activate`,
// including how NaN travels: silu z/(1 + exp(-alpha z)), exact gelu 0.5 z (1 + erf(z/sqrt 2)), relu
// max(z, 0) with NaN kept; clamps pass NaN on and their backward masks (min <= v <= max) drop it, like
// torch.clamp's; relu's backward is 0 where z <= 0, else grad (torch's threshold_backward, NaN passing).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>

namespace moe_kernels::cpu {

enum class ActivationFunction { kSilu, kGelu, kRelu };

// The fields of moe_kernels.activations.Activation.
struct Activation {
  ActivationFunction function;
  bool gated;
  double alpha;
  std::optional<double> limit;
  double up_offset;
  bool interleaved;
};

inline Activation make_activation(std::string_view op, std::string_view function, bool gated, double alpha,
                                  std::optional<double> limit, double up_offset, bool interleaved) {
  ActivationFunction kind;
  if (function == "silu") {
    kind = ActivationFunction::kSilu;
  } else if (function == "gelu") {
    kind = ActivationFunction::kGelu;
  } else if (function == "relu") {
    kind = ActivationFunction::kRelu;
  } else {
    TORCH_CHECK(false, op, ": function must be 'silu', 'gelu' or 'relu', got '", function, "'");
  }
  TORCH_CHECK(std::isfinite(alpha) && (kind == ActivationFunction::kSilu || alpha == 1.0), op,
              ": alpha must be finite and 1.0 unless function is 'silu', got ", alpha);
  TORCH_CHECK(!limit.has_value() || (*limit > 0 && std::isfinite(*limit)), op,
              ": limit must be None or a finite number > 0, got ", *limit);
  TORCH_CHECK(gated || (!limit.has_value() && up_offset == 0.0 && !interleaved), op,
              ": limit, up_offset and interleaved apply to gated activations only");
  TORCH_CHECK(std::isfinite(up_offset), op, ": up_offset must be finite, got ", up_offset);
  return {kind, gated, alpha, limit, up_offset, interleaved};
}

namespace detail {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// f(z) and f'(z) of one vector.
template <typename T>
inline Vec<T> function_value(ActivationFunction function, T alpha, Vec<T> z) {
  const Vec<T> one(T(1));
  switch (function) {
    case ActivationFunction::kSilu:
      return z / (one + (Vec<T>(-alpha) * z).exp());
    case ActivationFunction::kGelu:
      return Vec<T>(T(0.5)) * z * (one + (z * Vec<T>(T(M_SQRT1_2))).erf());
    case ActivationFunction::kRelu:
    default:
      return at::vec::maximum(z, Vec<T>(T(0)));
  }
}

template <typename T>
inline Vec<T> function_derivative(ActivationFunction function, T alpha, Vec<T> z) {
  const Vec<T> one(T(1));
  switch (function) {
    case ActivationFunction::kSilu: {
      const Vec<T> sigma = one / (one + (Vec<T>(-alpha) * z).exp());
      return sigma + Vec<T>(alpha) * z * sigma * (one - sigma);
    }
    case ActivationFunction::kGelu: {
      const Vec<T> cdf = Vec<T>(T(0.5)) * (one + (z * Vec<T>(T(M_SQRT1_2))).erf());
      const Vec<T> pdf = (Vec<T>(T(-0.5)) * z * z).exp() * Vec<T>(T(0.3989422804014327)); // 1/sqrt(2 pi)
      return cdf + z * pdf;
    }
    case ActivationFunction::kRelu:
    default:
      return Vec<T>::blendv(one, Vec<T>(T(0)), z <= Vec<T>(T(0)));
  }
}

}  // namespace detail

// out[i] = act(gate[i], up[i]) for i < n (gated), or act(gate[i]) (ungated; up unused). The inputs are
// the pre-activation halves, bias included; in place is allowed (out == gate).
template <typename T>
void activation_forward(const Activation& activation, const T* gate, const T* up, T* out, int64_t n) {
  using V = detail::Vec<T>;
  const T alpha = static_cast<T>(activation.alpha);
  const bool clamped = activation.limit.has_value();
  const V limit(clamped ? static_cast<T>(*activation.limit) : T(0));
  const V offset(static_cast<T>(activation.up_offset));
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), n - i);
    V g = V::loadu(gate + i, count);
    if (!activation.gated) {
      detail::function_value(activation.function, alpha, g).store(out + i, count);
      continue;
    }
    V u = V::loadu(up + i, count);
    if (clamped) {
      g = at::vec::minimum(g, limit);
      u = at::vec::clamp(u, V(T(0)) - limit, limit);
    }
    (detail::function_value(activation.function, alpha, g) * (u + offset)).store(out + i, count);
  }
}

// The backward of activation_forward: grad_gate (and grad_up, gated) from grad_out and the same inputs.
template <typename T>
void activation_backward(const Activation& activation, const T* gate, const T* up, const T* grad_out, T* grad_gate,
                         T* grad_up, int64_t n) {
  using V = detail::Vec<T>;
  const T alpha = static_cast<T>(activation.alpha);
  const bool clamped = activation.limit.has_value();
  const V limit(clamped ? static_cast<T>(*activation.limit) : T(0));
  const V offset(static_cast<T>(activation.up_offset));
  const V zero(T(0));
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t count = std::min<int64_t>(V::size(), n - i);
    V g = V::loadu(gate + i, count);
    const V grad = V::loadu(grad_out + i, count);
    if (!activation.gated) {
      const V derivative = detail::function_derivative(activation.function, alpha, g);
      V result = grad * derivative;
      if (activation.function == ActivationFunction::kRelu) result = V::blendv(grad, zero, g <= zero);
      result.store(grad_gate + i, count);
      continue;
    }
    V u = V::loadu(up + i, count);
    V gate_mask, up_mask;
    if (clamped) {
      gate_mask = g <= limit;
      up_mask = (u >= zero - limit) & (u <= limit);
      g = at::vec::minimum(g, limit);
      u = at::vec::clamp(u, zero - limit, limit);
    }
    const V value = detail::function_value(activation.function, alpha, g);
    V grad_g = activation.function == ActivationFunction::kRelu
                   ? V::blendv(grad * (u + offset), zero, g <= zero)
                   : grad * (u + offset) * detail::function_derivative(activation.function, alpha, g);
    V grad_u = grad * value;
    if (clamped) {
      grad_g = V::blendv(zero, grad_g, gate_mask);
      grad_u = V::blendv(zero, grad_u, up_mask);
    }
    grad_g.store(grad_gate + i, count);
    grad_u.store(grad_up + i, count);
  }
}

}  // namespace moe_kernels::cpu
