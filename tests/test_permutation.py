"""Backend "torch"'s permutation against the layout of pipeline.py, built assignment by assignment."""
import pytest
import torch

from moe_kernels.backends.pytorch import permute


def expected_permutation(experts, num_experts, capacity):
    """Walk the assignments in slot-major order and deal each one the next row of its expert."""
    num_tokens, k = experts.shape
    kept_rows = [[] for _ in range(num_experts)]
    for slot in range(k):
        for token in range(num_tokens):
            expert = experts[token, slot].item()
            if capacity is None or len(kept_rows[expert]) < capacity:
                kept_rows[expert].append(token * k + slot)
    counts = [len(rows) for rows in kept_rows]
    offsets = [sum(counts[:e]) for e in range(num_experts + 1)]
    sorted_assignments = [a for rows in kept_rows for a in rows]
    sorted_assignments += [-1] * (num_tokens * k - len(sorted_assignments))
    sorted_rows = [-1] * (num_tokens * k)
    for row, assignment in enumerate(sorted_assignments):
        if assignment >= 0:
            sorted_rows[assignment] = row
    return counts, offsets, sorted_rows, sorted_assignments


@pytest.mark.parametrize("num_tokens,k,num_experts", [(0, 2, 4), (1, 1, 3), (37, 2, 5), (50, 8, 64), (20, 4, 4)])
@pytest.mark.parametrize("capacity", [None, 1, 7])
@pytest.mark.parametrize("skew", [False, True])
def test_permutation_layout(num_tokens, k, num_experts, capacity, skew):
    torch.manual_seed(num_tokens + k + num_experts)
    scores = torch.rand(num_tokens, num_experts)
    if skew:
        scores[:, 0] += 2.0
    experts = scores.topk(k, dim=-1).indices.to(torch.int32)
    permutation = permute(experts, num_experts, capacity)
    counts, offsets, sorted_rows, sorted_assignments = expected_permutation(experts, num_experts, capacity)
    assert permutation.tokens_per_expert.tolist() == counts
    assert permutation.expert_offsets.tolist() == offsets
    assert permutation.sorted_rows.flatten().tolist() == sorted_rows
    assert permutation.sorted_assignments.tolist() == sorted_assignments
    assert all(t.dtype == torch.int32 for t in permutation)
