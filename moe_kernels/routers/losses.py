"""Auxiliary router losses shared by several router families, in the logits' dtype, zero for an empty batch.

No function here synchronises with the device (counts by scatter_add, never bincount).
"""
from __future__ import annotations

import torch
from torch import Tensor


def assignment_counts(experts: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """[E]: how many of the assignments ``experts`` [T, S] go to each expert (exact: integers, order-free)."""
    flat = experts.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=experts.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).to(dtype)


def balance_loss(probabilities: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eq. 4): E·Σ_i f_i·P_i.

    f_i is the fraction of the T·S assignments that chose expert i (before any capacity drop) and P_i the mean
    over tokens of the router's probabilities [T, E] (softmax(logits) for softmax routers); experts [T, S].
    Gradient flows through P only.
    """
    num_tokens, num_experts = probabilities.shape
    if num_tokens == 0:
        return probabilities.sum()
    fraction = assignment_counts(experts, num_experts, probabilities.dtype) / experts.numel()
    return num_experts * (fraction * probabilities.mean(0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)²."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation (population variance over squared mean) of a [E] vector (Shazeer et al.
    2017, eqs. 6-7)."""
    return values.var(unbiased=False) / (values.mean() ** 2 + 1e-10)


def weighted_sum(logits: Tensor, *terms: tuple[float, object]) -> Tensor:
    """Σ weight·loss() over the (weight, loss function) pairs whose weight is non-zero: a loss with weight 0 is
    not computed. A scalar in the logits' dtype (0 when every weight is 0)."""
    total = logits.new_zeros(())
    for weight, loss in terms:
        if weight:
            total = total + weight * loss()
    return total
