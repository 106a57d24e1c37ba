"""Door 1: an experts module of transformers (the ``@use_experts_implementation`` classes) as
``moe_kernels.experts_forward`` arguments, honouring the module's layout flags or refusing them by name.

transformers calls an experts implementation as ``fn(module, hidden_states [T, d], top_k_index [T, k],
top_k_weights [T, k]) -> [T, d]`` after the model's own router has run. The module describes its layout
with flags set by the decorator:

- ``has_gate``: ``gate_up_proj`` [E, 2·d_ff, d] and a gated activation, else ``up_proj`` [E, d_ff, d];
- ``is_transposed``: the weights are stored [E, d_in, d_out] (GPT-OSS) — read as ``.transpose(1, 2)``
  views, never copied;
- ``is_concatenated``: gate columns then up columns, else interleaved (GPT-OSS);
- ``has_bias``: ``gate_up_proj_bias`` / ``up_proj_bias`` [E, N] and ``down_proj_bias`` [E, d];
- ``has_post_expert_norm`` and ``_is_expert_parallel``: not supported (refused with the flag's name).

The activation comes from the module's ``_apply_gate`` (transformers' default: ``act_fn(gate) * up``
with ``act_fn`` SiLU, exact GELU or ReLU; or a gate listed in ``_CUSTOM_GATES``) or, without a gate,
from ``act_fn``. Anything else is refused with an error that names the module class and the model type.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn
from transformers.activations import GELUActivation, SiLUActivation
from transformers.integrations.moe import _default_apply_gate

from ...activations import Activation
from ...functional import experts_forward

# act_fn classes by exact type (GELUTanh, QuickGELU, ... are other functions, not these).
_FUNCTIONS = {nn.SiLU: "silu", SiLUActivation: "silu", GELUActivation: "gelu", nn.ReLU: "relu"}


def _clamped_swiglu(module: nn.Module, interleaved: bool) -> Activation:
    """GPT-OSS's gate: gate clamped above at limit, up to ±limit, gate·σ(alpha·gate)·(up + 1)."""
    return Activation("silu", gated=True, alpha=float(module.alpha), limit=float(module.limit), up_offset=1.0,
                      interleaved=interleaved)


# Model-specific ``_apply_gate`` methods that moe_kernels reproduces, by where they are defined, with the
# gate/up layout each one reads (checked against the module's is_concatenated flag).
_CUSTOM_GATES: dict[str, tuple[bool, Callable[[nn.Module, bool], Activation]]] = {
    "transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts._apply_gate": (True, _clamped_swiglu),
    "transformers.models.openai_privacy_filter.modeling_openai_privacy_filter.OpenAIPrivacyFilterExperts._apply_gate":
        (False, _clamped_swiglu),
}


class ExpertLayout(NamedTuple):
    """An experts module's parameters as ``experts_forward`` takes them (views of the module's Parameters).

    up_weight: [E, 2·d_ff, d] (gated) or [E, d_ff, d]; down_weight: [E, d, d_ff]; up_bias: [E, N] or None;
    down_bias: [E, d] or None; activation: what the module applies between the two projections.
    """

    up_weight: Tensor
    down_weight: Tensor
    up_bias: Tensor | None
    down_bias: Tensor | None
    activation: Activation


def describe(module: nn.Module) -> str:
    """The module's class and its model's type, for error messages."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return f"{type(module).__name__} (model_type {model_type!r})"


def _refuse(module: nn.Module, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"experts implementation 'moe_kernels' does not support {what} of {describe(module)}; "
        f"use experts_implementation='eager' or 'grouped_mm' for this model"
    )


def _activation(module: nn.Module) -> Activation:
    gate = type(module)._apply_gate if module.has_gate else None
    if gate is not None and gate is not _default_apply_gate:
        where = f"{gate.__module__}.{gate.__qualname__}"
        if where not in _CUSTOM_GATES:
            raise _refuse(module, f"the custom _apply_gate {gate.__qualname__}")
        interleaved, build = _CUSTOM_GATES[where]
        if interleaved == module.is_concatenated:
            raise _refuse(module, f"is_concatenated={module.is_concatenated} with {gate.__qualname__}")
        return build(module, interleaved)
    if module.has_gate and not module.is_concatenated:
        raise _refuse(module, "is_concatenated=False with transformers' default _apply_gate (which splits in halves)")
    function = _FUNCTIONS.get(type(module.act_fn))
    if function is None:
        raise _refuse(module, f"the activation {type(module.act_fn).__name__} (act_fn)")
    return Activation(function, gated=module.has_gate)


def expert_layout(module: nn.Module) -> ExpertLayout:
    """The ``experts_forward`` arguments of a ``@use_experts_implementation`` experts module.

    Raises NotImplementedError naming the flag (or the activation) and the model when moe_kernels cannot
    compute this module's experts exactly.
    """
    if module.has_post_expert_norm:
        raise _refuse(module, "has_post_expert_norm=True (a norm between the down projection and the weighting)")
    if module._is_expert_parallel:
        raise _refuse(module, "_is_expert_parallel=True (transformers' expert-parallel sentinels)")
    activation = _activation(module)
    up_weight = module.gate_up_proj if module.has_gate else module.up_proj
    down_weight = module.down_proj
    if module.is_transposed:  # stored [E, d_in, d_out]: a stride, not a copy
        up_weight, down_weight = up_weight.transpose(1, 2), down_weight.transpose(1, 2)
    up_bias = down_bias = None
    if module.has_bias:
        up_bias = module.gate_up_proj_bias if module.has_gate else module.up_proj_bias
        down_bias = module.down_proj_bias
    return ExpertLayout(up_weight, down_weight, up_bias, down_bias, activation)


def experts_function(backend: str = "auto") -> Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]:
    """The ExpertsInterface function that runs a module's experts by moe_kernels' ``backend``."""

    def moe_kernels_experts(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states [T, d], top_k_index [T, k] int, top_k_weights [T, k] float → [T, d] in hidden_states' dtype."""
        layout = expert_layout(module)
        return experts_forward(
            hidden_states, top_k_weights, top_k_index, layout.up_weight, layout.down_weight,
            activation=layout.activation, up_bias=layout.up_bias, down_bias=layout.down_bias, backend=backend,
        )

    moe_kernels_experts.moe_kernels_backend = backend
    return moe_kernels_experts
