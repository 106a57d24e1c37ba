"""The native ops of ``moe_kernels._C`` (csrc/), when the extension is built, as the pipeline's types.

``torch.ops.moe_kernels.gating`` computes a router of routing.py in one pass, ``torch.ops.moe_kernels.permute``
the Permutation layout of pipeline.py. Both have CPU implementations, CUDA ones when built with CUDA, and
fake implementations (below) so that torch.compile(fullgraph=True) traces through them. Neither is
differentiable: the backends call ``route`` only where no gradient is needed (``grad_required``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .pipeline import Permutation, RouterConfig, num_sorted_rows
from .routing import Routing

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.moe_kernels.*)
except ImportError:  # not built: the package runs on its PyTorch and Triton backends alone
    _C = None


def has_cpu_ops() -> bool:
    """Whether moe_kernels._C is built (its CPU ops always are)."""
    return _C is not None


def has_cuda_ops() -> bool:
    """Whether moe_kernels._C was built with its CUDA ops (probes no device)."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("moe_kernels::gating", "CUDA")


def grad_required(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors: then the native gating does not apply."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def route(logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig) -> Routing:
    """The router of ``config`` on [T, E] float32 logits (routing.py's semantics), not differentiable."""
    outputs = torch.ops.moe_kernels.gating(
        logits, noise_logits, noise, config.router, config.k, config.renormalize, config.noise_epsilon
    )
    return Routing(*outputs)


def permute(experts: Tensor, num_experts: int, capacity: int | None, block_m: int = 1) -> Permutation:
    """experts [T, k] int32 → the Permutation with segments starting at multiples of block_m.

    capacity None or <= 0 is dropless. On the CPU an id outside [0, num_experts) raises; on CUDA (which
    cannot check without waiting on the device) such an assignment is dropped.
    """
    return Permutation(*torch.ops.moe_kernels.permute(experts, num_experts, capacity, block_m))


def gating_fake(logits, noise_logits, noise, router, k, renormalize, noise_epsilon):
    """Empty tensors shaped as the outputs of the gating schema (a Routing); also the fake of ops.py's
    gating ops, which share the schema."""
    num_tokens, num_experts = logits.shape
    k = 1 if router == "switch" else k  # the Triton launcher ignores k for "switch"; the C++ op requires 1
    return (
        logits.new_empty(num_tokens, k),
        logits.new_empty(num_tokens, k, dtype=torch.int32),
        logits.new_empty(num_experts),
        logits.new_empty(num_experts),
        logits.new_empty(num_experts),
        logits.new_empty(num_tokens),
    )


def permute_fake(experts, num_experts, capacity, block_m):
    """Empty tensors shaped as the outputs of the permute schema (a Permutation); also the fake of ops.py's
    triton_permute."""
    num_tokens, k = experts.shape
    return (
        experts.new_empty(num_experts),
        experts.new_empty(num_experts + 1),
        experts.new_empty(num_tokens, k),
        experts.new_empty(num_sorted_rows(num_tokens, k, num_experts, block_m)),
    )


if _C is not None:
    torch.library.register_fake("moe_kernels::gating", gating_fake)
    torch.library.register_fake("moe_kernels::permute", permute_fake)
