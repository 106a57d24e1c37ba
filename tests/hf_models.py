"""Tiny random Hugging Face MoE models, one per family, built from configs (no hub), for the transformers tests.

``HF_FULL=1`` in the environment runs every family × backend; otherwise the tests run a representative
subset (``quick``) so that CI stays fast.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers integration tests need transformers 5.x")

FULL = os.environ.get("HF_FULL") == "1"
VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# family: (config class name, model class name, config arguments beyond COMMON)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=16,
                       num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
                       head_dim=8, decoder_sparse_step=1, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=5, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                         routed_scaling_factor=2.5, num_key_value_heads=4)),
    # swiglu_limit small enough that the clamps act on O(1) pre-activations
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, swiglu_limit=1.5,
                     sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
QUICK = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")


def families(quick=QUICK):
    """The families a test runs: all under HF_FULL=1, else ``quick``."""
    return list(FAMILIES) if FULL else list(quick)


def build(family: str, experts_implementation: str = "eager", dtype=torch.float32, seed: int | None = None):
    """A tiny random model of ``family`` in train mode, parameters (and DeepSeek's correction bias) drawn fresh
    at a scale that keeps activations O(1) and routing far from ties."""
    config_name, model_name, arguments = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **arguments})
    config._experts_implementation = experts_implementation
    torch.manual_seed(zlib.crc32(family.encode()) if seed is None else seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dim() >= 2:
                tensor.normal_(0.0, config.hidden_size**-0.5)
            elif name.endswith("bias") or "e_score_correction_bias" in name:
                tensor.normal_(0.0, 0.1)
            elif tensor.is_floating_point() and name.endswith("weight"):  # norms
                tensor.normal_(1.0, 0.1)
    return model.to(dtype).train()


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def build_switch(dtype=torch.float32, seed: int = 0, **overrides):
    """A tiny random SwitchTransformersForConditionalGeneration (encoder-decoder; its experts are not on
    transformers' ExpertsInterface): every encoder layer sparse, every second decoder layer."""
    arguments = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=4,
                     num_experts=4, expert_capacity=3, encoder_sparse_step=1, decoder_sparse_step=2, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(
        transformers.SwitchTransformersConfig(**{**arguments, **overrides}))
    return model.to(dtype).train()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-30)).item()


def train_step(model, ids) -> dict[str, torch.Tensor]:
    """Forward with ``output_router_logits`` and one cross-entropy backward (plus the model's own aux losses).

    Returns every tensor to compare, by name: logits, loss, each ``*_loss`` the model reports (aux, z), each
    router-logits tensor it reports, and each parameter's gradient ("grad of <state-dict key>").
    """
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    results = {"logits": out.logits.detach()}
    for field, value in out.items():
        if field.endswith("loss") and isinstance(value, torch.Tensor):
            results[field] = value.detach()
        elif field.endswith("router_logits") and value is not None:
            tensors = [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
            results.update({f"{field}[{i}]": t.detach() for i, t in enumerate(tensors)})
    results.update({f"grad of {key}": grad for key, grad in gradients(model).items()})
    return results


def gradients(model) -> dict[str, torch.Tensor]:
    """Each parameter's gradient under its state-dict key, which a swapped model keeps as Hugging Face's even where
    its layers name or stack the Parameters otherwise (GPT-OSS's router, SwitchTransformers' experts): the state
    dict of the model with every parameter's data set to its gradient for the call. Parameters without a gradient
    are left out."""
    parameters = [parameter for parameter in model.parameters() if parameter.grad is not None]
    values = [parameter.data for parameter in parameters]
    with torch.no_grad():  # the keys that hold these parameters: those that turn NaN with them
        for parameter in parameters:
            parameter.data = torch.full_like(parameter, float("nan"))
        keys_with_grads = {key for key, value in model.state_dict().items() if value.isnan().any()}
        for parameter in parameters:
            parameter.data = parameter.grad
        state = model.state_dict()
        for parameter, value in zip(parameters, values):
            parameter.data = value
    return {key: value.clone() for key, value in state.items() if key in keys_with_grads}


def assert_matches(actual: dict, expected: dict, relative: float) -> None:
    """The same names, and each tensor within ``relative`` (max |a − e| / max |e|) of the expected one."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if value.is_floating_point():
            error = relative_error(actual[name], value)
            assert error <= relative, f"{name}: relative error {error:.3g} > {relative}"
        else:
            assert torch.equal(actual[name], value), name
