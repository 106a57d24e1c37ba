"""Test set-up: without a GPU the Triton kernels run in the interpreter, set before anything imports triton."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / empty_like hand out NaN (floats) or -2³⁰ (integers) while a test runs, so whatever a
    kernel should have written but skipped shows in the result."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -(2**30))

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))
