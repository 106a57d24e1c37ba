"""What a run leaves behind: a progress bar, the terminal table, the JSON file and the versions in it.

The summary (printed first by bench.run) and the table. Units in the table: busy% (the busiest expert's share of the T·k assignments), ms (median, and p20–p80 in brackets), speedup over the loop (×), TFLOP/s, % of a
dense matmul of the same FLOPs, GB/s (forward only), peak memory in MiB (CUDA only), minor page faults per call
(median; forward / forward+backward; CPU only), max abs error.
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

    root = Path(__file__).parent.parent  # the pathspec below is relative to it
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "moe_kernels"], capture_output=True, text=True, cwd=root)
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
    f"{'peak MiB':>8} {'faults fwd/bwd':>14} {'max err':>8}"
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
        faults = f"{_num(forward['minor_faults'], '.0f')}/{_num((both or {}).get('minor_faults'), '.0f')}"
        lines.append(
            f"{config:<22} {routing:<7} {tokens:>5} {100 * forward['busiest_expert_share']:>5.0f} {contender:<17} | {_ms(forward):<24} "
            f"{_num(forward['speedup'], '.2f'):>7} {_num(forward['tflops'], '.3g'):>8} "
            f"{_num(forward['dense_share'] and 100 * forward['dense_share'], '.0f'):>6} {_num(forward['gbps'], '.3g'):>7} | "
            f"{backward_cells} | {_num(peak and peak / 2**20, '.1f'):>8} {faults:>14} {_num(forward['max_abs_err'], '.1e'):>8}"
        )
    if not_run:
        lines += ["", "Not measured (contender: status: reason [configs]):"]
        for (contender, status, reason), configs in not_run.items():
            lines.append(f"  {contender}: {status}: {reason} [{', '.join(sorted(configs))}]")
    return "\n".join(lines)


def _ours(rows: list[dict]) -> str | None:
    """The ours:* contender that measured the most rows (ours:torch on the CPU, ours:triton on a GPU)."""
    counts: dict[str, int] = {}
    for row in rows:
        if row["contender"].startswith("ours:") and row["status"] == "ok":
            counts[row["contender"]] = counts.get(row["contender"], 0) + 1
    return max(counts, key=counts.get) if counts else None


def summary(rows: list[dict], meta: dict) -> str:
    """The ten-second read: per (config, T) and pass, ours against the loop and against the fastest peer
    (the other contenders, transformers' implementations), the worst over routings; ours' max error; a
    verdict line; and who was not measured, with the reason."""
    ours = _ours(rows)
    if ours is None:
        return "summary: no ours:* contender was measured"
    by_point: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_point.setdefault((row["config"], row["tokens"], row["routing"], row["pass"]), {})[row["contender"]] = row
    cells: dict[tuple, dict] = {}  # (config, T) → {pass: (ms, x loop, x peer, peer), "err": max err}
    slower: list[str] = []
    wins = points = 0
    for (config, tokens, routing, pass_name), contenders in by_point.items():
        mine = contenders.get(ours)
        if mine is None or mine["status"] != "ok":
            continue
        cell = cells.setdefault((config, tokens), {"err": None})
        if mine["max_abs_err"] is not None:
            cell["err"] = max(cell["err"] or 0.0, mine["max_abs_err"])
        loop = contenders.get("loop")
        versus_loop = loop["median_ms"] / mine["median_ms"] if loop and loop["status"] == "ok" else None
        peers = [row for name, row in contenders.items()
                 if name != "loop" and not name.startswith("ours:") and row["status"] == "ok"]
        best = min(peers, key=lambda row: row["median_ms"], default=None)
        versus_peer = best["median_ms"] / mine["median_ms"] if best else None
        if best:
            points += 1
            wins += versus_peer > 1
            if versus_peer <= 1:
                slower.append(f"{config} T={tokens} {routing} {pass_name} ({versus_peer:.2f}x {best['contender']})")
        previous = cell.get(pass_name)
        if previous is None or (versus_peer or float("inf")) < (previous[2] or float("inf")):  # keep the worst routing
            cell[pass_name] = (mine["median_ms"], versus_loop, versus_peer, best["contender"] if best else "")

    def ratio(value) -> str:
        return "-" if value is None else f"{value:.2f}x"

    routings = sorted({row["routing"] for row in rows})
    lines = [
        f"SUMMARY  {ours} vs the naive loop and vs the fastest peer (transformers' experts implementations)",
        f"{meta['device']}, {meta['dtype']}, {meta['threads']} thread(s), torch {meta['torch']}, transformers "
        f"{meta['transformers']}; x = their median time / ours (> 1: ours faster); worst of routings {', '.join(routings)}",
        f"{'config':<20} {'T':>5} | {'fwd ms':>8} {'x loop':>7} {'x peer':>7} {'(peer)':<15} | "
        f"{'fwd+bwd ms':>10} {'x loop':>7} {'x peer':>7} {'(peer)':<15} | {'max err':>8}",
    ]
    for (config, tokens), cell in cells.items():  # the run's order: config, then T
        parts = []
        for pass_name, width in (("fwd", 8), ("fwd+bwd", 10)):
            ms, versus_loop, versus_peer, peer = cell.get(pass_name, (None, None, None, ""))
            parts.append(f"{'-' if ms is None else f'{ms:.3g}':>{width}} {ratio(versus_loop):>7} {ratio(versus_peer):>7} {peer:<15}")
        error = "-" if cell["err"] is None else f"{cell['err']:.1e}"
        lines.append(f"{config:<20} {tokens:>5} | {parts[0]} | {parts[1]} | {error:>8}")
    lines.append(f"Faster than every peer on {wins} of {points} (config, routing, T, pass) points"
                 + (": slower on " + "; ".join(slower) if slower else "."))
    missing = sorted({(row["contender"], row["status"], row["reason"]) for row in rows
                      if row["status"] in ("missing", "failed")})
    for contender, status, reason in missing:
        lines.append(f"  {contender} {status}: {reason[:150]}")
    return "\n".join(lines)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    """``{"meta": {...}, "rows": [...]}`` with one row a line, so that a diff of two runs reads row by row."""
    body = ",\n".join(json.dumps(row) for row in rows)
    path.write_text(f'{{"meta": {json.dumps(meta, indent=1)},\n"rows": [\n{body}\n]}}\n')
