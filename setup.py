"""Builds moe_kernels and its native ops, moe_kernels._C.

    pip install --no-build-isolation --no-deps -e .     # against the torch already installed

The C++ (CPU) ops are built; the GPU path is Triton (no CUDA sources). MAX_JOBS=2 bounds ninja's
parallelism on small machines. The package imports and runs without _C.
torch is deliberately not in install_requires: pip must never replace the torch this is built against.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _cpu_capability_flags() -> list[str]:
    """AVX2 + FMA for ATen's Vectorized (the CPU expert path's activation) when this machine has them.

    The extension is built for the CPU it is built on, like -march=native; MOE_KERNELS_CPU_CAPABILITY=DEFAULT
    builds a portable one (scalar Vectorized, slower activations).
    """
    import torch

    capability = os.environ.get("MOE_KERNELS_CPU_CAPABILITY", torch.backends.cpu.get_cpu_capability())
    if capability in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions():
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for is an OpenMP loop compiled into its caller (ATen/ParallelOpenMP.h). Without the
    # flag its pragma was dropped (-Wno-unknown-pragmas hid it) and every loop of the CPU expert path ran on one
    # thread whatever torch.set_num_threads said. The library needs libgomp.so.1: the one torch has loaded.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", *_cpu_capability_flags()]  # -std comes from cpp_extension
    sources = ["csrc/ops.cpp", *_sources("csrc/cpu/*.cpp")]
    return [cpp_extension.CppExtension("moe_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                                       extra_link_args=["-fopenmp"])]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    # "moe-kernels" (= "moe_kernels" once PyPI normalises it) is an unrelated project's distribution; the
    # import name stays moe_kernels.
    name="fused-moe-kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for Mixture-of-Experts layers",
    packages=find_packages(include=["moe_kernels", "moe_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[],
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
