"""Tile and layout policy: the one place where tile sizes, warps and stages of every kernel are chosen.

Every launcher asks this module; no launcher picks a tile of its own. The choices are functions of shapes
and dtypes only (never of routing values), so a layer call never waits on the device to choose.

- ``block_m_for``: the tile height the permutation pads each expert's segment to (a layout decision: the
  grouped GEMMs' BLOCK_M must equal it for one expert per tile).
- ``gemm_tiles``: BLOCK_M/N/K, num_warps, num_stages of a grouped GEMM launch.
- ``gating_tiles``, ``permute_chunk``, ``combine_block_d``: the small kernels' launch shapes.

None of it is tuned on a GPU yet; each function says where its numbers come from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of one grouped GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def block_m_for(num_tokens: int, k: int, num_experts: int) -> int:
    """The tile height the permutation is padded to, from shapes only: 16, 32 or 64.

    At least 16 because tl.dot needs 16 rows. Padding costs up to E·(block_m − 1) rows next to the T·k real
    ones, so taller tiles wait until experts average enough rows (≥ 256, ≥ 1024) to keep it a few percent.
    """
    rows_per_expert = num_tokens * k / max(num_experts, 1)
    if rows_per_expert >= 1024:
        return 64
    if rows_per_expert >= 256:
        return 32
    return 16


def gemm_tiles(num_tokens: int, k: int, num_experts: int, n_out: int, n_in: int, dtype: torch.dtype) -> TileConfig:
    """Tiles for a grouped GEMM producing n_out columns from n_in: keyed on (T bucket via block_m_for, d, d_ff, E, k, dtype).

    Not tuned on a GPU yet: the sizes follow Triton's matmul tutorial (128×64 tiles, 3 stages, 16-bit
    inputs), halved along K for 4-byte inputs to keep shared memory in budget, and shrunk to the problem
    for narrow layers. Tune with bench/ on an H100 before trusting them for speed.
    """
    block_m = block_m_for(num_tokens, k, num_experts)
    wide_inputs = dtype.itemsize >= 4
    block_n = min(128, max(16, triton.next_power_of_2(n_out)))
    block_k = min(32 if wide_inputs else 64, max(16, triton.next_power_of_2(n_in)))
    num_warps = 8 if block_m * block_n >= 64 * 128 else 4
    return TileConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=3)


def gating_tiles(block_e: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) of the gating kernels: a [BLOCK_T, BLOCK_E] tile of about 2048 float32 over 8 warps.

    Sized so that both kernels compile for sm_90 without register spills for E ≤ 256, k ≤ 8 (checked with
    ptxas through cuobjdump; 4096 over 4 warps spilled). Not yet timed on a GPU.
    """
    return max(1, min(64, 2048 // block_e)), 8


def permute_chunk(num_assignments: int) -> int:
    """Assignments per program of the permutation kernels: 128 (a CHUNK² comparison tile of 16K, no spills
    on sm_90), fewer for a short stream. Not yet timed on a GPU."""
    return min(128, triton.next_power_of_2(max(num_assignments, 1)))


def combine_block_d(d: int) -> int:
    """Columns per program of the combine: one program per token and column block; wide blocks keep the k
    loads long and contiguous. Untuned."""
    return min(triton.next_power_of_2(max(d, 16)), 1024)
