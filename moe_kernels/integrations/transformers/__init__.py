"""moe_kernels inside Hugging Face transformers (5.x), explicitly: nothing happens at ``import moe_kernels``.

Door 1, the experts implementation: after ``register()``,
``AutoModelForCausalLM.from_pretrained(..., experts_implementation="moe_kernels")`` or
``model.set_experts_implementation("moe_kernels")`` runs every experts module of the model (Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...) through ``moe_kernels.experts_forward``. The routing stays
the model's own; only the expert GEMMs change. ``unregister()`` takes the name back out.

Door 2, whole blocks: ``moe_kernels.swap(model)`` replaces the MoE blocks (router + experts) of the families in
``blocks.PLANS`` by ``moe_kernels.MoE`` layers sharing their Parameters (``blocks``; state-dict keys: ``keys``).
"""
from __future__ import annotations

from transformers.integrations.moe import ExpertsInterface

from ...backends import BACKENDS
from .experts import expert_layout, experts_function

NAME = "moe_kernels"

__all__ = ["NAME", "expert_layout", "experts_function", "register", "unregister"]


def register(name: str = NAME, backend: str = "auto") -> str:
    """Register moe_kernels' experts, computed by ``backend``, in transformers' ExpertsInterface as ``name``.

    Idempotent: registering a name again replaces moe_kernels' entry (the latest ``backend`` wins); a name
    that transformers itself uses ("eager", "grouped_mm", ...) is refused. Returns ``name``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    _refuse_transformers_name(name)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    ExpertsInterface.register(name, experts_function(backend))
    return name


def unregister(name: str = NAME) -> None:
    """Remove moe_kernels' entry ``name`` from transformers' ExpertsInterface (nothing to do when absent).

    A model whose config still names it fails at its next forward with transformers' KeyError.
    """
    _refuse_transformers_name(name)
    # GeneralInterface has a public register() but no unregister(): its class-wide mapping is the registry.
    ExpertsInterface._global_mapping.pop(name, None)


def _refuse_transformers_name(name: str) -> None:
    current = ExpertsInterface._global_mapping.get(name)
    if name == "eager" or (current is not None and not hasattr(current, "moe_kernels_backend")):
        raise ValueError(f"name {name!r} is one of transformers' own experts implementations; choose another name")
