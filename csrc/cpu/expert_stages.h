// The forward stages of the CPU expert path as functions on a Layout, and the argument checks of the
// stages: what the staged ops (expert_up.cpp, expert_down_combine.cpp) and the fused no-gradient op
// (experts_forward.cpp) share, so that both run the very same code (bitwise the same outputs).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "activation.h"
#include "experts.h"

namespace moe_kernels {

struct UpShapes {
  int64_t d;     // model width
  int64_t n_up;  // columns of GEMM 1: 2 d_ff gated, d_ff otherwise
  int64_t d_ff;
};

// Checks x [T, d], up_weight [E, N, d] and up_bias [E, N] of op (errors name op, the argument and its shape).
UpShapes check_up(const char* op, const at::Tensor& x, const at::Tensor& up_weight,
                  const std::optional<at::Tensor>& up_bias, const cpu::Activation& activation);

// Checks hidden [R, d_ff], down_weight [E, d, d_ff], down_bias [E, d] and weights [T, S] (opmath) of op.
void check_down(const char* op, const at::Tensor& hidden, const at::Tensor& down_weight,
                const std::optional<at::Tensor>& down_bias, const at::Tensor& weights, const cpu::Layout& layout);

namespace cpu {

// GEMM 1 with the gather and the activation: hidden [R, d_ff] (contiguous) of x [T, d] and the checked
// arguments; the (biased) pre-activation into pre_activation [R, N] (contiguous) unless it is nullptr.
void expert_up_forward(const at::Tensor& x, const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                       const Layout& layout, const Activation& activation, at::Tensor& hidden,
                       at::Tensor* pre_activation);

// GEMM 2 and the weighted combine: y [T, d] in hidden's dtype, of the checked arguments.
at::Tensor expert_down_combine_forward(const at::Tensor& hidden, const at::Tensor& down_weight,
                                       const std::optional<at::Tensor>& down_bias, const Layout& layout,
                                       const at::Tensor& weights);

}  // namespace cpu
}  // namespace moe_kernels
