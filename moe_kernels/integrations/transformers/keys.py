"""A swapped block's state-dict keys in Hugging Face's names (door 2: ``moe_kernels.swap`` of whole blocks).

A moe_kernels layer names its router ``gate`` and stacks its experts ([E, ., .] Parameters). Most Hugging Face
blocks use the same names (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3); the others need their keys kept:
GPT-OSS calls its router ``router``, SwitchTransformers ``router.classifier``, and SwitchTransformers keeps one
``nn.Linear`` pair per expert (``experts.expert_{i}.wi`` / ``.wo``), which cannot be shared as [E, ., .]
Parameters: a swapped Switch block holds stacked copies, and these hooks split them back into Hugging Face's
per-expert keys on ``state_dict()`` and stack Hugging Face's keys on ``load_state_dict()``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Rename(NamedTuple):
    """Our key ``ours`` (relative to the block) is Hugging Face's ``theirs``."""

    ours: str
    theirs: str


class Split(NamedTuple):
    """Our stacked [E, ...] key ``ours`` is Hugging Face's E keys ``theirs.format(i)``, one per expert."""

    ours: str
    theirs: str
    num_experts: int


def install(module: nn.Module, rules: list[Rename | Split]) -> None:
    """Make ``module.state_dict()`` write Hugging Face's keys and ``module.load_state_dict()`` read them.

    Our own keys are still accepted by ``load_state_dict`` (a state dict saved before the hooks loads too).
    """

    def to_theirs(module, state_dict, prefix, local_metadata):
        for rule in rules:
            value = state_dict.pop(prefix + rule.ours, None)
            if value is None:
                continue
            if isinstance(rule, Rename):
                state_dict[prefix + rule.theirs] = value
            else:  # separate tensors, as Hugging Face has them (safetensors refuses views of one storage)
                for expert in range(rule.num_experts):
                    state_dict[prefix + rule.theirs.format(expert)] = value[expert].clone()

    def from_theirs(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for rule in rules:
            if isinstance(rule, Rename):
                if prefix + rule.theirs in state_dict:
                    state_dict[prefix + rule.ours] = state_dict.pop(prefix + rule.theirs)
                continue
            keys = [prefix + rule.theirs.format(expert) for expert in range(rule.num_experts)]
            if all(key in state_dict for key in keys):
                state_dict[prefix + rule.ours] = torch.stack([state_dict.pop(key) for key in keys])

    module.register_state_dict_post_hook(to_theirs)
    module.register_load_state_dict_pre_hook(from_theirs)
