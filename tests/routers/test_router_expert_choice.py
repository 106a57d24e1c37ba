"""Expert-choice routing ("expert_choice", Zhou et al. 2022) against its definition written out expert by expert
in float64, its gradients by gradcheck, and the layer (the same grouped GEMMs) against the reference loop."""
import copy
import math

import pytest
import torch

import moe_kernels
from helpers import BACKENDS, assert_layer_matches, device_for, layer_triplet, randomize_, skip_unless_runnable
from moe_kernels import reference, routers


@pytest.mark.parametrize("num_tokens,num_experts,k", [(0, 4, 2), (1, 4, 2), (13, 4, 1), (13, 4, 2), (20, 8, 8), (7, 16, 3)])
def test_matches_the_definition(num_tokens, num_experts, k):
    torch.manual_seed(num_tokens + 10 * num_experts + k)
    router = routers.build("expert_choice", num_experts, num_experts, k, dtype=torch.float64)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))  # logits = x
    x = torch.cat([torch.randn(num_tokens - num_tokens // 2, num_experts), torch.randint(-1, 2, (num_tokens // 2, num_experts))]).double()
    routing = router(x)
    capacity = min(num_tokens, math.ceil(k * num_tokens / num_experts))
    assert routing.expert_tokens.shape == (num_experts, capacity) and routing.expert_tokens.dtype == torch.int32
    assert routing.weights.shape == routing.experts.shape == (num_tokens, num_experts)
    scores = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in x.tolist()]
    for e in range(num_experts):
        ranked = sorted(range(num_tokens), key=lambda t: (-scores[t][e], t))[:capacity]
        assert routing.expert_tokens[e].tolist() == sorted(ranked)
        for t in range(num_tokens):
            gate = scores[t][e] if t in ranked else 0.0
            assert routing.weights[t, e].item() == pytest.approx(gate, rel=1e-12, abs=1e-15)
            assert routing.experts[t, e].item() == e
    assert routing.aux_loss.item() == 0.0


def test_gradients_by_gradcheck():
    torch.manual_seed(2)
    router = routers.build("expert_choice", 5, 4, 2, dtype=torch.float64)
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)

    def outputs(x, weight):
        routing = torch.func.functional_call(router, {"weight": weight}, (x,))
        return routing.weights, routing.logits

    assert torch.autograd.gradcheck(outputs, (x, router.weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation,k,tokens", [("swiglu", 2, 33), ("relu", 1, 7), ("gelu", 6, 20)])
def test_layer_matches_reference(activation, k, tokens, dtype, backend):
    """The experts' choices through the unchanged grouped GEMMs and combine of each backend."""
    skip_unless_runnable(backend)
    torch.manual_seed(tokens + k)
    layers = layer_triplet(dtype, backend=backend, d_model=12, d_ff=10, num_experts=6, k=k, router="expert_choice",
                           activation=activation)
    device = device_for(backend)
    assert_layer_matches(*[layer.to(device) for layer in layers], torch.randn(tokens, 12), dtype)


def test_layer_gradcheck_float64():
    torch.manual_seed(5)
    layer = randomize_(moe_kernels.MoE(6, 5, 4, k=2, router="expert_choice", backend="torch")).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *_: layer(x), (x, *layer.parameters()), fast_mode=True)


def test_layer_refuses_capacities():
    for arguments in (dict(capacity_factor=1.0), dict(expert_capacity=3)):
        with pytest.raises(ValueError, match="router 'expert_choice' lets each expert choose its tokens"):
            reference.MoE(8, 6, 4, router="expert_choice", **arguments)


def test_a_token_may_get_no_expert_or_several():
    torch.manual_seed(0)
    base = randomize_(reference.MoE(4, 6, 4, k=1, router="expert_choice"))
    with torch.no_grad():
        base.gate.weight.copy_(torch.eye(4))
    fast = moe_kernels.MoE.from_reference(copy.deepcopy(base), backend="torch")
    x = torch.zeros(8, 4)
    x[1:, 0] = 5.0 + torch.linspace(-1, 1, 7)  # tokens 1-7 lean to expert 0; token 0 is even (0.25 each)
    routing = base.gate(x)  # C = ceil(1·8/4) = 2 tokens per expert
    assert (routing.weights[0, 1:] > 0).all()  # experts 1-3 all take token 0
    assert (routing.weights[2:6] == 0).all()  # tokens 2-5 get no expert (1 is second for experts 1-3)
    torch.testing.assert_close(fast(x), base(x))
