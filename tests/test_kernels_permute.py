"""The Triton permutation against backend "torch"'s permute, under the interpreter on the CPU.

With block_m = 1 the kernel must equal backends/pytorch.py's permute exactly; with block_m > 1 the reference
is that same permutation with every segment moved to start at a multiple of block_m (pipeline's layout).
Everything is int32, so every comparison is exact.
"""
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="the permutation kernels need Triton")

from helpers import padded_permutation  # noqa: E402
from moe_kernels.backends.pytorch import permute as torch_permute  # noqa: E402
from moe_kernels.kernels.permute import permute  # noqa: E402
from moe_kernels.pipeline import Permutation, expert_capacity, num_sorted_rows  # noqa: E402

# (T, E, k): T = 0 and 1, odd sizes, k = 1, k = E, E up to 256 and k up to 8, more than one chunk.
SHAPES = [
    (0, 4, 2),
    (1, 1, 1),
    (1, 2, 2),
    (5, 3, 3),
    (200, 2, 1),
    (300, 7, 2),
    (300, 64, 8),
    (129, 256, 8),
]


def _experts(num_tokens, num_experts, k, data, seed):
    """[T, k] int32 ids: "distinct" per token as a router gives them, "skewed" (expert 0 in every token, the
    last in none when k < E), or "repeats" (ids drawn independently, a token may repeat one)."""
    generator = torch.Generator().manual_seed(seed)
    if data == "repeats":
        return torch.randint(0, num_experts, (num_tokens, k), generator=generator, dtype=torch.int32)
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    if data == "skewed":
        scores[:, 0] = 2.0
        scores[:, -1] = -1.0
    return scores.argsort(dim=1, descending=True)[:, :k].to(torch.int32)


def _reference(experts, num_experts, capacity, block_m):
    """backend "torch"'s permutation with each expert's segment moved to start at a multiple of block_m."""
    return padded_permutation(torch_permute(experts, num_experts, capacity), block_m)


def _assert_equal(result, expected):
    for name in Permutation._fields:
        actual, wanted = getattr(result, name), getattr(expected, name)
        assert actual.dtype == torch.int32, name
        assert torch.equal(actual, wanted), f"{name}:\n{actual}\n!=\n{wanted}"


@pytest.mark.parametrize("num_tokens,num_experts,k", SHAPES)
@pytest.mark.parametrize("data", ["distinct", "skewed", "repeats"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.25])
@pytest.mark.parametrize("block_m", [1, 16])
def test_permute_matches_torch(num_tokens, num_experts, k, data, capacity_factor, block_m, poisoned_allocations):
    experts = _experts(num_tokens, num_experts, k, data, zlib.crc32(repr((num_tokens, num_experts, k, data)).encode()))
    capacity = expert_capacity(capacity_factor, num_tokens, k, num_experts)

    result = permute(experts, num_experts, capacity, block_m)

    _assert_equal(result, _reference(experts, num_experts, capacity, block_m))
    assert result.sorted_assignments.shape == (num_sorted_rows(num_tokens, k, num_experts, block_m),)
    assert (result.expert_offsets % block_m == 0).all()
    if data == "skewed" and num_tokens > 0 and capacity is None:
        assert result.tokens_per_expert[0] == num_tokens
        assert k == num_experts or result.tokens_per_expert[-1] == 0


@pytest.mark.parametrize("capacity", [0, 1, 3])
def test_small_capacities(capacity, poisoned_allocations):
    """Capacity 0 drops everything; 1 keeps each expert's first-slot, lowest token."""
    experts = _experts(40, 5, 2, "distinct", seed=9)
    for block_m in (1, 16):
        _assert_equal(permute(experts, 5, capacity, block_m), _reference(experts, 5, capacity, block_m))


def test_padding_rows_are_minus_one(poisoned_allocations):
    """Every sorted row outside the segments' kept rows is -1, whatever the allocator handed out."""
    experts = _experts(100, 6, 3, "skewed", seed=4)
    result = permute(experts, 6, None, 16)
    is_kept_row = torch.zeros(result.sorted_assignments.shape[0], dtype=torch.bool)
    for expert in range(6):
        start = result.expert_offsets[expert].item()
        is_kept_row[start : start + result.tokens_per_expert[expert].item()] = True
    assert (result.sorted_assignments[~is_kept_row] == -1).all()
    assert (result.sorted_assignments[is_kept_row] >= 0).all()


def test_strided_experts():
    """A transposed (column-major) experts tensor gives the same permutation as a contiguous one."""
    experts = _experts(77, 9, 3, "distinct", seed=2)
    column_major = experts.t().contiguous().t()
    assert column_major.stride() != experts.stride()
    _assert_equal(permute(column_major, 9, 20, 16), _reference(experts, 9, 20, 16))


@pytest.mark.parametrize(
    "experts,block_m,capacity,message",
    [
        (torch.zeros(4, 2, dtype=torch.int64), 1, None, "int32"),
        (torch.zeros(4, 2, dtype=torch.int32), 0, None, "block_m"),
        (torch.zeros(4, 2, dtype=torch.int32), 1, -1, "capacity"),
    ],
)
def test_permute_rejects_bad_arguments(experts, block_m, capacity, message):
    with pytest.raises(ValueError, match=message):
        permute(experts, 3, capacity, block_m)
