"""Whole Hugging Face MoE blocks and moe_kernels' layer API (door 2 of issue 13)."""
import pytest

import moe_kernels
from hf_models import build  # skips without transformers


def test_from_reference_of_a_hugging_face_block_says_what_to_do():
    block = next(module for name, module in build("mixtral").named_modules() if name.endswith("layers.0.mlp"))
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*moe_kernels.integrations.transformers"):
        moe_kernels.MoE.from_reference(block)
