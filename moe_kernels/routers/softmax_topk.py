"""Softmax top-k routing (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS) and its losses, with an optional fused kernel.

Definition, per token with router logits l = x·Wᵀ (+ b) [E]:
- experts: the k largest logits (``base.top_k``: exact, ties to the lower expert id). Softmax is monotone, so
  this is the top k of the probabilities, without the rounding of computing them first.
- weights: the chosen experts' softmax probabilities p_e = exp(l_e − logsumexp(l)), or, with ``renormalize``,
  those divided by their sum, which is the softmax over the k chosen logits.
Model settings: Mixtral ``renormalize=True``; Qwen2-MoE, Qwen3-MoE, OLMoE ``renormalize=norm_topk_prob``
(False in their configs by default); GPT-OSS ``bias=True, renormalize=True`` (top-k on the biased logits, then
the softmax over the k).
Hugging Face computes the same in float32 but ranks the probabilities with ``torch.topk``: at exact ties of the
rounded probabilities the two may choose differently (here the lower id always wins).

Losses: ``balance_loss_weight``·E·Σ f_i·P_i (Switch Transformer, eq. 4) + ``z_loss_weight``·mean logsumexp²
(ST-MoE, eq. 5); see ``losses``.

Kernels (``use_kernel``): "triton", ``moe_kernels.kernels.gating``, computes experts and weights (and their
backward) in one pass over the float32 logits, on backend "triton"; "cpu", ``native.softmax_top_k``, the whole
forward in one C++ op (moe_kernels._C), on backend "torch" on the CPU where no gradient is recorded: the same
ATen calls for the logits and the weights (the same bits as this definition), one selection loop for the sort.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import checks, native
from . import losses
from .base import Router, Routing, linear, top_k


def softmax_top_k(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(weights [T, k], experts [T, k] int32) of the definition above; logits [T, E], differentiable."""
    experts = top_k(logits, k)
    chosen = logits.gather(-1, experts.long())
    if renormalize:
        return torch.softmax(chosen, dim=-1), experts
    return torch.exp(chosen - torch.logsumexp(logits, dim=-1, keepdim=True)), experts


class SoftmaxTopK(Router):
    """Softmax top-k router: ``weight`` [E, d] and, with ``bias``, ``bias`` [E]."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        renormalize: bool = True,
        bias: bool = False,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        device=None,
        dtype=None,
    ):
        super().__init__(d_model, num_experts, k, device=device, dtype=dtype)
        self.renormalize = checks.boolean("renormalize", renormalize)
        has_bias = checks.boolean("bias", bias)
        self.bias = nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype)) if has_bias else None
        self.balance_loss_weight = checks.number("balance_loss_weight", balance_loss_weight)
        self.z_loss_weight = checks.number("z_loss_weight", z_loss_weight)

    def options(self) -> dict:
        return {**super().options(), "bias": self.bias is not None}

    def forward(self, x: Tensor, use_kernel: str | None = None) -> Routing:
        """x [T, d] → Routing with S = k (fields in ``base.Routing``)."""
        logits, weights, experts = self.route(x, use_kernel)
        return Routing(logits, weights, experts, self.loss(logits, experts))

    def route(self, x: Tensor, use_kernel: str | None) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, weights, experts) of x, by the fused kernel asked for where it applies (module docstring)."""
        if use_kernel == "cpu" and native.routes(x, self.weight, self.bias):
            return native.softmax_top_k(x, self.weight, self.bias, self.k, self.renormalize)
        logits = linear(x, self.weight, self.bias)
        return (logits, *self.select(logits, use_kernel))

    def select(self, logits: Tensor, use_kernel: str | None) -> tuple[Tensor, Tensor]:
        """(weights, experts) of the logits, by the Triton kernel where asked for (float32)."""
        if use_kernel == "triton" and logits.dtype == torch.float32:
            from ..ops import softmax_topk  # Triton: imported only where the kernels run

            return softmax_topk(logits, self.k, self.renormalize)
        return softmax_top_k(logits, self.k, self.renormalize)

    def loss(self, logits: Tensor, experts: Tensor) -> Tensor | None:
        if not self.wants_aux_loss():
            return None
        return losses.weighted_sum(
            logits,
            (self.balance_loss_weight, lambda: losses.balance_loss(torch.softmax(logits, dim=-1), experts)),
            (self.z_loss_weight, lambda: losses.z_loss(logits)),
        )
