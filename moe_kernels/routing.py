"""Routers and their losses, in plain PyTorch.

This file is the mathematical definition of routing for the whole package: the reference layer and
backend "torch" call these functions, and the Triton and native gating kernels compute the same
quantities. Every function takes router logits in float32 (float64 for gradcheck), returns floats in the
logits' dtype, and is differentiable.

Conventions shared by every router and every backend:
- ``weights`` [T, k] float32 and ``experts`` [T, k] int32, slot s holding the token's s-th choice in
  descending order of score; ties go to the lower expert id.
- ``importance`` [E] float32: Σ_x of the gates G(x) (the kept weights scattered over experts).
- ``load`` [E] float32: assignments per expert before capacity dropping, or, for noisy top-k in
  training, the smooth estimate Σ_x P(expert i in the top k) of Shazeer et al. (2017), Appendix A.
- ``probability_sum`` [E] float32: Σ_x softmax(logits(x)), the P_i of the Switch balance loss times T.
- ``logsumexp`` [T] float32: logsumexp of each token's logits, for the ST-MoE router z-loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

ROUTERS = ("topk", "noisy_topk", "switch")


class Routing(NamedTuple):
    """What a router hands to the permutation and to the losses (shapes in the module docstring)."""

    weights: Tensor
    experts: Tensor
    importance: Tensor
    load: Tensor
    probability_sum: Tensor
    logsumexp: Tensor


@dataclass(frozen=True)
class LossWeights:
    """Weights of the router losses; defaults follow the papers.

    importance, load: Shazeer et al. 2017 (noisy_topk). balance: Switch Transformer (topk, switch).
    z: ST-MoE router z-loss (topk, switch).
    """

    importance: float = 0.1
    load: float = 0.1
    balance: float = 0.01
    z: float = 0.001


def _statistics(logits: Tensor, weights: Tensor, experts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """importance, assignment counts, probability_sum and logsumexp of one routing (see module docstring)."""
    num_experts = logits.shape[-1]
    experts64 = experts.long()
    importance = logits.new_zeros(num_experts).index_add(0, experts64.flatten(), weights.flatten())
    counts = torch.bincount(experts64.flatten(), minlength=num_experts).to(logits.dtype)
    probability_sum = torch.softmax(logits, dim=-1).sum(0)
    return importance, counts, probability_sum, torch.logsumexp(logits, dim=-1)


def _top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k values and int32 indices of each row, descending, ties to the lower index."""
    # A stable descending sort puts equal scores in index order, which a kernel reproduces.
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k].to(torch.int32)


def topk(logits: Tensor, k: int, renormalize: bool = True) -> Routing:
    """Softmax over all experts, keep the top k, renormalise them to sum to one if ``renormalize``.

    logits: [T, E] float32. Mixtral / Qwen-MoE routing.
    """
    probabilities = torch.softmax(logits, dim=-1)
    weights, experts = _top_k(probabilities, k)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return Routing(weights, experts, *_statistics(logits, weights, experts))


def switch(logits: Tensor) -> Routing:
    """Switch Transformer top-1: the gate is the chosen expert's softmax probability. logits: [T, E] float32."""
    return topk(logits, 1, renormalize=False)


def noisy_topk(
    clean_logits: Tensor,
    noise_logits: Tensor,
    k: int,
    noise: Tensor | None = None,
    noise_epsilon: float = 1e-2,
) -> Routing:
    """Noisy top-k gating of Shazeer et al. (2017), equations (3)-(5) and Appendix A.

    clean_logits = x·W_g and noise_logits = x·W_noise, both [T, E] float32; ``noise`` [T, E] is the
    N(0, 1) draw, or None in evaluation (no noise; ``load`` then counts assignments).
    H = clean + noise·(softplus(noise_logits) + noise_epsilon); G = softmax over the top-k values of H.
    """
    num_experts = clean_logits.shape[-1]
    if noise is None:
        top_values, experts = _top_k(clean_logits, k)
        weights = torch.softmax(top_values, dim=-1)
        return Routing(weights, experts, *_statistics(clean_logits, weights, experts))

    noise_std = torch.nn.functional.softplus(noise_logits) + noise_epsilon
    noisy_logits = clean_logits + noise * noise_std
    top_values, experts = _top_k(noisy_logits, min(k + 1, num_experts))
    weights = torch.softmax(top_values[:, :k], dim=-1)
    experts = experts[:, :k]
    importance, _, probability_sum, logsumexp = _statistics(clean_logits, weights, experts)

    if k == num_experts:
        # Every expert is always in the top k: the load is the constant T.
        load = clean_logits.new_full((num_experts,), float(clean_logits.shape[0]))
        return Routing(weights, experts, importance, load, probability_sum, logsumexp)
    # P(expert i in top k) with the other experts' noise fixed: i must beat the k-th largest noisy value
    # among the others, which is the (k+1)-th overall when i is in the top k, else the k-th.
    threshold_if_in = top_values[:, k : k + 1]
    threshold_if_out = top_values[:, k - 1 : k]
    is_in = noisy_logits > threshold_if_in
    probability_if_in = normal_cdf((clean_logits - threshold_if_in) / noise_std)
    probability_if_out = normal_cdf((clean_logits - threshold_if_out) / noise_std)
    load = torch.where(is_in, probability_if_in, probability_if_out).sum(0)
    return Routing(weights, experts, importance, load, probability_sum, logsumexp)


def normal_cdf(z: Tensor) -> Tensor:
    """Φ(z) of the standard normal distribution; passes NaN through (torch.distributions would raise)."""
    return 0.5 * (1.0 + torch.erf(z * (0.5**0.5)))


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation (population variance over squared mean) of a [E] vector."""
    return values.var(unbiased=False) / (values.mean() ** 2 + 1e-10)


def router_loss(routing: Routing, router: str, k: int, loss_weights: LossWeights) -> Tensor:
    """The weighted sum of the router's auxiliary losses, a float32 scalar (zero for an empty batch).

    noisy_topk: importance·CV²(importance) + load·CV²(load) (Shazeer et al. 2017, eqs. 6-10).
    topk, switch: balance·E·Σ_i f_i·P_i with f_i the fraction of assignments (before dropping) and P_i
    the mean router probability (Fedus et al. 2021, eq. 4), plus z·mean(logsumexp²) (ST-MoE, eq. 5).
    """
    num_tokens = routing.weights.shape[0]
    if num_tokens == 0:
        return routing.weights.sum()
    if router == "noisy_topk":
        return loss_weights.importance * cv_squared(routing.importance) + loss_weights.load * cv_squared(routing.load)
    num_experts = routing.load.shape[0]
    fraction = routing.load / (num_tokens * k)
    mean_probability = routing.probability_sum / num_tokens
    balance = num_experts * (fraction * mean_probability).sum()
    z_loss = routing.logsumexp.square().mean()
    return loss_weights.balance * balance + loss_weights.z * z_loss
