"""The layer call that the compile audit and the traffic meter observe: a forward, then a backward, of the
fast layer through backend "triton".

The layer is ``moe_kernels.MoE(**config.layer_arguments(), backend="triton")`` in eval mode (noisy top-k
draws no noise; capacity applies), x [T, d] in ``dtype`` (parameters too). The backward is that of
y·dy for a random dy [T, d]; the router's losses reach the gating backward as in training, their gradient
being attached to the routing weights (the layer's default aux_loss_mode "attach"). On the meta device (the audit) nothing is computed; on the CPU
under TRITON_INTERPRET=1 (the meter) everything is.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import Tensor

import moe_kernels

from .configs import BenchConfig

PASSES = ("forward", "backward")


def build_layer(config: BenchConfig, num_tokens: int, dtype: torch.dtype, device, seed: int = 0):
    """(layer, x): the fast layer of ``config`` with its parameters in ``dtype`` on ``device``, and x [T, d]."""
    torch.manual_seed(seed)
    layer = moe_kernels.MoE(**config.layer_arguments(), backend="triton", device=device, dtype=dtype).eval()
    x = torch.randn(num_tokens, config.d_model, device=device, dtype=dtype)
    return layer, x


def run_layer(
    layer, x: Tensor, section: Callable[[str], ContextManager] = lambda name: contextlib.nullcontext(),
    backward: bool = True,
) -> Tensor:
    """The forward inside ``section("forward")``, then the backward inside ``section("backward")``; returns y.

    Everything outside the two sections (making dy, the leaf x) is not part of either pass.
    """
    x = x.detach().requires_grad_(backward)
    # A forward with no backward is an inference step (a decode step of a server): no autograd recording,
    # so the router's losses, which only matter to a backward, are not computed.
    with section("forward"), torch.set_grad_enabled(backward):
        y = layer(x)
    if backward:
        dy = torch.randn_like(y)
        with section("backward"):
            y.backward(dy)
    return y
