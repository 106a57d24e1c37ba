"""The one-line drop-in: swap() and from_reference() share Parameters and reproduce the reference."""
import pytest
import torch
from torch import nn

import moe_kernels
from helpers import randomize_
from moe_kernels import reference


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([randomize_(reference.MoE(8, 12, 4, k=2)) for _ in range(2)])
        self.head = nn.Sequential(randomize_(reference.MoE(8, 6, 3, k=1, router="switch", activation="gelu")))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_swap_replaces_every_reference_layer_and_shares_parameters():
    torch.manual_seed(0)
    model = TinyModel()
    parameters_before = {name: parameter for name, parameter in model.named_parameters()}
    x = torch.randn(3, 5, 8)
    expected = model(x)
    swapped = moe_kernels.swap(model)
    assert swapped is model
    layers = [module for module in model.modules() if isinstance(module, reference.MoE)]
    assert layers == []
    assert sum(isinstance(module, moe_kernels.MoE) for module in model.modules()) == 3
    for name, parameter in model.named_parameters():
        assert parameter is parameters_before[name]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_swap_of_a_layer_itself_returns_the_fast_layer():
    torch.manual_seed(1)
    layer = randomize_(reference.MoE(8, 12, 4, k=2, router="noisy_topk", capacity_factor=1.5)).eval()
    fast = moe_kernels.swap(layer)
    assert isinstance(fast, moe_kernels.MoE) and not fast.training
    assert fast.gate.weight is layer.gate.weight and fast.experts.down_proj is layer.experts.down_proj
    x = torch.randn(10, 8)
    torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-6)


def test_state_dict_has_hugging_face_names_and_loads_across_layers():
    torch.manual_seed(2)
    layer = randomize_(reference.MoE(8, 12, 4, k=2))
    assert set(layer.state_dict()) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    assert layer.experts.gate_up_proj.shape == (4, 24, 8) and layer.experts.down_proj.shape == (4, 8, 12)
    fast = moe_kernels.MoE(8, 12, 4, k=2)
    fast.load_state_dict(layer.state_dict())
    x = torch.randn(6, 8)
    torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-6)
    noisy = reference.MoE(8, 12, 4, router="noisy_topk", activation="relu")
    assert set(noisy.state_dict()) == {"gate.weight", "gate.noise_weight", "experts.up_proj", "experts.down_proj"}


def test_swap_warns_when_it_finds_no_moe_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="found no MoE layer in Sequential"):
        assert moe_kernels.swap(model) is model


def test_swap_names_an_unknown_block_that_looks_like_an_moe():
    class OtherMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.experts = nn.Linear(4, 2), nn.Linear(4, 4)

    model = nn.Sequential(OtherMoE(), randomize_(reference.MoE(4, 6, 2, k=1)))
    with pytest.warns(UserWarning, match="OtherMoE.*looks like an MoE block"):
        moe_kernels.swap(model)
    assert isinstance(model[1], moe_kernels.MoE) and type(model[0]).__name__ == "OtherMoE"
