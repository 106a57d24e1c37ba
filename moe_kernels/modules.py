"""What the reference and the fast layer share: parameters (Hugging Face's MoE layout), validation, the forward.

Parameter names and shapes, so that Hugging Face state dicts load unchanged:
- ``gate``: the router (``moe_kernels.routers``): ``gate.weight`` [E, d], plus what the router has
  (``gate.bias`` [E], ``gate.noise_weight`` [E, d], buffers such as ``gate.e_score_correction_bias``);
- ``experts.gate_up_proj`` [E, 2·d_ff, d] (gated activations; gate rows first, or alternating for an interleaved
  activation such as "gpt_oss_swiglu") or ``experts.up_proj`` [E, d_ff, d]; ``experts.down_proj`` [E, d, d_ff];
  with ``expert_bias``: ``experts.gate_up_proj_bias`` / ``experts.up_proj_bias`` and ``experts.down_proj_bias``
  (GPT-OSS's names);
- with ``shared_d_ff``: a dense MLP on every token added to the output, ``shared_experts.{gate_proj, up_proj,
  down_proj}`` (DeepSeek-V2/V3's names) or, with ``shared_expert_gate``, ``shared_expert.{...}`` scaled by
  sigmoid(``shared_expert_gate.weight`` [1, d] · x) (Qwen2-MoE's names).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks, routers
from .activations import Activation, activate, resolve
from .pipeline import Backend, capacity_ratio
from .routers.base import Routing, autocast_anywhere, autocast_dtype, uniform_

AUX_LOSS_MODES = ("attach", "manual")


class Experts(nn.Module):
    """The experts' weights, stacked: ``gate_up_proj`` or ``up_proj``, and ``down_proj`` (and their biases).

    The layers read them only through ``up_weight``, ``up_bias``, ``down_weight`` and ``down_bias``, so another
    module with these four properties (views of a model's own Parameters, say) can stand in for this one.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, gated: bool, bias: bool, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        up_name = "gate_up_proj" if gated else "up_proj"
        up = torch.empty(num_experts, (2 if gated else 1) * d_ff, d_model, **factory)
        setattr(self, up_name, nn.Parameter(uniform_(up, d_model)))
        self.down_proj = nn.Parameter(uniform_(torch.empty(num_experts, d_model, d_ff, **factory), d_ff))
        self.up_name = up_name
        if bias:
            setattr(self, f"{up_name}_bias", nn.Parameter(uniform_(torch.empty(num_experts, up.shape[1], **factory), d_model)))
            self.down_proj_bias = nn.Parameter(uniform_(torch.empty(num_experts, d_model, **factory), d_ff))
        else:
            self.down_proj_bias = None

    @property
    def up_weight(self) -> Tensor:
        """gate_up_proj or up_proj, whichever this layer has."""
        return getattr(self, self.up_name)

    @property
    def up_bias(self) -> Tensor | None:
        """gate_up_proj_bias or up_proj_bias [E, N], or None."""
        return getattr(self, f"{self.up_name}_bias", None)

    @property
    def down_weight(self) -> Tensor:
        """down_proj [E, d, d_ff]."""
        return self.down_proj

    @property
    def down_bias(self) -> Tensor | None:
        """down_proj_bias [E, d], or None."""
        return self.down_proj_bias


class SharedExpert(nn.Module):
    """A dense MLP every token goes through: ``gate_proj`` (gated activations), ``up_proj``, ``down_proj``."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype, "bias": False}
        # The gate and up projections are separate Linears (Hugging Face's layout): gate half first.
        self.activation = dataclasses.replace(activation, interleaved=False) if activation.gated else activation
        self.gate_proj = nn.Linear(d_model, d_ff, **factory) if activation.gated else None
        self.up_proj = nn.Linear(d_model, d_ff, **factory)
        self.down_proj = nn.Linear(d_ff, d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """x [T, d] → [T, d] in x's dtype."""
        up = F.linear(x, self.up_proj.weight.to(x.dtype))
        if self.gate_proj is not None:
            up = torch.cat([F.linear(x, self.gate_proj.weight.to(x.dtype)), up], dim=-1)
        return F.linear(activate(up, self.activation), self.down_proj.weight.to(x.dtype))


class AttachAuxLoss(torch.autograd.Function):
    """Identity on the routing weights whose backward also sends d(total loss)/d(aux_loss) = 1 into aux_loss
    (Megatron-LM's MoEAuxLossAutoScaler, attached to the weights rather than to the layer's output, so that the
    output stays an ordinary tensor the caller may modify in place): the aux loss trains the router whenever y's
    gradient is computed, whatever wraps the layer (reentrant gradient checkpointing recomputes the forward and
    attaches again)."""

    @staticmethod
    def forward(weights: Tensor, aux_loss: Tensor) -> Tensor:
        return weights.view_as(weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = inputs[1].shape, inputs[1].dtype, inputs[1].device

    @staticmethod
    def backward(ctx, grad_weights: Tensor):
        return grad_weights, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=ctx.aux_device)


class AttachAuxLossEager(AttachAuxLoss):
    """AttachAuxLoss with forward-mode AD (torch.func.jvp): used outside torch.compile, which cannot trace a
    Function that defines ``jvp``."""

    @staticmethod
    def jvp(ctx, weights_tangent: Tensor, aux_tangent: Tensor | None) -> Tensor:
        return weights_tangent


class MoEBase(nn.Module):
    """A sparsely-gated mixture of experts: construction, validation and the forward both layers share.

    Arguments: sizes ``d_model``, ``d_ff``, ``num_experts``, ``k`` (experts per token; for expert choice the
    mean); ``router`` (a name in ``moe_kernels.routers.ROUTERS``) and its options as further keyword arguments
    (``renormalize``, ``balance_loss_weight``, ...: each router documents its own); ``activation`` (a preset name
    or an ``Activation``); ``capacity_factor``: each expert keeps at most ceil(capacity_factor·T·k/E) assignments
    of a call (``pipeline.expert_capacity``); ``expert_capacity``: an absolute capacity per sequence (x's
    second-to-last dimension; the whole call for x [T, d]), Hugging Face Switch's; ``expert_bias``: biases in the
    expert GEMMs (GPT-OSS); ``shared_d_ff``, ``shared_expert_gate``: a shared expert (module docstring);
    ``aux_loss_mode``: "attach" (default) adds the aux loss's gradient to y's backward (``AttachAuxLoss``), and
    ``aux_loss`` is its detached value, for logging; "manual" keeps ``aux_loss`` differentiable for the caller to
    add to its loss (needed when the loss is scaled: GradScaler, gradient accumulation, since the attached
    gradient is not). ``aux_loss`` is None after a forward where it cannot matter (eval mode, no grad).

    Subclasses implement ``_experts_output(tokens, routing, sequence_length, backend)``: the routed experts'
    output [T, d] in x's dtype, and the fast layer ``_backend(x)``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        router: str = "topk",
        activation: str | Activation = "swiglu",
        capacity_factor: float | None = None,
        expert_capacity: int | None = None,
        expert_bias: bool = False,
        shared_d_ff: int | None = None,
        shared_expert_gate: bool = False,
        aux_loss_mode: str = "attach",
        device=None,
        dtype=None,
        **router_options,
    ):
        super().__init__()
        self.d_model = checks.integer("d_model", d_model)
        self.d_ff = checks.integer("d_ff", d_ff)
        self.num_experts = checks.integer("num_experts", num_experts)
        self.k = checks.integer("k", k)
        if self.k > self.num_experts:
            raise ValueError(f"k must be at most num_experts={self.num_experts}, got k={self.k}")
        checks.float_dtype("dtype", dtype)
        self.activation = activation
        resolved = resolve(activation)
        self.capacity_factor = capacity_factor
        self.expert_capacity = None if expert_capacity is None else checks.integer("expert_capacity", expert_capacity)
        self.aux_loss_mode = checks.choice("aux_loss_mode", aux_loss_mode, AUX_LOSS_MODES)
        self.gate = routers.build(router, self.d_model, self.num_experts, self.k, device=device, dtype=dtype, **router_options)
        self.router = router
        if self.gate.chooses_tokens and (self.capacity_factor is not None or self.expert_capacity is not None):
            raise ValueError(
                f"router {router!r} lets each expert choose its tokens (ceil(k·T/E) each): capacity_factor and "
                f"expert_capacity do not apply, got capacity_factor={capacity_factor!r}, expert_capacity={expert_capacity!r}"
            )
        self.experts = Experts(
            self.d_model, self.d_ff, self.num_experts, resolved.gated, checks.boolean("expert_bias", expert_bias), device, dtype
        )
        shared_d_ff = None if shared_d_ff is None else checks.integer("shared_d_ff", shared_d_ff)
        if checks.boolean("shared_expert_gate", shared_expert_gate) and shared_d_ff is None:
            raise ValueError("shared_expert_gate=True needs a shared expert: give shared_d_ff")
        if shared_d_ff is not None:
            shared = SharedExpert(self.d_model, shared_d_ff, resolved, device, dtype)
            if shared_expert_gate:
                self.shared_expert = shared
                self.shared_expert_gate = nn.Linear(self.d_model, 1, bias=False, device=device, dtype=dtype)
            else:
                self.shared_experts = shared
        self.aux_loss: Tensor | None = None

    @property
    def capacity_factor(self) -> float | None:
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        self._capacity_factor = None if value is None else checks.number("capacity_factor", value, strict=True)
        self.capacity_ratio = capacity_ratio(self._capacity_factor)  # what the forward reads: integers

    def constructor_arguments(self) -> dict:
        """The keyword arguments that rebuild this layer's configuration (without its parameters)."""
        shared = getattr(self, "shared_expert", None) or getattr(self, "shared_experts", None)
        return dict(
            d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts, k=self.k, router=self.router,
            activation=self.activation, capacity_factor=self.capacity_factor, expert_capacity=self.expert_capacity,
            expert_bias=self.experts.down_bias is not None,
            shared_d_ff=None if shared is None else shared.down_proj.weight.shape[1],
            shared_expert_gate=hasattr(self, "shared_expert_gate"), aux_loss_mode=self.aux_loss_mode,
            **self.gate.options(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        arguments = self.constructor_arguments()
        return ", ".join(f"{name}={value!r}" for name, value in list(arguments.items())[:7])

    def __getstate__(self):
        # copy.deepcopy and pickle: a differentiable aux_loss ("manual" mode) travels as its value, without graph.
        state = super().__getstate__()
        if isinstance(state.get("aux_loss"), Tensor):
            state = {**state, "aux_loss": state["aux_loss"].detach()}
        return state

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_model] of any float dtype → y of the same shape and dtype (autocast's dtype under autocast);
        sets ``aux_loss``."""
        self._check_input(x)
        tokens = x if x.dim() == 2 else x.reshape(-1, self.d_model)
        sequence_length = x.shape[-2] if x.dim() >= 3 else tokens.shape[0]
        # Under autocast the experts compute in its dtype, as its matmuls would (float64 is left alone, as
        # autocast does); the router computes in float32 on the tokens as they are.
        autocast_to = autocast_dtype(x.device.type) if autocast_anywhere() else None
        if autocast_to is not None and x.dtype != torch.float64:
            expert_tokens = tokens.to(autocast_to)
        else:
            expert_tokens = tokens
        backend = self._backend(expert_tokens)
        routing = self._take_aux_loss(self.gate(tokens, use_kernel=None if backend is None else backend.fused_routing))
        if autocast_to is None:
            return self._output(x, expert_tokens, routing, sequence_length, backend)
        with torch.autocast(x.device.type, enabled=False):
            return self._output(x, expert_tokens, routing, sequence_length, backend)

    def _output(self, x: Tensor, tokens: Tensor, routing: Routing, sequence_length: int, backend: Backend | None) -> Tensor:
        """The routed experts' and the shared expert's output for tokens [T, d], shaped as x, autocast off."""
        y = self._experts_output(tokens, routing, sequence_length, backend)
        y = self._add_shared_expert(tokens, y)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.d_model)

    def _backend(self, x: Tensor) -> Backend | None:
        """The pipeline backend this layer runs x on (None: the reference's loop)."""
        return None

    def _experts_output(self, tokens: Tensor, routing: Routing, sequence_length: int, backend: Backend | None) -> Tensor:
        raise NotImplementedError

    def _add_shared_expert(self, tokens: Tensor, y: Tensor) -> Tensor:
        # Looked up in _modules: hasattr of a missing submodule raises (and formats) an AttributeError inside.
        if self._modules.get("shared_experts") is not None:
            return y + self.shared_experts(tokens)
        if self._modules.get("shared_expert") is not None:
            gate = torch.sigmoid(F.linear(tokens, self.shared_expert_gate.weight.to(tokens.dtype)))
            return y + gate * self.shared_expert(tokens)
        return y

    def _take_aux_loss(self, routing: Routing) -> Routing:
        """Sets ``aux_loss`` from the routing; in "attach" mode returns the routing with its gradient attached
        to the weights (``AttachAuxLoss``)."""
        aux_loss = routing.aux_loss
        if aux_loss is None or self.aux_loss_mode == "manual":
            if aux_loss is not None or self.aux_loss is not None:  # nn.Module.__setattr__ costs ~15 µs cold
                self.aux_loss = aux_loss
            return routing
        self.aux_loss = aux_loss.detach()
        if not aux_loss.requires_grad:
            return routing
        attach = AttachAuxLoss if torch.compiler.is_compiling() else AttachAuxLossEager
        return routing._replace(weights=attach.apply(routing.weights, aux_loss))

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"x must have one of the dtypes {checks.FLOAT_DTYPES}, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}")
        if not _on_device(self, x.device):  # named_parameters, only to name the culprit: the walk costs ~40 µs cold
            for name, parameter in self.named_parameters():
                if parameter.device != x.device:
                    raise ValueError(f"x is on {x.device} but parameter {name} is on {parameter.device}")


def _on_device(module: nn.Module, device: torch.device) -> bool:
    """Whether every parameter of ``module`` and of its submodules is on ``device``."""
    pending = [module]
    while pending:
        current = pending.pop()
        for parameter in current._parameters.values():
            if parameter is not None and parameter.device != device:
                return False
        for child in current._modules.values():
            if child is not None:
                pending.append(child)
    return True
