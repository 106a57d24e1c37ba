"""Backend "torch": the pipeline's stages as vectorised PyTorch, differentiable through plain autograd.

No Python loop over experts: one sort builds the permutation, ``torch._grouped_mm`` runs every expert's
GEMM in one call (a padded batched matmul where grouped_mm does not apply), and the combine is a gather
plus a fixed-order sum over k. This is the CPU path and the correctness baseline of the kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import native
from ..activations import Activation, activate
from ..pipeline import Permutation, run_routed_experts


def permute(experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
    """experts [T, k] int → Permutation with block_m = 1 (no padding); see pipeline's layout."""
    num_tokens, k = experts.shape
    device = experts.device
    # Slot-major flattening makes a stable sort by expert yield the capacity priority order directly.
    slot_major_experts = experts.t().reshape(-1).long()
    order = torch.sort(slot_major_experts, stable=True).indices
    counts = torch.bincount(slot_major_experts, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(num_tokens * k, device=device) - starts[slot_major_experts[order]]
    kept = torch.ones_like(order, dtype=torch.bool) if capacity is None else rank_in_expert < capacity
    kept_counts = counts if capacity is None else counts.clamp(max=capacity)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(kept_counts, 0)

    # order[i] is a slot-major index s·T + t; the pipeline numbers assignments token-major, t·k + s.
    slot, token = order // max(num_tokens, 1), order % max(num_tokens, 1)
    assignment = token * k + slot
    rows = offsets[slot_major_experts[order]] + rank_in_expert
    sorted_rows = torch.full((num_tokens * k,), -1, dtype=torch.int32, device=device)
    sorted_rows[assignment[kept]] = rows[kept].to(torch.int32)
    sorted_assignments = torch.full((num_tokens * k,), -1, dtype=torch.int32, device=device)
    sorted_assignments[rows[kept]] = assignment[kept].to(torch.int32)
    return Permutation(
        tokens_per_expert=kept_counts.to(torch.int32),
        expert_offsets=offsets.to(torch.int32),
        sorted_rows=sorted_rows.view(num_tokens, k),
        sorted_assignments=sorted_assignments,
    )


def _grouped_mm_applies(rows: Tensor, weight: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and rows.dtype != torch.bfloat16:
        return False  # _grouped_mm's meta function (what torch.compile traces) accepts only bfloat16
    if 1 not in weight.stride()[1:]:
        return False  # each expert's matrix needs a unit stride (expert-minor layouts do not have one)
    # grouped_mm wants every row of both operands and of the output 16-byte aligned.
    elements_per_16_bytes = 16 // rows.element_size()
    if any(size % elements_per_16_bytes for size in weight.shape[1:]):
        return False
    if rows.device.type == "cpu":
        return rows.dtype in (torch.float32, torch.float16, torch.bfloat16)
    # CUDA's grouped GEMM is the sm90 bf16 kernel.
    return rows.device.type == "cuda" and rows.dtype == torch.bfloat16 and torch.cuda.get_device_capability(rows.device) >= (9, 0)


def grouped_matmul(rows: Tensor, weight: Tensor, permutation: Permutation) -> Tensor:
    """rows [R, n_in] in sorted order, weight [E, n_out, n_in] → rows[i] · weight[e(i)]ᵀ, [R, n_out]."""
    # The last segment runs to the end of the buffer so that no output row, and no gradient row of
    # grouped_mm's backward, is left uninitialised: the unused rows (capacity drops) are zero rows.
    ends = torch.cat([permutation.expert_offsets[1:-1], permutation.expert_offsets.new_tensor([rows.shape[0]])])
    if _grouped_mm_applies(rows, weight):
        return torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)
    return _padded_grouped_matmul(rows, weight, permutation)


def _padded_grouped_matmul(rows: Tensor, weight: Tensor, permutation: Permutation) -> Tensor:
    """The same product as one batched matmul over segments padded to the largest one (waits on the device)."""
    num_experts = weight.shape[0]
    counts = permutation.tokens_per_expert.long()
    starts = permutation.expert_offsets[:-1].long()
    if torch.compiler.is_compiling():
        # A static bound, not the data-dependent max: an expert holds at most one assignment per token.
        longest = permutation.sorted_rows.shape[0]
    else:
        longest = int(counts.max()) if num_experts else 0
    rank = torch.arange(longest, device=rows.device)
    valid = rank[None, :] < counts[:, None]
    # Invalid slots read an appended zero row, not a real one: its NaN would reach every expert's weight
    # gradient through bmm's backward (NaN·0).
    row_index = torch.where(valid, starts[:, None] + rank[None, :], rows.shape[0])
    rows_and_zero_row = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    products = torch.bmm(rows_and_zero_row[row_index], weight.transpose(1, 2))
    out = rows.new_zeros(rows.shape[0], weight.shape[1])
    return out.index_put((row_index[valid],), products[valid])


def _row_experts(permutation: Permutation, num_rows: int) -> Tensor:
    """[R] int64: the expert whose segment holds each sorted row (padding rows: the segment they pad)."""
    num_experts = permutation.tokens_per_expert.shape[0]
    rows = torch.arange(num_rows, device=permutation.expert_offsets.device)
    return torch.searchsorted(permutation.expert_offsets[1:], rows, right=True).clamp(max=num_experts - 1)


def _bias_rows(bias: Tensor, permutation: Permutation, num_rows: int, dtype: torch.dtype) -> Tensor:
    """bias[expert of row] for every sorted row: [R, n] in ``dtype``.

    Gathered in float32 (float64 stays float64): the gradient of the gather sums each expert's rows, and in a
    16-bit dtype that sum would round at every addition (3× HF eager's error on GPT-OSS's bf16 down_proj_bias).
    """
    wide = torch.promote_types(bias.dtype, torch.float32)
    return bias.to(wide)[_row_experts(permutation, num_rows)].to(dtype)


def expert_up(x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: Activation) -> Tensor:
    num_tokens, k = permutation.sorted_rows.shape
    assignments = permutation.sorted_assignments
    # Row r reads assignment a of x repeated k times: a gather without repeated indices, so its backward
    # adds nothing in a thread-dependent order; the sum of a token's k copies is expand's backward, a
    # fixed-order reduction (dx bitwise reproducible for any thread count). Unused rows read an appended
    # zero row, so nothing of a real token leaks into them.
    repeated = x.unsqueeze(1).expand(num_tokens, k, x.shape[1]).reshape(num_tokens * k, x.shape[1])
    repeated_and_zero_row = torch.cat([repeated, x.new_zeros(1, x.shape[1])])
    rows = repeated_and_zero_row[torch.where(assignments >= 0, assignments, num_tokens * k)]
    # The experts compute in x's dtype (a no-op when the parameters already have it).
    pre_activation = grouped_matmul(rows, up_weight.to(x.dtype), permutation)
    if up_bias is not None:
        pre_activation = pre_activation + _bias_rows(up_bias, permutation, assignments.shape[0], x.dtype)
    return activate(pre_activation, activation)


def expert_down_combine(
    hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
) -> Tensor:
    expert_outputs = grouped_matmul(hidden, down_weight.to(hidden.dtype), permutation)
    if down_bias is not None:
        expert_outputs = expert_outputs + _bias_rows(down_bias, permutation, hidden.shape[0], hidden.dtype)
    # A dropped slot reads an appended zero row: it must not pick up another token's row, whose NaN would
    # come back through the product's backward into its gate weight (NaN·0) and so into every token's dx.
    outputs_and_zero_row = torch.cat([expert_outputs, expert_outputs.new_zeros(1, expert_outputs.shape[1])])
    rows = torch.where(permutation.sorted_rows >= 0, permutation.sorted_rows, expert_outputs.shape[0]).long()
    per_assignment = outputs_and_zero_row[rows].to(weights.dtype)
    return (weights.unsqueeze(-1) * per_assignment).sum(1).to(hidden.dtype)


def _permute_native_on_cpu(experts: Tensor, num_experts: int, capacity: int | None) -> Permutation:
    """permute(), by the native CPU op when it is built and experts are on the CPU."""
    if native.has_cpu_ops() and experts.device.type == "cpu":
        return native.permute(experts, num_experts, capacity)
    return permute(experts, num_experts, capacity)


def _expert_up_native_on_cpu(x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation,
                             activation: Activation, recompute_pre_activation: bool = False) -> Tensor:
    """expert_up(), by the C++ CPU expert path where it applies (native.runs_experts).

    Both paths keep the pre-activation for backward whatever recompute_pre_activation says: autograd saves
    the activation's input, and the C++ op keeps it (``native.expert_up`` says why)."""
    if native.runs_experts(x, up_weight, up_bias):
        return native.expert_up(x, up_weight, up_bias, permutation, activation)
    return expert_up(x, up_weight, up_bias, permutation, activation)


def _expert_down_combine_native_on_cpu(hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None,
                                       permutation: Permutation, weights: Tensor) -> Tensor:
    """expert_down_combine(), by the C++ CPU expert path where it applies (native.runs_experts)."""
    if native.runs_experts(hidden, down_weight, down_bias, weights):
        return native.expert_down_combine(hidden, down_weight, down_bias, permutation, weights)
    return expert_down_combine(hidden, down_weight, down_bias, permutation, weights)


def _routed_experts_native_on_cpu(x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None, up_weight: Tensor,
                                  up_bias: Tensor | None, down_weight: Tensor, down_bias: Tensor | None,
                                  activation: Activation, recompute_pre_activation: bool = False) -> Tensor:
    """Backend.routed_experts: one fused C++ op where no gradient is recorded (native.fuses_experts), else the stages."""
    if native.fuses_experts(x, weights, up_weight, up_bias, down_weight, down_bias):
        return native.experts_forward(x, experts, weights, capacity, up_weight, up_bias, down_weight, down_bias, activation)
    return run_routed_experts(TorchBackend, x, experts, weights, capacity, up_weight, up_bias, down_weight, down_bias,
                              activation, recompute_pre_activation)


class TorchBackend:
    """The stage functions above as a pipeline Backend; on the CPU, when moe_kernels._C is built, the
    permutation and the experts run as its C++ ops.

    The module-level functions stay pure PyTorch: the path without the extension, and the reference the
    kernels are tested on. Routers run their C++ kernels on the CPU when the extension is built
    (``fused_routing`` "cpu"), their PyTorch definitions elsewhere.
    """

    def __init__(self, device_type: str = "cpu"):
        self.fused_routing = "cpu" if device_type == "cpu" and native.has_cpu_ops() else None
    permute = staticmethod(_permute_native_on_cpu)
    expert_up = staticmethod(_expert_up_native_on_cpu)
    expert_down_combine = staticmethod(_expert_down_combine_native_on_cpu)
    routed_experts = staticmethod(_routed_experts_native_on_cpu)

    @staticmethod
    def block_m(num_tokens: int, slots: int, num_experts: int) -> int:
        return 1  # torch._grouped_mm takes segments of any length


# The two TorchBackends there are (stateless; OFF_CPU serves every device but the CPU): built once, not on every
# layer call (~5 µs cold each).
ON_CPU = TorchBackend("cpu")
OFF_CPU = TorchBackend("cuda")
