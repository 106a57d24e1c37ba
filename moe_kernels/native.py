"""The native ops of ``moe_kernels._C`` (csrc/), when the extension is built, as the pipeline's types.

``torch.ops.moe_kernels.permute`` computes the Permutation layout of pipeline.py on the CPU, with a fake
implementation (below) so that torch.compile(fullgraph=True) traces through it. It is not differentiable
(integers only). The CPU expert path (bottom section) runs backend "torch"'s expert stages on the CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .activations import Activation
from .pipeline import Permutation, num_sorted_rows

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.moe_kernels.*)
except ImportError:  # not built: the package runs on its PyTorch and Triton backends alone
    _C = None


def has_cpu_ops() -> bool:
    """Whether moe_kernels._C is built (its CPU ops always are)."""
    return _C is not None


def grad_required(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors (then the CPU expert path keeps its pre-activation)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def permute(experts: Tensor, num_experts: int, capacity: int | None, block_m: int = 1) -> Permutation:
    """experts [T, S] int32 → the Permutation with segments starting at multiples of block_m.

    capacity None is dropless, 0 drops every assignment. An id outside [0, num_experts) raises.
    """
    return Permutation(*torch.ops.moe_kernels.permute(experts, num_experts, capacity, block_m))


def permute_fake(experts, num_experts, capacity, block_m):
    """Empty tensors shaped as the outputs of the permute schema (a Permutation); also the fake of ops.py's
    triton_permute."""
    num_tokens, slots = experts.shape
    return (
        experts.new_empty(num_experts),
        experts.new_empty(num_experts + 1),
        experts.new_empty(num_tokens, slots),
        experts.new_empty(num_sorted_rows(num_tokens, slots, num_experts, block_m)),
    )


if _C is not None:
    torch.library.register_fake("moe_kernels::permute", permute_fake)


# ------------------------------------------------------------------------------- the CPU router kernel
# moe_kernels::cpu_softmax_topk (csrc/cpu/softmax_topk.cpp): the softmax top-k router (routers/softmax_topk.py)
# in one op, forward only, for the routers' ``use_kernel="cpu"`` hook where nothing records a gradient.


def routes(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the C++ router kernel takes x·weightᵀ + bias: built, CPU, all float32 or all float64 (else the
    definition's casts apply), eager, no gradient recorded and no forward-mode AD (it has no derivative;
    torch.compile traces the PyTorch definition)."""
    if _C is None or not x.is_cpu or x.dtype not in (torch.float32, torch.float64):
        return False
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype) or not weight.is_cpu:
        return False
    return not torch.compiler.is_compiling() and not grad_required(x, weight, bias) and _without_derivatives(x, weight, bias)


def softmax_top_k(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax top-k router by the C++ CPU kernel: (logits [T, E], weights [T, k], experts [T, k] int32)
    of x [T, d], weight [E, d] and bias [E] or None, all float32 or all float64 CPU, no gradient."""
    return torch.ops.moe_kernels.cpu_softmax_topk(x, weight, bias, k, renormalize)


def _softmax_top_k_fake(x, weight, bias, k, renormalize):
    num_tokens = x.shape[0]
    return x.new_empty(num_tokens, weight.shape[0]), x.new_empty(num_tokens, k), x.new_empty(num_tokens, k, dtype=torch.int32)


if _C is not None:
    torch.library.register_fake("moe_kernels::cpu_softmax_topk", _softmax_top_k_fake)


# ------------------------------------------------------------------------------- the CPU expert path
# moe_kernels::cpu_expert_up / cpu_expert_down_combine (csrc/cpu): the backend-"torch" stages on the CPU.
# Autograd lives here, over the C++ backward ops; the forward of expert_up keeps the pre-activation
# ([R, N] in x's dtype) only when a gradient will be asked for, and the backward reads it instead of
# recomputing GEMM 1 (a third of the backward's GEMM work on a CPU, for k·N·itemsize bytes per token).


def runs_experts(*tensors: Tensor | None) -> bool:
    """Whether the C++ expert ops take this call: built, CPU tensors, and no forward-mode AD.

    They have no forward-mode formula: under torch.func transforms (jvp, and vmap, which they cannot batch)
    and inside a forward_ad.dual_level with dual inputs, the PyTorch stages run instead, which have.
    """
    if _C is None or not tensors[0].is_cpu:
        return False
    return torch.compiler.is_compiling() or _without_derivatives(*tensors)


def _without_derivatives(*tensors: Tensor | None) -> bool:
    """No torch.func transform running and no forward-mode tangent on these tensors (the C++ ops have neither
    a forward-mode formula nor a batching rule)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return forward_ad._current_level < 0 or all(t is None or forward_ad.unpack_dual(t).tangent is None for t in tensors)


def _activation_fields(activation: Activation) -> tuple:
    return (activation.function, activation.gated, float(activation.alpha), activation.limit,
            float(activation.up_offset), activation.interleaved)


def _call(op, *arguments, recorded: bool):
    """op(*arguments); past the autograd key where autograd records nothing (recorded False, eager): its
    Python autograd wrapper (register_autograd) costs ~17 µs a call, a tenth of a T = 1 step of Qwen3/8."""
    if recorded or torch.compiler.is_compiling():
        return op(*arguments)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*arguments)


def expert_up(x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation,
              activation: Activation) -> Tensor:
    """Backend.expert_up by the C++ CPU op: hidden [R, d_ff] in x's dtype, differentiable in x, up_weight, up_bias.

    It keeps the pre-activation whenever a gradient will be asked for, so it takes no
    recompute_pre_activation: on a CPU recomputing GEMM 1 would add a third to the backward's GEMM work
    (compute-bound there) to save k·N·itemsize bytes per token, and its backward op reads the kept one."""
    keep = grad_required(x, up_weight, up_bias)
    hidden, _ = _call(torch.ops.moe_kernels.cpu_expert_up, x, up_weight, up_bias, *permutation,
                      *_activation_fields(activation), keep, recorded=keep)
    return hidden


def expert_down_combine(hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation,
                        weights: Tensor) -> Tensor:
    """Backend.expert_down_combine by the C++ CPU op: y [T, d] in hidden's dtype, differentiable in hidden,
    down_weight, down_bias and weights."""
    return _call(torch.ops.moe_kernels.cpu_expert_down_combine, hidden, down_weight, down_bias, *permutation, weights,
                 recorded=grad_required(hidden, down_weight, down_bias, weights))


def release_cpu_memory() -> int:
    """Unmaps the memory the CPU expert path keeps for reuse and returns its bytes (0 without moe_kernels._C).

    The backward's weight gradients of 1 MiB or more lie on mappings that, once their tensors are freed, are
    kept (at most 1 GiB) for the next backward's gradients of the same size, so that a training step does not
    fault them in afresh; like ``torch.cuda.empty_cache``, this gives them back to the system.
    """
    return torch.ops.moe_kernels.cpu_release_memory() if _C is not None else 0


def fuses_experts(*tensors: Tensor | None) -> bool:
    """Whether moe_kernels::cpu_experts_forward (the three expert stages in one op, no autograd formula) takes
    this call: built, CPU tensors, eager, nothing records a gradient and no forward-mode AD."""
    if _C is None or not tensors[0].is_cpu or torch.compiler.is_compiling():
        return False
    return not grad_required(*tensors) and _without_derivatives(*tensors)


def experts_forward(x: Tensor, experts: Tensor, weights: Tensor, capacity: int | None, up_weight: Tensor,
                    up_bias: Tensor | None, down_weight: Tensor, down_bias: Tensor | None, activation: Activation) -> Tensor:
    """Backend.routed_experts by the fused C++ op (where ``fuses_experts``): y [T, d] in x's dtype, bitwise what
    permute, expert_up and expert_down_combine give."""
    return torch.ops.moe_kernels.cpu_experts_forward(x, experts, weights, capacity, up_weight, up_bias, down_weight,
                                                     down_bias, *_activation_fields(activation))


def _experts_forward_fake(x, experts, weights, capacity, up_weight, up_bias, down_weight, down_bias, *activation_fields):
    return x.new_empty(x.shape[0], down_weight.shape[1])


def _expert_up_fake(x, up_weight, up_bias, tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments,
                    function, gated, alpha, limit, up_offset, interleaved, keep_pre_activation):
    num_rows, n_up = sorted_assignments.shape[0], up_weight.shape[1]
    return x.new_empty(num_rows, n_up // 2 if gated else n_up), x.new_empty(num_rows if keep_pre_activation else 0, n_up)


def _expert_up_backward_fake(grad_hidden, x, up_weight, up_bias, pre_activation, *permutation_and_activation):
    grad_up_bias = x.new_empty(0) if up_bias is None else torch.empty_like(up_bias, memory_format=torch.contiguous_format)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(up_weight, memory_format=torch.contiguous_format), grad_up_bias)


def _expert_down_combine_fake(hidden, down_weight, down_bias, tokens_per_expert, expert_offsets, sorted_rows,
                              sorted_assignments, weights):
    return hidden.new_empty(sorted_rows.shape[0], down_weight.shape[1])


def _expert_down_combine_backward_fake(grad_y, hidden, down_weight, down_bias, tokens_per_expert, expert_offsets,
                                       sorted_rows, sorted_assignments, weights):
    grad_down_bias = hidden.new_empty(0) if down_bias is None else torch.empty_like(down_bias, memory_format=torch.contiguous_format)
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(down_weight, memory_format=torch.contiguous_format), grad_down_bias,
            torch.empty_like(weights, memory_format=torch.contiguous_format))


def _expert_up_setup_context(ctx, inputs, output):
    x, up_weight, up_bias, *permutation = inputs[:7]
    ctx.save_for_backward(x, up_weight, up_bias, output[1], *permutation)
    ctx.activation_fields = inputs[7:13]


def _expert_up_backward(ctx, grad_hidden, _grad_pre_activation):
    x, up_weight, up_bias, pre_activation, *permutation = ctx.saved_tensors
    grad_x, grad_up_weight, grad_up_bias = torch.ops.moe_kernels.cpu_expert_up_backward(
        grad_hidden, x, up_weight, up_bias, pre_activation, *permutation, *ctx.activation_fields
    )
    return (grad_x, grad_up_weight, None if up_bias is None else grad_up_bias) + (None,) * 11


def _expert_down_combine_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # hidden, down_weight, down_bias, the permutation and weights


def _expert_down_combine_backward(ctx, grad_y):
    hidden, down_weight, down_bias, *permutation, weights = ctx.saved_tensors
    grad_hidden, grad_down_weight, grad_down_bias, grad_weights = torch.ops.moe_kernels.cpu_expert_down_combine_backward(
        grad_y, hidden, down_weight, down_bias, *permutation, weights
    )
    return grad_hidden, grad_down_weight, None if down_bias is None else grad_down_bias, None, None, None, None, grad_weights


if _C is not None:
    torch.library.register_fake("moe_kernels::cpu_expert_up", _expert_up_fake)
    torch.library.register_fake("moe_kernels::cpu_expert_up_backward", _expert_up_backward_fake)
    torch.library.register_fake("moe_kernels::cpu_expert_down_combine", _expert_down_combine_fake)
    torch.library.register_fake("moe_kernels::cpu_expert_down_combine_backward", _expert_down_combine_backward_fake)
    torch.library.register_fake("moe_kernels::cpu_experts_forward", _experts_forward_fake)
    torch.library.register_autograd("moe_kernels::cpu_expert_up", _expert_up_backward,
                                    setup_context=_expert_up_setup_context)
    torch.library.register_autograd("moe_kernels::cpu_expert_down_combine", _expert_down_combine_backward,
                                    setup_context=_expert_down_combine_setup_context)
