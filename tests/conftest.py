"""Test set-up. The one place that chooses the Triton interpreter: TRITON_INTERPRET=1 when there is no CUDA
device (set here, before any test module imports Triton), removed when there is one, so that a GPU run
executes compiled kernels. tests/test_interpreter.py checks that no test module chooses otherwise."""
import importlib.util
import os

import numpy as np
import pytest
import torch

if torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

BF16_ISSUE = "the Triton interpreter stores bfloat16 as uint16 and computes on the bit patterns (triton-lang/triton#11584)"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (real-size meter runs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes many minutes (real-size interpreter runs); runs with --run-slow")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / empty_like hand out NaN (floats) or -2³⁰ (integers) while a test runs, so whatever a
    kernel should have written but skipped shows in the result."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -(2**30))

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))


@pytest.fixture(autouse=True)
def interpreter_bfloat16(monkeypatch):
    """Under the interpreter, bfloat16 operands of tl.dot are converted to float32 before the product, as the
    interpreter already does for 8-bit floats (BF16_ISSUE), so that bf16 kernel tests run on the CPU.

    The interpreter's other bf16 computations are also done on the bit patterns (wrong values, not errors):
    elementwise arithmetic and comparisons (binary ops, negation, fma, clamp), casts from integers to
    bfloat16, and tl.sum and tl.cumsum. Those raise here instead, naming the operation, so that a kernel
    test cannot pass or fail on them silently: compute in float32 in the kernel (as ours do), or skip
    bf16 under the interpreter with BF16_ISSUE. Loads, stores, selects, abs, reshapes, tl.max / tl.min
    (which widen to float32 first) and casts to and from other floats (through float32) are exact and
    left alone, except that the interpreter truncates float32 → bfloat16 (casts, and stores of float32 into
    bfloat16 tensors) where the GPU and torch round to nearest even: that rounding is torch's here (otherwise
    every bf16 result is up to twice as far from the exact one as on the GPU). tests/test_interpreter.py pins
    each case.
    """
    if not INTERPRETED or importlib.util.find_spec("triton") is None:
        return
    import triton.language as tl
    import triton.runtime.interpreter as triton_interpreter

    builder = triton_interpreter.InterpreterBuilder
    bf16 = tl.bfloat16

    def to_float32(handle):
        data = triton_interpreter._convert_float(handle.data, bf16, tl.float32, None).view(np.float32)
        return triton_interpreter.TensorHandle(data, tl.float32)

    convert_float = triton_interpreter._convert_float

    def convert_rounding_to_nearest(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == bf16:
            values = torch.from_numpy(np.frombuffer(data.tobytes(), dtype=np.float32).copy())
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(data.shape)
        return convert_float(data, input_dtype, output_dtype, rounding_mode)

    dot = builder.create_dot

    def dot_in_float32(self, a, b, d, *args):
        if a.dtype.scalar == bf16:
            a = to_float32(a)
        if b.dtype.scalar == bf16:
            b = to_float32(b)
        return dot(self, a, b, d, *args)

    def refuse(name):
        raise RuntimeError(f"{name} on bfloat16 under the interpreter gives wrong values: {BF16_ISSUE}; compute in "
                           "float32 in the kernel or skip bfloat16 under the interpreter")

    def guarded(name, method, is_bf16):
        def check(self, *args, **kwargs):
            if is_bf16(*args):
                refuse(name)
            return method(self, *args, **kwargs)

        return check

    def any_bf16(*handles):
        return any(getattr(getattr(h, "dtype", None), "scalar", None) == bf16 for h in handles)

    def bf16_cast(src, dst_type, *_):
        pair = {src.dtype.scalar, dst_type.scalar}
        return bf16 in pair and pair != {bf16, tl.float32} and pair != {bf16}

    monkeypatch.setattr(builder, "create_dot", dot_in_float32)
    monkeypatch.setattr(triton_interpreter, "_convert_float", convert_rounding_to_nearest)
    for name in ("binary_op", "unary_op", "create_fma", "create_clampf"):
        monkeypatch.setattr(builder, name, guarded(name, getattr(builder, name), lambda *a: any_bf16(*a[:3])))
    monkeypatch.setattr(builder, "cast_impl", guarded("cast", builder.cast_impl, bf16_cast))
    for operations in (triton_interpreter.ReduceOps, triton_interpreter.ScanOps):
        apply = operations.apply

        def checked_apply(self, input, apply=apply, kind=operations.__name__):
            if any(t.dtype.scalar == bf16 for t in (input if isinstance(input, tuple) else (input,))):
                refuse(kind)
            return apply(self, input)

        monkeypatch.setattr(operations, "apply", checked_apply)


# ------------------------------------------------------------------------------------------ compile audit

AUDIT_TOKENS = (1, 4096)  # two shapes per layer: decode and prefill
_audit_process = []


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """Slow tests skip unless --run-slow. Tests reading the session's compile audit (fixture
    ``quick_audit``) run last, and the audit starts now in a child process
    (bench.compile_audit.AuditProcess), so that its compiles overlap the rest of the suite."""
    if not config.getoption("--run-slow"):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="slow (real-size interpreter run): pytest --run-slow"))
    audited = [item for item in items if "quick_audit" in getattr(item, "fixturenames", ())]
    if not audited:
        return
    items[:] = [item for item in items if item not in audited] + audited
    from bench.compile_audit import AuditProcess
    from bench.configs import MODEL_CONFIGS

    _audit_process.append(AuditProcess(MODEL_CONFIGS, AUDIT_TOKENS, ("bfloat16",), ("sm_90a", "sm_80"),
                                       jobs=max(1, (os.cpu_count() or 2) - 1)))


def pytest_sessionfinish(session, exitstatus):
    for process in _audit_process:
        process.stop()


@pytest.fixture(scope="session")
def quick_audit() -> list[dict]:
    """bench.compile_audit's rows for every bench layer (bench.configs.MODEL_CONFIGS) at T = AUDIT_TOKENS,
    bfloat16, sm_90a and sm_80: one per launch of the forward and backward, with its compile facts.
    Compiles are cached under $MOE_KERNELS_AUDIT_CACHE (default ~/.cache/moe_kernels/compile-audit)."""
    return _audit_process[0].result()
