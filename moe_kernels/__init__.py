"""moe_kernels: fused kernels for the sparsely-gated Mixture-of-Experts layer.

``moe_kernels.MoE`` is the fast layer, ``moe_kernels.swap(model)`` puts it in place of every
``moe_kernels.reference.MoE``, ``moe_kernels.experts_forward`` runs the experts for a routing made elsewhere,
``moe_kernels.available_backends()`` lists what this installation can run, ``moe_kernels.release_cpu_memory()``
gives back the memory the CPU backward keeps for its next weight gradients.
"""
from . import reference, routers
from .activations import Activation
from .backends import available as available_backends
from .functional import experts_forward
from .layer import MoE, swap
from .native import release_cpu_memory

__all__ = ["Activation", "MoE", "available_backends", "experts_forward", "reference", "release_cpu_memory", "routers",
           "swap"]
