"""What the reference and the fast layer share: parameters (Hugging Face's MoE layout), validation, router logits.

Parameter names and shapes, so that Mixtral / Qwen-MoE state dicts load unchanged:
- ``gate.weight`` [E, d] and, for router "noisy_topk" only, ``gate.noise_weight`` [E, d];
- ``experts.gate_up_proj`` [E, 2·d_ff, d] (gated activations; gate rows first, or alternating for an interleaved
  activation such as "gpt_oss_swiglu") or ``experts.up_proj``
  [E, d_ff, d]; ``experts.down_proj`` [E, d, d_ff].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation, resolve
from .pipeline import LayerConfig, RouterConfig
from .routing import ROUTERS, LossWeights


def _uniform_(weight: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default initialisation, U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class Router(nn.Module):
    """The gate: ``weight`` [E, d] and, for noisy top-k, ``noise_weight`` [E, d]."""

    def __init__(self, d_model: int, num_experts: int, noisy: bool, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(_uniform_(torch.empty(num_experts, d_model, **factory), d_model))
        self.noise_weight = (
            nn.Parameter(_uniform_(torch.empty(num_experts, d_model, **factory), d_model)) if noisy else None
        )


class Experts(nn.Module):
    """The experts' weights, stacked: ``gate_up_proj`` or ``up_proj``, and ``down_proj``."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, gated: bool, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        up = torch.empty(num_experts, (2 if gated else 1) * d_ff, d_model, **factory)
        if gated:
            self.gate_up_proj = nn.Parameter(_uniform_(up, d_model))
        else:
            self.up_proj = nn.Parameter(_uniform_(up, d_model))
        self.down_proj = nn.Parameter(_uniform_(torch.empty(num_experts, d_model, d_ff, **factory), d_ff))

    @property
    def up_weight(self) -> Tensor:
        """gate_up_proj or up_proj, whichever this layer has."""
        return self.gate_up_proj if hasattr(self, "gate_up_proj") else self.up_proj


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MoEBase(nn.Module):
    """A sparsely-gated mixture of experts: construction, validation and router logits.

    Subclasses implement ``forward(x)``: x [..., d_model] of any float dtype → the same shape and dtype,
    with ``self.aux_loss`` set to the float32 scalar of the router's weighted losses.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        router: str = "topk",
        activation: str | Activation = "swiglu",
        renormalize: bool = True,
        capacity_factor: float | None = None,
        noise_epsilon: float = 1e-2,
        importance_loss_weight: float = 0.1,
        load_loss_weight: float = 0.1,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.d_model = _positive_int("d_model", d_model)
        self.d_ff = _positive_int("d_ff", d_ff)
        self.num_experts = _positive_int("num_experts", num_experts)
        self.k = _positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be at most num_experts={num_experts}, got k={k}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if router == "switch" and k != 1:
            raise ValueError(f"router 'switch' sends each token to one expert: k must be 1, got k={k}")
        resolved_activation = resolve(activation)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")
        if not noise_epsilon >= 0:
            raise ValueError(f"noise_epsilon must be >= 0, got {noise_epsilon!r}")
        self.router = router
        self.activation = activation
        self.renormalize = renormalize
        self.capacity_factor = capacity_factor
        self.noise_epsilon = noise_epsilon
        self.loss_weights = LossWeights(importance_loss_weight, load_loss_weight, balance_loss_weight, z_loss_weight)
        self.gate = Router(d_model, num_experts, router == "noisy_topk", device, dtype)
        self.experts = Experts(d_model, d_ff, num_experts, resolved_activation.gated, device, dtype)
        self.aux_loss: Tensor | None = None

    @property
    def config(self) -> LayerConfig:
        router = RouterConfig(self.router, self.k, self.renormalize, self.noise_epsilon)
        return LayerConfig(self.num_experts, router, resolve(self.activation), self.capacity_factor, self.loss_weights)

    def constructor_arguments(self) -> dict:
        """The keyword arguments that rebuild this layer's configuration (without its parameters)."""
        lw = self.loss_weights
        return dict(
            d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts, k=self.k, router=self.router,
            activation=self.activation, renormalize=self.renormalize, capacity_factor=self.capacity_factor,
            noise_epsilon=self.noise_epsilon, importance_loss_weight=lw.importance, load_loss_weight=lw.load,
            balance_loss_weight=lw.balance, z_loss_weight=lw.z,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in list(self.constructor_arguments().items())[:8])

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating-point dtype, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}")
        for name, parameter in self.named_parameters():
            if parameter.device != x.device:
                raise ValueError(f"x is on {x.device} but parameter {name} is on {parameter.device}")

    def _router_inputs(self, tokens: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Router logits in float32 (Switch §2.4, selective precision), noise logits and the N(0,1) draw.

        tokens: [T, d]. Returns logits [T, E], and for noisy top-k the noise logits [T, E] and, in training,
        the noise [T, E] (the forward's first random draw, taken in float32); else None. All three are
        float32, or float64 for float64 tokens so that gradcheck sees exact routing.
        """
        router_dtype = torch.promote_types(tokens.dtype, torch.float32)
        logits = F.linear(tokens.to(router_dtype), self.gate.weight.to(router_dtype))
        if self.router != "noisy_topk":
            return logits, None, None
        noise_logits = F.linear(tokens.to(router_dtype), self.gate.noise_weight.to(router_dtype))
        noise = None
        if self.training:
            noise = torch.randn(tokens.shape[0], self.num_experts, device=tokens.device).to(router_dtype)
        return logits, noise_logits, noise
