"""Door 2: ``moe_kernels.swap(model)`` replaces whole Hugging Face MoE blocks (router + experts) by ``moe_kernels.MoE``.

Supported blocks (transformers 5.x), each read from the block's own modules (which carry its config):

- Mixtral (``MixtralSparseMoeBlock``): router "topk", renormalised; ``router_jitter_noise`` > 0 is refused (it
  multiplies the whole block input, experts included, which no moe_kernels router does);
- Qwen2-MoE, Qwen3-MoE, OLMoE: router "topk" with ``renormalize=norm_topk_prob``; Qwen2-MoE's shared expert scaled
  by sigmoid(``shared_expert_gate``);
- DeepSeek-V3 (``DeepseekV3MoE``): router "deepseek" (sigmoid scores, ``e_score_correction_bias``, ``n_group`` /
  ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``) and the shared experts;
- GPT-OSS (``GptOssMLP``): router "topk" with its bias, renormalised; experts stored transposed with biases, gate and
  up interleaved, clamped SwiGLU. The block returns ``(hidden_states, None)`` where Hugging Face's returns
  ``(hidden_states, router_scores)`` (its decoder layer drops the second);
- SwitchTransformers (``SwitchTransformersSparseMLP``): router "switch" (``router_jitter_noise``, ``router_bias``),
  ``expert_capacity`` per sequence. ``router_dtype`` other than float32 is refused.

What the swapped block shares and keeps:
- The very Parameter objects and buffers of the router, the experts (transformers' ``@use_experts_implementation``
  modules, read through ``TransformersExperts``) and the shared expert, except SwitchTransformers' experts: one
  ``nn.Linear`` pair per expert (an ``nn.ModuleDict``) cannot be viewed as the stacked [E, ., .] weights the expert
  GEMMs read, so the swapped block holds stacked copies (an optimizer must be built after the swap), and its
  state-dict hooks write and read Hugging Face's per-expert keys.
- State-dict keys: Hugging Face's, through ``keys.install`` where our names differ (GPT-OSS's ``router``,
  SwitchTransformers' ``router.classifier`` and per-expert keys): save_pretrained / from_pretrained round trip.
- ``output_router_logits`` and Hugging Face's own aux loss: the model records router logits with forward hooks on
  its router class; a swapped block hands its router's logits (float32) to the same recorder. The swapped layer
  computes no aux loss of its own (its router's loss weights are 0), so the model's loss is Hugging Face's.
SwitchTransformers' expert dropout (``dropout_rate``, inside each expert) is not applied by the swapped experts: a
warning says so when it is non-zero (the same in evaluation mode).
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from transformers.utils.output_capturing import _active_collector

from ...activations import Activation
from ...modules import Experts
from ...routers import ROUTERS
from . import keys
from .experts import _FUNCTIONS, describe, expert_layout

RECORDED = "router_logits"  # the key of transformers' output recorder (``_can_record_outputs``) for router logits


class TransformersExperts(nn.Module):
    """A transformers experts module's own Parameters under their own names, read by the layer as
    ``up_weight`` [E, N, d], ``up_bias`` [E, N] | None, ``down_weight`` [E, d, d_ff], ``down_bias`` [E, d] | None
    (``.transpose(1, 2)`` views of transposed layouts, never copies). Door 1's ``expert_layout`` validates the
    module's flags and gives the activation."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.activation = expert_layout(module).activation
        for name, parameter in module.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        self.up_name = "gate_up_proj" if module.has_gate else "up_proj"
        self.transposed = module.is_transposed
        self.has_bias = module.has_bias

    def _view(self, weight: Tensor) -> Tensor:
        return weight.transpose(1, 2) if self.transposed else weight

    @property
    def up_weight(self) -> Tensor:
        return self._view(getattr(self, self.up_name))

    @property
    def up_bias(self) -> Tensor | None:
        return getattr(self, f"{self.up_name}_bias") if self.has_bias else None

    @property
    def down_weight(self) -> Tensor:
        return self._view(self.down_proj)

    @property
    def down_bias(self) -> Tensor | None:
        return self.down_proj_bias if self.has_bias else None


class Plan(NamedTuple):
    """How to build the moe_kernels layer of one Hugging Face block."""

    router: str
    """The router's name in ``moe_kernels.routers.ROUTERS``."""
    k: int
    router_options: dict
    """The router's options, its loss weights left out (set to 0: the model computes its own aux loss)."""
    experts: nn.Module
    """The layer's ``experts`` child: a module with up_weight / up_bias / down_weight / down_bias."""
    activation: Activation
    shared: str | None
    """The block's shared-expert child, if any ("shared_expert" gated by ``shared_expert_gate``, or "shared_experts")."""
    names: dict[str, str]
    """Our name → the block's name of each router Parameter and buffer."""
    splits: tuple[keys.Split, ...] = ()
    """Stacked copies of per-expert Parameters (SwitchTransformers) and their Hugging Face keys."""
    expert_capacity: int | None = None
    returns_pair: bool = False
    """The block returns (hidden_states, router_scores) (GPT-OSS): the swapped one returns (hidden_states, None)."""
    logits_per_sequence: bool = False
    """The model records router logits shaped like the block input, [..., E] (SwitchTransformers), not [T, E]."""


def _refuse(block: nn.Module, what: str) -> NotImplementedError:
    return NotImplementedError(f"moe_kernels.swap cannot replace {describe(block)} exactly: {what}")


def _topk(block: nn.Module, renormalize: bool, shared: str | None = None) -> Plan:
    experts = TransformersExperts(block.experts)
    return Plan("topk", block.gate.top_k, dict(renormalize=bool(renormalize)), experts, experts.activation, shared,
                {"gate.weight": "gate.weight"})


def _mixtral(block: nn.Module) -> Plan:
    if block.jitter_noise:
        raise _refuse(block, f"router_jitter_noise={block.jitter_noise} multiplies the whole block input (router and "
                             f"experts); moe_kernels' 'switch' router jitters the router's input only")
    return _topk(block, renormalize=True)


def _qwen2_moe(block: nn.Module) -> Plan:
    return _topk(block, block.gate.norm_topk_prob, shared="shared_expert")


def _norm_topk_prob(block: nn.Module) -> Plan:
    return _topk(block, block.gate.norm_topk_prob)


def _deepseek_v3(block: nn.Module) -> Plan:
    gate = block.gate
    options = dict(scoring="sigmoid", correction_bias=True, n_group=gate.num_group, topk_group=gate.topk_group,
                   group_score="top2_sum", renormalize=bool(gate.norm_topk_prob),
                   routed_scaling_factor=gate.routed_scaling_factor)
    experts = TransformersExperts(block.experts)
    names = {"gate.weight": "gate.weight", "gate.e_score_correction_bias": "gate.e_score_correction_bias"}
    return Plan("deepseek", gate.top_k, options, experts, experts.activation, "shared_experts", names)


def _gpt_oss(block: nn.Module) -> Plan:
    experts = TransformersExperts(block.experts)
    names = {"gate.weight": "router.weight", "gate.bias": "router.bias"}
    return Plan("topk", block.router.top_k, dict(renormalize=True, bias=True), experts, experts.activation, None, names,
                returns_pair=True)


def _switch_transformers(block: nn.Module) -> Plan:
    router = block.router
    if router.dtype != torch.float32:
        raise _refuse(block, f"router_dtype={router.dtype} (moe_kernels' routers compute in float32)")
    per_expert = list(block.experts.values())
    function = _FUNCTIONS.get(type(per_expert[0].act))
    if function is None:
        raise _refuse(block, f"the activation {type(per_expert[0].act).__name__} (dense_act_fn)")
    if per_expert[0].dropout.p > 0:
        warnings.warn(f"moe_kernels.swap: the experts of {describe(block)} apply no dropout (dropout_rate="
                      f"{per_expert[0].dropout.p} inside each Hugging Face expert); evaluation is unchanged")
    up = torch.stack([expert.wi.weight.detach() for expert in per_expert])  # [E, d_ff, d]
    experts = Experts(up.shape[2], up.shape[1], len(per_expert), gated=False, bias=False, device="meta")
    experts.up_proj = nn.Parameter(up, requires_grad=per_expert[0].wi.weight.requires_grad)
    experts.down_proj = nn.Parameter(torch.stack([expert.wo.weight.detach() for expert in per_expert]),
                                     requires_grad=per_expert[0].wo.weight.requires_grad)
    names = {"gate.weight": "router.classifier.weight"}
    if router.classifier.bias is not None:
        names["gate.bias"] = "router.classifier.bias"
    splits = (keys.Split("experts.up_proj", "experts.expert_{}.wi.weight", len(per_expert)),
              keys.Split("experts.down_proj", "experts.expert_{}.wo.weight", len(per_expert)))
    options = dict(jitter_noise=float(router.jitter_noise), bias=router.classifier.bias is not None)
    return Plan("switch", 1, options, experts, Activation(function, gated=False), None, names, splits,
                expert_capacity=router.expert_capacity, logits_per_sequence=True)


# Hugging Face block classes swap replaces, by module and qualified name.
PLANS: dict[str, Callable[[nn.Module], Plan]] = {
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock": _mixtral,
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock": _qwen2_moe,
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock": _norm_topk_prob,
    "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock": _norm_topk_prob,
    "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE": _deepseek_v3,
    "transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP": _gpt_oss,
    "transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersSparseMLP":
        _switch_transformers,
}


def swap_block(block: nn.Module, backend: str, layer_class: type[nn.Module]) -> nn.Module | None:
    """The moe_kernels layer (a ``layer_class``, the fast ``moe_kernels.MoE`` that swap passes in: this module
    builds on the layer, the layer does not import it) that replaces ``block``, sharing its Parameters, keeping
    its state-dict keys and handing its router logits to the model's recorder; None when ``block``'s class is not
    one swap knows."""
    plan_of = PLANS.get(f"{type(block).__module__}.{type(block).__qualname__}")
    if plan_of is None:
        return None
    plan = plan_of(block)
    shared = None if plan.shared is None else getattr(block, plan.shared)
    if shared is not None and _FUNCTIONS.get(type(shared.act_fn)) != plan.activation.function:
        raise _refuse(block, f"its shared expert's activation {type(shared.act_fn).__name__} differs from the experts'")
    up_weight = plan.experts.up_weight
    no_loss = {name: 0.0 for name in ROUTERS[plan.router].option_names() if name.endswith("_loss_weight")}
    layer = layer_class(
        up_weight.shape[2], up_weight.shape[1] // plan.activation.up_width(1), up_weight.shape[0], plan.k, router=plan.router, activation=plan.activation,
        expert_capacity=plan.expert_capacity, expert_bias=plan.experts.down_bias is not None,
        shared_d_ff=None if shared is None else shared.down_proj.weight.shape[1],
        shared_expert_gate=plan.shared == "shared_expert", backend=backend, device="meta",
        **plan.router_options, **no_loss,
    )  # fmt: skip
    names = dict(plan.names)
    if shared is not None:
        names.update({f"{plan.shared}.{name}": f"{plan.shared}.{name}" for name, _ in shared.named_parameters()})
        if plan.shared == "shared_expert":
            names["shared_expert_gate.weight"] = "shared_expert_gate.weight"
    for ours, theirs in names.items():
        owner, _, attribute = ours.rpartition(".")
        setattr(layer.get_submodule(owner), attribute, _tensor(block, theirs))
    layer.experts = plan.experts
    layer.train(block.training)
    renames = [keys.Rename(ours, theirs) for ours, theirs in names.items() if ours != theirs]
    if renames or plan.splits:
        keys.install(layer, [*renames, *plan.splits])
    _record_router_logits(layer, plan.logits_per_sequence)
    if plan.returns_pair:
        layer.register_forward_hook(lambda module, args, output: (output, None))
    return layer


def _tensor(block: nn.Module, name: str) -> Tensor:
    """The block's Parameter or buffer ``name``."""
    owner, _, attribute = name.rpartition(".")
    return getattr(block.get_submodule(owner), attribute)


def _record_router_logits(layer: nn.Module, per_sequence: bool) -> None:
    """Hand the logits [T, E] of each call of ``layer.gate`` (or [..., E] shaped like the layer's input, with
    ``per_sequence``) to transformers' output recorder when the model is recording router logits, as the hooks
    that transformers puts on its own router classes do."""
    leading: list[torch.Size] = []

    def remember_shape(module, args):
        leading[:] = [args[0].shape[:-1]]

    def record(gate, args, routing):
        collected = _active_collector.get()
        if collected is None or RECORDED not in collected:
            return
        logits = routing.logits
        collected[RECORDED].append(logits.view(*leading[0], logits.shape[-1]) if per_sequence else logits)

    if per_sequence:
        layer.register_forward_pre_hook(remember_shape)
    layer.gate.register_forward_hook(record)
