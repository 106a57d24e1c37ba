"""The custom ops of moe_kernels.ops: torch.library.opcheck on each at a small float32 shape, and the
Triton layer under torch.compile(fullgraph=True) against eager.

opcheck runs the op eagerly and compares its fake (shapes, strides, dtypes), its schema (no hidden
mutation or aliasing), its autograd registration and AOT dispatch with dynamic shapes against it.
Tolerances of the compiled layer: rtol 1e-5, atol 1e-6 in float32; both sides run the very same kernels
in the same order, so only the order of autograd's gradient accumulation can differ.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels  # noqa: E402
from helpers import device_for, randomize_, skip_unless_runnable  # noqa: E402
from moe_kernels import ops  # noqa: E402

DEVICE = device_for("triton")
NUM_TOKENS, NUM_EXPERTS, K, D, D_FF, BLOCK_M = 9, 4, 2, 8, 6, 16


# The padding rows of hidden and grad_hidden are unspecified (never written), so two runs of expert_up or
# expert_down_combine_backward agree only where opcheck's comparison of whole outputs cannot look.
# A dropless permutation with block_m = 1 has no padding row: every check runs on it. The padded one with
# capacity drops runs every check except test_aot_dispatch_dynamic, which compares outputs with eager.
PERMUTATIONS = {"unpadded": (None, 1, "ALL"),
                "padded": (3, BLOCK_M, ("test_schema", "test_autograd_registration", "test_faketensor"))}


def permutation_of(capacity: int | None, block_m: int):
    experts = torch.stack([torch.randperm(NUM_EXPERTS, device=DEVICE)[:K] for _ in range(NUM_TOKENS)]).int()
    return ops.permute(experts, NUM_EXPERTS, capacity, block_m)


@pytest.mark.parametrize("renormalize", [True, False])
def test_opcheck_softmax_topk(renormalize):
    logits = torch.randn(NUM_TOKENS, NUM_EXPERTS, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.triton_softmax_topk, (logits, K, renormalize))
    weights, experts = ops.softmax_topk(logits, K, renormalize)
    grad_weights = torch.randn_like(weights)
    torch.library.opcheck(ops.triton_softmax_topk_backward, (grad_weights, logits.detach(), experts, renormalize))


@pytest.mark.parametrize("capacity", [None, 3])
def test_opcheck_permute(capacity):
    experts = torch.stack([torch.randperm(NUM_EXPERTS, device=DEVICE)[:K] for _ in range(NUM_TOKENS)]).int()
    torch.library.opcheck(ops.triton_permute, (experts, NUM_EXPERTS, capacity, BLOCK_M))


@pytest.mark.parametrize("layout", PERMUTATIONS)
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_opcheck_expert_up(activation, layout):
    capacity, block_m, test_utils = PERMUTATIONS[layout]
    permutation = permutation_of(capacity, block_m)
    n_up = 2 * D_FF if activation == "swiglu" else D_FF
    x = torch.randn(NUM_TOKENS, D, device=DEVICE, requires_grad=True)
    up_weight = torch.randn(NUM_EXPERTS, n_up, D, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.expert_up_op, (x, up_weight, None, *permutation, activation, False), test_utils=test_utils)
    grad_hidden = torch.randn(permutation.sorted_assignments.shape[0], D_FF, device=DEVICE)
    torch.library.opcheck(ops.expert_up_backward_op, (grad_hidden, x.detach(), up_weight.detach(), None, *permutation, activation, None))


@pytest.mark.parametrize("layout", PERMUTATIONS)
def test_opcheck_expert_down_combine(layout):
    capacity, block_m, test_utils = PERMUTATIONS[layout]
    permutation = permutation_of(capacity, block_m)
    hidden = torch.randn(permutation.sorted_assignments.shape[0], D_FF, device=DEVICE, requires_grad=True)
    down_weight = torch.randn(NUM_EXPERTS, D, D_FF, device=DEVICE, requires_grad=True)
    weights = torch.rand(NUM_TOKENS, K, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.expert_down_combine_op, (hidden, down_weight, None, *permutation, weights), test_utils=test_utils)
    grad_y = torch.randn(NUM_TOKENS, D, device=DEVICE)
    arguments = (grad_y, hidden.detach(), down_weight.detach(), None, *permutation, weights.detach())
    torch.library.opcheck(ops.expert_down_combine_backward_op, arguments, test_utils=test_utils)


def run_layer(layer, x, seed: int):
    """y, aux_loss and every gradient of (y², aux_loss) (None for noise_weight in evaluation), with the
    noise drawn from ``seed``."""
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum() + layer.aux_loss, [x, *layer.parameters()], allow_unused=True)
    return (y, layer.aux_loss, *grads)


@pytest.mark.parametrize("router,capacity_factor,training",
                         [("topk", 1.0, True), ("noisy_topk", None, False), ("noisy_topk", None, True)])
def test_compiled_triton_layer_matches_eager(router, capacity_factor, training):
    skip_unless_runnable("triton")
    torch._dynamo.reset()
    torch.manual_seed(5)
    layer = moe_kernels.MoE(D, D_FF, NUM_EXPERTS, k=K, router=router, capacity_factor=capacity_factor, backend="triton")
    layer = randomize_(layer).to(DEVICE).train(training)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, D, device=DEVICE)
    for got, expected in zip(run_layer(compiled, x, 0), run_layer(layer, x, 0), strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_triton_layer_with_dynamic_token_count():
    """One graph with a symbolic token count: the fakes' shapes (num_sorted_rows) follow T."""
    skip_unless_runnable("triton")
    torch._dynamo.reset()
    torch.manual_seed(6)
    layer = randomize_(moe_kernels.MoE(D, D_FF, NUM_EXPERTS, k=K, capacity_factor=1.0, backend="triton")).to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    for num_tokens in (5, 17):
        x = torch.randn(num_tokens, D, device=DEVICE)
        for got, expected in zip(run_layer(compiled, x, 0), run_layer(layer, x, 0), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
