"""Bad input gets an error that names the argument and its value (issue 16 item 12)."""
import numpy as np
import pytest
import torch

import moe_kernels
from moe_kernels import reference


@pytest.mark.parametrize(
    "arguments,error,message",
    [
        (dict(k=0), ValueError, "k must be an int >= 1, got 0"),
        (dict(k=5), ValueError, "k must be at most num_experts=4, got k=5"),
        (dict(k=2.0), TypeError, r"k must be an int >= 1, got 2.0 \(float\)"),
        (dict(num_experts=True), TypeError, "num_experts must be an int >= 1, got the bool True"),
        (dict(d_ff=0), ValueError, "d_ff must be an int >= 1, got 0"),
        (dict(router="softmax"), ValueError, "router must be one of"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(capacity_factor=0.0), ValueError, "capacity_factor must be a finite number > 0.0, got 0.0"),
        (dict(capacity_factor=-1.0), ValueError, "capacity_factor must be a finite number > 0.0, got -1.0"),
        (dict(capacity_factor=float("nan")), ValueError, "capacity_factor must be a finite number > 0.0, got nan"),
        (dict(capacity_factor=float("inf")), ValueError, "capacity_factor must be a finite number > 0.0, got inf"),
        (dict(capacity_factor="1.0"), TypeError, r"capacity_factor must be a finite number > 0.0, got '1.0' \(str\)"),
        (dict(capacity_factor=True), TypeError, r"capacity_factor must be a finite number > 0.0, got True \(bool\)"),
        (dict(expert_capacity=0), ValueError, "expert_capacity must be an int >= 1, got 0"),
        (dict(router="switch", k=2), ValueError, "router 'switch' sends each token to one expert"),
        (dict(noise_epsilon=-1.0), TypeError, "router 'topk' takes no option 'noise_epsilon'"),
        (dict(router="noisy_topk", noise_epsilon=-1.0), ValueError, "noise_epsilon must be a finite number >= 0.0, got -1.0"),
        (dict(renormalize="no"), TypeError, "renormalize must be a bool, got 'no'"),
        (dict(z_loss_weight="x"), TypeError, "z_loss_weight must be a finite number >= 0.0, got 'x'"),
        (dict(balance_loss_weight=-1.0), ValueError, "balance_loss_weight must be a finite number >= 0.0, got -1.0"),
        (dict(dtype=torch.complex64), TypeError, "dtype must be None or one of .*, got torch.complex64"),
        (dict(dtype=torch.float8_e4m3fn), TypeError, "dtype must be None or one of .*, got torch.float8_e4m3fn"),
        (dict(aux_loss_mode="add"), ValueError, r"aux_loss_mode must be one of \('attach', 'manual'\), got 'add'"),
        (dict(shared_expert_gate=True), ValueError, "shared_expert_gate=True needs a shared expert: give shared_d_ff"),
        (dict(expert_bias="yes"), TypeError, "expert_bias must be a bool, got 'yes'"),
    ],
)
@pytest.mark.parametrize("layer_class", [reference.MoE, moe_kernels.MoE])
def test_bad_constructor_arguments(layer_class, arguments, error, message):
    with pytest.raises(error, match=message):
        layer_class(**{"d_model": 8, "d_ff": 6, "num_experts": 4, **arguments})


def test_numpy_integers_are_sizes():
    layer = moe_kernels.MoE(np.int64(8), np.int32(6), np.int64(4), k=np.int16(2), expert_capacity=np.int64(3))
    assert (layer.d_model, layer.d_ff, layer.num_experts, layer.k, layer.expert_capacity) == (8, 6, 4, 2, 3)
    assert all(type(value) is int for value in (layer.d_model, layer.d_ff, layer.num_experts, layer.k))
    assert layer(torch.randn(3, 8)).shape == (3, 8)


def test_recompute_pre_activation_must_be_a_bool():
    with pytest.raises(TypeError, match="recompute_pre_activation must be a bool, got 'no'"):
        moe_kernels.MoE(8, 6, 4, recompute_pre_activation="no")
    with pytest.raises(TypeError, match="recompute_pre_activation must be a bool, got 1"):
        moe_kernels.MoE.from_reference(reference.MoE(8, 6, 4), recompute_pre_activation=1)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        moe_kernels.MoE(8, 6, 4, backend="numpy")


@pytest.mark.parametrize("layer_class", [reference.MoE, moe_kernels.MoE])
def test_bad_forward_input(layer_class):
    layer = layer_class(8, 6, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_model=8\], got \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must have one of the dtypes .*, got torch.int64"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x must have one of the dtypes .*, got torch.float8_e4m3fn"):
        layer(torch.randn(3, 8).to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="x must have one of the dtypes .*, got torch.complex64"):
        layer(torch.randn(3, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="x is on meta but parameter gate.weight is on cpu"):
        layer(torch.randn(3, 8, device="meta"))


def test_kernel_backend_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = moe_kernels.MoE(8, 6, 4, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors .* x is on cpu"):
        layer(torch.randn(3, 8))


def test_float64_on_backend_triton_names_the_dtype_and_the_backends_that_take_it():
    """Issue 16 item 3: rejected at the public entry (the layer and experts_forward), not inside a kernel."""
    pytest.importorskip("triton")
    layer = moe_kernels.MoE(8, 6, 4, backend="triton").double()
    message = r"backend 'triton' does not compute in torch.float64 \(x's dtype\); backends that do: \('torch',\)"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(3, 8, dtype=torch.float64))
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        moe_kernels.experts_forward(x, torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32),
                                    torch.randn(4, 12, 8), torch.randn(4, 8, 6), backend="triton")
