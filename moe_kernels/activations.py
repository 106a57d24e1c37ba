"""Expert activations as data: what every backend and kernel epilogue computes, defined once in PyTorch.

An ``Activation`` is a small frozen record, not code: the PyTorch definition below (``activate``) and the
Triton epilogue (kernels/grouped_gemm.py) both read its fields, so a new activation is a new record (a
preset), never a kernel copy.

- ``function``: the elementwise f, "silu" (z·σ(alpha·z)), "gelu" (exact, erf) or "relu".
- ``gated``: GEMM 1 produces [.., 2·d_ff] = gate and up halves, and the activation is
  f(gate)·(up + up_offset) (SwiGLU, GeGLU); otherwise GEMM 1 produces [.., d_ff] and it is f(z).
- ``limit`` (gated only): the gate is clamped above at ``limit`` and up to [−limit, limit] first (GPT-OSS).
- ``interleaved`` (gated only): the layout of the gate and up columns of the pre-activation (and so of the
  ``gate_up_proj`` rows): False = gate half first (Hugging Face's Mixtral/Qwen layout), True = gate and up
  alternate, gate first (GPT-OSS's layout).

Presets: "swiglu", "geglu", "relu", "gelu", "silu", and "gpt_oss_swiglu" (GPT-OSS: silu with alpha 1.702,
limit 7, up + 1, interleaved).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FUNCTIONS = ("silu", "gelu", "relu")


@dataclass(frozen=True)
class Activation:
    """One expert activation (fields in the module docstring)."""

    function: str
    gated: bool
    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0
    interleaved: bool = False

    def __post_init__(self):
        if self.function not in FUNCTIONS:
            raise ValueError(f"Activation.function must be one of {FUNCTIONS}, got {self.function!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha):
            raise ValueError(f"Activation.alpha must be a finite number, got {self.alpha!r}")
        if self.function != "silu" and self.alpha != 1.0:
            raise ValueError(f"Activation.alpha applies to 'silu' only, got alpha={self.alpha!r} for {self.function!r}")
        if self.limit is not None and not (isinstance(self.limit, (int, float)) and self.limit > 0 and math.isfinite(self.limit)):
            raise ValueError(f"Activation.limit must be None or a finite number > 0, got {self.limit!r}")
        if not self.gated and (self.limit is not None or self.up_offset != 0.0 or self.interleaved):
            raise ValueError("Activation.limit, up_offset and interleaved apply to gated activations only")
        if not math.isfinite(self.up_offset):
            raise ValueError(f"Activation.up_offset must be finite, got {self.up_offset!r}")

    @property
    def spec(self) -> str:
        """A string that ``resolve`` turns back into this activation (how custom-op schemas carry it)."""
        # str of a float round-trips exactly, like repr (and torch.compile traces str, not !r)
        return f"{self.function}|{int(self.gated)}|{float(self.alpha)}|{self.limit}|{float(self.up_offset)}|{int(self.interleaved)}"

    def up_width(self, d_ff: int) -> int:
        """Columns of GEMM 1 (rows of gate_up_proj / up_proj) for hidden width d_ff."""
        return 2 * d_ff if self.gated else d_ff


PRESETS = {
    "swiglu": Activation("silu", gated=True),
    "geglu": Activation("gelu", gated=True),
    "relu": Activation("relu", gated=False),
    "gelu": Activation("gelu", gated=False),
    "silu": Activation("silu", gated=False),
    "gpt_oss_swiglu": Activation("silu", gated=True, alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True),
}
ACTIVATIONS = tuple(PRESETS)


def resolve(activation: str | Activation) -> Activation:
    """The Activation named by a preset name, an ``Activation.spec`` string, or the Activation itself."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        if activation in PRESETS:
            return PRESETS[activation]
        fields = activation.split("|")
        if len(fields) == 6:
            function, gated, alpha, limit, up_offset, interleaved = fields
            return Activation(function, bool(int(gated)), float(alpha), None if limit == "None" else float(limit),
                              float(up_offset), bool(int(interleaved)))
    raise ValueError(f"activation must be one of {ACTIVATIONS} or an moe_kernels.activations.Activation, got {activation!r}")


def is_gated(activation: str | Activation) -> bool:
    return resolve(activation).gated


def split_gate_up(pre_activation: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The gate and up halves [.., d_ff] of a gated pre-activation [.., 2·d_ff] (views)."""
    if interleaved:
        return pre_activation[..., 0::2], pre_activation[..., 1::2]
    return pre_activation.chunk(2, dim=-1)


def _function(z: Tensor, activation: Activation) -> Tensor:
    if activation.function == "silu":
        return F.silu(z) if activation.alpha == 1.0 else z * torch.sigmoid(activation.alpha * z)
    if activation.function == "gelu":
        return F.gelu(z)
    return F.relu(z)


def activate(pre_activation: Tensor, activation: str | Activation) -> Tensor:
    """[.., 2·d_ff] (gated) or [.., d_ff] pre-activation → [.., d_ff], same dtype, differentiable."""
    activation = resolve(activation)
    if not activation.gated:
        return _function(pre_activation, activation)
    gate, up = split_gate_up(pre_activation, activation.interleaved)
    if activation.limit is not None:
        gate = gate.clamp(max=activation.limit)
        up = up.clamp(-activation.limit, activation.limit)
    if activation.up_offset != 0.0:
        up = up + activation.up_offset
    return _function(gate, activation) * up
