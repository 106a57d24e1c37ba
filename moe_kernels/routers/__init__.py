"""Routers as plug-ins: one file per router family, registered by name in ``ROUTERS``.

How a router is called
    ``router = build("topk", d_model, num_experts, k, **options)`` is an ``nn.Module`` (the layer's ``gate``)
    holding its parameters (``weight`` [E, d], and whatever else it needs), buffers and options.
    ``routing = router(x, use_kernel=None)`` takes the tokens x [T, d] of any float dtype and computes in
    float32 whatever autocast says (float64 for float64 x). ``use_kernel`` lets a router with fused kernels use
    them (the layer passes its backend's ``fused_routing``): "triton" (backend "triton"), "cpu" (the C++ kernels
    of moe_kernels._C, backend "torch" on the CPU when built; forward only, so only where no gradient is
    recorded, the definition elsewhere); every kernel reproduces the PyTorch definition.
    Random draws (noise, jitter) happen only in training, on x's device, first thing in the forward.

What it returns (``Routing``, fields documented in base.py)
    ``logits`` [T, E], ``weights`` [T, S] float32, ``experts`` [T, S] int32, ``aux_loss`` (a scalar, or None in
    evaluation mode with gradients off, where it cannot matter), and for expert-choice routers
    ``expert_tokens`` [E, C]. Nothing after the router knows which router it was: the permute stage groups the
    assignments by expert (or, for ``expert_tokens``, the pipeline lays out the experts' choices), the expert
    GEMMs and the combine read the weights.

The one ranking rule
    Experts are selected on the router's selection scores computed exactly (for softmax routers: the logits,
    softmax being monotone), ties to the lower expert id (``base.top_k``); weights are computed after selection.

How to add a router
    1. ``routers/<family>.py``: a subclass of ``base.Router`` whose constructor takes ``(d_model, num_experts,
       k)`` and keyword-only options (validated with ``moe_kernels.checks``, kept as attributes of the same
       name) and whose ``forward(x, use_kernel=None)`` returns a ``Routing``; its losses beside it (shared
       ones in ``losses.py``). The module docstring states the definition and the model it is faithful to.
    2. ``tests/routers/test_router_<family>.py``: the router against a float64 formula written out independently
       (forward, gradients, losses), and the layer against the reference loop with it.
    3. One line in ``ROUTERS`` below.
"""
from __future__ import annotations

from .base import Router, Routing, top_k
from .deepseek import DeepSeek
from .expert_choice import ExpertChoice
from .noisy_topk import NoisyTopK
from .softmax_topk import SoftmaxTopK
from .switch import Switch

ROUTERS: dict[str, type[Router]] = {
    "topk": SoftmaxTopK,
    "noisy_topk": NoisyTopK,
    "switch": Switch,
    "expert_choice": ExpertChoice,
    "deepseek": DeepSeek,
}


def build(name: str, d_model: int, num_experts: int, k: int, *, device=None, dtype=None, **options) -> Router:
    """The router registered as ``name``, with its options; errors name the router and the option."""
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {name!r}")
    router_class = ROUTERS[name]
    unknown = sorted(set(options) - set(router_class.option_names()))
    if unknown:
        raise TypeError(
            f"router {name!r} takes no option {unknown[0]!r}; its options are {router_class.option_names()}"
        )
    return router_class(d_model, num_experts, k, device=device, dtype=dtype, **options)


__all__ = ["ROUTERS", "Router", "Routing", "build", "top_k"]
