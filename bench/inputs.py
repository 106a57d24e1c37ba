"""The layer and the tokens a measurement runs on: uniform or Zipf-skewed routing, rotated input buffers.

Skew is made by biasing ``gate.weight``: tokens carry a shared offset direction u = 1 (x = N(0, 1) + u),
and expert e's gate row gets ``log p_e · u / |u|²`` added, so its logit moves by log p_e with p Zipf(s)
over the experts. The routing itself stays the layer's own (top-k of softmax); only its input is biased.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch import Tensor

from moe_kernels import reference, routers

from .configs import BenchConfig


ZIPF_EXPONENT = 1.2
# Enough distinct inputs that one call's activations are not still in the GPU's L2 (50 MB on H100) from
# the call before; the weights are shared, as in a model, and the largest of them do not fit anyway.
INPUT_BUFFERS = 4


def zipf_probabilities(num_experts: int, exponent: float = ZIPF_EXPONENT) -> Tensor:
    """[E] float32, p_e ∝ 1/(e+1)^exponent, summing to 1."""
    weights = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** exponent
    return (weights / weights.sum()).float()


def build_reference(config: BenchConfig, routing_mode: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The reference layer of ``config`` (eval mode) with its gate biased for ``routing_mode``."""
    torch.manual_seed(seed)
    layer = reference.MoE(**config.layer_arguments(), device=device, dtype=dtype).eval()
    if routing_mode == "zipf":
        offset = torch.ones(config.d_model, device=device, dtype=torch.float32)
        bias = zipf_probabilities(config.num_experts).to(device).log()
        with torch.no_grad():
            layer.gate.weight += (bias[:, None] * offset[None, :] / offset.square().sum()).to(dtype)
    return layer


def make_tokens(config: BenchConfig, routing_mode: str, num_tokens: int, device, dtype, seed: int = 1) -> list[Tensor]:
    """``INPUT_BUFFERS`` distinct inputs [T, d] of the run dtype (the skewed ones with offset u = 1)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    offset = 1.0 if routing_mode == "zipf" else 0.0
    return [
        (torch.randn(num_tokens, config.d_model, generator=generator) + offset).to(device=device, dtype=dtype)
        for _ in range(INPUT_BUFFERS)
    ]


def rotate(buffers: list[Tensor]) -> Iterator[Tensor]:
    """An endless cycle over the buffers: each timed call takes the next one."""
    return itertools.cycle(buffers)


def route(layer, tokens: Tensor) -> routers.Routing:
    """The layer's own routing of ``tokens`` [T, d]: its router's PyTorch definition."""
    return layer.gate(tokens)


def routing_statistics(layer, tokens: Tensor) -> dict:
    """How the layer routes ``tokens``: experts hit, and the busiest expert's share of assignments."""
    with torch.no_grad():
        experts = route(layer, tokens).experts
    counts = torch.bincount(experts.flatten().long(), minlength=layer.num_experts)
    return {
        "experts_hit": int((counts > 0).sum()),
        "busiest_expert_share": round(float(counts.max() / counts.sum()), 4) if counts.sum() else 0.0,
    }
