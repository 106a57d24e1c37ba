"""What every router shares: the ``Routing`` it returns, the ``Router`` base module and the one ranking rule."""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Routing(NamedTuple):
    """What a router hands to the experts. T tokens, E experts, S slots per token (S = k for top-k routers).

    The first three fields are, in order, what Hugging Face's routers return (router_logits, scores, indices).
    """

    logits: Tensor
    """[T, E] float32 (float64 for float64 x): the router's logits, for callers such as transformers'
    ``output_router_logits``; differentiable."""
    weights: Tensor
    """[T, S] float32 (float64 for float64 x): the gate of each slot, computed after selection; differentiable."""
    experts: Tensor
    """[T, S] int32 in [0, E): the expert of each slot, in the router's order (descending selection score for
    top-k routers)."""
    aux_loss: Tensor | None
    """Scalar, logits' dtype: the weighted sum of the router's auxiliary losses (0 for a router without one);
    None where it cannot matter (evaluation mode with gradients off), then it is not computed."""
    expert_tokens: Tensor | None = None
    """[E, C] int32, routers that let experts choose tokens (expert choice) only: the C tokens each expert took,
    ascending. Slot s of every token is then expert s (S = E) and a slot the expert did not take has weight 0
    and no row. None for token-choice routers, whose assignments the permute stage groups by expert."""


# Rows of float32 scores up to which eager top_k is one stable sort rather than the ~10 small ops of the int64
# keys. 1 thread, E = 128, k = 8, median µs keys -> sort: T = 1 80 -> 20, T = 16 95 -> 44; T = 256 517 -> 1335.
SORT_ROWS = 16


def top_k(scores: Tensor, k: int) -> Tensor:
    """int32 indices [..., k] of the k largest scores along the last dimension, largest first.

    The ranking rule of every router and kernel: scores compared exactly, NaN above every number, -0.0 equal
    to 0.0, ties to the lower index. float32 scores are ranked by ``torch.topk`` on unique int64 keys (the
    order-preserving integer image of the float, then the reversed index), which is exact and O(E) per row;
    other dtypes, and up to SORT_ROWS rows of float32 outside torch.compile (a compiled graph takes the keys
    whatever T: one graph for dynamic T), by a stable descending sort.
    """
    few_rows = not torch.compiler.is_compiling() and scores.numel() <= SORT_ROWS * scores.shape[-1]
    if scores.dtype != torch.float32 or few_rows:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k].to(torch.int32)
    canonical = torch.where(scores == 0, 0.0, scores)  # -0.0 → 0.0
    canonical = torch.where(canonical.isnan(), math.nan, canonical)  # every NaN → the same positive NaN
    bits = canonical.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the magnitude order
    reversed_index = torch.arange(scores.shape[-1] - 1, -1, -1, device=scores.device)
    keys = (ordered.to(torch.int64) << 32) + reversed_index
    return torch.topk(keys, k, dim=-1).indices.to(torch.int32)


def router_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 x (so that gradcheck sees exact routing)."""
    return torch.promote_types(x.dtype, torch.float32)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type``, or None where it is off or does not exist (meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_anywhere() -> bool:
    """False when autocast is off on every device (one global check, for the callers that would otherwise ask
    for a tensor's ``device.type``, whose getter costs ~15 µs cold); True when it may be on, or under
    torch.compile."""
    return torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled()


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A block where autocast is off on ``device_type`` (a no-op context where it is off already, or does not
    exist: torch.autocast's costs ~9 µs a call)."""
    if autocast_dtype(device_type) is not None:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x·weightᵀ + bias in the router's dtype whatever autocast says (Switch Transformer's selective precision)."""
    dtype = router_dtype(x)
    with without_autocast(x.device.type):
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def uniform_(weight: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default initialisation, U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class Router(nn.Module):
    """Base of the routers: the gate ``weight`` [E, d] and the sizes; subclasses add their options and math.

    A subclass takes ``(d_model, num_experts, k)`` and keyword-only options (plus ``device``, ``dtype``), keeps
    each option as an attribute of the same name, validates it with ``moe_kernels.checks``, and implements
    ``forward(x, use_kernel=None) -> Routing``.
    """

    chooses_tokens = False
    """Whether experts choose their tokens (the Routing carries ``expert_tokens``): layer capacities do not apply."""

    def __init__(self, d_model: int, num_experts: int, k: int, *, device=None, dtype=None):
        super().__init__()
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.weight = nn.Parameter(uniform_(torch.empty(num_experts, d_model, device=device, dtype=dtype), d_model))

    @property
    def slots(self) -> int:
        """S, the slots per token of this router's Routing."""
        return self.k

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keyword-only options of this router's constructor."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in ("device", "dtype"))

    def options(self) -> dict:
        """This router's options, as its constructor takes them."""
        return {name: getattr(self, name) for name in self.option_names()}

    def wants_aux_loss(self) -> bool:
        """Whether the aux loss can matter: in training, or wherever autograd records."""
        return self.training or torch.is_grad_enabled()

    def extra_repr(self) -> str:
        options = ", ".join(f"{name}={value!r}" for name, value in self.options().items())
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}" + (f", {options}" if options else "")
