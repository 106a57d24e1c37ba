"""The Triton softmax top-k kernels against their PyTorch definition (routers.softmax_topk.softmax_top_k),
forward and backward, under the interpreter on the CPU.

References: the definition in float32, what the kernel must reproduce (ids exactly: one ranking rule; weights
to rtol 1e-5; gradients to 1e-5 relative to their scale, as they sum up to E terms in another order), and the
definition in float64, the accuracy bar: the kernel's largest error against it at most 2× that of float32
PyTorch for weights and 3× for gradients (flash-attention's rule), plus 1e-6 of the largest value.
"""
import math
import zlib

import pytest
import torch

from helpers import assert_close_to_float64, router_logits

pytest.importorskip("triton", reason="the gating kernels need Triton")

from moe_kernels.kernels.gating import softmax_top_k_backward, softmax_top_k_forward  # noqa: E402
from moe_kernels.routers.softmax_topk import softmax_top_k  # noqa: E402

# (T, E, k): T = 0 and 1, odd sizes, k = 1, k = E, E up to 256 and k up to 8.
SHAPES = [(0, 4, 2), (1, 1, 1), (1, 2, 2), (37, 7, 1), (37, 7, 3), (37, 7, 7), (300, 64, 8), (65, 256, 8)]
# Skewed and tied logits mean something only over many tokens.
SHAPE_DATA = [(*shape, data) for shape in SHAPES for data in ("normal", "skewed", "ties") if data == "normal" or shape[0] >= 37]


def _seed(*case):
    """A seed of its own for every test case, stable across processes (unlike hash of a str)."""
    return zlib.crc32(repr(case).encode())


def _reference(logits, k, renormalize, grad_weights, dtype):
    """(weights, experts, grad_logits) of the PyTorch definition in ``dtype``."""
    leaf = logits.to(dtype).requires_grad_()
    weights, experts = softmax_top_k(leaf, k, renormalize)
    (grad_logits,) = torch.autograd.grad(weights, leaf, grad_weights.to(dtype)) if logits.numel() else (torch.zeros_like(leaf),)
    return weights.detach(), experts, grad_logits


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens,num_experts,k,data", SHAPE_DATA)
def test_matches_the_definition(num_tokens, num_experts, k, data, renormalize, poisoned_allocations):
    seed = _seed(num_tokens, num_experts, k, data, renormalize)
    logits = router_logits(num_tokens, num_experts, data, seed)
    grad_weights = torch.randn(num_tokens, k, generator=torch.Generator().manual_seed(seed + 1))

    weights, experts = softmax_top_k_forward(logits, k, renormalize)
    grad_logits = softmax_top_k_backward(grad_weights, logits, experts, renormalize)
    expected = _reference(logits, k, renormalize, grad_weights, torch.float32)

    assert experts.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(experts, expected[1])
    torch.testing.assert_close(weights, expected[0], rtol=1e-5, atol=1e-6)
    scale = expected[2].abs().max().item() if expected[2].numel() else 0.0
    torch.testing.assert_close(grad_logits, expected[2], rtol=1e-5, atol=1e-5 * max(scale, 1e-3))
    if data == "skewed" and k < num_experts:
        assert (experts == 0).any(1).all() and not (experts == num_experts - 1).any()

    if num_tokens > 1 and data == "normal":
        expected64 = _reference(logits, k, renormalize, grad_weights, torch.float64)
        assert torch.equal(expected64[1], experts)  # float32 logits rank the same in float64: exact selection
        assert_close_to_float64(weights, expected[0], expected64[0], 2)
        assert_close_to_float64(grad_logits, expected[2], expected64[2], 3)


@pytest.mark.parametrize("k", range(1, 9))
def test_every_k_up_to_eight(k):
    """k = 1 … 8 over E = 8 (k = E last)."""
    logits = router_logits(45, 8, "normal", _seed("every k", k))
    grad_weights = torch.randn(45, k)
    for renormalize in (True, False):
        weights, experts = softmax_top_k_forward(logits, k, renormalize)
        expected = _reference(logits, k, renormalize, grad_weights, torch.float32)
        assert torch.equal(experts, expected[1])
        torch.testing.assert_close(weights, expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(softmax_top_k_backward(grad_weights, logits, experts, renormalize), expected[2])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("renormalize", [True, False])
def test_non_finite_logits_rank_as_the_definition(renormalize):
    """A NaN ranks above every number (the definition's rule), stays in its token's weights only; ids in [0, E)."""
    logits = router_logits(40, 7, "normal", seed=3)
    logits[5] = math.nan
    logits[8, 4] = math.nan
    logits[11, 2] = math.inf
    weights, experts = softmax_top_k_forward(logits, 3, renormalize)
    expected = _reference(logits, 3, renormalize, torch.zeros(40, 3), torch.float32)
    assert ((experts >= 0) & (experts < 7)).all()
    assert torch.equal(experts, expected[1]) and experts[8, 0] == 4 and experts[11, 0] == 2
    finite = torch.ones(40, dtype=torch.bool)
    finite[[5, 8, 11]] = False
    torch.testing.assert_close(weights[finite], expected[0][finite], rtol=1e-5, atol=1e-6)
    assert weights[[5, 8]].isnan().all()


def test_stridedrouter_logits():
    """Logits that are a column slice of a wider tensor (strides ≠ contiguous)."""
    wide = torch.randn(60, 14, generator=torch.Generator().manual_seed(5))
    logits = wide[:, ::2]
    grad_weights = torch.randn(60, 2)
    weights, experts = softmax_top_k_forward(logits, 2, False)
    expected = _reference(logits.contiguous(), 2, False, grad_weights, torch.float32)
    assert torch.equal(experts, expected[1])
    torch.testing.assert_close(weights, expected[0])
    torch.testing.assert_close(softmax_top_k_backward(grad_weights, logits, experts, False), expected[2])


@pytest.mark.parametrize(
    "logits,k,message",
    [(torch.zeros(4, 3, dtype=torch.float64), 2, "float32"), (torch.zeros(4, 3), 4, "k must be"), (torch.zeros(4), 1, r"\[T, E\]")],
)
def test_forward_rejects_bad_arguments(logits, k, message):
    with pytest.raises(ValueError, match=message):
        softmax_top_k_forward(logits, k, True)
