"""Per-stage microbenchmarks (pytest-benchmark): route (the layer's router), permute, expert_up, expert_down_combine.

    python3 -m pytest bench/test_microbench.py --benchmark-columns=median,iqr,min,rounds [-k permute]

Not part of the CI test suite (that is tests/). Two families, each stage timed alone on inputs made by the
same backend's earlier stages:
- ``test_stage``: the stages of every backend through the pipeline seam (``moe_kernels.backends``):
  "torch" on any device, "triton" on CUDA only (its router runs its fused kernel); a backend that does
  not import is skipped with its ImportError.
- ``test_launcher``: the Triton launchers of ``moe_kernels/kernels/`` called directly (CUDA only),
  skipped with the reason when a kernel module or launcher is not there.
Shapes: the issue-2 CPU layers at T=256 on the CPU, Mixtral-8x7B and Qwen3-30B-A3B at T=4096 on CUDA
(float32 / bfloat16). Times are in the pytest-benchmark table (seconds, with its own unit prefix).
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

from moe_kernels.activations import resolve as resolve_activation
from moe_kernels.backends import BACKENDS, resolve
from moe_kernels.pipeline import expert_capacity

from .configs import CPU_CONFIGS, GPU_CONFIGS, BenchConfig
from .inputs import build_reference, make_tokens

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
NUM_TOKENS = 4096 if DEVICE.type == "cuda" else 256
CONFIGS = GPU_CONFIGS[:2] if DEVICE.type == "cuda" else CPU_CONFIGS[:3]
STAGES = ("route", "permute", "expert_up", "expert_down_combine")
# (kernel module in moe_kernels/kernels, launcher) per stage, as the Triton branches name them.
LAUNCHERS = {
    "route": ("gating", "softmax_top_k_forward"),
    "permute": ("permute", "permute"),
    "expert_up": ("grouped_gemm", "expert_up_forward"),
    "expert_down_combine": ("grouped_gemm", "expert_down_combine_forward"),
}

if DEVICE.type == "cpu":
    torch.set_num_threads(1)  # see bench/run.py --threads: a shared machine stalls multi-threaded runs


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


@functools.lru_cache(maxsize=None)  # one layer per (config, backend) serves its four stages
def _stage_inputs(config: BenchConfig, backend: str) -> dict:
    """Each stage's arguments, made by the earlier stages of ``backend``."""
    stages = resolve(backend, DEVICE, DTYPE)
    layer = build_reference(config, "uniform", DEVICE, DTYPE)
    tokens = make_tokens(config, "uniform", NUM_TOKENS, DEVICE, DTYPE)[0]
    capacity = expert_capacity(config.capacity_factor, NUM_TOKENS, config.k, config.num_experts)
    activation = resolve_activation(config.activation)
    with torch.no_grad():
        routing = layer.gate(tokens, use_kernel=stages.fused_routing)
        permutation = stages.permute(routing.experts, config.num_experts, capacity)
        hidden = stages.expert_up(tokens, layer.experts.up_weight, None, permutation, activation)
    return {
        "route": (tokens, stages.fused_routing),
        "permute": (routing.experts, config.num_experts, capacity),
        "expert_up": (tokens, layer.experts.up_weight, None, permutation, activation),
        "expert_down_combine": (hidden, layer.experts.down_proj, None, permutation, routing.weights),
    }


def _router(config: BenchConfig, backend: str):
    """The router of the layer the stage inputs come from, called as the layer calls it."""
    gate = build_reference(config, "uniform", DEVICE, DTYPE).gate
    return lambda tokens, use_kernel: gate(tokens, use_kernel=use_kernel)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stage(benchmark, backend, stage, config):
    try:
        stages = resolve(backend, DEVICE, DTYPE)
    except ImportError as error:
        pytest.skip(f"backend {backend!r} not installed: {error}")
    except ValueError as error:  # installed, but not for this device
        pytest.skip(str(error))
    arguments = _stage_inputs(config, backend)[stage]
    function = _router(config, backend) if stage == "route" else getattr(stages, stage)
    with torch.no_grad():
        benchmark(_synchronized(lambda: function(*arguments)))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("stage", STAGES)
def test_launcher(benchmark, stage, config):
    if DEVICE.type != "cuda":
        pytest.skip("Triton launchers need a CUDA device")
    module_name, launcher_name = LAUNCHERS[stage]
    try:
        module = importlib.import_module(f"moe_kernels.kernels.{module_name}")
    except ImportError as error:
        pytest.skip(f"moe_kernels.kernels.{module_name} not importable: {error}")
    launcher = getattr(module, launcher_name, None)
    if launcher is None:
        pytest.skip(f"moe_kernels.kernels.{module_name} has no {launcher_name}")
    try:
        arguments = _stage_inputs(config, "triton")[stage]  # its earlier stages make the kernels' layout
    except ImportError as error:
        pytest.skip(f"backend 'triton' not installed, needed for the kernels' input layout: {error}")
    if stage == "route":
        if config.router not in ("topk", "switch"):
            pytest.skip(f"router {config.router!r} has no fused kernel")
        gate = build_reference(config, "uniform", DEVICE, DTYPE).gate
        with torch.no_grad():
            logits = gate(make_tokens(config, "uniform", NUM_TOKENS, DEVICE, DTYPE)[0]).logits
        arguments = (logits, config.k, gate.renormalize)
    elif stage == "permute":
        block_m = importlib.import_module("moe_kernels.kernels.tiles").block_m_for(NUM_TOKENS, config.k, config.num_experts)
        arguments = (*arguments, block_m)
    elif stage in ("expert_up", "expert_down_combine"):
        arguments = tuple(argument for argument in arguments if argument is not None)  # the launchers take no bias
    with torch.no_grad():
        benchmark(_synchronized(lambda: launcher(*arguments)))
