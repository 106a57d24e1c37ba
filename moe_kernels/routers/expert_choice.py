"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Definition, for the T tokens of one call with router logits l = x·Wᵀ [T, E]:
- scores S = softmax(l) over experts, per token (the token-to-expert affinities);
- each expert e takes the C tokens with the largest S[:, e] (``base.top_k`` over tokens: exact, ties to the
  lower token id), C = min(T, ceil(k·T/E)): k is the paper's capacity factor c, the mean number of experts
  per token. A token gets 0 to E experts;
- gate of (token t, expert e) = S[t, e] where e took t, else 0.
The Routing has S = E slots per token, slot e being expert e, and ``expert_tokens`` [E, C]: the pipeline lays
the experts' choices out as rows grouped by expert directly, and the same grouped GEMMs run them.
No balance loss (every expert gets exactly C tokens); ``aux_loss`` is 0. The routing is non-causal: a token's
experts depend on the other tokens of the call, later ones included, so it suits encoders and training on
whole sequences, not token-by-token decoding. Layer capacity options do not apply (the layer refuses them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..pipeline import expert_capacity
from .base import Router, Routing, linear, top_k


class ExpertChoice(Router):
    """Expert-choice router: ``weight`` [E, d]; k = the mean number of experts per token."""

    chooses_tokens = True

    def __init__(self, d_model: int, num_experts: int, k: int, *, device=None, dtype=None):
        super().__init__(d_model, num_experts, k, device=device, dtype=dtype)

    @property
    def slots(self) -> int:
        return self.num_experts

    def forward(self, x: Tensor, use_kernel: str | None = None) -> Routing:
        """x [T, d] → Routing with S = E and ``expert_tokens`` [E, C] (fields in ``base.Routing``)."""
        logits = linear(x, self.weight)
        num_tokens, num_experts = logits.shape
        scores = torch.softmax(logits, dim=-1)
        capacity = torch.sym_min(expert_capacity((1, 1), num_tokens, self.k, num_experts), num_tokens)
        expert_tokens = torch.sort(top_k(scores.t(), capacity), dim=-1).values  # ascending: gathers in order
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, expert_tokens.t().long(), True)
        weights = torch.where(chosen, scores, 0.0)
        experts = torch.arange(num_experts, dtype=torch.int32, device=x.device).expand(num_tokens, num_experts)
        aux_loss = logits.new_zeros(()) if self.wants_aux_loss() else None
        return Routing(logits, weights, experts, aux_loss, expert_tokens)
