"""The native ops of moe_kernels._C against their PyTorch definitions: the permutation (backends/pytorch.py),
compared exactly; the softmax top-k router kernel (routers/softmax_topk.py): ids exactly, weights as the Triton
kernel's (tests/test_kernels_gating.py). Build the extension first: python setup.py build_ext --inplace.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close_to_float64, padded_permutation, router_logits
from moe_kernels import routers
from moe_kernels import native
from moe_kernels.backends import pytorch as torch_backend
from moe_kernels.layer import MoE
from moe_kernels.pipeline import Permutation, num_sorted_rows
from moe_kernels.reference import MoE as ReferenceMoE
from moe_kernels.routers import top_k
from moe_kernels.routers.softmax_topk import softmax_top_k

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


# (T, E, k, data): T = 0 and 1, odd sizes, k = 1 and k = E, E up to 256, both sides of kDirectRows = 16 tokens
# (direct dot products below, at::linear above); skewed and tied logits over many tokens.
ROUTER_CASES = [(0, 4, 2, "normal"), (1, 1, 1, "normal"), (1, 128, 8, "normal"), (16, 64, 8, "normal"),
                (37, 7, 3, "normal"), (37, 7, 7, "ties"), (37, 7, 1, "skewed"), (300, 64, 8, "normal"),
                (300, 64, 8, "ties"), (65, 256, 8, "skewed"), (9, 256, 4, "ties")]


def _router_inputs(num_tokens, num_experts, data, seed, dtype=torch.float32):
    """(x, weight) whose logits x·weightᵀ are ``router_logits``' for ties and skew (x = those logits, weight =
    the identity: exact in any summation order), random otherwise (d = 24)."""
    generator = torch.Generator().manual_seed(seed)
    if data == "normal":
        x = torch.randn(num_tokens, 24, generator=generator, dtype=dtype)
        return x, torch.randn(num_experts, 24, generator=generator, dtype=dtype) / 5
    return router_logits(num_tokens, num_experts, data, seed).to(dtype), torch.eye(num_experts, dtype=dtype)


def _check_router_kernel(x, weight, bias, k, renormalize):
    """The kernel's logits, ids and weights against the definition's, bitwise (the same ATen calls for logits
    and weights, the one ranking rule for ids); returns (logits, weights, experts)."""
    logits, weights, experts = native.softmax_top_k(x, weight, bias, k, renormalize)
    expected_logits = torch.nn.functional.linear(x, weight, bias)
    expected_weights, expected_experts = softmax_top_k(expected_logits, k, renormalize)
    assert experts.dtype == torch.int32 and weights.dtype == x.dtype and logits.dtype == x.dtype
    assert torch.equal(logits, expected_logits) or torch.equal(logits.isnan(), expected_logits.isnan())
    assert torch.equal(experts, expected_experts)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=0, equal_nan=True)
    return logits, weights, experts


@requires_native
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 40])
def test_router_kernel_logits_and_weights_are_the_definitions_bits(num_tokens):
    generator = torch.Generator().manual_seed(num_tokens)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((num_tokens, 64), (128, 64), (128,)))
    for renormalize in (True, False):
        _check_router_kernel(x, weight, bias, 8, renormalize)


@requires_native
@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch"])
def test_layer_chooses_the_same_experts_with_and_without_gradients_at_near_ties(router):
    """Logits one float32 ulp apart (and exactly tied): the no-grad layer (C++ router kernel) chooses what the
    layer with gradients (the PyTorch definition) chooses, and gives the same y, bitwise."""
    k = 1 if router == "switch" else 2
    layer = MoE(4, 6, 4, k=k, router=router, backend="torch").eval()
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    base = torch.tensor([1.0, 1.0, 0.5, -2.0])
    near = base.clone()
    near[1] = torch.nextafter(base[1], torch.tensor(2.0))
    x = torch.stack([base, near, near.flip(0), torch.zeros(4)] * 5)
    seen = []
    layer.gate.register_forward_hook(lambda module, inputs, routing: seen.append(routing))
    expected = layer(x.requires_grad_())
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(seen[0].experts, seen[1].experts) and torch.equal(seen[0].logits, seen[1].logits)
    assert torch.equal(got, expected.detach())


@requires_native
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens,num_experts,k,data", ROUTER_CASES)
def test_router_kernel_matches_the_definition(num_tokens, num_experts, k, data, renormalize, poisoned_allocations):
    seed = num_tokens * 1000 + num_experts + k
    x, weight = _router_inputs(num_tokens, num_experts, data, seed)
    bias = torch.randn(num_experts, generator=torch.Generator().manual_seed(seed)) if data == "normal" else None
    logits, weights, experts = _check_router_kernel(x, weight, bias, k, renormalize)
    if data != "normal":
        assert torch.equal(logits, router_logits(num_tokens, num_experts, data, seed))
    if data == "skewed" and k < num_experts:
        assert (experts == 0).any(1).all() and not (experts == num_experts - 1).any()
    if data == "normal" and num_tokens > 1:  # the accuracy bar: float64 selects the same, weights 2× torch32's error
        weights64, experts64 = softmax_top_k(logits.double(), k, renormalize)
        assert torch.equal(experts64, experts)
        assert_close_to_float64(weights, softmax_top_k(logits, k, renormalize)[0], weights64, 2)
        x64, weight64, bias64 = x.double(), weight.double(), bias.double()
        _check_router_kernel(x64, weight64, bias64, k, renormalize)


@requires_native
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_kernel_ranks_non_finite_and_zero_logits_as_the_definition(renormalize):
    """NaN above every number, then +inf, -inf below every number, ties (zeros, NaNs) to the lower id; strided x
    and weight."""
    logits = router_logits(40, 7, "normal", seed=3)
    logits[5] = math.nan
    logits[13] = 0.0
    wide = torch.zeros(40, 14)
    wide[:, ::2] = logits
    x, weight = wide[:, ::2], torch.eye(14)[::2, ::2].t().contiguous().t()  # both strided views
    _, weights, experts = _check_router_kernel(x, weight, None, 3, renormalize)
    assert experts[13].tolist() == [0, 1, 2] and experts[5].tolist() == [0, 1, 2] and weights[5].isnan().all()
    bias = torch.tensor([0, 0, math.inf, 0, math.nan, 0, -math.inf])
    _, _, experts = _check_router_kernel(x, weight, bias, 3, renormalize)
    finite_rows = torch.arange(40) != 5
    assert (experts[finite_rows, :2] == torch.tensor([4, 2], dtype=torch.int32)).all() and not (experts == 6).any()


@requires_native
def test_router_kernel_is_deterministic_across_thread_counts():
    """The direct logits (12 tokens) and the selection of 3000 tokens (tied logits, exact in any GEMM)."""
    x, weight = _router_inputs(12, 64, "normal", seed=9)
    tied_x, identity = _router_inputs(3000, 64, "ties", seed=9)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for num_threads in (1, max(threads, 2)):
            torch.set_num_threads(num_threads)
            outputs.append(native.softmax_top_k(x, weight, None, 6, False) + native.softmax_top_k(tied_x, identity, None, 6, False))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


@requires_native
@pytest.mark.parametrize(
    "x,weight,bias,k,message",
    [(torch.zeros(4, 3, dtype=torch.bfloat16), torch.zeros(5, 3, dtype=torch.bfloat16), None, 2, "float32 or float64"),
     (torch.zeros(4, 3), torch.zeros(5, 3, dtype=torch.float64), None, 2, r"weight must be an \[E, d=3\] Float"),
     (torch.zeros(4, 3), torch.zeros(5, 2), None, 2, r"weight must be an \[E, d=3\]"),
     (torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4), 2, r"bias must be None or an \[E=5\]"),
     (torch.zeros(4, 3), torch.zeros(5, 3), None, 6, r"k must be in \[1, E=5\]"),
     (torch.zeros(4), torch.zeros(5, 4), None, 1, r"\[T, d\]")],
)
def test_router_kernel_rejects_bad_arguments(x, weight, bias, k, message):
    with pytest.raises(RuntimeError, match=message):
        native.softmax_top_k(x, weight, bias, k, True)


@requires_native
@pytest.mark.parametrize("num_tokens", [5, 21])
def test_opcheck_router_kernel(num_tokens):
    x, weight = _router_inputs(num_tokens, 9, "normal", seed=4)
    for bias, renormalize in ((None, True), (torch.randn(9), False)):
        torch.library.opcheck(torch.ops.moe_kernels.cpu_softmax_topk.default, (x, weight, bias, 3, renormalize))


@requires_native
@pytest.mark.parametrize("name,options", [("topk", {"renormalize": True}), ("topk", {"renormalize": False, "bias": True}),
                                          ("switch", {}), ("noisy_topk", {})])
def test_routers_take_the_cpu_kernel_only_where_no_gradient_is_recorded(name, options, monkeypatch):
    """use_kernel="cpu": the C++ kernel without autograd (the definition's routing), the definition with it
    (differentiable weights), and the definition for noisy top-k in training (noise)."""
    k = 1 if name == "switch" else 3
    torch.manual_seed(7)
    router = routers.build(name, 12, 10, k, **options).eval()
    if options.get("bias"):
        torch.nn.init.normal_(router.bias)
    x = torch.cat([torch.randn(30, 12), torch.randint(-1, 2, (30, 12)).float()])  # random and tied logits
    calls = []
    kernel = native.softmax_top_k
    monkeypatch.setattr(native, "softmax_top_k", lambda *args, **kwargs: calls.append(args) or kernel(*args, **kwargs))
    with torch.no_grad():
        fused, plain = router(x, use_kernel="cpu"), router(x)
    assert len(calls) == 1
    assert torch.equal(fused.experts, plain.experts)
    for got, expected in zip(fused[:2], plain[:2]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with_grad = router(x, use_kernel="cpu")
    assert len(calls) == 1 and with_grad.weights.requires_grad
    if name == "noisy_topk":
        with torch.no_grad():
            router.train()(x, use_kernel="cpu")
        assert len(calls) == 1


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


@requires_native
@pytest.mark.parametrize("expert_capacity,router", [(None, "topk"), (None, "expert_choice"), (4, "topk")])
def test_layer_takes_the_fused_expert_op_only_where_no_gradient_is_recorded(expert_capacity, router, monkeypatch):
    """cpu_experts_forward (permute + both expert stages in one op) for a top-k routing without gradients; the
    stages with gradients, and for the permutations it does not make (expert choice, per-sequence capacity)."""
    layer = MoE(16, 24, 8, k=2, router=router, expert_capacity=expert_capacity, backend="torch").eval()
    calls = []
    fused = native.experts_forward
    monkeypatch.setattr(native, "experts_forward", lambda *args: calls.append(args) or fused(*args))
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        without_grad = layer(x)
    assert len(calls) == (1 if expert_capacity is None and router == "topk" else 0)
    with_grad = layer(x)
    assert len(calls) == (1 if expert_capacity is None and router == "topk" else 0) and with_grad.requires_grad
    assert torch.equal(without_grad, with_grad)
