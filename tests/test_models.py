"""The layers configured as the models people run, against transformers' own MoE blocks (tiny configs, the very
same weights): Mixtral, Qwen3-MoE / OLMoE (norm_topk_prob), Qwen2-MoE (shared expert behind a sigmoid gate),
GPT-OSS (router bias, expert biases, clamped interleaved SwiGLU), SwitchTransformers (expert_capacity per
sequence). Reference and fast layer (backend "torch") both; training mode with the routers' random draws off
(Switch in evaluation mode: transformers' Switch experts have dropout).

Tolerances: float32 within 1e-5 (the same math summed in another order; transformers' softmax routers compute in
float32 whatever the model's dtype, so float64 would only compare their rounding); GPT-OSS, whose router keeps
the model's dtype, in float64 within 1e-10.
"""
import pytest
import torch

import moe_kernels
from moe_kernels import reference

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP  # noqa: E402

LAYERS = (reference.MoE, moe_kernels.MoE)


def randomized(block, dtype=torch.float32):
    torch.manual_seed(0)
    block = block.to(dtype)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    return block


def compare(block, layer, x, tolerance, hf_output=lambda out: out):
    """y, x's gradient and, where parameter names and shapes agree, every parameter's gradient of (y·dy)."""
    dy = torch.randn_like(x)
    results = []
    for module, output in ((block, hf_output), (layer, lambda out: out)):
        leaf = x.clone().requires_grad_()
        y = output(module(leaf))
        ours = dict(layer.named_parameters())
        names = [name for name, p in block.named_parameters() if name in ours and ours[name].shape == p.shape]
        parameters = [module.get_parameter(name) for name in names]
        grads = torch.autograd.grad((y * dy).sum(), [leaf, *parameters], allow_unused=True)
        results.append((y, *[torch.zeros_like(p) if g is None else g for p, g in zip([leaf, *parameters], grads)]))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("layer_class", LAYERS)
def test_mixtral(layer_class):
    config = transformers.MixtralConfig(hidden_size=16, intermediate_size=12, num_local_experts=6, num_experts_per_tok=2)
    block = randomized(MixtralSparseMoeBlock(config))
    layer = layer_class(16, 12, 6, k=2, router="topk", renormalize=True, aux_loss_mode="manual")
    layer.load_state_dict(block.state_dict())
    compare(block, layer, torch.randn(2, 9, 16), 1e-5)


@pytest.mark.parametrize("layer_class", LAYERS)
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen3_moe_and_olmoe_norm_topk_prob(norm_topk_prob, layer_class):
    """Qwen3-MoE (OLMoE's block is the same): renormalize = norm_topk_prob, False by default there."""
    config = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=12, num_experts=8, num_experts_per_tok=3,
                                         norm_topk_prob=norm_topk_prob)
    block = randomized(Qwen3MoeSparseMoeBlock(config))
    layer = layer_class(16, 12, 8, k=3, renormalize=norm_topk_prob, aux_loss_mode="manual")
    layer.load_state_dict(block.state_dict())
    compare(block, layer, torch.randn(2, 9, 16), 1e-5)


@pytest.mark.parametrize("layer_class", LAYERS)
def test_qwen2_moe_shared_expert_behind_a_sigmoid_gate(layer_class):
    config = transformers.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                         num_experts=6, num_experts_per_tok=2)
    block = randomized(Qwen2MoeSparseMoeBlock(config))
    layer = layer_class(16, 12, 6, k=2, renormalize=config.norm_topk_prob, shared_d_ff=20, shared_expert_gate=True,
                        aux_loss_mode="manual")
    assert set(layer.state_dict()) == set(block.state_dict())  # Hugging Face's keys, unchanged
    layer.load_state_dict(block.state_dict())
    compare(block, layer, torch.randn(2, 9, 16), 1e-5)


@pytest.mark.parametrize("layer_class", LAYERS)
def test_gpt_oss(layer_class):
    """Router bias, top-k on the logits then softmax over the k; expert biases; clamped SwiGLU, gate/up
    interleaved; transformers stores the expert weights transposed ([E, d, 2·d_ff], [E, d_ff, d])."""
    config = transformers.GptOssConfig(hidden_size=16, intermediate_size=12, num_local_experts=6, num_experts_per_tok=2)
    block = randomized(GptOssMLP(config), torch.float64)
    with torch.no_grad():
        block.experts.gate_up_proj.mul_(4.0)  # pre-activations past the clamp limit 7
    layer = layer_class(16, 12, 6, k=2, router="topk", bias=True, renormalize=True, activation="gpt_oss_swiglu",
                        expert_bias=True, aux_loss_mode="manual", dtype=torch.float64)
    hf = block.state_dict()
    layer.load_state_dict({
        "gate.weight": hf["router.weight"], "gate.bias": hf["router.bias"],
        "experts.gate_up_proj": hf["experts.gate_up_proj"].transpose(1, 2),
        "experts.gate_up_proj_bias": hf["experts.gate_up_proj_bias"],
        "experts.down_proj": hf["experts.down_proj"].transpose(1, 2), "experts.down_proj_bias": hf["experts.down_proj_bias"],
    })  # fmt: skip
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    compare(block, layer, x, 1e-10, hf_output=lambda out: out[0])
    assert (block.experts.gate_up_proj.abs().amax() * x.abs().amax()) > 7  # the clamp was exercised


@pytest.mark.parametrize("layer_class", LAYERS)
@pytest.mark.parametrize("expert_capacity", [1, 2, 64])
def test_switch_transformers_expert_capacity_per_sequence(expert_capacity, layer_class):
    """HF's rule: in each sequence an expert takes its first expert_capacity tokens; the rest output 0."""
    config = transformers.SwitchTransformersConfig(d_model=16, d_ff=12, num_experts=4, expert_capacity=expert_capacity,
                                                   router_bias=True, router_jitter_noise=0.0)
    block = randomized(SwitchTransformersSparseMLP(config), torch.float32).eval()  # no dropout in its experts
    layer = layer_class(16, 12, 4, k=1, router="switch", bias=True, activation="relu", expert_capacity=expert_capacity,
                        aux_loss_mode="manual")
    experts = [block.experts[f"expert_{e}"] for e in range(4)]
    layer.load_state_dict({
        "gate.weight": block.router.classifier.weight, "gate.bias": block.router.classifier.bias,
        "experts.up_proj": torch.stack([expert.wi.weight for expert in experts]),
        "experts.down_proj": torch.stack([expert.wo.weight for expert in experts]),
    })  # fmt: skip
    x = torch.randn(3, 10, 16)
    compare(block, layer, x, 1e-5)
    expected = block(x)
    if expert_capacity == 1:
        assert ((expected == 0).all(-1).sum(-1) >= 10 - 4).all()  # at most E tokens per sequence kept
