"""Door 1: moe_kernels as transformers' experts implementation, on tiny random models of each family.

Tolerances:
- float32, whole model in train mode, one cross-entropy backward (plus HF's aux loss): logits, loss, aux loss
  and every parameter gradient within 1e-5 relative (max |ours − eager| / max |eager|) of the same model with
  transformers' "eager" experts (issue 13).
- bfloat16: the flash-attention rule of helpers.assert_close on each MoE block of the model (its own router and
  experts), ours and eager both in bf16 against eager in float64 on the same input. Whole models are not
  compared in bf16: there a routing decision that flips between bf16 runs (ours or eager alike) dominates.
- The flag layouts: against transformers' own "batched_mm" function, which reads the same flags.
"""
import copy
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import moe_kernels
from helpers import assert_close, device_for, skip_unless_runnable
from hf_models import (  # skips without transformers
    FAMILIES, assert_matches, build, families, relative_error, tokens, train_step, transformers)

from moe_kernels.integrations import transformers as hf  # noqa: E402  (needs transformers)
from moe_kernels.integrations.transformers import experts as experts_module  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation  # noqa: E402

RELATIVE = 1e-5
BACKENDS = ("torch", "triton")


def triton_takes_biases() -> bool:
    """Whether backend "triton" computes expert biases yet (it refuses them until the kernels gain them)."""
    x = torch.randn(2, 16, device=device_for("triton"))
    tensors = dict(weights=torch.ones(2, 1, device=x.device), experts=torch.zeros(2, 1, dtype=torch.int32, device=x.device),
                   up_weight=torch.randn(1, 32, 16, device=x.device), down_weight=torch.randn(1, 16, 16, device=x.device),
                   up_bias=torch.randn(1, 32, device=x.device), down_bias=torch.randn(1, 16, device=x.device))
    try:
        moe_kernels.experts_forward(x, **tensors, backend="triton")
    except NotImplementedError:
        return False
    return True


def skip_unless_backend_runs(family: str, backend: str, dtype=torch.float32) -> None:
    skip_unless_runnable(backend)
    if backend == "triton" and family == "gpt_oss" and not triton_takes_biases():
        pytest.skip("backend 'triton' takes no expert biases yet (GPT-OSS needs them); this test passes once it does")


@pytest.fixture
def registered(request):
    """Registers moe_kernels under a test name for the requested backend; counts the experts calls."""
    backend = getattr(request, "param", "torch")
    name = hf.register(name=f"moe_kernels_test_{backend}", backend=backend)
    yield name
    hf.unregister(name)


@pytest.fixture
def experts_calls(monkeypatch):
    """A list that grows by one at every call of moe_kernels' experts (proof that the door was used)."""
    calls = []
    forward = experts_module.experts_forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(experts_module, "experts_forward", counting)
    return calls


def moe_layers(model) -> int:
    return sum(hasattr(module, "has_gate") for module in model.modules())


def test_import_of_moe_kernels_touches_no_transformers():
    # Registering needs transformers imported: a fresh interpreter without it has registered nothing.
    code = "import sys, moe_kernels\nassert 'transformers' not in sys.modules, 'import moe_kernels imported transformers'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=moe_kernels.__path__[0] + "/..")


def test_register_is_explicit_idempotent_and_reversible():
    assert hf.NAME not in ALL_EXPERTS_FUNCTIONS
    try:
        assert hf.register() == hf.NAME and hf.register() == hf.NAME
        assert hf.NAME in ALL_EXPERTS_FUNCTIONS
        model = build("mixtral")
        model.set_experts_implementation(hf.NAME)
        assert model.config._experts_implementation == hf.NAME
    finally:
        hf.unregister()
    assert hf.NAME not in ALL_EXPERTS_FUNCTIONS
    hf.unregister()  # nothing left to remove: no error


@pytest.mark.parametrize("name", ["eager", "grouped_mm", "batched_mm", ""])
def test_register_refuses_transformers_names(name):
    with pytest.raises(ValueError, match="name"):
        hf.register(name=name)


def test_register_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be"):
        hf.register(backend="cutlass")


# Every family on backend "torch"; backend "triton" (the interpreter here: slow) on a quick subset.
FAMILY_BACKENDS = [(family, "torch") for family in FAMILIES] + [
    (family, "triton") for family in families(quick=("mixtral", "gpt_oss"))]


@pytest.mark.parametrize("family,registered", FAMILY_BACKENDS, indirect=["registered"])
def test_float32_training_step_matches_eager(family, registered, experts_calls):
    skip_unless_backend_runs(family, registered.rsplit("_", 1)[1])
    model = build(family)
    ids = tokens()
    expected = train_step(model, ids)
    model.set_experts_implementation(registered)
    actual = train_step(model, ids)
    assert len(experts_calls) == moe_layers(model)
    assert "loss" in expected and "grad of lm_head.weight" in expected
    assert_matches(actual, expected, RELATIVE)


@pytest.mark.parametrize("registered", BACKENDS, indirect=True)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_blocks_match_eager_at_the_same_precision(family, registered, experts_calls):
    skip_unless_backend_runs(family, registered.rsplit("_", 1)[1], torch.bfloat16)
    model = build(family)
    blocks = [module for module in model.modules() if any(hasattr(child, "has_gate") for child in module.children())]
    assert blocks
    for index, block in enumerate(blocks):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(2, 16, model.config.hidden_size, dtype=torch.float64, generator=generator)
        dy = torch.randn(x.shape, dtype=torch.float64, generator=generator)
        exact = _block_step(block, x, dy, torch.float64, "eager")
        baseline = _block_step(block, x, dy, torch.bfloat16, "eager")
        actual = _block_step(block, x, dy, torch.bfloat16, registered)
        names = ["output", "grad of x"] + [f"grad of {name}" for name, _ in block.named_parameters()]
        for name, a, b, e, factor in zip(names, actual, baseline, exact, [2] + [3] * len(names)):
            assert_close(a, b, e, torch.bfloat16, factor, f"{family} block {index}: {name}")
    assert len(experts_calls) == len(blocks)


def _block_step(block, x, dy, dtype, implementation):
    """One MoE block (router + experts) in ``dtype``: its output, the gradient of x and of every parameter."""
    block = copy.deepcopy(block).to(dtype)
    for module in block.modules():
        if hasattr(module, "has_gate"):
            module.config._experts_implementation = implementation
    x = x.detach().to(dtype).requires_grad_()
    y = block(x)
    y = y[0] if isinstance(y, tuple) else y  # GPT-OSS returns (y, router_scores)
    (y.double() * dy).sum().backward()
    return [y.detach().double(), x.grad.double()] + [p.grad.double() for p in block.parameters()]


@pytest.mark.parametrize("family", families(quick=("qwen3_moe", "gpt_oss")))
def test_greedy_generate_gives_the_same_tokens(family, registered):
    model = build(family).eval()
    prompt = tokens(batch=2, length=5, seed=1)
    arguments = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **arguments)
    model.set_experts_implementation(registered)
    assert torch.equal(model.generate(prompt, **arguments), expected)


@pytest.mark.parametrize("family", families(quick=("gpt_oss",)))
def test_from_pretrained_with_experts_implementation_moe_kernels(family, registered, experts_calls, tmp_path):
    model = build(family).eval()
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, type(model).__name__).from_pretrained(tmp_path, experts_implementation=registered)
    assert loaded.config._experts_implementation == registered
    ids = tokens()
    with torch.no_grad():
        expected, actual = model(ids).logits, loaded.eval()(ids).logits
    assert experts_calls and relative_error(actual, expected) <= RELATIVE


def test_transposed_weights_are_views_not_copies():
    experts = next(module for module in build("gpt_oss").modules() if hasattr(module, "has_gate"))
    layout = hf.expert_layout(experts)
    assert layout.up_weight.data_ptr() == experts.gate_up_proj.data_ptr()
    assert layout.up_weight.shape == experts.gate_up_proj.transpose(1, 2).shape
    assert layout.up_weight.stride() == experts.gate_up_proj.transpose(1, 2).stride()
    assert layout.down_weight.data_ptr() == experts.down_proj.data_ptr()
    assert layout.up_bias is experts.gate_up_proj_bias and layout.down_bias is experts.down_proj_bias
    assert layout.activation.interleaved and layout.activation.limit == experts.limit


# A stand-alone experts class per layout, decorated like transformers' own; has_gate=False uses ReLU.
@pytest.mark.parametrize("has_gate", [True, False])
@pytest.mark.parametrize("is_transposed", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_layout_flags_match_transformers_batched_mm(has_gate, is_transposed, has_bias, registered):
    torch.manual_seed(has_gate * 4 + is_transposed * 2 + has_bias)
    num_experts, d, d_ff, num_tokens, k = 5, 12, 10, 9, 2

    @use_experts_implementation(is_transposed=is_transposed, has_bias=has_bias, has_gate=has_gate)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = num_experts
            n_up = 2 * d_ff if has_gate else d_ff
            up_shape, down_shape = ((num_experts, d, n_up), (num_experts, d_ff, d)) if is_transposed else \
                ((num_experts, n_up, d), (num_experts, d, d_ff))
            up = nn.Parameter(torch.randn(up_shape) / d**0.5)
            self.register_parameter("gate_up_proj" if has_gate else "up_proj", up)
            self.down_proj = nn.Parameter(torch.randn(down_shape) / d_ff**0.5)
            if has_bias:
                self.register_parameter("gate_up_proj_bias" if has_gate else "up_proj_bias", nn.Parameter(torch.randn(num_experts, n_up)))
                self.down_proj_bias = nn.Parameter(torch.randn(num_experts, d))
            self.act_fn = nn.SiLU() if has_gate else nn.ReLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the experts implementation must be dispatched, not this forward")

    config = types.SimpleNamespace(_experts_implementation="batched_mm", model_type="synthetic")
    module = Experts(config)
    x = torch.randn(num_tokens, d)
    index = torch.stack([torch.randperm(num_experts)[:k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, k)
    results = {}
    for implementation in ("batched_mm", registered):
        config._experts_implementation = implementation
        module.zero_grad(set_to_none=True)
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = module(xx, index, ww)
        (y * torch.linspace(-1, 1, d)).sum().backward()
        results[implementation] = [y.detach(), xx.grad, ww.grad] + [p.grad for p in module.parameters()]
    for expected, actual in zip(results["batched_mm"], results[registered]):
        assert relative_error(actual, expected) <= RELATIVE


@pytest.mark.parametrize("model_type,experts_class", [
    ("gpt_oss", "GptOssExperts"),  # transposed, interleaved gate/up, biases, clamped SwiGLU
    ("openai_privacy_filter", "OpenAIPrivacyFilterExperts"),  # the same gate on concatenated gate/up
])
def test_model_specific_gates_match_transformers_batched_mm(model_type, experts_class, registered):
    module_path = f"transformers.models.{model_type}.modeling_{model_type}"
    config = transformers.AutoConfig.for_model(model_type, hidden_size=16, intermediate_size=8, num_local_experts=3,
                                               swiglu_limit=1.0)
    torch.manual_seed(len(model_type))
    experts = getattr(__import__(module_path, fromlist=[experts_class]), experts_class)(config)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0.0, 0.5)
    x, index, weights = torch.randn(7, 16), torch.stack([torch.randperm(3)[:2] for _ in range(7)]), torch.rand(7, 2)
    results = {}
    for implementation in ("batched_mm", registered):
        config._experts_implementation = implementation
        experts.zero_grad(set_to_none=True)
        xx, ww = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = experts(xx, index, ww)
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        results[implementation] = [y.detach(), xx.grad, ww.grad] + [p.grad for p in experts.parameters()]
    for expected, actual in zip(results["batched_mm"], results[registered]):
        assert relative_error(actual, expected) <= RELATIVE


class _OwnGate(nn.Module):
    def _apply_gate(self, gate_up):
        return gate_up[..., ::2]


@pytest.mark.parametrize("change,named", [
    (dict(has_post_expert_norm=True), "has_post_expert_norm=True"),
    (dict(_is_expert_parallel=True), "_is_expert_parallel=True"),
    (dict(is_concatenated=False), "is_concatenated=False"),
    (dict(act_fn=transformers.activations.GELUTanh()), "GELUTanh"),
    (dict(__class__="own gate"), "_apply_gate"),
])
def test_unsupported_layouts_are_refused_by_name(change, named, registered):
    model = build("mixtral")
    model.set_experts_implementation(registered)
    experts = next(module for module in model.modules() if hasattr(module, "has_gate"))
    for attribute, value in change.items():
        if value == "own gate":
            value = type("OwnGateExperts", (type(experts),), {"_apply_gate": _OwnGate._apply_gate})
        setattr(experts, attribute, value)
    with pytest.raises(NotImplementedError, match=named) as error:
        model(tokens())
    assert "model_type 'mixtral'" in str(error.value) and "Experts" in str(error.value)
