"""What the benchmark races: every contender is a forward over the reference layer's very Parameters.

- ``loop``: ``moe_kernels.reference.MoE``, the naive loop over experts (the baseline of every speedup).
- ``ours:torch`` / ``ours:triton``: ``moe_kernels.MoE.from_reference(layer, backend)``
  (on the CPU, backend "torch" runs the C++ expert path of moe_kernels._C when it is built).
- ``hf:eager`` / ``hf:grouped_mm`` / ``hf:batched_mm``: the experts module of the installed transformers
  (Qwen3-MoE's for gated layers, Nemotron-H's for ungated ones) holding our Parameters, with
  ``config._experts_implementation`` set to each of its implementations, fed the layer's own routing.
  Dropless layers with transformers' activations only.

Every contender's time includes the routing (router GEMM, softmax, top-k).
``prepare`` returns a ``Prepared`` or raises ``Unavailable`` with the status ("missing", "n/a") and why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import moe_kernels
from moe_kernels.activations import resolve as resolve_activation
from moe_kernels.backends import BACKENDS, resolve

from .configs import BenchConfig
from .inputs import route

# The backward of the loop and of hf:eager: indexing expert e of a stacked Parameter gives a full-size zero
# gradient per expert used, so one backward writes min(E, T·k) × the weights' bytes. Above this their
# fwd+bwd is not run.
LOOP_BACKWARD_LIMIT_BYTES = {"cuda": 64 << 30, "cpu": 3 << 29}
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
# batched_mm gathers one copy of the expert weights per assignment; above this it is not run.
BATCHED_MM_GATHER_LIMIT_BYTES = {"cuda": 8 << 30, "cpu": 1 << 30}


class Unavailable(Exception):
    """A contender that cannot run this layer: ``status`` is "missing" (not installed) or "n/a"."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Prepared:
    """forward: tokens [T, d] → [T, d] in the tokens' dtype; parameters: the leaves a backward reaches;
    no_backward: why forward+backward is not run, or None."""

    forward: Callable[[Tensor], Tensor]
    parameters: list[Tensor]
    no_backward: str | None = None


@dataclass(frozen=True)
class Contender:
    name: str
    prepare: Callable[[nn.Module, BenchConfig, int], Prepared]


def _per_expert_backward_too_large(layer, config, num_tokens) -> str | None:
    """Why a backward that writes a full-size zero gradient per expert used is not run, or None."""
    expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    gradient_bytes = min(config.num_experts, num_tokens * config.k) * expert_bytes
    if gradient_bytes > LOOP_BACKWARD_LIMIT_BYTES[layer.gate.weight.device.type]:
        return f"backward would write {gradient_bytes / 2**30:.1f} GiB of per-expert zero gradients"
    return None


def _loop(layer, config, num_tokens) -> Prepared:
    return Prepared(layer, list(layer.parameters()), _per_expert_backward_too_large(layer, config, num_tokens))


def _ours(backend: str):
    def prepare(layer, config, num_tokens) -> Prepared:
        device = layer.gate.weight.device
        try:
            resolve(backend, device, layer.gate.weight.dtype)
        except ImportError as error:
            raise Unavailable("missing", f"{type(error).__name__}: {error}") from None
        except ValueError as error:  # installed, but not for this device
            raise Unavailable("n/a", str(error)) from None
        fast = moe_kernels.MoE.from_reference(layer, backend=backend)
        return Prepared(fast, list(layer.parameters()))

    return prepare


def _hf(implementation: str):
    def prepare(layer, config, num_tokens) -> Prepared:
        if config.capacity_factor is not None:
            raise Unavailable("n/a", f"hf:{implementation} is dropless; this layer has capacity_factor={config.capacity_factor}")
        experts = _hf_experts_module(layer, config, implementation)
        no_backward = None
        if implementation == "batched_mm":
            element = layer.experts.down_proj.element_size()
            gathered = num_tokens * config.k * (config.up_width + config.d_ff) * config.d_model * element
            if gathered > BATCHED_MM_GATHER_LIMIT_BYTES[layer.gate.weight.device.type]:
                raise Unavailable("n/a", f"would gather {gathered / 2**30:.1f} GiB of expert weights")
        if implementation == "eager":  # indexes the stacked Parameters per expert, as the loop does
            no_backward = _per_expert_backward_too_large(layer, config, num_tokens)

        def forward(tokens: Tensor) -> Tensor:
            routing = route(layer, tokens)
            return experts(tokens, routing.experts.long(), routing.weights.to(tokens.dtype))

        return Prepared(forward, list(layer.parameters()), no_backward)

    return prepare


def _hf_experts_module(layer, config: BenchConfig, implementation: str) -> nn.Module:
    """transformers' own experts module holding our very Parameters, dispatching to ``implementation``.

    Gated layers use Qwen3-MoE's experts (``gate_up_proj`` [E, 2·d_ff, d], gate half first: our layout),
    ungated ones Nemotron-H's (``up_proj``, has_gate=False); act_fn is our activation's function. Built on
    the meta device, then handed our Parameters: nothing is copied.
    """
    try:
        from transformers import NemotronHConfig, Qwen3MoeConfig
        from transformers.activations import ACT2FN
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError as error:
        raise Unavailable("missing", f"transformers 5 not installed ({error})") from None
    activation = resolve_activation(config.activation)
    if activation.alpha != 1.0 or activation.limit is not None or activation.up_offset or activation.interleaved:
        raise Unavailable("n/a", f"transformers' experts have no {config.activation!r} activation")
    sizes = dict(hidden_size=config.d_model, moe_intermediate_size=config.d_ff)
    with torch.device("meta"):
        if activation.gated:
            experts = Qwen3MoeExperts(Qwen3MoeConfig(**sizes, num_experts=config.num_experts, hidden_act=activation.function))
            experts.gate_up_proj = layer.experts.up_weight
        else:
            experts = NemotronHExperts(NemotronHConfig(**sizes, n_routed_experts=config.num_experts, mlp_hidden_act=activation.function))
            experts.up_proj = layer.experts.up_weight
    experts.down_proj = layer.experts.down_proj
    experts.act_fn = ACT2FN[activation.function]
    experts.config._experts_implementation = implementation
    return experts


CONTENDERS = (
    Contender("loop", _loop),
    *(Contender(f"ours:{backend}", _ours(backend)) for backend in BACKENDS),
    *(Contender(f"hf:{implementation}", _hf(implementation)) for implementation in HF_IMPLEMENTATIONS),
)
