"""Backend "triton": every stage by the Triton kernels of ``moe_kernels.kernels``, differentiable through
the custom ops of ``moe_kernels.ops``. Importing it raises ImportError without Triton."""
from __future__ import annotations

from torch import Tensor

from .. import ops
from ..activations import Activation
from ..kernels.tiles import block_m_for
from ..pipeline import Permutation


class TritonBackend:
    """The pipeline Backend of the Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""

    fused_routing = True

    @staticmethod
    def block_m(num_tokens: int, slots: int, num_experts: int) -> int:
        # Segments padded to the GEMMs' tile height, so that each tile runs one expert.
        return block_m_for(num_tokens, slots, num_experts)

    def permute(self, experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
        num_tokens, slots = experts.shape
        return ops.permute(experts, num_experts, capacity, self.block_m(num_tokens, slots, num_experts))

    def expert_up(
        self, x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: Activation
    ) -> Tensor:
        _refuse_bias(up_bias, "up_bias")
        return ops.expert_up(x, up_weight, permutation, activation)

    def expert_down_combine(
        self, hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
    ) -> Tensor:
        _refuse_bias(down_bias, "down_bias")
        return ops.expert_down_combine(hidden, down_weight, permutation, weights)


def _refuse_bias(bias: Tensor | None, name: str) -> None:
    if bias is not None:
        raise NotImplementedError(f"backend 'triton' does not take {name} yet (issue 12/13: expert biases); use backend 'torch'")
