"""The backend seam: route → permute → expert GEMMs → combine, one function per stage.

A backend is an object with the four stage methods of ``Backend``; each stage is differentiable (plain
autograd for backend "torch", ``torch.library`` custom ops with autograd over kernels for the others).
``moe_forward`` strings them together and is all the fast layer calls; ``experts_forward`` is the same
pipeline after routing ("experts given a routing"), the public functional entry point.

The permutation layout ("rows grouped by expert"), shared by every backend and every kernel:
- A routing gives each token S slots (S = k for top-k routers), each an expert id and a weight.
  Assignments are numbered token-major: assignment a = t·S + s is token t's slot s. The text below says k
  for S.
- The expert-sorted order groups assignments by expert; within an expert it is slot-major (every token's
  first choice before any second choice) and token order within a slot. That is also the capacity
  priority: an expert keeps its first ``capacity`` assignments in this order and drops the rest.
- Expert e's kept assignments occupy sorted rows [expert_offsets[e], expert_offsets[e] + tokens_per_expert[e]).
  Its segment [expert_offsets[e], expert_offsets[e + 1]) is that count rounded up to a multiple of
  ``block_m``, so a GEMM tile never spans two experts; the rows past each expert's count, and past
  expert_offsets[E], are padding. The number of rows is fixed by T, k, E and block_m alone
  (``num_sorted_rows``), never by the routing, so nothing waits on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from torch import Tensor

from .activations import Activation
from .routing import LossWeights, Routing, router_loss


class Permutation(NamedTuple):
    """Where every assignment goes in expert-sorted order (layout in the module docstring).

    tokens_per_expert: [E] int32, kept assignments per expert (after capacity).
    expert_offsets: [E + 1] int32, the exclusive prefix sum of the segment sizes (counts rounded up to
        block_m): first sorted row of each expert's segment, and the end of the last one.
    sorted_rows: [T, k] int32, the sorted row of each assignment, -1 where capacity dropped it.
    sorted_assignments: [R] int32, the assignment t·k + s held by each sorted row, -1 for padding.
    """

    tokens_per_expert: Tensor
    expert_offsets: Tensor
    sorted_rows: Tensor
    sorted_assignments: Tensor


@dataclass(frozen=True)
class RouterConfig:
    """Everything a router needs besides the logits."""

    router: str
    k: int
    renormalize: bool = True
    noise_epsilon: float = 1e-2


def num_sorted_rows(num_tokens: int, k: int, num_experts: int, block_m: int) -> int:
    """Rows of the sorted buffer: every assignment, plus room to pad each segment to block_m."""
    if block_m == 1:
        return num_tokens * k
    return num_tokens * k + num_experts * (block_m - 1)


def expert_capacity(capacity_factor: float | None, num_tokens: int, k: int, num_experts: int) -> int | None:
    """ceil(capacity_factor·T·k/E) assignments per expert, or None when the layer is dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


class Backend(Protocol):
    """The four stages every backend implements. x is [T, d]; E experts; R sorted rows."""

    def route(self, logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig) -> Routing:
        """logits, noise_logits: [T, E] float32; noise: [T, E] float32 N(0,1) or None (no noise)."""

    def permute(self, experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
        """experts: [T, k] int32 → the Permutation (capacity=None: dropless)."""

    def expert_up(
        self, x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: Activation
    ) -> Tensor:
        """act(x[token of row] · up_weight[e]ᵀ + up_bias[e]) for every sorted row: [R, d_ff] in x's dtype.

        up_weight: [E, 2·d_ff, d] (gated activations, gate/up rows as ``activation.interleaved`` says) or
        [E, d_ff, d], any dtype and strides (computed in x's dtype); up_bias: [E, 2·d_ff] or [E, d_ff], or
        None. Padding rows hold unspecified values.
        """

    def expert_down_combine(
        self, hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
    ) -> Tensor:
        """y[t] = Σ_s weights[t, s]·(hidden[row(t, s)] · down_weight[e]ᵀ + down_bias[e]), dropped slots adding 0.

        hidden: [R, d_ff]; down_weight: [E, d, d_ff], any dtype and strides (computed in hidden's dtype);
        down_bias: [E, d] or None; weights: [T, k] float32 (float64 for float64 hidden). Returns [T, d] in
        hidden's dtype, accumulated in weights' dtype and summed over k in a fixed order (deterministic).
        """


@dataclass(frozen=True)
class LayerConfig:
    """The static description of an MoE layer that the pipeline needs."""

    num_experts: int
    router: RouterConfig
    activation: Activation
    capacity_factor: float | None
    loss_weights: LossWeights


def moe_forward(
    backend: Backend,
    config: LayerConfig,
    x: Tensor,
    router_logits: Tensor,
    noise_logits: Tensor | None,
    noise: Tensor | None,
    up_weight: Tensor,
    down_weight: Tensor,
) -> tuple[Tensor, Tensor]:
    """One MoE layer on [T, d] tokens: returns y [T, d] in x's dtype and the float32 aux loss scalar."""
    routing = backend.route(router_logits, noise_logits, noise, config.router)
    aux_loss = router_loss(routing, config.router.router, config.router.k, config.loss_weights)
    capacity = expert_capacity(config.capacity_factor, x.shape[0], config.router.k, config.num_experts)
    permutation = backend.permute(routing.experts, config.num_experts, capacity)
    hidden = backend.expert_up(x, up_weight, None, permutation, config.activation)
    y = backend.expert_down_combine(hidden, down_weight, None, permutation, routing.weights)
    return y, aux_loss
