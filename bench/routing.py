"""The routing stages alone (gating + permutation), backend against backend: issue 5's table.

    python3 -m bench.routing [--device cpu|cuda] [--out DIR]

For T in 1, 64, 4096, 65536 and (E, k) in (8, 2), (128, 8), (256, 8): the median ms [p20–p80] of
route + permute for backend "torch" (pure PyTorch: routing.py's routers and one sort), the native ops of
moe_kernels._C ("native": CPU or CUDA by device), and on CUDA the Triton kernels. Inference routing
(no gradient), top-k softmax with renormalisation, permutation padded to the Triton GEMM tile.
A contender that cannot run here is listed as missing, with the reason.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moe_kernels import native
from moe_kernels.backends import pytorch as torch_backend
from moe_kernels.pipeline import RouterConfig

from .report import environment
from .timing import time_call

TOKENS = (1, 64, 4096, 65536)
SHAPES = ((8, 2), (128, 8), (256, 8))


def _contenders(device: torch.device) -> dict:
    """name → (route, permute) callables, or the reason the contender is missing."""
    # backend "torch" permutes without padding (its GEMM is torch._grouped_mm): block_m does not apply.
    contenders = {"torch": (torch_backend.route, lambda e, n, c, block_m: torch_backend.permute(e, n, c))}
    if native.has_cpu_ops() and (device.type == "cpu" or native.has_cuda_ops()):
        contenders["native"] = (native.route, native.permute)
    else:
        contenders["native"] = f"moe_kernels._C not built{' with CUDA' if device.type == 'cuda' else ''}"
    if device.type != "cuda":
        contenders["triton"] = "needs CUDA (the interpreter is no speed path)"
        return contenders
    try:
        from moe_kernels.kernels.gating import gating_forward
        from moe_kernels.kernels.permute import permute as triton_permute
    except ImportError as error:
        contenders["triton"] = f"{type(error).__name__}: {error}"
    else:
        contenders["triton"] = (gating_forward, triton_permute)
    return contenders


def measure(device: torch.device) -> list[dict]:
    from moe_kernels.kernels.tiles import block_m_for

    rows = []
    for name, contender in _contenders(device).items():
        if isinstance(contender, str):
            rows.append({"contender": name, "status": "missing", "reason": contender})
            continue
        route, permute = contender
        for num_experts, k in SHAPES:
            for num_tokens in TOKENS:
                row = {"contender": name, "E": num_experts, "k": k, "T": num_tokens}
                config = RouterConfig("topk", k, renormalize=True)
                logits = torch.randn(num_tokens, num_experts, device=device)
                block_m = block_m_for(num_tokens, k, num_experts)

                def call():
                    routing = route(logits, None, None, config)
                    return permute(routing.experts, num_experts, None, block_m)

                with torch.no_grad():
                    timing = time_call(call, device)
                rows.append({**row, "status": "ok", "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'contender':<9} {'E':>4} {'k':>2} {'T':>6} | {'ms [p20-p80]':<26} x torch"]
    baseline = {(r["E"], r["T"]): r["median_ms"] for r in rows if r["contender"] == "torch" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['contender']:<9} missing: {r['reason']}")
            continue
        cell = f"{r['median_ms']:.3g} [{r['p20_ms']:.3g}-{r['p80_ms']:.3g}]"
        speedup = baseline[(r["E"], r["T"])] / r["median_ms"]
        lines.append(f"{r['contender']:<9} {r['E']:>4} {r['k']:>2} {r['T']:>6} | {cell:<26} {speedup:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write routing-<device>.json and .txt here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as bench/run.py: a shared machine stalls multi-threaded runs
    rows = measure(device)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = environment(device, torch.float32)
        (args.out / f"routing-{device.type}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / f"routing-{device.type}.txt").write_text(json.dumps(meta) + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
