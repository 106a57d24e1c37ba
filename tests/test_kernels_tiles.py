"""The tile policy (moe_kernels/kernels/tiles.py) and the numerics a launcher picks, checked without a GPU.

Everything here is a function of shapes, dtypes and the architecture, so the tests are exact: the policy's
contract (tile sizes Triton and the MMA units accept, the A/B swap only where it buys wgmma), the decode
tiles' parallelism at the published layer sizes (issue 10: ≥ 132 programs with work at T = 1), the prefill
tiles' bound on padding (issue 11), the override hook, and the fp32 input precision that follows torch's
TF32 setting (issue 11).
"""
import dataclasses
import math

import pytest
import torch

pytest.importorskip("triton")

from moe_kernels.kernels import grouped_gemm, tiles  # noqa: E402

# (d, d_ff, E, k, gated) of the bench layers at their published sizes (bench/configs.py).
LAYERS = {
    "Mixtral-8x7B": (4096, 14336, 8, 2, True),
    "Qwen3-30B-A3B": (2048, 768, 128, 8, True),
    "DeepSeek-V3-like": (7168, 2048, 256, 8, True),
    "Switch-Base": (768, 3072, 128, 1, False),
    "Shazeer-style": (512, 1024, 256, 4, False),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _gemms(name, num_tokens, dtype, arch):
    """(GEMM 1 tiles, GEMM 2 tiles, rows) of one layer's forward."""
    d, d_ff, num_experts, k, gated = LAYERS[name]
    rows = num_tokens * k
    up = tiles.row_gemm_tiles(rows, num_tokens, k, num_experts, d_ff, d, dtype, arch, halves=2 if gated else 1)
    down = tiles.row_gemm_tiles(rows, num_tokens, k, num_experts, d, d_ff, dtype, arch, may_split_k=True)
    return up, down, rows


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_tiles_contract(dtype, arch):
    for name in LAYERS:
        for num_tokens in (0, 1, 16, 64, 512, 4096, 16384):
            up, down, _ = _gemms(name, num_tokens, dtype, arch)
            for config, halves in ((up, 2 if LAYERS[name][4] else 1), (down, 1)):
                sizes = (config.block_m, config.block_n, config.block_k, config.split_k, config.sub_tiles)
                assert all(_is_power_of_2(v) for v in sizes)
                assert 16 <= config.sub_m <= 128 and config.block_n >= 16 and config.block_k >= 16
                assert config.swap_ab == (arch >= 90 and config.sub_m < 64)
                # the sub-tiles' accumulators together stay within the widest tile's 128×128
                assert config.sub_tiles == 1 or config.block_m * config.block_n * halves <= 128 * 128
                assert config.num_warps in (4, 8) and config.group_m >= 1


def test_decode_gives_every_sm_work():
    """At T = 1 each chosen expert's matrices are split over enough programs (column blocks, and split-K
    for GEMM 2) that at least NUM_SMS programs have rows to compute, for the four decode layers."""
    for name in ("Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V3-like", "Switch-Base"):
        d, d_ff, _, k, _ = LAYERS[name]
        for dtype in (torch.bfloat16, torch.float16):
            up, down, _ = _gemms(name, 1, dtype, 90)
            assert k * math.ceil(d_ff / up.block_n) >= tiles.NUM_SMS, (name, up)
            assert k * math.ceil(d / down.block_n) * down.split_k >= tiles.NUM_SMS, (name, down)
            # one row tile holds all of an expert's rows: its weights are read once
            assert up.block_m >= 1 and down.block_m >= 1 and up.split_k == 1


def test_prefill_padding_is_bounded():
    """With ≥ 64 rows per expert the last MMA of each expert pads at most sub_m − 1 rows (sub-tiles without
    a row are skipped), and sub_m ≤ rows per expert / 4 keeps that waste within 25% even for the worst
    expert of average size."""
    for name in LAYERS:
        d, d_ff, num_experts, k, _ = LAYERS[name]
        for num_tokens in (4096, 16384, 65536):
            rows_per_expert = num_tokens * k / num_experts
            if rows_per_expert < 64:
                continue
            for config in _gemms(name, num_tokens, torch.bfloat16, 90)[:2]:
                assert config.sub_m <= rows_per_expert / 4 or config.sub_m == 16, (name, num_tokens, config)


def test_override_hook_applies_and_is_checked():
    chosen = tiles.row_gemm_tiles(64, 64, 1, 4, 32, 32, torch.float16, 90)
    wanted = dataclasses.replace(chosen, block_n=16, num_warps=4)
    with tiles.overridden(lambda kind, shape, config: wanted if kind == "row" else config):
        assert tiles.row_gemm_tiles(64, 64, 1, 4, 32, 32, torch.float16, 90) == wanted
    assert tiles.row_gemm_tiles(64, 64, 1, 4, 32, 32, torch.float16, 90) == chosen
    with tiles.overridden(lambda kind, shape, config: dataclasses.replace(config, split_k=2)):
        with pytest.raises(ValueError, match="split_k=2"):
            tiles.row_gemm_tiles(64, 64, 1, 4, 32, 32, torch.float16, 90)
    with tiles.overridden(lambda kind, shape, config: dataclasses.replace(config, block_m=32, sub_tiles=4)):
        with pytest.raises(ValueError, match="sub_tiles=4 must split block_m=32"):
            tiles.row_gemm_tiles(64, 64, 1, 4, 32, 32, torch.float16, 90)
    with tiles.overridden(lambda kind, shape, config: dataclasses.replace(config, col_tiles_k=2)):
        with pytest.raises(ValueError, match="col_tiles_k=2"):
            tiles.row_gemm_tiles(64, 64, 1, 4, 32, 32, torch.float16, 90)


def test_column_bands_read_the_other_operand_once_at_the_narrow_widths():
    """Qwen3/8 (d 256, d_ff 96, k 8) and Switch/8 (d 96, d_ff 384, k 1) at 64 rows per expert (issue 11): a width
    narrowed to blocks of 32 is one band of three sub-tiles, an output of 256 columns one band of two blocks,
    and each weight gradient's sub-tiles cover the narrow side whole, so the other operand is read once per
    GEMM there; a gated GEMM 1 keeps one block per program. The published widths keep one block per program."""
    fp16 = torch.float16
    qwen = (8192, 1024, 8, 128)
    switch = (8192, 8192, 1, 128)
    for shape, n_out, n_in in ((qwen, 96, 256), (qwen, 256, 192), (switch, 96, 384)):
        config = tiles.row_gemm_tiles(*shape, n_out, n_in, fp16, 90)
        assert config.col_tiles * config.block_n >= n_out > (config.col_tiles - 1) * config.block_n, (n_out, config)
        assert config.block_m == 128 and config.block_m * config.col_tiles * config.block_n <= 128 * 256
    assert tiles.row_gemm_tiles(*qwen, 96, 256, fp16, 90, halves=2).col_tiles == 1
    for shape, n_row, n_tok, whole in ((qwen[1:], 96, 256, "both"), (qwen[1:], 192, 256, "rows"), (switch[1:], 384, 96, "tokens")):
        config = tiles.weight_grad_tiles(*shape, n_row, n_tok, fp16, 90)
        rows_side, tokens_side = config.col_tiles * config.block_n, config.col_tiles_k * config.block_k
        assert rows_side * tokens_side <= tiles.WEIGHT_GRAD_ACCUMULATORS, config
        assert whole == "tokens" or rows_side >= n_row, config
        assert whole == "rows" or tokens_side >= n_tok, config
    for name, (d, d_ff, num_experts, k, gated) in LAYERS.items():
        for dtype in DTYPES:
            for arch in (80, 90):
                for num_tokens in (1, 64, 4096, 16384):
                    up, down, rows = _gemms(name, num_tokens, dtype, arch)
                    backward = (
                        tiles.row_gemm_tiles(rows, num_tokens, k, num_experts, d_ff, d, dtype, arch),
                        tiles.weight_grad_tiles(num_tokens, k, num_experts, d_ff, d, dtype, arch),
                        tiles.weight_grad_tiles(num_tokens, k, num_experts, (2 if gated else 1) * d_ff, d, dtype, arch),
                    )
                    for config in (up, down, *backward):
                        assert (config.col_tiles, config.col_tiles_k) == (1, 1), (name, num_tokens, config)


def test_prefill_tile_reads_an_average_expert_weights_once():
    """At 64 rows per expert (the gate's Mixtral/32, T = 256) a tile takes 128 rows as 8 MMAs of 16, so an
    expert of up to twice the average size reads each weight chunk once (traffic meter: 4.4× → 1×)."""
    up = tiles.row_gemm_tiles(512, 256, 2, 8, 448, 128, torch.float16, 90, halves=2)
    down = tiles.row_gemm_tiles(512, 256, 2, 8, 128, 448, torch.float16, 90, may_split_k=True)
    assert (up.block_m, up.sub_tiles, down.block_m, down.sub_tiles) == (128, 8, 128, 8)


@pytest.mark.parametrize(
    "setting, expected",
    [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")],
)
def test_fp32_input_precision_follows_torch(setting, expected):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert grouped_gemm.input_precision(torch.float32) == expected
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            assert grouped_gemm.input_precision(dtype) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


def test_fp32_input_precision_follows_allow_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert grouped_gemm.input_precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert grouped_gemm.input_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **constexprs)`` records the constexprs."""

    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32")])
def test_launchers_pass_the_precision(setting, expected, monkeypatch):
    """Every GEMM launch of a float32 forward and backward gets the precision torch's setting asks for."""
    from moe_kernels.kernels import combine as combine_module
    from moe_kernels.pipeline import Permutation

    launches = []
    for name in ("_expert_up_kernel", "_rows_times_weights_kernel", "_expert_down_bwd_kernel", "_expert_weight_grad_kernel"):
        monkeypatch.setattr(grouped_gemm, name, _Recorder(launches))
    monkeypatch.setattr(combine_module, "_combine_kernel", _Recorder([]))
    permutation = Permutation(
        torch.tensor([2, 1], dtype=torch.int32), torch.tensor([0, 2, 3], dtype=torch.int32),
        torch.tensor([[0, 2], [1, -1]], dtype=torch.int32), torch.tensor([0, 2, 1], dtype=torch.int32),
    )
    x, up_weight, down_weight = torch.randn(2, 8), torch.randn(2, 12, 8), torch.randn(2, 8, 6)
    weights = torch.rand(2, 2)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        hidden, _ = grouped_gemm.expert_up_forward(x, up_weight, None, permutation, "swiglu")
        grouped_gemm.expert_down_combine_forward(hidden, down_weight, None, permutation, weights)
        grouped_gemm.expert_down_combine_backward(x, hidden, down_weight, None, permutation, weights)
        grouped_gemm.expert_up_backward(hidden, x, up_weight, None, permutation, "swiglu")
    finally:
        torch.set_float32_matmul_precision(before)
    assert len(launches) == 7
    assert {launch["INPUT_PRECISION"] for launch in launches} == {expected}
