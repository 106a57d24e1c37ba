"""Speedup over the loop vs tokens, one panel per layer config, drawn from a results JSON.

    python3 -m bench.plot bench/results/cpu-2core-2026-11-22.json   # writes the .png beside it

One colour per contender, solid for the forward pass and dashed for forward+backward, circles for uniform
and crosses for Zipf routing; y is the loop's median time over the contender's (×, log scale; the loop is
the grey line at 1), x is tokens per call (log scale).
matplotlib is optional: without it, ``plot`` returns a line saying the plot was skipped.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def plot(results: Path) -> str:
    """Write ``results`` with suffix .png; return a line saying where, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot: skipped (matplotlib not installed; pip install matplotlib, then python3 -m bench.plot FILE)"
    data = json.loads(Path(results).read_text())
    rows = [row for row in data["rows"] if row["status"] == "ok" and row["speedup"] is not None and row["contender"] != "loop"]
    configs = list(dict.fromkeys(row["config"] for row in rows))
    if not configs:
        return "plot: skipped (no measured rows)"
    columns = min(3, len(configs))
    figure, axes = plt.subplots(math.ceil(len(configs) / columns), columns, figsize=(5 * columns, 3.6 * math.ceil(len(configs) / columns)), squeeze=False)
    contenders = list(dict.fromkeys(row["contender"] for row in rows))
    colours = {name: f"C{index}" for index, name in enumerate(contenders)}
    for axis, config in zip(axes.flat, configs):
        lines: dict[tuple, list] = {}
        for row in rows:
            if row["config"] == config:
                lines.setdefault((row["contender"], row["routing"], row["pass"]), []).append((row["tokens"], row["speedup"]))
        for (contender, routing, pass_name), points in sorted(lines.items()):
            tokens, speedups = zip(*sorted(points))
            axis.plot(tokens, speedups, "-" if pass_name == "fwd" else "--", marker="o" if routing == "uniform" else "x",
                      color=colours[contender], markersize=4, label=f"{contender} {routing} {pass_name}")
        axis.set(xscale="log", yscale="log", title=config, xlabel="tokens", ylabel="speedup over loop (×)")
        axis.axhline(1.0, color="grey", linewidth=0.5)
        axis.legend(fontsize=5, ncol=2)
    for axis in list(axes.flat)[len(configs):]:
        axis.set_visible(False)
    meta = data["meta"]
    figure.suptitle(f"{meta['device']}, {meta['dtype']}, torch {meta['torch']}, {meta['date_utc']} UTC", fontsize=9)
    figure.tight_layout()
    out = Path(results).with_suffix(".png")
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return f"plot: {out}"


if __name__ == "__main__":
    for path in sys.argv[1:] or sys.exit(__doc__):
        print(plot(Path(path)))
