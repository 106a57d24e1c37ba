"""The autograd boundary over the Triton stages: thin Functions that call the launchers.

Saved for backward, per token (k assignments, R ≈ T·k rows plus padding):
- Gating keeps the router logits (and, for noisy top-k in training, the noise logits and the noise),
  alive anyway, and the int32 expert ids (4·k bytes); its backward recomputes the softmax and gates.
- ExpertUp keeps x, up_weight and the permutation, all alive anyway; its backward recomputes the
  pre-activation inside the kernel that applies the activation's backward, so it saves no activation of
  its own. Storing the pre-activation instead would cost k·N·itemsize bytes per token (N = 2·d_ff gated).
- ExpertDownCombine keeps hidden (its input, k·d_ff·itemsize bytes per token, plus padding rows), the
  float32 gate weights (4·k bytes) and the permutation (int32: 4·k for sorted_rows and 4·k for
  sorted_assignments). The per-assignment expert outputs are not kept: d(weights) comes out of the
  d(hidden) GEMM as <hidden, dy·down_weight>.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels.gating import gating_backward, gating_forward
from .kernels.grouped_gemm import (
    expert_down_combine_backward,
    expert_down_combine_forward,
    expert_up_backward,
    expert_up_forward,
)
from .pipeline import Permutation, RouterConfig
from .routing import Routing


class Gating(torch.autograd.Function):
    """The fields of a gating launcher's Routing; differentiable in logits and noise_logits (not the ids).

    ``launch`` is the forward launcher: the Triton kernel's, or the native op's (same outputs, same ids).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig, launch):
        routing = launch(logits, noise_logits, noise, config)
        ctx.save_for_backward(logits, noise_logits, noise, routing.experts)
        ctx.config = config
        ctx.mark_non_differentiable(routing.experts)
        return tuple(routing)

    @staticmethod
    def backward(ctx, grad_weights, _grad_experts, grad_importance, grad_load, grad_probability_sum, grad_logsumexp):
        logits, noise_logits, noise, experts = ctx.saved_tensors
        grad_logits, grad_noise_logits = gating_backward(
            grad_weights, grad_importance, grad_load, grad_probability_sum, grad_logsumexp,
            logits, noise_logits, noise, experts, ctx.config,
        )
        return grad_logits, grad_noise_logits, None, None, None


def route(
    logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig, launch=gating_forward
) -> Routing:
    """The router of ``config`` by ``launch`` (default: the Triton gating kernel) as a differentiable Routing."""
    return Routing(*Gating.apply(logits, noise_logits, noise, config, launch))


class ExpertUp(torch.autograd.Function):
    """hidden = expert_up_forward(x, up_weight, permutation, activation); differentiable in x and up_weight."""

    @staticmethod
    def forward(ctx, x: Tensor, up_weight: Tensor, permutation: Permutation, activation: str) -> Tensor:
        ctx.save_for_backward(x, up_weight, *permutation)
        ctx.activation = activation
        return expert_up_forward(x, up_weight, permutation, activation)

    @staticmethod
    def backward(ctx, grad_hidden: Tensor):
        x, up_weight, *permutation = ctx.saved_tensors
        grad_x, grad_up_weight = expert_up_backward(grad_hidden, x, up_weight, Permutation(*permutation), ctx.activation)
        return grad_x, grad_up_weight, None, None


class ExpertDownCombine(torch.autograd.Function):
    """y = expert_down_combine_forward(hidden, down_weight, permutation, weights); differentiable in hidden,
    down_weight and weights."""

    @staticmethod
    def forward(ctx, hidden: Tensor, down_weight: Tensor, permutation: Permutation, weights: Tensor) -> Tensor:
        ctx.save_for_backward(hidden, down_weight, weights, *permutation)
        return expert_down_combine_forward(hidden, down_weight, permutation, weights)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        hidden, down_weight, weights, *permutation = ctx.saved_tensors
        grad_hidden, grad_down_weight, grad_weights = expert_down_combine_backward(
            grad_y, hidden, down_weight, Permutation(*permutation), weights
        )
        return grad_hidden, grad_down_weight, None, grad_weights
