"""The native ops of ``moe_kernels._C`` (csrc/), when the extension is built, as the pipeline's types.

``torch.ops.moe_kernels.permute`` computes the Permutation layout of pipeline.py on the CPU, with a fake
implementation (below) so that torch.compile(fullgraph=True) traces through it. It is not differentiable
(integers only).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .pipeline import Permutation, num_sorted_rows

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.moe_kernels.*)
except ImportError:  # not built: the package runs on its PyTorch and Triton backends alone
    _C = None


def has_cpu_ops() -> bool:
    """Whether moe_kernels._C is built (its CPU ops always are)."""
    return _C is not None


def permute(experts: Tensor, num_experts: int, capacity: int | None, block_m: int = 1) -> Permutation:
    """experts [T, S] int32 → the Permutation with segments starting at multiples of block_m.

    capacity None is dropless, 0 drops every assignment. An id outside [0, num_experts) raises.
    """
    return Permutation(*torch.ops.moe_kernels.permute(experts, num_experts, capacity, block_m))


def permute_fake(experts, num_experts, capacity, block_m):
    """Empty tensors shaped as the outputs of the permute schema (a Permutation); also the fake of ops.py's
    triton_permute."""
    num_tokens, slots = experts.shape
    return (
        experts.new_empty(num_experts),
        experts.new_empty(num_experts + 1),
        experts.new_empty(num_tokens, slots),
        experts.new_empty(num_sorted_rows(num_tokens, slots, num_experts, block_m)),
    )


if _C is not None:
    torch.library.register_fake("moe_kernels::permute", permute_fake)
