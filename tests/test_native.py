"""The native ops of moe_kernels._C against their PyTorch definitions (routing.py, backends/pytorch.py).

Tolerances: expert ids, their order and every permutation tensor are compared exactly. Per-token floats
(weights, logsumexp) against PyTorch in float32: rtol 1e-6, atol 1e-6, a few float32 ulps of values of
order one, since the op's exp and sums round differently from PyTorch's vectorised ones. The per-expert
sums over tokens (importance, load, probability_sum) against PyTorch in float64: the op accumulates in
float64 and rounds once; atol 1e-7·T covers the float32 rounding of the T per-token terms.
Build the extension first: python setup.py build_ext --inplace (or pip install --no-build-isolation -e .).
"""
from __future__ import annotations

import glob
import math
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

from torch.utils.cpp_extension import include_paths

from helpers import padded_permutation
from moe_kernels import native, routing
from moe_kernels.layer import MoE
from moe_kernels.pipeline import Permutation, RouterConfig, num_sorted_rows
from moe_kernels.reference import MoE as ReferenceMoE

from moe_kernels.backends import pytorch as torch_backend
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

requires_native = pytest.mark.skipif(
    not native.has_cpu_ops(), reason="moe_kernels._C is not built: run python setup.py build_ext --inplace"
)
requires_cuda_ops = pytest.mark.skipif(
    not (native.has_cuda_ops() and torch.cuda.is_available()),
    reason="needs a CUDA device and moe_kernels._C built with CUDA",
)

SHAPES = [(E, k) for E in (2, 7, 64, 256) for k in range(1, 9) if k <= E]
ROUTER_CASES = [("topk", True, False), ("topk", False, False), ("switch", False, False),
                ("noisy_topk", True, False), ("noisy_topk", True, True)]  # (router, renormalize, training)


def router_inputs(num_tokens: int, num_experts: int, router: str, training: bool, logits_kind: str = "normal"):
    """logits, noise_logits, noise ([T, E] float32) of one of: normal, skewed (expert 0 takes most tokens,
    some experts none), ties (integer logits: many exact ties)."""
    logits = torch.randn(num_tokens, num_experts)
    if logits_kind == "skewed":
        logits[:, 0] += 4.0
        logits[:, 1:3] -= 30.0
    elif logits_kind == "ties":
        logits = torch.randint(-2, 2, (num_tokens, num_experts)).float()
    noisy = router == "noisy_topk"
    noise_logits = torch.randn(num_tokens, num_experts) if noisy else None
    noise = torch.randn(num_tokens, num_experts) if noisy and training else None
    return logits, noise_logits, noise


def as_double(tensor):
    return None if tensor is None else tensor.double()


def assert_routing_matches(logits, noise_logits, noise, config: RouterConfig):
    got = native.route(logits, noise_logits, noise, config)
    expected = torch_backend.route(logits, noise_logits, noise, config)
    assert got.experts.dtype == torch.int32 and torch.equal(got.experts, expected.experts)
    torch.testing.assert_close(got.weights, expected.weights, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got.logsumexp, expected.logsumexp, rtol=1e-6, atol=1e-6, equal_nan=True)
    exact = torch_backend.route(logits.double(), as_double(noise_logits), as_double(noise), config)
    atol = 1e-7 * max(logits.shape[0], 1)
    for name in ("importance", "load", "probability_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(exact, name).float(), rtol=1e-6, atol=atol,
                                   equal_nan=True, msg=lambda m: f"{name}: {m}")
    return got


@requires_native
@pytest.mark.parametrize("num_tokens", [0, 1, 300])
@pytest.mark.parametrize("num_experts,k", SHAPES)
@pytest.mark.parametrize("router,renormalize,training", ROUTER_CASES)
def test_gating_matches_torch(router, renormalize, training, num_experts, k, num_tokens):
    if router == "switch" and k != 1:
        pytest.skip("switch routes to one expert")
    inputs = router_inputs(num_tokens, num_experts, router, training)
    assert_routing_matches(*inputs, RouterConfig(router, k, renormalize))


@requires_native
@pytest.mark.parametrize("logits_kind", ["skewed", "ties"])
@pytest.mark.parametrize("num_experts,k", [(7, 2), (64, 8)])
@pytest.mark.parametrize("router,renormalize,training", ROUTER_CASES)
def test_gating_skewed_and_tied(router, renormalize, training, num_experts, k, logits_kind):
    k = 1 if router == "switch" else k
    inputs = router_inputs(300, num_experts, router, training, logits_kind)
    got = assert_routing_matches(*inputs, RouterConfig(router, k, renormalize))
    if logits_kind == "skewed":
        assert got.load[1:3].sum() == 0 or training  # experts no token picks (the noisy load is smooth)


@requires_native
@pytest.mark.parametrize("router,renormalize,training", ROUTER_CASES)
def test_gating_nan_token_keeps_ids_in_range(router, renormalize, training):
    num_experts, k = 64, 1 if router == "switch" else 4
    logits, noise_logits, noise = router_inputs(20, num_experts, router, training)
    logits[3] = float("nan")
    logits[7, 5] = float("nan")
    logits[9, 11] = float("inf")
    config = RouterConfig(router, k, renormalize)
    got = native.route(logits, noise_logits, noise, config)
    assert got.experts.min() >= 0 and got.experts.max() < num_experts
    if training:
        return  # routing.noisy_topk raises on NaN: torch.distributions.Normal validates its argument
    expected = torch_backend.route(logits, noise_logits, noise, config)
    assert torch.equal(got.experts, expected.experts)
    finite = torch.ones(20, dtype=torch.bool)
    finite[[3, 7, 9]] = False
    torch.testing.assert_close(got.weights[finite], expected.weights[finite], rtol=1e-6, atol=1e-6)


def routed_experts(num_tokens: int, num_experts: int, k: int, logits_kind: str) -> torch.Tensor:
    logits, _, _ = router_inputs(num_tokens, num_experts, "topk", False, logits_kind)
    return routing.topk(logits, k).experts


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
def test_ops_are_deterministic_across_thread_counts():
    logits, noise_logits, noise = router_inputs(5000, 64, "noisy_topk", True)
    config = RouterConfig("noisy_topk", 4)
    experts = routed_experts(5000, 64, 4, "normal")
    threads = torch.get_num_threads()
    try:
        outputs = []
        for num_threads in (1, max(threads, 2)):
            torch.set_num_threads(num_threads)
            routed = native.route(logits, noise_logits, noise, config)
            outputs.append((*routed, *native.permute(experts, 64, 300, 16)))
    finally:
        torch.set_num_threads(threads)
    for serial, parallel in zip(*outputs):
        assert torch.equal(serial, parallel)


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
def test_gating_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="k must be in"):
        native.route(torch.randn(4, 3), None, None, RouterConfig("topk", 4))
    with pytest.raises(RuntimeError, match="router must be"):
        native.route(torch.randn(4, 3), None, None, RouterConfig("top2", 1))


@requires_native
@pytest.mark.parametrize("router,training", [("topk", False), ("noisy_topk", True), ("noisy_topk", False)])
def test_opcheck_gating(router, training):
    logits, noise_logits, noise = router_inputs(33, 16, router, training)
    torch.library.opcheck(torch.ops.moe_kernels.gating.default, (logits, noise_logits, noise, router, 3, True, 1e-2))


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
    with torch.no_grad():  # the native ops' path: routing needs no gradient
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@requires_native
def test_compiled_noisy_layer_in_eval_uses_native_ops():
    torch._dynamo.reset()
    layer = MoE(16, 32, 8, k=2, router="noisy_topk", backend="torch").eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(40, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@requires_native
@pytest.mark.parametrize("router,k,capacity_factor", [
    ("topk", 2, None), ("topk", 3, 0.5), ("switch", 1, 1.0), ("noisy_topk", 2, None), ("noisy_topk", 4, 1.0),
])
def test_layer_without_grad_on_native_ops_matches_reference(router, k, capacity_factor):
    reference = ReferenceMoE(16, 24, 8, k=k, router=router, capacity_factor=capacity_factor).eval()
    fast = MoE.from_reference(reference, backend="torch")
    x = torch.randn(50, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.aux_loss, reference.aux_loss, rtol=1e-5, atol=1e-7)


def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", cuda_sources(), ids=os.path.basename)
def test_cuda_sources_compile_for_sm80_and_sm90a(source, tmp_path):
    command = ["nvcc", "-c", "-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
               "-gencode=arch=compute_90a,code=sm_90a", source, "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@requires_cuda_ops
@pytest.mark.parametrize("num_tokens", [0, 1, 300, 5000])
@pytest.mark.parametrize("num_experts,k", [(2, 1), (7, 3), (64, 8), (256, 2), (256, 8)])
@pytest.mark.parametrize("router,renormalize,training", ROUTER_CASES)
def test_cuda_gating_matches_cpu(router, renormalize, training, num_experts, k, num_tokens):
    k = 1 if router == "switch" else k
    inputs = router_inputs(num_tokens, num_experts, router, training, "ties" if num_tokens == 5000 else "normal")
    config = RouterConfig(router, k, renormalize)
    expected = native.route(*inputs, config)
    got = native.route(*(None if t is None else t.cuda() for t in inputs), config)
    assert torch.equal(got.experts.cpu(), expected.experts)
    for name, tensor, reference in zip(got._fields, got, expected):
        atol = 1e-7 * max(num_tokens, 1) if tensor.shape[0] == num_experts else 1e-6
        torch.testing.assert_close(tensor.cpu(), reference, rtol=1e-6, atol=atol, msg=lambda m: f"{name}: {m}")


@requires_cuda_ops
@pytest.mark.parametrize("block_m", [1, 16, 128])
@pytest.mark.parametrize("capacity", [None, 1, 37])
@pytest.mark.parametrize("num_tokens", [0, 1, 300, 100_000])
@pytest.mark.parametrize("num_experts,k", [(2, 2), (7, 3), (64, 8), (256, 2)])
def test_cuda_permute_matches_cpu(num_experts, k, num_tokens, capacity, block_m):
    experts = routed_experts(num_tokens, num_experts, k, "skewed")
    expected = native.permute(experts, num_experts, capacity, block_m)
    got = native.permute(experts.cuda(), num_experts, capacity, block_m)
    for name, tensor, reference in zip(Permutation._fields, got, expected):
        assert torch.equal(tensor.cpu(), reference), name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_host_side_compiles(tmp_path):
    """The CUDA ops' tensor side (ops_cuda.cpp) and the registration with CUDA, built by nvcc's host compiler.

    CPU wheels of torch ship the c10/cuda headers but not the generated cuda_cmake_macros.h: a stub stands in.
    """
    includes = include_paths()
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in includes):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes = [str(tmp_path), *includes]
    for source in ("csrc/cuda/ops_cuda.cpp", "csrc/ops.cpp"):
        command = ["nvcc", "-x", "c++", "-std=c++20", "-c", "-DMOE_KERNELS_WITH_CUDA",
                   *(f"-I{path}" for path in [*includes, sysconfig.get_paths()["include"]]),
                   os.path.join(ROOT, source), "-o", str(tmp_path / "host.o")]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@requires_native
@pytest.mark.parametrize("router,renormalize,training", ROUTER_CASES)
def test_native_gating_with_the_triton_backward_matches_autograd(router, renormalize, training):
    """What backend "cuda" trains with: the native forward under the Triton gating backward (ops.route)."""
    pytest.importorskip("triton")
    from moe_kernels import ops

    torch.manual_seed(31)
    config = RouterConfig(router, 1 if router == "switch" else 3, renormalize)
    logits, noise_logits, noise = router_inputs(40, 8, router, training)
    leaves = [t.requires_grad_() for t in (logits, noise_logits) if t is not None]
    got = ops.route(logits, noise_logits, noise, config, forward="native")
    expected = torch_backend.route(logits, noise_logits, noise, config)
    assert torch.equal(got.experts, expected.experts)
    upstream = [torch.randn_like(t) for t in (got.weights, got.importance, got.load, got.probability_sum, got.logsumexp)]

    def loss(result):
        fields = (result.weights, result.importance, result.load, result.probability_sum, result.logsumexp)
        return sum((f * u).sum() for f, u in zip(fields, upstream) if f.requires_grad)

    got_grads = torch.autograd.grad(loss(got), leaves, allow_unused=True)
    expected_grads = torch.autograd.grad(loss(expected), leaves, allow_unused=True)
    for leaf, a, b in zip(leaves, got_grads, expected_grads):
        zero = torch.zeros_like(leaf)  # noise_logits play no part in evaluation
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=1e-4, atol=1e-5)
