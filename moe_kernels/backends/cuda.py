"""Backend "cuda": routing and permutation by the native CUDA ops of ``moe_kernels._C``, the rest as in
backend "triton" (the gating gradient by the Triton backward kernel, the expert GEMMs by Triton).

Constructing it raises ImportError when _C was built without CUDA (or Triton is missing), which is how
``backends.available()`` leaves it out.
"""
from __future__ import annotations

from torch import Tensor

from .. import native, ops
from ..kernels.tiles import block_m_for
from ..pipeline import Permutation, RouterConfig
from ..routing import Routing
from .triton import TritonBackend


class CudaBackend(TritonBackend):
    """Backend "triton" with the native CUDA gating and permutation kernels."""

    def __init__(self):
        if not native.has_cuda_ops():
            raise ImportError(
                "backend 'cuda' needs moe_kernels._C built with CUDA: build with a CUDA torch and nvcc "
                "(pip install --no-build-isolation --no-deps -e .), or use backend 'triton' or 'torch'"
            )

    def route(self, logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig) -> Routing:
        return ops.route(logits, noise_logits, noise, config, forward="native")

    def permute(self, experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
        num_tokens, k = experts.shape
        return native.permute(experts, num_experts, capacity, block_m_for(num_tokens, k, num_experts))
