"""Training behaviour of the fast layer on every backend that runs here: gradients accumulate across
backward calls, retain_graph works, inputs or parameters that do not require grad are left alone, and
dropped assignments and unused experts get exact zeros."""
import copy

import pytest
import torch

import moe_kernels
from helpers import BACKENDS, device_for, randomize_, skip_unless_runnable
from moe_kernels import reference


def fast_layer(backend, **arguments):
    skip_unless_runnable(backend)
    torch.manual_seed(21)
    layer = randomize_(moe_kernels.MoE(**{"d_model": 12, "d_ff": 10, "num_experts": 6, "k": 2, **arguments}, backend=backend))
    return layer.to(device_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_accumulate_over_two_backward_calls(backend):
    layer = fast_layer(backend, router="noisy_topk")
    x = torch.randn(30, 12, device=device_for(backend), requires_grad=True)
    torch.manual_seed(0)
    (layer(x).square().sum() + layer.aux_loss).backward()
    once = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    torch.manual_seed(0)
    (layer(x).square().sum() + layer.aux_loss).backward()
    twice = [p.grad for p in layer.parameters()] + [x.grad]
    for a, b in zip(once, twice):
        torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_gives_the_same_gradient_twice(backend):
    layer = fast_layer(backend, capacity_factor=1.0)
    x = torch.randn(25, 12, device=device_for(backend), requires_grad=True)
    loss = layer(x).square().sum() + layer.aux_loss
    first = torch.autograd.grad(loss, [x, layer.experts.down_proj], retain_graph=True)
    second = torch.autograd.grad(loss, [x, layer.experts.down_proj])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_without_grad_and_frozen_router(backend):
    layer = fast_layer(backend)
    layer.gate.weight.requires_grad_(False)
    x = torch.randn(15, 12, device=device_for(backend))
    layer(x).sum().backward()
    assert layer.gate.weight.grad is None and x.grad is None
    assert layer.experts.gate_up_proj.grad is not None and torch.isfinite(layer.experts.gate_up_proj.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_matches_grad_forward(backend):
    layer = fast_layer(backend, router="switch", k=1, activation="relu", capacity_factor=1.0)
    x = torch.randn(40, 12, device=device_for(backend))
    with torch.no_grad():
        without = layer(x)
    torch.testing.assert_close(layer(x), without, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_experts_and_dropped_assignments_get_exact_zeros(backend):
    skip_unless_runnable(backend)
    torch.manual_seed(4)
    device = device_for(backend)
    # "manual": the aux loss's gradient (which reaches every token through the router) stays out.
    base = reference.MoE(12, 10, 6, k=1, router="switch", activation="relu", capacity_factor=0.5, aux_loss_mode="manual")
    base = randomize_(base, skew=True).to(device)
    layer = moe_kernels.MoE.from_reference(copy.deepcopy(base), backend=backend)
    x = (torch.randn(16, 12, device=device) + 3.0 * base.gate.weight[0].sign()).detach().requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    # Expert 0 takes every token, keeps its capacity ceil(0.5·16/6) = 2 and drops the other 14.
    dropped = (y == 0).all(-1)
    assert int(dropped.sum()) == 14
    assert (layer.experts.up_proj.grad[1:] == 0).all() and (layer.experts.down_proj.grad[1:] == 0).all()
    assert (x.grad[dropped] == 0).all() and (x.grad[~dropped] != 0).any()
