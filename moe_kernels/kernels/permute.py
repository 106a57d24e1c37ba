"""Permutation: expert ids [T, k] → the expert-sorted layout of ``moe_kernels.pipeline``, without a sort.

The assignments are read as one slot-major stream (position j = s·T + t), whose order within each expert
is the layout's sorted order and its capacity priority. The stream is cut into chunks, one program each:
1. ``_chunk_histogram_kernel`` (only when there is more than one chunk): how many assignments each chunk
   sends to each expert, [num_chunks, E].
2. ``_scatter_rows_kernel``: every program adds up those counts (all chunks: each expert's total, hence
   tokens_per_expert and expert_offsets; the chunks before its own: where its chunk starts within each
   expert); with a single chunk it counts its own chunk first instead. It then walks its chunk in
   sub-chunks, ranking each assignment within its expert (sub-chunk start + earlier positions of the
   sub-chunk that go to the same expert), keeps the first ``capacity`` and writes ``sorted_rows`` and
   ``sorted_assignments``; it also writes -1 on the rows of its share of the buffer that no kept
   assignment occupies (padding), and program 0 writes the counts and offsets.
A decode-sized call (T·k ≤ one chunk) is one launch; nothing reads a value back to the host, and every
buffer is sized from T, k, E and block_m, so the whole permutation can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..pipeline import Permutation, num_sorted_rows
from .tiles import permute_chunk


@triton.jit
def _chunk_histogram_kernel(
    # pointers
    experts_ptr,  # (T, K) int32, every id in [0, E)
    chunk_counts_ptr,  # (num_chunks, E) int32, out
    # sizes
    num_tokens,
    num_experts,
    # strides
    stride_experts_t,
    stride_experts_k,
    stride_counts_chunk,
    stride_counts_e,
    # constexprs
    K: tl.constexpr,
    CHUNK: tl.constexpr,  # assignments per program
    SUB: tl.constexpr,  # assignments per step
    NUM_BINS: tl.constexpr,  # next power of two > E: bin E collects the positions past the stream's end
):
    chunk = tl.program_id(0).to(tl.int64)
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for sub_start in range(0, CHUNK, SUB):
        positions = chunk * CHUNK + sub_start + tl.arange(0, SUB).to(tl.int64)
        in_stream = positions < num_tokens * K
        expert = tl.load(
            experts_ptr + (positions % num_tokens) * stride_experts_t + (positions // num_tokens) * stride_experts_k,
            mask=in_stream, other=num_experts,
        )
        counts += tl.histogram(expert, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(chunk_counts_ptr + chunk * stride_counts_chunk + bins * stride_counts_e, counts, mask=bins < num_experts)


@triton.jit
def _gather(values, index, bins):
    """values[index] for a [NUM_BINS] vector and a [SUB] index vector."""
    return tl.sum(tl.where(bins[None, :] == index[:, None], values[None, :], 0), axis=1)


@triton.jit
def _scatter_rows_kernel(
    # pointers
    experts_ptr,  # (T, K) int32, every id in [0, E)
    chunk_counts_ptr,  # (num_chunks, E) int32, read when MULTI_CHUNK
    tokens_per_expert_ptr,  # (E,) int32, out (program 0)
    expert_offsets_ptr,  # (E + 1,) int32, out (program 0)
    sorted_rows_ptr,  # (T, K) int32, out
    sorted_assignments_ptr,  # (R,) int32, out
    # sizes
    num_tokens,
    num_experts,
    num_chunks,
    num_rows,  # R
    capacity,  # assignments an expert keeps; T·K when dropless
    block_m,  # each segment is padded to a multiple of it
    # strides
    stride_experts_t,
    stride_experts_k,
    stride_counts_chunk,
    stride_counts_e,
    stride_rows_t,
    stride_rows_k,
    stride_assignments_r,
    # constexprs
    K: tl.constexpr,
    CHUNK: tl.constexpr,  # assignments per program
    SUB: tl.constexpr,  # assignments (and padding rows) per step
    NUM_BINS: tl.constexpr,  # next power of two > E
    MULTI_CHUNK: tl.constexpr,  # more than one program: read the others' counts from chunk_counts
    PADDED: tl.constexpr,  # block_m > 1: padding rows between segments
    CHUNKS_PER_STEP: tl.constexpr,  # rows of chunk_counts read per step
):
    chunk = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, NUM_BINS)
    real_bins = bins < num_experts
    num_assignments = num_tokens * K
    before = tl.zeros((NUM_BINS,), dtype=tl.int32)  # assignments to each expert in the chunks before this one
    total = tl.zeros((NUM_BINS,), dtype=tl.int32)
    if MULTI_CHUNK:
        for first in range(0, num_chunks, CHUNKS_PER_STEP):
            chunks = first + tl.arange(0, CHUNKS_PER_STEP)
            counts = tl.load(
                chunk_counts_ptr + chunks[:, None] * stride_counts_chunk + bins[None, :] * stride_counts_e,
                mask=(chunks < num_chunks)[:, None] & real_bins[None, :], other=0,
            )
            total += tl.sum(counts, axis=0)
            before += tl.sum(tl.where((chunks < chunk)[:, None], counts, 0), axis=0)
    else:
        for sub_start in range(0, CHUNK, SUB):
            positions = sub_start + tl.arange(0, SUB).to(tl.int64)
            expert = tl.load(
                experts_ptr + (positions % num_tokens) * stride_experts_t + (positions // num_tokens) * stride_experts_k,
                mask=positions < num_assignments, other=num_experts,
            )
            total += tl.histogram(expert, NUM_BINS)
        total = tl.where(real_bins, total, 0)
    kept_counts = tl.minimum(total, capacity)
    segments = (kept_counts + block_m - 1) // block_m * block_m
    ends = tl.cumsum(segments, axis=0)
    starts = ends - segments
    if chunk == 0:
        tl.store(tokens_per_expert_ptr + bins, kept_counts, mask=real_bins)
        tl.store(expert_offsets_ptr + bins, starts, mask=real_bins)
        tl.store(expert_offsets_ptr + num_experts, tl.sum(segments, axis=0))

    # Rank of each assignment within its expert: the sub-chunk's start (running) + earlier same-expert
    # positions inside the sub-chunk. A SUB×SUB comparison costs the same for any E.
    lanes = tl.arange(0, SUB)
    running = before
    for sub_start in range(0, CHUNK, SUB):
        positions = chunk * CHUNK + sub_start + lanes.to(tl.int64)
        in_stream = positions < num_assignments
        slot = positions // num_tokens
        token = positions % num_tokens
        expert = tl.load(experts_ptr + token * stride_experts_t + slot * stride_experts_k, mask=in_stream, other=num_experts)
        earlier_same = (expert[:, None] == expert[None, :]) & (lanes[None, :] < lanes[:, None]) & in_stream[None, :]
        rank = _gather(running, expert, bins) + tl.sum(earlier_same.to(tl.int32), axis=1)
        kept = rank < capacity
        row = _gather(starts, expert, bins) + rank
        tl.store(sorted_rows_ptr + token * stride_rows_t + slot * stride_rows_k, tl.where(kept, row, -1), mask=in_stream)
        assignment = (token * K + slot).to(tl.int32)
        tl.store(sorted_assignments_ptr + row.to(tl.int64) * stride_assignments_r, assignment, mask=in_stream & kept)
        running += tl.histogram(expert, NUM_BINS)

    # -1 on this program's share of the rows that hold no kept assignment.
    rows_per_program = tl.cdiv(num_rows, num_chunks)
    kept_ends = starts + kept_counts
    used_rows = tl.sum(segments, axis=0)
    for row_start in range(0, rows_per_program, SUB):
        rows = chunk * rows_per_program + row_start + lanes.to(tl.int64)
        in_share = (rows < num_rows) & (row_start + lanes < rows_per_program)
        padding = rows >= used_rows
        if PADDED:
            segment = tl.sum(((starts[None, :] <= rows[:, None]) & real_bins[None, :]).to(tl.int32), axis=1) - 1
            padding = padding | (rows >= _gather(kept_ends, segment, bins))
        tl.store(sorted_assignments_ptr + rows * stride_assignments_r, tl.full((SUB,), -1, tl.int32), mask=in_share & padding)


def permute(experts: Tensor, num_experts: int, capacity: int | None, block_m: int) -> Permutation:
    """The expert-sorted layout of ``moe_kernels.pipeline`` for expert ids [T, k] int32 in [0, E).

    capacity: assignments each expert keeps (the first in the layout's order), None for dropless.
    block_m: each expert's segment starts at a multiple of it; rows between segments are padding.
    Returns Permutation(tokens_per_expert [E] int32, expert_offsets [E + 1] int32 with expert_offsets[E] the
    padded end of the last segment, sorted_rows [T, k] int32 (-1 where dropped), sorted_assignments [R]
    int32 (-1 on padding)), R = num_sorted_rows(T, k, E, block_m). Equals backend "torch"'s permute for
    block_m = 1. One launch when T·k fits one chunk (``tiles.permute_chunk``), else two. No host
    synchronisation.
    """
    if experts.dim() != 2 or experts.dtype != torch.int32:
        raise ValueError(f"experts must be a [T, k] int32 tensor, got {tuple(experts.shape)} {experts.dtype}")
    if block_m < 1:
        raise ValueError(f"block_m must be at least 1, got {block_m}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be None or non-negative, got {capacity}")
    num_tokens, k = experts.shape
    num_assignments = num_tokens * k
    num_rows = num_sorted_rows(num_tokens, k, num_experts, block_m)
    device = experts.device
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    sorted_rows = torch.empty((num_tokens, k), dtype=torch.int32, device=device)
    sorted_assignments = torch.empty((num_rows,), dtype=torch.int32, device=device)
    permutation = Permutation(tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments)
    if num_assignments == 0 or num_experts == 0:
        tokens_per_expert.zero_(), expert_offsets.zero_(), sorted_assignments.fill_(-1)
        return permutation

    chunk, sub = permute_chunk(num_assignments, num_experts)
    num_chunks = max(1, triton.cdiv(num_assignments, chunk))
    num_bins = triton.next_power_of_2(num_experts + 1)
    chunk_counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
    if num_chunks > 1:
        _chunk_histogram_kernel[(num_chunks,)](
            experts, chunk_counts,
            num_tokens, num_experts,
            experts.stride(0), experts.stride(1),
            chunk_counts.stride(0), chunk_counts.stride(1),
            K=k, CHUNK=chunk, SUB=sub, NUM_BINS=num_bins,
        )  # fmt: skip
    _scatter_rows_kernel[(num_chunks,)](
        experts, chunk_counts, tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments,
        num_tokens, num_experts, num_chunks, num_rows,
        num_assignments if capacity is None else capacity, block_m,
        experts.stride(0), experts.stride(1),
        chunk_counts.stride(0), chunk_counts.stride(1),
        sorted_rows.stride(0), sorted_rows.stride(1),
        sorted_assignments.stride(0),
        K=k, CHUNK=chunk, SUB=sub, NUM_BINS=num_bins, MULTI_CHUNK=num_chunks > 1, PADDED=block_m > 1,
        CHUNKS_PER_STEP=min(16, triton.next_power_of_2(num_chunks)),
    )  # fmt: skip
    return permutation
