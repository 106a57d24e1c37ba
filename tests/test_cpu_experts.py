"""The C++ CPU expert path (moe_kernels._C's cpu_expert_up / cpu_expert_down_combine, through native.py).

Reference: the pure-PyTorch stages of backends/pytorch.py run in float64 (themselves tested against a
token-by-token loop in test_functional.py). Tolerances: the flash-attention rule of helpers.assert_close,
the PyTorch stages at the same precision being the baseline (2× for outputs, 3× for gradients).
Determinism is tested bitwise: 1 and 2 threads must give the very same bits (PLAN decision 9).
"""
from __future__ import annotations

import pathlib
import zlib

import pytest
import torch

import moe_kernels
from helpers import assert_close
from moe_kernels import native
from moe_kernels.activations import PRESETS
from moe_kernels.backends import pytorch as torch_stages

pytestmark = pytest.mark.skipif(not native.has_cpu_ops(), reason="moe_kernels._C is not built")

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def problem(activation: str, num_tokens=13, d=12, d_ff=10, num_experts=5, k=2, biases=False, seed=0):
    """float64 leaves of one expert call: x, up/down weights (and biases), routing weights and expert ids."""
    generator = torch.Generator().manual_seed(seed)
    n_up = PRESETS[activation].up_width(d_ff)
    tensors = dict(
        x=torch.randn(num_tokens, d, generator=generator, dtype=torch.float64),
        up_weight=torch.randn(num_experts, n_up, d, generator=generator, dtype=torch.float64) / d**0.5,
        down_weight=torch.randn(num_experts, d, d_ff, generator=generator, dtype=torch.float64) / d_ff**0.5,
        up_bias=torch.randn(num_experts, n_up, generator=generator, dtype=torch.float64) if biases else None,
        down_bias=torch.randn(num_experts, d, generator=generator, dtype=torch.float64) if biases else None,
        weights=torch.rand(num_tokens, k, generator=generator, dtype=torch.float64),
    )
    rows = [torch.randperm(num_experts, generator=generator)[:k] for _ in range(num_tokens)]
    experts = torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)
    return tensors, experts.to(torch.int32)


def run_stages(stages, tensors, experts, dtype, activation, capacity, dy):
    """y and the gradients of (y·dy).sum() w.r.t. every floating leaf, through expert_up + expert_down_combine."""
    leaves = {name: None if t is None else t.to(dtype).requires_grad_() for name, t in tensors.items()}
    leaves["weights"] = tensors["weights"].to(torch.promote_types(dtype, torch.float32)).requires_grad_()
    permutation = torch_stages.permute(experts, tensors["up_weight"].shape[0], capacity)
    up, down = stages
    hidden = up(leaves["x"], leaves["up_weight"], leaves["up_bias"], permutation, PRESETS[activation])
    y = down(hidden, leaves["down_weight"], leaves["down_bias"], permutation, leaves["weights"])
    differentiable = {name: t for name, t in leaves.items() if t is not None}
    grads = torch.autograd.grad((y.double() * dy).sum(), list(differentiable.values()))
    return y, dict(zip(differentiable, grads))


NATIVE = (native.expert_up, native.expert_down_combine)
PYTORCH = (torch_stages.expert_up, torch_stages.expert_down_combine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(PRESETS))
@pytest.mark.parametrize("biases,capacity", [(False, None), (True, None), (True, 3)])
def test_matches_pytorch_stages(activation, dtype, biases, capacity):
    tensors, experts = problem(activation, biases=biases, seed=zlib.crc32(f"{activation}{biases}{capacity}".encode()))
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)
    exact = run_stages(PYTORCH, tensors, experts, torch.float64, activation, capacity, dy)
    baseline = run_stages(PYTORCH, tensors, experts, dtype, activation, capacity, dy)
    actual = run_stages(NATIVE, tensors, experts, dtype, activation, capacity, dy)
    assert actual[0].dtype == dtype
    assert_close(actual[0].double(), baseline[0].double(), exact[0], dtype, 2, "y")
    for name in exact[1]:
        assert actual[1][name].dtype == baseline[1][name].dtype, name
        assert_close(actual[1][name].double(), baseline[1][name].double(), exact[1][name], dtype, 3, f"grad of {name}")


@pytest.mark.parametrize("activation", ["swiglu", "gpt_oss_swiglu", "relu", "gelu"])
def test_gradcheck(activation):
    tensors, experts = problem(activation, num_tokens=5, d=4, d_ff=3, num_experts=3, biases=True)
    permutation = torch_stages.permute(experts, 3, 3)
    names = list(tensors)

    def function(*leaves):
        values = dict(zip(names, leaves))
        hidden = native.expert_up(values["x"], values["up_weight"], values["up_bias"], permutation, PRESETS[activation])
        return native.expert_down_combine(hidden, values["down_weight"], values["down_bias"], permutation, values["weights"])

    assert torch.autograd.gradcheck(function, [t.requires_grad_() for t in tensors.values()])


@pytest.mark.parametrize("biases", [False, True])
def test_opcheck(biases):
    tensors, experts = problem("gpt_oss_swiglu", biases=biases)
    tensors = {name: None if t is None else t.float().requires_grad_() for name, t in tensors.items()}
    activation = PRESETS["gpt_oss_swiglu"]
    fields = (activation.function, activation.gated, activation.alpha, activation.limit, activation.up_offset,
              activation.interleaved)
    for capacity in (None, 3):
        permutation = torch_stages.permute(experts, 5, capacity)
        up_arguments = (tensors["x"], tensors["up_weight"], tensors["up_bias"], *permutation, *fields, True)
        torch.library.opcheck(torch.ops.moe_kernels.cpu_expert_up.default, up_arguments)
        hidden = native.expert_up(tensors["x"], tensors["up_weight"], tensors["up_bias"], permutation, activation)
        down_arguments = (hidden.detach().requires_grad_(), tensors["down_weight"], tensors["down_bias"], *permutation,
                          tensors["weights"])
        torch.library.opcheck(torch.ops.moe_kernels.cpu_expert_down_combine.default, down_arguments)


# Sizes with several row tiles per expert and several column slices (at::mm's weight gradients), and with many
# experts of a few rows (the register-blocked products of stream_gemm.h, ragged column edges).
BITWISE_PROBLEMS = (dict(num_tokens=300, d=200, d_ff=136, num_experts=3, k=2), dict(num_tokens=90, d=72, d_ff=52, num_experts=24, k=4))


def _bits(threads: int, dtype: torch.dtype, sizes: dict):
    """y and every gradient of the problem of these sizes, on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors, experts = problem("swiglu", **sizes, biases=True)
        dy = torch.randn(tensors["x"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y, grads = run_stages(NATIVE, tensors, experts, dtype, "swiglu", None, dy)
        return [y, *grads.values()]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("sizes", BITWISE_PROBLEMS, ids=["large-experts", "small-experts"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_the_same_for_any_thread_count(dtype, sizes):
    one = _bits(1, dtype, sizes)
    for threads in (2, 3):  # 3 > the work items of some loops (3 experts), and not a divisor of the others
        for expected, actual in zip(one, _bits(threads, dtype, sizes)):
            assert torch.equal(expected, actual)


def test_large_weight_gradients_with_idle_experts():
    """A weight gradient of 32 MiB or more lies on pooled huge pages (huge_pages.h; fresh or kept ones): the
    experts without rows must still read as exact zeros, the others as the reference."""
    tensors, experts = problem("swiglu", num_tokens=5, d=256, d_ff=256, num_experts=64, k=2, biases=True)
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)
    exact = run_stages(PYTORCH, tensors, experts, torch.float64, "swiglu", None, dy)[1]
    baseline = run_stages(PYTORCH, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    actual = run_stages(NATIVE, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    assert actual["up_weight"].nbytes >= 32 << 20 and actual["up_weight"].data_ptr() % (2 << 20) == 0  # its own mapping
    idle = torch.ones(64, dtype=torch.bool)
    idle[experts.flatten().long()] = False
    assert 40 < int(idle.sum()) < 64
    for name in ("up_weight", "down_weight", "up_bias", "down_bias"):
        assert actual[name].is_contiguous() and torch.equal(actual[name][idle], torch.zeros_like(actual[name][idle])), name
        assert_close(actual[name].double(), baseline[name].double(), exact[name], torch.float32, 3, f"grad of {name}")
    actual["up_weight"].add_(1.0)  # an ordinary tensor: writable, and its mapping kept for reuse when freed
    assert torch.equal(actual["up_weight"][idle], torch.ones_like(actual["up_weight"][idle]))


def test_sparse_weight_gradients_on_small_pages():
    """A weight gradient under 32 MiB with at most 1/8 of its experts written lies on pooled 4 KiB pages
    (huge_pages.h): the experts without rows read as exact zeros, the others as the reference."""
    tensors, experts = problem("swiglu", num_tokens=3, d=128, d_ff=128, num_experts=64, k=2, biases=True)
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)
    exact = run_stages(PYTORCH, tensors, experts, torch.float64, "swiglu", None, dy)[1]
    baseline = run_stages(PYTORCH, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    actual = run_stages(NATIVE, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    assert actual["up_weight"].nbytes < 32 << 20 and actual["up_weight"].data_ptr() % 4096 == 0  # its own mapping
    idle = torch.ones(64, dtype=torch.bool)
    idle[experts.flatten().long()] = False
    assert int(idle.sum()) >= 56
    for name in ("up_weight", "down_weight"):
        assert actual[name].is_contiguous() and torch.equal(actual[name][idle], torch.zeros_like(actual[name][idle])), name
        assert_close(actual[name].double(), baseline[name].double(), exact[name], torch.float32, 3, f"grad of {name}")


@pytest.mark.parametrize("num_tokens", [3, 12], ids=["sparse-small-pages", "dense-huge-pages"])
def test_weight_gradients_on_reused_mappings(num_tokens):
    """A freed weight gradient's mapping is handed to the next backward (huge_pages.h MappingPool): its stale
    contents (here NaN) must not leak, the experts without rows read as exact zeros (an expert's block of
    211200 bytes is no whole number of pages: dropped pages and zero-filled edges), the others as the reference."""
    shapes = dict(d=200, d_ff=132, num_experts=64, k=2, biases=True)
    tensors, experts = problem("swiglu", num_tokens=num_tokens, **shapes, seed=1)
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)
    first = run_stages(NATIVE, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    addresses = {name: first[name].data_ptr() for name in ("up_weight", "down_weight")}
    for gradient in first.values():
        gradient.fill_(float("nan"))
    del first
    tensors, experts = problem("swiglu", num_tokens=num_tokens, **shapes, seed=2)
    exact = run_stages(PYTORCH, tensors, experts, torch.float64, "swiglu", None, dy)[1]
    baseline = run_stages(PYTORCH, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    actual = run_stages(NATIVE, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    idle = torch.ones(64, dtype=torch.bool)
    idle[experts.flatten().long()] = False
    assert 40 < int(idle.sum()) < 64
    for name in ("up_weight", "down_weight", "up_bias", "down_bias"):
        if name in addresses:
            assert actual[name].data_ptr() == addresses[name], f"{name}: the freed mapping was not reused"
        assert actual[name].is_contiguous() and torch.equal(actual[name][idle], torch.zeros_like(actual[name][idle])), name
        assert_close(actual[name].double(), baseline[name].double(), exact[name], torch.float32, 3, f"grad of {name}")


def test_release_cpu_memory_gives_the_kept_mappings_back():
    """moe_kernels.release_cpu_memory() unmaps every kept gradient mapping (at least the two just freed) and
    returns their bytes; after it the pool holds nothing, and the next backward maps afresh."""
    tensors, experts = problem("swiglu", num_tokens=12, d=200, d_ff=132, num_experts=64, k=2)
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)
    grads = run_stages(NATIVE, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    freed = grads["up_weight"].nbytes + grads["down_weight"].nbytes
    del grads
    assert moe_kernels.release_cpu_memory() >= freed
    assert moe_kernels.release_cpu_memory() == 0
    exact = run_stages(PYTORCH, tensors, experts, torch.float64, "swiglu", None, dy)[1]
    baseline = run_stages(PYTORCH, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    actual = run_stages(NATIVE, tensors, experts, torch.float32, "swiglu", None, dy)[1]
    for name in ("up_weight", "down_weight"):
        assert_close(actual[name].double(), baseline[name].double(), exact[name], torch.float32, 3, f"grad of {name}")


def test_weights_of_any_strides_and_dtype():
    """Expert-minor strides (stride(0) = 1) and float32 weights under float64 x give the contiguous result."""
    tensors, experts = problem("swiglu", biases=True)
    permutation = torch_stages.permute(experts, 5, None)
    expected = native.expert_down_combine(
        native.expert_up(tensors["x"], tensors["up_weight"], tensors["up_bias"], permutation, PRESETS["swiglu"]),
        tensors["down_weight"], tensors["down_bias"], permutation, tensors["weights"])
    up_minor = tensors["up_weight"].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    down_minor = tensors["down_weight"].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert up_minor.stride(0) == 1 and torch.equal(up_minor, tensors["up_weight"])
    hidden = native.expert_up(tensors["x"], up_minor, tensors["up_bias"], permutation, PRESETS["swiglu"])
    y = native.expert_down_combine(hidden, down_minor, tensors["down_bias"], permutation, tensors["weights"])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    hidden32 = native.expert_up(tensors["x"], tensors["up_weight"].float(), None, permutation, PRESETS["swiglu"])
    assert hidden32.dtype == torch.float64


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weights=torch.rand(13, 2)), "weights must be a"),
        (dict(function="tanh"), "function must be"),
        (dict(tokens_per_expert=torch.tensor([99, 0, 0, 0, 0], dtype=torch.int32)), "does not fit expert_offsets"),
    ],
)
def test_bad_arguments_are_named(change, message):
    tensors, experts = problem("swiglu")
    permutation = dict(zip(("tokens_per_expert", "expert_offsets", "sorted_rows", "sorted_assignments"),
                           torch_stages.permute(experts, 5, None)))
    permutation.update({key: value for key, value in change.items() if key in permutation})
    function = change.get("function", "silu")
    with pytest.raises(RuntimeError, match=message):
        hidden, _ = torch.ops.moe_kernels.cpu_expert_up(
            tensors["x"], tensors["up_weight"], None, *permutation.values(), function, True, 1.0, None, 0.0, False, False)
        torch.ops.moe_kernels.cpu_expert_down_combine(
            hidden, tensors["down_weight"], None, *permutation.values(), change.get("weights", tensors["weights"]))


def _fused(tensors, experts, dtype, activation, capacity):
    """y by moe_kernels::cpu_experts_forward (native.experts_forward), no gradient recorded."""
    values = {name: None if t is None else t.to(dtype) for name, t in tensors.items()}
    with torch.no_grad():
        return native.experts_forward(values["x"], experts, tensors["weights"].to(torch.promote_types(dtype, torch.float32)),
                                      capacity, values["up_weight"], values["up_bias"], values["down_weight"],
                                      values["down_bias"], PRESETS[activation])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "gpt_oss_swiglu", "relu"])
@pytest.mark.parametrize("biases,capacity,num_tokens", [(False, None, 13), (True, None, 1), (True, 3, 13), (False, 0, 4),
                                                        (False, None, 0), (True, None, 300)])
def test_fused_forward_is_the_stages_bitwise(activation, dtype, biases, capacity, num_tokens):
    """The fused no-gradient op gives the very bits of the staged ops with gradients (the grad/no-grad contract),
    at sizes from T = 0 and 1 to several row tiles per expert."""
    tensors, experts = problem(activation, num_tokens=num_tokens, d=200, d_ff=40, biases=biases,
                               seed=zlib.crc32(f"{activation}{dtype}{biases}{capacity}{num_tokens}".encode()))
    dy = torch.randn(tensors["x"].shape, dtype=torch.float64)
    staged = run_stages(NATIVE, tensors, experts, dtype, activation, capacity, dy)[0]
    fused = _fused(tensors, experts, dtype, activation, capacity)
    assert fused.dtype == dtype and fused.shape == staged.shape
    assert torch.equal(fused, staged.detach())


def test_fused_forward_opcheck():
    tensors, experts = problem("gpt_oss_swiglu", biases=True)
    activation = PRESETS["gpt_oss_swiglu"]
    fields = (activation.function, activation.gated, activation.alpha, activation.limit, activation.up_offset,
              activation.interleaved)
    t = {name: value.float() for name, value in tensors.items()}
    for capacity in (None, 3):
        arguments = (t["x"], experts, t["weights"], capacity, t["up_weight"], t["up_bias"], t["down_weight"],
                     t["down_bias"], *fields)
        torch.library.opcheck(torch.ops.moe_kernels.cpu_experts_forward.default, arguments,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(weights=torch.rand(13, 2)), "weights must be a"),
        (dict(experts=torch.full((13, 2), 5, dtype=torch.int32)), r"expert ids must lie in \[0, num_experts=5\)"),
        (dict(experts=torch.zeros(12, 2, dtype=torch.int32)), r"experts must be \[T=13, S\]"),
        (dict(down_weight=torch.rand(4, 12, 10, dtype=torch.float64)), r"down_weight must be \[E=5"),
        (dict(down_weight=torch.rand(5, 12, 9, dtype=torch.float64)), r"down_weight must be \[E, d, d_ff=10\]"),
        (dict(function="tanh"), "function must be"),
    ],
)
def test_fused_forward_bad_arguments_are_named(change, message):
    tensors, experts = problem("swiglu")
    values = {**tensors, "experts": experts, **change}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.moe_kernels.cpu_experts_forward(
            values["x"], values["experts"], values["weights"], None, values["up_weight"], None, values["down_weight"],
            None, change.get("function", "silu"), True, 1.0, None, 0.0, False)


def test_parallel_loops_are_compiled_in():
    """The extension is built with OpenMP (setup.py's -fopenmp): at::parallel_for's loop is compiled into its
    caller, and without the flag every loop of the CPU path ran on one thread (the thread-count tests passed
    trivially)."""
    assert b"GOMP_parallel" in pathlib.Path(native._C.__file__).read_bytes()
