"""Experts given a routing: the pipeline after the router, as one differentiable function.

``experts_forward`` is what any caller that routes by itself uses (the transformers integration, expert
parallelism, a user's own router): the permutation, grouped GEMM 1 with the activation, grouped GEMM 2
and the weighted combine of the chosen backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .activations import Activation, resolve
from .backends import resolve as resolve_backend


def experts_forward(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    *,
    activation: str | Activation = "swiglu",
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    capacity: int | None = None,
    backend: str = "auto",
    recompute_pre_activation: bool = False,
) -> Tensor:
    """y[t] = Σ_s weights[t, s]·expert_{experts[t, s]}(x[t]), differentiable in x, weights and every parameter.

    x: [T, d] float16/bfloat16/float32 (and float64 on backend "torch"). weights: [T, S] floats (computed in float32, float64 for
    float64 x). experts: [T, S] integers in [0, E) (checked on the CPU; never read out of bounds elsewhere). up_weight:
    [E, 2·d_ff, d] for gated activations (gate/up rows as ``activation.interleaved`` says), else
    [E, d_ff, d]; down_weight: [E, d, d_ff]; any dtype and strides (the experts compute in x's dtype).
    up_bias: [E, 2·d_ff] / [E, d_ff] or None; down_bias: [E, d] or None. capacity: the assignments each
    expert keeps (slot-major, then token order: pipeline's layout), None for dropless.
    recompute_pre_activation: False (default) keeps GEMM 1's pre-activation for the backward on backend
    "triton" (T·S·N·itemsize bytes, N = 2·d_ff gated); True saves that memory and runs GEMM 1 again in the
    backward (T·S·N·d MACs). Backend "torch" always keeps it.
    Returns y [T, d] in x's dtype.
    """
    activation = resolve(activation)
    _check(x, weights, experts, up_weight, down_weight, activation, up_bias, down_bias, capacity)
    recompute_pre_activation = checks.boolean("recompute_pre_activation", recompute_pre_activation)
    stages = resolve_backend(backend, x.device, x.dtype)
    router_dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 x
    return stages.routed_experts(
        x, experts.to(torch.int32), weights.to(router_dtype), capacity, up_weight, up_bias, down_weight, down_bias,
        activation, recompute_pre_activation,
    )


def _check(x, weights, experts, up_weight, down_weight, activation, up_bias, down_bias, capacity) -> None:
    """Every argument of experts_forward against the others; errors name the argument and its value."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"x must be a [T, d] tensor of one of the dtypes {checks.FLOAT_DTYPES}, got {_describe(x)}")
    num_tokens, d = x.shape
    if not isinstance(experts, Tensor) or experts.dim() != 2 or experts.shape[0] != num_tokens or experts.is_floating_point():
        raise ValueError(f"experts must be a [T={num_tokens}, S] integer tensor, got {_describe(experts)}")
    if not isinstance(weights, Tensor) or weights.shape != experts.shape or not weights.is_floating_point():
        raise ValueError(f"weights must be a floating-point tensor shaped like experts {tuple(experts.shape)}, got {_describe(weights)}")
    if not isinstance(up_weight, Tensor) or up_weight.dim() != 3 or up_weight.shape[2] != d:
        raise ValueError(f"up_weight must be [E, N, d={d}], got {_describe(up_weight)}")
    num_experts, n_up, _ = up_weight.shape
    if activation.gated and n_up % 2:
        raise ValueError(f"up_weight has {n_up} rows, but the gated activation needs 2·d_ff (an even number)")
    d_ff = n_up // 2 if activation.gated else n_up
    if not isinstance(down_weight, Tensor) or tuple(down_weight.shape) != (num_experts, d, d_ff):
        raise ValueError(f"down_weight must be [E={num_experts}, d={d}, d_ff={d_ff}], got {_describe(down_weight)}")
    for name, bias, shape in (("up_bias", up_bias, (num_experts, n_up)), ("down_bias", down_bias, (num_experts, d))):
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != shape):
            raise ValueError(f"{name} must be None or {list(shape)}, got {_describe(bias)}")
    for name, tensor in (("weights", weights), ("experts", experts), ("up_weight", up_weight),
                         ("down_weight", down_weight), ("up_bias", up_bias), ("down_bias", down_bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")
    # On a GPU this check would wait on the device; under torch.compile it would break the graph (the
    # C++ permute op, which runs there when built, refuses an id out of range too).
    if experts.device.type == "cpu" and experts.numel() and not torch.compiler.is_compiling():
        low, high = (int(bound) for bound in torch.aminmax(experts))  # one pass over [T, k]
        if low < 0 or high >= num_experts:
            raise ValueError(f"experts must hold ids in [0, {num_experts}), got values in [{low}, {high}]")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    return repr(value)
