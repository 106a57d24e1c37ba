"""Grouped GEMMs over the expert-sorted permutation (pipeline's layout), forward and backward.

Forward:  expert_up_forward            hidden[r] = act(x[token(r)] · up_weight[e]ᵀ + up_bias[e])        (GEMM 1)
          expert_down_combine_forward  y[t] = Σ_s w[t, s]·(hidden[row(t, s)] · down_weight[e]ᵀ + down_bias[e])
                                                                                                    (GEMM 2 + combine)
Backward: expert_down_combine_backward d(hidden), d(down_weight), d(down_bias), d(weights)
          expert_up_backward           d(x), d(up_weight), d(up_bias), recomputing the pre-activation or
                                       reading the one GEMM 1 stored (``store_pre_activation``)

A row-GEMM program owns one row tile × one column band; it computes the tile as ``sub_tiles`` MMAs of
block_m / sub_tiles rows that share each weight chunk it loads (those without a row are skipped), so an
expert's weights are read once per block_m rows while padding MACs stay at the sub-tile's height; the band
is ``col_tiles`` blocks of block_n columns that share each chunk of rows it loads (those without a column
are skipped), so a width narrowed to avoid padding (96 = 3·32) does not re-read the rows per block. Row
tiles are numbered expert by expert: expert e's kept rows [expert_offsets[e], expert_offsets[e] +
tokens_per_expert[e]) make cdiv(count, BLOCK_M) tiles, so a tile never spans two experts whatever the layout's padding, and the program finds its expert from
tokens_per_expert on the device (no host sync). The grid holds an upper bound of the tile count fixed by
shapes (min(R, cdiv(R, BLOCK_M) + E)); programs past the last tile return at once. Rows of x are gathered
by token inside the kernels and per-assignment results are scattered by assignment, so no permuted copy of
x or of dy is ever materialised. Nothing uses atomics: every sum over rows, over split-K partials or over
the k slots of a token runs in a fixed order, so results are bitwise deterministic.

Tiles come from ``tiles.row_gemm_tiles`` / ``tiles.weight_grad_tiles``; fp32 inputs follow torch's TF32
setting (``input_precision``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import Activation, resolve
from ..pipeline import Permutation
from . import tiles
from .combine import combine


@triton.jit
def _grouped_program(num_row_tiles, num_col_blocks, GROUP_M: tl.constexpr):
    """(row tile, column block) of this program: GROUP_M row tiles visit each column block together, so
    the weight tiles of a column band are read while they are still in L2."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_col_blocks
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(num_row_tiles - first, GROUP_M)
    return first + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _expert_tile(tokens_per_expert_ptr, expert_offsets_ptr, tile, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end of the expert's rows) of row tile ``tile``: expert e owns tiles
    [Σ_{e'<e} cdiv(n_e', BLOCK_M), …) and the tile holds its rows [first, min(first + BLOCK_M, end)).
    expert == num_experts (and first == end) past the last tile. All int64."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(tokens_per_expert_ptr + experts, mask=experts < num_experts, other=0)
    tile_counts = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tile_counts, axis=0)
    expert = tl.sum((ends <= tile).to(tl.int32), axis=0)
    here = experts == expert
    first_tile = tl.sum(tl.where(here, ends - tile_counts, 0), axis=0)
    count = tl.sum(tl.where(here, counts, 0), axis=0)
    start = tl.load(expert_offsets_ptr + expert, mask=expert < num_experts, other=0).to(tl.int64)
    first = start + (tile - first_tile).to(tl.int64) * BLOCK_M
    return expert.to(tl.int64), first, start + count.to(tl.int64)


@triton.jit
def _sub_tile_rows(first, end, sub: tl.constexpr, SUB_M: tl.constexpr):
    """(rows [SUB_M] int64, row mask, whether any row is valid) of sub-tile ``sub`` of the tile at ``first``.

    Sub-tile 0 always has a row (a tile exists only for rows): a constant True, so that with one sub-tile
    nothing is branched and the compiler pipelines the loads as it did before sub-tiles (compile audit)."""
    begin = first + sub * SUB_M
    rows = begin + tl.arange(0, SUB_M)
    if sub == 0:
        has_rows = True
    else:
        has_rows = begin < end
    return rows, rows < end, has_rows


@triton.jit
def _sub_tile_cols(col_start, n_cols, sub: tl.constexpr, BLOCK_N: tl.constexpr):
    """(columns [BLOCK_N], column mask, whether any column is valid) of column sub-tile ``sub`` of the band
    at ``col_start``; sub-tile 0 counts as valid (a constant True, as in ``_sub_tile_rows``)."""
    begin = col_start + sub * BLOCK_N
    cols = begin + tl.arange(0, BLOCK_N)
    if sub == 0:
        has_cols = True
    else:
        has_cols = begin < n_cols
    return cols, cols < n_cols, has_cols


@triton.jit
def _tile_matmul(
    a_ptr,
    sorted_assignments_ptr,  # (R,) int32, read when GATHER
    k,
    stride_am,  # GATHER: the token stride of A (row r is A[sorted_assignments[r] // k]); else the row stride
    stride_ak,
    first,  # the tile's first sorted row and the end of its expert's rows (``_expert_tile``)
    end,
    w_ptr,  # one expert's matrix, read as W[kk, n] = w_ptr[kk·stride_wk + n·stride_wn]
    stride_wk,
    stride_wn,
    second_offset,  # element offset of the second weight block (the up half of a gated up_weight)
    col_start,  # the band's first column, and the number of columns n of W
    n_cols,
    k_begin,
    k_end,
    GATHER: tl.constexpr,
    TWO_HALVES: tl.constexpr,
    SWAP_AB: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SUB_M: tl.constexpr,
    SUB_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COL_TILES: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per sub-tile (s, c), s < SUB_TILES, c < COL_TILES (rows first + s·SUB_M + [0, SUB_M), columns
    ``_sub_tile_cols(col_start, n_cols, c, BLOCK_N)``): [SUB_M, BLOCK_N] = A[rows, k_begin:k_end] ·
    W[k_begin:k_end, cols] (and with W moved by second_offset when TWO_HALVES, else zeros), in ACC_DTYPE;
    returned as two tuples of SUB_TILES·COL_TILES accumulators, index s·COL_TILES + c. W is cast to A's
    dtype as it is loaded.

    Each weight chunk is loaded once and applied to every row sub-tile, each A chunk once and applied to
    every column sub-tile (tiles.GemmTiles.sub_tiles, col_tiles); a sub-tile without a row or a column
    skips its MMAs (a uniform branch), so padding MACs stay at SUB_M rows and BLOCK_N columns. SWAP_AB
    computes each product transposed, Wᵀ·Aᵀ ([BLOCK_N, SUB_M], so the MMA's M is BLOCK_N), and transposes
    it once at the end. Both halves share each A tile, so a gated layer reads its rows once.
    """
    row_offsets = ()
    row_masks = ()
    has_rows = ()
    for sub in tl.static_range(SUB_TILES):
        rows, row_mask, valid = _sub_tile_rows(first, end, sub, SUB_M)
        has_rows = has_rows + (valid,)
        if GATHER:
            assignments = tl.load(sorted_assignments_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            row_offsets = row_offsets + ((assignments // k) * stride_am,)
        else:
            row_offsets = row_offsets + (rows * stride_am,)
        row_masks = row_masks + (row_mask,)
    col_list = ()
    col_masks = ()
    has_cols = ()
    for col in tl.static_range(COL_TILES):
        cols, col_mask, valid = _sub_tile_cols(col_start, n_cols, col, BLOCK_N)
        col_list = col_list + (cols,)
        col_masks = col_masks + (col_mask,)
        has_cols = has_cols + (valid,)
    accs = ()
    seconds = ()
    for index in tl.static_range(SUB_TILES * COL_TILES):
        if SWAP_AB:
            accs = accs + (tl.zeros((BLOCK_N, SUB_M), dtype=ACC_DTYPE),)
            seconds = seconds + (tl.zeros((BLOCK_N, SUB_M), dtype=ACC_DTYPE),)
        else:
            accs = accs + (tl.zeros((SUB_M, BLOCK_N), dtype=ACC_DTYPE),)
            seconds = seconds + (tl.zeros((SUB_M, BLOCK_N), dtype=ACC_DTYPE),)
    for k_start in range(k_begin, k_end, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        firsts = ()
        w_seconds = ()
        for col in tl.static_range(COL_TILES):
            if SWAP_AB:
                w_offsets = col_list[col][:, None] * stride_wn + ks[None, :] * stride_wk
                w_mask = col_masks[col][:, None] & k_mask[None, :]
            else:
                w_offsets = ks[:, None] * stride_wk + col_list[col][None, :] * stride_wn
                w_mask = k_mask[:, None] & col_masks[col][None, :]
            w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(a_ptr.dtype.element_ty)
            w_second = w
            if TWO_HALVES:
                w_second = tl.load(w_ptr + second_offset + w_offsets, mask=w_mask, other=0.0).to(a_ptr.dtype.element_ty)
            firsts = firsts + (w,)
            w_seconds = w_seconds + (w_second,)
        updated = ()
        updated_seconds = ()
        for sub in tl.static_range(SUB_TILES):
            row_accs = ()
            row_seconds = ()
            for col in tl.static_range(COL_TILES):
                row_accs = row_accs + (accs[sub * COL_TILES + col],)
                row_seconds = row_seconds + (seconds[sub * COL_TILES + col],)
            if has_rows[sub]:
                if SWAP_AB:
                    a = tl.load(a_ptr + row_offsets[sub][None, :] + ks[:, None] * stride_ak, mask=row_masks[sub][None, :] & k_mask[:, None], other=0.0)
                else:
                    a = tl.load(a_ptr + row_offsets[sub][:, None] + ks[None, :] * stride_ak, mask=row_masks[sub][:, None] & k_mask[None, :], other=0.0)
                products = ()
                product_seconds = ()
                for col in tl.static_range(COL_TILES):
                    acc = row_accs[col]
                    acc_second = row_seconds[col]
                    if has_cols[col]:
                        if SWAP_AB:
                            acc = tl.dot(firsts[col], a, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                            if TWO_HALVES:
                                acc_second = tl.dot(w_seconds[col], a, acc_second, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                        else:
                            acc = tl.dot(a, firsts[col], acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                            if TWO_HALVES:
                                acc_second = tl.dot(a, w_seconds[col], acc_second, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                    products = products + (acc,)
                    product_seconds = product_seconds + (acc_second,)
                row_accs = products
                row_seconds = product_seconds
            updated = updated + row_accs
            updated_seconds = updated_seconds + row_seconds
        accs = updated
        seconds = updated_seconds
    if SWAP_AB:
        transposed = ()
        transposed_seconds = ()
        for index in tl.static_range(SUB_TILES * COL_TILES):
            transposed = transposed + (tl.trans(accs[index]),)
            transposed_seconds = transposed_seconds + (tl.trans(seconds[index]),)
        accs = transposed
        seconds = transposed_seconds
    return accs, seconds


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
    up_bias_ptr,  # (E, N), read when HAS_BIAS
    sorted_assignments_ptr,  # (R,) int32
    expert_offsets_ptr,  # (E + 1,) int32
    tokens_per_expert_ptr,  # (E,) int32
    grad_hidden_ptr,  # (R, d_ff), read when BACKWARD
    pre_ptr,  # (R, N) pre-activation: written by the forward, read by the backward, when SAVED_PRE
    out_ptr,  # forward: (R, d_ff) hidden; BACKWARD: (R, N) d(pre-activation), columns in up_weight's row order
    num_row_tiles,
    d,
    d_ff,
    num_experts,
    k,
    stride_xt,
    stride_xd,
    stride_we,
    stride_wn,
    stride_wd,
    stride_be,
    stride_bn,
    stride_gm,
    stride_gn,
    stride_pm,
    stride_pn,
    stride_om,
    stride_on,
    FUNCTION: tl.constexpr,  # the fields of the activations.Activation: "relu", "gelu" or "silu"
    ALPHA: tl.constexpr,  # silu: z·σ(ALPHA·z)
    GATED: tl.constexpr,  # FUNCTION(gate)·(up + UP_OFFSET)
    HAS_LIMIT: tl.constexpr,  # gate clamped above at LIMIT, up to [−LIMIT, LIMIT]
    LIMIT: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    INTERLEAVED: tl.constexpr,  # gate and up columns alternate (else the gate half comes first)
    HAS_BIAS: tl.constexpr,
    BACKWARD: tl.constexpr,
    SAVED_PRE: tl.constexpr,  # forward: also store the pre-activation; BACKWARD: read it instead of the GEMM
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SWAP_AB: tl.constexpr,
    GROUP_M: tl.constexpr,
    SUB_TILES: tl.constexpr,  # MMAs of BLOCK_M / SUB_TILES rows per tile (tiles.GemmTiles.sub_tiles)
    COL_TILES: tl.constexpr,  # and of BLOCK_N columns, COL_TILES per program (tiles.GemmTiles.col_tiles)
):
    tile, col_block = _grouped_program(num_row_tiles, tl.cdiv(d_ff, COL_TILES * BLOCK_N), GROUP_M)
    expert, first, end = _expert_tile(tokens_per_expert_ptr, expert_offsets_ptr, tile, num_experts, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    SUB_M: tl.constexpr = BLOCK_M // SUB_TILES
    col_start = col_block * (COL_TILES * BLOCK_N)
    col_step = 2 if INTERLEAVED else 1
    up_shift = 1 if INTERLEAVED else d_ff
    if not (BACKWARD and SAVED_PRE):
        gates, ups = _tile_matmul(
            x_ptr, sorted_assignments_ptr, k, stride_xt, stride_xd, first, end,
            up_weight_ptr + expert * stride_we, stride_wd, col_step * stride_wn, up_shift * stride_wn,
            col_start, d_ff, 0, d,
            True, GATED, SWAP_AB, ACC_DTYPE, INPUT_PRECISION, SUB_M, SUB_TILES, BLOCK_N, COL_TILES, BLOCK_K,
        )
    for sub in tl.static_range(SUB_TILES):
        rows, row_mask, has_rows = _sub_tile_rows(first, end, sub, SUB_M)
        if has_rows:
            for col in tl.static_range(COL_TILES):
                cols, col_mask, has_cols = _sub_tile_cols(col_start, d_ff, col, BLOCK_N)
                # Where column j of the gate and of the up half live, in up_weight's rows and in the pre-activation.
                gate_cols = cols * col_step
                if has_cols:
                    mask = row_mask[:, None] & col_mask[None, :]
                    if BACKWARD and SAVED_PRE:
                        pre = pre_ptr + rows[:, None] * stride_pm + gate_cols[None, :] * stride_pn
                        gate = tl.load(pre, mask=mask, other=0.0).to(ACC_DTYPE)
                        up = gate
                        if GATED:
                            up = tl.load(pre + up_shift * stride_pn, mask=mask, other=0.0).to(ACC_DTYPE)
                    else:
                        gate = gates[sub * COL_TILES + col]
                        up = ups[sub * COL_TILES + col]
                        if HAS_BIAS:
                            bias = up_bias_ptr + expert * stride_be + gate_cols * stride_bn
                            gate += tl.load(bias, mask=col_mask, other=0.0).to(x_ptr.dtype.element_ty).to(ACC_DTYPE)[None, :]
                            if GATED:
                                up += tl.load(bias + up_shift * stride_bn, mask=col_mask, other=0.0).to(x_ptr.dtype.element_ty).to(ACC_DTYPE)[None, :]
                        if SAVED_PRE:
                            pre = pre_ptr + rows[:, None] * stride_pm + gate_cols[None, :] * stride_pn
                            tl.store(pre, gate.to(pre_ptr.dtype.element_ty), mask=mask)
                            if GATED:
                                tl.store(pre + up_shift * stride_pn, up.to(pre_ptr.dtype.element_ty), mask=mask)
                    gate_in = gate
                    if HAS_LIMIT:
                        gate_in = tl.minimum(gate, LIMIT, propagate_nan=tl.PropagateNan.ALL)
                        up_in = tl.minimum(tl.maximum(up, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT, propagate_nan=tl.PropagateNan.ALL)
                    else:
                        up_in = up
                    value, slope = _activation_and_slope(gate_in, FUNCTION, ALPHA)
                    up_term = up_in + UP_OFFSET
                    if BACKWARD:
                        grad = tl.load(grad_hidden_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
                        grad = grad.to(ACC_DTYPE)
                        out = out_ptr + rows[:, None] * stride_om + gate_cols[None, :] * stride_on
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
def _rows_times_weights_kernel(
    a_ptr,  # (R, K) in sorted order
    weight_ptr,  # (E, K, N)
    bias_ptr,  # (E, N), read when HAS_BIAS
    weights_ptr,  # (T, 1) float32 routing weights, read when DIRECT
    sorted_assignments_ptr,  # (R,) int32
    sorted_rows_ptr,  # (T, 1) int32, read when DIRECT
    expert_offsets_ptr,  # (E + 1,) int32
    tokens_per_expert_ptr,  # (E,) int32
    out_ptr,  # DIRECT: (T, N) y; else (SPLIT_K, T·k, N): out[split, assignment(r)] = A[r] · W[e(r)] (+ bias in split 0)
    num_row_tiles,
    K,
    N,
    num_experts,
    k,
    num_tokens,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_be,
    stride_bn,
    stride_gt,
    stride_st,
    stride_os,
    stride_oa,
    stride_on,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,  # k = 1 and no split: y[t] = weights[t]·(A[row(t)] · W[e] + bias[e]), 0 for dropped t
    HAS_WEIGHTS: tl.constexpr,  # DIRECT: scale by weights (else weight 1)
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    GROUP_M: tl.constexpr,
    SUB_TILES: tl.constexpr,  # MMAs of BLOCK_M / SUB_TILES rows per tile (tiles.GemmTiles.sub_tiles)
    COL_TILES: tl.constexpr,  # and of BLOCK_N columns, COL_TILES per program (tiles.GemmTiles.col_tiles)
):
    # DIRECT adds cdiv(T, BLOCK_M) tiles after the row tiles: they write the zero rows of dropped tokens.
    num_zero_tiles = tl.cdiv(num_tokens, BLOCK_M) if DIRECT else 0
    tile, col_block = _grouped_program(num_row_tiles + num_zero_tiles, tl.cdiv(N, COL_TILES * BLOCK_N), GROUP_M)
    col_start = col_block * (COL_TILES * BLOCK_N)
    if tile >= num_row_tiles:
        tokens = (tile - num_row_tiles).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        dropped = tl.load(sorted_rows_ptr + tokens * stride_st, mask=tokens < num_tokens, other=0) < 0
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        for col in tl.static_range(COL_TILES):
            cols, col_mask, _ = _sub_tile_cols(col_start, N, col, BLOCK_N)
            tl.store(out_ptr + tokens[:, None] * stride_oa + cols[None, :] * stride_on, zeros, mask=dropped[:, None] & col_mask[None, :])
        return
    expert, first, end = _expert_tile(tokens_per_expert_ptr, expert_offsets_ptr, tile, num_experts, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    SUB_M: tl.constexpr = BLOCK_M // SUB_TILES
    split = tl.program_id(1)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    accs, _ = _tile_matmul(
        a_ptr, sorted_assignments_ptr, k, stride_am, stride_ak, first, end,
        weight_ptr + expert * stride_we, stride_wk, stride_wn, 0,
        col_start, N, k_begin, k_end,
        False, False, SWAP_AB, ACC_DTYPE, INPUT_PRECISION, SUB_M, SUB_TILES, BLOCK_N, COL_TILES, BLOCK_K,
    )
    for sub in tl.static_range(SUB_TILES):
        rows, row_mask, has_rows = _sub_tile_rows(first, end, sub, SUB_M)
        if has_rows:
            assignments = tl.load(sorted_assignments_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            if DIRECT and HAS_WEIGHTS:
                gate = tl.load(weights_ptr + assignments * stride_gt, mask=row_mask, other=0.0).to(ACC_DTYPE)
            for col in tl.static_range(COL_TILES):
                cols, col_mask, has_cols = _sub_tile_cols(col_start, N, col, BLOCK_N)
                if has_cols:
                    acc = accs[sub * COL_TILES + col]
                    if HAS_BIAS:
                        bias = tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=col_mask & (tl.broadcast_to(split, (BLOCK_N,)) == 0), other=0.0)
                        acc += bias.to(a_ptr.dtype.element_ty).to(ACC_DTYPE)[None, :]
                    mask = row_mask[:, None] & col_mask[None, :]
                    if DIRECT:
                        value = acc.to(out_ptr.dtype.element_ty)
                        if HAS_WEIGHTS:  # as backend "torch": the expert output rounded to y's dtype, then weighted in float32
                            value = value.to(ACC_DTYPE) * gate[:, None]
                        tl.store(out_ptr + assignments[:, None] * stride_oa + cols[None, :] * stride_on, value.to(out_ptr.dtype.element_ty), mask=mask)
                    else:
                        out = out_ptr + split * stride_os + assignments[:, None] * stride_oa + cols[None, :] * stride_on
                        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_down_bwd_kernel(
    grad_y_ptr,  # (T, d)
    down_weight_ptr,  # (E, d, d_ff)
    down_bias_ptr,  # (E, d), read when HAS_BIAS
    hidden_ptr,  # (R, d_ff)
    weights_ptr,  # (T, k) float32
    sorted_assignments_ptr,  # (R,) int32
    expert_offsets_ptr,  # (E + 1,) int32
    tokens_per_expert_ptr,  # (E,) int32
    grad_hidden_ptr,  # (R, d_ff) out: weights[t, s]·(dy[t] · down_weight[e])
    grad_weights_partial_ptr,  # (cdiv(d_ff, COL_TILES·BLOCK_N), T·k) out: <hidden[r], dy[t] · down_weight[e]> per column band (+ <bias[e], dy[t]> in band 0)
    num_row_tiles,
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
    stride_be,
    stride_bd,
    stride_hm,
    stride_hf,
    stride_gt,
    stride_gs,
    stride_om,
    stride_of,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SWAP_AB: tl.constexpr,
    GROUP_M: tl.constexpr,
    SUB_TILES: tl.constexpr,  # MMAs of BLOCK_M / SUB_TILES rows per tile (tiles.GemmTiles.sub_tiles)
    COL_TILES: tl.constexpr,  # and of BLOCK_N columns, COL_TILES per program (tiles.GemmTiles.col_tiles)
):
    tile, col_block = _grouped_program(num_row_tiles, tl.maximum(tl.cdiv(d_ff, COL_TILES * BLOCK_N), 1), GROUP_M)
    expert, first, end = _expert_tile(tokens_per_expert_ptr, expert_offsets_ptr, tile, num_experts, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    SUB_M: tl.constexpr = BLOCK_M // SUB_TILES
    col_start = col_block * (COL_TILES * BLOCK_N)
    # dy·W[e] before the gate weight: the same product gives d(weights) as <hidden, dy·W[e]> below,
    # which is <expert_output, dy> without recomputing the expert output.
    grad_outputs, _ = _tile_matmul(
        grad_y_ptr, sorted_assignments_ptr, k, stride_yt, stride_yd, first, end,
        down_weight_ptr + expert * stride_we, stride_wd, stride_wf, 0,
        col_start, d_ff, 0, d,
        True, False, SWAP_AB, ACC_DTYPE, INPUT_PRECISION, SUB_M, SUB_TILES, BLOCK_N, COL_TILES, BLOCK_K,
    )
    for sub in tl.static_range(SUB_TILES):
        rows, row_mask, has_rows = _sub_tile_rows(first, end, sub, SUB_M)
        if has_rows:
            assignments = tl.load(sorted_assignments_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            tokens = assignments // k
            slots = assignments % k
            gate = tl.load(weights_ptr + tokens * stride_gt + slots * stride_gs, mask=row_mask, other=0.0).to(ACC_DTYPE)
            partial = tl.zeros((SUB_M,), dtype=ACC_DTYPE)
            for col in tl.static_range(COL_TILES):  # the band's share of d(weights), its sub-tiles in order
                cols, col_mask, has_cols = _sub_tile_cols(col_start, d_ff, col, BLOCK_N)
                if has_cols:
                    grad_output = grad_outputs[sub * COL_TILES + col]
                    mask = row_mask[:, None] & col_mask[None, :]
                    hidden = tl.load(hidden_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hf, mask=mask, other=0.0)
                    tl.store(
                        grad_hidden_ptr + rows[:, None] * stride_om + cols[None, :] * stride_of,
                        (gate[:, None] * grad_output).to(grad_hidden_ptr.dtype.element_ty),
                        mask=mask,
                    )
                    partial += tl.sum(hidden.to(ACC_DTYPE) * grad_output, axis=1)
            if HAS_BIAS:
                if col_block == 0:  # <bias[e], dy[t]>, the bias's share of <expert_output, dy>, once per row
                    for d_start in range(0, d, BLOCK_K):
                        ds = d_start + tl.arange(0, BLOCK_K)
                        d_mask = ds < d
                        dy = tl.load(grad_y_ptr + tokens[:, None] * stride_yt + ds[None, :] * stride_yd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                        bias = tl.load(down_bias_ptr + expert * stride_be + ds * stride_bd, mask=d_mask, other=0.0)
                        partial += tl.sum(dy.to(ACC_DTYPE) * bias.to(grad_y_ptr.dtype.element_ty).to(ACC_DTYPE)[None, :], axis=1)
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
    grad_bias_ptr,  # BIAS_SIDE 1: (E, n_row) out Σ_r row_side[r, i]; 2: (E, n_tok) out Σ_r w[r]·token_side[t(r), j]
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
    stride_bias_e,
    stride_bias_n,
    SCALE_BY_WEIGHT: tl.constexpr,
    BIAS_SIDE: tl.constexpr,  # 0: no bias gradient; 1: of the row side; 2: of the token side
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COL_TILES: tl.constexpr,  # a program's row-side columns: COL_TILES sub-tiles of BLOCK_N (tiles.GemmTiles.col_tiles)
    BLOCK_K: tl.constexpr,
    COL_TILES_K: tl.constexpr,  # its token-side columns: COL_TILES_K sub-tiles of BLOCK_K (tiles.GemmTiles.col_tiles_k)
):
    # Each program owns [COL_TILES·BLOCK_N, COL_TILES_K·BLOCK_K] of one expert's gradient as sub-tiles with
    # their own accumulators: each loaded chunk of one side is applied to every sub-tile of the other, and
    # a sub-tile without a column skips its MMAs.
    expert = tl.program_id(0).to(tl.int64)
    start_i = tl.program_id(1) * (COL_TILES * BLOCK_N)
    start_j = tl.program_id(2) * (COL_TILES_K * BLOCK_K)
    start = tl.load(expert_offsets_ptr + expert).to(tl.int64)
    end = start + tl.load(tokens_per_expert_ptr + expert)
    accs = ()
    for index in tl.static_range(COL_TILES * COL_TILES_K):
        accs = accs + (tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE),)
    biases_i = ()
    for index in tl.static_range(COL_TILES):
        biases_i = biases_i + (tl.zeros((BLOCK_N,), dtype=ACC_DTYPE),)
    biases_j = ()
    for index in tl.static_range(COL_TILES_K):
        biases_j = biases_j + (tl.zeros((BLOCK_K,), dtype=ACC_DTYPE),)
    # An expert with no rows runs no iteration and stores exact zeros.
    for block_start in range(start, end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        assignments = tl.load(sorted_assignments_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        tokens = assignments // k
        if SCALE_BY_WEIGHT:
            gate = tl.load(weights_ptr + tokens * stride_gt + (assignments % k) * stride_gs, mask=row_mask, other=0.0)
        token_sides = ()
        updated_j = ()
        has_js = ()
        for sub_j in tl.static_range(COL_TILES_K):
            cols_j, mask_j, has_j = _sub_tile_cols(start_j, n_tok, sub_j, BLOCK_K)
            has_js = has_js + (has_j,)
            token_side = tl.load(
                token_side_ptr + tokens[:, None] * stride_tt + cols_j[None, :] * stride_tj,
                mask=row_mask[:, None] & mask_j[None, :], other=0.0,
            )
            if SCALE_BY_WEIGHT:
                token_side = token_side.to(ACC_DTYPE) * gate[:, None].to(ACC_DTYPE)
            bias_j = biases_j[sub_j]
            if BIAS_SIDE == 2:
                bias_j += tl.sum(token_side.to(ACC_DTYPE), axis=0)
            updated_j = updated_j + (bias_j,)
            token_sides = token_sides + (token_side,)
        biases_j = updated_j
        updated = ()
        updated_i = ()
        for sub_i in tl.static_range(COL_TILES):
            cols_i, mask_i, has_i = _sub_tile_cols(start_i, n_row, sub_i, BLOCK_N)
            row_side = tl.load(
                row_side_ptr + rows[:, None] * stride_rm + cols_i[None, :] * stride_ri,
                mask=row_mask[:, None] & mask_i[None, :], other=0.0,
            )
            bias_i = biases_i[sub_i]
            if BIAS_SIDE == 1:
                bias_i += tl.sum(row_side.to(ACC_DTYPE), axis=0)
            updated_i = updated_i + (bias_i,)
            for sub_j in tl.static_range(COL_TILES_K):
                acc = accs[sub_i * COL_TILES_K + sub_j]
                if has_i:
                    if has_js[sub_j]:
                        acc = tl.dot(tl.trans(row_side), token_sides[sub_j].to(row_side.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                updated = updated + (acc,)
        accs = updated
        biases_i = updated_i
    for sub_i in tl.static_range(COL_TILES):
        cols_i, mask_i, _ = _sub_tile_cols(start_i, n_row, sub_i, BLOCK_N)
        for sub_j in tl.static_range(COL_TILES_K):
            cols_j, mask_j, _ = _sub_tile_cols(start_j, n_tok, sub_j, BLOCK_K)
            out = grad_weight_ptr + expert * stride_oe + cols_i[:, None] * stride_oi + cols_j[None, :] * stride_oj
            tl.store(out, accs[sub_i * COL_TILES_K + sub_j].to(grad_weight_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])
        # Each bias column is stored by the programs of the first band along the other side (the program
        # id broadcast before comparing: the interpreter mistypes a scalar bool & a vector mask).
        if BIAS_SIDE == 1:
            bias_out = grad_bias_ptr + expert * stride_bias_e + cols_i * stride_bias_n
            tl.store(bias_out, biases_i[sub_i].to(grad_bias_ptr.dtype.element_ty), mask=mask_i & (tl.broadcast_to(tl.program_id(2), (BLOCK_N,)) == 0))
    if BIAS_SIDE == 2:
        for sub_j in tl.static_range(COL_TILES_K):
            cols_j, mask_j, _ = _sub_tile_cols(start_j, n_tok, sub_j, BLOCK_K)
            bias_out = grad_bias_ptr + expert * stride_bias_e + cols_j * stride_bias_n
            tl.store(bias_out, biases_j[sub_j].to(grad_bias_ptr.dtype.element_ty), mask=mask_j & (tl.broadcast_to(tl.program_id(1), (BLOCK_K,)) == 0))


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of ``dtype``.

    float32 follows torch's setting, read at each launch: torch.get_float32_matmul_precision() "highest"
    (allow_tf32 off, the default) → "ieee"; "high" or "medium" (allow_tf32 on) → "tf32". 16-bit dots
    ignore it and float64 is exact: "ieee".
    """
    if dtype == torch.float32 and (torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs (the gradcheck path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _row_tile_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """An upper bound of Σ_e cdiv(kept_e, block_m) from shapes: kept rows ≤ R, one partial tile per expert,
    and no tile without a row."""
    return min(num_rows, triton.cdiv(num_rows, block_m) + num_experts)


def _check_experts(weight: Tensor, permutation: Permutation, name: str) -> None:
    if weight.shape[0] != permutation.tokens_per_expert.shape[0]:
        raise ValueError(f"{name} has {weight.shape[0]} experts but the permutation has {permutation.tokens_per_expert.shape[0]}")


def _up_launch(
    x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: Activation,
    grad_hidden: Tensor | None, pre_activation: Tensor | None, out: Tensor,
) -> None:
    """Runs _expert_up_kernel: forward (grad_hidden None) into hidden, storing the pre-activation when given
    one; or backward into d(pre-activation), reading the pre-activation when given one."""
    num_tokens, d = x.shape
    num_experts, n_up, _ = up_weight.shape
    k = permutation.sorted_rows.shape[1]
    num_rows = permutation.sorted_assignments.shape[0]
    d_ff = n_up // 2 if activation.gated else n_up
    config = tiles.row_gemm_tiles(
        num_rows, num_tokens, k, num_experts, d_ff, d, x.dtype, tiles.arch(x.device), halves=2 if activation.gated else 1
    )
    num_row_tiles = _row_tile_bound(num_rows, num_experts, config.block_m)
    backward = grad_hidden is not None
    grad = grad_hidden if backward else out
    pre = pre_activation if pre_activation is not None else out
    bias = up_bias if up_bias is not None else up_weight
    grid = (num_row_tiles * triton.cdiv(d_ff, config.col_tiles * config.block_n),)
    _expert_up_kernel[grid](
        x, up_weight, bias, permutation.sorted_assignments, permutation.expert_offsets, permutation.tokens_per_expert,
        grad, pre, out,
        num_row_tiles, d, d_ff, num_experts, k,
        x.stride(0), x.stride(1),
        up_weight.stride(0), up_weight.stride(1), up_weight.stride(2),
        bias.stride(0), bias.stride(1),
        grad.stride(0), grad.stride(1),
        pre.stride(0), pre.stride(1),
        out.stride(0), out.stride(1),
        FUNCTION=activation.function, ALPHA=float(activation.alpha), GATED=activation.gated,
        HAS_LIMIT=activation.limit is not None, LIMIT=float(activation.limit or 0.0),
        UP_OFFSET=float(activation.up_offset), INTERLEAVED=activation.interleaved,
        HAS_BIAS=up_bias is not None, BACKWARD=backward, SAVED_PRE=pre_activation is not None,
        ACC_DTYPE=_TL_DTYPES[_acc_dtype(x.dtype)], INPUT_PRECISION=input_precision(x.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts), SWAP_AB=config.swap_ab, GROUP_M=config.group_m,
        SUB_TILES=config.sub_tiles, COL_TILES=config.col_tiles, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _rows_times_weights(
    rows: Tensor, weight: Tensor, bias: Tensor | None, permutation: Permutation, weights: Tensor | None
) -> Tensor:
    """rows[r] · weight[e(r)] (+ bias[e(r)]) for every kept sorted row r, then summed per token.

    rows: [R, K] in sorted order; weight: [E, K, N], any strides (a transposed view is read in place);
    bias: [E, N] or None; weights: [T, k] float32 routing weights, or None for a plain sum over the slots.
    Returns out[t] = Σ_s weights[t, s]·(rows[row(t, s)] · weight[e] + bias[e]) [T, N] in rows' dtype:
    written directly by the GEMM for k = 1 (one slot, nothing to sum), else through the per-assignment
    outputs [T·k, N] (rounded to rows' dtype, as backend "torch" rounds its expert outputs) and the combine.
    When the tiles split K, the split partials stay float32 until the combine has summed them.
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_rows, n_in = rows.shape
    num_experts, _, n_out = weight.shape
    config = tiles.row_gemm_tiles(
        num_rows, num_tokens, k, num_experts, n_out, n_in, rows.dtype, tiles.arch(rows.device), may_split_k=True
    )
    direct = k == 1 and config.split_k == 1
    if direct:
        out = torch.empty((num_tokens, n_out), dtype=rows.dtype, device=rows.device)
    else:
        partial_dtype = rows.dtype if config.split_k == 1 else _acc_dtype(rows.dtype)
        out = torch.empty((config.split_k, num_tokens * k, n_out), dtype=partial_dtype, device=rows.device)
    num_row_tiles = _row_tile_bound(num_rows, num_experts, config.block_m)
    num_tiles = num_row_tiles + (triton.cdiv(num_tokens, config.block_m) if direct else 0)
    bias_arg = bias if bias is not None else weight[:, 0]
    weights_arg = weights if weights is not None else permutation.sorted_rows
    grid = (num_tiles * triton.cdiv(n_out, config.col_tiles * config.block_n), config.split_k)
    _rows_times_weights_kernel[grid](
        rows, weight, bias_arg, weights_arg, permutation.sorted_assignments, permutation.sorted_rows,
        permutation.expert_offsets, permutation.tokens_per_expert, out,
        num_row_tiles, n_in, n_out, num_experts, k, num_tokens,
        rows.stride(0), rows.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        bias_arg.stride(0), bias_arg.stride(1),
        weights_arg.stride(0), permutation.sorted_rows.stride(0),
        0 if direct else out.stride(0), out.stride(-2), out.stride(-1),
        HAS_BIAS=bias is not None, DIRECT=direct, HAS_WEIGHTS=weights is not None,
        ACC_DTYPE=_TL_DTYPES[_acc_dtype(rows.dtype)], INPUT_PRECISION=input_precision(rows.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts), SPLIT_K=config.split_k, SWAP_AB=config.swap_ab,
        GROUP_M=config.group_m, SUB_TILES=config.sub_tiles, COL_TILES=config.col_tiles,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if direct:
        return out
    return combine(out, permutation.sorted_rows, weights, rows.dtype)


def _expert_weight_grad(
    row_side: Tensor, token_side: Tensor, weights: Tensor | None, permutation: Permutation, grad_weight: Tensor,
    grad_bias: Tensor | None = None, bias_side: int = 0,
) -> None:
    """grad_weight[e, i, j] = Σ over e's kept rows r of row_side[r, i]·w·token_side[t(r), j], written in place.

    row_side: [R, n_row]; token_side: [T, n_tok]; grad_weight: [E, n_row, n_tok], any strides (a transposed
    view writes the transpose). w is weights[t, s] of the row's assignment, or 1 when weights is None.
    grad_bias, when given: [E, n_row] (bias_side 1: Σ_r row_side[r, i]) or [E, n_tok] (bias_side 2:
    Σ_r w·token_side[t(r), j]). Every expert is written, those without rows with exact zeros.
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_experts = grad_weight.shape[0]
    n_row, n_tok = row_side.shape[1], token_side.shape[1]
    config = tiles.weight_grad_tiles(num_tokens, k, num_experts, n_row, n_tok, row_side.dtype, tiles.arch(row_side.device))
    scale = weights is not None
    weights_arg = weights if scale else permutation.sorted_rows
    bias_arg = grad_bias if grad_bias is not None else grad_weight[:, 0]
    # At least one block along each side, so that a bias gradient is written when the other side is empty.
    grid = (
        num_experts, max(1, triton.cdiv(n_row, config.col_tiles * config.block_n)),
        max(1, triton.cdiv(n_tok, config.col_tiles_k * config.block_k)),
    )
    _expert_weight_grad_kernel[grid](
        row_side, token_side, weights_arg,
        permutation.sorted_assignments, permutation.expert_offsets, permutation.tokens_per_expert,
        grad_weight, bias_arg,
        n_row, n_tok, k,
        row_side.stride(0), row_side.stride(1),
        token_side.stride(0), token_side.stride(1),
        weights_arg.stride(0), weights_arg.stride(1),
        grad_weight.stride(0), grad_weight.stride(1), grad_weight.stride(2),
        bias_arg.stride(0), bias_arg.stride(1),
        SCALE_BY_WEIGHT=scale, BIAS_SIDE=bias_side if grad_bias is not None else 0,
        ACC_DTYPE=_TL_DTYPES[_acc_dtype(row_side.dtype)], INPUT_PRECISION=input_precision(row_side.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, COL_TILES=config.col_tiles, BLOCK_K=config.block_k,
        COL_TILES_K=config.col_tiles_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )


def expert_up_forward(
    x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: str | Activation,
    store_pre_activation: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """GEMM 1: hidden[r] = act(x[token(r)] · up_weight[e(r)]ᵀ + up_bias[e(r)]) for every kept sorted row r.

    x: [T, d] float16/bfloat16/float32/float64, any strides. up_weight: [E, 2·d_ff, d] for gated activations
    (gate and up rows laid out as ``activation.interleaved`` says) or [E, d_ff, d], any dtype and strides,
    cast to x's dtype as it is loaded; up_bias: [E, 2·d_ff] / [E, d_ff] or None. permutation: any padding.
    Returns (hidden [R, d_ff] in x's dtype, accumulated in float32, padding rows not written;
    the pre-activation [R, N] in x's dtype when ``store_pre_activation``, else None: otherwise it never
    reaches memory).
    """
    activation = resolve(activation)
    _check_experts(up_weight, permutation, "up_weight")
    n_up = up_weight.shape[1]
    if up_weight.shape[2] != x.shape[1] or (activation.gated and n_up % 2):
        raise ValueError(f"up_weight of shape {tuple(up_weight.shape)} does not fit x of width {x.shape[1]} and {activation!r}")
    d_ff = n_up // 2 if activation.gated else n_up
    num_rows = permutation.sorted_assignments.shape[0]
    hidden = torch.empty((num_rows, d_ff), dtype=x.dtype, device=x.device)
    pre = torch.empty((num_rows, n_up), dtype=x.dtype, device=x.device) if store_pre_activation else None
    if x.shape[0] == 0 or d_ff == 0:
        return hidden, pre
    _up_launch(x, up_weight, up_bias, permutation, activation, None, pre, hidden)
    return hidden, pre


def expert_down_combine_forward(
    hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
) -> Tensor:
    """GEMM 2 and combine: y[t] = Σ_s weights[t, s]·(hidden[row(t, s)] · down_weight[e]ᵀ + down_bias[e]),
    dropped slots adding 0.

    hidden: [R, d_ff] (padding rows are never read); down_weight: [E, d, d_ff], cast to hidden's dtype;
    down_bias: [E, d] or None; weights: [T, k] float32. Returns y [T, d] in hidden's dtype. Each expert
    output is rounded to hidden's dtype (as in backend "torch"), weighted and summed over k in float32, in
    slot order; for k = 1 GEMM 2 writes y itself.
    """
    _check_experts(down_weight, permutation, "down_weight")
    if down_weight.shape[2] != hidden.shape[1]:
        raise ValueError(f"down_weight of shape {tuple(down_weight.shape)} does not fit hidden of width {hidden.shape[1]}")
    num_tokens = permutation.sorted_rows.shape[0]
    if num_tokens == 0:
        return torch.empty((0, down_weight.shape[1]), dtype=hidden.dtype, device=hidden.device)
    return _rows_times_weights(hidden, down_weight.transpose(1, 2), down_bias, permutation, weights)


def expert_down_combine_backward(
    grad_y: Tensor, hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Gradients of expert_down_combine_forward for dy = grad_y [T, d] (any strides).

    Returns (grad_hidden [R, d_ff] in hidden's dtype, padding rows unwritten;
             grad_down_weight [E, d, d_ff] in down_weight's dtype, exact zeros for experts without rows;
             grad_down_bias [E, d] in down_bias's dtype (None without a bias), Σ_r weights·dy;
             grad_weights [T, k] float32, <expert_output(t, s), dy[t]>, 0 for dropped slots).
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_rows, d_ff = hidden.shape
    num_experts, d, _ = down_weight.shape
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grad_down_weight = torch.empty_like(down_weight, memory_format=torch.contiguous_format)
    grad_down_bias = None if down_bias is None else torch.empty_like(down_bias, memory_format=torch.contiguous_format)
    if num_tokens == 0 or d == 0:
        if grad_down_bias is not None:
            grad_down_bias.zero_()
        return grad_hidden, grad_down_weight.zero_(), grad_down_bias, torch.zeros_like(weights)
    config = tiles.row_gemm_tiles(num_rows, num_tokens, k, num_experts, d_ff, d, hidden.dtype, tiles.arch(hidden.device))
    # At least one column band: with d_ff = 0 it still adds the bias's share <bias[e], dy[t]> to d(weights).
    num_col_bands = max(1, triton.cdiv(d_ff, config.col_tiles * config.block_n))
    num_row_tiles = _row_tile_bound(num_rows, num_experts, config.block_m)
    # Zeros: dropped assignments have no row to write their partial sums, and their gradient is 0.
    partials = torch.zeros((num_col_bands, num_tokens * k), dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    bias_arg = down_bias if down_bias is not None else down_weight[:, :, 0]
    _expert_down_bwd_kernel[(num_row_tiles * num_col_bands,)](
        grad_y, down_weight, bias_arg, hidden, weights,
        permutation.sorted_assignments, permutation.expert_offsets, permutation.tokens_per_expert,
        grad_hidden, partials,
        num_row_tiles, d, d_ff, num_experts, k, num_tokens * k,
        grad_y.stride(0), grad_y.stride(1),
        down_weight.stride(0), down_weight.stride(1), down_weight.stride(2),
        bias_arg.stride(0), bias_arg.stride(1),
        hidden.stride(0), hidden.stride(1),
        weights.stride(0), weights.stride(1),
        grad_hidden.stride(0), grad_hidden.stride(1),
        HAS_BIAS=down_bias is not None,
        ACC_DTYPE=_TL_DTYPES[_acc_dtype(hidden.dtype)], INPUT_PRECISION=input_precision(hidden.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts), SWAP_AB=config.swap_ab, GROUP_M=config.group_m,
        SUB_TILES=config.sub_tiles, COL_TILES=config.col_tiles, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    # d(down_weight)[e]ᵀ = Σ_r hidden[r]ᵀ·(w·dy[t]), written through the transposed view; d(down_bias)[e] = Σ_r w·dy[t].
    _expert_weight_grad(hidden, grad_y, weights, permutation, grad_down_weight.transpose(1, 2), grad_down_bias, 2)
    grad_weights = partials.sum(0).view(num_tokens, k).to(weights.dtype)
    return grad_hidden, grad_down_weight, grad_down_bias, grad_weights


def expert_up_backward(
    grad_hidden: Tensor, x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation,
    activation: str | Activation, pre_activation: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of expert_up_forward for grad_hidden [R, d_ff] (padding rows never read).

    pre_activation: the [R, N] one expert_up_forward stored, or None to recompute it from x and up_weight
    inside the kernel that applies the activation's backward. Returns (grad_x [T, d] in x's dtype, the k
    slots of each token summed in float32 in slot order; grad_up_weight [E, N, d] in up_weight's dtype,
    exact zeros for experts without rows; grad_up_bias [E, N] in up_bias's dtype, or None). Uses one
    transient [R, N] d(pre-activation).
    """
    num_tokens, k = permutation.sorted_rows.shape
    num_rows = permutation.sorted_assignments.shape[0]
    grad_up_weight = torch.empty_like(up_weight, memory_format=torch.contiguous_format)
    grad_up_bias = None if up_bias is None else torch.empty_like(up_bias, memory_format=torch.contiguous_format)
    if num_tokens == 0 or grad_hidden.shape[1] == 0:
        if grad_up_bias is not None:
            grad_up_bias.zero_()
        return torch.zeros_like(x, memory_format=torch.contiguous_format), grad_up_weight.zero_(), grad_up_bias
    grad_pre = torch.empty((num_rows, up_weight.shape[1]), dtype=x.dtype, device=x.device)
    _up_launch(x, up_weight, up_bias, permutation, resolve(activation), grad_hidden, pre_activation, grad_pre)
    _expert_weight_grad(grad_pre, x, None, permutation, grad_up_weight, grad_up_bias, 1)
    return _rows_times_weights(grad_pre, up_weight, None, permutation, None), grad_up_weight, grad_up_bias
