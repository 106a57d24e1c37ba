"""moe_kernels: fused kernels for the sparsely-gated Mixture-of-Experts layer.

``moe_kernels.MoE`` is the fast layer, ``moe_kernels.swap(model)`` puts it in place of every
``moe_kernels.reference.MoE``, ``moe_kernels.available_backends()`` lists what this installation can run.
"""
from . import reference, routing
from .backends import available as available_backends
from .layer import MoE, swap

__all__ = ["MoE", "available_backends", "reference", "routing", "swap"]
