"""DeepSeek-V2/V3 routing ("deepseek") against its definition written out token by token in float64, its gradients
by gradcheck, and the whole layer (routed and shared experts) against transformers' DeepseekV3MoE and
DeepseekV2Moe blocks with the same weights (float32 within 1e-5: transformers routes in float32)."""
import math

import pytest
import torch

import moe_kernels
from moe_kernels import reference, routers


def ranked(values, ids):
    """ids by descending value, ties to the lower id."""
    return sorted(ids, key=lambda i: (-values[i], i))


def expected_routing(logits, bias, k, scoring, n_group, topk_group, group_score, renormalize, scale):
    """(experts, weights) of one token, written out from the definition."""
    num_experts = len(logits)
    if scoring == "sigmoid":
        scores = [1 / (1 + math.exp(-v)) for v in logits]
    else:
        scores = [math.exp(v - max(logits)) / sum(math.exp(u - max(logits)) for u in logits) for v in logits]
    choice = [s + b for s, b in zip(scores, bias)]
    size = num_experts // n_group
    groups = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]
    if group_score == "top2_sum":
        group_values = [sum(sorted((choice[e] for e in group), reverse=True)[:2]) for group in groups]
    else:
        group_values = [max(choice[e] for e in group) for group in groups]
    kept = ranked(group_values, range(n_group))[:topk_group]
    candidates = [e for g in kept for e in groups[g]]
    experts = ranked(choice, candidates)[:k]
    weights = [scores[e] for e in experts]
    if renormalize:
        weights = [w / (sum(weights) + 1e-20) for w in weights]
    return experts, [w * scale for w in weights]


CASES = [  # (E, k, scoring, n_group, topk_group, group_score, renormalize, scale, correction_bias)
    (8, 2, "sigmoid", 1, 1, "top2_sum", True, 1.0, True),
    (16, 4, "sigmoid", 4, 2, "top2_sum", True, 2.5, True),  # DeepSeek-V3's shape of routing
    (16, 3, "sigmoid", 8, 3, "top2_sum", False, 1.5, False),
    (12, 3, "softmax", 4, 2, "max", False, 1.0, False),  # DeepSeek-V2 group_limited_greedy
    (12, 12, "softmax", 3, 3, "max", True, 1.0, True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_token_by_token_definition(case):
    num_experts, k, scoring, n_group, topk_group, group_score, renormalize, scale, correction_bias = case
    torch.manual_seed(num_experts + k)
    router = routers.build("deepseek", num_experts, num_experts, k, scoring=scoring, n_group=n_group, topk_group=topk_group,
                           group_score=group_score, renormalize=renormalize, routed_scaling_factor=scale,
                           correction_bias=correction_bias, balance_loss_weight=0.3, dtype=torch.float64)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))  # logits = x
        if correction_bias:
            router.e_score_correction_bias.normal_(0, 0.3)
    bias = router.e_score_correction_bias.tolist() if correction_bias else [0.0] * num_experts
    x = torch.cat([torch.randn(20, num_experts), torch.randint(-1, 2, (6, num_experts)).float()]).double()
    routing = router(x)
    counts, normalized_sum = [0] * num_experts, [0.0] * num_experts
    for t, row in enumerate(x.tolist()):
        experts, weights = expected_routing(row, bias, k, scoring, n_group, topk_group, group_score, renormalize, scale)
        assert routing.experts[t].tolist() == experts
        torch.testing.assert_close(routing.weights[t], torch.tensor(weights, dtype=torch.float64))
        for e in experts:
            counts[e] += 1
        scores = torch.sigmoid(x[t]) if scoring == "sigmoid" else torch.softmax(x[t], -1)
        normalized_sum = [a + b for a, b in zip(normalized_sum, (scores / scores.sum()).tolist())]
    tokens = x.shape[0]
    balance = num_experts * sum(c / (tokens * k) * p / tokens for c, p in zip(counts, normalized_sum))
    torch.testing.assert_close(routing.aux_loss.item(), 0.3 * balance)


def test_gradients_by_gradcheck():
    torch.manual_seed(1)
    router = routers.build("deepseek", 6, 8, 3, n_group=4, topk_group=2, routed_scaling_factor=2.0, balance_loss_weight=0.1,
                           dtype=torch.float64)
    with torch.no_grad():
        router.e_score_correction_bias.normal_()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)

    def outputs(x, weight):
        routing = torch.func.functional_call(router, {"weight": weight}, (x,))
        return routing.weights, routing.aux_loss

    assert torch.autograd.gradcheck(outputs, (x, router.weight))


def test_the_correction_bias_moves_the_choice_not_the_weights():
    router = routers.build("deepseek", 4, 4, 1, dtype=torch.float64)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    routing = router(torch.tensor([[2.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert routing.experts.tolist() == [[3]]
    torch.testing.assert_close(routing.weights, torch.tensor([[1.0]], dtype=torch.float64))  # renormalised s_3
    assert "gate.e_score_correction_bias" in reference.MoE(4, 6, 4, k=1, router="deepseek").state_dict()


@pytest.mark.parametrize("layer_class", [reference.MoE, moe_kernels.MoE])
@pytest.mark.parametrize("version", ["v3", "v2"])
def test_layer_matches_transformers(version, layer_class):
    transformers = pytest.importorskip("transformers")
    if version == "v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block

        config = transformers.DeepseekV3Config(hidden_size=16, moe_intermediate_size=6, n_routed_experts=16, n_group=4,
                                               topk_group=2, num_experts_per_tok=4, n_shared_experts=2, routed_scaling_factor=2.5)
        options = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Block

        config = transformers.DeepseekV2Config(hidden_size=16, num_attention_heads=4, moe_intermediate_size=6,
                                               n_routed_experts=16, n_group=4,
                                               topk_group=2, num_experts_per_tok=4, n_shared_experts=2,
                                               topk_method="group_limited_greedy", routed_scaling_factor=1.5)
        options = dict(scoring="softmax", correction_bias=False, group_score="max", renormalize=False, n_group=4,
                       topk_group=2, routed_scaling_factor=1.5)
    torch.manual_seed(0)
    block = Block(config)
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            tensor.normal_(0.0, 0.3 if "bias" in name else tensor.shape[-1] ** -0.5)
    layer = layer_class(16, 6, 16, k=4, router="deepseek", shared_d_ff=12, aux_loss_mode="manual", **options)
    assert set(layer.state_dict()) == set(block.state_dict())  # Hugging Face's keys, unchanged
    layer.load_state_dict(block.state_dict())
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(scoring="relu"), r"scoring must be one of \('sigmoid', 'softmax'\), got 'relu'"),
        (dict(n_group=3), "n_group must divide num_experts=8, got n_group=3"),
        (dict(n_group=4, topk_group=5), "topk_group must be at most n_group=4, got topk_group=5"),
        (dict(n_group=4, topk_group=1), r"k=3 exceeds the topk_group·E/n_group = 2 experts"),
        (dict(n_group=8, topk_group=4), "group_score 'top2_sum' needs groups of 2 or more experts"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be a finite number > 0.0, got 0.0"),
        (dict(renormalize=1), "renormalize must be a bool, got 1"),
    ],
)
def test_bad_options_name_the_option_and_the_value(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        routers.build("deepseek", 8, 8, 3, **options)
