"""Backend "cuda": routing and permutation by the native CUDA ops of ``moe_kernels._C``, GEMMs by Triton.

The native gating op is not differentiable, so route() uses it where no gradient is wanted (inference, or
logits that do not require grad) and PyTorch's differentiable routers otherwise; the expert ids are the
same either way. Constructing the backend raises ImportError when _C was built without CUDA, which is how
``backends.available()`` leaves it out.
"""
from __future__ import annotations

from torch import Tensor

from .. import native
from ..pipeline import Permutation, RouterConfig
from ..routing import Routing
from . import torch as torch_backend


class CudaBackend:
    """The pipeline Backend of the native CUDA ops; expert GEMMs delegate to backend "triton"."""

    name = "cuda"

    def __init__(self):
        if not native.has_cuda_ops():
            raise ImportError(
                "backend 'cuda' needs moe_kernels._C built with CUDA: build with a CUDA torch and nvcc "
                "(pip install --no-build-isolation --no-deps -e .), or use backend 'triton' or 'torch'"
            )

    def route(self, logits: Tensor, noise_logits: Tensor | None, noise: Tensor | None, config: RouterConfig) -> Routing:
        if native.grad_required(logits, noise_logits):
            return torch_backend.route(logits, noise_logits, noise, config)
        return native.route(logits, noise_logits, noise, config)

    def permute(self, experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
        return native.permute(experts, num_experts, capacity)

    def expert_up(self, x: Tensor, up_weight: Tensor, permutation: Permutation, activation: str) -> Tensor:
        from .triton import TritonBackend  # imported here: Triton is optional and written separately

        return TritonBackend().expert_up(x, up_weight, permutation, activation)

    def expert_down_combine(self, hidden: Tensor, down_weight: Tensor, permutation: Permutation, weights: Tensor) -> Tensor:
        from .triton import TritonBackend

        return TritonBackend().expert_down_combine(hidden, down_weight, permutation, weights)
