"""The backends behind the pipeline seam, looked up by name.

"torch": vectorised PyTorch, any device, any float dtype. "triton": Triton kernels (CUDA, or the CPU under
TRITON_INTERPRET=1), float16/bfloat16/float32. "auto" picks "triton" for CUDA tensors of a dtype it takes
when Triton is installed, else "torch".
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..pipeline import Backend
from . import pytorch

BACKENDS = ("torch", "triton")
# The dtypes of x each backend computes in.
DTYPES = {
    "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}


_CPU = torch.device("cpu")


def _importable(name: str) -> bool:
    try:
        _load(name)
    except ImportError:
        return False
    return True


def _load(name: str, device: torch.device = _CPU) -> Backend:
    # The device compared, not its ``type`` (whose getter costs ~15 µs cold, a tenth of a decode step's experts).
    if name == "torch":
        return pytorch.ON_CPU if device == _CPU else pytorch.OFF_CPU
    # A plain import statement, not importlib.import_module, so that torch.compile traces the layer's forward
    # (which resolves its backend) in one graph.
    from .triton import TritonBackend

    return TritonBackend()


def available() -> tuple[str, ...]:
    """The backends this installation can run (which depends on Triton)."""
    return tuple(name for name in BACKENDS if _importable(name))


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The Backend called ``name`` ("auto" chooses by device and dtype) for x on ``device`` of ``dtype``:
    ImportError if it is not installed, ValueError if it cannot run there."""
    if name == "auto":
        kernels = device != _CPU and device.type == "cuda" and dtype in DTYPES["triton"] and importlib.util.find_spec("triton")
        name = "triton" if kernels else "torch"
    backend = _load(name, device)
    if name != "torch" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend {name!r} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, for testing); "
            f"x is on {device}: use backend 'torch' or 'auto'"
        )
    if dtype not in DTYPES[name]:
        takers = tuple(other for other in BACKENDS if dtype in DTYPES[other])
        raise ValueError(f"backend {name!r} does not compute in {dtype} (x's dtype); backends that do: {takers}")
    return backend
