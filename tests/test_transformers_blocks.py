"""Door 2 of issue 13: ``moe_kernels.swap`` replaces whole Hugging Face MoE blocks (router + experts).

Tolerances as in test_transformers_experts.py: float32 whole models within 1e-5 relative of the untouched model
(transformers' "eager" experts); bf16 per block by the flash-attention rule of helpers.assert_close.
"""
import copy
import warnings

import pytest
import torch

import moe_kernels
from helpers import assert_close
from hf_models import (  # skips without transformers
    FAMILIES, FULL, assert_matches, build, build_switch, relative_error, tokens, train_step, transformers)

RELATIVE = 1e-5
SWAP_FAMILIES = [*FAMILIES, "switch_transformers"]


def families(quick) -> list[str]:
    """The families a test runs: all of them under HF_FULL=1, else ``quick``."""
    return SWAP_FAMILIES if FULL else list(quick)


def model_of(family: str, dtype=torch.float32, **switch_overrides):
    return build_switch(dtype, **switch_overrides) if family == "switch_transformers" else build(family, dtype=dtype)


def blocks_of(model) -> dict[str, torch.nn.Module]:
    """The MoE blocks of a Hugging Face model by name (modules with ``experts`` and ``gate``/``router`` children)."""
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "experts") and (hasattr(module, "gate") or hasattr(module, "router"))}


def swapped(model, backend: str = "torch"):
    """``moe_kernels.swap(model)``, checking that it replaced every MoE block and warned of nothing."""
    names = list(blocks_of(model))
    assert names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = moe_kernels.swap(model, backend=backend)
    assert result is model
    assert all(isinstance(model.get_submodule(name), moe_kernels.MoE) for name in names)
    return result


@pytest.mark.parametrize("family", SWAP_FAMILIES)
def test_swap_replaces_every_block_and_keeps_parameters_and_keys(family):
    model = model_of(family)
    parameters = dict(model.named_parameters())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    swapped(model)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[key], state[key]) for key in state)
    if family != "switch_transformers":  # its per-expert Linears are stacked into [E, ., .] copies
        kept = {id(parameter) for parameter in model.parameters()}
        assert all(id(parameter) in kept for parameter in parameters.values())


# Every family on backend "torch"; backend "triton" (the interpreter here: slow) on a quick subset.
@pytest.mark.parametrize("family,backend", [(family, "torch") for family in SWAP_FAMILIES] + [
    (family, "triton") for family in families(quick=("mixtral", "deepseek_v3"))])
def test_float32_training_step_matches_the_untouched_model(family, backend):
    """Logits, loss, router logits, Hugging Face's aux (and z) losses and every gradient. SwitchTransformers without
    router jitter here: in float32 models Hugging Face multiplies the block input in place, so its experts see the
    jittered input too (not in other dtypes, nor in the paper); jitter is compared in the bf16 block test."""
    model = model_of(family, router_jitter_noise=0.0)
    untouched = copy.deepcopy(model)
    ids = tokens()
    swapped(model, backend)
    assert_matches(train_step(model, ids), train_step(untouched, ids), RELATIVE)
    layers = [module for module in model.modules() if isinstance(module, moe_kernels.MoE)]
    assert all(layer.aux_loss is not None and layer.aux_loss.item() == 0 for layer in layers)  # the model's loss only


@pytest.mark.parametrize("family", SWAP_FAMILIES)
def test_bf16_blocks_match_hugging_face_at_the_same_precision(family):
    model = model_of(family)
    originals = {name: copy.deepcopy(block) for name, block in blocks_of(model).items()}
    swapped(model)
    for index, (name, original) in enumerate(originals.items()):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(2, 16, model.config.hidden_size, dtype=torch.float64, generator=generator)
        dy = torch.randn(x.shape, dtype=torch.float64, generator=generator)
        exact = _block_step(original, x, dy, torch.float64)
        baseline = _block_step(original, x, dy, torch.bfloat16)
        actual = _block_step(model.get_submodule(name), x, dy, torch.bfloat16)
        for what, factor in (("output", 2), ("grad of x", 3)):
            assert_close(actual[what], baseline[what], exact[what], torch.bfloat16, factor, f"{family} {name}: {what}")


def test_switch_transformers_router_jitter_matches_hugging_face():
    """In a float64 block Hugging Face's router jitters a float32 copy of the input, so that its experts see the
    input itself, as moe_kernels' do: the same random draws give the same output."""
    model = build_switch(torch.float64, router_jitter_noise=0.5)
    name, original = next(iter(blocks_of(model).items()))
    original = copy.deepcopy(original)
    block = swapped(model).get_submodule(name)
    x = torch.randn(2, 16, model.config.d_model, dtype=torch.float64)
    torch.manual_seed(0)
    expected = original(x)
    torch.manual_seed(0)
    assert relative_error(block(x), expected) <= RELATIVE
    torch.manual_seed(1)
    assert relative_error(block(x), expected) > 1e-3  # other draws: the jitter matters


def _block_step(block, x, dy, dtype) -> dict[str, torch.Tensor]:
    """Output and input gradient of a training-mode call (the same router jitter draws in every call)."""
    block = copy.deepcopy(block).to(dtype).train()
    x = x.detach().to(dtype).requires_grad_()
    torch.manual_seed(0)
    y = block(x)
    y = y[0] if isinstance(y, tuple) else y
    (y.double() * dy).sum().backward()
    return {"output": y.detach().double(), "grad of x": x.grad.double()}


@pytest.mark.parametrize("family", families(quick=("qwen2_moe", "gpt_oss")))
def test_greedy_generate_gives_the_same_tokens(family):
    model = model_of(family).eval()
    prompt = tokens(batch=2, length=5, seed=1)
    arguments = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **arguments)
    assert torch.equal(swapped(model).generate(prompt, **arguments), expected)


@pytest.mark.parametrize("family", families(quick=("gpt_oss", "switch_transformers")))
def test_save_pretrained_from_pretrained_round_trip(family, tmp_path):
    model = model_of(family).eval()
    untouched = copy.deepcopy(model)
    swapped(model).save_pretrained(tmp_path)
    loaded = getattr(transformers, type(untouched).__name__).from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == untouched.state_dict().keys()
    ids = tokens()
    with torch.no_grad():
        expected = untouched(input_ids=ids, labels=ids).logits
        assert relative_error(loaded(input_ids=ids, labels=ids).logits, expected) <= RELATIVE
        assert relative_error(swapped(loaded)(input_ids=ids, labels=ids).logits, expected) <= RELATIVE
    model.load_state_dict(untouched.state_dict())  # Hugging Face's keys load into the swapped model


@pytest.mark.parametrize("family", families(quick=("qwen3_moe",)))
def test_gradient_checkpointing(family):
    model = model_of(family, router_jitter_noise=0.0)
    untouched = copy.deepcopy(model)
    swapped(model)
    for each in (untouched, model):
        each.gradient_checkpointing_enable()
    ids = tokens()
    assert_matches(train_step(model, ids), train_step(untouched, ids), RELATIVE)


def test_router_logits_are_recorded_when_the_model_recorded_before_the_swap():
    """transformers installs its recording hooks on its router classes at the first recording forward; a swap
    after that records from the swapped routers (and once each)."""
    model = build("olmoe")
    ids = tokens()
    expected = model(input_ids=ids, output_router_logits=True)
    swapped(model)
    actual = model(input_ids=ids, output_router_logits=True)
    assert len(actual.router_logits) == len(expected.router_logits) == model.config.num_hidden_layers
    assert relative_error(actual.aux_loss, expected.aux_loss) <= RELATIVE


def test_torch_compile_of_a_swapped_block():
    model = swapped(build("mixtral"))
    block = next(module for module in model.modules() if isinstance(module, moe_kernels.MoE))
    x = torch.randn(2, 8, model.config.hidden_size)
    expected = block(x)
    assert relative_error(torch.compile(block)(x), expected) <= RELATIVE


def test_from_reference_of_a_hugging_face_block_says_what_to_do():
    block = next(module for name, module in build("mixtral").named_modules() if name.endswith("layers.0.mlp"))
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*moe_kernels.integrations.transformers"):
        moe_kernels.MoE.from_reference(block)


class UnknownMoeBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(4, 2)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])


def test_swap_of_a_block_it_does_not_know_warns_instead_of_doing_nothing_silently():
    model = torch.nn.Sequential(UnknownMoeBlock(), UnknownMoeBlock())
    before = dict(model.named_parameters())
    with pytest.warns(UserWarning, match=r"UnknownMoeBlock \(2 in Sequential\).*looks like an MoE block"):
        assert moe_kernels.swap(model) is model
    assert dict(model.named_parameters()) == before


def test_swap_refuses_what_it_cannot_compute_exactly_naming_the_setting():
    model = build("mixtral")
    model.model.layers[1].mlp.jitter_noise = 0.1  # config.router_jitter_noise: jitters the experts' input too
    with pytest.raises(NotImplementedError, match=r"MixtralSparseMoeBlock.*router_jitter_noise=0.1"):
        moe_kernels.swap(model)
    with pytest.raises(NotImplementedError, match=r"SwitchTransformersSparseMLP.*router_dtype=torch.bfloat16"):
        moe_kernels.swap(build_switch(router_dtype="bfloat16"))


def test_swap_of_switch_transformers_with_expert_dropout_says_it_is_not_applied():
    with pytest.warns(UserWarning, match=r"SwitchTransformersSparseMLP.*no dropout \(dropout_rate=0.1"):
        moe_kernels.swap(build_switch(dropout_rate=0.1))


def test_gpt_oss_swapped_block_returns_the_pair_its_decoder_layer_unpacks():
    model = swapped(build("gpt_oss"))
    output = model.model.layers[0].mlp(torch.randn(2, 3, model.config.hidden_size))
    assert isinstance(output, tuple) and output[0].shape == (2, 3, model.config.hidden_size) and output[1] is None


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
