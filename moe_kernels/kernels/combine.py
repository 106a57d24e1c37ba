"""The combine: per-assignment rows [T·k, d] → per-token rows [T, d], a fixed-order float32 sum over k.

Used twice: the forward combine (y[t] = Σ_s weights[t, s]·expert_output(t, s)) and the backward reduction of
the k gradient contributions of each token to dx. When the GEMM before it split its reduction (split-K), it
also sums the split partials of each assignment, in split order, before rounding the assignment's output to
the result's dtype. Dropped assignments (sorted_rows == -1) are masked out before the load, so their rows,
which no kernel writes, are never read and add exactly zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import combine_block_d


@triton.jit
def _combine_kernel(
    rows_ptr,  # (SPLITS, T·k, d) one row per split and assignment t·k + s
    sorted_rows_ptr,  # (T, k) int32, -1 where capacity dropped the assignment
    weights_ptr,  # (T, k) float32, read only when HAS_WEIGHTS
    out_ptr,  # (T, d)
    d,
    k,
    stride_rsplit,
    stride_ra,
    stride_rd,
    stride_st,
    stride_ss,
    stride_wt,
    stride_ws,
    stride_ot,
    stride_od,
    SPLITS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for slot in range(0, k):
        # Broadcast before comparing: the interpreter mistypes a scalar bool & a vector mask.
        kept = tl.broadcast_to(tl.load(sorted_rows_ptr + token * stride_st + slot * stride_ss), (BLOCK_D,)) >= 0
        row = rows_ptr + (token * k + slot) * stride_ra + cols * stride_rd
        output = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
        for split in range(0, SPLITS):
            output += tl.load(row + split * stride_rsplit, mask=col_mask & kept, other=0.0).to(ACC_DTYPE)
        # The assignment's output rounded to the result's dtype (a no-op for unsplit rows in that dtype).
        contribution = output.to(out_ptr.dtype.element_ty).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            contribution = contribution * tl.load(weights_ptr + token * stride_wt + slot * stride_ws).to(ACC_DTYPE)
        # where, not a multiply by a zero weight: 0·inf would turn a dropped slot into NaN.
        acc += tl.where(kept, contribution, 0.0)
    tl.store(out_ptr + token * stride_ot + cols * stride_od, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def combine(per_assignment: Tensor, sorted_rows: Tensor, weights: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """out[t] = Σ_s weights[t, s]·round(Σ_split per_assignment[split, t·k + s]) over kept slots s (weights
    None: all 1), s ascending, splits ascending.

    per_assignment: [T·k, d] or [splits, T·k, d], any float dtype and strides; rows of dropped assignments
    are never read. sorted_rows: [T, k] int32 (Permutation.sorted_rows). weights: [T, k] float32 or None.
    dtype: the result's dtype (default per_assignment's), to which each assignment's output is rounded.
    Returns [T, d], summed in float32 (float64 for float64 input).
    """
    partials = per_assignment if per_assignment.dim() == 3 else per_assignment.unsqueeze(0)
    num_tokens, k = sorted_rows.shape
    splits, num_assignments, d = partials.shape
    if num_assignments != num_tokens * k:
        raise ValueError(f"per_assignment has {num_assignments} rows, expected T·k = {num_tokens * k}")
    out = torch.empty((num_tokens, d), dtype=dtype or partials.dtype, device=partials.device)
    if num_tokens == 0 or d == 0:
        return out
    has_weights = weights is not None
    weights_arg = weights if has_weights else sorted_rows
    acc_dtype = tl.float64 if out.dtype == torch.float64 else tl.float32
    block_d = combine_block_d(d)
    grid = lambda META: (num_tokens, triton.cdiv(d, META["BLOCK_D"]))  # noqa: E731
    _combine_kernel[grid](
        partials, sorted_rows, weights_arg, out,
        d, k,
        partials.stride(0), partials.stride(1), partials.stride(2),
        sorted_rows.stride(0), sorted_rows.stride(1),
        weights_arg.stride(0), weights_arg.stride(1),
        out.stride(0), out.stride(1),
        SPLITS=splits, HAS_WEIGHTS=has_weights, ACC_DTYPE=acc_dtype, BLOCK_D=block_d,
    )
    return out
