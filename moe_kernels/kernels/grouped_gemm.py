"""Grouped GEMMs over the expert-sorted permutation (pipeline's layout), forward and backward.

Forward:  expert_up_forward            hidden[r] = act(x[token(r)] · up_weight[e]ᵀ)       (GEMM 1)
          expert_down_combine_forward  y[t] = Σ_s w[t, s]·(hidden[row(t, s)] · down_weight[e]ᵀ)  (GEMM 2 + combine)
Backward: expert_down_combine_backward d(hidden), d(down_weight), d(weights)
          expert_up_backward           d(x), d(up_weight), recomputing the pre-activation

A GEMM program owns BLOCK_M consecutive sorted rows × BLOCK_N output columns. It finds the experts whose
segments meet its rows from expert_offsets (on the device, no host sync) and loops over them, masking the
rows of other experts and the padding; with the permutation padded to ``tiles.block_m_for`` == BLOCK_M that loop
runs exactly once. Any block_m (1 included) is therefore correct; only the efficiency depends on it.
Rows of x are gathered by token inside the kernels and per-assignment results are scattered by assignment,
so no permuted copy of x or of dy is ever materialised. Nothing uses atomics: every sum over rows or over
the k slots of a token runs in a fixed order, so results are bitwise deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation, resolve
from ..pipeline import Permutation
from .combine import combine
from .tiles import gemm_tiles


@triton.jit
def _row_tile(
    sorted_assignments_ptr,
    expert_offsets_ptr,
    num_rows,
    num_cols,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """This program's sorted rows and output columns (with their mask), the rows' assignments (-1 for
    padding), and the first and last expert whose segments can hold its rows. All int64 but the columns."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    assignments = tl.load(sorted_assignments_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    starts = tl.load(expert_offsets_ptr + experts, mask=experts < num_experts, other=2147483647)
    first = tl.sum((starts <= row_start).to(tl.int64), axis=0) - 1
    last = tl.sum((starts < row_start + BLOCK_M).to(tl.int64), axis=0) - 1
    return rows, cols, cols < num_cols, assignments, first, last


@triton.jit
def _kept_rows(expert_offsets_ptr, tokens_per_expert_ptr, expert, rows):
    """Mask of the rows expert keeps: its segment without the padding after it."""
    start = tl.load(expert_offsets_ptr + expert)
    count = tl.load(tokens_per_expert_ptr + expert)
    return (rows >= start) & (rows < start + count)


@triton.jit
def _tile_matmul(
    a_ptr,
    a_row_offsets,  # (BLOCK_M,) int64 element offsets of the A rows
    row_mask,
    stride_ak,
    w_ptr,  # one expert's matrix, read as W[kk, n] = w_ptr[kk·stride_wk + n·stride_wn]
    stride_wk,
    stride_wn,
    second_offset,  # element offset of the second weight block (the up half of a gated up_weight)
    cols,
    col_mask,
    K,
    TWO_HALVES: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A[rows, :K] · W[:K, cols], and with W moved by second_offset when TWO_HALVES (else zeros), in ACC_DTYPE.

    Both halves share each A tile, so a gated layer reads its gathered x once.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_second = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + a_row_offsets[:, None] + ks[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_offsets = ks[:, None] * stride_wk + cols[None, :] * stride_wn
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if TWO_HALVES:
            w_second = tl.load(w_ptr + second_offset + w_offsets, mask=w_mask, other=0.0).to(a.dtype)
            acc_second = tl.dot(a, w_second, acc_second, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc, acc_second


@triton.jit
def _activation_and_slope(z, FUNCTION: tl.constexpr, ALPHA: tl.constexpr):
    """f(z) and f'(z) for FUNCTION "relu", "gelu" (exact, erf) or "silu" (z·σ(ALPHA·z))."""
    if FUNCTION == "relu":
        value = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        slope = (z > 0).to(z.dtype)
    elif FUNCTION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        value = z * cdf
        slope = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        sigmoid = tl.sigmoid(ALPHA * z)
        value = z * sigmoid
        slope = sigmoid * (1.0 + ALPHA * z * (1.0 - sigmoid))
    return value, slope


@triton.jit
def _expert_up_kernel(
    x_ptr,  # (T, d)
    up_weight_ptr,  # (E, N, d), N = 2·d_ff for gated activations (gate/up rows as INTERLEAVED says), else d_ff
    sorted_assignments_ptr,  # (R,) int32, -1 for padding
    expert_offsets_ptr,  # (E + 1,) int32
    tokens_per_expert_ptr,  # (E,) int32
    grad_hidden_ptr,  # (R, d_ff), read only when BACKWARD
    out_ptr,  # forward: (R, d_ff) hidden; BACKWARD: (R, N) d(pre-activation), columns in up_weight's row order
    num_rows,
    d,
    d_ff,
    num_experts,
    k,
    stride_xt,
    stride_xd,
    stride_we,
    stride_wn,
    stride_wd,
    stride_gm,
    stride_gn,
    stride_om,
    stride_on,
    FUNCTION: tl.constexpr,  # the fields of the activations.Activation: "relu", "gelu" or "silu"
    ALPHA: tl.constexpr,  # silu: z·σ(ALPHA·z)
    GATED: tl.constexpr,  # FUNCTION(gate)·(up + UP_OFFSET)
    HAS_LIMIT: tl.constexpr,  # gate clamped above at LIMIT, up to [−LIMIT, LIMIT]
    LIMIT: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # gate and up columns alternate (else the gate half comes first)
    BACKWARD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows, cols, col_mask, assignments, first, last = _row_tile(
        sorted_assignments_ptr, expert_offsets_ptr, num_rows, d_ff, num_experts, BLOCK_M, BLOCK_N, BLOCK_E
    )
    x_rows = (tl.maximum(assignments, 0) // k) * stride_xt
    # Where column j of the gate and of the up half live, in up_weight's rows and in d(pre-activation).
    col_step = 2 if INTERLEAVED else 1
    up_shift = 1 if INTERLEAVED else d_ff
    for expert in range(first, last + 1):
        row_mask = _kept_rows(expert_offsets_ptr, tokens_per_expert_ptr, expert, rows)
        gate, up = _tile_matmul(
            x_ptr, x_rows, row_mask, stride_xd,
            up_weight_ptr + expert * stride_we, stride_wd, col_step * stride_wn, up_shift * stride_wn,
            cols, col_mask, d,
            GATED, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        gate_in = gate
        if HAS_LIMIT:
            gate_in = tl.minimum(gate, LIMIT, propagate_nan=tl.PropagateNan.ALL)
            up_in = tl.minimum(tl.maximum(up, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT, propagate_nan=tl.PropagateNan.ALL)
        else:
            up_in = up
        value, slope = _activation_and_slope(gate_in, FUNCTION, ALPHA)
        up_term = up_in + UP_OFFSET
        mask = row_mask[:, None] & col_mask[None, :]
        if BACKWARD:
            grad = tl.load(grad_hidden_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
            grad = grad.to(ACC_DTYPE)
            out = out_ptr + rows[:, None] * stride_om + (cols * col_step)[None, :] * stride_on
            if GATED:
                grad_gate = grad * up_term * slope
                grad_up = grad * value
                if HAS_LIMIT:  # the clamps pass the gradient where they are the identity (torch.clamp's rule)
                    grad_gate = tl.where(gate <= LIMIT, grad_gate, 0.0)
                    grad_up = tl.where((up >= -LIMIT) & (up <= LIMIT), grad_up, 0.0)
                tl.store(out, grad_gate.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(out + up_shift * stride_on, grad_up.to(out_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(out, (grad * slope).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if GATED:
                value = value * up_term
            out = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
            tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_to_assignments_kernel(
    a_ptr,  # (R, K) in sorted order
    weight_ptr,  # (E, K, N)
    sorted_assignments_ptr,  # (R,) int32, -1 for padding
    expert_offsets_ptr,  # (E + 1,) int32
    tokens_per_expert_ptr,  # (E,) int32
    out_ptr,  # (T·k, N): out[assignment(r)] = A[r] · W[e(r)]; rows of dropped assignments are not written
    num_rows,
    K,
    N,
    num_experts,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_oa,
    stride_on,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows, cols, col_mask, assignments, first, last = _row_tile(
        sorted_assignments_ptr, expert_offsets_ptr, num_rows, N, num_experts, BLOCK_M, BLOCK_N, BLOCK_E
    )
    for expert in range(first, last + 1):
        row_mask = _kept_rows(expert_offsets_ptr, tokens_per_expert_ptr, expert, rows)
        acc, _ = _tile_matmul(
            a_ptr, rows * stride_am, row_mask, stride_ak,
            weight_ptr + expert * stride_we, stride_wk, stride_wn, 0,
            cols, col_mask, K,
            False, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        out = out_ptr + assignments[:, None] * stride_oa + cols[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _expert_down_bwd_kernel(
    grad_y_ptr,  # (T, d)
    down_weight_ptr,  # (E, d, d_ff)
    hidden_ptr,  # (R, d_ff)
    weights_ptr,  # (T, k) float32
    sorted_assignments_ptr,  # (R,) int32, -1 for padding
    expert_offsets_ptr,  # (E + 1,) int32
    tokens_per_expert_ptr,  # (E,) int32
    grad_hidden_ptr,  # (R, d_ff) out: weights[t, s]·(dy[t] · down_weight[e])
    grad_weights_partial_ptr,  # (cdiv(d_ff, BLOCK_N), T·k) out: <hidden[r], dy[t] · down_weight[e]> per column block
    num_rows,
    d,
    d_ff,
    num_experts,
    k,
    num_assignments,
    stride_yt,
    stride_yd,
    stride_we,
    stride_wd,
    stride_wf,
    stride_hm,
    stride_hf,
    stride_gt,
    stride_gs,
    stride_om,
    stride_of,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows, cols, col_mask, assignments, first, last = _row_tile(
        sorted_assignments_ptr, expert_offsets_ptr, num_rows, d_ff, num_experts, BLOCK_M, BLOCK_N, BLOCK_E
    )
    tokens = tl.maximum(assignments, 0) // k
    slots = tl.maximum(assignments, 0) % k
    for expert in range(first, last + 1):
        row_mask = _kept_rows(expert_offsets_ptr, tokens_per_expert_ptr, expert, rows)
        # dy·W[e] before the gate weight: the same product gives d(weights) as <hidden, dy·W[e]> below,
        # which is <expert_output, dy> without recomputing the expert output.
        grad_output, _ = _tile_matmul(
            grad_y_ptr, tokens * stride_yt, row_mask, stride_yd,
            down_weight_ptr + expert * stride_we, stride_wd, stride_wf, 0,
            cols, col_mask, d,
            False, ACC_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        mask = row_mask[:, None] & col_mask[None, :]
        gate = tl.load(weights_ptr + tokens * stride_gt + slots * stride_gs, mask=row_mask, other=0.0).to(ACC_DTYPE)
        hidden = tl.load(hidden_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hf, mask=mask, other=0.0)
        tl.store(
            grad_hidden_ptr + rows[:, None] * stride_om + cols[None, :] * stride_of,
            (gate[:, None] * grad_output).to(grad_hidden_ptr.dtype.element_ty),
            mask=mask,
        )
        partial = tl.sum(hidden.to(ACC_DTYPE) * grad_output, axis=1)
        col_block = tl.program_id(1).to(tl.int64)
        tl.store(grad_weights_partial_ptr + col_block * num_assignments + assignments, partial, mask=row_mask)


@triton.jit
def _expert_weight_grad_kernel(
    row_side_ptr,  # (R, n_row) in sorted order: hidden, or d(pre-activation)
    token_side_ptr,  # (T, n_tok) read at the token of each sorted row: dy, or x
    weights_ptr,  # (T, k) float32, scales the token side when SCALE_BY_WEIGHT
    sorted_assignments_ptr,  # (R,) int32
    expert_offsets_ptr,  # (E + 1,) int32
    tokens_per_expert_ptr,  # (E,) int32
    grad_weight_ptr,  # (E, n_row, n_tok) out: Σ_r row_side[r, i]·w[r]·token_side[t(r), j]
    n_row,
    n_tok,
    k,
    stride_rm,
    stride_ri,
    stride_tt,
    stride_tj,
    stride_gt,
    stride_gs,
    stride_oe,
    stride_oi,
    stride_oj,
    SCALE_BY_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    cols_i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_j = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_i = cols_i < n_row
    mask_j = cols_j < n_tok
    start = tl.load(expert_offsets_ptr + expert).to(tl.int64)
    end = start + tl.load(tokens_per_expert_ptr + expert)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    # An expert with no rows runs no iteration and stores exact zeros.
    for block_start in range(start, end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        assignments = tl.load(sorted_assignments_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tokens = assignments // k
        row_side = tl.load(
            row_side_ptr + rows[:, None] * stride_rm + cols_i[None, :] * stride_ri,
            mask=row_mask[:, None] & mask_i[None, :], other=0.0,
        )
        token_side = tl.load(
            token_side_ptr + tokens[:, None] * stride_tt + cols_j[None, :] * stride_tj,
            mask=row_mask[:, None] & mask_j[None, :], other=0.0,
        )
        if SCALE_BY_WEIGHT:
            gate = tl.load(weights_ptr + tokens * stride_gt + (assignments % k) * stride_gs, mask=row_mask, other=0.0)
            token_side = token_side.to(ACC_DTYPE) * gate[:, None].to(ACC_DTYPE)
        acc = tl.dot(tl.trans(row_side), token_side.to(row_side.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    out = grad_weight_ptr + expert * stride_oe + cols_i[:, None] * stride_oi + cols_j[None, :] * stride_oj
    tl.store(out, acc.to(grad_weight_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])


# fp32 layers get true fp32 products (torch's default, allow_tf32 off); 16-bit inputs ignore this.
_INPUT_PRECISION = "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs (the gradcheck path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _check_experts(weight: Tensor, permutation: Permutation, name: str) -> None:
    if weight.shape[0] != permutation.tokens_per_expert.shape[0]:
        raise ValueError(f"{name} has {weight.shape[0]} experts but the permutation has {permutation.tokens_per_expert.shape[0]}")


def _up_launch(
    x: Tensor, up_weight: Tensor, permutation: Permutation, activation: Activation, grad_hidden: Tensor | None, out: Tensor
) -> None:
    """Runs _expert_up_kernel: forward (grad_hidden None) into hidden, or backward into d(pre-activation)."""
    num_tokens, d = x.shape
    num_experts, n_up, _ = up_weight.shape
    k = permutation.sorted_rows.shape[1]
    num_rows = permutation.sorted_assignments.shape[0]
    d_ff = n_up // 2 if activation.gated else n_up
    config = gemm_tiles(num_tokens, k, num_experts, d_ff, d, x.dtype)
    backward = grad_hidden is not None
    grad = grad_hidden if backward else out
    grid = lambda META: (triton.cdiv(num_rows, META["BLOCK_M"]), triton.cdiv(d_ff, META["BLOCK_N"]))  # noqa: E731
    _expert_up_kernel[grid](
        x, up_weight, permutation.sorted_assignments, permutation.expert_offsets, permutation.tokens_per_expert,
        grad, out,
        num_rows, d, d_ff, num_experts, k,
        x.stride(0), x.stride(1),
        up_weight.stride(0), up_weight.stride(1), up_weight.stride(2),
        grad.stride(0), grad.stride(1),
        out.stride(0), out.stride(1),
        FUNCTION=activation.function, ALPHA=float(activation.alpha), GATED=activation.gated,
        HAS_LIMIT=activation.limit is not None, LIMIT=float(activation.limit or 0.0),
        UP_OFFSET=float(activation.up_offset), INTERLEAVED=activation.interleaved, BACKWARD=backward,
        ACC_DTYPE=_TL_DTYPES[_acc_dtype(x.dtype)], INPUT_PRECISION=_INPUT_PRECISION,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _rows_to_assignments(rows: Tensor, weight: Tensor, permutation: Permutation) -> Tensor:
    """out[assignment(r)] = rows[r] · weight[e(r)]: [T·k, N] in rows' dtype.

    rows: [R, K] in sorted order; weight: [E, K, N], any strides (a transposed view is read in place).
    Rows of dropped assignments in the result are left unwritten.
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_rows, n_in = rows.shape
    num_experts, _, n_out = weight.shape
    out = torch.empty((num_tokens * k, n_out), dtype=rows.dtype, device=rows.device)
    config = gemm_tiles(num_tokens, k, num_experts, n_out, n_in, rows.dtype)
    grid = lambda META: (triton.cdiv(num_rows, META["BLOCK_M"]), triton.cdiv(n_out, META["BLOCK_N"]))  # noqa: E731
    _rows_to_assignments_kernel[grid](
        rows, weight, permutation.sorted_assignments, permutation.expert_offsets, permutation.tokens_per_expert, out,
        num_rows, n_in, n_out, num_experts,
        rows.stride(0), rows.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1),
        ACC_DTYPE=_TL_DTYPES[_acc_dtype(rows.dtype)], INPUT_PRECISION=_INPUT_PRECISION,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _expert_weight_grad(
    row_side: Tensor, token_side: Tensor, weights: Tensor | None, permutation: Permutation, grad_weight: Tensor
) -> None:
    """grad_weight[e, i, j] = Σ over e's kept rows r of row_side[r, i]·w·token_side[t(r), j], written in place.

    row_side: [R, n_row]; token_side: [T, n_tok]; grad_weight: [E, n_row, n_tok], any strides (a transposed
    view writes the transpose). w is weights[t, s] of the row's assignment, or 1 when weights is None.
    Every expert is written, those without rows with exact zeros.
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_experts = grad_weight.shape[0]
    n_row, n_tok = row_side.shape[1], token_side.shape[1]
    config = gemm_tiles(num_tokens, k, num_experts, n_row, n_tok, row_side.dtype)
    scale = weights is not None
    weights_arg = weights if scale else permutation.sorted_rows
    grid = lambda META: (num_experts, triton.cdiv(n_row, META["BLOCK_N"]), triton.cdiv(n_tok, META["BLOCK_K"]))  # noqa: E731
    _expert_weight_grad_kernel[grid](
        row_side, token_side, weights_arg,
        permutation.sorted_assignments, permutation.expert_offsets, permutation.tokens_per_expert,
        grad_weight,
        n_row, n_tok, k,
        row_side.stride(0), row_side.stride(1),
        token_side.stride(0), token_side.stride(1),
        weights_arg.stride(0), weights_arg.stride(1),
        grad_weight.stride(0), grad_weight.stride(1), grad_weight.stride(2),
        SCALE_BY_WEIGHT=scale, ACC_DTYPE=_TL_DTYPES[_acc_dtype(row_side.dtype)], INPUT_PRECISION=_INPUT_PRECISION,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def expert_up_forward(x: Tensor, up_weight: Tensor, permutation: Permutation, activation: str | Activation) -> Tensor:
    """GEMM 1: hidden[r] = act(x[token(r)] · up_weight[e(r)]ᵀ) for every kept sorted row r.

    x: [T, d] float16/bfloat16/float32/float64, any strides. up_weight: [E, 2·d_ff, d] for gated activations
    (gate and up rows laid out as ``activation.interleaved`` says) or [E, d_ff, d], any strides, cast to x's dtype as it is loaded. permutation: any
    block_m. Returns hidden [R, d_ff] in x's dtype, accumulated in float32; padding rows are not written.
    The gated pre-activation [R, 2·d_ff] never reaches memory.
    """
    activation = resolve(activation)
    _check_experts(up_weight, permutation, "up_weight")
    n_up = up_weight.shape[1]
    if up_weight.shape[2] != x.shape[1] or (activation.gated and n_up % 2):
        raise ValueError(f"up_weight of shape {tuple(up_weight.shape)} does not fit x of width {x.shape[1]} and {activation!r}")
    d_ff = n_up // 2 if activation.gated else n_up
    hidden = torch.empty((permutation.sorted_assignments.shape[0], d_ff), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or d_ff == 0:
        return hidden
    _up_launch(x, up_weight, permutation, activation, None, hidden)
    return hidden


def expert_down_combine_forward(hidden: Tensor, down_weight: Tensor, permutation: Permutation, weights: Tensor) -> Tensor:
    """GEMM 2 and combine: y[t] = Σ_s weights[t, s]·(hidden[row(t, s)] · down_weight[e]ᵀ), dropped slots adding 0.

    hidden: [R, d_ff] (padding rows are never read); down_weight: [E, d, d_ff], cast to hidden's dtype;
    weights: [T, k] float32. Returns y [T, d] in hidden's dtype. The per-assignment outputs [T·k, d] are
    rounded to hidden's dtype (as in backend "torch") and summed over k in float32, in slot order.
    """
    _check_experts(down_weight, permutation, "down_weight")
    if down_weight.shape[2] != hidden.shape[1]:
        raise ValueError(f"down_weight of shape {tuple(down_weight.shape)} does not fit hidden of width {hidden.shape[1]}")
    num_tokens = permutation.sorted_rows.shape[0]
    if num_tokens == 0:
        return torch.empty((0, down_weight.shape[1]), dtype=hidden.dtype, device=hidden.device)
    per_assignment = _rows_to_assignments(hidden, down_weight.transpose(1, 2), permutation)
    return combine(per_assignment, permutation.sorted_rows, weights)


def expert_down_combine_backward(
    grad_y: Tensor, hidden: Tensor, down_weight: Tensor, permutation: Permutation, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of expert_down_combine_forward for dy = grad_y [T, d] (any strides).

    Returns (grad_hidden [R, d_ff] in hidden's dtype, padding rows unwritten;
             grad_down_weight [E, d, d_ff] in down_weight's dtype, exact zeros for experts without rows;
             grad_weights [T, k] float32, <expert_output(t, s), dy[t]>, 0 for dropped slots).
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_rows, d_ff = hidden.shape
    num_experts, d, _ = down_weight.shape
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grad_down_weight = torch.empty_like(down_weight, memory_format=torch.contiguous_format)
    if num_tokens == 0 or d_ff == 0 or d == 0:
        return grad_hidden, grad_down_weight.zero_(), torch.zeros_like(weights)
    config = gemm_tiles(num_tokens, k, num_experts, d_ff, d, hidden.dtype)
    num_col_blocks = triton.cdiv(d_ff, config.block_n)
    # Zeros: dropped assignments have no row to write their partial sums, and their gradient is 0.
    partials = torch.zeros((num_col_blocks, num_tokens * k), dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    grid = lambda META: (triton.cdiv(num_rows, META["BLOCK_M"]), triton.cdiv(d_ff, META["BLOCK_N"]))  # noqa: E731
    _expert_down_bwd_kernel[grid](
        grad_y, down_weight, hidden, weights,
        permutation.sorted_assignments, permutation.expert_offsets, permutation.tokens_per_expert,
        grad_hidden, partials,
        num_rows, d, d_ff, num_experts, k, num_tokens * k,
        grad_y.stride(0), grad_y.stride(1),
        down_weight.stride(0), down_weight.stride(1), down_weight.stride(2),
        hidden.stride(0), hidden.stride(1),
        weights.stride(0), weights.stride(1),
        grad_hidden.stride(0), grad_hidden.stride(1),
        ACC_DTYPE=_TL_DTYPES[_acc_dtype(hidden.dtype)], INPUT_PRECISION=_INPUT_PRECISION,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    # d(down_weight)[e]ᵀ = Σ_r hidden[r]ᵀ·(w·dy[t]), written through the transposed view.
    _expert_weight_grad(hidden, grad_y, weights, permutation, grad_down_weight.transpose(1, 2))
    grad_weights = partials.sum(0).view(num_tokens, k).to(weights.dtype)
    return grad_hidden, grad_down_weight, grad_weights


def expert_up_backward(
    grad_hidden: Tensor, x: Tensor, up_weight: Tensor, permutation: Permutation, activation: str | Activation
) -> tuple[Tensor, Tensor]:
    """Gradients of expert_up_forward for grad_hidden [R, d_ff] (padding rows never read).

    Recomputes the pre-activation from x and up_weight in the kernel that applies the activation's
    backward, so forward saves no [R, N] activation. Returns (grad_x [T, d] in x's dtype, the k slots of
    each token summed in float32 in slot order; grad_up_weight [E, N, d] in up_weight's dtype, exact zeros
    for experts without rows). Uses one transient [R, N] d(pre-activation) and one [T·k, d] buffer.
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_rows = permutation.sorted_assignments.shape[0]
    grad_up_weight = torch.empty_like(up_weight, memory_format=torch.contiguous_format)
    if num_tokens == 0 or grad_hidden.shape[1] == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format), grad_up_weight.zero_()
    grad_pre = torch.empty((num_rows, up_weight.shape[1]), dtype=x.dtype, device=x.device)
    _up_launch(x, up_weight, permutation, resolve(activation), grad_hidden, grad_pre)
    _expert_weight_grad(grad_pre, x, None, permutation, grad_up_weight)
    per_assignment = _rows_to_assignments(grad_pre, up_weight, permutation)
    return combine(per_assignment, permutation.sorted_rows), grad_up_weight
