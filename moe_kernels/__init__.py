"""moe_kernels: fused kernels for the sparsely-gated Mixture-of-Experts layer.

``moe_kernels.MoE`` is the fast layer, ``moe_kernels.swap(model)`` puts it in place of every
``moe_kernels.reference.MoE``, ``moe_kernels.experts_forward`` runs the experts for a routing made elsewhere,
``moe_kernels.available_backends()`` lists what this installation can run.
"""
from . import reference, routers
from .activations import Activation
from .backends import available as available_backends
from .functional import experts_forward
from .layer import MoE, swap

__all__ = ["Activation", "MoE", "available_backends", "experts_forward", "reference", "routers", "swap"]
