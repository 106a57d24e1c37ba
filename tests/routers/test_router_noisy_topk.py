"""Noisy top-k gating ("noisy_topk") against Shazeer et al. (2017)'s formulas written out token by token in float64."""
import math

import pytest
import torch

from formulas import ranked, softmax
from moe_kernels import routers


def phi(value: float) -> float:
    return 0.5 * (1.0 + math.erf(value / math.sqrt(2.0)))




def cv_squared(values):
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return variance / (mean**2 + 1e-10)


def noisy_router(num_experts, k, **options):
    """float64, clean logits = x (weight = I) and noise logits = x·W_noiseᵀ with a random W_noise."""
    router = routers.build("noisy_topk", num_experts, num_experts, k, dtype=torch.float64, **options)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
        router.noise_weight.normal_()
    return router


@pytest.mark.parametrize("num_experts,k", [(4, 1), (6, 2), (5, 5), (12, 4)])
def test_training_matches_shazeer_formulas(num_experts, k):
    torch.manual_seed(num_experts + 100 * k)
    tokens, epsilon = 19, 1e-2
    router = noisy_router(num_experts, k, noise_epsilon=epsilon, importance_loss_weight=0.3, load_loss_weight=0.7)
    x = torch.randn(tokens, num_experts, dtype=torch.float64)
    torch.manual_seed(7)
    routing = router(x)
    torch.manual_seed(7)
    noise = torch.randn(tokens, num_experts).double()  # the forward's first draw, in float32
    raw_noise = x @ router.noise_weight.detach().t()

    importance, load = [0.0] * num_experts, [0.0] * num_experts
    for t in range(tokens):
        std = [math.log1p(math.exp(v)) + epsilon for v in raw_noise[t].tolist()]
        noisy = [c + n * s for c, n, s in zip(x[t].tolist(), noise[t].tolist(), std)]
        chosen = ranked(noisy)[:k]
        gates = softmax([noisy[e] for e in chosen])
        assert routing.experts[t].tolist() == chosen
        torch.testing.assert_close(routing.weights[t], torch.tensor(gates, dtype=torch.float64))
        for e, g in zip(chosen, gates):
            importance[e] += g
        for i in range(num_experts):
            others = sorted((noisy[j] for j in range(num_experts) if j != i), reverse=True)
            threshold = others[k - 1] if k - 1 < len(others) else -math.inf
            load[i] += phi((x[t, i].item() - threshold) / std[i])
    torch.testing.assert_close(routing.aux_loss.item(), 0.3 * cv_squared(importance) + 0.7 * cv_squared(load))


def test_evaluation_counts_assignments_and_ignores_noise():
    torch.manual_seed(4)
    router = noisy_router(6, 2, importance_loss_weight=0.0, load_loss_weight=1.0).eval()
    x = torch.randn(30, 6, dtype=torch.float64)
    state = torch.get_rng_state()
    routing = router(x)
    assert torch.equal(torch.get_rng_state(), state)  # no draw in evaluation
    top = torch.topk(x, 2).indices
    assert torch.equal(routing.experts.long(), top)
    torch.testing.assert_close(routing.weights, torch.softmax(torch.topk(x, 2).values, -1))
    counts = torch.bincount(top.flatten(), minlength=6).double()
    torch.testing.assert_close(routing.aux_loss, counts.var(unbiased=False) / (counts.mean() ** 2 + 1e-10))


@pytest.mark.parametrize("k", [2, 3])
def test_gradients_by_gradcheck(k):
    """Weights and the aux loss (smooth load with its thresholds) in x and both weights, with a fixed noise."""
    torch.manual_seed(6)
    router = routers.build("noisy_topk", 5, 3, k, dtype=torch.float64)
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)

    def outputs(x, weight, noise_weight):
        torch.manual_seed(0)
        routing = torch.func.functional_call(router, {"weight": weight, "noise_weight": noise_weight}, (x,))
        return routing.weights, routing.aux_loss

    assert torch.autograd.gradcheck(outputs, (x, router.weight, router.noise_weight))


def test_k_equal_to_experts_has_finite_gradients():
    """k = E makes the smooth load the constant T: no 0·inf."""
    router = routers.build("noisy_topk", 8, 3, 3)
    x = torch.randn(10, 8, requires_grad=True)
    routing = router(x)
    routing.aux_loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(router.weight.grad).all()


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(noise_epsilon=float("inf")), ValueError, "noise_epsilon must be a finite number >= 0.0, got inf"),
        (dict(noise_epsilon=None), TypeError, "noise_epsilon must be a finite number >= 0.0, got None"),
        (dict(noise_epsilon=-1.0), ValueError, "noise_epsilon must be a finite number >= 0.0, got -1.0"),
        (dict(importance_loss_weight=float("nan")), ValueError, "importance_loss_weight must be a finite number"),
        (dict(load_loss_weight=True), TypeError, "load_loss_weight must be a finite number >= 0.0, got True"),
    ],
)
def test_bad_options_name_the_option_and_the_value(options, error, message):
    with pytest.raises(error, match=message):
        routers.build("noisy_topk", 8, 4, 2, **options)
