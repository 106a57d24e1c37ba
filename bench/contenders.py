"""What the benchmark races: every contender is a forward over the reference layer's very Parameters.

- ``loop``: ``moe_kernels.reference.MoE``, the naive loop over experts (the baseline of every speedup).
- ``ours:torch`` / ``ours:triton``: ``moe_kernels.MoE.from_reference(layer, backend)``.
- ``hf:grouped_mm`` / ``hf:batched_mm``: Hugging Face transformers' experts functions
  (``transformers.integrations.moe``), fed our routing, our activation through ``_apply_gate``. Dropless
  layers only.
- ``plain:grouped_mm``: a bench-only minimal pipeline on torch ops (argsort → two ``torch._grouped_mm`` →
  ``index_add_``). Its GEMMs are the same ``torch._grouped_mm`` calls as backend "torch"; what differs is
  everything around them: no capacity, no fixed layout, a non-deterministic scatter-add combine. The
  gap between the two is the cost of our permutation bookkeeping and deterministic combine.

``prepare`` returns a ``Prepared`` or raises ``Unavailable`` with the status ("missing", "n/a") and why.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import moe_kernels
from moe_kernels.activations import activate
from moe_kernels.backends import BACKENDS, resolve

from .configs import BenchConfig
from .inputs import route

# The loop's backward: indexing expert e of a stacked Parameter gives a full-size zero gradient per expert
# used, so one backward writes min(E, T·k) × the weights' bytes. Above this the loop's fwd+bwd is not run.
LOOP_BACKWARD_LIMIT_BYTES = {"cuda": 64 << 30, "cpu": 3 << 29}
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


def _loop(layer, config, num_tokens) -> Prepared:
    parameters = list(layer.parameters())
    device = parameters[0].device
    expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    gradient_bytes = min(config.num_experts, num_tokens * config.k) * expert_bytes
    no_backward = None
    if gradient_bytes > LOOP_BACKWARD_LIMIT_BYTES[device.type]:
        no_backward = f"backward would write {gradient_bytes / 2**30:.1f} GiB of per-expert zero gradients"
    return Prepared(layer, parameters, no_backward)


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


def _check_dropless(config: BenchConfig, who: str) -> None:
    if config.capacity_factor is not None:
        raise Unavailable("n/a", f"{who} is dropless; this layer has capacity_factor={config.capacity_factor}")


def _hf(implementation: str):
    def prepare(layer, config, num_tokens) -> Prepared:
        try:
            from transformers.integrations import moe as hf_moe
        except ImportError as error:
            raise Unavailable("missing", f"transformers not installed ({error})") from None
        experts_forward = getattr(hf_moe, f"{implementation}_experts_forward", None)
        if experts_forward is None:
            registry = getattr(hf_moe, "ALL_EXPERTS_FUNCTIONS", {})
            experts_forward = registry.get(implementation) if hasattr(registry, "get") else None
        if experts_forward is None:
            raise Unavailable("missing", f"transformers has no {implementation} experts function")
        _check_dropless(config, f"hf:{implementation}")
        device = layer.gate.weight.device
        if implementation == "batched_mm":
            element = layer.experts.down_proj.element_size()
            gathered = num_tokens * config.k * (config.up_width + config.d_ff) * config.d_model * element
            if gathered > BATCHED_MM_GATHER_LIMIT_BYTES[device.type]:
                raise Unavailable("n/a", f"would gather {gathered / 2**30:.1f} GiB of expert weights")
        shim = _hf_experts_module(layer, config, implementation)

        def forward(tokens: Tensor) -> Tensor:
            routing = route(layer, tokens)
            return experts_forward(shim, tokens, routing.experts.long(), routing.weights.to(tokens.dtype))

        return Prepared(forward, list(layer.parameters()))

    return prepare


def _hf_experts_module(layer, config: BenchConfig, implementation: str) -> nn.Module:
    """An object shaped like a transformers 5 experts module (Mixtral/Qwen-MoE), holding our Parameters.

    The attributes are the ones the experts functions of transformers 5.x read (num_experts, has_bias,
    is_transposed, ``_apply_gate``, which the versions read for this shim call rather than ``act_fn``). It is our activation, so
    ungated layers run too, their up_proj standing in for gate_up_proj. An attribute a later version
    adds shows up as a "failed" row with its AttributeError, not as a wrong number.
    """
    shim = nn.Module()
    shim.gate_up_proj = layer.experts.up_weight
    shim.down_proj = layer.experts.down_proj
    shim._apply_gate = lambda gate_up_out: activate(gate_up_out, config.activation)
    shim.num_experts = config.num_experts
    shim.hidden_dim = config.d_model
    shim.intermediate_dim = config.d_ff
    shim.has_gate, shim.has_bias, shim.is_transposed = config.gated, False, False
    shim.config = types.SimpleNamespace(
        _experts_implementation=implementation, num_experts=config.num_experts, hidden_size=config.d_model,
    )
    return shim


def _plain_grouped_mm(layer, config, num_tokens) -> Prepared:
    _check_dropless(config, "plain:grouped_mm")
    if not hasattr(torch, "_grouped_mm"):
        raise Unavailable("missing", f"torch {torch.__version__} has no torch._grouped_mm")
    up_weight = layer.experts.up_weight
    down_weight = layer.experts.down_proj

    def forward(tokens: Tensor) -> Tensor:
        routing = route(layer, tokens)
        expert_of_assignment = routing.experts.reshape(-1)
        order = torch.argsort(expert_of_assignment, stable=True)
        ends = torch.cumsum(torch.bincount(expert_of_assignment, minlength=config.num_experts), 0).to(torch.int32)
        token_of_row = order // config.k
        hidden = activate(torch._grouped_mm(tokens[token_of_row], up_weight.transpose(1, 2), offs=ends), config.activation)
        rows_out = torch._grouped_mm(hidden, down_weight.transpose(1, 2), offs=ends)
        weighted = rows_out.float() * routing.weights.reshape(-1)[order, None]
        return torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device).index_add_(0, token_of_row, weighted).to(tokens.dtype)

    return Prepared(forward, list(layer.parameters()))


CONTENDERS = (
    Contender("loop", _loop),
    *(Contender(f"ours:{backend}", _ours(backend)) for backend in BACKENDS),
    Contender("hf:grouped_mm", _hf("grouped_mm")),
    Contender("hf:batched_mm", _hf("batched_mm")),
    Contender("plain:grouped_mm", _plain_grouped_mm),
)
