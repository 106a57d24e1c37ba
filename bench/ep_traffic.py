"""Expert parallelism's exchange, counted: the bytes each rank sends and receives per layer call.

    python3 -m bench.ep_traffic [--configs Qwen ...] [--tokens 1 64 1024 4096] [--world 8]
                                [--dtype bfloat16] [--out bench/results] [--name ep-traffic-w8]

Computed from the routing, not measured: no process group is started. For each bench config at its
published size (bench.configs.MODEL_CONFIGS) and each routing (uniform, Zipf: bench.inputs), W ranks of T
tokens each are routed by the bench layer's own router (bench.inputs.build_reference, eval mode), and the
exchange plan of moe_kernels.parallel (assignment_counts → kept_counts with the group's capacity →
rows_between_ranks) gives the rows every rank sends to every other: the very split sizes the layer hands
to all_to_all. Per rank and layer call:
- dispatch: one row of d_model elements per kept assignment whose expert lives on another rank (rows for
  the rank's own experts stay local: all_to_all_single copies them in place);
- return: the same rows back, so a rank sends (rows out + rows in)·d_model·element size in the forward and
  receives the same amount;
- count exchange: the all_gather of 1 + S'·E int32 (S' = k with capacity, else 1): (W−1) of those sent
  and received by every rank;
- backward: the two reverse exchanges, the same bytes again (gradients of the dispatched and returned rows).
Rows: one per assignment, so a token whose k experts share a rank is sent once per expert (no
de-duplication yet).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from moe_kernels.parallel import assignment_counts, kept_counts, rows_between_ranks
from moe_kernels.pipeline import expert_capacity

from .configs import MODEL_CONFIGS, ROUTINGS, BenchConfig, select
from .inputs import build_reference, make_tokens, route
from .report import environment

TOKENS = (1, 64, 1024, 4096)
MB = 1e6


def rank_traffic(config: BenchConfig, routing_mode: str, tokens_per_rank: int, world: int, element_size: int) -> dict:
    """One row of the table: rows and bytes each rank exchanges in one forward (see the module docstring)."""
    # The routing needs only the gate: a d_ff of 1 keeps the expert weights small (the gate is drawn first,
    # so it is the bench layer's gate).
    layer = build_reference(replace(config, d_ff=1), routing_mode, torch.device("cpu"), torch.float32)
    by_slot = config.capacity_factor is not None
    counts = []
    for rank in range(world):
        tokens = make_tokens(config, routing_mode, tokens_per_rank, "cpu", torch.float32, seed=1 + rank)[0]
        with torch.no_grad():
            counts.append(assignment_counts(route(layer, tokens).experts, config.num_experts, by_slot))
    counts = torch.stack(counts)
    capacity = expert_capacity(config.capacity_factor, tokens_per_rank * world, config.k, config.num_experts)
    rows = rows_between_ranks(kept_counts(counts, capacity))
    remote = rows * (1 - torch.eye(world, dtype=rows.dtype))
    rows_out, rows_in = remote.sum(1), remote.sum(0)
    count_bytes = (world - 1) * (1 + counts.shape[1] * config.num_experts) * 4
    forward_bytes = (rows_out + rows_in) * config.d_model * element_size + count_bytes
    return {
        "config": config.name, "routing": routing_mode, "tokens_per_rank": tokens_per_rank, "world": world,
        "d_model": config.d_model, "num_experts": config.num_experts, "k": config.k, "capacity": capacity,
        "kept_rows": int(rows.sum()), "assignments": tokens_per_rank * world * config.k,
        "rows_out": rows_out.tolist(), "rows_in": rows_in.tolist(),
        "count_exchange_bytes": count_bytes,
        "forward_bytes_each_way": forward_bytes.tolist(),
        "forward_backward_bytes_each_way": (2 * forward_bytes - count_bytes).tolist(),
    }


def table(rows: list[dict]) -> str:
    def mean_max(values, scale: float = 1.0) -> str:
        return f"{_number(sum(values) / len(values) / scale)} / {_number(max(values) / scale)}"

    lines = [
        f"{'layer':<17} {'routing':<7} {'T/rank':>6} | {'rows out per rank':>17} | {'rows in per rank':>17} | "
        f"{'fwd MB each way':>17} | {'fwd+bwd MB':>17} | {'counts KB':>9} | kept",
        f"{'':<33}| {'mean / max':>17} | {'mean / max':>17} | {'mean / max':>17} | {'mean / max':>17} |",
    ]
    for r in rows:
        lines.append(
            f"{r['config']:<17} {r['routing']:<7} {r['tokens_per_rank']:>6} | {mean_max(r['rows_out']):>17} | "
            f"{mean_max(r['rows_in']):>17} | {mean_max(r['forward_bytes_each_way'], MB):>17} | "
            f"{mean_max(r['forward_backward_bytes_each_way'], MB):>17} | "
            f"{_number(r['count_exchange_bytes'] / 1e3):>9} | "
            f"{r['kept_rows'] / r['assignments']:.0%}"
        )
    return "\n".join(lines)


def _number(value: float) -> str:
    """Three significant digits, never in e-notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.ep_traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", help="substrings of config names (default: all)")
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS), help="tokens per rank")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--out", type=Path, default=None, help="write <name>.json and <name>.txt here")
    parser.add_argument("--name", default=None, help="file stem (default: ep-traffic-w<world>)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    element_size = torch.empty(0, dtype=dtype).element_size()
    rows = [
        rank_traffic(config, routing_mode, tokens, args.world, element_size)
        for config in select(MODEL_CONFIGS, args.configs)
        for routing_mode in ROUTINGS
        for tokens in args.tokens
    ]
    text = (f"Expert parallelism, W = {args.world}: bytes each rank sends (= receives) per layer call, rows of "
            f"d_model {args.dtype} elements; computed from the routing (bench.ep_traffic)\n\n" + table(rows))
    print(text)
    if args.out:
        name = args.name or f"ep-traffic-w{args.world}"
        args.out.mkdir(parents=True, exist_ok=True)
        meta = environment(torch.device("cpu"), dtype)
        (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / f"{name}.txt").write_text(json.dumps(meta) + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
