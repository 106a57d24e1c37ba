"""The compile audit: every Triton kernel the layer launches, compiled for sm_90a and sm_80 without a GPU.

    python3 -m bench.compile_audit [--quick] [--configs Mixtral ...] [--tokens 1 4096] [--dtypes bfloat16]
                                   [--archs sm_90a sm_80] [--out bench/results] [--name STEM] [--jobs N]
                                   [--cache-dir DIR] [--json PATH]

For each (layer config, T, dtype, arch) the layer's forward and backward through backend "triton" run on
meta tensors inside ``bench.capture.LaunchCapture``: nothing is hard-coded about which kernels exist, so
a kernel added to the layer is audited the day it is launched. Each distinct launch (kernel, Triton's
specialisation of its arguments, constexprs, options, target) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 | 80, 32))``, in a forked child so that a
compiler crash is reported, not fatal. The facts of a compile:
- compiled, or the error (first lines);
- registers, spill stores/loads and stack bytes from ptxas -v (Triton's own ptxas and flags);
- shared memory (Triton's metadata) against the arch's per-program limit;
- MMA kind of the kernel's tl.dot, from the PTX: "wgmma" (wgmma.mma_async), "mma.sync", "fma" (a dot
  lowered to FMAs), "-" (no dot in the TTIR);
- async copies: cp.async (Ampere) and TMA (cp.async.bulk.tensor) instruction counts in the PTX.
Per launch: the grid, programs, programs resident per SM (registers, shared memory, warps; CUDA occupancy
rules) and waves = programs / (SMs · resident per SM) on the arch's GPU (H100 SXM, 132 SMs; A100, 108).

Compiles are cached by their key (Triton's source hash of the kernel and its callees, the
specialisation, options, target, Triton version) as JSON facts under ``--cache-dir`` (default
$MOE_KERNELS_AUDIT_CACHE or ~/.cache/moe_kernels/compile-audit); a cached audit takes seconds.

Writes <out>/<name>.json (meta + one row per launch) and <name>.md (compile facts per kernel variant,
then the launches of each layer). Default name: compile-audit-<date>, with -quick for --quick.

Python API (other tests and scripts):
    rows = audit(fn, archs=("sm_90a", "sm_80"))   # fn() makes launches (e.g. runs a launcher on meta
                                                  # tensors); one row per launch and arch, facts included
    rows = audit_layers(configs, tokens, dtypes, archs)  # the bench grid; rows carry config and tokens
    process = AuditProcess(configs, tokens, ...)  # the same in a child process: process.result() later
    with LaunchCapture("sm_90a") as capture: ...  # bench.capture: the launches and grids, nothing compiled
``audit`` and ``LaunchCapture`` need kernels defined without TRITON_INTERPRET=1 (a JITFunction built
directly, ``JITFunction(fn)``, is one even under the interpreter); ``audit_layers`` runs in a child process
without it when this process interprets (as the test suite does on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton
from triton.compiler import ASTSource

from . import configs as bench_configs
from .capture import ARCHS, Arch, Launch, LaunchCapture
from .report import environment
from .workload import build_layer, run_layer

QUICK_TOKENS = (1, 4096)
TOKENS = (1, 64, 4096, 16384)
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_CACHE = Path(os.environ.get("MOE_KERNELS_AUDIT_CACHE", Path.home() / ".cache" / "moe_kernels" / "compile-audit"))
RESULTS = Path(__file__).parent / "results"

# ------------------------------------------------------------------------------------------ compiling


def compile_key(launch: Launch) -> str:
    """What identifies a compile: the kernel's source hash with its callees, specialisation, options,
    target and the Triton version."""
    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    text = json.dumps([source.hash(), launch.arch, sorted(launch.options.items()), triton.__version__], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(launch: Launch) -> dict:
    """The facts of one compile (module docstring); raises what the compiler raises."""
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report: read it, not a second ptxas
    triton.knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its report
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(
            ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs),
            target=ARCHS[launch.arch].target, options=launch.options,
        )
    ptx, ttir = kernel.asm["ptx"], kernel.asm["ttir"]
    registers = _PTXAS_REGISTERS.search(log.getvalue())
    frame = _PTXAS_FRAME.search(log.getvalue())
    if registers is None or frame is None:
        raise RuntimeError(f"no ptxas -v report in the compile output: {log.getvalue()[-500:]!r}")
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "fma" if "tt.dot" in ttir else "-"
    return {
        "compiled": True, "error": "",
        "registers": int(registers.group(1)), "stack_bytes": int(frame.group(1)),
        "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3)),
        "shared_bytes": int(kernel.metadata.shared), "mma": mma,
        "cp_async": len(re.findall(r"cp\.async\.c[ag]\.", ptx)), "tma": ptx.count("cp.async.bulk.tensor"),
    }


def _failure(error: str) -> dict:
    return {"compiled": False, "error": error}


CRASHED = "compiler crashed"


def _compile_in_child(launch: Launch) -> tuple[int, int, str]:
    """Forks a child that compiles ``launch`` and writes its facts as JSON; returns (pid, read fd, stderr path)."""
    read_fd, write_fd = os.pipe()
    stderr = tempfile.NamedTemporaryFile(prefix="audit-", suffix=".log", delete=False)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        os.dup2(stderr.fileno(), 2)
        try:
            facts = _compile(launch)
        except Exception as error:  # a compile error is a fact of the audit
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            facts = _failure(f"{type(error).__name__}: {' | '.join(lines[:3]) or traceback.format_exc(limit=1)}"[:400])
        with os.fdopen(write_fd, "w") as pipe:
            json.dump(facts, pipe)
        os._exit(0)
    os.close(write_fd)
    stderr.close()
    return pid, read_fd, stderr.name


def _collect(pid: int, read_fd: int, stderr_path: str) -> dict:
    with os.fdopen(read_fd) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    tail = Path(stderr_path).read_text(errors="replace").strip().splitlines()[-3:]
    os.unlink(stderr_path)
    if text:
        return json.loads(text)
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    return _failure(f"{CRASHED} ({how}): {' | '.join(tail)}"[:400])


def compile_all(launches: list[Launch], cache_dir: Path = DEFAULT_CACHE, jobs: int | None = None) -> list[dict]:
    """Facts for each launch (same order), compiling each distinct key once, ``jobs`` at a time."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    keys = [compile_key(launch) for launch in launches]
    facts: dict[str, dict] = {}
    todo: dict[str, Launch] = {}
    for key, launch in zip(keys, launches):
        path = cache_dir / f"{key}.json"
        if key in facts or key in todo:
            continue
        if path.exists():
            facts[key] = json.loads(path.read_text())
        else:
            todo[key] = launch
    jobs = jobs or os.cpu_count() or 1
    running: dict[int, tuple[str, tuple[int, int, str]]] = {}  # read fd -> (key, child)
    pending = list(todo.items())
    while pending or running:
        while pending and len(running) < jobs:
            key, launch = pending.pop(0)
            child = _compile_in_child(launch)
            running[child[1]] = (key, child)
        ready, _, _ = select.select(list(running), [], [])
        for fd in ready:
            key, child = running.pop(fd)
            facts[key] = _collect(*child)
            if not facts[key]["error"].startswith(CRASHED):  # a crash may not recur: not cached
                (cache_dir / f"{key}.json").write_text(json.dumps(facts[key]))
    return [dict(facts[key], key=key) for key in keys]

# ---------------------------------------------------------------------------------------- the audit


def resident_per_sm(arch: Arch, num_warps: int, registers: int, shared_bytes: int) -> int:
    """Programs of one kernel resident on one SM: the least of the warp, register and shared-memory limits
    (registers allocated per warp in units of 256, in four SM sub-partitions; 1 KiB reserved per program)."""
    by_warps = arch.warps_per_sm // num_warps
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = 4 * ((arch.registers_per_sm // 4) // registers_per_warp) // num_warps
    by_shared = arch.shared_per_sm // (shared_bytes + 1024)
    return max(0, min(arch.programs_per_sm, by_warps, by_registers, by_shared))


def _row(launch: Launch, facts: dict) -> dict:
    arch = ARCHS[launch.arch]
    row = {
        "kernel": launch.name, "arch": launch.arch, "pass": launch.section, "note": launch.note,
        "variant": launch.variant(), "grid": list(launch.grid), "programs": launch.programs,
        "num_warps": launch.options["num_warps"], "num_stages": launch.options["num_stages"],
        "shared_limit_bytes": arch.shared_per_block, "sms": arch.sms, **facts,
    }
    if facts["compiled"]:
        per_sm = resident_per_sm(arch, row["num_warps"], facts["registers"], facts["shared_bytes"])
        row["resident_per_sm"] = per_sm
        row["waves"] = round(launch.programs / (arch.sms * per_sm), 3) if per_sm else None
        row["spill_bytes"] = facts["spill_store_bytes"] + facts["spill_load_bytes"]
        row["shared_within_limit"] = facts["shared_bytes"] <= arch.shared_per_block
    return row


def audit(fn: Callable[[], object], archs: Iterable[str] = ("sm_90a", "sm_80"), cache_dir: Path = DEFAULT_CACHE,
          jobs: int | None = None) -> list[dict]:
    """Runs ``fn()`` once per arch inside a LaunchCapture and compiles what it launched: one row per launch
    and arch (kernel, variant, grid, programs, facts of the compile, resident programs per SM, waves).

    ``fn`` builds its own tensors (meta ones: nothing runs) and calls launchers, the ops or a layer. Its
    rows' "pass" is empty: to label passes, capture with ``bench.capture.LaunchCapture`` and its
    ``section`` (as ``capture_layer`` does) and compile with ``compile_all``.
    """
    launches = []
    for arch in archs:
        with LaunchCapture(arch) as capture:
            fn()
        launches += capture.launches
    return [_row(launch, facts) for launch, facts in zip(launches, compile_all(launches, cache_dir, jobs))]


def capture_layer(config, num_tokens: int, dtype: torch.dtype, arch: str) -> list[Launch]:
    """The launches of one forward and backward of ``config``'s layer at T tokens, on meta tensors."""
    with LaunchCapture(arch) as capture:
        layer, x = build_layer(config, num_tokens, dtype, "meta")
        run_layer(layer, x, section=capture.section)
    return capture.launches


def _audit_layers_here(configs, tokens, dtypes, archs, cache_dir, jobs, progress=None) -> list[dict]:
    launches, labels = [], []
    for config in configs:
        for num_tokens in tokens:
            for dtype in dtypes:
                for arch in archs:
                    label = {"config": config.name, "tokens": num_tokens, "dtype": dtype}
                    try:
                        captured = capture_layer(config, num_tokens, getattr(torch, dtype), arch)
                    except Exception as error:  # a layer that cannot even be captured is a finding too
                        labels.append(dict(label, arch=arch, kernel="(capture)", compiled=False,
                                           error=f"{type(error).__name__}: {error}"[:400]))
                        continue
                    launches += captured
                    labels += [label] * len(captured)
    if progress:
        progress(f"{len(launches)} launches captured; compiling the distinct ones")
    facts = iter(compile_all(launches, cache_dir, jobs))
    launch_iter = iter(launches)
    rows = []
    for label in labels:
        if label.get("kernel") == "(capture)":
            rows.append(label)
        else:
            rows.append({**label, **_row(next(launch_iter), next(facts))})
    return rows


def audit_layers(configs=bench_configs.MODEL_CONFIGS, tokens=TOKENS, dtypes=DTYPES, archs=tuple(ARCHS),
                 cache_dir: Path = DEFAULT_CACHE, jobs: int | None = None) -> list[dict]:
    """The audit of the bench grid: one row per (config, T, dtype, arch, launch), labelled with them.

    Where this process interprets the kernels (TRITON_INTERPRET=1) it runs in a child process
    (``AuditProcess``), else here.
    """
    if triton.knobs.runtime.interpret:
        return AuditProcess(configs, tokens, dtypes, archs, cache_dir, jobs).result()
    return _audit_layers_here(configs, tokens, dtypes, archs, cache_dir, jobs)


class AuditProcess:
    """``audit_layers`` in a child process without TRITON_INTERPRET (``python -m bench.compile_audit
    --json``), started at construction: ``result()`` waits for its rows, ``stop()`` ends it."""

    def __init__(self, configs=bench_configs.MODEL_CONFIGS, tokens=TOKENS, dtypes=DTYPES, archs=tuple(ARCHS),
                 cache_dir: Path = DEFAULT_CACHE, jobs: int | None = None):
        self._scratch = tempfile.TemporaryDirectory()
        self._path = Path(self._scratch.name) / "audit.json"
        self.command = [
            sys.executable, "-m", "bench.compile_audit", "--json", str(self._path), "--cache-dir", str(cache_dir),
            "--configs-json", json.dumps([asdict(config) for config in configs]), "--tokens", *map(str, tokens),
            "--dtypes", *dtypes, "--archs", *archs, *(["--jobs", str(jobs)] if jobs else []),
        ]
        environment_ = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            self.command, cwd=Path(__file__).parent.parent, env=environment_, stdout=subprocess.DEVNULL,
            stderr=self._stderr, text=True, start_new_session=True,  # its own process group, compiles included
        )

    def result(self) -> list[dict]:
        code = self._process.wait()
        if code != 0:
            self._stderr.seek(0)
            raise RuntimeError(f"{' '.join(self.command)} failed ({code}):\n{self._stderr.read()[-3000:]}")
        return json.loads(self._path.read_text())["rows"]

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait()
        self._scratch.cleanup()


# ------------------------------------------------------------------------------------------- report


def _kib(value: int) -> str:
    return f"{value / 1024:.0f}" if value % 1024 == 0 or value >= 10240 else f"{value / 1024:.2g}"


def _variant_ids(rows: list[dict]) -> dict[str, str]:
    """'kernel#n' for each compile key, numbered per kernel in order of first appearance."""
    ids, counts = {}, {}
    for row in rows:
        if "key" in row and row["key"] not in ids:
            counts[row["kernel"]] = counts.get(row["kernel"], 0) + 1
            ids[row["key"]] = f"{row['kernel']}#{counts[row['kernel']]}"
    return ids


def _facts_cells(row: dict) -> str:
    if not row.get("compiled"):
        return f"**fails**: {row.get('error', '')[:160]} | | | | |"
    spills = f"{row['spill_store_bytes']}/{row['spill_load_bytes']}" if row["spill_bytes"] else "0"
    shared = f"{_kib(row['shared_bytes'])} / {_kib(row['shared_limit_bytes'])}" + ("" if row["shared_within_limit"] else " **over**")
    return f"{row['registers']} | {spills} | {shared} | {row['mma']} | {row['cp_async']} / {row['tma']}"


def markdown(rows: list[dict], meta: dict) -> str:
    """The audit as markdown: summary per arch and dtype, facts per kernel variant, launches per layer."""
    ids = _variant_ids(rows)
    lines = [
        f"# Compile audit ({meta['date_utc'][:10]}): every Triton kernel the layer launches, compiled without a GPU",
        "",
        f"`python3 -m bench.compile_audit {' '.join(meta['argv'])}` at moe_kernels {meta['moe_kernels_commit']}, "
        f"Triton {meta['triton']}, torch {meta['torch']}. Launches captured from the layer's forward and "
        "backward (backend \"triton\", meta tensors), specialised as Triton's runtime would, compiled with "
        "`triton.compile` for each target; registers and spills from ptxas -v; waves on the arch's GPU "
        "(sm_90a: H100 SXM, 132 SMs; sm_80: A100, 108 SMs). Method and API: bench/compile_audit.py.",
        "",
        "## Summary",
        "",
        "| arch | dtype | launches | distinct compiles | failing | with spills | shared over limit | MMA of the GEMMs (kernels with a dot), by T |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for arch in meta["archs"]:
        for dtype in meta["dtypes"]:
            group = [r for r in rows if r["arch"] == arch and r["dtype"] == dtype]
            distinct = {r.get("key"): r for r in group}
            failing = sum(not r.get("compiled") for r in distinct.values())
            spilling = sum(bool(r.get("spill_bytes")) for r in distinct.values())
            over = sum(r.get("compiled") and not r["shared_within_limit"] for r in distinct.values())
            by_tokens = []
            for tokens in meta["tokens"]:
                kinds = sorted({r["mma"] for r in group if r["tokens"] == tokens and r.get("mma") not in (None, "-")})
                by_tokens.append(f"T={tokens}: {'+'.join(kinds) or '-'}")
            lines.append(f"| {arch} | {dtype} | {len(group)} | {len(distinct)} | {failing} | {spilling} | {over} | {'; '.join(by_tokens)} |")
    lines += [
        "",
        "## Kernel variants",
        "",
        "One row per distinct compile. Spills: store/load bytes. Shared: KiB used / the arch's per-program limit. "
        "Async: cp.async / TMA instructions in the PTX. Used by: config@T for the dtypes listed.",
        "",
        "| variant | arch | dtypes | constexprs, warps, stages | regs | spills B | shared KiB | MMA | async | used by |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        by_key.setdefault(row.get("key", f"capture {row['config']}"), []).append(row)
    for key, group in by_key.items():
        first = group[0]
        if "key" not in first:
            lines.append(f"| (capture of {first['config']} T={first['tokens']} {first['dtype']}) | {first['arch']} | | | **fails**: {first['error'][:200]} | | | | | |")
            continue
        dtypes = sorted({r["dtype"] for r in group})
        users: dict[str, list[int]] = {}
        for r in group:
            users.setdefault(r["config"], [])
            if r["tokens"] not in users[r["config"]]:
                users[r["config"]].append(r["tokens"])
        used_by = "; ".join(f"{config}@{','.join(map(str, tokens))}" for config, tokens in users.items())
        lines.append(f"| {ids[key]} | {first['arch']} | {', '.join(dtypes)} | `{first['variant']}` | {_facts_cells(first)} | {used_by} |")
    for arch in meta["archs"]:
        dtype = "bfloat16" if "bfloat16" in meta["dtypes"] else meta["dtypes"][0]
        lines += [
            "",
            f"## Launches on {arch} ({ARCHS[arch].gpu}, {ARCHS[arch].sms} SMs), {dtype}",
            "",
            "| config | T | pass | variant | grid | programs | per SM | waves | MMA | regs | spills B |",
            "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for r in rows:
            if r["arch"] != arch or r["dtype"] != dtype or "key" not in r:
                continue
            facts = (
                f"{r['resident_per_sm']} | {r['waves']} | {r['mma']} | {r['registers']} | {r['spill_bytes']}"
                if r.get("compiled") else "| | **fails** | |"
            )
            grid = "×".join(map(str, r["grid"]))
            lines.append(f"| {r['config']} | {r['tokens']} | {r['pass']} | {ids[r['key']]} | {grid} | {r['programs']} | {facts} |")
    return "\n".join(lines) + "\n"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.compile_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"T {QUICK_TOKENS}, bfloat16 only (the CI subset)")
    parser.add_argument("--configs", nargs="+", help="config names (substrings) from bench.configs.MODEL_CONFIGS")
    parser.add_argument("--configs-json", help=argparse.SUPPRESS)  # exact BenchConfigs, for audit_layers
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES)
    parser.add_argument("--archs", nargs="+", choices=sorted(ARCHS), default=list(ARCHS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", help="file stem (default compile-audit-<date>[-quick])")
    parser.add_argument("--json", type=Path, help="write only this JSON file (no markdown)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_arguments(argv)
    if triton.knobs.runtime.interpret:
        raise SystemExit("the compile audit compiles kernels: run it without TRITON_INTERPRET=1")
    if args.configs_json:
        configs = tuple(bench_configs.BenchConfig(**c) for c in json.loads(args.configs_json))
    else:
        configs = bench_configs.select(bench_configs.MODEL_CONFIGS, args.configs)
    tokens = tuple(args.tokens or (QUICK_TOKENS if args.quick else TOKENS))
    dtypes = tuple(args.dtypes or (("bfloat16",) if args.quick else DTYPES))
    meta = {
        **environment(torch.device("cpu"), None), "device": "none (compiled for GPU targets on the CPU)",
        "configs": [asdict(c) for c in configs], "tokens": list(tokens), "dtypes": list(dtypes), "archs": args.archs,
    }
    del meta["dtype"]
    rows = _audit_layers_here(configs, tokens, dtypes, args.archs, args.cache_dir, args.jobs,
                              progress=lambda text: print(text, file=sys.stderr, flush=True))
    body = ",\n".join(json.dumps(row) for row in rows)
    document = f'{{"meta": {json.dumps(meta, indent=1)},\n"rows": [\n{body}\n]}}\n'
    if args.json:
        args.json.write_text(document)
        return rows
    date = datetime.date.today().isoformat()
    stem = args.out / (args.name or f"compile-audit-{date}{'-quick' if args.quick else ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(document)
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
