"""The reference MoE layer: the router's PyTorch definition and a Python loop over experts, written to be
obviously right (as in the papers and Hugging Face's eager experts). Every fast path is tested against it."""
from __future__ import annotations

import torch
from torch import Tensor

from .activations import activate
from .modules import MoEBase
from .pipeline import Backend, expert_capacity
from .routers.base import Routing


def kept_assignments(experts: Tensor, num_experts: int, capacity: int | None, candidates: Tensor | None = None) -> Tensor:
    """[T, S] bool: which assignments (among ``candidates``, default all) fit in their expert's capacity.

    Each expert keeps its first ``capacity`` candidate assignments in slot-major order: every token's first
    choice before any second choice, tokens in order within a slot.
    """
    candidates = torch.ones_like(experts, dtype=torch.bool) if candidates is None else candidates
    if capacity is None:
        return candidates
    kept = torch.zeros_like(experts, dtype=torch.bool)
    for expert in range(num_experts):
        slot_major = ((experts == expert) & candidates).t()
        rank = slot_major.reshape(-1).cumsum(0).view_as(slot_major) - 1
        kept |= (slot_major & (rank < capacity)).t()
    return kept


class MoE(MoEBase):
    """The naive layer; arguments as in ``MoEBase`` (modules.py)."""

    def _kept(self, routing: Routing, sequence_length: int) -> Tensor:
        """[T, S] bool: the assignments that get a row."""
        num_tokens, num_experts = routing.logits.shape
        if routing.expert_tokens is not None:  # expert e took the tokens expert_tokens[e]
            kept = torch.zeros_like(routing.experts, dtype=torch.bool)
            kept[routing.expert_tokens.long(), torch.arange(num_experts, device=kept.device)[:, None]] = True
            return kept
        kept = None
        if self.expert_capacity is not None:  # per sequence, each sequence on its own
            kept = torch.cat([
                kept_assignments(sequence, num_experts, self.expert_capacity)
                for sequence in routing.experts.split(sequence_length)
            ]) if num_tokens else torch.zeros_like(routing.experts, dtype=torch.bool)  # fmt: skip
        capacity = expert_capacity(self.capacity_ratio, num_tokens, routing.experts.shape[1], num_experts)
        return kept_assignments(routing.experts, num_experts, capacity, kept)

    def _experts_output(self, tokens: Tensor, routing: Routing, sequence_length: int, backend: Backend | None) -> Tensor:
        kept = self._kept(routing, sequence_length)
        # Accumulate in the router's precision: float32, or float64 for float64 inputs.
        y = torch.zeros(tokens.shape, dtype=routing.weights.dtype, device=tokens.device)
        # unbind once: indexing the stacked Parameter per expert would make each backward write a full-size
        # zero gradient per expert.
        up_weights = self.experts.up_weight.unbind(0)
        down_weights = self.experts.down_weight.unbind(0)
        up_biases = None if self.experts.up_bias is None else self.experts.up_bias.unbind(0)
        down_biases = None if self.experts.down_bias is None else self.experts.down_bias.unbind(0)
        for expert in range(self.num_experts):
            token_index, slot_index = torch.where((routing.experts == expert) & kept)
            if token_index.numel() == 0:
                continue
            pre_activation = tokens[token_index] @ up_weights[expert].to(tokens.dtype).t()
            if up_biases is not None:
                pre_activation = pre_activation + up_biases[expert].to(tokens.dtype)
            expert_output = activate(pre_activation, self.activation) @ down_weights[expert].to(tokens.dtype).t()
            if down_biases is not None:
                expert_output = expert_output + down_biases[expert].to(tokens.dtype)
            gate = routing.weights[token_index, slot_index].unsqueeze(-1)
            y = y.index_add(0, token_index, gate * expert_output.to(y.dtype))
        return y.to(tokens.dtype)
