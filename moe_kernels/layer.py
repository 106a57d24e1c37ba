"""The fast MoE layer: the reference's parameters and outputs, computed through the pipeline's backends."""
from __future__ import annotations

import warnings

from torch import Tensor, nn

from . import checks, pipeline
from .activations import resolve as resolve_activation
from .backends import BACKENDS, resolve
from .modules import MoEBase
from .pipeline import Backend
from .reference import MoE as ReferenceMoE
from .routers.base import Routing


class MoE(MoEBase):
    """Drop-in fast replacement of ``moe_kernels.reference.MoE``.

    Same constructor (arguments in ``MoEBase``, modules.py) plus ``backend``: "auto" (Triton on CUDA for the
    dtypes it takes, "torch" elsewhere), "torch" or "triton"; and ``recompute_pre_activation`` (default
    False): backend "triton" keeps GEMM 1's pre-activation for the backward, T·k·N·itemsize bytes per layer
    call that needs a gradient (N = 2·d_ff gated); True keeps nothing and the backward runs GEMM 1 again
    (T·k·N·d more MACs) to save that memory. Backend "torch" always keeps it. Same parameters, state dict,
    outputs and ``aux_loss`` (and the same gradients either way).
    """

    def __init__(self, *args, backend: str = "auto", recompute_pre_activation: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.recompute_pre_activation = checks.boolean("recompute_pre_activation", recompute_pre_activation)

    @classmethod
    def from_reference(cls, reference: ReferenceMoE, backend: str = "auto", recompute_pre_activation: bool = False) -> "MoE":
        """A fast layer that shares the reference's very Parameter objects and buffers (no copy); ``backend``
        and ``recompute_pre_activation`` as the constructor's."""
        if not isinstance(reference, MoEBase):
            raise TypeError(
                f"MoE.from_reference takes a moe_kernels layer (moe_kernels.reference.MoE), got "
                f"{type(reference).__name__}; for a Hugging Face model, moe_kernels.swap(model) replaces its MoE "
                f"blocks, or register moe_kernels as its experts implementation "
                f"(moe_kernels.integrations.transformers.register())"
            )
        fast = cls(**reference.constructor_arguments(), backend=backend, recompute_pre_activation=recompute_pre_activation,
                   device="meta")
        for name, child in reference.named_children():
            setattr(fast, name, child)
        fast.train(reference.training)
        return fast

    def _backend(self, x: Tensor) -> Backend:
        return resolve(self.backend, x.device, x.dtype)

    def _experts_output(self, tokens: Tensor, routing: Routing, sequence_length: int, backend: Backend) -> Tensor:
        num_tokens, slots = routing.experts.shape
        experts = self.experts
        activation = resolve_activation(self.activation)
        if routing.expert_tokens is None and self.expert_capacity is None:
            capacity = pipeline.expert_capacity(self.capacity_ratio, num_tokens, slots, self.num_experts)
            return backend.routed_experts(
                tokens, routing.experts, routing.weights, capacity, experts.up_weight, experts.up_bias,
                experts.down_weight, experts.down_bias, activation, self.recompute_pre_activation,
            )  # fmt: skip
        if routing.expert_tokens is not None:
            block_m = backend.block_m(num_tokens, slots, self.num_experts)
            permutation = pipeline.expert_choice_permutation(routing.expert_tokens, num_tokens, block_m)
        else:
            kept = pipeline.sequence_kept(routing.experts, sequence_length, self.expert_capacity)
            capacity = pipeline.expert_capacity(self.capacity_ratio, num_tokens, slots, self.num_experts)
            permutation = pipeline.permute(backend, routing.experts, self.num_experts, capacity, kept)
        return pipeline.run_experts(
            backend, tokens, permutation, routing.weights, experts.up_weight, experts.up_bias, experts.down_weight,
            experts.down_bias, activation, self.recompute_pre_activation,
        )  # fmt: skip


def swap(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every reference MoE in ``module``, and every Hugging Face MoE block of the supported families
    (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, SwitchTransformers: moe_kernels.integrations.transformers
    .blocks), by a fast layer sharing its Parameters, in place.

    Returns ``module``, or the fast layer when ``module`` itself is replaced (use the return value).
    Never silently does nothing: a module that looks like an MoE block of a class swap does not know (children
    ``experts`` and ``gate`` or ``router``) is left as it is with a warning naming its class, and a module with
    no MoE layer at all gets a warning too. A supported block whose configuration moe_kernels cannot compute
    exactly raises NotImplementedError naming the setting.
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
        fast = _swap_transformers_block(module, backend)
        if fast is None:
            unknown.append(type(module))
            return module
        layers.append(fast)
        return fast
    for name, child in children.items():
        setattr(module, name, _swap(child, backend, layers, unknown))
    return module


def _swap_transformers_block(module: nn.Module, backend: str) -> MoE | None:
    """The fast layer replacing a Hugging Face MoE block swap knows, else None (transformers is imported only
    when the module comes from it)."""
    if not type(module).__module__.startswith("transformers."):
        return None
    from .integrations.transformers.blocks import swap_block

    return swap_block(module, backend, MoE)
