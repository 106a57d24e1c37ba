"""Bad input gets an error that names the argument."""
import pytest
import torch

import moe_kernels
from moe_kernels import reference


@pytest.mark.parametrize(
    "arguments,message",
    [
        (dict(k=0), "k must be a positive int"),
        (dict(k=5), "k must be at most num_experts=4"),
        (dict(router="softmax"), "router must be one of"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(capacity_factor=-1.0), "capacity_factor must be > 0"),
        (dict(router="switch", k=2), "router 'switch' sends each token to one expert"),
        (dict(noise_epsilon=-1.0), "noise_epsilon must be >= 0"),
        (dict(d_ff=0), "d_ff must be a positive int"),
    ],
)
@pytest.mark.parametrize("layer_class", [reference.MoE, moe_kernels.MoE])
def test_bad_constructor_arguments(layer_class, arguments, message):
    with pytest.raises(ValueError, match=message):
        layer_class(**{"d_model": 8, "d_ff": 6, "num_experts": 4, **arguments})


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        moe_kernels.MoE(8, 6, 4, backend="numpy")


@pytest.mark.parametrize("layer_class", [reference.MoE, moe_kernels.MoE])
def test_bad_forward_input(layer_class):
    layer = layer_class(8, 6, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_model=8\], got \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must have a floating-point dtype, got torch.int64"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="x is on meta but parameter gate.weight is on cpu"):
        layer(torch.randn(3, 8, device="meta"))


def test_kernel_backend_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = moe_kernels.MoE(8, 6, 4, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors .* x is on cpu"):
        layer(torch.randn(3, 8))
