"""The gates of issue 10 (decode at the bandwidth floor) and issue 11 (prefill and training at tensor-core
speed), as counts and compile facts from bench.traffic and bench.compile_audit, never times.

A case that does not hold yet is marked xfail(strict=True) with what is missing: when a change makes it
hold, its XPASS fails the suite until the mark is removed, so that progress shows and cannot slip back.
The meter's layers are the bench layers scaled down (bench.configs.scaled_for_cpu) so that the interpreter
counts them in seconds; expert count, k, router and activation are the layers' own.
"""
import functools

import pytest
import torch

triton = pytest.importorskip("triton")

from bench import traffic  # noqa: E402
from bench.configs import MODEL_CONFIGS, scaled_for_cpu  # noqa: E402
from conftest import INTERPRETED  # noqa: E402
from moe_kernels.kernels import tiles  # noqa: E402

MIXTRAL, QWEN3 = MODEL_CONFIGS[0], MODEL_CONFIGS[1]
metered = pytest.mark.skipif(not INTERPRETED, reason="the meter counts under the Triton interpreter (no CUDA device)")

# ------------------------------------------------------------------- issue 10: decode, T = 1, 16, 64

DECODE_LAYERS = {config.name: scaled_for_cpu(config) for config in (MIXTRAL, QWEN3)}  # d_model, d_ff / 8
DECODE_TOKENS = (1, 16, 64)
# Requested bytes / minimum of an inference forward: before issue 10 (2026-11-23) Mixtral/8 4.0, -, 2.1;
# Qwen3/8 15.3, -, 1.30. Now Mixtral/8 1.05, 1.06, 1.08; Qwen3/8 1.07, 1.05, 1.09 (bench/results).


@functools.cache
def _forward(name: str, tokens: int) -> dict:
    return traffic.layer_traffic(DECODE_LAYERS[name], tokens, backward=False)[0]


@metered
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("name", DECODE_LAYERS)
def test_decode_traffic_within_1_10x_minimum(name, tokens):
    row = _forward(name, tokens)
    assert row["bytes"] <= 1.10 * row["min_bytes"], f"{row['bytes_ratio']}× the minimum"


@metered
@pytest.mark.parametrize("name", DECODE_LAYERS)
def test_at_most_8_launches_per_forward_without_host_sync(name):
    """An inference forward (no autograd: a decode step) is 5 Triton launches (gating, permutation, GEMM 1,
    GEMM 2, combine) and the router's linear in float32 (x and its weight cast, one mm); was 35."""
    row = _forward(name, 1)
    assert row["launches"] <= 8, f"{row['triton_launches']} Triton + {row['torch_launches']} PyTorch: {row['torch_ops']}"
    assert row["host_syncs"] == 0


@pytest.mark.parametrize("config", [c for c in MODEL_CONFIGS if c.name != "Shazeer-style"], ids=lambda config: config.name)
def test_decode_gemms_plan_132_useful_programs_at_t1(config):
    """At the published sizes and T = 1 (k rows, one per chosen expert, one row tile each) the tile policy
    gives GEMM 1 and GEMM 2 at least NUM_SMS = 132 programs with a row: chosen experts × column blocks ×
    split-K. (The meter's count of the same, at Qwen3's real size, is the slow test below.)"""
    gated = 2 if config.gated else 1
    up = tiles.row_gemm_tiles(config.k, 1, config.k, config.num_experts, config.d_ff, config.d_model, torch.bfloat16, 90, halves=gated)
    down = tiles.row_gemm_tiles(config.k, 1, config.k, config.num_experts, config.d_model, config.d_ff, torch.bfloat16, 90, may_split_k=True)
    assert (up.block_m, down.block_m) == (16, 16)
    programs = {"GEMM 1": config.k * triton.cdiv(config.d_ff, up.block_n),
                "GEMM 2": config.k * triton.cdiv(config.d_model, down.block_n) * down.split_k}
    assert min(programs.values()) >= tiles.NUM_SMS, programs


@metered
@pytest.mark.slow
@pytest.mark.parametrize("config", [QWEN3], ids=lambda config: config.name)
def test_decode_gemms_fill_132_sms_at_t1(config):
    """At the published sizes (the SM count is a real-size fact): every launch with a tl.dot has at least 132
    programs that store something (Qwen3-30B-A3B: 192 and 256; before issue 10, 48 and 128). Slow (minutes
    under the interpreter)."""
    row = traffic.layer_traffic(config, 1, backward=False)[0]
    assert [(k["kernel"], k["useful_programs"]) for k in row["kernels"] if k["macs"] and k["useful_programs"] < 132] == []


# ----------------------------------------------------- issue 11: prefill and training, 64 rows per expert

# The bench layer Mixtral-8x7B/8 (d_model 512, d_ff 1792) at T·k/E = 64 rows per expert: the one of the five
# bench layers that the meter counts within about a minute. All five, counted at 64 rows per expert by
# `python3 -m bench.traffic --rows-per-expert 64`, are in bench/results/traffic-cpu-2026-11-23-prefill-bench-
# layers*.md. Before, these gates counted Mixtral/32 (d = 128), a proxy where the activations between the
# stages weigh as much as the weights: its backward is 2.30× its minimum there.
PREFILL_LAYER = scaled_for_cpu(MIXTRAL)
PREFILL_TOKENS = 256


@functools.cache
def _prefill() -> dict:
    forward, backward = traffic.layer_traffic(PREFILL_LAYER, PREFILL_TOKENS)
    return {"forward": forward, "backward": backward}


@metered
def test_prefill_forward_macs_within_1_25x_useful():
    """1.125× (16-row MMAs at 64 rows per expert); 1.43× before issue 11 (at Mixtral/32)."""
    row = _prefill()["forward"]
    assert row["macs"] <= 1.25 * row["useful_macs"], f"{row['macs_ratio']}× the useful MACs"


@metered
def test_prefill_backward_macs_within_1_25x_useful():
    """The backward reads the pre-activation GEMM 1 kept (the default, recompute_pre_activation=False), so
    its MACs are the four useful GEMMs and their padding (1.125×; 1.46× at Mixtral/32 when it recomputed GEMM 1)."""
    row = _prefill()["backward"]
    assert row["macs"] <= 1.25 * row["useful_macs"], f"{row['macs_ratio']}× the useful MACs"


@metered
def test_backward_does_not_recompute_gemm_1_by_default():
    """The kernel that applies the activation's backward reads the kept pre-activation: no tl.dot."""
    row = _prefill()["backward"]
    up_launches = [kernel for kernel in row["kernels"] if kernel["kernel"] == "_expert_up_kernel"]
    assert up_launches and [kernel["macs"] for kernel in up_launches] == [0] * len(up_launches)


@metered
def test_weight_gradient_bytes_within_2x_minimum():
    """1.77× (the weight gradients written once; x, dy, hidden and d(pre-activation) read once per 128-column block)."""
    row = _prefill()["backward"]
    assert row["weight_grad_bytes"] <= 2 * row["weight_grad_min_bytes"], f"{row['weight_grad_bytes_ratio']}× the minimum"


@metered
def test_backward_bytes_within_2x_minimum():
    """1.86× (5.1× at Mixtral/32 before the pre-activation was kept and the row GEMMs read each expert's
    weights once per tile of 8 sub-tiles; 2.31× when GEMM 1 is recomputed)."""
    row = _prefill()["backward"]
    assert row["bytes"] <= 2 * row["min_bytes"], f"{row['bytes_ratio']}× the minimum"


@metered
def test_backward_reads_each_experts_weights_once():
    """The backward's row GEMMs that read weights (d(hidden) reads down_weight, d(x) up_weight) have one tile
    per expert and column block at 64 rows per expert (sub-tiles: 8 MMAs of 16 rows share each weight chunk)."""
    row = _prefill()["backward"]
    num_experts = PREFILL_LAYER.num_experts
    row_gemms = [kernel for kernel in row["kernels"] if kernel["kernel"] in ("_expert_down_bwd_kernel", "_rows_times_weights_kernel")]
    # 128-column blocks: d(hidden) 14 of d_ff = 1792; d(x) 4 of d = 512.
    assert [kernel["useful_programs"] for kernel in row_gemms] == [num_experts * 14, num_experts * 4], row_gemms


# Qwen3-30B-A3B/8 (d_model 256, d_ff 96, E 128, k 8) at 64 rows per expert, T = 1024: the bench layer whose
# backward is nearest the bound (1.98×). It was 2.60× while its 96-wide d_ff, cut into three 32-column
# blocks, made every program re-read the other operand once per block (dy and x gathered per assignment);
# column sub-tiles (tiles.GemmTiles.col_tiles) read it once. About 80 s of interpreter.
NARROW_LAYER = scaled_for_cpu(QWEN3)
NARROW_TOKENS = 1024


@functools.cache
def _narrow_backward() -> dict:
    return traffic.layer_traffic(NARROW_LAYER, NARROW_TOKENS)[1]


@metered
def test_narrow_layer_backward_bytes_within_2x_minimum():
    """1.98× (2.60× with one 32-column block per program; its floor with every operand read once per GEMM
    is 1.89×: the k = 8 gathers and the per-assignment d(x) round trip)."""
    row = _narrow_backward()
    assert row["bytes"] <= 2 * row["min_bytes"], f"{row['bytes_ratio']}× the minimum"


@metered
def test_narrow_layer_backward_macs_within_1_25x_useful():
    """1.133× (sub-tiles without a row or a column skip their MMAs)."""
    row = _narrow_backward()
    assert row["macs"] <= 1.25 * row["useful_macs"], f"{row['macs_ratio']}× the useful MACs"


# ----------------------------------------------------------------- issue 11: tensor cores at prefill

@pytest.mark.parametrize("name", [c.name for c in MODEL_CONFIGS])
def test_prefill_gemms_use_wgmma_on_sm90a(quick_audit, name):
    """Row tiles shorter than 64 rows run swapped (tiles.GemmTiles.swap_ab: the MMA's M is the column block),
    so every layer's GEMMs are wgmma at T = 4096; before issue 11 only Mixtral's (BLOCK_M = 64) were."""
    rows = [r for r in quick_audit if (r["config"], r["tokens"], r["arch"]) == (name, 4096, "sm_90a") and r.get("mma", "-") != "-"]
    assert rows and [(r["kernel"], r["mma"]) for r in rows if r["mma"] != "wgmma"] == []


@pytest.mark.parametrize("name", [c.name for c in MODEL_CONFIGS])
def test_gemms_use_mma_sync_on_sm80(quick_audit, name):
    rows = [r for r in quick_audit if (r["config"], r["arch"]) == (name, "sm_80") and r.get("mma", "-") != "-"]
    assert rows and [(r["tokens"], r["kernel"], r["mma"]) for r in rows if r["mma"] != "mma.sync"] == []
