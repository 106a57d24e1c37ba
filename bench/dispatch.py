"""See through the package's custom ops: run each ``moe_kernels::`` op as its Python body.

The layer reaches its launchers through ``torch.library.custom_op`` ops. Called normally, such an op is
opaque to a ``TorchDispatchMode`` (the PyTorch ops a launcher issues are not seen) and, on the meta
device, runs its fake instead of its launcher. ``OpenCustomOps`` runs the op's own Python function in its
place, under the mode, so that a subclass sees every PyTorch op and every kernel launch inside it, on any
device. Autograd is untouched: it sits above the mode and still records the ops' backward formulas.
"""
from __future__ import annotations

from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

NAMESPACE = "moe_kernels"


class OpenCustomOps(TorchDispatchMode):
    """Runs every Python custom op of namespace ``moe_kernels`` as its body; other ops go to ``on_op``."""

    def on_op(self, func, args, kwargs):
        """One ATen (or other non-opened) op: runs it. Subclasses count before calling this."""
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        definition = OPDEFS.get(func._schema.name) if func.namespace == NAMESPACE else None
        if definition is None:
            return self.on_op(func, args, kwargs)
        # The body's own ops come back through this mode: push it again (the base class's enter, not a
        # subclass's, which may set up more than the mode).
        TorchDispatchMode.__enter__(self)
        try:
            return definition._init_fn(*args, **kwargs)
        finally:
            TorchDispatchMode.__exit__(self, None, None, None)
