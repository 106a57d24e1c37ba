"""The reference MoE layer: routing from ``routing.py`` and a Python loop over experts, written to be
obviously right (as in the papers and Hugging Face's eager experts). Every fast path is tested against it."""
from __future__ import annotations

import torch
from torch import Tensor

from . import routing as routers
from .activations import activate
from .modules import MoEBase
from .pipeline import expert_capacity


def kept_assignments(experts: Tensor, num_experts: int, capacity: int | None) -> Tensor:
    """[T, k] bool: which assignments fit in their expert's capacity.

    Each expert keeps its first ``capacity`` assignments in slot-major order: every token's first choice
    before any second choice, tokens in order within a slot.
    """
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    kept = torch.zeros_like(experts, dtype=torch.bool)
    for expert in range(num_experts):
        slot_major = (experts == expert).t()
        rank = slot_major.reshape(-1).cumsum(0).view_as(slot_major) - 1
        kept |= (slot_major & (rank < capacity)).t()
    return kept


class MoE(MoEBase):
    """The naive layer; arguments as in ``MoEBase`` (modules.py)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        tokens = x.reshape(-1, self.d_model)
        logits, noise_logits, noise = self._router_inputs(tokens)
        if self.router == "noisy_topk":
            routing = routers.noisy_topk(logits, noise_logits, self.k, noise, self.noise_epsilon)
        elif self.router == "switch":
            routing = routers.switch(logits)
        else:
            routing = routers.topk(logits, self.k, self.renormalize)
        self.aux_loss = routers.router_loss(routing, self.router, self.k, self.loss_weights)

        capacity = expert_capacity(self.capacity_factor, tokens.shape[0], self.k, self.num_experts)
        kept = kept_assignments(routing.experts, self.num_experts, capacity)
        # Accumulate in the router's precision: float32, or float64 for float64 inputs.
        y = torch.zeros(tokens.shape, dtype=routing.weights.dtype, device=x.device)
        # unbind once: indexing the stacked Parameter per expert would make each backward write a full-size
        # zero gradient per expert.
        up_weights = self.experts.up_weight.unbind(0)
        down_weights = self.experts.down_proj.unbind(0)
        for expert in range(self.num_experts):
            token_index, slot_index = torch.where((routing.experts == expert) & kept)
            if token_index.numel() == 0:
                continue
            hidden = activate(tokens[token_index] @ up_weights[expert].to(x.dtype).t(), self.activation)
            expert_output = hidden @ down_weights[expert].to(x.dtype).t()
            gate = routing.weights[token_index, slot_index].unsqueeze(-1)
            y = y.index_add(0, token_index, gate * expert_output.to(y.dtype))
        return y.to(x.dtype).view(x.shape)
