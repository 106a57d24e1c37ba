"""bench.compile_audit: what it captures and how it specialises (probe kernels), and CI's quick audit of every
kernel the layer launches (conftest's ``quick_audit``: each bench layer at T 1 and 4096, bfloat16, sm_90a
and sm_80): each compiles, fits the arch's shared memory and, in 16 bits, spills nothing.

The gates of issue 11 that read the same audit (MMA kinds at prefill) are in tests/test_gates.py.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench.capture import ARCHS, LaunchCapture  # noqa: E402
from bench.compile_audit import audit  # noqa: E402
from bench.configs import MODEL_CONFIGS  # noqa: E402
from conftest import AUDIT_TOKENS  # noqa: E402

CASES = [(config.name, tokens, arch) for config in MODEL_CONFIGS for tokens in AUDIT_TOKENS for arch in ARCHS]
CASE_IDS = [f"{name}-T{tokens}-{arch}" for name, tokens, arch in CASES]


def _copy(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets * stride, tl.load(x_ptr + offsets * stride, mask=offsets < n), mask=offsets < n)


def _matmul(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rows, cols, ks = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b, input_precision="ieee"))


# JITFunction directly, not @triton.jit, which returns an interpreted function under TRITON_INTERPRET=1.
copy_kernel, matmul_kernel = JITFunction(_copy), JITFunction(_matmul)


def test_capture_specialises_each_argument_as_the_runtime_does():
    """Ints equal to 1 become constexprs, ints and 16-byte aligned pointers that are multiples of 16 get the
    divisibility hint; a view's alignment is its offset's (meta tensors: data_ptr = offset in bytes)."""
    x = torch.empty(64, device="meta", dtype=torch.float16)
    with LaunchCapture("sm_90a") as capture:
        copy_kernel[lambda meta: (triton.cdiv(40, meta["BLOCK"]), 3)](x, x[1:], 32, 1, BLOCK=16)
    (launch,) = capture.launches
    assert launch.signature == {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "stride": "constexpr", "BLOCK": "constexpr"}
    assert launch.constexprs == {(3,): 1, (4,): 16}
    assert launch.attrs[(0,)] == [["tt.divisibility", 16]] and launch.attrs[(1,)] == []
    assert launch.attrs[(2,)] == [["tt.divisibility", 16]]
    assert (launch.grid, launch.programs, launch.variant()) == ((3, 3, 1), 9, "BLOCK=16 warps=4 stages=3")


@torch.library.custom_op("moe_kernels::_audit_probe", mutates_args=())
def _audit_probe(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A custom op of the package's namespace launching a 64×64×32 tl.dot (float32 in IEEE precision: no
    tensor cores); its fake launches nothing."""
    c = a.new_empty(64, 64, dtype=torch.float32)
    matmul_kernel[(1,)](a, b, c, 64, 64, 32)
    return c


_audit_probe.register_fake(lambda a, b: a.new_empty(64, 64, dtype=torch.float32))


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, {"sm_90a": "wgmma", "sm_80": "mma.sync"}),
                                            (torch.float32, {"sm_90a": "fma", "sm_80": "fma"})], ids=["bf16", "fp32-ieee"])
def test_audit_compiles_what_a_custom_op_launches_on_meta_tensors(dtype, expected):
    a, b = torch.empty(64, 32, device="meta", dtype=dtype), torch.empty(32, 64, device="meta", dtype=dtype)
    rows = audit(lambda: _audit_probe(a, b))
    assert [(row["kernel"], row["arch"], row["mma"]) for row in rows] == [("_matmul", arch, kind) for arch, kind in expected.items()]
    for row in rows:
        assert row["compiled"] and row["registers"] > 0 and row["spill_bytes"] == 0, row
        assert 0 < row["shared_bytes"] <= row["shared_limit_bytes"] and row["resident_per_sm"] >= 1


def _case_rows(quick_audit, name, tokens, arch):
    rows = [r for r in quick_audit if (r["config"], r["tokens"], r["arch"]) == (name, tokens, arch)]
    assert rows, f"no launch audited for {name} T={tokens} {arch}"
    return rows


@pytest.mark.parametrize("name,tokens,arch", CASES, ids=CASE_IDS)
def test_every_launch_of_the_layer_compiles(quick_audit, name, tokens, arch):
    rows = _case_rows(quick_audit, name, tokens, arch)
    assert {row.get("pass") for row in rows} >= {"forward", "backward"}
    assert [(row["kernel"], row["error"]) for row in rows if not row["compiled"]] == []


@pytest.mark.parametrize("name,tokens,arch", CASES, ids=CASE_IDS)
def test_shared_memory_within_the_arch_limit(quick_audit, name, tokens, arch):
    rows = _case_rows(quick_audit, name, tokens, arch)
    assert [(r["kernel"], r["shared_bytes"]) for r in rows if r["compiled"] and not r["shared_within_limit"]] == []


@pytest.mark.parametrize("name,tokens,arch", CASES, ids=CASE_IDS)
def test_no_spills_in_16_bit_kernels(quick_audit, name, tokens, arch):
    """Issue 11: Qwen3's gated GEMM 1 at T = 4096 spilled before (BLOCK_M = 32, 255 registers; now 64, μ/4
    at 256 rows per expert), and so did the permutation's [SUB, NUM_BINS] gather tile for E ≥ 128 (now
    bounded by tiles.permute_chunk)."""
    rows = _case_rows(quick_audit, name, tokens, arch)
    assert [(r["kernel"], r["variant"], r["spill_bytes"]) for r in rows if r["compiled"] and r["spill_bytes"]] == []
