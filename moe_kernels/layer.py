"""The fast MoE layer: the reference's parameters and outputs, computed through the pipeline's backends."""
from __future__ import annotations

from torch import Tensor, nn

from .backends import BACKENDS, resolve
from .modules import MoEBase
from .pipeline import moe_forward
from .reference import MoE as ReferenceMoE


class MoE(MoEBase):
    """Drop-in fast replacement of ``moe_kernels.reference.MoE``.

    Same constructor (arguments in ``MoEBase``, modules.py) plus ``backend``: "auto" (Triton on CUDA,
    "torch" elsewhere), "torch", "triton" or "cuda". Same parameters, state dict, outputs and ``aux_loss``.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    @classmethod
    def from_reference(cls, reference: ReferenceMoE, backend: str = "auto") -> "MoE":
        """A fast layer that shares the reference's very Parameter objects (no copy)."""
        if not isinstance(reference, MoEBase):
            raise TypeError(
                f"MoE.from_reference takes a moe_kernels layer (moe_kernels.reference.MoE), got "
                f"{type(reference).__name__}; for a Hugging Face model, register moe_kernels as its experts "
                f"implementation (moe_kernels.integrations.transformers.register())"
            )
        fast = cls(**reference.constructor_arguments(), backend=backend, device="meta")
        fast.gate = reference.gate
        fast.experts = reference.experts
        fast.train(reference.training)
        return fast

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        tokens = x.reshape(-1, self.d_model)
        logits, noise_logits, noise = self._router_inputs(tokens)
        backend = resolve(self.backend, x.device)
        y, self.aux_loss = moe_forward(
            backend, self.config, tokens, logits, noise_logits, noise,
            self.experts.up_weight, self.experts.down_proj,
        )
        return y.view(x.shape)


def swap(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every reference MoE in ``module`` by a fast one sharing its Parameters, in place.

    Returns ``module``, or the fast layer when ``module`` itself is a reference MoE (use the return value).
    """
    if isinstance(module, ReferenceMoE):
        return MoE.from_reference(module, backend)
    for name, child in module.named_children():
        setattr(module, name, swap(child, backend))
    return module
