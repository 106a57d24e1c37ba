"""The fast layer, on every backend that runs here, against the reference: outputs, aux_loss, gradients."""
import copy
import zlib

import pytest
import torch

import moe_kernels
from helpers import (
    BACKENDS, assert_layer_matches, device_for, layer_triplet, randomize_, run, skewed_input, skip_unless_runnable,
)
from moe_kernels import reference

# (d_model, d_ff, num_experts, k, router, activation, capacity_factor, renormalize, tokens, skew)
CASES = [
    (16, 24, 4, 2, "topk", "swiglu", None, True, 33, False),
    (13, 7, 5, 1, "topk", "relu", None, True, 1, False),
    (12, 10, 6, 6, "topk", "geglu", None, True, 17, False),
    (8, 5, 64, 8, "topk", "silu", None, True, 50, False),
    (10, 12, 8, 2, "noisy_topk", "gelu", None, True, 40, False),
    (16, 16, 8, 1, "switch", "relu", 1.0, True, 64, False),
    (11, 9, 6, 3, "topk", "swiglu", 0.5, True, 31, False),
    (9, 14, 7, 2, "topk", "swiglu", None, False, 29, False),
    (16, 8, 8, 2, "topk", "swiglu", None, True, 45, True),
    (16, 8, 8, 2, "topk", "swiglu", 1.0, True, 45, True),
    (20, 12, 32, 4, "topk", "swiglu", 1.25, True, 200, False),
]


def _arguments(case):
    d, d_ff, experts, k, router, activation, capacity, renormalize, tokens, skew = case
    arguments = dict(d_model=d, d_ff=d_ff, num_experts=experts, k=k, router=router, activation=activation,
                     capacity_factor=capacity)
    if router == "topk":
        arguments["renormalize"] = renormalize
    return arguments, tokens, skew


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_fast_layer_matches_reference(case, dtype, backend):
    skip_unless_runnable(backend)
    arguments, tokens, skew = _arguments(case)
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    reference64, reference_low, fast = layer_triplet(dtype, backend=backend, skew=skew, **arguments)
    x = skewed_input((tokens, arguments["d_model"]), skew, reference64)
    # All three on one device: the noise is drawn on x's device, so the same seed gives the same noise.
    device = device_for(backend)
    assert_layer_matches(reference64.to(device), reference_low.to(device), fast.to(device), x, dtype)


# The layer options of the models people run: (name, constructor arguments, x shape). Sizes d 12, d_ff 10, E 6.
MODEL_OPTIONS = [
    ("qwen2-shared-expert-gate", dict(k=2, renormalize=False, shared_d_ff=14, shared_expert_gate=True), (2, 9)),
    ("deepseek-shared-experts", dict(k=2, shared_d_ff=14), (17,)),
    ("switch-jitter-expert-capacity", dict(k=1, router="switch", activation="relu", bias=True, jitter_noise=0.1,
                                           expert_capacity=2), (3, 11)),
    ("both-capacities", dict(k=3, capacity_factor=0.75, expert_capacity=3), (2, 13)),
    ("gpt-oss", dict(k=2, bias=True, activation="gpt_oss_swiglu", expert_bias=True), (2, 9)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,options,shape", MODEL_OPTIONS, ids=[case[0] for case in MODEL_OPTIONS])
def test_model_options_match_reference(name, options, shape, dtype, backend):
    """Shared experts (gated or not), Switch's jitter and per-sequence capacity, both capacities, GPT-OSS's
    biases and clamped interleaved SwiGLU: the fast layer against the float64 reference, in training."""
    skip_unless_runnable(backend)
    if options.get("expert_bias") and backend == "triton":
        pytest.skip("backend 'triton' takes no expert biases yet (it says so: test_functional)")
    torch.manual_seed(zlib.crc32(name.encode()))
    layers = layer_triplet(dtype, backend=backend, d_model=12, d_ff=10, num_experts=6, **options)
    device = device_for(backend)
    assert_layer_matches(*[layer.to(device) for layer in layers], torch.randn(*shape, 12), dtype)


@pytest.mark.parametrize("name,options,shape", MODEL_OPTIONS, ids=[case[0] for case in MODEL_OPTIONS])
def test_model_options_gradcheck_float64(name, options, shape):
    """fast_mode: gradcheck on random projections of the Jacobian (the full one takes minutes here)."""
    torch.manual_seed(zlib.crc32(name.encode()))
    layer = moe_kernels.MoE(6, 5, 6, backend="torch", aux_loss_mode="manual", **options)
    layer = randomize_(layer).double()
    x = torch.randn(*shape, 6, dtype=torch.float64, requires_grad=True)

    def forward(x, *_):
        torch.manual_seed(0)
        return layer(x), layer.aux_loss

    assert torch.autograd.gradcheck(forward, (x, *layer.parameters()), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
def test_eval_mode_matches_reference(router, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(7)
    layers = layer_triplet(torch.float32, backend=backend, d_model=12, d_ff=10, num_experts=6, k=2, router=router)
    layers = [layer.eval().to(device_for(backend)) for layer in layers]
    assert_layer_matches(*layers, torch.randn(3, 11, 12), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_parameters_with_half_input(backend):
    """The experts compute in x's dtype; the output keeps it."""
    skip_unless_runnable(backend)
    torch.manual_seed(12)
    device = device_for(backend)
    base = randomize_(reference.MoE(16, 24, 4, k=2)).to(device)
    fast = moe_kernels.MoE.from_reference(copy.deepcopy(base), backend=backend)
    x = torch.randn(30, 16, device=device)
    y = fast(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), base(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name,options", [("swiglu", {}), ("gpt-oss", dict(activation="gpt_oss_swiglu", expert_bias=True))])
def test_stored_and_recomputed_pre_activation_give_the_reference_gradients(name, options, dtype):
    """recompute_pre_activation False (the default: GEMM 1 keeps the pre-activation) and True (the backward
    runs GEMM 1 again) both meet the float64 reference; in float32 the kept pre-activation holds the very
    accumulators the recompute produces, so the two agree bitwise."""
    skip_unless_runnable("triton")
    torch.manual_seed(zlib.crc32(name.encode()))
    device = device_for("triton")
    reference64, reference_low, _ = layer_triplet(dtype, d_model=16, d_ff=24, num_experts=4, k=2, **options)
    x = torch.randn(37, 16)
    gradients = []
    for recompute in (False, True):
        fast = moe_kernels.MoE.from_reference(copy.deepcopy(reference_low), backend="triton", recompute_pre_activation=recompute)
        assert fast.recompute_pre_activation is recompute
        assert_layer_matches(reference64.to(device), reference_low.to(device), fast.to(device), x, dtype)
        gradients.append(run(fast, x, torch.ones(37, 16, dtype=torch.float64), seed=0)[2])
    if dtype == torch.float32:
        assert all(torch.equal(stored, recomputed) for stored, recomputed in zip(*gradients))


def test_recompute_pre_activation_survives_copies():
    layer = moe_kernels.MoE(8, 6, 4, recompute_pre_activation=True)
    assert copy.deepcopy(layer).recompute_pre_activation is True
    assert moe_kernels.MoE(8, 6, 4).recompute_pre_activation is False


def test_leading_dimensions_are_kept():
    layer = randomize_(moe_kernels.MoE(8, 6, 4, k=2))
    x = torch.randn(2, 3, 5, 8)
    assert layer(x).shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_empty_batch_returns_empty_output(shape, backend):
    skip_unless_runnable(backend)
    layer = randomize_(moe_kernels.MoE(8, 6, 4, k=2, capacity_factor=1.0, backend=backend)).to(device_for(backend))
    x = torch.randn(shape, requires_grad=True, device=device_for(backend))
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert layer.aux_loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router,k", [("topk", 2), ("noisy_topk", 2), ("switch", 1)])
def test_non_finite_token_only_changes_its_own_row(router, k, backend):
    skip_unless_runnable(backend)
    torch.manual_seed(3)
    device = device_for(backend)
    # "manual": the aux loss (a batch statistic, NaN with a NaN token) stays out of this test of the token path.
    reference_layer = reference.MoE(8, 6, 4, k=k, router=router, capacity_factor=2.0, aux_loss_mode="manual")
    reference_layer = randomize_(reference_layer).eval().to(device)
    fast = moe_kernels.MoE.from_reference(copy.deepcopy(reference_layer), backend=backend)
    x = torch.randn(20, 8, device=device)
    poisoned = x.clone().requires_grad_()
    with torch.no_grad():
        poisoned[5] = float("nan")
        poisoned[9, 2] = float("inf")
    y = fast(poisoned)
    finite_rows = [row for row in range(20) if row not in (5, 9)]
    torch.testing.assert_close(y[finite_rows], reference_layer(x)[finite_rows], rtol=1e-5, atol=1e-6)
    assert not torch.isfinite(y[5]).any()
    y[finite_rows].sum().backward()
    assert torch.isfinite(poisoned.grad[finite_rows]).all()


def test_noisy_topk_with_k_equal_to_experts_has_finite_gradients():
    torch.manual_seed(8)
    layer = randomize_(moe_kernels.MoE(8, 6, 3, k=3, router="noisy_topk"))
    x = torch.randn(10, 8, requires_grad=True)
    layer(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_gradcheck_float64(router, capacity_factor):
    torch.manual_seed(11)
    k = 1 if router == "switch" else 2
    # aux_loss_mode "manual": the loss is an output with its own gradient ("attach" adds that gradient to every
    # backward of y, which gradcheck's Jacobian of y alone does not contain).
    layer = moe_kernels.MoE(6, 5, 4, k=k, router=router, capacity_factor=capacity_factor, backend="torch",
                            aux_loss_mode="manual")
    layer = randomize_(layer)
    layer = layer.double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    parameters = tuple(layer.parameters())

    def forward(x, *_):
        torch.manual_seed(0)
        return layer(x), layer.aux_loss

    assert torch.autograd.gradcheck(forward, (x,) + parameters, fast_mode=True)  # the full Jacobian: minutes in CI


def test_noise_is_the_first_random_draw():
    torch.manual_seed(5)
    layer = randomize_(reference.MoE(8, 6, 5, k=2, router="noisy_topk"))
    x = torch.randn(9, 8)
    torch.manual_seed(1)
    layer(x)
    first = layer.aux_loss
    torch.manual_seed(1)
    torch.randn(9, 5)  # the draw the layer would take: skipping it must change the result
    layer(x)
    assert not torch.equal(first, layer.aux_loss)
