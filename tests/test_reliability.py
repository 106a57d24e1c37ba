"""Issue 16's routing and layer items, one regression test each, on every backend that runs here; a seeded float64
fuzz of the fast layer against the reference; a mode sweep (grad on/off, inference_mode, autocast, compile).

Tolerances: float64 against float64 within 1e-10 relative (both compute the same sums in another order);
float32 mode sweep within 1e-5 (the same kernels, the same order, except autograd's accumulation).
"""
import copy
import random

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe_kernels
from helpers import BACKENDS, device_for, randomize_, skip_unless_runnable
from moe_kernels import reference, routers
from moe_kernels.activations import ACTIVATIONS


def pair(backend="torch", dtype=torch.float32, seed=0, **arguments):
    """(reference, fast) with the same parameters, on the backend's device."""
    torch.manual_seed(seed)
    base = randomize_(reference.MoE(**{"d_model": 8, "d_ff": 6, "num_experts": 4, **arguments}))
    base = base.to(device_for(backend), dtype)
    return base, moe_kernels.MoE.from_reference(copy.deepcopy(base), backend=backend)


# ---------------------------------------------------------------------------------------------- items 1-4


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch"])
def test_float64_without_gradients_frozen_router_and_jvp(router):
    """Item 1: float64 under no_grad, inference_mode, a frozen router and torch.func.jvp (backend "torch")."""
    k = 1 if router == "switch" else 2
    ref, fast = pair(dtype=torch.float64, k=k, router=router, capacity_factor=1.0)
    ref.eval(), fast.eval()
    x = torch.randn(9, 8, dtype=torch.float64)
    expected = ref(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, rtol=1e-10, atol=1e-12)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), expected, rtol=1e-10, atol=1e-12)
    fast.gate.requires_grad_(False)
    torch.testing.assert_close(fast(x), expected, rtol=1e-10, atol=1e-12)
    tangent = torch.randn_like(x)
    _, expected_tangent = torch.func.jvp(ref, (x,), (tangent,))
    y, y_tangent = torch.func.jvp(fast, (x,), (tangent,))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y_tangent, expected_tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch"])
def test_autocast_routes_in_float32(router, backend):
    """Item 2: under autocast the router computes in float32 (same experts), aux_loss stays float32, every
    backend and grad mode runs."""
    skip_unless_runnable(backend)
    k = 1 if router == "switch" else 2
    _, fast = pair(backend, k=k, router=router, capacity_factor=1.5)
    device = device_for(backend)
    x = torch.randn(20, 8, device=device)
    seen = []
    fast.gate.register_forward_hook(lambda module, inputs, routing: seen.append(routing))
    torch.manual_seed(1)
    expected = fast(x)
    for grad in (True, False):
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            torch.manual_seed(1)
            y = fast(x)
        assert fast.aux_loss.dtype == torch.float32
        assert seen[-1].logits.dtype == torch.float32 and torch.equal(seen[-1].experts, seen[0].experts)
        assert y.dtype == torch.bfloat16  # the experts compute in autocast's dtype
        if device.type == "cuda" or backend == "torch":  # the interpreter's bf16 tl.dot is wrong (helpers)
            torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_ranking_rule_in_every_grad_mode(backend):
    """Item 4: the issue's near-tie (probabilities 1, 0, 0, 0 in float32; logits 200, 0, 50, 10) routes to
    experts 0 and 2 with and without gradients, and capacity drops the same tokens."""
    skip_unless_runnable(backend)
    device = device_for(backend)
    layer = randomize_(moe_kernels.MoE(4, 6, 4, k=2, capacity_factor=1.0, backend=backend)).to(device)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[200.0, 0, 50, 10], [1, 0, 3, 4]], device=device)
    seen = []
    layer.gate.register_forward_hook(lambda module, inputs, routing: seen.append(routing.experts.tolist()))
    with_grad = layer(x.requires_grad_())
    with torch.no_grad():
        without = layer(x)
    assert seen[0] == seen[1] == [[0, 2], [3, 2]]
    torch.testing.assert_close(with_grad, without, rtol=0, atol=0)


# -------------------------------------------------------------------------- items 8, 15: the aux loss


def test_deepcopy_after_a_training_forward_and_ema():
    """Item 8: no graph on the module; deepcopy and AveragedModel (EMA) work after a training forward."""
    for mode in ("attach", "manual"):
        layer = moe_kernels.MoE(8, 6, 4, aux_loss_mode=mode)
        layer(torch.randn(5, 8, requires_grad=True)).sum().backward()
        assert layer.aux_loss is not None and layer.aux_loss.requires_grad == (mode == "manual")
        copied = copy.deepcopy(layer)
        torch.testing.assert_close(copied.aux_loss, layer.aux_loss.detach())
        assert not copied.aux_loss.requires_grad
        torch.optim.swa_utils.AveragedModel(layer).update_parameters(layer)


def test_the_output_is_an_ordinary_tensor():
    """The aux loss's gradient rides on the routing weights, not on y: y may be modified in place."""
    layer = moe_kernels.MoE(8, 6, 4)
    y = layer(torch.randn(5, 8, requires_grad=True))
    y += 1.0
    y.sum().backward()
    assert layer.gate.weight.grad is not None


def test_aux_loss_only_when_it_can_matter():
    layer = moe_kernels.MoE(8, 6, 4)
    x = torch.randn(5, 8)
    with torch.no_grad():
        layer(x)
        assert layer.aux_loss is not None  # training mode: still computed (reentrant checkpointing needs it)
        layer.eval()
        layer(x)
        assert layer.aux_loss is None
    layer(x)
    assert layer.aux_loss is not None  # evaluation with gradients: it can matter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_keeps_the_aux_loss_gradient(use_reentrant, backend):
    """Item 15: "attach" (the default) gives the router the aux loss's gradient through checkpointing too."""
    skip_unless_runnable(backend)
    device = device_for(backend)
    _, layer = pair(backend, router="noisy_topk", importance_loss_weight=1.0, load_loss_weight=1.0)
    x = torch.randn(30, 8, device=device, requires_grad=True)
    torch.manual_seed(3)
    (layer(x).sum() + layer.aux_loss).backward()  # adding the detached value changes no gradient
    expected = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad(), x.grad.zero_()
    torch.manual_seed(3)
    checkpoint(layer, x, use_reentrant=use_reentrant, preserve_rng_state=True).sum().backward()
    for got, want in zip([p.grad for p in layer.parameters()] + [x.grad], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    manual = moe_kernels.MoE.from_reference(layer, backend)  # same parameters
    manual.aux_loss_mode = "manual"
    manual.zero_grad(), x.grad.zero_()
    torch.manual_seed(3)
    (manual(x).sum() + manual.aux_loss).backward()
    for got, want in zip([p.grad for p in manual.parameters()] + [x.grad], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- items 9, 11: capacity


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_with_capacity_keeps_one_graph_for_dynamic_token_counts(backend):
    """Item 9: capacity is one expression of the symbolic T: no recompile over 9 distinct capacities."""
    skip_unless_runnable(backend)
    torch._dynamo.reset()
    device = device_for(backend)
    _, layer = pair(backend, capacity_factor=1.25)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for num_tokens in (5, 6, 9, 13, 17, 22, 30, 41, 64):
            x = torch.randn(num_tokens, 8, device=device)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_has_one_meaning_everywhere(backend):
    """Item 11: a tiny factor keeps one assignment per expert (never 0 = dropless); capacity is at most T·k;
    experts_forward's capacity 0 drops everything; the same on every backend as in the reference."""
    skip_unless_runnable(backend)
    device = device_for(backend)
    assert moe_kernels.pipeline.expert_capacity(1e-300, 10, 2, 4) == 1
    assert moe_kernels.pipeline.expert_capacity(1e300, 10, 2, 4) == 20
    assert moe_kernels.pipeline.expert_capacity(1.1, 100, 1, 11) == 10  # 1.1 read as 11/10, not 1.1000000000000000888
    for factor in (1e-300, 1e300):
        ref, fast = pair(backend, capacity_factor=factor)
        x = torch.randn(10, 8, device=device)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-6)
    x, weights = torch.randn(10, 8, device=device), torch.rand(10, 2, device=device)
    experts = torch.randint(0, 4, (10, 2), device=device, dtype=torch.int32)
    up, down = torch.randn(4, 12, 8, device=device), torch.randn(4, 8, 6, device=device)
    y = moe_kernels.experts_forward(x, weights, experts, up, down, capacity=0, backend=backend)
    assert torch.equal(y, torch.zeros_like(y))


# --------------------------------------------------------------------------------- fuzz and mode sweep


def fuzz_case(seed):
    """A random layer configuration and input shape, drawn from ``seed``."""
    rng = random.Random(seed)
    router = rng.choice(sorted(routers.ROUTERS))
    num_experts = rng.choice([1, 2, 3, 5, 8, 16])
    k = 1 if router == "switch" else rng.randint(1, num_experts)
    arguments = dict(d_model=rng.randint(1, 12), d_ff=rng.randint(1, 10), num_experts=num_experts, k=k, router=router,
                     activation=rng.choice(ACTIVATIONS))
    capacity = "none" if router == "expert_choice" else rng.choice(["none", "factor", "sequence", "both"])
    if capacity in ("factor", "both"):
        arguments["capacity_factor"] = rng.choice([0.3, 0.75, 1.0, 1.25, 2.0])
    if capacity in ("sequence", "both"):
        arguments["expert_capacity"] = rng.randint(1, 4)
    if router == "topk":
        arguments["renormalize"] = rng.random() < 0.5
    shape = rng.choice([(0,), (1,), (rng.randint(2, 40),), (rng.randint(1, 3), rng.randint(1, 9))])
    return arguments, shape, rng.random() < 0.7


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_float64_against_the_reference(seed):
    arguments, shape, training = fuzz_case(seed)
    ref, fast = pair(dtype=torch.float64, seed=seed, **arguments)
    ref.train(training), fast.train(training)
    x = torch.randn(*shape, arguments["d_model"], dtype=torch.float64)
    dy = torch.randn_like(x)
    results = []
    for layer in (ref, fast):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(seed)
        y = layer(leaf)
        inputs = [leaf, *layer.parameters()]
        # The reference's loop builds no graph when no expert gets a token (T = 0): every gradient is zero.
        grads = torch.autograd.grad((y * dy).sum(), inputs, allow_unused=True) if y.requires_grad else [None] * len(inputs)
        results.append((y, layer.aux_loss, *[torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{arguments} {shape}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", sorted(routers.ROUTERS))
def test_mode_sweep_gives_one_answer(router, backend):
    """Grad on/off, inference_mode, autocast (float32 x, routing unchanged) and torch.compile: the same y in
    evaluation mode (no random draw)."""
    skip_unless_runnable(backend)
    device = device_for(backend)
    k = 1 if router == "switch" else 2
    capacity_factor = None if routers.ROUTERS[router].chooses_tokens else 1.0
    _, layer = pair(backend, k=k, router=router, capacity_factor=capacity_factor)
    layer.eval()
    x = torch.randn(3, 7, 8, device=device, requires_grad=True)
    expected = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=backend == "torch"):
        torch.testing.assert_close(layer(x).float(), expected, rtol=0.05, atol=0.05)
