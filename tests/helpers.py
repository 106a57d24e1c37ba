"""Building layers and comparing against the float64 reference, shared by the test files.

Tolerance rule (flash-attention's): a fast result's error against the float64 reference may be at most
``factor`` times the error of the reference layer run at the same precision (2 for outputs, 3 for
gradients), with a floor of ``RELATIVE_FLOOR[dtype]`` times the reference's magnitude.
"""
from __future__ import annotations

import copy

import pytest
import torch

import moe_kernels
from moe_kernels import reference
from moe_kernels.pipeline import Permutation, num_sorted_rows

BACKENDS = ("torch", "triton")
RELATIVE_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def randomize_(layer: torch.nn.Module, skew: bool = False) -> torch.nn.Module:
    """Fresh N(0, σ) parameters and floating-point buffers (σ keeps activations O(1)); ``skew`` makes expert 0
    win every token."""
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
        for buffer in layer.buffers():
            if buffer.is_floating_point():
                buffer.normal_(0.0, 0.1)
        if skew:
            layer.gate.weight[0] += 50.0 * layer.gate.weight[0].sign()
    return layer


def skewed_input(shape, skew: bool, layer) -> torch.Tensor:
    """Random tokens; with ``skew`` each token is aligned with expert 0's gate row so it always wins."""
    x = torch.randn(shape)
    if skew:
        x = x + 3.0 * layer.gate.weight[0].sign()
    return x


def layer_triplet(dtype: torch.dtype, backend: str = "torch", skew: bool = False, **arguments):
    """(reference in float64, reference in dtype, fast layer in dtype), all with the same parameters."""
    base = randomize_(reference.MoE(**arguments), skew)
    reference64 = copy.deepcopy(base).double()
    reference_low = copy.deepcopy(base).to(dtype)
    fast = moe_kernels.MoE.from_reference(copy.deepcopy(base).to(dtype), backend=backend)
    return reference64, reference_low, fast


def run(layer, x: torch.Tensor, dy: torch.Tensor, seed: int):
    """Forward and backward of y·dy + aux_loss; returns y, aux_loss and every gradient (x first) in float64."""
    some_parameter = next(layer.parameters())
    x = x.detach().to(some_parameter.device, some_parameter.dtype).requires_grad_()
    torch.manual_seed(seed)
    y = layer(x)
    loss = (y.double() * dy.to(y.device)).sum() + layer.aux_loss.double()
    parameters = list(layer.parameters())
    grads = torch.autograd.grad(loss, [x] + parameters, allow_unused=True)
    grads = [torch.zeros_like(p, dtype=torch.float64) if g is None else g.double() for p, g in zip([x] + parameters, grads)]
    return y.double().cpu(), layer.aux_loss.double().cpu(), [g.cpu() for g in grads]


def assert_close(actual, baseline, exact, dtype, factor: float, what: str):
    """|actual − exact| ≤ max(factor·|baseline − exact|, floor·max|exact|), elementwise maxima."""
    scale = exact.abs().max().item() if exact.numel() else 0.0
    error = (actual - exact).abs().max().item() if exact.numel() else 0.0
    baseline_error = (baseline - exact).abs().max().item() if exact.numel() else 0.0
    bound = max(factor * baseline_error, RELATIVE_FLOOR[dtype] * scale, 1e-12)
    assert error <= bound, f"{what}: error {error:.3g} > bound {bound:.3g} (baseline error {baseline_error:.3g}, scale {scale:.3g})"


def assert_layer_matches(reference64, reference_low, fast, x, dtype, seed: int = 0):
    """The fast layer's output, aux_loss and every gradient against the float64 reference."""
    dy = torch.randn(x.shape, dtype=torch.float64)
    exact = run(reference64, x, dy, seed)
    baseline = run(reference_low, x, dy, seed)
    actual = run(fast, x, dy, seed)
    assert_close(actual[0], baseline[0], exact[0], dtype, 2, "output")
    assert_close(actual[1], baseline[1], exact[1], dtype, 2, "aux_loss")
    names = ["x"] + [name for name, _ in fast.named_parameters()]
    for name, a, b, e in zip(names, actual[2], baseline[2], exact[2]):
        assert_close(a, b, e, dtype, 3, f"grad of {name}")


def skip_unless_runnable(backend: str) -> None:
    """Skip (with the reason) a backend this machine cannot run."""
    if backend not in moe_kernels.available_backends():
        pytest.skip(f"backend {backend!r} is not installed")


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def padded_permutation(permutation: Permutation, block_m: int) -> Permutation:
    """The block_m = 1 permutation of backend "torch" re-laid out with every segment starting at a multiple of block_m."""
    if block_m == 1:
        return permutation
    num_tokens, k = permutation.sorted_rows.shape
    num_experts = permutation.tokens_per_expert.shape[0]
    counts = permutation.tokens_per_expert.long()
    starts = torch.zeros(num_experts + 1, dtype=torch.long)
    starts[1:] = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)
    old_rows = permutation.sorted_rows.reshape(-1).long()
    kept = old_rows >= 0
    old_starts = permutation.expert_offsets.long()
    experts = torch.searchsorted(old_starts[1:], old_rows, right=True)
    new_rows = torch.where(kept, starts[experts.clamp(max=num_experts - 1)] + old_rows - old_starts[experts.clamp(max=num_experts - 1)], -1)
    sorted_assignments = torch.full((num_sorted_rows(num_tokens, k, num_experts, block_m),), -1, dtype=torch.int32)
    sorted_assignments[new_rows[kept]] = torch.arange(num_tokens * k)[kept].to(torch.int32)
    return Permutation(
        tokens_per_expert=permutation.tokens_per_expert,
        expert_offsets=starts.to(torch.int32),
        sorted_rows=new_rows.view(num_tokens, k).to(torch.int32),
        sorted_assignments=sorted_assignments,
    )


def router_logits(num_tokens, num_experts, data, seed):
    """[T, E] float32: "normal", "skewed" (expert 0 takes every token, the last none) or "ties" (integers)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    if data == "skewed" and num_experts > 1:
        logits[:, 0] += 30.0
        logits[:, -1] -= 30.0
    if data == "ties":
        logits = torch.randint(-2, 3, (num_tokens, num_experts), generator=generator).float()
    return logits


def assert_close_to_float64(kernel, reference32, reference64, factor, rows=slice(None)):
    """max|kernel - ref64| ≤ factor·max|torch32 - ref64| + 1e-6·(1 + max|ref64|), over the chosen rows."""
    kernel, reference32, reference64 = kernel[rows].double(), reference32[rows].double(), reference64[rows]
    if reference64.numel() == 0:
        return
    error = (kernel - reference64).abs().max().item()
    bound = factor * (reference32 - reference64).abs().max().item() + 1e-6 * (1 + reference64.abs().max().item())
    assert error <= bound, f"error against float64 {error:.3g} over the bound {bound:.3g}"
