"""Whole Hugging Face MoE blocks and moe_kernels' layer API (door 2 of issue 13)."""
import pytest
import torch

import moe_kernels
from hf_models import build, build_switch  # skips without transformers


def test_from_reference_of_a_hugging_face_block_says_what_to_do():
    block = next(module for name, module in build("mixtral").named_modules() if name.endswith("layers.0.mlp"))
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*moe_kernels.integrations.transformers"):
        moe_kernels.MoE.from_reference(block)


def test_swap_of_a_model_it_cannot_swap_warns_instead_of_doing_nothing_silently():
    model = build("mixtral")
    before = {name: parameter for name, parameter in model.named_parameters()}
    with pytest.warns(UserWarning, match=r"MixtralSparseMoeBlock \(2 in MixtralForCausalLM\).*looks like an MoE block"):
        assert moe_kernels.swap(model) is model
    assert {name: parameter for name, parameter in model.named_parameters()} == before


def test_key_hooks_keep_switch_transformers_per_expert_keys():
    """A stacked layer with the hooks loads a SwitchTransformers block's state dict and writes it back unchanged."""
    from moe_kernels import reference
    from moe_kernels.integrations.transformers import keys

    hf_block = next(module for name, module in build_switch().named_modules() if name.endswith("block.0.layer.1.mlp"))
    expected = hf_block.state_dict()
    num_experts = hf_block.router.num_experts
    d_ff, d_model = expected["experts.expert_0.wi.weight"].shape
    layer = reference.MoE(d_model, d_ff, num_experts, k=1, router="switch", activation="relu")
    keys.install(layer, [keys.Rename("gate.weight", "router.classifier.weight"),
                         keys.Split("experts.up_proj", "experts.expert_{}.wi.weight", num_experts),
                         keys.Split("experts.down_proj", "experts.expert_{}.wo.weight", num_experts)])
    layer.load_state_dict(expected)
    for expert in range(num_experts):
        assert torch.equal(layer.experts.up_proj[expert], expected[f"experts.expert_{expert}.wi.weight"])
        assert torch.equal(layer.experts.down_proj[expert], expected[f"experts.expert_{expert}.wo.weight"])
    written = layer.state_dict()
    assert set(written) == set(expected)
    assert all(torch.equal(written[key], expected[key]) for key in expected)
    layer.load_state_dict({"gate.weight": written["router.classifier.weight"], "experts.up_proj": layer.experts.up_proj,
                           "experts.down_proj": layer.experts.down_proj})  # our own names still load
