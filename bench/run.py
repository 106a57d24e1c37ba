"""The MoE layer benchmark: every contender side by side, forward and forward+backward.

    python3 -m bench.run [--device cpu|cuda] [--quick | --full] [--configs Mixtral Qwen] [--tokens 1 64]
                         [--routings uniform zipf] [--dtype bfloat16] [--threads 1] [--time-budget 400]
                         [--out bench/results] [--name STEM]

Writes ``<out>/<device>-<date>.json`` (every measurement, versions), ``.txt`` (the table) and, when
matplotlib is installed, ``.png`` (speedup over the loop vs tokens, from the JSON; bench/plot.py).

Per (layer, routing, T) all contenders run on the same layer Parameters and the same rotated inputs; on
the CPU they are timed side by side, taking turns call by call (bench/timing.py), so that a busy
neighbour slows all of them alike.
Forward timings run under no_grad; forward+backward times one forward and ``torch.autograd.grad`` for
the input and every Parameter. Layers are in eval mode (noisy top-k draws no noise; capacity applies).
Max error: a contender's forward (run dtype) against the loop in float64 on the CPU where the layer's
weights fit in ``FLOAT64_REFERENCE_LIMIT_BYTES``, else against the loop in the run dtype on the device;
``err_reference`` in each row says which. Errors are computed for T <= ``ERROR_MAX_TOKENS`` only.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import time
from pathlib import Path

import torch

from moe_kernels.ops import saved_bytes_per_token

from . import configs as bench_configs
from .contenders import CONTENDERS, Prepared, Unavailable
from .inputs import build_reference, make_tokens, rotate, routing_statistics
from .metrics import dense_equivalent, expert_flops, min_bytes_moved, tflops
from .report import environment, progress, summary, table, write_json
from .timing import peak_memory_bytes, time_call, time_cpu_side_by_side

FLOAT64_REFERENCE_LIMIT_BYTES = 2 << 30
ERROR_MAX_TOKENS = 1024
PASSES = ("fwd", "fwd+bwd")


def _forward_call(prepared: Prepared, buffers):
    inputs = rotate(buffers)

    def call():
        with torch.no_grad():
            return prepared.forward(next(inputs))

    return call


def _forward_backward_call(prepared: Prepared, buffers):
    leaves = [buffer.detach().requires_grad_() for buffer in buffers]
    grad_output = torch.randn_like(buffers[0])
    inputs = rotate(leaves)

    def call():
        tokens = next(inputs)
        output = prepared.forward(tokens)
        return torch.autograd.grad(output, [tokens, *prepared.parameters], grad_output, allow_unused=True)

    return call


def _float64_reference(layer):
    weight_bytes = sum(p.numel() for p in layer.parameters()) * 8
    if weight_bytes > FLOAT64_REFERENCE_LIMIT_BYTES:
        return None
    return copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)


def _max_error(prepared: Prepared, tokens, expected) -> float:
    with torch.no_grad():
        output = prepared.forward(tokens)
    return float((output.double().cpu() - expected).abs().max()) if output.numel() else 0.0


def measure_point(config, routing_mode, num_tokens, layer, reference64, device, dtype, deadline) -> list[dict]:
    """Every contender on one (layer, routing, T): a row per contender and pass (see ``report.table``)."""
    buffers = make_tokens(config, routing_mode, num_tokens, device, dtype)
    point = {"config": config.name, "routing": routing_mode, "tokens": num_tokens, **routing_statistics(layer, buffers[0])}
    in_budget = time.monotonic() <= deadline  # past it, every contender says "skipped" and nothing runs
    expected, err_reference, dense_tflops = None, None, None
    if in_budget and num_tokens <= ERROR_MAX_TOKENS:
        with torch.no_grad():
            if reference64 is not None:
                expected, err_reference = reference64(buffers[0].cpu().double()), "float64 loop on cpu"
            else:
                expected, err_reference = layer(buffers[0]).double().cpu(), f"{str(dtype).removeprefix('torch.')} loop on {device.type}"
    if in_budget:
        dense_ms = time_call(dense_equivalent(config, num_tokens, device, dtype), device).median_ms
        dense_tflops = tflops(expert_flops(config, num_tokens, backward=False), dense_ms)
    element_size = torch.finfo(dtype).bits // 8

    rows, prepared = [], {}
    for contender in CONTENDERS:
        status, reason = "ok", ""
        try:
            prepared[contender.name] = contender.prepare(layer, config, num_tokens)  # cheap: says "missing" even past the budget
            if time.monotonic() > deadline:
                raise Unavailable("skipped", "time budget spent")
            error = _max_error(prepared[contender.name], buffers[0], expected) if expected is not None else None
        except Unavailable as unavailable:
            status, reason = unavailable.status, unavailable.reason
        except Exception as failure:  # a contender that crashes is reported, not fatal
            status, reason = "failed", _describe(failure)
        for pass_name in PASSES:
            row = {**point, "contender": contender.name, "pass": pass_name, "status": status, "reason": reason,
                   "median_ms": None, "p20_ms": None, "p80_ms": None, "repeats": None, "speedup": None,
                   "tflops": None, "dense_share": None, "gbps": None, "peak_bytes": None, "minor_faults": None,
                   "max_abs_err": None, "err_reference": None}
            if status == "ok" and pass_name == "fwd+bwd" and prepared[contender.name].no_backward:
                row["status"], row["reason"] = "n/a", prepared[contender.name].no_backward
            if row["status"] == "ok" and pass_name == "fwd":
                row["max_abs_err"], row["err_reference"] = error, err_reference
            rows.append(row)
    for pass_name in PASSES:
        racing = {row["contender"]: row for row in rows if row["pass"] == pass_name and row["status"] == "ok"}
        _time_into(racing, prepared, buffers, config, device, dense_tflops, element_size)
    _add_speedups(rows)
    return rows


def _describe(failure: Exception) -> str:
    return f"{type(failure).__name__}: {str(failure).splitlines()[0][:200] if str(failure) else ''}"


def _time_into(racing: dict[str, dict], prepared, buffers, config, device, dense_tflops, element_size) -> None:
    """Times the contenders of ``racing`` (their rows of one pass) side by side and fills in their rows."""
    if not racing:
        return
    backward = next(iter(racing.values()))["pass"] == "fwd+bwd"
    calls = {name: (_forward_backward_call if backward else _forward_call)(prepared[name], buffers) for name in racing}
    if device.type == "cpu":
        timings = time_cpu_side_by_side(calls)
    else:
        timings = {}
        for name, call in calls.items():
            try:
                timings[name] = time_call(call, device)
            except Exception as failure:
                timings[name] = failure
    for name, row in racing.items():
        timing = timings[name]
        if isinstance(timing, Exception):
            row["status"], row["reason"] = "failed", _describe(timing)
            continue
        row["peak_bytes"] = peak_memory_bytes(calls[name], device)
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, repeats=timing.repeats,
                   minor_faults=timing.minor_faults)
        row["tflops"] = tflops(expert_flops(config, row["tokens"], backward), timing.median_ms)
        row["dense_share"] = row["tflops"] / dense_tflops
        if not backward:
            moved = min_bytes_moved(config, row["tokens"], row["experts_hit"], element_size)
            row["gbps"] = moved / (timing.median_ms * 1e-3) / 1e9


def _add_speedups(rows: list[dict]) -> None:
    loop = {row["pass"]: row["median_ms"] for row in rows if row["contender"] == "loop" and row["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok" and loop.get(row["pass"]):
            row["speedup"] = loop[row["pass"]] / row["median_ms"]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"tokens {bench_configs.QUICK_TOKENS} only")
    size.add_argument("--full", action="store_true", help=f"CPU: tokens {bench_configs.CPU_TOKENS_FULL}")
    parser.add_argument("--configs", nargs="+", help="only configs whose name contains one of these")
    parser.add_argument("--tokens", nargs="+", type=int, help="token counts (overrides --quick/--full)")
    parser.add_argument("--routings", nargs="+", choices=bench_configs.ROUTINGS, default=list(bench_configs.ROUTINGS))
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later points are 'skipped'")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default 1 on cpu: on a shared machine a busy neighbour stalls every "
                             "parallel region of a multi-threaded run, 10-30x here)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default=None, help="file stem (default: <device>-<date>)")
    return parser.parse_args(argv)


def _token_counts(args) -> tuple[int, ...]:
    if args.tokens:
        return tuple(args.tokens)
    if args.quick:
        return bench_configs.QUICK_TOKENS
    if args.device == "cuda":
        return bench_configs.GPU_TOKENS
    return bench_configs.CPU_TOKENS_FULL if args.full else bench_configs.CPU_TOKENS


def _default_name(device, threads: int) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if device.type == "cuda":
        words = torch.cuda.get_device_name(device).split()  # "NVIDIA H100 80GB HBM3" → "h100"
        return f"{next((w for w in words if any(c.isdigit() for c in w)), words[-1]).lower()}-{date}"
    return f"cpu-{os.cpu_count()}core-{threads}thread-{date}"


def main(argv=None) -> Path:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layer_configs = bench_configs.select(bench_configs.GPU_CONFIGS if device.type == "cuda" else bench_configs.CPU_CONFIGS, args.configs)
    token_counts = _token_counts(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or _default_name(device, torch.get_num_threads()))
    meta = {**environment(device, dtype), "tokens": token_counts, "threads": torch.get_num_threads(), "contenders": [c.name for c in CONTENDERS],
            "configs": [{**c.layer_arguments(), "name": c.name, "source": c.source,
                         "triton_saved_bytes_per_token": saved_bytes_per_token(c.k, c.d_ff, dtype.itemsize, c.up_width)} for c in layer_configs],
            "method": __doc__.split("\n\n", 3)[3].strip()}
    deadline = time.monotonic() + (args.time_budget or float("inf"))

    rows: list[dict] = []
    bar = progress(len(layer_configs) * len(args.routings) * len(token_counts))
    for config in layer_configs:
        for routing_mode in args.routings:
            layer = build_reference(config, routing_mode, device, dtype)
            reference64 = _float64_reference(layer)
            for num_tokens in token_counts:
                bar.set_description(f"{config.name} {routing_mode} T={num_tokens}")
                rows += measure_point(config, routing_mode, num_tokens, layer, reference64, device, dtype, deadline)
                bar.update(1)
            del layer, reference64
        write_json(stem.with_suffix(".json"), meta, rows)  # after each config: a killed run keeps what it did
    bar.close()
    stem.with_suffix(".txt").write_text(_preamble(meta) + table(rows) + "\n")
    from .plot import plot

    plotted = plot(stem.with_suffix(".json"))
    print(summary(rows, meta))
    print(f"\nfull table: {stem.with_suffix('.txt')}\njson:       {stem.with_suffix('.json')}\n{plotted}")
    return stem.with_suffix(".json")


def _preamble(meta: dict) -> str:
    keys = ("date_utc", "device", "threads", "dtype", "python", "torch", "cuda", "triton", "transformers", "numpy", "moe_kernels_commit", "argv")
    saved = "".join(f"# saved for backward by backend triton, {c['name']}: {c['triton_saved_bytes_per_token']} B/token\n" for c in meta["configs"])
    return "".join(f"# {key}: {meta[key]}\n" for key in keys) + "".join(f"# {line}\n" for line in meta["method"].splitlines()) + saved + "\n"


if __name__ == "__main__":
    main()
