"""Permutation: expert ids [T, k] → the expert-sorted layout of ``moe_kernels.pipeline``, without a sort.

The assignments are read as one slot-major stream (position j = s·T + t), whose order within each expert
is the layout's sorted order and its capacity priority. Two kernels and a scan over a small buffer:
1. ``_chunk_histogram_kernel``: per chunk of the stream, how many assignments each expert receives,
   [num_chunks, E].
2. An exclusive scan of those counts over chunks (where each chunk's assignments start within each
   expert) and over experts (where each expert's segment starts), in PyTorch on the small buffer.
3. ``_scatter_rows_kernel``: each assignment's stable rank within its expert (chunk start + rank inside
   the chunk); the first ``capacity`` are kept and written to ``sorted_rows`` and ``sorted_assignments``.
Every buffer is sized from T, k, E and block_m, and nothing reads a value back to the host, so the whole
permutation can be captured in a CUDA graph.
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
    NUM_BINS: tl.constexpr,  # next power of two > E: bin E collects the positions past the stream's end
):
    chunk = tl.program_id(0).to(tl.int64)
    positions = chunk * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
    in_stream = positions < num_tokens * K
    slot = positions // num_tokens
    token = positions % num_tokens
    expert = tl.load(
        experts_ptr + token * stride_experts_t + slot * stride_experts_k, mask=in_stream, other=num_experts
    )
    counts = tl.histogram(expert, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(chunk_counts_ptr + chunk * stride_counts_chunk + bins * stride_counts_e, counts, mask=bins < num_experts)


@triton.jit
def _scatter_rows_kernel(
    # pointers
    experts_ptr,  # (T, K) int32, every id in [0, E)
    chunk_starts_ptr,  # (num_chunks, E) int32, assignments to each expert in the chunks before this one
    expert_offsets_ptr,  # (E + 1,) int32, first sorted row of each expert's segment
    sorted_rows_ptr,  # (T, K) int32, out
    sorted_assignments_ptr,  # (R,) int32, out at the kept rows only (the rest stay as filled)
    # sizes
    num_tokens,
    capacity,  # assignments an expert keeps; T·K when dropless
    # strides
    stride_experts_t,
    stride_experts_k,
    stride_starts_chunk,
    stride_starts_e,
    stride_offsets_e,
    stride_rows_t,
    stride_rows_k,
    stride_assignments_r,
    # constexprs
    K: tl.constexpr,
    CHUNK: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, CHUNK)
    positions = chunk * CHUNK + lanes.to(tl.int64)
    in_stream = positions < num_tokens * K
    slot = positions // num_tokens
    token = positions % num_tokens
    expert = tl.load(experts_ptr + token * stride_experts_t + slot * stride_experts_k, mask=in_stream, other=0)

    # Rank inside the chunk: earlier positions of the chunk that go to the same expert. A CHUNK×CHUNK
    # comparison costs the same for any E, where a one-hot prefix sum would grow with E.
    earlier_same = (
        (expert[:, None] == expert[None, :]) & (lanes[None, :] < lanes[:, None]) & in_stream[None, :]
    )
    rank_in_chunk = tl.sum(earlier_same.to(tl.int32), axis=1)
    chunk_start = tl.load(
        chunk_starts_ptr + chunk * stride_starts_chunk + expert * stride_starts_e, mask=in_stream, other=0
    )
    rank = chunk_start + rank_in_chunk
    kept = rank < capacity
    row = tl.load(expert_offsets_ptr + expert * stride_offsets_e, mask=in_stream, other=0) + rank

    tl.store(
        sorted_rows_ptr + token * stride_rows_t + slot * stride_rows_k, tl.where(kept, row, -1), mask=in_stream
    )
    assignment = (token * K + slot).to(tl.int32)
    tl.store(sorted_assignments_ptr + row.to(tl.int64) * stride_assignments_r, assignment, mask=in_stream & kept)


def permute(experts: Tensor, num_experts: int, capacity: int | None, block_m: int) -> Permutation:
    """The expert-sorted layout of ``moe_kernels.pipeline`` for expert ids [T, k] int32 in [0, E).

    capacity: assignments each expert keeps (the first in the layout's order), None for dropless.
    block_m: each expert's segment starts at a multiple of it; rows between segments are padding.
    Returns Permutation(tokens_per_expert [E] int32, expert_offsets [E + 1] int32 with expert_offsets[E] the
    padded end of the last segment, sorted_rows [T, k] int32 (-1 where dropped), sorted_assignments [R]
    int32 (-1 on padding)), R = num_sorted_rows(T, k, E, block_m). Equals backend "torch"'s permute for
    block_m = 1. No host synchronisation.
    """
    if experts.dim() != 2 or experts.dtype != torch.int32:
        raise ValueError(f"experts must be a [T, k] int32 tensor, got {tuple(experts.shape)} {experts.dtype}")
    if block_m < 1:
        raise ValueError(f"block_m must be at least 1, got {block_m}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be None or non-negative, got {capacity}")
    num_tokens, k = experts.shape
    num_assignments = num_tokens * k
    chunk = permute_chunk(num_assignments)
    num_chunks = triton.cdiv(num_assignments, chunk)
    device = experts.device

    chunk_counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
    sorted_rows = torch.empty((num_tokens, k), dtype=torch.int32, device=device)
    sorted_assignments = torch.full(
        (num_sorted_rows(num_tokens, k, num_experts, block_m),), -1, dtype=torch.int32, device=device
    )

    grid = lambda META: (triton.cdiv(num_assignments, META["CHUNK"]),)  # noqa: E731
    if num_assignments > 0:
        _chunk_histogram_kernel[grid](
            experts, chunk_counts,
            num_tokens, num_experts,
            experts.stride(0), experts.stride(1),
            chunk_counts.stride(0), chunk_counts.stride(1),
            K=k, CHUNK=chunk, NUM_BINS=triton.next_power_of_2(num_experts + 1),
        )  # fmt: skip

    totals = chunk_counts.sum(0)
    chunk_starts = (chunk_counts.cumsum(0) - chunk_counts).to(torch.int32)
    tokens_per_expert = totals if capacity is None else totals.clamp(max=capacity)
    segment_rows = (tokens_per_expert + block_m - 1) // block_m * block_m
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    expert_offsets[1:] = segment_rows.cumsum(0)

    if num_assignments > 0:
        _scatter_rows_kernel[grid](
            experts, chunk_starts, expert_offsets, sorted_rows, sorted_assignments,
            num_tokens, num_assignments if capacity is None else capacity,
            experts.stride(0), experts.stride(1),
            chunk_starts.stride(0), chunk_starts.stride(1),
            expert_offsets.stride(0),
            sorted_rows.stride(0), sorted_rows.stride(1),
            sorted_assignments.stride(0),
            K=k, CHUNK=chunk,
        )  # fmt: skip
    return Permutation(tokens_per_expert.to(torch.int32), expert_offsets, sorted_rows, sorted_assignments)
