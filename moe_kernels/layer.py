"""The fast MoE layer: the reference's parameters and outputs, computed through the pipeline's backends."""
from __future__ import annotations

from torch import Tensor, nn

from . import pipeline
from .activations import resolve as resolve_activation
from .backends import BACKENDS, resolve
from .modules import MoEBase
from .pipeline import Backend
from .reference import MoE as ReferenceMoE
from .routers.base import Routing


class MoE(MoEBase):
    """Drop-in fast replacement of ``moe_kernels.reference.MoE``.

    Same constructor (arguments in ``MoEBase``, modules.py) plus ``backend``: "auto" (Triton on CUDA for the
    dtypes it takes, "torch" elsewhere), "torch" or "triton". Same parameters, state dict, outputs and
    ``aux_loss``.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    @classmethod
    def from_reference(cls, reference: ReferenceMoE, backend: str = "auto") -> "MoE":
        """A fast layer that shares the reference's very Parameter objects and buffers (no copy)."""
        if not isinstance(reference, MoEBase):
            raise TypeError(
                f"MoE.from_reference takes a moe_kernels layer (moe_kernels.reference.MoE), got "
                f"{type(reference).__name__}; for a Hugging Face model, register moe_kernels as its experts "
                f"implementation (moe_kernels.integrations.transformers.register())"
            )
        fast = cls(**reference.constructor_arguments(), backend=backend, device="meta")
        for name, child in reference.named_children():
            setattr(fast, name, child)
        fast.train(reference.training)
        return fast

    def _backend(self, x: Tensor) -> Backend:
        return resolve(self.backend, x.device, x.dtype)

    def _experts_output(self, tokens: Tensor, routing: Routing, sequence_length: int, backend: Backend) -> Tensor:
        num_tokens, slots = routing.experts.shape
        if routing.expert_tokens is not None:
            block_m = backend.block_m(num_tokens, slots, self.num_experts)
            permutation = pipeline.expert_choice_permutation(routing.expert_tokens, num_tokens, block_m)
        else:
            kept = None
            if self.expert_capacity is not None:
                kept = pipeline.sequence_kept(routing.experts, sequence_length, self.expert_capacity)
            capacity = pipeline.expert_capacity(self.capacity_ratio, num_tokens, slots, self.num_experts)
            permutation = pipeline.permute(backend, routing.experts, self.num_experts, capacity, kept)
        return pipeline.run_experts(
            backend, tokens, permutation, routing.weights, self.experts.up_weight, self.experts.up_bias,
            self.experts.down_weight, self.experts.down_bias, resolve_activation(self.activation),
        )  # fmt: skip


def swap(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every reference MoE in ``module`` by a fast one sharing its Parameters, in place.

    Returns ``module``, or the fast layer when ``module`` itself is a reference MoE (use the return value).
    """
    if isinstance(module, ReferenceMoE):
        return MoE.from_reference(module, backend)
    for name, child in module.named_children():
        setattr(module, name, swap(child, backend))
    return module
