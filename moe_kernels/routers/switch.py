"""Switch Transformer's top-1 router (Fedus et al. 2021; Hugging Face's SwitchTransformersTop1Router).

Definition: softmax top-k with k = 1 and no renormalisation (``softmax_topk``): each token goes to the expert
with the largest logit, with gate = that expert's softmax probability. Options:
- ``jitter_noise``: in training, the router's input (only the router's: Switch §2.4, "multiplicative jitter
  noise to the incoming representation") is multiplied by U(1 − jitter_noise, 1 + jitter_noise), drawn in
  float32 as the forward's first random draw. Hugging Face draws the same but multiplies in place, so that in
  float32 models its experts see the jittered input too (in bf16 ones they do not); here they never do.
- ``bias``: a bias on the router's logits (``router_bias``).
Capacity is the layer's: ``capacity_factor`` over the call, or Hugging Face's ``expert_capacity`` per
sequence (first come in token order within each sequence).
Losses: as softmax top-k (balance and z-loss).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from .base import Routing, router_dtype
from .softmax_topk import SoftmaxTopK


class Switch(SoftmaxTopK):
    """Top-1 router: ``weight`` [E, d] and, with ``bias``, ``bias`` [E]. k must be 1."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        *,
        jitter_noise: float = 0.0,
        bias: bool = False,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        device=None,
        dtype=None,
    ):
        if k != 1:
            raise ValueError(f"router 'switch' sends each token to one expert: k must be 1, got k={k}")
        super().__init__(
            d_model, num_experts, k, renormalize=False, bias=bias, balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight, device=device, dtype=dtype,
        )  # fmt: skip
        self.jitter_noise = checks.number("jitter_noise", jitter_noise)
        if self.jitter_noise >= 1.0:
            raise ValueError(f"jitter_noise must be in [0, 1) (a factor U(1 − j, 1 + j)), got {jitter_noise!r}")

    def forward(self, x: Tensor, use_kernel: str | None = None) -> Routing:
        """x [T, d] → Routing with S = 1 (fields in ``base.Routing``)."""
        if self.training and self.jitter_noise > 0:
            noise = torch.empty(x.shape, device=x.device).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            x = x.to(router_dtype(x)) * noise.to(router_dtype(x))
        logits, weights, experts = self.route(x, use_kernel)
        return Routing(logits, weights, experts, self.loss(logits, experts))
