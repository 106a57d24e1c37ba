"""Softmax top-k routing ("topk"; Mixtral, Qwen, OLMoE, GPT-OSS with bias) against formulas written out token by
token in float64 (Fedus et al. 2021; ST-MoE); its gradients by gradcheck; its fused kernel against it."""
import math

import pytest
import torch

from formulas import ranked, softmax
from moe_kernels import routers
from moe_kernels.routers.softmax_topk import SoftmaxTopK




def identity_router(num_experts, k, **options):
    """A float64 router whose logits are its input (weight = I), so tests choose the logits."""
    router = routers.build("topk", num_experts, num_experts, k, dtype=torch.float64, **options)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


@pytest.mark.parametrize("num_experts,k", [(4, 1), (6, 2), (5, 5), (16, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_token_by_token_formula(num_experts, k, renormalize, bias):
    torch.manual_seed(num_experts * 10 + k)
    router = identity_router(num_experts, k, renormalize=renormalize, bias=bias, balance_loss_weight=0.2, z_loss_weight=0.05)
    if bias:
        with torch.no_grad():
            router.bias.normal_()
    x = torch.randn(23, num_experts, dtype=torch.float64) * 2
    routing = router(x)
    b = router.bias.tolist() if bias else [0.0] * num_experts
    counts, probability_sum, z = [0] * num_experts, [0.0] * num_experts, 0.0
    for t, row in enumerate(x.tolist()):
        logits = [v + c for v, c in zip(row, b)]
        probabilities = softmax(logits)
        chosen = ranked(logits)[:k]  # GPT-OSS: top-k on the (biased) logits
        gates = [probabilities[e] for e in chosen]
        if renormalize:  # = the softmax over the k chosen logits
            gates = [g / sum(gates) for g in gates]
        assert routing.experts[t].tolist() == chosen
        torch.testing.assert_close(routing.weights[t], torch.tensor(gates, dtype=torch.float64))
        for e in chosen:
            counts[e] += 1
        probability_sum = [s + p for s, p in zip(probability_sum, probabilities)]
        z += (max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))) ** 2
    tokens = x.shape[0]
    balance = num_experts * sum(c / (tokens * k) * p / tokens for c, p in zip(counts, probability_sum))
    torch.testing.assert_close(routing.aux_loss.item(), 0.2 * balance + 0.05 * z / tokens)
    assert routing.experts.dtype == torch.int32


def test_ties_go_to_the_lower_expert():
    router = identity_router(5, 2)
    assert router(torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], dtype=torch.float64)).experts.tolist() == [[1, 2]]


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradients_by_gradcheck(renormalize):
    """Weights, logits and the aux loss, differentiated in x, the weight and the bias (float64, exact routing)."""
    torch.manual_seed(3)
    router = routers.build("topk", 6, 5, 2, dtype=torch.float64, renormalize=renormalize, bias=True)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)

    def outputs(x, weight, bias):
        routing = torch.func.functional_call(router, {"weight": weight, "bias": bias}, (x,))
        return routing.weights, routing.logits, routing.aux_loss

    assert torch.autograd.gradcheck(outputs, (x, router.weight, router.bias))


def test_empty_batch_has_zero_loss():
    routing = routers.build("topk", 8, 4, 2)(torch.randn(0, 8))
    assert routing.weights.shape == (0, 2) and routing.aux_loss.item() == 0.0


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_kernel_equals_the_definition(renormalize):
    """The hook the layer uses on backend "triton": same ids, same weights, same gradients."""
    pytest.importorskip("triton")
    torch.manual_seed(4)
    router = routers.build("topk", 12, 16, 4, renormalize=renormalize)
    x = torch.cat([torch.randn(30, 12), torch.randint(-1, 2, (30, 12)).float()])  # random and tied logits
    fused, plain = router(x, use_kernel="triton"), router(x)
    assert torch.equal(fused.experts, plain.experts)
    torch.testing.assert_close(fused.weights, plain.weights)
    grad = torch.randn_like(plain.weights)
    for a, b in zip(torch.autograd.grad(fused.weights, router.weight, grad), torch.autograd.grad(plain.weights, router.weight, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(renormalize="no"), TypeError, "renormalize must be a bool, got 'no'"),
        (dict(bias=1), TypeError, "bias must be a bool, got 1"),
        (dict(z_loss_weight="x"), TypeError, "z_loss_weight must be a finite number >= 0.0, got 'x'"),
        (dict(balance_loss_weight=float("nan")), ValueError, "balance_loss_weight must be a finite number >= 0.0, got nan"),
        (dict(balance_loss_weight=-0.1), ValueError, "balance_loss_weight must be a finite number >= 0.0, got -0.1"),
    ],
)
def test_bad_options_name_the_option_and_the_value(options, error, message):
    with pytest.raises(error, match=message):
        SoftmaxTopK(8, 4, 2, **options)
