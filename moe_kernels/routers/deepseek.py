"""DeepSeek-V2/V3 routing (Hugging Face's DeepseekV2TopkRouter / DeepseekV3TopkRouter; DeepSeek-V3 report §2.1.2).

Definition, per token with router logits l = x·Wᵀ [E] (E experts in ``n_group`` groups of E/n_group):
- scores s = sigmoid(l) (``scoring="sigmoid"``, V3) or softmax(l) (``"softmax"``, V2);
- selection scores c = s + ``e_score_correction_bias`` [E] (a buffer, V3's auxiliary-loss-free balancing:
  it moves the choice, never the weights; ``correction_bias=False``: no buffer, c = s);
- group-limited top-k: each group is scored by the sum of its two largest c (``group_score="top2_sum"``, V3) or
  its largest c (``"max"``, V2); the ``topk_group`` best groups stay (``base.top_k``: exact, ties to the lower
  group id), and the experts are the k largest c among them (ties to the lower expert id);
- weights: the chosen experts' unbiased s, divided by their sum + 1e-20 if ``renormalize`` (norm_topk_prob),
  times ``routed_scaling_factor``.
Model settings: DeepSeek-V3 the defaults (with its n_group 8, topk_group 4, routed_scaling_factor 2.5);
DeepSeek-V2 ``scoring="softmax", correction_bias=False, group_score="max", renormalize=False`` (its
topk_method "greedy" is n_group = topk_group = 1). Shared experts are the layer's (``shared_d_ff``).
Transformers ranks with ``torch.topk(sorted=False)``: the same experts but for exact ties; slot order differs,
which changes nothing downstream.

Loss: ``balance_loss_weight``·E·Σ f_i·P_i (DeepSeek-V2 §2.2's expert-level balance loss, normalised as
Switch's), with P_i the mean of each token's scores normalised to sum 1; 0 by default (V3 balances with the
bias, updated outside the forward by the training loop).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from . import losses
from .base import Router, Routing, linear, top_k


class DeepSeek(Router):
    """DeepSeek-V2/V3 router: ``weight`` [E, d] and, with ``correction_bias``, the buffer ``e_score_correction_bias`` [E]."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        scoring: str = "sigmoid",
        correction_bias: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        group_score: str = "top2_sum",
        renormalize: bool = True,
        routed_scaling_factor: float = 1.0,
        balance_loss_weight: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__(d_model, num_experts, k, device=device, dtype=dtype)
        self.scoring = checks.choice("scoring", scoring, ("sigmoid", "softmax"))
        self.n_group = checks.integer("n_group", n_group)
        self.topk_group = checks.integer("topk_group", topk_group)
        self.group_score = checks.choice("group_score", group_score, ("top2_sum", "max"))
        self.renormalize = checks.boolean("renormalize", renormalize)
        self.routed_scaling_factor = checks.number("routed_scaling_factor", routed_scaling_factor, strict=True)
        self.balance_loss_weight = checks.number("balance_loss_weight", balance_loss_weight)
        if num_experts % self.n_group:
            raise ValueError(f"n_group must divide num_experts={num_experts}, got n_group={n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group must be at most n_group={self.n_group}, got topk_group={topk_group}")
        group_size = num_experts // self.n_group
        if k > self.topk_group * group_size:
            raise ValueError(f"k={k} exceeds the topk_group·E/n_group = {self.topk_group * group_size} experts a token can reach")
        if self.n_group > 1 and self.group_score == "top2_sum" and group_size < 2:
            raise ValueError(f"group_score 'top2_sum' needs groups of 2 or more experts, got E/n_group = {group_size}")
        if checks.boolean("correction_bias", correction_bias):
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device, dtype=dtype))
        else:
            self.e_score_correction_bias = None

    @property
    def correction_bias(self) -> bool:
        """Whether the router has the ``e_score_correction_bias`` buffer (the constructor option)."""
        return self.e_score_correction_bias is not None

    def forward(self, x: Tensor, use_kernel: str | None = None) -> Routing:
        """x [T, d] → Routing with S = k (fields in ``base.Routing``); no fused kernel."""
        logits = linear(x, self.weight)
        scores = torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.to(scores.dtype)
        choice = choice.detach()  # the choice is not differentiable; the weights come from the scores
        if self.n_group > 1:
            groups = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.group_score == "top2_sum":
                group_scores = groups.gather(-1, top_k(groups, 2).long()).sum(-1)
            else:
                group_scores = groups.amax(-1)
            kept_groups = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, top_k(group_scores, self.topk_group).long(), True)
            choice = torch.where(kept_groups.repeat_interleave(groups.shape[-1], dim=-1), choice, float("-inf"))
        experts = top_k(choice, self.k)
        weights = scores.gather(-1, experts.long())
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return Routing(logits, weights, experts, self.loss(scores, experts))

    def loss(self, scores: Tensor, experts: Tensor) -> Tensor | None:
        if not self.wants_aux_loss():
            return None
        probabilities = lambda: scores / scores.sum(-1, keepdim=True)  # noqa: E731
        return losses.weighted_sum(scores, (self.balance_loss_weight, lambda: losses.balance_loss(probabilities(), experts)))
