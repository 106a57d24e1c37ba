"""bench.traffic, the meter: exact on cases counted by hand, and what it sees of the layer.

The gates of the follow-up issues (decode traffic, launches, MACs, backward bytes) are in tests/test_gates.py.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from conftest import INTERPRETED  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="the meter counts under the Triton interpreter (no CUDA device)")

from bench import traffic  # noqa: E402
from bench.configs import BenchConfig  # noqa: E402
from bench.workload import build_layer, run_layer  # noqa: E402

M, D, F = 5, 24, 40  # tokens, d_model, d_ff: odd sizes, so the 8×32×64 tiles have masked-off lanes
BLOCK_M, BLOCK_D, BLOCK_F = 8, 32, 64


@triton.jit
def _dense_expert_kernel(x_ptr, up_ptr, down_ptr, y_ptr, M, D, F,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """One program: y [M, D] = relu(x [M, D] · up [F, D]ᵀ) · down [D, F]ᵀ, all contiguous float32."""
    rows, ds, fs = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_F)
    x = tl.load(x_ptr + rows[:, None] * D + ds[None, :], mask=(rows[:, None] < M) & (ds[None, :] < D), other=0.0)
    up = tl.load(up_ptr + ds[:, None] + fs[None, :] * D, mask=(ds[:, None] < D) & (fs[None, :] < F), other=0.0)
    hidden = tl.maximum(tl.dot(x, up, input_precision="ieee"), 0.0)
    down = tl.load(down_ptr + fs[:, None] + ds[None, :] * F, mask=(fs[:, None] < F) & (ds[None, :] < D), other=0.0)
    y = tl.dot(hidden, down, input_precision="ieee")
    tl.store(y_ptr + rows[:, None] * D + ds[None, :], y, mask=(rows[:, None] < M) & (ds[None, :] < D))


def test_meter_is_exact_on_a_dense_single_expert():
    """bytes = inputs + weights + outputs, each element once; MACs = the two padded tile products."""
    x, up, down = torch.randn(M, D), torch.randn(F, D), torch.randn(D, F)
    y = torch.full((M, D), float("nan"))
    counts = traffic.measure(lambda: _dense_expert_kernel[(1,)](x, up, down, y, M, D, F, BLOCK_M, BLOCK_D, BLOCK_F))
    (launch,) = counts.launches
    assert launch.bytes_loaded == 4 * (M * D + F * D + D * F)
    assert launch.bytes_stored == 4 * M * D
    assert launch.macs == BLOCK_M * BLOCK_F * BLOCK_D + BLOCK_M * BLOCK_D * BLOCK_F
    assert (launch.programs, launch.useful_programs, launch.kernel) == (1, 1, "_dense_expert_kernel")
    assert counts.torch_ops == [] and counts.host_syncs == []
    torch.testing.assert_close(y, torch.relu(x @ up.T) @ down.T)  # the meter changes no value


def test_torch_ops_launch_counts():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    counts = traffic.measure(lambda: ((a + b).view(3, 4).t().sum() * 2).item())
    assert [name for _, name in counts.torch_ops] == ["aten.add.Tensor", "aten.sum.default", "aten.mul.Tensor"]
    assert counts.host_syncs == [""]


@torch.library.custom_op("moe_kernels::_meter_probe", mutates_args=())
def _meter_probe(x: torch.Tensor) -> torch.Tensor:
    """A custom op of the package's namespace whose body issues one PyTorch op and one Triton launch."""
    y = x + 1
    out = torch.empty_like(y)
    _copy_kernel[(1,)](y, out, y.numel(), BLOCK=16)
    return out


_meter_probe.register_fake(lambda x: torch.empty_like(x))


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


def test_meter_sees_inside_the_package_custom_ops():
    x = torch.randn(10)
    counts = traffic.measure(_meter_probe, x)
    assert [name for _, name in counts.torch_ops] == ["aten.add.Tensor"]
    assert [(k.kernel, k.bytes_loaded, k.bytes_stored) for k in counts.launches] == [("_copy_kernel", 40, 40)]


def test_layer_minimum_by_hand():
    """One expert, k = 1: forward reads x, the logits, both weight matrices and writes y; backward reads x,
    dy, the logits, the weights, hidden and the routing (8 bytes per token), writes dx, d(logits) and the
    weight gradients. Useful MACs: T·(d·d_ff + d_ff·d) forward, twice that backward."""
    config = BenchConfig("dense", 24, 40, 1, 1, activation="relu")
    layer, x = build_layer(config, 7, torch.float16, "cpu")
    least = traffic.minimum(layer, x)
    tokens, logits, weights = 7 * 24 * 2, 7 * 1 * 4, 2 * 24 * 40 * 2
    assert least["forward"] == traffic.Minimum(tokens + logits + weights + tokens, 7 * 2 * 24 * 40)
    hidden, routing = 7 * 40 * 2, 7 * 8
    backward_bytes = 2 * tokens + logits + weights + hidden + routing + tokens + logits + weights
    assert least["backward"] == traffic.Minimum(backward_bytes, 2 * 7 * 2 * 24 * 40)
    pre_activation_gradient, gate_weights = 7 * 40 * 2, 7 * 4
    weight_gradient_bytes = weights + 2 * tokens + pre_activation_gradient + hidden + gate_weights
    assert least["weight_gradients"] == traffic.Minimum(weight_gradient_bytes, 7 * 2 * 24 * 40)


def test_layer_traffic_labels_both_passes_and_the_gemms():
    config = BenchConfig("small", 32, 48, 4, 2)
    rows = traffic.layer_traffic(config, 5)
    assert [row["pass"] for row in rows] == ["forward", "backward"]
    for row in rows:
        assert row["triton_launches"] == len(row["kernels"]) > 0
        assert row["macs"] >= row["useful_macs"] > 0 and row["bytes"] >= row["min_bytes"] > 0
        assert row["launches"] == row["triton_launches"] + row["torch_launches"]
    writers = [kernel for kernel in rows[1]["kernels"] if kernel["writes_weight_grad"]]
    assert writers and not any(kernel["writes_weight_grad"] for kernel in rows[0]["kernels"])
    assert rows[1]["weight_grad_bytes"] == sum(k["bytes_loaded"] + k["bytes_stored"] for k in writers)
