"""The Triton gating kernels against moe_kernels.routing, forward and backward, under the interpreter on the CPU.

References: routing.py in float32, what the kernel must reproduce (ids exactly, forward values to rtol 1e-5;
gradients to 1e-3, a sanity bound, as they sum up to E terms in another order), and routing.py in float64,
the accuracy bar: the kernel's largest error against it at most 2× that of float32 PyTorch for values and
3× for gradients (flash-attention's rule), plus 1e-6 of the largest value for outputs PyTorch gets exact.
"""
import math
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="the gating kernels need Triton")

from moe_kernels.backends.torch import route  # noqa: E402
from moe_kernels.kernels.gating import gating_backward, gating_forward  # noqa: E402
from moe_kernels.pipeline import RouterConfig  # noqa: E402

# (router, renormalize, training): training draws noise, which only noisy_topk reads.
ROUTERS = [
    ("topk", True, False),
    ("topk", False, False),
    ("switch", False, False),
    ("noisy_topk", False, False),
    ("noisy_topk", False, True),
]
# (T, E, k): T = 0 and 1, odd sizes, k = 1, k = E, E up to 256 and k up to 8.
SHAPES = [
    (0, 4, 2),
    (1, 1, 1),
    (1, 2, 2),
    (37, 7, 1),
    (37, 7, 3),
    (37, 7, 7),
    (300, 64, 2),
    (300, 64, 8),
    (65, 256, 8),
]
# Skewed and tied logits mean something only over many tokens.
SHAPE_DATA = [(*shape, data) for shape in SHAPES for data in ("normal", "skewed", "ties") if data == "normal" or shape[0] >= 37]
# Gradients of every output: weights, importance, load, probability_sum, logsumexp (experts has none).
DIFFERENTIABLE = (0, 2, 3, 4, 5)


def _inputs(num_tokens, num_experts, data, training, seed):
    """Router inputs [T, E] float32: "normal", "skewed" (expert 0 takes every token, the last none) or "ties"."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    if data == "skewed" and num_experts > 1:
        logits[:, 0] += 30.0
        logits[:, -1] -= 30.0
    if data == "ties":
        logits = torch.randint(-2, 3, (num_tokens, num_experts), generator=generator).float()
    noise_logits = torch.randn(num_tokens, num_experts, generator=generator)
    noise = torch.randn(num_tokens, num_experts, generator=generator) if training else None
    return logits, noise_logits, noise


def _seed(*case):
    """A seed of its own for every test case, stable across processes (unlike hash of a str)."""
    return zlib.crc32(repr(case).encode())


def _config(router, k, renormalize):
    return RouterConfig(router, 1 if router == "switch" else k, renormalize)


def _reference(logits, noise_logits, noise, config, dtype):
    """routing.py's Routing in ``dtype``, with the leaf inputs it is differentiable in."""
    leaves = (logits.to(dtype).requires_grad_(), noise_logits.to(dtype).requires_grad_())
    result = route(leaves[0], leaves[1], None if noise is None else noise.to(dtype), config)
    return result, leaves


def _assert_close_to_float64(kernel, reference32, reference64, factor, rows=slice(None)):
    """max|kernel - ref64| ≤ factor·max|torch32 - ref64| + 1e-6·(1 + max|ref64|), over the chosen rows."""
    kernel, reference32, reference64 = kernel[rows].double(), reference32[rows].double(), reference64[rows]
    if reference64.numel() == 0:
        return
    error = (kernel - reference64).abs().max().item()
    bound = factor * (reference32 - reference64).abs().max().item() + 1e-6 * (1 + reference64.abs().max().item())
    assert error <= bound, f"error against float64 {error:.3g} over the bound {bound:.3g}"


@pytest.mark.parametrize("router,renormalize,training", ROUTERS)
@pytest.mark.parametrize("num_tokens,num_experts,k,data", SHAPE_DATA)
def test_forward_matches_routing(router, renormalize, training, num_tokens, num_experts, k, data, poisoned_allocations):
    seed = _seed(router, renormalize, training, num_tokens, num_experts, k, data)
    logits, noise_logits, noise = _inputs(num_tokens, num_experts, data, training, seed)
    config = _config(router, k, renormalize)

    result = gating_forward(logits, noise_logits, noise, config)
    expected, _ = _reference(logits, noise_logits, noise, config, torch.float32)

    assert result.experts.dtype == torch.int32 and result.weights.dtype == torch.float32
    assert torch.equal(result.experts, expected.experts)
    for name in ("weights", "importance", "load", "probability_sum", "logsumexp"):
        torch.testing.assert_close(getattr(result, name), getattr(expected, name).detach(), rtol=1e-5, atol=1e-6, msg=name)
    if data == "skewed" and config.k < num_experts:
        assert (result.experts == 0).any(1).all() and not (result.experts == num_experts - 1).any()


@pytest.mark.parametrize("router,renormalize,training", ROUTERS)
@pytest.mark.parametrize("num_tokens,num_experts,k", [shape for shape in SHAPES if shape[0] > 1])
def test_forward_error_against_float64(router, renormalize, training, num_tokens, num_experts, k):
    seed = _seed("float64", router, renormalize, training, num_tokens, num_experts, k)
    logits, noise_logits, noise = _inputs(num_tokens, num_experts, "normal", training, seed)
    config = _config(router, k, renormalize)

    result = gating_forward(logits, noise_logits, noise, config)
    expected32, _ = _reference(logits, noise_logits, noise, config, torch.float32)
    expected64, _ = _reference(logits, noise_logits, noise, config, torch.float64)

    # Rows where float64 ranks the experts differently than float32 are a near-tie, not an error.
    same_choice = (expected64.experts == expected32.experts).all(1)
    assert same_choice.float().mean() > 0.9
    _assert_close_to_float64(result.weights, expected32.weights, expected64.weights, 2, same_choice)
    _assert_close_to_float64(result.logsumexp, expected32.logsumexp, expected64.logsumexp, 2)
    _assert_close_to_float64(result.probability_sum, expected32.probability_sum, expected64.probability_sum, 2)
    if same_choice.all():
        _assert_close_to_float64(result.importance, expected32.importance, expected64.importance, 2)
        _assert_close_to_float64(result.load, expected32.load, expected64.load, 2)


def _output_gradients(result, training, generator):
    """Random upstream gradients for every differentiable output; None for the counts that have none."""
    gradients = [torch.randn(result[index].shape, generator=generator) if index in DIFFERENTIABLE else None for index in range(6)]
    if not training:
        gradients[3] = None
    return gradients


def _autograd(logits, noise_logits, noise, config, gradients, dtype, k_equals_e):
    """torch.autograd.grad through routing.py in ``dtype``: (grad_logits, grad_noise_logits or None)."""
    expected, leaves = _reference(logits, noise_logits, noise, config, dtype)
    # With k = E in training the smooth load is the constant T; routing.py reads 0·inf there (NaN), the
    # true derivative is zero, so the reference leaves the load out.
    chosen = [index for index, gradient in enumerate(gradients) if gradient is not None and not (index == 3 and k_equals_e)]
    inputs = leaves if noise is not None else leaves[:1]
    grads = torch.autograd.grad(
        [expected[index] for index in chosen], inputs, [gradients[index].to(dtype) for index in chosen], allow_unused=True
    )
    return grads[0], (grads[1] if noise is not None else None)


@pytest.mark.parametrize("router,renormalize,training", ROUTERS)
@pytest.mark.parametrize("num_tokens,num_experts,k,data", SHAPE_DATA)
def test_backward_matches_autograd(router, renormalize, training, num_tokens, num_experts, k, data, poisoned_allocations):
    seed = _seed("backward", router, renormalize, training, num_tokens, num_experts, k, data)
    generator = torch.Generator().manual_seed(seed)
    logits, noise_logits, noise = _inputs(num_tokens, num_experts, data, training, seed)
    config = _config(router, k, renormalize)
    result = gating_forward(logits, noise_logits, noise, config)
    gradients = _output_gradients(result, training, generator)
    k_equals_e = config.k == num_experts

    grad_logits, grad_noise_logits = gating_backward(
        gradients[0], gradients[2], gradients[3], gradients[4], gradients[5],
        logits, noise_logits, noise, result.experts, config,
    )  # fmt: skip
    expected32 = _autograd(logits, noise_logits, noise, config, gradients, torch.float32, k_equals_e)

    torch.testing.assert_close(grad_logits, expected32[0], rtol=1e-3, atol=1e-3)
    if noise is None:
        assert grad_noise_logits is None
    else:
        torch.testing.assert_close(grad_noise_logits, expected32[1], rtol=1e-3, atol=1e-3)

    if num_tokens > 1 and data == "normal":
        expected64 = _autograd(logits, noise_logits, noise, config, gradients, torch.float64, k_equals_e)
        reference64, _ = _reference(logits, noise_logits, noise, config, torch.float64)
        same_choice = (reference64.experts == result.experts).all(1)
        _assert_close_to_float64(grad_logits, expected32[0], expected64[0], 3, same_choice)
        if noise is not None:
            _assert_close_to_float64(grad_noise_logits, expected32[1], expected64[1], 3, same_choice)


@pytest.mark.parametrize("router,renormalize,training", ROUTERS)
def test_backward_with_missing_gradients(router, renormalize, training):
    """None upstream gradients count as zero: only the weights' gradient here."""
    logits, noise_logits, noise = _inputs(50, 7, "normal", training, seed=7)
    config = _config(router, 3, renormalize)
    result = gating_forward(logits, noise_logits, noise, config)
    grad_weights = torch.randn(result.weights.shape)
    grad_logits, grad_noise_logits = gating_backward(
        grad_weights, None, None, None, None, logits, noise_logits, noise, result.experts, config
    )
    gradients = [grad_weights, None, None, None, None, None]
    expected = _autograd(logits, noise_logits, noise, config, gradients, torch.float32, False)
    torch.testing.assert_close(grad_logits, expected[0], rtol=1e-5, atol=1e-6)
    if noise is not None:
        torch.testing.assert_close(grad_noise_logits, expected[1], rtol=1e-5, atol=1e-6)


def test_noisy_training_with_k_equal_to_e_has_finite_gradients():
    """k = E makes the smooth load the constant T; its gradient is zero, not routing.py's NaN."""
    logits, noise_logits, noise = _inputs(20, 4, "normal", True, seed=11)
    config = RouterConfig("noisy_topk", 4)
    result = gating_forward(logits, noise_logits, noise, config)
    torch.testing.assert_close(result.load, torch.full((4,), 20.0))
    grad_load = torch.randn(4)
    grad_logits, grad_noise_logits = gating_backward(
        None, None, grad_load, None, None, logits, noise_logits, noise, result.experts, config
    )
    assert torch.equal(grad_logits, torch.zeros_like(grad_logits))
    assert torch.equal(grad_noise_logits, torch.zeros_like(grad_noise_logits))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("router,renormalize,training", ROUTERS)
def test_non_finite_token_keeps_valid_ids(router, renormalize, training):
    """A NaN token still routes to experts in [0, E) and leaves the other tokens' routing unchanged."""
    logits, noise_logits, noise = _inputs(40, 7, "normal", training, seed=3)
    logits[5] = math.nan
    config = _config(router, 3, renormalize)
    result = gating_forward(logits, noise_logits, noise, config)
    assert ((result.experts >= 0) & (result.experts < 7)).all()
    # The reference routes the finite tokens only: torch's Normal.cdf refuses NaN arguments.
    finite = torch.arange(40) != 5
    expected, _ = _reference(logits[finite], noise_logits[finite], None if noise is None else noise[finite], config, torch.float32)
    assert torch.equal(result.experts[finite], expected.experts)
    torch.testing.assert_close(result.weights[finite], expected.weights.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.logsumexp[finite], expected.logsumexp.detach(), rtol=1e-5, atol=1e-6)


def test_strided_inputs():
    """Logits that are a column slice of a wider tensor (strides ≠ contiguous) and a transposed noise."""
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(60, 14, generator=generator)
    logits, noise_logits = wide[:, ::2], wide[:, 1::2]
    noise = torch.randn(7, 60, generator=generator).t()
    config = RouterConfig("noisy_topk", 2)
    result = gating_forward(logits, noise_logits, noise, config)
    expected, _ = _reference(logits, noise_logits, noise, config, torch.float32)
    assert torch.equal(result.experts, expected.experts)
    torch.testing.assert_close(result.load, expected.load.detach(), rtol=1e-5, atol=1e-6)
    gradients = [torch.randn(60, 2, generator=generator), None, torch.randn(7, generator=generator), torch.randn(7, generator=generator), None, None]
    grad_logits, grad_noise_logits = gating_backward(
        gradients[0], gradients[2], gradients[3], None, None, logits, noise_logits, noise, result.experts, config
    )
    expected_grads = _autograd(logits, noise_logits, noise, config, gradients, torch.float32, False)
    torch.testing.assert_close(grad_logits, expected_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_noise_logits, expected_grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router,renormalize,training", [case for case in ROUTERS if case[0] != "switch"])
@pytest.mark.parametrize("k", range(1, 9))
def test_every_k_up_to_eight(router, renormalize, training, k):
    """k = 1 … 8 over E = 8 (k = E last), forward and backward against float32 routing.py."""
    logits, noise_logits, noise = _inputs(45, 8, "normal", training, _seed("every k", router, renormalize, training, k))
    config = _config(router, k, renormalize)
    result = gating_forward(logits, noise_logits, noise, config)
    expected, _ = _reference(logits, noise_logits, noise, config, torch.float32)
    assert torch.equal(result.experts, expected.experts)
    torch.testing.assert_close(result.weights, expected.weights.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.load, expected.load.detach(), rtol=1e-5, atol=1e-6)

    gradients = _output_gradients(result, training, torch.Generator().manual_seed(k))
    grad_logits, grad_noise_logits = gating_backward(
        gradients[0], gradients[2], gradients[3], gradients[4], gradients[5],
        logits, noise_logits, noise, result.experts, config,
    )  # fmt: skip
    expected_grads = _autograd(logits, noise_logits, noise, config, gradients, torch.float32, k == 8)
    torch.testing.assert_close(grad_logits, expected_grads[0], rtol=1e-3, atol=1e-3)
    if noise is not None:
        torch.testing.assert_close(grad_noise_logits, expected_grads[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "logits,config,message",
    [
        (torch.zeros(4, 3, dtype=torch.float64), RouterConfig("topk", 2), "float32"),
        (torch.zeros(4, 3), RouterConfig("topk", 4), "k must be"),
        (torch.zeros(4, 3), RouterConfig("top2", 2), "config.router"),
        (torch.zeros(4, 3), RouterConfig("noisy_topk", 2), "noise_logits"),
    ],
)
def test_forward_rejects_bad_arguments(logits, config, message):
    noise = torch.zeros(4, 3) if config.router == "noisy_topk" else None
    with pytest.raises(ValueError, match=message):
        gating_forward(logits, None, noise, config)
