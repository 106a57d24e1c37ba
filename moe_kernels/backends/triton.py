"""Backend "triton": every stage by the Triton kernels of ``moe_kernels.kernels``, differentiable through
the custom ops of ``moe_kernels.ops``. Importing it raises ImportError without Triton."""
from __future__ import annotations

from torch import Tensor

from .. import ops
from ..activations import Activation
from ..kernels.tiles import block_m_for
from ..pipeline import Permutation, run_routed_experts


class TritonBackend:
    """The pipeline Backend of the Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""

    fused_routing = "triton"

    @staticmethod
    def block_m(num_tokens: int, slots: int, num_experts: int) -> int:
        # The tile policy decides (today 1: the GEMMs find each tile's expert, no padding needed).
        return block_m_for(num_tokens, slots, num_experts)

    def permute(self, experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
        num_tokens, slots = experts.shape
        return ops.permute(experts, num_experts, capacity, self.block_m(num_tokens, slots, num_experts))

    def expert_up(
        self, x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: Activation,
        recompute_pre_activation: bool = False,
    ) -> Tensor:
        return ops.expert_up(x, up_weight, up_bias, permutation, activation, recompute_pre_activation)

    def expert_down_combine(
        self, hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
    ) -> Tensor:
        return ops.expert_down_combine(hidden, down_weight, down_bias, permutation, weights)

    routed_experts = run_routed_experts
