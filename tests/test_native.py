"""The native ops of moe_kernels._C against their PyTorch definitions (backends/pytorch.py): the permutation,
compared exactly. Build the extension first: python setup.py build_ext --inplace.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import padded_permutation
from moe_kernels import native
from moe_kernels.backends import pytorch as torch_backend
from moe_kernels.layer import MoE
from moe_kernels.pipeline import Permutation, num_sorted_rows
from moe_kernels.reference import MoE as ReferenceMoE
from moe_kernels.routers import top_k

requires_native = pytest.mark.skipif(
    not native.has_cpu_ops(), reason="moe_kernels._C is not built: run python setup.py build_ext --inplace"
)
def routed_experts(num_tokens: int, num_experts: int, k: int, logits_kind: str) -> torch.Tensor:
    """Expert ids [T, k] int32 of random logits: normal, or skewed (expert 0 takes most tokens, some none)."""
    logits = torch.randn(num_tokens, num_experts)
    if logits_kind == "skewed":
        logits[:, 0] += 4.0
        logits[:, 1:3] -= 30.0
    return top_k(logits, k)


@requires_native
@pytest.mark.parametrize("block_m", [1, 16])
@pytest.mark.parametrize("capacity", [None, 1, 5, "balanced"])
@pytest.mark.parametrize("logits_kind", ["normal", "skewed"])
@pytest.mark.parametrize("num_tokens", [0, 1, 300])
@pytest.mark.parametrize("num_experts,k", [(2, 1), (2, 2), (7, 3), (64, 8), (256, 8)])
def test_permute_matches_torch(num_experts, k, num_tokens, logits_kind, capacity, block_m):
    experts = routed_experts(num_tokens, num_experts, k, logits_kind)
    if capacity == "balanced":
        capacity = math.ceil(num_tokens * k / num_experts) or None
    expected = torch_backend.permute(experts, num_experts, capacity)
    num_rows = num_sorted_rows(num_tokens, k, num_experts, block_m)
    expected = padded_permutation(expected, block_m)
    got = native.permute(experts, num_experts, capacity, block_m)
    for name, tensor, reference in zip(Permutation._fields, got, expected):
        assert tensor.dtype == torch.int32 and torch.equal(tensor, reference), name
    assert got.sorted_assignments.shape == (num_rows,)
    assert bool((got.expert_offsets[:-1] % block_m == 0).all())


@requires_native
def test_permute_is_deterministic_across_thread_counts():
    experts = routed_experts(5000, 64, 4, "normal")
    threads = torch.get_num_threads()
    try:
        outputs = []
        for num_threads in (1, max(threads, 2)):
            torch.set_num_threads(num_threads)
            outputs.append(native.permute(experts, 64, 300, 16))
    finally:
        torch.set_num_threads(threads)
    for serial, parallel in zip(*outputs):
        assert torch.equal(serial, parallel)


@requires_native
@pytest.mark.parametrize("block_m", [1, 16])
def test_capacity_zero_drops_every_assignment(block_m):
    """Issue 16 item 11: capacity 0 means "keep none" on every permute, as in the reference."""
    experts = routed_experts(40, 8, 2, "normal")
    got = native.permute(experts, 8, 0, block_m)
    expected = padded_permutation(torch_backend.permute(experts, 8, 0), block_m)
    assert (got.tokens_per_expert == 0).all() and (got.sorted_rows == -1).all()
    for tensor, reference in zip(got, expected):
        assert torch.equal(tensor, reference)
    with pytest.raises(RuntimeError, match="capacity must be None or >= 0, got -1"):
        native.permute(experts, 8, -1, block_m)


@requires_native
def test_permute_of_a_strided_experts_view():
    experts = routed_experts(50, 16, 4, "normal")
    wide = torch.stack([experts, experts], dim=2)[..., 0]
    assert not wide.is_contiguous()
    for got, reference in zip(native.permute(wide, 16, 7), torch_backend.permute(experts, 16, 7)):
        assert torch.equal(got, reference)


@requires_native
def test_permute_rejects_out_of_range_ids():
    experts = torch.tensor([[0, 3]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="expert ids must lie in"):
        native.permute(experts, 3, None)


@requires_native
@pytest.mark.parametrize("capacity,block_m", [(None, 1), (4, 1), (None, 16), (6, 16)])
def test_opcheck_permute(capacity, block_m):
    experts = routed_experts(33, 8, 2, "normal")
    torch.library.opcheck(torch.ops.moe_kernels.permute.default, (experts, 8, capacity, block_m))


def run_layer(layer, x):
    """y, aux_loss and the gradients of (y², aux_loss) w.r.t. x and the parameters."""
    x = x.detach().requires_grad_()
    y = layer(x)
    aux_loss = layer.aux_loss
    parameters = [p for p in layer.parameters()]
    grads = torch.autograd.grad(y.square().sum() + aux_loss, [x] + parameters, allow_unused=True)
    return (y, aux_loss, *(grad for grad in grads if grad is not None))


@requires_native
@pytest.mark.parametrize("router,capacity_factor,compiler", [
    ("topk", None, "aot_eager"), ("topk", 1.0, "aot_eager"), ("switch", 1.25, "aot_eager"),
    ("topk", None, "inductor"),
])
def test_compiled_layer_matches_eager(router, capacity_factor, compiler):
    torch._dynamo.reset()
    k = 1 if router == "switch" else 2
    layer = MoE(16, 32, 8, k=k, router=router, capacity_factor=capacity_factor, backend="torch")
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    x = torch.randn(3, 11, 16)
    for got, expected in zip(run_layer(compiled, x), run_layer(layer, x)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@requires_native
@pytest.mark.parametrize("router,k,capacity_factor", [
    ("topk", 2, None), ("topk", 3, 0.5), ("switch", 1, 1.0), ("noisy_topk", 2, None), ("noisy_topk", 4, 1.0),
])
def test_layer_without_grad_matches_reference(router, k, capacity_factor):
    reference = ReferenceMoE(16, 24, 8, k=k, router=router, capacity_factor=capacity_factor).eval()
    fast = MoE.from_reference(reference, backend="torch")
    x = torch.randn(50, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-6)
    assert fast.aux_loss is None and reference.aux_loss is None  # eval without gradients: not computed
