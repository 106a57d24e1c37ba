"""The routers and losses of routing.py, and the reference's capacity rule, against formulas written
out token by token in float64 (Shazeer et al. 2017; Fedus et al. 2021; ST-MoE)."""
import math

import pytest
import torch

from moe_kernels import routing
from moe_kernels.reference import kept_assignments


def _phi(value: float) -> float:
    return 0.5 * (1.0 + math.erf(value / math.sqrt(2.0)))


def _softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _ranked(scores):
    """Expert ids by descending score, ties to the lower id."""
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))


def _cv_squared(values):
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return variance / (mean**2 + 1e-10)


@pytest.mark.parametrize("num_experts,k", [(4, 1), (6, 2), (5, 5), (16, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_matches_token_by_token_formula(num_experts, k, renormalize):
    torch.manual_seed(num_experts * 10 + k)
    logits = torch.randn(23, num_experts, dtype=torch.float64) * 2
    result = routing.topk(logits, k, renormalize)
    probability_sum = [0.0] * num_experts
    for t, row in enumerate(logits.tolist()):
        probabilities = _softmax(row)
        chosen = _ranked(probabilities)[:k]
        gates = [probabilities[e] for e in chosen]
        if renormalize:
            gates = [g / sum(gates) for g in gates]
        assert result.experts[t].tolist() == chosen
        torch.testing.assert_close(result.weights[t], torch.tensor(gates, dtype=torch.float64))
        torch.testing.assert_close(result.logsumexp[t].item(), max(row) + math.log(sum(math.exp(v - max(row)) for v in row)))
        probability_sum = [s + p for s, p in zip(probability_sum, probabilities)]
    torch.testing.assert_close(result.probability_sum, torch.tensor(probability_sum, dtype=torch.float64))
    assert result.experts.dtype == torch.int32


def test_switch_is_top1_probability():
    torch.manual_seed(2)
    logits = torch.randn(17, 7, dtype=torch.float64)
    result = routing.switch(logits)
    probabilities = torch.softmax(logits, -1)
    assert result.experts.shape == (17, 1)
    torch.testing.assert_close(result.weights[:, 0], probabilities.max(-1).values)
    assert torch.equal(result.experts[:, 0].long(), probabilities.argmax(-1))


def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert routing.topk(logits, 2).experts.tolist() == [[1, 2]]


@pytest.mark.parametrize("num_experts,k", [(4, 1), (6, 2), (5, 5), (12, 4)])
def test_noisy_topk_matches_shazeer_formulas(num_experts, k):
    torch.manual_seed(num_experts + 100 * k)
    tokens, epsilon = 19, 1e-2
    clean = torch.randn(tokens, num_experts, dtype=torch.float64)
    raw_noise = torch.randn(tokens, num_experts, dtype=torch.float64)
    noise = torch.randn(tokens, num_experts, dtype=torch.float64)
    result = routing.noisy_topk(clean, raw_noise, k, noise, epsilon)

    importance, load = [0.0] * num_experts, [0.0] * num_experts
    for t in range(tokens):
        std = [math.log1p(math.exp(v)) + epsilon for v in raw_noise[t].tolist()]
        noisy = [c + n * s for c, n, s in zip(clean[t].tolist(), noise[t].tolist(), std)]
        chosen = _ranked(noisy)[:k]
        gates = _softmax([noisy[e] for e in chosen])
        assert result.experts[t].tolist() == chosen
        torch.testing.assert_close(result.weights[t], torch.tensor(gates, dtype=torch.float64))
        for e, g in zip(chosen, gates):
            importance[e] += g
        for i in range(num_experts):
            others = sorted((noisy[j] for j in range(num_experts) if j != i), reverse=True)
            threshold = others[k - 1] if k - 1 < len(others) else -math.inf
            load[i] += _phi((clean[t, i].item() - threshold) / std[i])
    torch.testing.assert_close(result.importance, torch.tensor(importance, dtype=torch.float64))
    torch.testing.assert_close(result.load, torch.tensor(load, dtype=torch.float64))

    loss = routing.router_loss(result, "noisy_topk", k, routing.LossWeights(importance=0.3, load=0.7))
    torch.testing.assert_close(loss.item(), 0.3 * _cv_squared(importance) + 0.7 * _cv_squared(load))


def test_noisy_topk_eval_counts_assignments_and_ignores_noise():
    torch.manual_seed(4)
    clean = torch.randn(30, 6, dtype=torch.float64)
    result = routing.noisy_topk(clean, torch.randn(30, 6, dtype=torch.float64), 2, noise=None)
    top = torch.topk(clean, 2).indices
    assert torch.equal(result.experts.long(), top)
    torch.testing.assert_close(result.weights, torch.softmax(torch.topk(clean, 2).values, -1))
    torch.testing.assert_close(result.load, torch.bincount(top.flatten(), minlength=6).double())


@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1)])
def test_balance_and_z_loss(router, k):
    torch.manual_seed(9)
    tokens, num_experts = 25, 6
    logits = torch.randn(tokens, num_experts, dtype=torch.float64)
    result = routing.switch(logits) if router == "switch" else routing.topk(logits, k)
    weights = routing.LossWeights(balance=0.2, z=0.05)
    loss = routing.router_loss(result, router, k, weights)
    counts = [0] * num_experts
    for row in result.experts.tolist():
        for e in row:
            counts[e] += 1
    probabilities = torch.softmax(logits, -1).mean(0).tolist()
    balance = num_experts * sum(c / (tokens * k) * p for c, p in zip(counts, probabilities))
    z = sum(torch.logsumexp(logits[t], 0).item() ** 2 for t in range(tokens)) / tokens
    torch.testing.assert_close(loss.item(), 0.2 * balance + 0.05 * z)


def test_capacity_keeps_first_assignments_in_slot_major_order():
    experts = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0]], dtype=torch.int32)
    # Slot-major stream: slot 0 tokens 0..4 → experts 0,0,1,0,2; then slot 1 → 1,2,0,1,0.
    kept = kept_assignments(experts, 3, capacity=2)
    expected = [[True, True], [True, True], [True, False], [False, False], [True, False]]
    assert kept.tolist() == expected
    assert kept_assignments(experts, 3, capacity=None).all()
