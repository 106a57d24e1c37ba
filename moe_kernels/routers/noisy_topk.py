"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks", eqs. 3-10 and Appendix A).

Definition, per token with clean logits c = x·W_gᵀ and noise logits n = x·W_noiseᵀ [E]:
- scores H = c + ε·(softplus(n) + noise_epsilon) with ε ~ N(0, 1) [E] in training (the forward's first random
  draw, taken in float32), H = c in evaluation;
- experts: the k largest H (``base.top_k``); weights: the softmax over those k values of H.
Losses (eqs. 6-10): ``importance_loss_weight``·CV²(importance) + ``load_loss_weight``·CV²(load), with
importance_i = Σ_x G_i(x) and load_i = Σ_x P(i in the top k of x): in training the smooth estimate of
Appendix A (expert i must beat the k-th largest noisy score among the others, which is the (k+1)-th overall
when i is in the top k, else the k-th), in evaluation the assignment counts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks, native
from . import losses
from .base import Router, Routing, linear, top_k, uniform_


def normal_cdf(z: Tensor) -> Tensor:
    """Φ(z) of the standard normal distribution; passes NaN through (torch.distributions would raise)."""
    return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5)))


class NoisyTopK(Router):
    """Noisy top-k router: ``weight`` [E, d] (W_g) and ``noise_weight`` [E, d] (W_noise)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        noise_epsilon: float = 1e-2,
        importance_loss_weight: float = 0.1,
        load_loss_weight: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__(d_model, num_experts, k, device=device, dtype=dtype)
        self.noise_weight = nn.Parameter(uniform_(torch.empty(num_experts, d_model, device=device, dtype=dtype), d_model))
        self.noise_epsilon = checks.number("noise_epsilon", noise_epsilon)
        self.importance_loss_weight = checks.number("importance_loss_weight", importance_loss_weight)
        self.load_loss_weight = checks.number("load_loss_weight", load_loss_weight)

    def forward(self, x: Tensor, use_kernel: str | None = None) -> Routing:
        """x [T, d] → Routing with S = k (fields in ``base.Routing``). Without noise (evaluation) this is softmax
        top-k with ``renormalize``: ``use_kernel="cpu"`` runs it by that C++ kernel where it applies
        (``native.routes``)."""
        if not self.training and use_kernel == "cpu" and native.routes(x, self.weight, None):
            logits, weights, experts = native.softmax_top_k(x, self.weight, None, self.k, True)
            aux_loss = self.loss(logits, logits, None, experts, weights) if self.wants_aux_loss() else None
            return Routing(logits, weights, experts, aux_loss)
        logits = linear(x, self.weight)
        num_tokens, num_experts = logits.shape
        noise_std = None
        scores = logits
        if self.training:
            noise = torch.randn(num_tokens, num_experts, device=x.device).to(logits.dtype)
            noise_std = F.softplus(linear(x, self.noise_weight)) + self.noise_epsilon
            scores = logits + noise * noise_std
        wants_loss = self.wants_aux_loss()
        # The smooth load needs the (k+1)-th score too.
        selected = top_k(scores, min(self.k + 1, num_experts) if wants_loss and noise_std is not None else self.k)
        experts = selected[:, : self.k]
        weights = torch.softmax(scores.gather(-1, experts.long()), dim=-1)
        aux_loss = self.loss(logits, scores, noise_std, selected, weights) if wants_loss else None
        return Routing(logits, weights, experts, aux_loss)

    def loss(self, logits: Tensor, scores: Tensor, noise_std: Tensor | None, selected: Tensor, weights: Tensor) -> Tensor:
        num_tokens, num_experts = logits.shape
        if num_tokens == 0:
            return logits.sum()
        experts = selected[:, : self.k].long()
        # Gates scattered over experts (distinct ids per row: a scatter, no accumulation), summed over tokens.
        importance = torch.zeros_like(logits).scatter(-1, experts, weights).sum(0)
        if noise_std is None:
            load = losses.assignment_counts(experts, num_experts, logits.dtype)
        elif self.k == num_experts:
            load = logits.new_full((num_experts,), float(num_tokens))  # every expert is always in the top k
        else:
            top_scores = scores.gather(-1, selected.long())
            threshold_if_in, threshold_if_out = top_scores[:, self.k : self.k + 1], top_scores[:, self.k - 1 : self.k]
            is_in = scores > threshold_if_in
            threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
            load = normal_cdf((logits - threshold) / noise_std).sum(0)
        return losses.weighted_sum(
            logits,
            (self.importance_loss_weight, lambda: losses.cv_squared(importance)),
            (self.load_loss_weight, lambda: losses.cv_squared(load)),
        )
