"""Where the Triton kernels run: compiled on CUDA, interpreted only without a CUDA device (conftest.py), and
what conftest.py's bfloat16 fixture changes in the interpreter (BF16_ISSUE)."""
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from conftest import INTERPRETED  # noqa: E402

import moe_kernels.kernels  # noqa: E402

ROOT = Path(__file__).parent.parent
CHOOSES_INTERPRETER = re.compile(r"""environ(\.setdefault\(|\[)\s*["']TRITON_INTERPRET""")


def test_only_conftest_chooses_the_interpreter():
    """pytest imports every test module before running any: one that set TRITON_INTERPRET at import would
    make a GPU run interpret every kernel test."""
    test_modules = list((ROOT / "tests").glob("*.py")) + list((ROOT / "bench").glob("test_*.py"))
    offenders = [p.name for p in test_modules if p.name != "conftest.py" and CHOOSES_INTERPRETER.search(p.read_text())]
    assert offenders == []


def _kernels():
    for info in pkgutil.iter_modules(moe_kernels.kernels.__path__):
        module = importlib.import_module(f"moe_kernels.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, (JITFunction, InterpretedFunction)):
                yield f"{info.name}.{name}", value


def test_kernels_are_compiled_on_cuda_and_interpreted_only_without_it():
    kernels = dict(_kernels())
    assert kernels, "no Triton kernel found in moe_kernels.kernels"
    expected = JITFunction if torch.cuda.is_available() else InterpretedFunction
    assert INTERPRETED == (not torch.cuda.is_available())
    assert [name for name, kernel in kernels.items() if not isinstance(kernel, expected)] == []


# --------------------------------------------------------------------------------- bfloat16 fixture

interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="the fixture acts under the Triton interpreter only")


@triton.jit
def _bf16_kernel(a_ptr, b_ptr, out_ptr, OPERATION: tl.constexpr):
    """out (16×16 float32) = OPERATION on the 16×16 bfloat16 tiles a and b."""
    offsets = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    a = tl.load(a_ptr + offsets)
    b = tl.load(b_ptr + offsets)
    if OPERATION == "dot":
        out = tl.dot(a, b)
    elif OPERATION == "load_store":
        out = a.to(tl.float32)
    elif OPERATION == "select":
        out = tl.where(b.to(tl.float32) > 0, a, b).to(tl.float32)
    elif OPERATION == "via_float16":
        out = a.to(tl.float16).to(tl.float32)
    elif OPERATION == "add":
        out = (a + b).to(tl.float32)
    elif OPERATION == "negate":
        out = (-a).to(tl.float32)
    elif OPERATION == "compare":
        out = tl.where(a < b, 1.0, 0.0)
    elif OPERATION == "fma":
        out = tl.fma(a, b, a).to(tl.float32)
    elif OPERATION == "sum":
        out = tl.broadcast_to(tl.sum(a, axis=1)[:, None], (16, 16)).to(tl.float32)
    elif OPERATION == "max":
        out = tl.broadcast_to(tl.max(a, axis=1)[:, None], (16, 16)).to(tl.float32)
    elif OPERATION == "cumsum":
        out = tl.cumsum(a, axis=1).to(tl.float32)
    elif OPERATION == "round_to_bf16":  # the float32 product of two bf16 is exact; rounding it back is not
        out = (a.to(tl.float32) * b.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
    elif OPERATION == "from_int":
        out = (offsets - 100).to(tl.bfloat16).to(tl.float32)
    else:  # "to_float64"
        out = a.to(tl.float64).to(tl.float32)
    tl.store(out_ptr + offsets, out)


def _run(operation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = (torch.randn(16, 16) * 4).bfloat16(), (torch.randn(16, 16) * 4).bfloat16()
    out = torch.full((16, 16), float("nan"))
    _bf16_kernel[(1,)](a, b, out, OPERATION=operation)
    return a, b, out


@interpreter_only
def test_bf16_dot_is_computed_in_float32():
    a, b, out = _run("dot")
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-6, atol=1e-5)


@interpreter_only
@pytest.mark.parametrize("operation", ["load_store", "select", "via_float16", "to_float64", "max"])
def test_bf16_operations_the_interpreter_gets_right_are_left_alone(operation):
    """Casts to other floats go through float32, and tl.max widens 16-bit floats to float32 before reducing."""
    a, b, out = _run(operation)
    expected = {
        "load_store": a, "select": torch.where(b > 0, a, b), "via_float16": a.half(),
        "to_float64": a, "max": a.amax(1, keepdim=True).expand(16, 16),
    }[operation]
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=0)


@interpreter_only
def test_float32_to_bf16_rounds_to_nearest_even_as_on_the_gpu():
    a, b, out = _run("round_to_bf16")
    torch.testing.assert_close(out, (a.float() * b.float()).bfloat16().float(), rtol=0, atol=0)


@interpreter_only
def test_the_interpreter_itself_still_truncates_float32_to_bf16(monkeypatch):
    """Without the fixture the interpreter truncates: when Triton rounds, this fails and that part can go."""
    monkeypatch.undo()
    torch.manual_seed(0)
    a, b, out = _run("round_to_bf16")
    assert not torch.equal(out, (a.float() * b.float()).bfloat16().float())


@interpreter_only
@pytest.mark.parametrize("operation", ["add", "negate", "compare", "fma", "sum", "cumsum", "from_int"])
def test_bf16_operations_the_interpreter_gets_wrong_raise(operation):
    with pytest.raises(Exception, match="bfloat16 under the interpreter gives wrong values"):
        _run(operation)


@interpreter_only
@pytest.mark.parametrize("operation", ["dot", "add", "compare", "sum"])
def test_the_interpreter_itself_is_still_wrong_on_bf16(operation, monkeypatch):
    """Without the fixture (monkeypatch.undo) the interpreter still computes on bit patterns: when Triton
    fixes it, this fails, and the fixture's corresponding part can go."""
    monkeypatch.undo()
    torch.manual_seed(0)
    a, b, out = _run(operation)
    a, b = a.float(), b.float()
    right = {"dot": a @ b, "add": a + b, "compare": (a < b).float(), "sum": a.sum(1, keepdim=True).expand(16, 16)}[operation]
    assert not torch.allclose(out, right.bfloat16().float(), rtol=2e-2, atol=1e-2, equal_nan=False)
