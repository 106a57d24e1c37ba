"""Adapters to other libraries. Nothing here is imported by ``import moe_kernels``; each adapter is used
explicitly (``moe_kernels.integrations.transformers.register()``)."""
