"""What a run leaves behind: a progress bar, the terminal table, the JSON file and the versions in it.

Units in the table: busy% (the busiest expert's share of the T·k assignments), ms (median, and p20–p80 in brackets), speedup over the loop (×), TFLOP/s, % of a
dense matmul of the same FLOPs, GB/s (forward only), peak memory in MiB (CUDA only), max abs error.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


class _Counter:
    """The progress bar when tqdm is not installed: one line on stderr every few steps."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        print(f"progress: tqdm not installed, counting {total} steps", file=sys.stderr)

    def update(self, steps: int = 1) -> None:
        self.done += steps
        if self.done == self.total or self.done % 10 == 0:
            print(f"  [{self.done}/{self.total}]", file=sys.stderr, flush=True)

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True)


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"
    except Exception as error:  # a broken install says so instead of stopping the run
        return f"import failed: {type(error).__name__}"


def environment(device, dtype) -> dict:
    """Versions, machine and commit, so that a committed run says what produced it."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "moe_kernels"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name: _version(name) for name in ("triton", "transformers", "numpy")},
        "moe_kernels_commit": (commit.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else ""),
        "argv": sys.argv[1:],
    }


def _ms(row: dict) -> str:
    return f"{row['median_ms']:.3g} [{row['p20_ms']:.3g}-{row['p80_ms']:.3g}]"


def _num(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


HEADER = (
    f"{'config':<22} {'route':<7} {'T':>5} {'busy%':>5} {'contender':<17} | {'fwd ms [p20-p80]':<24} {'x loop':>7} "
    f"{'TFLOP/s':>8} {'%dense':>6} {'GB/s':>7} | {'fwd+bwd ms [p20-p80]':<24} {'x loop':>7} {'TFLOP/s':>8} | "
    f"{'peak MiB':>8} {'max err':>8}"
)


def table(rows: list[dict]) -> str:
    """One line per (config, routing, T, contender) that ran; the contenders that did not, listed after."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["config"], row["routing"], row["tokens"], row["contender"]), {})[row["pass"]] = row
    lines = [HEADER, "-" * len(HEADER)]
    not_run: dict[tuple, set] = {}
    for (config, routing, tokens, contender), passes in by_key.items():
        forward, both = passes.get("fwd"), passes.get("fwd+bwd")
        if forward is None or forward["status"] != "ok":
            shown = forward or both
            not_run.setdefault((contender, shown["status"], shown["reason"]), set()).add(config)
            continue
        backward_cells = (
            f"{_ms(both):<24} {_num(both['speedup'], '.2f'):>7} {_num(both['tflops'], '.3g'):>8}"
            if both and both["status"] == "ok" else f"{(both or {}).get('status', '-'):<24} {'':>7} {'':>8}"
        )
        peak = forward["peak_bytes"]
        lines.append(
            f"{config:<22} {routing:<7} {tokens:>5} {100 * forward['busiest_expert_share']:>5.0f} {contender:<17} | {_ms(forward):<24} "
            f"{_num(forward['speedup'], '.2f'):>7} {_num(forward['tflops'], '.3g'):>8} "
            f"{_num(forward['dense_share'] and 100 * forward['dense_share'], '.0f'):>6} {_num(forward['gbps'], '.3g'):>7} | "
            f"{backward_cells} | {_num(peak and peak / 2**20, '.1f'):>8} {_num(forward['max_abs_err'], '.1e'):>8}"
        )
    if not_run:
        lines += ["", "Not measured (contender: status: reason [configs]):"]
        for (contender, status, reason), configs in not_run.items():
            lines.append(f"  {contender}: {status}: {reason} [{', '.join(sorted(configs))}]")
    return "\n".join(lines)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    """``{"meta": {...}, "rows": [...]}`` with one row a line, so that a diff of two runs reads row by row."""
    body = ",\n".join(json.dumps(row) for row in rows)
    path.write_text(f'{{"meta": {json.dumps(meta, indent=1)},\n"rows": [\n{body}\n]}}\n')
