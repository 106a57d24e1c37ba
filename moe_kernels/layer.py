"""The fast MoE layer: the reference's parameters and outputs, computed through the pipeline's backends."""
from __future__ import annotations

import warnings

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
    Never silently does nothing: a module that looks like an MoE block of a class swap does not know (children
    ``experts`` and ``gate`` or ``router``) is left as it is with a warning naming its class, and a module with
    no MoE layer at all gets a warning too.
    """
    layers: list[nn.Module] = []
    unknown: list[type] = []
    result = _swap(module, backend, layers, unknown)
    for cls in dict.fromkeys(unknown):
        warnings.warn(
            f"moe_kernels.swap does not know {cls.__module__}.{cls.__qualname__} ({unknown.count(cls)} in "
            f"{type(module).__name__}), which looks like an MoE block: left as it is. For a Hugging Face model, "
            f"moe_kernels.integrations.transformers.register() runs its experts with moe_kernels",
            stacklevel=2,
        )
    if not layers and not unknown:
        warnings.warn(f"moe_kernels.swap found no MoE layer in {type(module).__name__}: nothing was replaced", stacklevel=2)
    return result


def _swap(module: nn.Module, backend: str, layers: list[nn.Module], unknown: list[type]) -> nn.Module:
    if isinstance(module, MoEBase):
        layers.append(module)
        return MoE.from_reference(module, backend) if isinstance(module, ReferenceMoE) else module
    children = dict(module.named_children())
    if "experts" in children and ("gate" in children or "router" in children):
        unknown.append(type(module))
        return module
    for name, child in children.items():
        setattr(module, name, _swap(child, backend, layers, unknown))
    return module
