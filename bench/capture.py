"""Record the Triton launches a call would make on a GPU, without a GPU and without running them.

    with LaunchCapture("sm_90a") as capture:
        layer, x = build_layer(config, 4096, torch.bfloat16, "meta")
        run_layer(layer, x, section=capture.section)
    capture.launches   # [Launch]: kernel, bound arguments' specialisation, constexprs, options, grid

Inside the context:
- ``JITFunction.run`` (what ``kernel[grid](...)`` calls) binds and specialises its arguments with Triton's
  own binder for the target (ints equal to 1 become constexprs, ints and pointers get the 16-divisibility
  hint as the runtime gives them: meta tensors report data_ptr() = storage offset in bytes, so a view's
  alignment is that of its offset from an aligned allocation), evaluates the grid on the bound arguments,
  records all of it and launches nothing. An ``Autotuner`` records one launch per pruned config.
- ``moe_kernels::`` custom ops run as their Python bodies (bench.dispatch), so meta tensors reach the
  launchers rather than the ops' fakes.
- The launchers see the target GPU: ``torch.cuda.get_device_capability()``,
  ``torch.cuda.get_device_properties()`` and Triton's ``driver.active`` (current target, device
  properties) answer for the emulated GPU (``ARCHS``), so a tile policy keyed on the architecture or the
  SM count chooses as it would there. ``torch.cuda.is_available()`` is left alone.
- The backend lookup treats meta tensors as CUDA ones (``moe_kernels.backends.resolve``), so backend
  "triton" (or "auto") takes its GPU path.
Kernels must have been defined without TRITON_INTERPRET=1 (the interpreter's functions cannot be
compiled); a launch of an interpreted function raises.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import autotuner, driver  # driver: the DriverConfig instance
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

from .dispatch import OpenCustomOps


@dataclass(frozen=True)
class Arch:
    """A compile target and the GPU whose limits the audit checks against (CUDA occupancy tables)."""

    name: str  # ptxas --gpu-name
    capability: int
    gpu: str
    sms: int
    shared_per_block: int  # bytes, the opt-in maximum of one program
    shared_per_sm: int  # bytes; each resident program also reserves 1 KiB
    registers_per_sm: int = 65536
    warps_per_sm: int = 64
    programs_per_sm: int = 32

    @property
    def target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)


ARCHS = {
    "sm_90a": Arch("sm_90a", 90, "H100 SXM", sms=132, shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
    "sm_80": Arch("sm_80", 80, "A100", sms=108, shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
}


@dataclass
class Launch:
    """One ``kernel[grid](...)`` call as the runtime would specialise it for ``arch``."""

    kernel: JITFunction
    arch: str
    section: str  # what the caller was doing ("forward", "backward"), "" outside any section
    grid: tuple[int, int, int]
    signature: dict  # parameter name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # parameter path (tuple) -> value: the constexpr parameters and the ints equal to 1
    attrs: dict  # parameter path -> [["tt.divisibility", 16]] hints
    options: dict  # CUDAOptions fields (num_warps, num_stages, ...)
    note: str = ""  # e.g. "autotune config 2/4"
    arguments: dict = field(default_factory=dict, repr=False)  # name -> the value passed (tensors as meta)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def variant(self) -> str:
        """The kernel's tl.constexpr parameters and its warps and stages, as 'NAME=value ...'."""
        values = [
            f"{param.name}={_show(self.constexprs[(param.num,)])}"
            for param in self.kernel.params
            if param.is_constexpr and (param.num,) in self.constexprs
        ]
        return " ".join(values + [f"warps={self.options['num_warps']}", f"stages={self.options['num_stages']}"])


def _show(value) -> str:
    return getattr(value, "name", None) or str(value)


class _EmulatedDriver:
    """The parts of Triton's driver a launcher or tile policy may ask about, answering for ``arch``."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.utils = SimpleNamespace(get_device_properties=self._properties)

    def get_current_target(self) -> GPUTarget:
        return self.arch.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def _properties(self, device=None) -> dict:
        return {
            "max_shared_mem": self.arch.shared_per_block, "multiprocessor_count": self.arch.sms,
            "max_num_regs": self.arch.registers_per_sm, "warpSize": 32,
        }


def _cuda_properties(arch: Arch) -> SimpleNamespace:
    return SimpleNamespace(
        name=f"{arch.gpu} (emulated by bench.capture)", major=arch.capability // 10, minor=arch.capability % 10,
        multi_processor_count=arch.sms, shared_memory_per_block_optin=arch.shared_per_block,
        shared_memory_per_multiprocessor=arch.shared_per_sm, regs_per_multiprocessor=arch.registers_per_sm,
        warp_size=32, total_memory=80 * 2**30,
    )


class LaunchCapture:
    """Context manager recording every Triton launch made inside it for ``arch`` (see module docstring)."""

    def __init__(self, arch: str = "sm_90a"):
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        self.arch = ARCHS[arch]
        self.launches: list[Launch] = []
        self._section = ""
        self._note = ""
        self._backend = make_backend(self.arch.target)
        self._binders: dict[JITFunction, object] = {}
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def section(self, name: str):
        """Labels the launches made inside it (``Launch.section``)."""
        outer, self._section = self._section, name
        try:
            yield
        finally:
            self._section = outer

    def __enter__(self) -> "LaunchCapture":
        stack = self._stack
        capture = self

        def record(kernel, *args, grid, warmup, **kwargs):
            if not warmup:
                capture._record(kernel, args, kwargs, grid)

        def record_each_config(tuner, *args, **kwargs):
            configs = tuner.prune_configs(kwargs)
            for index, config in enumerate(configs):
                capture._note = f"autotune config {index + 1}/{len(configs)}"
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            capture._note = ""

        def refuse(function, *args, **kwargs):
            raise RuntimeError(
                f"{function.fn.__qualname__} was defined under TRITON_INTERPRET=1 and cannot be compiled: "
                "capture launches in a process that imports the kernels without it"
            )

        stack.enter_context(patched(JITFunction, "run", record))
        stack.enter_context(patched(autotuner.Autotuner, "run", record_each_config))
        stack.enter_context(patched(InterpretedFunction, "run", refuse))
        stack.enter_context(patched(torch.cuda, "get_device_capability", lambda device=None: divmod(self.arch.capability, 10)))
        stack.enter_context(patched(torch.cuda, "get_device_properties", lambda device=None: _cuda_properties(self.arch)))
        stack.enter_context(patched(driver, "_active", _EmulatedDriver(self.arch)))
        for module in [m for name, m in list(sys.modules.items()) if name.startswith("moe_kernels") and m is not None]:
            resolve = getattr(module, "resolve", None)
            if resolve is not None and getattr(resolve, "__module__", "") == "moe_kernels.backends":
                stack.enter_context(patched(module, "resolve", _meta_as_cuda(resolve)))
        stack.enter_context(OpenCustomOps())
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def _record(self, kernel: JITFunction, args, kwargs, grid) -> None:
        kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug)
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
        if kernel not in self._binders:
            self._binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, self._backend)
        bound, specialization, options = self._binders[kernel](*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self._backend, kwargs, bound, specialization, options)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.launches.append(Launch(
            kernel, self.arch.name, self._section, grid, signature, constexprs, attrs, dict(options.__dict__),
            self._note, dict(bound),
        ))


def _meta_as_cuda(resolve):
    def resolve_meta_as_cuda(name, device, *args):
        return resolve(name, torch.device("cuda") if torch.device(device).type == "meta" else device, *args)

    return resolve_meta_as_cuda


@contextlib.contextmanager
def patched(owner, name: str, value):
    """Sets ``owner.name = value`` for the duration of the context (a class's own attribute, or a module's or
    object's), then restores it or deletes it if it was not there."""
    missing = object()
    old = owner.__dict__.get(name, missing) if isinstance(owner, type) else getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)
