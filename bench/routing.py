"""The routing stages alone (softmax top-k selection + permutation), contender against contender.

    python3 -m bench.routing [--device cpu|cuda] [--out DIR]

For T in 1, 64, 4096, 65536 and (E, k) in (8, 2), (128, 8), (256, 8): the median ms [p20–p80] of
select + permute for "torch" (the router's PyTorch definition, routers.softmax_topk, and backend "torch"'s
sort-based permutation), "native" (the same selection, the C++ permutation of moe_kernels._C, CPU only), and
on CUDA "triton" (the fused softmax top-k kernel and the Triton permutation). Inference routing (no gradient),
renormalised, permutation padded to the Triton GEMM tile. A contender that cannot run here is listed as
missing, with the reason.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moe_kernels import native
from moe_kernels.backends import pytorch as torch_backend
from moe_kernels.routers.softmax_topk import softmax_top_k

from .report import environment
from .timing import time_call

TOKENS = (1, 64, 4096, 65536)
SHAPES = ((8, 2), (128, 8), (256, 8))


def _contenders(device: torch.device) -> dict:
    """name → (select, permute) callables, or the reason the contender is missing."""
    # backend "torch" permutes without padding (its GEMM is torch._grouped_mm): block_m does not apply.
    contenders = {"torch": (softmax_top_k, lambda e, n, c, block_m: torch_backend.permute(e, n, c))}
    if native.has_cpu_ops() and device.type == "cpu":
        contenders["native"] = (softmax_top_k, native.permute)
    else:
        contenders["native"] = "moe_kernels._C not built" if device.type == "cpu" else "a CPU op"
    if device.type != "cuda":
        contenders["triton"] = "needs CUDA (the interpreter is no speed path)"
        return contenders
    try:
        from moe_kernels.kernels.gating import softmax_top_k_forward
        from moe_kernels.kernels.permute import permute as triton_permute
    except ImportError as error:
        contenders["triton"] = f"{type(error).__name__}: {error}"
    else:
        contenders["triton"] = (softmax_top_k_forward, triton_permute)
    return contenders


def measure(device: torch.device) -> list[dict]:
    from moe_kernels.kernels.tiles import block_m_for

    rows = []
    for name, contender in _contenders(device).items():
        if isinstance(contender, str):
            rows.append({"contender": name, "status": "missing", "reason": contender})
            continue
        select, permute = contender
        for num_experts, k in SHAPES:
            for num_tokens in TOKENS:
                row = {"contender": name, "E": num_experts, "k": k, "T": num_tokens}
                logits = torch.randn(num_tokens, num_experts, device=device)
                block_m = block_m_for(num_tokens, k, num_experts)

                def call():
                    _, experts = select(logits, k, True)
                    return permute(experts, num_experts, None, block_m)

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
