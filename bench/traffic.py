"""The traffic meter: the work the layer's kernels do, counted on the CPU under the Triton interpreter.

    TRITON_INTERPRET=1 python3 -m bench.traffic [--configs Qwen ...] [--tokens 1 16 64 512 | --rows-per-expert 64]
                                                [--dtype float16]
                                                [--real | --scale 8] [--forward-only] [--out bench/results]
                                                [--name STEM]

This is counted work, not GPU time. The real kernels run under TRITON_INTERPRET=1 (set by the command
itself when unset) with hooks on the interpreter's loads, stores and dots:
- bytes loaded / stored: per program, the elements of each tl.load / tl.store (and atomics, both ways)
  whose mask is true, times the element size: what the program requests from global memory. Masked-off
  lanes are not counted; a byte requested twice (by two programs, or twice by one) counts twice, whatever
  a cache would have served.
- MACs: per tl.dot of [M, K]·[K, N], M·N·K, whatever the masks (a dot on padding rows is executed work).
- programs: the grid; useful programs: those that stored at least one element.
- launches: every Triton kernel launch, plus every PyTorch op that launches a kernel on the GPU, counted
  by a TorchDispatchMode that sees through the package's custom ops (bench.dispatch): each ATen op except
  views and metadata-only ops (func.is_view, detach, set_, resize_, ...) and allocations (empty*) counts
  as one launch; ``aten._local_scalar_dense`` (.item(), a device-to-host copy) is counted as a host sync.
  Ops inside a Triton launch (the interpreter's own copies) are not counted.
Two interpreter settings that change no count make it about twice as fast: inside a launch,
triton.language is patched once per module (the interpreter patches it again at every call of a
@triton.jit helper, with the same patches), and the interpreter's integer-overflow checks are off (as they
are on a GPU unless the kernel is compiled with debug=True; they load and store nothing).
Per layer (``layer_traffic``), against what the layer must do at least:
- forward minimum: read x, the router logits (and noise logits for noisy top-k), each chosen expert's
  weights once (experts with at least one kept assignment); write y.
- backward minimum: read x, dy, the router logits, the chosen experts' weights and what the forward
  saved (hidden for the kept assignments, the routing's weights float32 and expert ids int32); write dx,
  d(logits) and the chosen experts' weight gradients once.
- useful MACs: forward kept·(d·N_up + d_ff·d) for the kept assignments (N_up = 2·d_ff gated); backward
  twice that (the input and the weight gradient of both GEMMs).
The router's own linear (logits = x·W_g) is PyTorch and outside these bytes; its launches are counted.

Results: <out>/<name>.json (meta + one row per (config, T, pass) with its kernels) and <name>.md. Default
configs: bench.configs.MODEL_CONFIGS scaled by bench.configs.scaled_for_cpu (d_model, d_ff / 8) at T
1, 16, 64, 512, float16 (bfloat16 moves the same bytes; the interpreter's bf16 tl.dot multiplies bit
patterns, triton#11584, which changes values, not counts, unless an address or a mask depends on a dot);
``--real``: the published sizes (slow, memory permitting).

Python API (other tests and scripts):
    counts = measure(fn)                 # runs fn() under the meter: counts.launches (KernelCount each),
                                         # counts.torch_ops, counts.host_syncs; fn may label passes with
                                         # counts.section("name") while running (see measure's doc)
    row = layer_traffic(config, num_tokens, dtype)   # one layer's forward and backward vs the minimum
Needs TRITON_INTERPRET=1 before Triton is imported (the test suite sets it on a machine without a GPU).
"""
from __future__ import annotations

import contextlib
import os
import sys

if __name__ == "__main__":  # the command line chooses the interpreter itself; an importer must have
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen before importing Triton

import argparse
import datetime
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import triton
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

from moe_kernels.pipeline import expert_capacity

from . import configs as bench_configs
from .capture import patched
from .dispatch import OpenCustomOps
from .inputs import route
from .report import environment
from .workload import PASSES, build_layer, run_layer

TOKENS = (1, 16, 64, 512)
RESULTS = Path(__file__).parent / "results"
# ATen ops that launch no kernel: metadata changes and allocations (views are recognised by func.is_view).
NO_KERNEL = {
    "detach", "alias", "set_", "resize_", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "_local_scalar_dense", "promote_types", "result_type",  # the last two: dtype arithmetic
}


@dataclass
class KernelCount:
    """One Triton launch: what its programs requested and executed."""

    kernel: str
    section: str
    grid: tuple[int, int, int]
    bytes_loaded: int = 0
    bytes_stored: int = 0
    macs: int = 0
    useful: set = field(default_factory=set, repr=False)  # program ids that stored something
    stored_ranges: list = field(default_factory=list, repr=False)  # (first, end) byte address of each store

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def useful_programs(self) -> int:
        return len(self.useful)

    @property
    def bytes(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    def as_dict(self) -> dict:
        return {
            "kernel": self.kernel, "pass": self.section, "grid": list(self.grid), "programs": self.programs,
            "useful_programs": self.useful_programs, "bytes_loaded": self.bytes_loaded,
            "bytes_stored": self.bytes_stored, "macs": self.macs,
        }

    def store(self, program: tuple, pointers, mask: np.ndarray) -> int:
        """Counts a store of the elements of ``pointers`` where ``mask``; returns its bytes."""
        addresses = np.broadcast_to(pointers.data, mask.shape)[mask]
        if not addresses.size:
            return 0
        size = _element_bytes(pointers)
        self.bytes_stored += int(addresses.size) * size
        self.useful.add(program)
        self.stored_ranges.append((int(addresses.min()), int(addresses.max()) + size))
        return int(addresses.size) * size

    def wrote(self, tensor: torch.Tensor) -> bool:
        """Whether some store of this launch landed in ``tensor``'s storage."""
        first = tensor.untyped_storage().data_ptr()
        end = first + tensor.untyped_storage().nbytes()
        return any(lo < end and hi > first for lo, hi in self.stored_ranges)


def _element_bytes(pointers) -> int:
    return max(1, pointers.get_element_ty().primitive_bitwidth // 8)


class TrafficMeter(OpenCustomOps):
    """Context manager counting Triton launches (KernelCount) and kernel-launching PyTorch ops."""

    def __init__(self):
        super().__init__()
        self.launches: list[KernelCount] = []
        self.torch_ops: list[tuple[str, str]] = []  # (section, op name)
        self.host_syncs: list[str] = []  # sections
        self._section = ""
        self._current: KernelCount | None = None
        self._patches = contextlib.ExitStack()

    @contextlib.contextmanager
    def section(self, name: str):
        """Labels what is counted inside it (``KernelCount.section`` and the PyTorch ops)."""
        outer, self._section = self._section, name
        try:
            yield
        finally:
            self._section = outer

    def on_op(self, func, args, kwargs):
        if self._current is None:
            name = func._schema.name.split("::")[-1]
            if name == "_local_scalar_dense":
                self.host_syncs.append(self._section)
            elif not func.is_view and name not in NO_KERNEL:
                self.torch_ops.append((self._section, str(func)))
        return func(*args, **kwargs)

    def __enter__(self):
        if not triton.knobs.runtime.interpret:
            raise RuntimeError("the traffic meter counts under the Triton interpreter: set TRITON_INTERPRET=1 before importing Triton")
        meter = self
        run, load, store = InterpretedFunction.run, InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        dot, rmw, cas = InterpreterBuilder.create_dot, InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas
        patch_lang, patched_modules = interpreter._patch_lang, set()  # ids of the jit functions' globals

        def patch_lang_once(fn):  # the interpreter patches triton.language again at every @triton.jit call
            if id(fn.__globals__) in patched_modules:  # already patched in this launch: the same patches
                return interpreter._LangPatchScope()
            patched_modules.add(id(fn.__globals__))
            return patch_lang(fn)

        def counted_run(function, *args, grid, warmup, **kwargs):
            if warmup:
                return run(function, *args, grid=grid, warmup=warmup, **kwargs)
            # Set before the interpreter copies the arguments, so that its own PyTorch ops are not counted.
            meter._current = KernelCount(function.fn.__name__, meter._section, (0, 0, 0))
            patched_modules.clear()  # the launch restores triton.language when it ends

            def grid_spy(bound):
                shape = tuple(grid(bound) if callable(grid) else grid)
                meter._current.grid = tuple(int(g) for g in shape) + (1,) * (3 - len(shape))
                return shape

            try:
                return run(function, *args, grid=grid_spy, warmup=warmup, **kwargs)
            finally:
                if meter._current is not None:
                    meter.launches.append(meter._current)
                meter._current = None

        def counted_load(builder, pointers, mask, *args):
            meter._current.bytes_loaded += int(np.count_nonzero(mask.data)) * _element_bytes(pointers)
            return load(builder, pointers, mask, *args)

        def counted_store(builder, pointers, value, mask, *args):
            meter._current.store(builder.grid_idx, pointers, mask.data)
            return store(builder, pointers, value, mask, *args)

        def counted_dot(builder, a, b, *args):
            meter._current.macs += int(a.data.size) * int(b.data.shape[-1])
            return dot(builder, a, b, *args)

        def counted_rmw(builder, op, pointers, value, mask, *args):  # reads and writes each element
            meter._current.bytes_loaded += meter._current.store(builder.grid_idx, pointers, mask.data)
            return rmw(builder, op, pointers, value, mask, *args)

        def counted_cas(builder, pointers, *args):
            everywhere = np.ones(pointers.data.shape, dtype=bool)
            meter._current.bytes_loaded += meter._current.store(builder.grid_idx, pointers, everywhere)
            return cas(builder, pointers, *args)

        for owner, name, value in (
            (interpreter, "_patch_lang", patch_lang_once),
            (interpreter.interpreter_builder, "options", replace(interpreter.interpreter_builder.options, sanitize_overflow=False)),
            (InterpretedFunction, "run", counted_run), (InterpreterBuilder, "create_masked_load", counted_load),
            (InterpreterBuilder, "create_masked_store", counted_store), (InterpreterBuilder, "create_dot", counted_dot),
            (InterpreterBuilder, "create_atomic_rmw", counted_rmw), (InterpreterBuilder, "create_atomic_cas", counted_cas),
        ):
            self._patches.enter_context(patched(owner, name, value))
        return super().__enter__()

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._patches.close()


def measure(fn: Callable[..., object], *args, **kwargs) -> TrafficMeter:
    """Runs ``fn(*args, **kwargs)`` under a TrafficMeter and returns the meter with its counts (all in
    section ""). To label passes, use the meter itself: ``with TrafficMeter() as meter:`` and
    ``with meter.section("forward"): ...`` inside."""
    with TrafficMeter() as meter:
        fn(*args, **kwargs)
    return meter


# ------------------------------------------------------------------------------------------ a layer


@dataclass(frozen=True)
class Minimum:
    """What one layer call must do at least (module docstring), for one pass or part of one."""

    bytes: int
    macs: int


def minimum(layer, x: torch.Tensor) -> dict[str, Minimum]:
    """Minimum bytes and useful MACs of ``layer`` on x [T, d]: "forward", "backward" (module docstring) and
    "weight_gradients", the part of the backward that produces the experts' weight gradients: write the
    chosen experts' gradients once, read once the operands of their two GEMMs (x and the pre-activation
    gradient [kept, N_up]; hidden [kept, d_ff] and dy) and the routing weights (float32 per assignment).
    From the layer's own routing of x (backend "torch"'s router functions) and its capacity."""
    num_tokens, d = x.shape
    k, num_experts, d_ff = layer.k, layer.num_experts, layer.d_ff
    up_width = layer.experts.up_weight.shape[1]
    with torch.no_grad():
        experts = route(layer, x).experts
    counts = torch.bincount(experts.flatten().long(), minlength=num_experts)
    capacity = expert_capacity(layer.capacity_factor, num_tokens, k, num_experts)
    kept_per_expert = counts if capacity is None else counts.clamp(max=capacity)
    kept, chosen = int(kept_per_expert.sum()), int((kept_per_expert > 0).sum())
    element = x.element_size()
    weights = chosen * sum(p[0].numel() * p.element_size() for p in (layer.experts.up_weight, layer.experts.down_proj))
    tokens = num_tokens * d * element
    logits = num_tokens * num_experts * 4 * (2 if layer.router == "noisy_topk" else 1)
    routing = num_tokens * k * (4 + 4)  # weights float32, expert ids int32
    hidden = kept * d_ff * element
    useful = kept * (d * up_width + d_ff * d)
    return {
        "forward": Minimum(tokens + logits + weights + tokens, useful),
        "backward": Minimum(2 * tokens + logits + weights + hidden + routing + tokens + logits + weights, 2 * useful),
        "weight_gradients": Minimum(weights + 2 * tokens + kept * up_width * element + hidden + num_tokens * k * 4, useful),
    }


def _pass_row(meter: TrafficMeter, section: str, least: dict[str, Minimum], weight_grads: list[torch.Tensor]) -> dict:
    kernels = [launch for launch in meter.launches if launch.section == section]
    total = sum(launch.bytes for launch in kernels)
    macs = sum(launch.macs for launch in kernels)
    torch_ops = [name for where, name in meter.torch_ops if where == section]
    row = {
        "pass": section,
        "triton_launches": len(kernels), "torch_launches": len(torch_ops),
        "launches": len(kernels) + len(torch_ops), "host_syncs": meter.host_syncs.count(section),
        "bytes": total, "min_bytes": least[section].bytes, "bytes_ratio": round(total / least[section].bytes, 3),
        "macs": macs, "useful_macs": least[section].macs,
        "macs_ratio": round(macs / least[section].macs, 3) if least[section].macs else None,
        "kernels": [dict(launch.as_dict(), writes_weight_grad=any(map(launch.wrote, weight_grads))) for launch in kernels],
        "torch_ops": torch_ops,
    }
    if section == "backward":
        writers = [launch for launch in kernels if any(map(launch.wrote, weight_grads))]
        row["weight_grad_bytes"] = sum(launch.bytes for launch in writers)
        row["weight_grad_min_bytes"] = least["weight_gradients"].bytes
        row["weight_grad_bytes_ratio"] = round(row["weight_grad_bytes"] / row["weight_grad_min_bytes"], 3)
    return row


def layer_traffic(config, num_tokens: int, dtype: torch.dtype = torch.float16, backward: bool = True, seed: int = 0,
                  recompute_pre_activation: bool = False) -> list[dict]:
    """Counts one forward (and backward) of ``config``'s layer on T random tokens under the interpreter:
    one row per pass with its totals, the minimum and each kernel's counts (``_pass_row``); the
    backward's row adds the bytes of the launches that wrote the experts' weight gradients.
    ``recompute_pre_activation``: the layer's argument (the backward recomputes GEMM 1 instead of reading
    the pre-activation the forward kept)."""
    layer, x = build_layer(config, num_tokens, dtype, "cpu", seed)
    layer.recompute_pre_activation = recompute_pre_activation
    least = minimum(layer, x)
    with TrafficMeter() as meter:
        run_layer(layer, x, section=meter.section, backward=backward)
    weight_grads = [p.grad for p in (layer.experts.up_weight, layer.experts.down_proj) if p.grad is not None]
    label = {"config": config.name, "tokens": num_tokens, "dtype": str(dtype).removeprefix("torch.")}
    return [{**label, **_pass_row(meter, section, least, weight_grads)} for section in PASSES[: 2 if backward else 1]]


# ------------------------------------------------------------------------------------------- report


def _mb(value: int) -> str:
    return f"{value / 1e6:.3g}"


def markdown(rows: list[dict], meta: dict) -> str:
    """The counts as markdown: one line per (layer, T, pass), then each kernel launch."""
    lines = [
        f"# Traffic counted on the CPU ({meta['date_utc'][:10]}): work the kernels request, not GPU time",
        "",
        f"`TRITON_INTERPRET=1 python3 -m bench.traffic {' '.join(meta['argv'])}` at moe_kernels "
        f"{meta['moe_kernels_commit']}, Triton {meta['triton']}, {meta['dtype']}. The real Triton kernels run "
        "under the interpreter with counting hooks: bytes each program requests from global memory (masked-off "
        "lanes excluded, re-reads included) and MACs its tl.dot calls execute, against the minimum a layer "
        "must move and compute (bench/traffic.py states both). Launches = Triton kernels + PyTorch ops that "
        "launch a GPU kernel. MB = 10⁶ bytes.",
        "",
        "| layer | T | pass | launches (Triton + PyTorch) | MB requested | MB minimum | × minimum | MMACs executed | MMACs useful | × useful | weight gradients × minimum |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['tokens']} | {row['pass']} | {row['launches']} ({row['triton_launches']} + "
            f"{row['torch_launches']}) | {_mb(row['bytes'])} | {_mb(row['min_bytes'])} | {row['bytes_ratio']:.2f} | "
            f"{row['macs'] / 1e6:.3g} | {row['useful_macs'] / 1e6:.3g} | {row['macs_ratio'] if row['macs_ratio'] is not None else '-'} | "
            f"{row.get('weight_grad_bytes_ratio', '-')} |"
        )
    lines += [
        "",
        "## Per kernel launch",
        "",
        "| layer | T | pass | kernel | grid | programs | useful programs | MB loaded | MB stored | MMACs |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for kernel in row["kernels"]:
            lines.append(
                f"| {row['config']} | {row['tokens']} | {row['pass']} | {kernel['kernel']} | {'×'.join(map(str, kernel['grid']))} | "
                f"{kernel['programs']} | {kernel['useful_programs']} | {_mb(kernel['bytes_loaded'])} | "
                f"{_mb(kernel['bytes_stored'])} | {kernel['macs'] / 1e6:.3g} |"
            )
    return "\n".join(lines) + "\n"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", help="config names (substrings) from bench.configs.MODEL_CONFIGS")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    sizes.add_argument("--rows-per-expert", nargs="+", type=int,
                       help="instead of --tokens, per layer: T = rows · num_experts / k (T·k/E rows per expert)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--real", action="store_true", help="the published sizes instead of d_model, d_ff / 8 (slow)")
    parser.add_argument("--scale", type=int, default=bench_configs.CPU_SCALE,
                        help="d_model and d_ff divided by this without --real (the gates' prefill layer: 32)")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--recompute-pre-activation", action="store_true",
                        help="the layer's recompute_pre_activation=True (default: the forward keeps the pre-activation)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", help="file stem (default traffic-cpu-<date>, traffic-real-<date> with --real)")
    return parser.parse_args(argv)


def _token_counts(config, args: argparse.Namespace) -> list[int]:
    """``--tokens``, or the T that give ``config`` each of ``--rows-per-expert`` (T·k/E) rows per expert."""
    if not args.rows_per_expert:
        return args.tokens
    return [per_expert * config.num_experts // config.k for per_expert in args.rows_per_expert]


def main(argv=None) -> list[dict]:
    args = parse_arguments(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    configs = bench_configs.select(bench_configs.MODEL_CONFIGS, args.configs)
    if not args.real:
        configs = tuple(bench_configs.scaled_for_cpu(config, args.scale) for config in configs)
    meta = {**environment(torch.device("cpu"), dtype), "configs": [asdict(c) for c in configs], "tokens": args.tokens,
            "rows_per_expert": args.rows_per_expert}
    stem = args.out / (args.name or f"traffic-{'real' if args.real else 'cpu'}-{datetime.date.today().isoformat()}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in configs:
        for num_tokens in _token_counts(config, args):
            print(f"{config.name} T={num_tokens}", file=sys.stderr, flush=True)
            rows += layer_traffic(config, num_tokens, dtype, backward=not args.forward_only,
                                  recompute_pre_activation=args.recompute_pre_activation)
            body = ",\n".join(json.dumps(row) for row in rows)  # after each point: a killed run keeps what it did
            stem.with_suffix(".json").write_text(f'{{"meta": {json.dumps(meta, indent=1)},\n"rows": [\n{body}\n]}}\n')
            stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
