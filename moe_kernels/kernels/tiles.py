"""Tile and layout policy: the one place where tile sizes, warps, stages and program order of every kernel
are chosen.

Every launcher asks this module; no launcher picks a tile of its own. The choices are functions of shapes,
dtypes and the GPU architecture only (never of routing values), so a layer call never waits on the device
to choose.

- ``block_m_for``: the tile height the permutation pads each expert's segment to.
- ``row_gemm_tiles``: a grouped GEMM over sorted rows (GEMM 1, GEMM 2, and the backward's d(hidden) and
  d(x) GEMMs): BLOCK_M/N/K, split-K, A/B swap, GROUP_M program order, num_warps/stages.
- ``weight_grad_tiles``: the weight-gradient GEMMs (a sum over each expert's rows).
- ``gating_tiles``, ``permute_chunk``, ``combine_block_d``: the small kernels' launch shapes.
- ``arch``: the architecture a launch plans for; ``overridden``: the hook for a tuning run on a GPU.

Where the numbers come from: the compile audit (``python -m bench.compile_audit``: wgmma vs mma.sync,
registers, spills, shared memory on sm_90a and sm_80) and the traffic meter (``python -m bench.traffic``:
bytes requested and MACs executed), both run on the CPU. Nothing here is timed on a GPU yet: the first GPU
run should tune through ``overridden``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton

# SMs of an H100 SXM: the number of programs a decode-sized GEMM should give useful work (issue 10), so
# that every SM streams weights. A fixed number, not the device's, so that the split-K reduction order
# (and so the bits of the result) does not depend on which GPU runs it.
NUM_SMS = 132
# A decode program streams its share of one expert's weights; what it reads besides (tokens_per_expert to
# find its expert, 4·E bytes; its rows of x or hidden, again for every column block; split-K partials) is
# overhead the traffic meter counts (on a GPU mostly L2 hits). Programs shrink towards NUM_SMS only while
# that overhead stays within a tenth of their weight bytes, which lets Switch-Base's GEMM 1 and GEMM 2 (the
# smallest of the four decode layers) reach 132 programs at T = 1.
OVERHEAD_SHARE = 10
# Accumulators (float32) of one 16-bit weight-gradient program: its sub-tiles may hold 1.5× those of a
# 128×128 tile, so that Qwen3/8's d(down_weight) (d = 256 by d_ff = 96, 3 × 32 columns) reads each side once
# and its d(up_weight) (d = 256 by 2·96) x once (traffic meter), at 96 registers a thread over 8 warps
# (compile audit: no spills on sm_90a or sm_80).
WEIGHT_GRAD_ACCUMULATORS = 3 * 128 * 64


@dataclass(frozen=True)
class GemmTiles:
    """Tiles and launch parameters of one grouped GEMM launch.

    block_m: sorted rows per tile (one expert per tile; each weight chunk is loaded once per tile);
    block_n: output columns per program (per half of a gated GEMM 1); block_k: the reduction step;
    split_k: programs sharing one tile's reduction (their float32 partials summed in a fixed order
    afterwards); swap_ab: each MMA is computed transposed (weightsᵀ · rowsᵀ) so that its M dimension is
    block_n, which lets Hopper's wgmma (M ≥ 64) run short row tiles; group_m: row tiles visited together
    per column band (L2 reuse of the weights); sub_tiles: a row GEMM's tile is that many MMAs of
    block_m / sub_tiles rows, each with its own accumulator, applied to the same weight chunk, and one
    without a row is skipped, so the weights are read once per block_m rows while the MACs are padded to
    block_m / sub_tiles rows only (the weight-gradient GEMMs: 1); col_tiles: a program's columns are that
    many blocks of block_n (a band), each with its own accumulators, sharing each loaded chunk of the other
    operand (A's rows; for a weight gradient, the token side), and one without a column is skipped, so a
    width narrowed to avoid padding (96 = 3·32) reads the other operand once per band instead of once per
    block; col_tiles_k: weight gradients only, the same along block_k (the token side's columns).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    swap_ab: bool
    group_m: int
    num_warps: int
    num_stages: int
    sub_tiles: int = 1
    col_tiles: int = 1
    col_tiles_k: int = 1

    @property
    def sub_m(self) -> int:
        """Rows of one MMA: block_m / sub_tiles."""
        return self.block_m // self.sub_tiles


# The tuning hook: a function (kind, shape, tiles) -> tiles, or None. Set only through ``overridden``.
_override: Callable[[str, dict, GemmTiles], GemmTiles] | None = None


@contextlib.contextmanager
def overridden(override: Callable[[str, dict, GemmTiles], GemmTiles]) -> Iterator[None]:
    """Within the block, every GEMM launch takes ``override(kind, shape, tiles)`` instead of ``tiles``.

    kind: "row" or "weight_grad"; shape: the policy function's arguments as a dict; tiles: its choice.
    For a tuning run on a GPU and for tests that force a variant; not for production paths.
    """
    global _override
    outer, _override = _override, override
    try:
        yield
    finally:
        _override = outer


def _decided(kind: str, shape: dict, tiles: GemmTiles) -> GemmTiles:
    if _override is not None:
        tiles = _override(kind, shape, tiles)
        if tiles.split_k != 1 and not (kind == "row" and shape["may_split_k"]):
            raise ValueError(f"split_k={tiles.split_k} for a {kind} GEMM that cannot reduce split partials: {shape}")
        if tiles.block_m % tiles.sub_tiles or tiles.sub_m < 16 or (kind != "row" and tiles.sub_tiles != 1):
            raise ValueError(f"sub_tiles={tiles.sub_tiles} must split block_m={tiles.block_m} of a row GEMM into MMAs of at least 16 rows")
        if tiles.col_tiles < 1 or tiles.col_tiles_k < 1 or (kind == "row" and tiles.col_tiles_k != 1):
            raise ValueError(f"col_tiles={tiles.col_tiles}, col_tiles_k={tiles.col_tiles_k}: at least 1 each, col_tiles_k 1 for a row GEMM")
    return tiles


def arch(device: torch.device) -> int:
    """Compute capability × 10 that a launch on ``device`` plans for: the CUDA device's; for CPU tensors
    (the Triton interpreter, which runs any tile) 90, so that the meter counts what an H100 would run."""
    if device.type == "cpu":
        return 90
    major, minor = torch.cuda.get_device_capability(device if device.type == "cuda" else None)
    return 10 * major + minor


def block_m_for(num_tokens: int, k: int, num_experts: int) -> int:
    """The tile height the permutation pads each expert's segment to: 1, no padding.

    The grouped GEMMs find each tile's expert from tokens_per_expert (a row tile never spans two experts
    whatever the layout), so padding would only cost memory: E·(block_m − 1) rows of hidden.
    """
    return 1


def _prev_power_of_2(value: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(value, 1.0))))


def _is_16_bit(dtype: torch.dtype) -> bool:
    return dtype.itemsize == 2


def _column_block(width: int, widest: int) -> int:
    """Columns (or reduction steps) per block across ``width``: ``widest`` (a power of two), halved (down to
    32) while the last block would be mostly padding, more than width/16 columns of MACs wasted (traffic
    meter: widths such as GPT-OSS's d_ff 2880 = 22.5·128, the CPU-scaled layers' 448, or Qwen3/8's d_ff 96
    as GEMM 2's reduction; the published bench layers' widths are multiples of 128)."""
    block = min(widest, max(16, triton.next_power_of_2(width)))
    while block > 32 and 16 * (triton.cdiv(width, block) * block - width) > width:
        block //= 2
    return block


def row_gemm_tiles(
    num_rows: int, num_tokens: int, k: int, num_experts: int, n_out: int, n_in: int, dtype: torch.dtype,
    arch: int, halves: int = 1, may_split_k: bool = False,
) -> GemmTiles:
    """Tiles of a grouped GEMM over sorted rows: [rows of one expert, n_in] · W[e]ᵀ → [rows, n_out·halves].

    num_rows: R, rows of the permutation; num_tokens, k: the routing's T and S (rows per expert ≈ T·k/E);
    halves: 2 for a gated GEMM 1 (gate and up columns share the row tile); may_split_k: the launcher can
    reduce split-K partials (GEMM 2's combine can).

    Two regimes, by the expected rows per expert μ = T·k/E:
    - Decode (μ < 32): block_m covers ~2μ rows (16 to 64) so that each expert's rows take one tile and its
      weights are read once (traffic meter: issue 10's bytes). Each program's reads besides its weights
      (its rows of x, again for every column block) must stay within 1/OVERHEAD_SHARE of its weight
      bytes: block_n starts at 128 (64 per half when gated) and doubles (up to 256) until they do (many
      rows per tile: Mixtral at T = 64 re-read x for 12% of the weight bytes at 64 columns per half);
      then block_n halves (down to 16) and split-K doubles where the launcher can reduce partials, while
      that holds, until the expected useful programs (experts with rows × column blocks × splits) reach
      NUM_SMS. block_k 128 for 16-bit inputs (64 on sm_80): long contiguous weight rows.
    - Prefill (μ ≥ 32): MMAs of sub_m = μ/4 rows rounded down to a power of two in [16, 128], which keeps
      the padding of a partial last MMA near 1/8 of the rows on average (MACs executed ≤ 1.25× useful at
      μ ≥ 64, issue 11), 128×128 output tiles (128×64 per half when gated; narrower where the last column
      block would be mostly padding, the program then taking several such blocks, col_tiles, up to 128
      columns; an output of at most 256 columns in one program), reduction steps of 64 (32 where a reduction of 96 would be padded to
      128: Qwen3/8's GEMM 2, Switch/8's GEMM 1), GROUP_M = 8. The tile takes up to 2μ rows (sub_tiles MMAs of sub_m,
      while their accumulators stay within the 128×128 of the widest tile), so that an expert of about
      average size reads each weight chunk once instead of once per sub_m rows (traffic meter, Mixtral/32
      at T = 256: 8 MMAs of 16 rows, the backward's weight reads 4.4× → 1×); on sm_90 only.
    On sm_90, MMAs shorter than 64 rows are computed swapped (swap_ab) so that they still compile to
    wgmma (compile audit); sm_80 runs mma.sync either way.
    """
    shape = dict(num_rows=num_rows, num_tokens=num_tokens, k=k, num_experts=num_experts, n_out=n_out, n_in=n_in,
                 dtype=dtype, arch=arch, halves=halves, may_split_k=may_split_k)
    rows_per_expert = num_tokens * k / max(num_experts, 1)
    narrow = _is_16_bit(dtype)
    if rows_per_expert < 32:
        longest = max(16, triton.next_power_of_2(max(min(num_tokens, num_rows), 1)))
        block_m = min(64, longest, max(16, triton.next_power_of_2(math.ceil(2 * rows_per_expert))))
        # 128 on sm_80 spilled 8 B in Switch's d(hidden) GEMM at T = 64 (compile audit).
        block_k = min((128 if arch >= 90 else 64) if narrow else 32, max(16, triton.next_power_of_2(n_in)))
        useful_tiles = max(1, min(num_experts, num_rows))
        tile_rows = max(1.0, rows_per_expert)

        def affordable(block_n: int, split_k: int) -> bool:
            reduction = n_in // split_k
            weight_bytes = reduction * block_n * halves * dtype.itemsize
            other_bytes = 4 * num_experts + tile_rows * reduction * dtype.itemsize
            if split_k > 1:
                other_bytes += 2 * tile_rows * block_n * 4
            return OVERHEAD_SHARE * other_bytes <= weight_bytes

        widest = min(256 // halves, max(16, triton.next_power_of_2(n_out)))
        block_n = min(128 // halves, widest)
        while block_n < widest and not affordable(block_n, 1):  # many rows per tile: x re-read per column block
            block_n *= 2
        while block_n > 16 and useful_tiles * triton.cdiv(n_out, block_n) < NUM_SMS and affordable(block_n // 2, 1):
            block_n //= 2
        programs = useful_tiles * triton.cdiv(n_out, block_n)
        split_k = 1
        while (may_split_k and programs * split_k < NUM_SMS and n_in // (2 * split_k) >= block_k
               and affordable(block_n, 2 * split_k)):
            split_k *= 2
        group_m = 1
        num_stages = 4 if arch >= 90 else 3
        # 8 warps from 8K accumulators: the widened tiles (32 × 256 at Mixtral's T = 64) spilled on sm_80 with 4.
        wide_accumulator = 8192
        sub_tiles = 1
        col_tiles = 1
    else:
        sub_m = min(128, max(16, _prev_power_of_2(rows_per_expert / 4)))
        block_k = _column_block(n_in, 64 if narrow else 32)
        block_n = _column_block(n_out, 128 // halves)
        split_k = 1
        group_m = 8
        num_stages = 3
        wide_accumulator = 128 * 128
        # Column bands: a program takes col_tiles blocks, so that the rows are read once per band, not per
        # block (traffic meter): a width narrowed to avoid padding in bands of up to 128 columns (Switch/8's
        # d(x) GEMM read d(pre-activation) once per 32 of d_model's 96 columns, Qwen3/8's d(hidden) dy once
        # per 32 of d_ff's 96); an output of at most 256 columns in one band, its accumulators up to 128 × 256
        # (Qwen3/8's d(x) GEMM read d(pre-activation) once per 128 of d = 256; compile audit: 8 warps, no
        # spills, wgmma on sm_90a). Published widths (≥ 768 = 6 · 128) keep one block per program. Not for a
        # gated GEMM 1, whose blocks hold two accumulators each already (compile audit: Qwen3/8's, 2 × 32
        # columns per half of 8 MMAs of 16 rows, spilled 2 KB on sm_90a).
        widest_band = 256 if n_out <= 256 else 128
        col_tiles = 1 if halves > 1 else min(triton.cdiv(n_out, block_n), widest_band // block_n)
        band_accumulator = max(wide_accumulator, 128 * col_tiles * block_n)
        sub_tiles = 1
        # Not on sm_80, where the accumulators of mma.sync sub-tiles outgrew the registers (compile audit:
        # Qwen3's gated GEMM 1 at T = 4096 spilled 680 B with 2 sub-tiles of 64 rows).
        while (arch >= 90 and sub_tiles * sub_m < 2 * rows_per_expert
               and 2 * sub_tiles * sub_m * col_tiles * block_n * halves <= band_accumulator):
            sub_tiles *= 2
        block_m = sub_tiles * sub_m
    swap_ab = arch >= 90 and block_m // sub_tiles < 64 and dtype != torch.float64
    num_warps = 8 if block_m * col_tiles * block_n * halves >= wide_accumulator else 4
    tiles = GemmTiles(block_m, block_n, block_k, split_k, swap_ab, group_m, num_warps, num_stages, sub_tiles, col_tiles)
    return _decided("row", shape, tiles)


def weight_grad_tiles(
    num_tokens: int, k: int, num_experts: int, n_row: int, n_tok: int, dtype: torch.dtype, arch: int
) -> GemmTiles:
    """Tiles of a weight gradient: per expert, [n_row, n_tok] = Σ over its rows of row_sideᵀ · token_side.

    block_n × block_k is an MMA's output tile (n_row × n_tok), block_m the rows summed per step; a program
    owns col_tiles × col_tiles_k such tiles. Each program reads its expert's rows of both sides once, so
    each side is re-read once per band of the other side: 128×128 tiles for 16-bit inputs keep that low
    (traffic meter), 64×64 for 4-byte ones (registers), narrower where a last block would be mostly
    padding, and then as many sub-tiles per program as read the least within the accumulators of
    ``WEIGHT_GRAD_ACCUMULATORS`` (ties: the fewest accumulators).
    """
    shape = dict(num_tokens=num_tokens, k=k, num_experts=num_experts, n_row=n_row, n_tok=n_tok, dtype=dtype, arch=arch)
    narrow = _is_16_bit(dtype)
    wide_tile = 128 if narrow else 64
    block_n = _column_block(n_row, wide_tile)
    block_k = _column_block(n_tok, wide_tile)
    budget = max(wide_tile * wide_tile, WEIGHT_GRAD_ACCUMULATORS if narrow else 0)

    def reads(col_tiles: int, col_tiles_k: int) -> int:  # columns of either side read, per row
        return n_row * triton.cdiv(n_tok, col_tiles_k * block_k) + n_tok * triton.cdiv(n_row, col_tiles * block_n)

    most = budget // (block_n * block_k)
    candidates = [
        (col_tiles, col_tiles_k)
        for col_tiles in range(1, min(most, triton.cdiv(n_row, block_n)) + 1)
        for col_tiles_k in range(1, min(most // col_tiles, triton.cdiv(n_tok, block_k)) + 1)
    ]
    col_tiles, col_tiles_k = min(candidates, key=lambda pair: (reads(*pair), pair[0] * pair[1]))
    # Rows summed per step: μ/4 as the row GEMMs' block_m, so that the last step's padding rows stay near
    # 1/8 of an expert's rows (MACs executed ≤ 1.25× useful at μ ≥ 64, issue 11).
    rows_per_expert = num_tokens * k / max(num_experts, 1)
    block_m = min(64 if narrow else 32, max(16, _prev_power_of_2(rows_per_expert / 4)))
    # 8 warps from 16K accumulators, or from a side of 256 (the token side scaled by the routing weights is
    # float32: Qwen3/8's 32 × 256 tile spilled 16 B on sm_90a with 4, compile audit).
    rows_side, tokens_side = col_tiles * block_n, col_tiles_k * block_k
    num_warps = 8 if rows_side * tokens_side >= 128 * 128 or max(rows_side, tokens_side) >= 256 else 4
    tiles = GemmTiles(block_m, block_n, block_k, 1, False, 1, num_warps, 3, 1, col_tiles, col_tiles_k)
    return _decided("weight_grad", shape, tiles)


def gating_tiles(block_e: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) of the gating kernels: a [BLOCK_T, BLOCK_E] tile of about 2048 float32 over 8 warps.

    Sized so that both kernels compile for sm_90 without register spills for E ≤ 256, k ≤ 8 (checked with
    ptxas through cuobjdump; 4096 over 4 warps spilled). Not yet timed on a GPU.
    """
    return max(1, min(64, 2048 // block_e)), 8


def permute_chunk(num_assignments: int, num_experts: int) -> tuple[int, int]:
    """(CHUNK, SUB) of the permutation kernels: assignments per program, and per step within it.

    SUB: at most 128 (a SUB² comparison tile of 16K) and at most 8K / NUM_BINS (NUM_BINS = the next power
    of two above E: each step gathers per-expert counts through a [SUB, NUM_BINS] tile; 128 × 512 spilled
    24 KB per program on sm_90a for E = 256, 64 × 256 36 B on sm_80, compile audit), at least 16; fewer for
    a short stream. Up to
    1024 assignments (T·k of any decode step) one program takes the whole stream, so the permutation is one
    launch; above, chunks of at least 1024 and at most 128 programs, so that each program's pass over the
    others' counts ([num_chunks, E]) stays short. Not yet timed on a GPU.
    """
    num_bins = triton.next_power_of_2(num_experts + 1)
    sub = min(128, max(16, 8192 // num_bins), triton.next_power_of_2(max(num_assignments, 1)))
    if num_assignments <= 1024:
        return max(sub, triton.next_power_of_2(max(num_assignments, 1))), sub
    return max(1024, triton.next_power_of_2(triton.cdiv(num_assignments, 128))), sub


def combine_block_d(d: int) -> int:
    """Columns per program of the combine: one program per token and column block; wide blocks keep the k
    loads long and contiguous. Untuned."""
    return min(triton.next_power_of_2(max(d, 16)), 1024)
