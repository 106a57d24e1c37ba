"""Grouped GEMM and combine kernels (moe_kernels/kernels/) against backend "torch" and its float64 autograd.

Runs on the CPU under the Triton interpreter (TRITON_INTERPRET=1, chosen by conftest.py) and on CUDA. Tolerances, as the error relative to max(1, max|reference|) against the float64 reference:
float32 5e-6, float16 5e-3, bfloat16 4e-2. Measured at d=16, d_ff=32 (where backend "torch" runs at
these precisions on the CPU), the kernels' errors were within 1.3× of plain PyTorch's at the same
precision: ~2e-7 for float32 (the float64 reference itself combines in float32), ~1e-3 for float16. Every uninitialised allocation is
NaN-filled while the kernels run, so any read of a row no kernel wrote (padding, dropped assignments)
shows up as NaN in the results.
"""
import dataclasses
import math
import os

import pytest
import torch

pytest.importorskip("triton")

from helpers import padded_permutation  # noqa: E402
from moe_kernels import ops  # noqa: E402
from moe_kernels.activations import Activation, is_gated  # noqa: E402
from moe_kernels.backends import pytorch as torch_backend  # noqa: E402
from moe_kernels.kernels import grouped_gemm, tiles  # noqa: E402
from moe_kernels.kernels.combine import combine  # noqa: E402
from moe_kernels.pipeline import Permutation, expert_capacity, num_sorted_rows  # noqa: E402


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
TOLERANCE = {torch.float32: 5e-6, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# bfloat16 runs under the interpreter too: conftest.py's fixture computes its tl.dot in float32.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_experts(num_tokens: int, k: int, num_experts: int, routing: str) -> torch.Tensor:
    """[T, k] distinct experts per token. uniform: random; skewed: every token picks experts 0..k-1 (expert 0
    gets every token); sparse: random among the even experts only (the odd ones get none)."""
    if routing == "skewed":
        return torch.arange(k).expand(num_tokens, k).contiguous()
    scores = torch.rand(num_tokens, num_experts)
    if routing == "sparse":
        scores[:, 1::2] = -1.0
    return scores.topk(k, dim=1).indices


class Problem:
    """Random inputs of one layer, its permutation, and the float64 reference through backend "torch"."""

    def __init__(self, num_tokens, k, num_experts, d, d_ff, activation, block_m, routing, capacity_factor, dtype, biases=False):
        self.activation = activation
        experts = make_experts(num_tokens, k, num_experts, routing)
        capacity = expert_capacity(capacity_factor, num_tokens, k, num_experts)
        block_1 = torch_backend.permute(experts, num_experts, capacity)
        self.reference_permutation = block_1
        self.permutation = Permutation(*(t.to(DEVICE) for t in padded_permutation(block_1, block_m)))
        n_up = 2 * d_ff if is_gated(activation) else d_ff
        # Float64 values representable in dtype: the reference computes on the very numbers the kernels
        # read, so the comparison measures the kernels' rounding, not the inputs' (in bfloat16 a rounded
        # input can flip the sign of a pre-activation near 0 and with it a whole ReLU gradient term).
        representable = lambda tensor: tensor.to(dtype).double()  # noqa: E731
        self.x = representable(torch.randn(num_tokens, d, dtype=torch.float64))
        self.up_weight = representable(torch.randn(num_experts, n_up, d, dtype=torch.float64) / math.sqrt(d))
        self.down_weight = representable(torch.randn(num_experts, d, d_ff, dtype=torch.float64) / math.sqrt(d_ff))
        self.weights = torch.rand(num_tokens, k, dtype=torch.float32).double()
        self.grad_y = representable(torch.randn(num_tokens, d, dtype=torch.float64))
        self.up_bias = representable(torch.randn(num_experts, n_up, dtype=torch.float64)) if biases else None
        self.down_bias = representable(torch.randn(num_experts, d, dtype=torch.float64)) if biases else None
        self.dtype = dtype

    def cast(self, tensor):
        return tensor.to(device=DEVICE, dtype=self.dtype)

    def reference(self):
        """Forward and gradients of the torch stages in float64 (block_m = 1 rows, mapped back per assignment):
        hidden, y, d(hidden) and the gradients of x, up_weight, down_weight, weights (and the biases)."""
        tensors = (self.x, self.up_weight, self.down_weight, self.weights, self.up_bias, self.down_bias)
        leaves = [t.clone().requires_grad_() for t in tensors if t is not None]
        x, up_weight, down_weight, weights, *biases = leaves
        up_bias, down_bias = biases or (None, None)
        hidden = torch_backend.expert_up(x, up_weight, up_bias, self.reference_permutation, self.activation)
        hidden.retain_grad()
        y = torch_backend.expert_down_combine(hidden, down_weight, down_bias, self.reference_permutation, weights)
        y.backward(self.grad_y)
        return hidden.detach(), y.detach(), hidden.grad, [leaf.grad for leaf in leaves]

    def kept_rows(self, rows, permutation):
        """rows [R, n] → [T·k, n] by assignment, zero for dropped ones (the padding never compared)."""
        sorted_rows = permutation.sorted_rows.reshape(-1).long().cpu()
        picked = rows.cpu().double()[sorted_rows.clamp(min=0)]
        return torch.where((sorted_rows >= 0)[:, None], picked, 0.0)


def assert_close(actual, expected, dtype):
    actual = actual.cpu().double()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values: a kernel read memory no kernel wrote"
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} > {TOLERANCE[dtype]:.0e} × {scale:.3g}"


# GPT-OSS's clamped, interleaved SwiGLU with a limit small enough that both clamps engage on O(1) values.
CLAMPED = Activation("silu", gated=True, alpha=1.702, limit=0.5, up_offset=1.0, interleaved=True)
# (T, k, E, d, d_ff, activation, block_m, routing, capacity_factor)
CASES = [
    (1, 1, 4, 19, 37, "swiglu", 16, "uniform", None),
    (150, 2, 8, 19, 37, "swiglu", 16, "uniform", None),
    (150, 8, 64, 19, 37, "geglu", 16, "uniform", None),
    (150, 2, 8, 19, 37, "relu", 1, "skewed", None),
    (150, 1, 8, 37, 19, "gelu", 1, "uniform", 0.5),
    (150, 4, 16, 19, 37, "silu", 16, "sparse", 1.0),
    (40, 8, 8, 16, 32, "swiglu", 1, "uniform", None),
    (150, 2, 8, 19, 37, CLAMPED, 16, "uniform", None),
    # Qwen3/8's widths at 32 rows per expert (prefill tiles): GEMM 2 reduces d_ff = 96 in steps of 32 (16-bit), the
    # d(hidden) GEMM takes d_ff as one band of three 32-column sub-tiles and the d(x) GEMM d = 256 as one band of two
    # blocks, and the weight gradients' sub-tiles cover d_ff (and d = 256) whole (tiles.py's col_tiles).
    (64, 2, 4, 256, 96, "swiglu", 1, "uniform", None),
    # Switch/8's widths at 32 rows per expert: d = 96 as three column sub-tiles of 32 in the d(x) GEMM and along
    # the token side of both weight gradients, whose row side (d_ff = 384) takes bands of two 128-blocks, the
    # last with one block past the end (tiles.row_gemm_tiles' col_tiles, weight_grad_tiles' sub-tiles).
    (128, 1, 4, 96, 384, "relu", 1, "uniform", None),
]
CASE_IDS = ["T1", "k2-E8", "k8-E64", "skewed", "capacity-drops", "empty-experts+drops", "k-eq-E", "clamped-interleaved", "narrow-d_ff", "narrow-d"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_backward_match_torch_backend(case, dtype, poisoned_allocations):
    if case[5] is CLAMPED and dtype != torch.float32:
        pytest.skip("the clamps' gradient jumps at ±limit, and 16-bit rounding of the pre-activation moves values "
                    "across it: the clamped activation is compared in float32 here and in float64 by gradcheck")
    torch.manual_seed(0)
    problem = Problem(*case, dtype=dtype)
    permutation = problem.permutation
    hidden_ref, y_ref, grad_hidden_ref, grads_ref = problem.reference()
    x, up_weight, down_weight = problem.cast(problem.x), problem.cast(problem.up_weight), problem.cast(problem.down_weight)
    weights = problem.weights.float().to(DEVICE)

    hidden = grouped_gemm.expert_up_forward(x, up_weight, None, permutation, problem.activation)[0]
    y = grouped_gemm.expert_down_combine_forward(hidden, down_weight, None, permutation, weights)
    assert hidden.dtype == dtype and y.dtype == dtype
    assert hidden.shape[0] == num_sorted_rows(x.shape[0], case[1], case[2], case[6])
    assert_close(problem.kept_rows(hidden, permutation), problem.kept_rows(hidden_ref, problem.reference_permutation), dtype)
    assert_close(y, y_ref, dtype)

    grad_hidden, grad_down_weight, _, grad_weights = grouped_gemm.expert_down_combine_backward(
        problem.cast(problem.grad_y), hidden, down_weight, None, permutation, weights
    )
    grad_x, grad_up_weight, _ = grouped_gemm.expert_up_backward(grad_hidden, x, up_weight, None, permutation, problem.activation)
    grad_x_ref, grad_up_ref, grad_down_ref, grad_weights_ref = grads_ref
    assert_close(problem.kept_rows(grad_hidden, permutation), problem.kept_rows(grad_hidden_ref, problem.reference_permutation), dtype)
    assert_close(grad_x, grad_x_ref, dtype)
    assert_close(grad_up_weight, grad_up_ref, dtype)
    assert_close(grad_down_weight, grad_down_ref, dtype)
    assert_close(grad_weights, grad_weights_ref, torch.float32 if dtype == torch.float32 else dtype)
    assert grad_weights.dtype == torch.float32

    unused = permutation.tokens_per_expert.cpu() == 0
    assert (grad_up_weight.cpu()[unused] == 0).all() and (grad_down_weight.cpu()[unused] == 0).all()
    dropped = permutation.sorted_rows.cpu() < 0
    assert (grad_weights.cpu()[dropped] == 0).all()


def test_empty_batch_launches_nothing(monkeypatch):
    permutation = Permutation(*(t.to(DEVICE) for t in padded_permutation(torch_backend.permute(torch.zeros(0, 2, dtype=torch.long), 4, None), 16)))
    for launcher in ("_up_launch", "_rows_times_weights", "_expert_weight_grad", "combine", "_expert_down_bwd_kernel"):
        monkeypatch.setattr(grouped_gemm, launcher, None)
    x = torch.randn(0, 19, device=DEVICE)
    up_weight = torch.randn(4, 74, 19, device=DEVICE)
    down_weight = torch.randn(4, 19, 37, device=DEVICE)
    weights = torch.rand(0, 2, device=DEVICE)
    hidden = grouped_gemm.expert_up_forward(x, up_weight, None, permutation, "swiglu")[0]
    y = grouped_gemm.expert_down_combine_forward(hidden, down_weight, None, permutation, weights)
    assert hidden.shape == (num_sorted_rows(0, 2, 4, 16), 37) and y.shape == (0, 19)
    grad_hidden, grad_down_weight, _, grad_weights = grouped_gemm.expert_down_combine_backward(y, hidden, down_weight, None, permutation, weights)
    grad_x, grad_up_weight, _ = grouped_gemm.expert_up_backward(grad_hidden, x, up_weight, None, permutation, "swiglu")
    assert grad_x.shape == (0, 19) and grad_weights.shape == (0, 2)
    assert (grad_up_weight == 0).all() and (grad_down_weight == 0).all()


def test_strided_inputs_and_nan_token(poisoned_allocations):
    """Non-contiguous x, dy and weights are read through their strides; a NaN token poisons only its own rows."""
    torch.manual_seed(1)
    problem = Problem(60, 2, 8, 19, 37, "swiglu", 16, "uniform", 0.75, torch.float32)
    problem.x[7] = float("nan")
    hidden_ref, y_ref, _, grads_ref = problem.reference()
    permutation = problem.permutation
    x = problem.x.float().to(DEVICE).t().contiguous().t()  # column-major
    up_weight = problem.up_weight.float().to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    down_weight = problem.down_weight.float().to(DEVICE)
    weights = problem.weights.float().to(DEVICE).t().contiguous().t()
    grad_y = torch.stack([problem.grad_y.float(), torch.zeros_like(problem.grad_y.float())], dim=2)[:, :, 0].to(DEVICE)
    assert not x.is_contiguous() and not up_weight.is_contiguous() and not grad_y.is_contiguous()

    hidden = grouped_gemm.expert_up_forward(x, up_weight, None, permutation, "swiglu")[0]
    y = grouped_gemm.expert_down_combine_forward(hidden, down_weight, None, permutation, weights)
    grad_hidden, _, _, grad_weights = grouped_gemm.expert_down_combine_backward(grad_y, hidden, down_weight, None, permutation, weights)
    grad_x, _, _ = grouped_gemm.expert_up_backward(grad_hidden, x, up_weight, None, permutation, "swiglu")

    nan_rows = torch.zeros(60, dtype=torch.bool)
    nan_rows[7] = (problem.reference_permutation.sorted_rows[7] >= 0).any()
    assert torch.equal(torch.isnan(y.cpu()).any(1), nan_rows)
    assert torch.equal(torch.isnan(grad_x.cpu()).any(1), nan_rows)
    assert torch.equal(torch.isnan(grad_weights.cpu()).any(1), nan_rows)
    finite = ~nan_rows
    assert_close(y[finite], y_ref[finite], torch.float32)
    assert_close(grad_x[finite], grads_ref[0][finite], torch.float32)
    assert_close(grad_weights[finite], grads_ref[3][finite], torch.float32)


def test_results_are_bitwise_deterministic():
    torch.manual_seed(2)
    problem = Problem(100, 4, 8, 19, 37, "swiglu", 16, "skewed", None, torch.float32)
    x, up_weight, down_weight = problem.cast(problem.x), problem.cast(problem.up_weight), problem.cast(problem.down_weight)
    weights, grad_y = problem.weights.float().to(DEVICE), problem.cast(problem.grad_y)

    def run():
        hidden = grouped_gemm.expert_up_forward(x, up_weight, None, problem.permutation, "swiglu")[0]
        y = grouped_gemm.expert_down_combine_forward(hidden, down_weight, None, problem.permutation, weights)
        grad_hidden, grad_down, _, grad_weights = grouped_gemm.expert_down_combine_backward(grad_y, hidden, down_weight, None, problem.permutation, weights)
        grad_x, grad_up, _ = grouped_gemm.expert_up_backward(grad_hidden, x, up_weight, None, problem.permutation, "swiglu")
        return y, grad_x, grad_up, grad_down, grad_weights

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_combine_skips_dropped_slots_and_sums_in_slot_order():
    per_assignment = torch.tensor([[1.0, 2.0], [float("nan"), float("inf")], [3.0, 4.0], [5.0, 6.0]], device=DEVICE)
    sorted_rows = torch.tensor([[0, -1], [2, 3]], dtype=torch.int32, device=DEVICE)
    weights = torch.tensor([[0.5, 0.0], [1.0, 2.0]], device=DEVICE)
    assert torch.equal(combine(per_assignment, sorted_rows, weights).cpu(), torch.tensor([[0.5, 1.0], [13.0, 16.0]]))
    assert torch.equal(combine(per_assignment, sorted_rows).cpu(), torch.tensor([[1.0, 2.0], [8.0, 10.0]]))


# Tile choices the policy makes on other GPUs or at other shapes than these small problems, forced through
# tiles.overridden: the sm_80 layout (no A/B swap), prefill tiles (several row tiles per expert, GROUP_M
# order), split-K (GEMM 2 and the d(x) GEMM reduce their partials in the combine), minimal tiles,
# sub-tiles (one weight chunk applied to several MMAs of 16 rows, those without a row skipped), and column
# sub-tiles (one chunk of rows applied to several blocks of 16 columns, those without a column skipped; in
# the weight gradients along both sides: WEIGHT_GRAD_VARIANTS).
VARIANTS = {
    "policy": {},
    "no-swap": dict(swap_ab=False),
    "prefill": dict(block_m=16, block_n=16, block_k=16, group_m=4, swap_ab=False, sub_tiles=1),
    "split-k": dict(block_k=16, split_k=2),
    "tiny-swapped": dict(block_m=16, block_n=16, block_k=16, group_m=2, swap_ab=True, sub_tiles=1),
    "sub-tiles": dict(block_m=64, block_n=16, block_k=16, group_m=2, swap_ab=False, sub_tiles=4),
    "sub-tiles-swapped": dict(block_m=32, block_n=16, block_k=16, group_m=1, swap_ab=True, sub_tiles=2),
    "col-tiles": dict(block_m=32, block_n=16, block_k=16, group_m=2, swap_ab=False, sub_tiles=2, col_tiles=3),
    "col-tiles-swapped": dict(block_m=32, block_n=16, block_k=16, group_m=1, swap_ab=True, sub_tiles=2, col_tiles=2),
}
WEIGHT_GRAD_VARIANTS = {
    "col-tiles": dict(block_m=16, block_n=16, block_k=16, col_tiles=3, col_tiles_k=2),
    "col-tiles-swapped": dict(block_n=16, block_k=16, col_tiles=2, col_tiles_k=3),
}


def forced(variant):
    """An override that applies VARIANTS[variant] to every row GEMM (split-K only where it may split) and
    WEIGHT_GRAD_VARIANTS[variant], if any, to every weight gradient."""
    def override(kind, shape, chosen):
        if kind != "row":
            return dataclasses.replace(chosen, **WEIGHT_GRAD_VARIANTS.get(variant, {}))
        changes = dict(VARIANTS[variant])
        if not shape["may_split_k"]:
            changes.pop("split_k", None)
        return dataclasses.replace(chosen, **changes)
    return override


# (T, k, E, d, d_ff, activation, block_m, routing, capacity_factor): k = 1 with drops (GEMM 2 writes y
# itself and zero-fills the dropped tokens), k = 2 on a padded layout, every token on expert 0.
BIAS_CASES = [
    (70, 1, 4, 19, 37, "relu", 1, "uniform", 0.75),
    (70, 2, 4, 19, 37, "swiglu", 16, "uniform", None),
    (70, 2, 4, 19, 37, "gpt_oss_swiglu", 1, "skewed", None),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", BIAS_CASES, ids=["k1-drops", "k2-padded", "skewed-interleaved"])
def test_biases_and_tile_variants(case, variant, poisoned_allocations):
    """Forward and backward with expert biases, float32, under each forced tile variant."""
    torch.manual_seed(4)
    problem = Problem(*case, dtype=torch.float32, biases=True)
    permutation = problem.permutation
    hidden_ref, y_ref, _, grads_ref = problem.reference()
    x, up_weight, down_weight = problem.cast(problem.x), problem.cast(problem.up_weight), problem.cast(problem.down_weight)
    up_bias, down_bias = problem.cast(problem.up_bias), problem.cast(problem.down_bias)
    weights = problem.weights.float().to(DEVICE)
    with tiles.overridden(forced(variant)):
        hidden, _ = grouped_gemm.expert_up_forward(x, up_weight, up_bias, permutation, problem.activation)
        y = grouped_gemm.expert_down_combine_forward(hidden, down_weight, down_bias, permutation, weights)
        grad_hidden, grad_down_weight, grad_down_bias, grad_weights = grouped_gemm.expert_down_combine_backward(
            problem.cast(problem.grad_y), hidden, down_weight, down_bias, permutation, weights
        )
        grad_x, grad_up_weight, grad_up_bias = grouped_gemm.expert_up_backward(
            grad_hidden, x, up_weight, up_bias, permutation, problem.activation
        )
    assert_close(problem.kept_rows(hidden, permutation), problem.kept_rows(hidden_ref, problem.reference_permutation), torch.float32)
    assert_close(y, y_ref, torch.float32)
    for actual, expected in zip((grad_x, grad_up_weight, grad_down_weight, grad_weights, grad_up_bias, grad_down_bias), grads_ref):
        assert_close(actual, expected, torch.float32)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_stored_pre_activation_gives_the_recomputed_gradients(activation, poisoned_allocations):
    """store_pre_activation: GEMM 1 writes the pre-activation and the backward reads it instead of
    recomputing it; the gradients agree with the recomputing path (both float32, same kernels' sums)."""
    torch.manual_seed(5)
    problem = Problem(70, 2, 4, 19, 37, activation, 1, "uniform", None, torch.float32, biases=True)
    permutation = problem.permutation
    x, up_weight, up_bias = problem.cast(problem.x), problem.cast(problem.up_weight), problem.cast(problem.up_bias)
    grad_hidden = torch.randn(permutation.sorted_assignments.shape[0], 37, device=DEVICE)
    _, pre = grouped_gemm.expert_up_forward(x, up_weight, up_bias, permutation, activation, store_pre_activation=True)
    assert pre.shape == (permutation.sorted_assignments.shape[0], up_weight.shape[1])
    for expert in range(4):
        start, count = permutation.expert_offsets[expert].item(), permutation.tokens_per_expert[expert].item()
        rows = slice(start, start + count)
        expected_pre = x[permutation.sorted_assignments[rows].long() // 2] @ up_weight[expert].t() + up_bias[expert]
        assert_close(pre[rows], expected_pre.double(), torch.float32)
    stored = grouped_gemm.expert_up_backward(grad_hidden, x, up_weight, up_bias, permutation, activation, pre)
    recomputed = grouped_gemm.expert_up_backward(grad_hidden, x, up_weight, up_bias, permutation, activation)
    for actual, expected in zip(stored, recomputed):
        assert_close(actual, expected.double(), torch.float32)


@pytest.mark.parametrize("activation,block_m", [("swiglu", 16), ("gelu", 1), (CLAMPED, 16)], ids=["swiglu", "gelu", "clamped"])
def test_autograd_functions_gradcheck_float64(activation, block_m):
    """ops.expert_up ∘ ops.expert_down_combine (custom ops) under torch.autograd.gradcheck; the interpreter runs float64 tl.dot."""
    if DEVICE == "cuda":
        pytest.skip("float64 gradcheck runs under the interpreter; the GPU path is covered by the comparisons above")
    torch.manual_seed(3)
    problem = Problem(6, 2, 4, 5, 7, activation, block_m, "uniform", 0.75, torch.float64)
    permutation = problem.permutation
    inputs = [t.clone().requires_grad_() for t in (problem.x, problem.up_weight, problem.down_weight, problem.weights)]

    def layer(x, up_weight, down_weight, weights):
        hidden = ops.expert_up(x, up_weight, None, permutation, activation)
        return ops.expert_down_combine(hidden, down_weight, None, permutation, weights)

    # fast_mode: random projections of the Jacobian, a few dozen interpreted launches instead of ~1000.
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-8, fast_mode=True)
