"""The seam between routing and experts: rows grouped by expert → expert GEMMs → combine.

A router (``moe_kernels.routers``) gives each token S slots, each an expert id and a weight (``Routing``).
This module turns that into "rows grouped by expert" (``Permutation``), through the backend's permute stage
or, for routers that let experts choose their tokens, directly; then runs the backend's expert stages. A
backend is an object with the members of ``Backend``; each stage is differentiable (plain autograd for backend
"torch", ``torch.library`` custom ops with autograd over kernels for "triton").

The permutation layout ("rows grouped by expert"), shared by every backend and every kernel:
- Assignments are numbered token-major: assignment a = t·S + s is token t's slot s.
- The expert-sorted order groups assignments by expert; within an expert it is slot-major (every token's
  first choice before any second choice) and token order within a slot. That is also the capacity
  priority: an expert keeps its first ``capacity`` assignments in this order and drops the rest.
- Expert e's kept assignments occupy sorted rows [expert_offsets[e], expert_offsets[e] + tokens_per_expert[e]).
  Its segment [expert_offsets[e], expert_offsets[e + 1]) is that count rounded up to a multiple of
  ``block_m``, so a GEMM tile never spans two experts; the rows past each expert's count, and past
  expert_offsets[E], are padding. The number of rows R is chosen by the producer from sizes alone (for
  permute: ``num_sorted_rows``), never from the routing, so nothing waits on the device.
- The gather index of row r is sorted_assignments[r] // S; the combine index of assignment (t, s) is
  sorted_rows[t, s]. Producers: the permute stage (top-k, with capacity), expert-choice routing
  (``expert_choice_permutation``), expert parallelism (rows received from other ranks, S = 1).
"""
from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .activations import Activation


class Permutation(NamedTuple):
    """Where every assignment goes in expert-sorted order (layout in the module docstring).

    tokens_per_expert: [E] int32, kept assignments per expert (after capacity).
    expert_offsets: [E + 1] int32, the exclusive prefix sum of the segment sizes (counts rounded up to
        block_m): first sorted row of each expert's segment, and the end of the last one.
    sorted_rows: [T, S] int32, the sorted row of each assignment, -1 where it has none (dropped, or not taken).
    sorted_assignments: [R] int32, the assignment t·S + s held by each sorted row, -1 for padding.
    """

    tokens_per_expert: Tensor
    expert_offsets: Tensor
    sorted_rows: Tensor
    sorted_assignments: Tensor


def num_sorted_rows(num_tokens: int, slots: int, num_experts: int, block_m: int) -> int:
    """Rows of the permute stage's sorted buffer: every assignment, plus room to pad each segment to block_m."""
    if block_m == 1:
        return num_tokens * slots
    return num_tokens * slots + num_experts * (block_m - 1)


def capacity_ratio(capacity_factor: float | None) -> tuple[int, int] | None:
    """(numerator, denominator) of the decimal a capacity factor prints as (1.1 is 11/10), or None."""
    return None if capacity_factor is None else Fraction(repr(float(capacity_factor))).as_integer_ratio()


def expert_capacity(capacity_factor: float | tuple[int, int] | None, num_tokens: int, slots: int, num_experts: int) -> int | None:
    """ceil(capacity_factor·T·S/E) assignments per expert, at most T·S; None (dropless) without a factor.

    Computed exactly in integers, the factor read as the decimal it prints as (``capacity_ratio``; the layers
    pass that ratio, computed once, so that torch.compile sees integer constants), so that the result is one
    expression of T: torch.compile with a dynamic token count keeps one graph instead of guarding on each
    capacity. A positive factor gives at least 1 for T·S ≥ 1; 0 only when T·S = 0.
    """
    if capacity_factor is None:
        return None
    numerator, denominator = capacity_factor if isinstance(capacity_factor, tuple) else capacity_ratio(capacity_factor)
    assignments = num_tokens * slots
    capacity = (numerator * assignments + denominator * num_experts - 1) // (denominator * num_experts)
    return torch.sym_min(capacity, assignments)


class Backend(Protocol):
    """The members every backend has. x is [T, d]; E experts; S slots per token; R sorted rows."""

    fused_routing: str | None
    """The fused router kernels this backend asks routers for (their ``use_kernel``): "triton", "cpu" (the C++
    ones of moe_kernels._C, where no gradient is recorded) or None (the PyTorch definitions)."""

    def block_m(self, num_tokens: int, slots: int, num_experts: int) -> int:
        """The segment alignment this backend's GEMMs want (1: none), for producers of a Permutation."""

    def permute(self, experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
        """experts: [T, S] int32 in [0, num_experts) → the Permutation (capacity None: dropless; 0: drop all)."""

    def expert_up(
        self, x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: Activation,
        recompute_pre_activation: bool = False,
    ) -> Tensor:
        """act(x[token of row] · up_weight[e]ᵀ + up_bias[e]) for every sorted row: [R, d_ff] in x's dtype.

        up_weight: [E, 2·d_ff, d] (gated activations, gate/up rows as ``activation.interleaved`` says) or
        [E, d_ff, d], any dtype and strides (computed in x's dtype); up_bias: [E, 2·d_ff] or [E, d_ff], or
        None. Padding rows hold unspecified values. recompute_pre_activation: the backward recomputes the
        pre-activation [R, N] instead of keeping it from the forward (less memory, GEMM 1 done twice); a
        backend that always keeps it says so in its docstring.
        """

    def expert_down_combine(
        self, hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
    ) -> Tensor:
        """y[t] = Σ_s weights[t, s]·(hidden[row(t, s)] · down_weight[e]ᵀ + down_bias[e]), slots without a row adding 0.

        hidden: [R, d_ff]; down_weight: [E, d, d_ff], any dtype and strides (computed in hidden's dtype);
        down_bias: [E, d] or None; weights: [T, S] float32 (float64 for float64 hidden). Returns [T, d] in
        hidden's dtype, accumulated in weights' dtype and summed over S in a fixed order (deterministic).
        """

    def routed_experts(
        self, x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None, up_weight: Tensor,
        up_bias: Tensor | None, down_weight: Tensor, down_bias: Tensor | None, activation: Activation,
        recompute_pre_activation: bool = False,
    ) -> Tensor:
        """permute, expert_up and expert_down_combine of x [T, d] routed to experts [T, S] int32 with weights
        [T, S]: y [T, d] in x's dtype, bitwise what the three stages give. A backend may run them as one fused
        call where that is faster (where no gradient is recorded, say); else ``run_routed_experts``.
        """


def sequence_kept(experts: Tensor, sequence_length: int, capacity: int) -> Tensor:
    """[T, S] bool: the assignments that fit an absolute per-sequence capacity (Hugging Face's Switch
    ``expert_capacity``): within each run of ``sequence_length`` tokens, each expert keeps its first
    ``capacity`` assignments in slot-major, then token order."""
    num_tokens, slots = experts.shape
    if num_tokens == 0:
        return torch.ones_like(experts, dtype=torch.bool)
    sequences = experts.view(-1, sequence_length, slots).transpose(1, 2).reshape(-1, slots * sequence_length)
    # Rank of each assignment among its sequence's assignments to the same expert, by a stable sort on the
    # expert id within each sequence (slot-major order is the sort's tie order).
    order = torch.sort(sequences, dim=-1, stable=True).indices
    sorted_experts = sequences.gather(-1, order)
    position = torch.arange(sequences.shape[1], device=experts.device).expand_as(sequences)
    is_first = torch.ones_like(sorted_experts, dtype=torch.bool)
    is_first[:, 1:] = sorted_experts[:, 1:] != sorted_experts[:, :-1]
    group_start = torch.cummax(torch.where(is_first, position, 0), dim=-1).values
    kept_sorted = (position - group_start) < capacity
    kept = torch.empty_like(kept_sorted).scatter_(-1, order, kept_sorted)
    return kept.view(-1, slots, sequence_length).transpose(1, 2).reshape(num_tokens, slots)


def permute(backend: Backend, experts: Tensor, num_experts: int, capacity: int | None, kept: Tensor | None = None) -> Permutation:
    """The backend's Permutation of experts [T, S], without the assignments where ``kept`` [T, S] is False.

    The dropped ones go to an extra expert E, which is then cut off: its rows become padding (-1), so every
    backend's permute serves, and the row count stays the one of E + 1 experts (sizes only).
    """
    if kept is None:
        return backend.permute(experts, num_experts, capacity)
    sink = torch.where(kept, experts, num_experts).to(torch.int32)
    tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments = backend.permute(sink, num_experts + 1, capacity)
    end = expert_offsets[num_experts]
    rows = torch.arange(sorted_assignments.shape[0], device=sorted_assignments.device)
    return Permutation(
        tokens_per_expert=tokens_per_expert[:num_experts],
        expert_offsets=expert_offsets[: num_experts + 1],
        sorted_rows=torch.where(sorted_rows >= end, -1, sorted_rows),
        sorted_assignments=torch.where(rows >= end, -1, sorted_assignments),
    )


def expert_choice_permutation(expert_tokens: Tensor, num_tokens: int, block_m: int) -> Permutation:
    """The Permutation of expert-choice routing: expert e's rows are the tokens expert_tokens[e] [C] chose.

    Slot s of every token is expert s (S = E), so the assignment of (token t, expert e) is t·E + e; segments
    are C rows padded to a multiple of block_m, R = E·that. Slots an expert did not take have no row.
    """
    num_experts, capacity = expert_tokens.shape
    device = expert_tokens.device
    segment = (capacity + block_m - 1) // block_m * block_m
    experts = torch.arange(num_experts, device=device)
    expert_offsets = (experts * segment).to(torch.int32)
    rows = experts[:, None] * segment + torch.arange(capacity, device=device)  # [E, C]
    assignments = expert_tokens.long() * num_experts + experts[:, None]
    sorted_assignments = torch.full((num_experts * segment,), -1, dtype=torch.int32, device=device)
    sorted_assignments[rows.reshape(-1)] = assignments.reshape(-1).to(torch.int32)
    sorted_rows = torch.full((num_tokens * num_experts,), -1, dtype=torch.int32, device=device)
    sorted_rows[assignments.reshape(-1)] = rows.reshape(-1).to(torch.int32)
    return Permutation(
        tokens_per_expert=torch.full((num_experts,), capacity, dtype=torch.int32, device=device),
        expert_offsets=torch.cat([expert_offsets, expert_offsets.new_full((1,), num_experts * segment)]),
        sorted_rows=sorted_rows.view(num_tokens, num_experts),
        sorted_assignments=sorted_assignments,
    )


def run_routed_experts(
    backend: Backend,
    x: Tensor,
    experts: Tensor,
    weights: Tensor,
    capacity: int | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    activation: Activation,
    recompute_pre_activation: bool = False,
) -> Tensor:
    """Backend.routed_experts by the backend's stages: its permute of experts [T, S] into up_weight's E experts
    with ``capacity``, then ``run_experts``."""
    permutation = backend.permute(experts, up_weight.shape[0], capacity)
    return run_experts(
        backend, x, permutation, weights, up_weight, up_bias, down_weight, down_bias, activation, recompute_pre_activation
    )


def run_experts(
    backend: Backend,
    x: Tensor,
    permutation: Permutation,
    weights: Tensor,
    up_weight: Tensor,
    up_bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    activation: Activation,
    recompute_pre_activation: bool = False,
) -> Tensor:
    """y [T, d] in x's dtype: GEMM 1 with the activation, GEMM 2 and the weighted combine of the backend.
    recompute_pre_activation: as ``Backend.expert_up``'s."""
    hidden = backend.expert_up(x, up_weight, up_bias, permutation, activation, recompute_pre_activation)
    return backend.expert_down_combine(hidden, down_weight, down_bias, permutation, weights)
