"""The combine: per-assignment rows [T·k, d] → per-token rows [T, d], a fixed-order float32 sum over k.

Used twice: the forward combine (y[t] = Σ_s weights[t, s]·expert_output(t, s)) and the backward reduction of
the k gradient contributions of each token to dx. Dropped assignments (sorted_rows == -1) are masked out
before the load, so their rows, which no kernel writes, are never read and add exactly zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import combine_block_d


@triton.jit
def _combine_kernel(
    rows_ptr,  # (T·k, d) one row per assignment t·k + s
    sorted_rows_ptr,  # (T, k) int32, -1 where capacity dropped the assignment
    weights_ptr,  # (T, k) float32, read only when HAS_WEIGHTS
    out_ptr,  # (T, d)
    d,
    k,
    stride_ra,
    stride_rd,
    stride_st,
    stride_ss,
    stride_wt,
    stride_ws,
    stride_ot,
    stride_od,
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
        row = tl.load(rows_ptr + (token * k + slot) * stride_ra + cols * stride_rd, mask=col_mask & kept, other=0.0)
        contribution = row.to(ACC_DTYPE)
        if HAS_WEIGHTS:
            contribution = contribution * tl.load(weights_ptr + token * stride_wt + slot * stride_ws).to(ACC_DTYPE)
        # where, not a multiply by a zero weight: 0·inf would turn a dropped slot into NaN.
        acc += tl.where(kept, contribution, 0.0)
    tl.store(out_ptr + token * stride_ot + cols * stride_od, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def combine(per_assignment: Tensor, sorted_rows: Tensor, weights: Tensor | None = None) -> Tensor:
    """out[t] = Σ_s weights[t, s]·per_assignment[t·k + s] over kept slots s (weights None: all 1), s ascending.

    per_assignment: [T·k, d], any float dtype and strides; rows of dropped assignments are never read.
    sorted_rows: [T, k] int32 (Permutation.sorted_rows). weights: [T, k] float32 or None.
    Returns [T, d] in per_assignment's dtype, summed in float32 (float64 for float64 input).
    """
    num_tokens, k = sorted_rows.shape
    d = per_assignment.shape[1]
    if per_assignment.shape[0] != num_tokens * k:
        raise ValueError(f"per_assignment has {per_assignment.shape[0]} rows, expected T·k = {num_tokens * k}")
    out = torch.empty((num_tokens, d), dtype=per_assignment.dtype, device=per_assignment.device)
    if num_tokens == 0 or d == 0:
        return out
    has_weights = weights is not None
    weights_arg = weights if has_weights else sorted_rows
    acc_dtype = tl.float64 if per_assignment.dtype == torch.float64 else tl.float32
    block_d = combine_block_d(d)
    grid = lambda META: (num_tokens, triton.cdiv(d, META["BLOCK_D"]))  # noqa: E731
    _combine_kernel[grid](
        per_assignment, sorted_rows, weights_arg, out,
        d, k,
        per_assignment.stride(0), per_assignment.stride(1),
        sorted_rows.stride(0), sorted_rows.stride(1),
        weights_arg.stride(0), weights_arg.stride(1),
        out.stride(0), out.stride(1),
        HAS_WEIGHTS=has_weights, ACC_DTYPE=acc_dtype, BLOCK_D=block_d,
    )
    return out
