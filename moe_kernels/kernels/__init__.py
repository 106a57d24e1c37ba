"""Triton kernels of the MoE pipeline, one file per kernel family, each with its launcher."""
