"""Gating: router logits → top-k weights, int32 expert ids and the loss statistics, forward and backward.

One program owns BLOCK_T tokens and all E experts of them (E padded to a power of two, padding masked
as -inf), so every per-token quantity comes out of one read of the logits. The per-expert sums
(importance, load, probability_sum) are written per token block into a small [3, num_token_blocks, E]
buffer that the launcher reduces with a sum over blocks: deterministic, no float atomics.

The routers are those of ``moe_kernels.routing`` and the results equal its functions:
- "topk": softmax over all experts, top k of the probabilities, renormalised if ``config.renormalize``.
- "switch": top-1 of the softmax, not renormalised.
- "noisy_topk": top k of H = clean + noise·(softplus(noise_logits) + ε) (H = clean without noise), gates
  the softmax over the k kept values of H, load the smooth estimate of Shazeer et al. (2017) in training.
Top-k is k rounds of "take the largest remaining score": NaN ranks above every number and ties go to the
lower expert id, which is what routing.py's stable descending sort does.

What the backward needs from the forward: the inputs (logits, and noise_logits and noise for noisy top-k in
training) and the forward's ``experts``. Everything else (softmax, gates, the threshold expert of the
smooth load) is recomputed from them, which costs one more read of [T, E] and saves storing it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..pipeline import RouterConfig
from ..routing import Routing
from .tiles import gating_tiles


@triton.jit
def _select_largest(scores, available, columns, BLOCK_E: tl.constexpr):
    """Per row of scores [BLOCK_T, BLOCK_E], the largest score among the available columns.

    NaN ranks above every number and ties go to the lower column (a stable descending sort's order).
    Returns (column [BLOCK_T] int32, value [BLOCK_T]); rows without an available column get BLOCK_E.
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
def _softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20); log1p written out, tl.math has none."""
    exp_x = tl.exp(x)
    one_plus = 1.0 + exp_x
    # log(1+y)·y/((1+y)-1) is log1p(y) to a few ulps (Goldberg 1991, Theorem 4); y itself where 1+y rounds to 1.
    log1p = tl.where(one_plus == 1.0, exp_x, tl.log(one_plus) * exp_x / (one_plus - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _normal_cdf(z):
    """Φ(z), written as torch.distributions.Normal(0, 1).cdf writes it."""
    return 0.5 * (1.0 + tl.math.erf(z / 1.4142135623730951))


@triton.jit
def _load_tile(ptr, tokens, columns, stride_t, stride_e, mask):
    """The [BLOCK_T, BLOCK_E] float32 tile of a [T, E] tensor; zeros outside the mask."""
    return tl.load(ptr + tokens[:, None] * stride_t + columns[None, :] * stride_e, mask=mask, other=0.0)


@triton.jit
def _softmax(logits_ptr, tokens, columns, stride_t, stride_e, mask, column_mask):
    """Logits tile and its row softmax: (logits, row_max, partition, probabilities).

    Tokens past T read zeros (finite, so nothing warns); padded experts read -inf and never get chosen.
    """
    logits = _load_tile(logits_ptr, tokens, columns, stride_t, stride_e, mask)
    logits = tl.where(column_mask[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    exponentials = tl.exp(logits - row_max[:, None])
    partition = tl.sum(exponentials, axis=1)
    return logits, row_max, partition, exponentials / partition[:, None]


@triton.jit
def _noisy_scores(
    logits, noise_logits_ptr, noise_ptr, tokens, columns, stride_nl_t, stride_nl_e, stride_n_t, stride_n_e, mask, noise_epsilon
):
    """H = clean + noise·(softplus(noise_logits) + ε): (noise_logits, noise, noise_std, H), [BLOCK_T, BLOCK_E]."""
    noise_logits = _load_tile(noise_logits_ptr, tokens, columns, stride_nl_t, stride_nl_e, mask)
    noise = _load_tile(noise_ptr, tokens, columns, stride_n_t, stride_n_e, mask)
    noise_std = _softplus(noise_logits) + noise_epsilon
    return noise_logits, noise, noise_std, logits + noise * noise_std


@triton.jit
def _gating_fwd_kernel(
    # pointers
    logits_ptr,  # (T, E) float32, the clean router logits
    noise_logits_ptr,  # (T, E) float32, read only when NOISY
    noise_ptr,  # (T, E) float32 N(0, 1) draw, read only when NOISY
    weights_ptr,  # (T, K) float32, out
    experts_ptr,  # (T, K) int32, out
    logsumexp_ptr,  # (T,) float32, out
    block_sums_ptr,  # (3, num_token_blocks, E) float32, out: importance, load, probability_sum per block
    # sizes
    num_tokens,
    num_experts,
    # strides
    stride_logits_t,
    stride_logits_e,
    stride_noise_logits_t,
    stride_noise_logits_e,
    stride_noise_t,
    stride_noise_e,
    stride_weights_t,
    stride_weights_k,
    stride_experts_t,
    stride_experts_k,
    stride_sums_stat,
    stride_sums_block,
    stride_sums_e,
    # numerics
    noise_epsilon,
    # constexprs
    K: tl.constexpr,  # choices per token
    NUM_SELECTED: tl.constexpr,  # K, or K + 1 when the smooth load needs the (k+1)-th noisy value
    SELECT_ON_LOGITS: tl.constexpr,  # rank logits (noisy_topk) rather than probabilities (topk, switch)
    NOISY: tl.constexpr,  # noisy_topk in training: rank H and estimate the smooth load
    RENORMALIZE: tl.constexpr,  # topk: divide the kept probabilities by their sum
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two ≥ NUM_SELECTED
):
    block = tl.program_id(0).to(tl.int64)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    columns = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    token_mask = tokens < num_tokens
    column_mask = columns < num_experts
    mask = token_mask[:, None] & column_mask[None, :]

    logits, row_max, partition, probabilities = _softmax(
        logits_ptr, tokens, columns, stride_logits_t, stride_logits_e, mask, column_mask
    )
    tl.store(logsumexp_ptr + tokens, row_max + tl.log(partition), mask=token_mask)

    if NOISY:
        noise_logits, noise, noise_std, scores = _noisy_scores(
            logits, noise_logits_ptr, noise_ptr, tokens, columns,
            stride_noise_logits_t, stride_noise_logits_e, stride_noise_t, stride_noise_e, mask, noise_epsilon,
        )  # fmt: skip
    elif SELECT_ON_LOGITS:
        scores = logits
    else:
        scores = probabilities

    available = tl.broadcast_to(column_mask[None, :], (BLOCK_T, BLOCK_E))
    selected = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    top_columns = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    top_values = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for slot in tl.static_range(NUM_SELECTED):
        column, value = _select_largest(scores, available, columns, BLOCK_E)
        chosen = columns[None, :] == column[:, None]
        available = available & ~chosen
        if slot < K:
            selected = selected | chosen
        top_columns = tl.where(slots[None, :] == slot, column[:, None], top_columns)
        top_values = tl.where(slots[None, :] == slot, value[:, None], top_values)

    # Gates per slot (weights) and scattered over experts (importance), computed by the same expressions.
    slot_mask = slots[None, :] < K
    if SELECT_ON_LOGITS:
        top_score = tl.sum(tl.where(slots[None, :] == 0, top_values, 0.0), axis=1)
        slot_gates = tl.where(slot_mask, tl.exp(top_values - top_score[:, None]), 0.0)
        expert_gates = tl.where(selected, tl.exp(scores - top_score[:, None]), 0.0)
    else:
        slot_gates = tl.where(slot_mask, top_values, 0.0)
        expert_gates = tl.where(selected, scores, 0.0)
    if SELECT_ON_LOGITS or RENORMALIZE:
        gate_sum = tl.sum(slot_gates, axis=1)
        slot_gates = slot_gates / gate_sum[:, None]
        expert_gates = expert_gates / gate_sum[:, None]

    out_mask = token_mask[:, None] & slot_mask
    tl.store(weights_ptr + tokens[:, None] * stride_weights_t + slots[None, :] * stride_weights_k, slot_gates, mask=out_mask)
    tl.store(experts_ptr + tokens[:, None] * stride_experts_t + slots[None, :] * stride_experts_k, top_columns, mask=out_mask)

    if NOISY:
        # P(expert in the top k) with the other experts' noise fixed (Shazeer et al. 2017, Appendix A): it
        # must beat the (k+1)-th noisy value when it is in the top k, else the k-th.
        threshold_out = tl.sum(tl.where(slots[None, :] == K - 1, top_values, 0.0), axis=1)
        if NUM_SELECTED > K:
            threshold_in = tl.sum(tl.where(slots[None, :] == K, top_values, 0.0), axis=1)
        else:
            threshold_in = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        is_in = scores > threshold_in[:, None]
        threshold = tl.where(is_in, threshold_in[:, None], threshold_out[:, None])
        load = _normal_cdf((logits - threshold) / noise_std)
    else:
        load = selected.to(tl.float32)

    sums_ptr = block_sums_ptr + block * stride_sums_block + columns * stride_sums_e
    tl.store(sums_ptr, tl.sum(tl.where(mask, expert_gates, 0.0), axis=0), mask=column_mask)
    tl.store(sums_ptr + stride_sums_stat, tl.sum(tl.where(mask, load, 0.0), axis=0), mask=column_mask)
    tl.store(sums_ptr + 2 * stride_sums_stat, tl.sum(tl.where(mask, probabilities, 0.0), axis=0), mask=column_mask)


@triton.jit
def _gating_bwd_kernel(
    # pointers
    logits_ptr,  # (T, E) float32
    noise_logits_ptr,  # (T, E) float32, read only when NOISY
    noise_ptr,  # (T, E) float32, read only when NOISY
    experts_ptr,  # (T, K) int32, the forward's expert ids
    grad_weights_ptr,  # (T, K) float32
    grad_importance_ptr,  # (E,) float32
    grad_load_ptr,  # (E,) float32, read only when NOISY (counts have no gradient)
    grad_probability_sum_ptr,  # (E,) float32
    grad_logsumexp_ptr,  # (T,) float32
    grad_logits_ptr,  # (T, E) float32, out
    grad_noise_logits_ptr,  # (T, E) float32, out, written only when NOISY
    # sizes
    num_tokens,
    num_experts,
    # strides
    stride_logits_t,
    stride_logits_e,
    stride_noise_logits_t,
    stride_noise_logits_e,
    stride_noise_t,
    stride_noise_e,
    stride_experts_t,
    stride_experts_k,
    stride_grad_weights_t,
    stride_grad_weights_k,
    stride_grad_importance_e,
    stride_grad_load_e,
    stride_grad_probability_sum_e,
    stride_grad_logsumexp_t,
    stride_grad_logits_t,
    stride_grad_logits_e,
    stride_grad_noise_logits_t,
    stride_grad_noise_logits_e,
    # numerics
    noise_epsilon,
    # constexprs
    K: tl.constexpr,
    HAS_THRESHOLD_IN: tl.constexpr,  # K < E: the smooth load's (k+1)-th noisy value exists
    SELECT_ON_LOGITS: tl.constexpr,
    NOISY: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    columns = tl.arange(0, BLOCK_E)
    token_mask = tokens < num_tokens
    column_mask = columns < num_experts
    mask = token_mask[:, None] & column_mask[None, :]

    logits, row_max, partition, probabilities = _softmax(
        logits_ptr, tokens, columns, stride_logits_t, stride_logits_e, mask, column_mask
    )

    # The gradient reaching each kept gate: its weight's, plus its expert's importance.
    selected = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    grad_gates = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for slot in tl.static_range(K):
        # Tokens past T take expert 0, which keeps their (unstored) arithmetic finite.
        expert = tl.load(experts_ptr + tokens * stride_experts_t + slot * stride_experts_k, mask=token_mask, other=0)
        grad_weight = tl.load(
            grad_weights_ptr + tokens * stride_grad_weights_t + slot * stride_grad_weights_k, mask=token_mask, other=0.0
        )
        chosen = columns[None, :] == expert[:, None]
        selected = selected | chosen
        grad_gates = tl.where(chosen, grad_weight[:, None], grad_gates)
    grad_importance = tl.load(grad_importance_ptr + columns * stride_grad_importance_e, mask=column_mask, other=0.0)
    grad_gates = tl.where(selected, grad_gates + grad_importance[None, :], 0.0)

    # Every router feeds probability_sum and logsumexp from the clean softmax.
    grad_probability_sum = tl.load(
        grad_probability_sum_ptr + columns * stride_grad_probability_sum_e, mask=column_mask, other=0.0
    )
    grad_logsumexp = tl.load(grad_logsumexp_ptr + tokens * stride_grad_logsumexp_t, mask=token_mask, other=0.0)
    grad_probabilities = tl.broadcast_to(grad_probability_sum[None, :], (BLOCK_T, BLOCK_E))

    if SELECT_ON_LOGITS:
        if NOISY:
            noise_logits, noise, noise_std, scores = _noisy_scores(
                logits, noise_logits_ptr, noise_ptr, tokens, columns,
                stride_noise_logits_t, stride_noise_logits_e, stride_noise_t, stride_noise_e, mask, noise_epsilon,
            )  # fmt: skip
        else:
            scores = logits
        # Gates are the softmax over the kept scores: d score = gate·(d gate - Σ gate·d gate).
        top_score = tl.max(tl.where(selected, scores, float("-inf")), axis=1)
        gates = tl.where(selected, tl.exp(scores - top_score[:, None]), 0.0)
        gates = gates / tl.sum(gates, axis=1)[:, None]
        grad_scores = gates * (grad_gates - tl.sum(gates * grad_gates, axis=1)[:, None])
    else:
        if RENORMALIZE:
            # gate = p / Σ_kept p: d p = (d gate - Σ gate·d gate) / Σ_kept p on the kept experts.
            kept_sum = tl.sum(tl.where(selected, probabilities, 0.0), axis=1)
            gates = tl.where(selected, probabilities, 0.0) / kept_sum[:, None]
            grad_gates = (grad_gates - tl.sum(gates * grad_gates, axis=1)[:, None]) / kept_sum[:, None]
        grad_probabilities = grad_probabilities + tl.where(selected, grad_gates, 0.0)

    grad_logits = probabilities * (
        grad_probabilities
        - tl.sum(tl.where(mask, probabilities * grad_probabilities, 0.0), axis=1)[:, None]
        + grad_logsumexp[:, None]
    )

    if NOISY:
        # Smooth load Σ_x Φ((clean - threshold)/std): the threshold is the (k+1)-th noisy value for experts in
        # the top k, the k-th for the others, and each threshold's gradient flows back into its expert's H.
        last_kept = tl.load(experts_ptr + tokens * stride_experts_t + (K - 1) * stride_experts_k, mask=token_mask, other=0)
        threshold_out_column = last_kept
        threshold_out = tl.sum(tl.where(columns[None, :] == last_kept[:, None], scores, 0.0), axis=1)
        if HAS_THRESHOLD_IN:
            threshold_in_column, threshold_in = _select_largest(
                scores, column_mask[None, :] & ~selected, columns, BLOCK_E
            )
        else:
            threshold_in_column = tl.full((BLOCK_T,), BLOCK_E, tl.int32)
            threshold_in = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        is_in = scores > threshold_in[:, None]
        threshold = tl.where(is_in, threshold_in[:, None], threshold_out[:, None])
        standardized = (logits - threshold) / noise_std
        density = tl.exp(-0.5 * standardized * standardized) * 0.3989422804014327  # φ(z), 1/√(2π)
        grad_load = tl.load(grad_load_ptr + columns * stride_grad_load_e, mask=column_mask, other=0.0)
        grad_clean = tl.where(mask, grad_load[None, :] * density / noise_std, 0.0)
        # z·φ(z) → 0 as z → ±∞ (the threshold -inf when k = E), where the product would read inf·0.
        grad_std = -grad_clean * tl.where(density > 0.0, standardized, 0.0)
        grad_threshold_in = -tl.sum(tl.where(is_in, grad_clean, 0.0), axis=1)
        grad_threshold_out = -tl.sum(tl.where(is_in, 0.0, grad_clean), axis=1)
        grad_scores += tl.where(columns[None, :] == threshold_in_column[:, None], grad_threshold_in[:, None], 0.0)
        grad_scores += tl.where(columns[None, :] == threshold_out_column[:, None], grad_threshold_out[:, None], 0.0)
        grad_logits += grad_clean
        # softplus' = sigmoid below the threshold 20, 1 above it (torch's softplus_backward).
        softplus_slope = tl.where(noise_logits > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-noise_logits)))
        grad_noise_logits = (grad_scores * noise + grad_std) * softplus_slope
        tl.store(
            grad_noise_logits_ptr + tokens[:, None] * stride_grad_noise_logits_t + columns[None, :] * stride_grad_noise_logits_e,
            grad_noise_logits,
            mask=mask,
        )
    if SELECT_ON_LOGITS:
        grad_logits += grad_scores

    tl.store(
        grad_logits_ptr + tokens[:, None] * stride_grad_logits_t + columns[None, :] * stride_grad_logits_e,
        grad_logits,
        mask=mask,
    )


def _router_flags(config: RouterConfig, noise: Tensor | None) -> tuple[int, bool, bool, bool]:
    """(k, SELECT_ON_LOGITS, NOISY, RENORMALIZE) of a router; "switch" is top-1 without renormalisation."""
    if config.router == "switch":
        return 1, False, False, False
    if config.router == "noisy_topk":
        return config.k, True, noise is not None, False
    return config.k, False, False, config.renormalize


def _check_logits(logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a [T, E] float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    k = 1 if config.router == "switch" else config.k
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, E={logits.shape[1]}], got {k}")
    if config.router not in ("topk", "noisy_topk", "switch"):
        raise ValueError(f"config.router must be 'topk', 'noisy_topk' or 'switch', got {config.router!r}")
    if config.router == "noisy_topk" and noise is not None:
        for name, tensor in (("noise_logits", noise_logits), ("noise", noise)):
            if tensor is None or tensor.shape != logits.shape or tensor.dtype != torch.float32:
                raise ValueError(f"{name} must be a float32 tensor of the logits' shape {tuple(logits.shape)}")


def gating_forward(logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig) -> Routing:
    """Route T tokens over E experts in one kernel; equals ``moe_kernels.routing``'s router of ``config``.

    logits: [T, E] float32 (the clean logits for noisy_topk). noise_logits, noise: [T, E] float32, read only
    for noisy_topk with ``noise`` given (training); ``noise=None`` is evaluation, no noise.
    Returns Routing(weights [T, k] float32, experts [T, k] int32, importance [E], load [E],
    probability_sum [E], logsumexp [T], all float32), k = 1 for "switch". Nothing waits on the device.
    """
    _check_logits(logits, noise_logits, noise, config)
    k, select_on_logits, noisy, renormalize = _router_flags(config, noise)
    num_tokens, num_experts = logits.shape
    block_e = triton.next_power_of_2(num_experts)
    block_t, num_warps = gating_tiles(block_e)
    num_selected = min(k + 1, num_experts) if noisy else k

    weights = torch.empty((num_tokens, k), dtype=torch.float32, device=logits.device)
    experts = torch.empty((num_tokens, k), dtype=torch.int32, device=logits.device)
    logsumexp = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
    block_sums = torch.empty((3, triton.cdiv(num_tokens, block_t), num_experts), dtype=torch.float32, device=logits.device)
    # Without noise the noise pointers are never read; the logits stand in for them.
    noise_logits = noise_logits if noisy else logits
    noise = noise if noisy else logits

    grid = lambda META: (triton.cdiv(num_tokens, META["BLOCK_T"]),)  # noqa: E731
    if num_tokens > 0:
        _gating_fwd_kernel[grid](
            logits, noise_logits, noise, weights, experts, logsumexp, block_sums,
            num_tokens, num_experts,
            logits.stride(0), logits.stride(1),
            noise_logits.stride(0), noise_logits.stride(1),
            noise.stride(0), noise.stride(1),
            weights.stride(0), weights.stride(1),
            experts.stride(0), experts.stride(1),
            block_sums.stride(0), block_sums.stride(1), block_sums.stride(2),
            config.noise_epsilon,
            K=k, NUM_SELECTED=num_selected, SELECT_ON_LOGITS=select_on_logits, NOISY=noisy, RENORMALIZE=renormalize,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(num_selected), num_warps=num_warps,
        )  # fmt: skip
    importance, load, probability_sum = block_sums.sum(1)
    return Routing(weights, experts, importance, load, probability_sum, logsumexp)


def gating_backward(
    grad_weights: Tensor | None,
    grad_importance: Tensor | None,
    grad_load: Tensor | None,
    grad_probability_sum: Tensor | None,
    grad_logsumexp: Tensor | None,
    logits: Tensor,
    noise_logits: Tensor | None,
    noise: Tensor | None,
    experts: Tensor,
    config: RouterConfig,
) -> tuple[Tensor, Tensor | None]:
    """The gradient of everything ``gating_forward`` returns, into its logits (and noise logits).

    grad_weights: [T, k]; grad_importance, grad_load, grad_probability_sum: [E]; grad_logsumexp: [T]; all
    float32, None meaning zero. logits, noise_logits, noise: the forward's inputs; experts: [T, k] int32, the
    forward's expert ids. Counts (``load`` without noise) get no gradient.
    Returns (grad_logits [T, E] float32, grad_noise_logits [T, E] float32 for noisy_topk in training, else
    None), as torch.autograd computes them through ``moe_kernels.routing``, except that where routing.py
    reads 0·inf (k = E in training, whose load is a constant) this returns the limit 0.
    """
    k, select_on_logits, noisy, renormalize = _router_flags(config, noise)
    num_tokens, num_experts = logits.shape
    block_e = triton.next_power_of_2(num_experts)
    block_t, num_warps = gating_tiles(block_e)
    zero = logits.new_zeros(())
    # A missing gradient is zero: a stride-0 view of one zero, nothing allocated.
    grad_weights = zero.expand(num_tokens, k) if grad_weights is None else grad_weights
    grad_importance = zero.expand(num_experts) if grad_importance is None else grad_importance
    grad_load = zero.expand(num_experts) if grad_load is None else grad_load
    grad_probability_sum = zero.expand(num_experts) if grad_probability_sum is None else grad_probability_sum
    grad_logsumexp = zero.expand(num_tokens) if grad_logsumexp is None else grad_logsumexp

    grad_logits = torch.empty_like(logits)
    grad_noise_logits = torch.empty_like(logits) if noisy else None
    noise_logits = noise_logits if noisy else logits
    noise = noise if noisy else logits
    grad_noise_out = grad_noise_logits if noisy else grad_logits

    grid = lambda META: (triton.cdiv(num_tokens, META["BLOCK_T"]),)  # noqa: E731
    if num_tokens > 0:
        _gating_bwd_kernel[grid](
            logits, noise_logits, noise, experts,
            grad_weights, grad_importance, grad_load, grad_probability_sum, grad_logsumexp,
            grad_logits, grad_noise_out,
            num_tokens, num_experts,
            logits.stride(0), logits.stride(1),
            noise_logits.stride(0), noise_logits.stride(1),
            noise.stride(0), noise.stride(1),
            experts.stride(0), experts.stride(1),
            grad_weights.stride(0), grad_weights.stride(1),
            grad_importance.stride(0), grad_load.stride(0), grad_probability_sum.stride(0), grad_logsumexp.stride(0),
            grad_logits.stride(0), grad_logits.stride(1),
            grad_noise_out.stride(0), grad_noise_out.stride(1),
            config.noise_epsilon,
            K=k, HAS_THRESHOLD_IN=k < num_experts, SELECT_ON_LOGITS=select_on_logits, NOISY=noisy,
            RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )  # fmt: skip
    return grad_logits, grad_noise_logits
