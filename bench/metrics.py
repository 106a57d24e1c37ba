"""The work one MoE layer call does, to turn milliseconds into TFLOP/s and GB/s.

FLOPs count the two expert GEMMs only (router, activation and combine are noise next to them), for the
nominal T·k assignments, dropped ones included: GEMM 1 is 2·T·k·d·N with N = 2·d_ff (gated) or d_ff,
GEMM 2 is 2·T·k·d_ff·d; forward+backward is 3× that (two GEMMs back for each one forward).
"""
from __future__ import annotations

from typing import Callable

import torch

from .configs import BenchConfig


def expert_flops(config: BenchConfig, num_tokens: int, backward: bool) -> int:
    """Floating-point operations of the expert GEMMs (see module docstring)."""
    assignments = num_tokens * config.k
    forward = 2 * assignments * config.d_model * (config.up_width + config.d_ff)
    return 3 * forward if backward else forward


def min_bytes_moved(config: BenchConfig, num_tokens: int, experts_hit: int, element_size: int) -> int:
    """Bytes a forward must at least move: each expert it uses read once, tokens read once, output written once.

    The bound that matters at small T, where the layer is a weight-streaming problem.
    """
    per_expert = (config.up_width + config.d_ff) * config.d_model
    return (experts_hit * per_expert + 2 * num_tokens * config.d_model) * element_size


def dense_equivalent(config: BenchConfig, num_tokens: int, device, dtype) -> Callable[[], torch.Tensor]:
    """One dense matmul with the forward's expert FLOPs: [T·k, d] · [d, N + d_ff]."""
    rows = torch.randn(max(1, num_tokens * config.k), config.d_model, device=device, dtype=dtype)
    weight = torch.randn(config.d_model, config.up_width + config.d_ff, device=device, dtype=dtype)
    return lambda: rows @ weight


def tflops(flops: int, milliseconds: float) -> float:
    return flops / (milliseconds * 1e-3) / 1e12
