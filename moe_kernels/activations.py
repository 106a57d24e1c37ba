"""Expert activations in PyTorch: the definition the kernels' fused epilogues reproduce.

Gated activations ("swiglu", "geglu") take the [.., 2·d_ff] output of ``gate_up_proj`` with the gate half
first (Hugging Face's layout) and return act(gate)·up. GELU is the exact (erf) form.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

GATED_ACTIVATIONS = ("swiglu", "geglu")
ACTIVATIONS = GATED_ACTIVATIONS + ("relu", "gelu", "silu")


def is_gated(activation: str) -> bool:
    return activation in GATED_ACTIVATIONS


def activate(pre_activation: Tensor, activation: str) -> Tensor:
    """[.., 2·d_ff] (gated) or [.., d_ff] pre-activation → [.., d_ff], same dtype."""
    if activation == "swiglu":
        gate, up = pre_activation.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = pre_activation.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "relu":
        return F.relu(pre_activation)
    if activation == "gelu":
        return F.gelu(pre_activation)
    return F.silu(pre_activation)
