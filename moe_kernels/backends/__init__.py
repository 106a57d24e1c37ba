"""The backends behind the pipeline seam, looked up by name.

"torch": vectorised PyTorch, any device. "triton": Triton kernels (CUDA, or the CPU under
TRITON_INTERPRET=1). "cuda": the native routing ops of ``moe_kernels._C`` feeding the Triton GEMMs.
"auto" picks "triton" for CUDA tensors when Triton is installed, else "torch".
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..pipeline import Backend

BACKENDS = ("torch", "triton", "cuda")


def _importable(name: str) -> bool:
    try:
        _load(name)
    except ImportError:
        return False
    return True


def _load(name: str) -> Backend:
    # Plain import statements, not importlib.import_module, so that torch.compile traces the layer's
    # forward (which resolves its backend) in one graph.
    if name == "torch":
        from .pytorch import TorchBackend as backend
    elif name == "triton":
        from .triton import TritonBackend as backend
    else:
        from .cuda import CudaBackend as backend
    return backend()


def available() -> tuple[str, ...]:
    """The backends this installation can run (which depends on Triton and on the built extension)."""
    return tuple(name for name in BACKENDS if _importable(name))


def resolve(name: str, device: torch.device) -> Backend:
    """The Backend called ``name`` ("auto" chooses by device): ImportError if it is not installed,
    ValueError if it cannot run on ``device``."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
    backend = _load(name)
    if name != "torch" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend {name!r} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, for testing); "
            f"x is on {device}: use backend 'torch' or 'auto'"
        )
    return backend
