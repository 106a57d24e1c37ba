"""The backends behind the pipeline seam, looked up by name.

"torch": vectorised PyTorch, any device. "triton": Triton kernels (CUDA, or the CPU under
TRITON_INTERPRET=1). "cuda": the native routing ops of ``moe_kernels._C`` feeding the Triton GEMMs.
"auto" picks "triton" for CUDA tensors when Triton is installed, else "torch".
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from ..pipeline import Backend

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "TorchBackend", "triton": "TritonBackend", "cuda": "CudaBackend"}


def _importable(name: str) -> bool:
    try:
        _load(name)
    except ImportError:
        return False
    return True


def _load(name: str) -> Backend:
    module = importlib.import_module(f"{__name__}.{name}")
    return getattr(module, _MODULES[name])()


def available() -> tuple[str, ...]:
    """The backends this installation can run (which depends on Triton and on the built extension)."""
    return tuple(name for name in BACKENDS if _importable(name))


def resolve(name: str, device: torch.device) -> Backend:
    """The Backend called ``name`` ("auto" chooses by device); ImportError if it is not installed."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
    return _load(name)
