"""moe_kernels.experts_forward (experts given a routing) against a token-by-token float64 loop.

Tolerances: the flash-attention rule of helpers.assert_close (at most 2× the error of the same loop run at
the same precision, 3× for gradients).
"""
import zlib

import pytest
import torch

import moe_kernels
from helpers import assert_close, device_for, skip_unless_runnable
from moe_kernels.activations import PRESETS, activate

BACKENDS = ("torch", "triton")


def loop(x, weights, experts, up_weight, down_weight, activation, up_bias=None, down_bias=None):
    """y[t] = Σ_s w[t,s]·(act(x[t]·W_up[e]ᵀ + b_up[e])·W_down[e]ᵀ + b_down[e]), one (token, slot) at a time."""
    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
        for s in range(experts.shape[1]):
            e = int(experts[t, s])
            pre = x[t] @ up_weight[e].to(x.dtype).t() + (0 if up_bias is None else up_bias[e].to(x.dtype))
            out = activate(pre, activation) @ down_weight[e].to(x.dtype).t()
            out = out + (0 if down_bias is None else down_bias[e].to(x.dtype))
            total = total + weights[t, s].to(total.dtype) * out.to(total.dtype)
        rows.append(total.to(x.dtype))
    return torch.stack(rows)


def problem(activation, num_tokens=13, d=12, d_ff=10, num_experts=5, k=2, biases=False):
    gated = PRESETS[activation].gated
    tensors = dict(
        x=torch.randn(num_tokens, d, dtype=torch.float64),
        weights=torch.rand(num_tokens, k, dtype=torch.float64),
        experts=torch.stack([torch.randperm(num_experts)[:k] for _ in range(num_tokens)]),
        up_weight=torch.randn(num_experts, (2 if gated else 1) * d_ff, d, dtype=torch.float64) / d**0.5,
        down_weight=torch.randn(num_experts, d, d_ff, dtype=torch.float64) / d_ff**0.5,
    )
    if biases:
        tensors["up_bias"] = torch.randn(num_experts, tensors["up_weight"].shape[1], dtype=torch.float64)
        tensors["down_bias"] = torch.randn(num_experts, d, dtype=torch.float64)
    return tensors


def run(function, tensors, dtype, device, activation, dy):
    leaves = {name: (t.to(device, dtype) if t.is_floating_point() else t.to(device)) for name, t in tensors.items()}
    for name, t in leaves.items():
        if t.is_floating_point():
            t.requires_grad_()
    y = function(**leaves, activation=activation)
    differentiable = [t for t in leaves.values() if t.requires_grad]
    grads = torch.autograd.grad((y.double() * dy.to(device)).sum(), differentiable)
    return y.double().cpu(), [g.double().cpu() for g in grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation,biases", [("swiglu", False), ("relu", False), ("gpt_oss_swiglu", True), ("geglu", True)])
def test_experts_forward_matches_loop(activation, biases, dtype, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(zlib.crc32(f"{activation}{biases}".encode()))
    tensors = problem(activation, biases=biases)
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)
    device = device_for(backend)

    def fast(**arguments):
        return moe_kernels.experts_forward(**arguments, backend=backend)

    exact = run(loop, tensors, torch.float64, "cpu", activation, dy)
    baseline = run(loop, tensors, dtype, "cpu", activation, dy)
    actual = run(fast, tensors, dtype, device, activation, dy)
    assert_close(actual[0], baseline[0], exact[0], dtype, 2, "y")
    for name, a, b, e in zip([n for n, t in tensors.items() if t.is_floating_point()], actual[1], baseline[1], exact[1]):
        assert_close(a, b, e, dtype, 3, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_recomputed_pre_activation_matches_loop(dtype):
    """recompute_pre_activation=True (the backward runs GEMM 1 again) on backend "triton", biases included."""
    skip_unless_runnable("triton")
    torch.manual_seed(21)
    tensors = problem("gpt_oss_swiglu", biases=True)
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)

    def fast(**arguments):
        return moe_kernels.experts_forward(**arguments, backend="triton", recompute_pre_activation=True)

    exact = run(loop, tensors, torch.float64, "cpu", "gpt_oss_swiglu", dy)
    baseline = run(loop, tensors, dtype, "cpu", "gpt_oss_swiglu", dy)
    actual = run(fast, tensors, dtype, device_for("triton"), "gpt_oss_swiglu", dy)
    assert_close(actual[0], baseline[0], exact[0], dtype, 2, "y")
    for name, a, b, e in zip([n for n, t in tensors.items() if t.is_floating_point()], actual[1], baseline[1], exact[1]):
        assert_close(a, b, e, dtype, 3, f"grad of {name}")


def test_recompute_pre_activation_must_be_a_bool():
    tensors = {name: (t.float() if t.is_floating_point() else t) for name, t in problem("swiglu").items()}
    with pytest.raises(TypeError, match="recompute_pre_activation must be a bool, got 'yes'"):
        moe_kernels.experts_forward(**tensors, recompute_pre_activation="yes")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.randn(13, 11)), "up_weight must be"),
        (dict(experts=torch.zeros(13, 2)), "experts must be a"),
        (dict(experts=torch.full((13, 2), 5)), r"experts must hold ids in \[0, 5\)"),
        (dict(weights=torch.rand(13, 3)), "weights must be"),
        (dict(down_weight=torch.randn(5, 12, 9)), "down_weight must be"),
        (dict(up_bias=torch.randn(5, 7)), "up_bias must be"),
        (dict(capacity=-1), "capacity must be"),
        (dict(activation="tanh"), "activation must be one of"),
    ],
)
def test_bad_arguments_are_named(change, message):
    tensors = {name: (t.float() if t.is_floating_point() else t) for name, t in problem("swiglu").items()}
    with pytest.raises(ValueError, match=message):
        moe_kernels.experts_forward(**{**tensors, **change})
