"""Softmax top-k gating: router logits → top-k expert ids and their weights, forward and backward.

The fused kernel of ``moe_kernels.routers.softmax_topk`` (routers "topk" and "switch"), equal to its PyTorch
definition: experts are the k largest logits (NaN above every number, ties to the lower expert id: the
ranking rule of ``routers.base.top_k``), weights the chosen softmax probabilities, renormalised over the k if
asked for. Ranking the logits rather than the probabilities keeps the choice exact: the GPU's approximate
exp and divide never decide it.

One program owns BLOCK_T tokens and all E experts of them (E padded to a power of two, padding masked as
-inf), so each token's result comes out of one read of its logits. The backward recomputes the softmax from
the logits and the forward's expert ids; nothing else is saved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import gating_tiles


@triton.jit
def _select_largest(scores, available, columns, BLOCK_E: tl.constexpr):
    """Per row of scores [BLOCK_T, BLOCK_E], the largest score among the available columns.

    NaN ranks above every number and ties go to the lower column. Returns (column [BLOCK_T] int32,
    value [BLOCK_T]); rows without an available column get BLOCK_E.
    """
    is_nan = available & (scores != scores)
    any_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    best = tl.max(tl.where(available & (scores == scores), scores, float("-inf")), axis=1)
    candidates = tl.where(any_nan[:, None], is_nan, available & (scores == best[:, None]))
    column = tl.min(tl.where(candidates, columns[None, :], BLOCK_E), axis=1)
    # A sum, not a max, reads the chosen value so that a NaN survives on every backend.
    value = tl.sum(tl.where(columns[None, :] == column[:, None], scores, 0.0), axis=1)
    return column, value


@triton.jit
def _load_logits(logits_ptr, tokens, columns, stride_t, stride_e, token_mask, column_mask):
    """The [BLOCK_T, BLOCK_E] float32 logits tile: tokens past T read 0 (finite, so nothing warns), padded
    experts -inf (never chosen, weight 0)."""
    mask = token_mask[:, None] & column_mask[None, :]
    logits = tl.load(logits_ptr + tokens[:, None] * stride_t + columns[None, :] * stride_e, mask=mask, other=0.0)
    return tl.where(column_mask[None, :], logits, float("-inf"))


@triton.jit
def _softmax_top_k_fwd_kernel(
    # pointers
    logits_ptr,  # (T, E) float32
    weights_ptr,  # (T, K) float32, out
    experts_ptr,  # (T, K) int32, out
    # sizes
    num_tokens,
    num_experts,
    # strides
    stride_logits_t,
    stride_logits_e,
    stride_weights_t,
    stride_weights_k,
    stride_experts_t,
    stride_experts_k,
    # constexprs
    K: tl.constexpr,  # choices per token
    RENORMALIZE: tl.constexpr,  # weights: softmax over the K chosen logits, else over all E
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two ≥ K
):
    block = tl.program_id(0).to(tl.int64)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    columns = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    token_mask = tokens < num_tokens
    column_mask = columns < num_experts
    logits = _load_logits(logits_ptr, tokens, columns, stride_logits_t, stride_logits_e, token_mask, column_mask)

    available = tl.broadcast_to(column_mask[None, :], (BLOCK_T, BLOCK_E))
    top_columns = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    top_values = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for slot in tl.static_range(K):
        column, value = _select_largest(logits, available, columns, BLOCK_E)
        available = available & (columns[None, :] != column[:, None])
        top_columns = tl.where(slots[None, :] == slot, column[:, None], top_columns)
        top_values = tl.where(slots[None, :] == slot, value[:, None], top_values)

    # Softmax numerator relative to the largest logit (slot 0's, or NaN, which then reaches every weight).
    largest = tl.sum(tl.where(slots[None, :] == 0, top_values, 0.0), axis=1)
    slot_mask = slots[None, :] < K
    numerators = tl.where(slot_mask, tl.exp(top_values - largest[:, None]), 0.0)
    if RENORMALIZE:
        partition = tl.sum(numerators, axis=1)
    else:
        partition = tl.sum(tl.exp(logits - largest[:, None]), axis=1)
    weights = numerators / partition[:, None]

    out_mask = token_mask[:, None] & slot_mask
    tl.store(weights_ptr + tokens[:, None] * stride_weights_t + slots[None, :] * stride_weights_k, weights, mask=out_mask)
    tl.store(experts_ptr + tokens[:, None] * stride_experts_t + slots[None, :] * stride_experts_k, top_columns, mask=out_mask)


@triton.jit
def _softmax_top_k_bwd_kernel(
    # pointers
    logits_ptr,  # (T, E) float32
    experts_ptr,  # (T, K) int32, the forward's expert ids
    grad_weights_ptr,  # (T, K) float32
    grad_logits_ptr,  # (T, E) float32, out
    # sizes
    num_tokens,
    num_experts,
    # strides
    stride_logits_t,
    stride_logits_e,
    stride_experts_t,
    stride_experts_k,
    stride_grad_weights_t,
    stride_grad_weights_k,
    stride_grad_logits_t,
    stride_grad_logits_e,
    # constexprs
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    columns = tl.arange(0, BLOCK_E)
    token_mask = tokens < num_tokens
    column_mask = columns < num_experts
    logits = _load_logits(logits_ptr, tokens, columns, stride_logits_t, stride_logits_e, token_mask, column_mask)

    # The gradient reaching each chosen expert's weight, scattered over experts.
    selected = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    grad_gates = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for slot in tl.static_range(K):
        # Tokens past T take expert 0 with gradient 0: their (unstored) arithmetic stays finite.
        expert = tl.load(experts_ptr + tokens * stride_experts_t + slot * stride_experts_k, mask=token_mask, other=0)
        grad_weight = tl.load(
            grad_weights_ptr + tokens * stride_grad_weights_t + slot * stride_grad_weights_k, mask=token_mask, other=0.0
        )
        chosen = columns[None, :] == expert[:, None]
        selected = selected | chosen
        grad_gates = tl.where(chosen, grad_weight[:, None], grad_gates)

    # weight_s = q[e_s] with q the softmax over the chosen logits (RENORMALIZE) or over all of them, so
    # d logit_j = q_j·(G_j − Σ_i q_i·G_i), G the gate gradients (0 off the chosen experts).
    in_softmax = selected if RENORMALIZE else column_mask[None, :]
    largest = tl.max(tl.where(in_softmax, logits, float("-inf")), axis=1)
    exponentials = tl.where(in_softmax, tl.exp(logits - largest[:, None]), 0.0)
    probabilities = exponentials / tl.sum(exponentials, axis=1)[:, None]
    grad_logits = probabilities * (grad_gates - tl.sum(probabilities * grad_gates, axis=1)[:, None])

    mask = token_mask[:, None] & column_mask[None, :]
    tl.store(
        grad_logits_ptr + tokens[:, None] * stride_grad_logits_t + columns[None, :] * stride_grad_logits_e,
        grad_logits,
        mask=mask,
    )


def _check(logits: Tensor, k: int) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a [T, E] float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, E={logits.shape[1]}], got {k}")


def softmax_top_k_forward(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(weights [T, k] float32, experts [T, k] int32) of logits [T, E] float32, in one kernel; equals
    ``routers.softmax_topk.softmax_top_k``. Nothing waits on the device."""
    _check(logits, k)
    num_tokens, num_experts = logits.shape
    block_e = triton.next_power_of_2(num_experts)
    block_t, num_warps = gating_tiles(block_e)
    weights = torch.empty((num_tokens, k), dtype=torch.float32, device=logits.device)
    experts = torch.empty((num_tokens, k), dtype=torch.int32, device=logits.device)
    grid = lambda META: (triton.cdiv(num_tokens, META["BLOCK_T"]),)  # noqa: E731
    if num_tokens > 0:
        _softmax_top_k_fwd_kernel[grid](
            logits, weights, experts,
            num_tokens, num_experts,
            logits.stride(0), logits.stride(1),
            weights.stride(0), weights.stride(1),
            experts.stride(0), experts.stride(1),
            K=k, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(k),
            num_warps=num_warps,
        )  # fmt: skip
    return weights, experts


def softmax_top_k_backward(grad_weights: Tensor, logits: Tensor, experts: Tensor, renormalize: bool) -> Tensor:
    """grad_logits [T, E] float32 from grad_weights [T, k] float32, the forward's logits and expert ids [T, k]
    int32: what torch.autograd computes through ``routers.softmax_topk.softmax_top_k``."""
    num_tokens, num_experts = logits.shape
    k = experts.shape[1]
    block_e = triton.next_power_of_2(num_experts)
    block_t, num_warps = gating_tiles(block_e)
    grad_logits = torch.empty_like(logits)
    grid = lambda META: (triton.cdiv(num_tokens, META["BLOCK_T"]),)  # noqa: E731
    if num_tokens > 0:
        _softmax_top_k_bwd_kernel[grid](
            logits, experts, grad_weights, grad_logits,
            num_tokens, num_experts,
            logits.stride(0), logits.stride(1),
            experts.stride(0), experts.stride(1),
            grad_weights.stride(0), grad_weights.stride(1),
            grad_logits.stride(0), grad_logits.stride(1),
            K=k, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )  # fmt: skip
    return grad_logits
