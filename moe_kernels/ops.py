"""The autograd boundary over the Triton stages: ``torch.library`` custom ops that call the launchers.

Each stage is an opaque op of namespace ``moe_kernels`` with a fake (shapes only) and, where it is
differentiable, an autograd formula whose backward is itself a custom op, so torch.compile(fullgraph=True)
traces the layer forward and backward without looking inside a launcher (tests/test_ops.py), and CUDA
graphs capture the forward (tests/test_cuda_graph.py, on the GPU):

  triton_softmax_topk(logits, k, renormalize) -> (weights, experts)    routers "topk" and "switch"
  triton_softmax_topk_backward(grad_weights, logits, experts, renormalize) -> grad_logits
  triton_permute(experts, num_experts, capacity?, block_m) -> 4 Tensors (a Permutation)
  triton_expert_up(x, up_weight, up_bias?, <permutation>, activation, store_pre_activation)
      -> (hidden, pre_activation or an empty [0, N])                 (activation: an Activation.spec string)
  triton_expert_up_backward(grad_hidden, x, up_weight, up_bias?, <permutation>, activation, pre_activation?)
      -> [grad_x, grad_up_weight(, grad_up_bias)]
  triton_expert_down_combine(hidden, down_weight, down_bias?, <permutation>, weights) -> y
  triton_expert_down_combine_backward(grad_y, hidden, down_weight, down_bias?, <permutation>, weights)
      -> [grad_hidden, grad_down_weight, grad_weights(, grad_down_bias)]

Names: ``moe_kernels::triton_<stage>`` for the Triton ops here, ``triton_<stage>_backward`` for their
backward; the C++ ops of csrc/ are ``moe_kernels::<stage>``. Schemas take tensors and scalars only:
<permutation> is the four tensors of a ``Permutation``; the helpers at the bottom (``softmax_topk``,
``permute``, ``expert_up``, ``expert_down_combine``) take and return the pipeline's types.

Saved for backward, per token (k assignments, R ≈ T·k rows plus padding):
- triton_softmax_topk keeps the router logits, alive anyway, and the int32 expert ids (4·k bytes); its
  backward recomputes the softmax.
- expert_up keeps x, up_weight, up_bias and the permutation, all alive anyway. By default, when a
  gradient will be asked for, GEMM 1 also writes the pre-activation, k·N·itemsize bytes per token
  (N = 2·d_ff gated), and the backward reads it. With recompute_pre_activation=True nothing of its own is
  kept and the backward recomputes the pre-activation (GEMM 1 again, T·k·N·d MACs) inside the kernel that
  applies the activation's backward. Storing is the default: recomputing spends 2·d FLOPs per
  pre-activation element to save its write and read (2·itemsize bytes), d/itemsize FLOP per byte
  (≈ 2000 at Mixtral's d = 4096 in 16 bits), far above an H100's ridge (≈ 300 FLOP/B); recompute only
  to save memory.
- expert_down_combine keeps hidden (its input, k·d_ff·itemsize bytes per token, plus padding rows), the
  float32 gate weights (4·k bytes) and the permutation (int32: 4·k for sorted_rows and 4·k for
  sorted_assignments; tokens_per_expert and expert_offsets are per expert). The per-assignment expert
  outputs are not kept: d(weights) comes out of the d(hidden) GEMM as <hidden, dy·down_weight>.
``saved_bytes_per_token`` adds these up.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import native
from .activations import Activation, is_gated, resolve
from .kernels import gating, grouped_gemm
from .kernels.permute import permute as permute_launcher
from .pipeline import Permutation


def saved_bytes_per_token(k: int, d_ff: int, element_size: int, up_width: int, recompute_pre_activation: bool = False) -> int:
    """Bytes per token that backend "triton" keeps for backward beyond the tensors alive anyway (x, the
    router logits, the parameters): hidden, the pre-activation (up_width = N columns) unless recomputed,
    the gate weights, the expert ids and the two per-assignment permutation vectors; padding rows (at
    most E·(block_m − 1) per call) not counted."""
    pre_activation = 0 if recompute_pre_activation else up_width * element_size
    return k * (d_ff * element_size + pre_activation + 4 + 4 + 4 + 4)


# ---------------------------------------------------------------------------------------------- gating


@torch.library.custom_op("moe_kernels::triton_softmax_topk", mutates_args=())
def triton_softmax_topk(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """``kernels.gating.softmax_top_k_forward``: (weights [T, k] float32, experts [T, k] int32);
    differentiable in logits."""
    return gating.softmax_top_k_forward(logits, k, renormalize)


@triton_softmax_topk.register_fake
def _(logits, k, renormalize):
    return logits.new_empty(logits.shape[0], k), logits.new_empty(logits.shape[0], k, dtype=torch.int32)


@torch.library.custom_op("moe_kernels::triton_softmax_topk_backward", mutates_args=())
def triton_softmax_topk_backward(grad_weights: Tensor, logits: Tensor, experts: Tensor, renormalize: bool) -> Tensor:
    """``kernels.gating.softmax_top_k_backward``: grad_logits [T, E] float32."""
    return gating.softmax_top_k_backward(grad_weights, logits, experts, renormalize)


@triton_softmax_topk_backward.register_fake
def _(grad_weights, logits, experts, renormalize):
    return torch.empty_like(logits)


def _softmax_topk_setup_context(ctx, inputs, output):
    logits, _, renormalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.renormalize = renormalize


def _softmax_topk_backward(ctx, grad_weights, _grad_experts):
    logits, experts = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None
    return triton_softmax_topk_backward(grad_weights, logits, experts, ctx.renormalize), None, None


triton_softmax_topk.register_autograd(_softmax_topk_backward, setup_context=_softmax_topk_setup_context)

# ----------------------------------------------------------------------------------------- permutation


@torch.library.custom_op("moe_kernels::triton_permute", mutates_args=())
def triton_permute(
    experts: Tensor, num_experts: int, capacity: int | None, block_m: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``kernels.permute.permute``: the four tensors of a Permutation; integers, not differentiable."""
    return tuple(permute_launcher(experts, num_experts, capacity, block_m))


triton_permute.register_fake(native.permute_fake)

# ---------------------------------------------------------------------------------- GEMM 1: expert_up


@torch.library.custom_op("moe_kernels::triton_expert_up", mutates_args=())
def expert_up_op(
    x: Tensor, up_weight: Tensor, up_bias: Tensor | None, tokens_per_expert: Tensor, expert_offsets: Tensor,
    sorted_rows: Tensor, sorted_assignments: Tensor, activation: str, store_pre_activation: bool,
) -> tuple[Tensor, Tensor]:
    """``kernels.grouped_gemm.expert_up_forward``: (hidden [R, d_ff], the pre-activation [R, N] when
    store_pre_activation else an empty [0, N]); hidden is differentiable in x, up_weight and up_bias."""
    permutation = Permutation(tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments)
    hidden, pre = grouped_gemm.expert_up_forward(x, up_weight, up_bias, permutation, activation, store_pre_activation)
    return hidden, pre if pre is not None else x.new_empty(0, up_weight.shape[1])


@torch.library.custom_op("moe_kernels::triton_expert_up_backward", mutates_args=())
def expert_up_backward_op(
    grad_hidden: Tensor, x: Tensor, up_weight: Tensor, up_bias: Tensor | None, tokens_per_expert: Tensor,
    expert_offsets: Tensor, sorted_rows: Tensor, sorted_assignments: Tensor, activation: str,
    pre_activation: Tensor | None,
) -> list[Tensor]:
    """``kernels.grouped_gemm.expert_up_backward``: [grad_x, grad_up_weight] and grad_up_bias when up_bias
    is given; from the stored pre-activation when given, else recomputing it."""
    permutation = Permutation(tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments)
    grad_x, grad_up_weight, grad_up_bias = grouped_gemm.expert_up_backward(
        grad_hidden, x, up_weight, up_bias, permutation, activation, pre_activation
    )
    return [grad_x, grad_up_weight] + ([] if grad_up_bias is None else [grad_up_bias])


@expert_up_op.register_fake
def _(x, up_weight, up_bias, tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments, activation,
      store_pre_activation):
    num_rows, n_up = sorted_assignments.shape[0], up_weight.shape[1]
    pre = x.new_empty(num_rows if store_pre_activation else 0, n_up)
    return x.new_empty(num_rows, n_up // 2 if is_gated(activation) else n_up), pre


@expert_up_backward_op.register_fake
def _(grad_hidden, x, up_weight, up_bias, tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments,
      activation, pre_activation):
    grads = [x.new_empty(x.shape), torch.empty_like(up_weight, memory_format=torch.contiguous_format)]
    return grads + ([] if up_bias is None else [torch.empty_like(up_bias, memory_format=torch.contiguous_format)])


def _expert_up_setup_context(ctx, inputs, output):
    *tensors, activation, store_pre_activation = inputs
    ctx.mark_non_differentiable(output[1])
    # x, up_weight, up_bias and the permutation, all alive anyway; the pre-activation when stored.
    ctx.save_for_backward(*tensors, output[1] if store_pre_activation else None)
    ctx.activation = activation


def _expert_up_backward(ctx, grad_hidden, _grad_pre_activation):
    *tensors, pre_activation = ctx.saved_tensors
    grads = expert_up_backward_op(grad_hidden, *tensors, ctx.activation, pre_activation)
    grad_up_bias = grads[2] if len(grads) == 3 else None
    return grads[0], grads[1], grad_up_bias, None, None, None, None, None, None


expert_up_op.register_autograd(_expert_up_backward, setup_context=_expert_up_setup_context)

# -------------------------------------------------------------------- GEMM 2 + combine: expert_down_combine


@torch.library.custom_op("moe_kernels::triton_expert_down_combine", mutates_args=())
def expert_down_combine_op(
    hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, tokens_per_expert: Tensor, expert_offsets: Tensor,
    sorted_rows: Tensor, sorted_assignments: Tensor, weights: Tensor,
) -> Tensor:
    """``kernels.grouped_gemm.expert_down_combine_forward``: y [T, d]; differentiable in hidden, down_weight,
    down_bias and weights."""
    permutation = Permutation(tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments)
    return grouped_gemm.expert_down_combine_forward(hidden, down_weight, down_bias, permutation, weights)


@torch.library.custom_op("moe_kernels::triton_expert_down_combine_backward", mutates_args=())
def expert_down_combine_backward_op(
    grad_y: Tensor, hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, tokens_per_expert: Tensor,
    expert_offsets: Tensor, sorted_rows: Tensor, sorted_assignments: Tensor, weights: Tensor,
) -> list[Tensor]:
    """``kernels.grouped_gemm.expert_down_combine_backward``: [grad_hidden, grad_down_weight, grad_weights]
    and grad_down_bias when down_bias is given."""
    permutation = Permutation(tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments)
    grad_hidden, grad_down_weight, grad_down_bias, grad_weights = grouped_gemm.expert_down_combine_backward(
        grad_y, hidden, down_weight, down_bias, permutation, weights
    )
    return [grad_hidden, grad_down_weight, grad_weights] + ([] if grad_down_bias is None else [grad_down_bias])


@expert_down_combine_op.register_fake
def _(hidden, down_weight, down_bias, tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments, weights):
    return hidden.new_empty(sorted_rows.shape[0], down_weight.shape[1])


@expert_down_combine_backward_op.register_fake
def _(grad_y, hidden, down_weight, down_bias, tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments, weights):
    grads = [
        torch.empty_like(hidden, memory_format=torch.contiguous_format),
        torch.empty_like(down_weight, memory_format=torch.contiguous_format),
        weights.new_empty(weights.shape),
    ]
    return grads + ([] if down_bias is None else [torch.empty_like(down_bias, memory_format=torch.contiguous_format)])


def _expert_down_combine_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # hidden, down_weight, down_bias, the permutation and weights


def _expert_down_combine_backward(ctx, grad_y):
    grads = expert_down_combine_backward_op(grad_y, *ctx.saved_tensors)
    grad_down_bias = grads[3] if len(grads) == 4 else None
    return grads[0], grads[1], grad_down_bias, None, None, None, None, grads[2]


expert_down_combine_op.register_autograd(_expert_down_combine_backward, setup_context=_expert_down_combine_setup_context)

# ------------------------------------------------------------------------- what the backends call


def softmax_topk(logits: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(weights [T, k], experts [T, k] int32) of routers.softmax_topk's definition, by the Triton kernel;
    differentiable in logits [T, E] float32."""
    return triton_softmax_topk(logits, k, renormalize)


def permute(experts: Tensor, num_experts: int, capacity: int | None, block_m: int) -> Permutation:
    """The Permutation of expert ids [T, k] int32, segments padded to block_m (capacity None: dropless)."""
    return Permutation(*triton_permute(experts, num_experts, capacity, block_m))


def expert_up(
    x: Tensor, up_weight: Tensor, up_bias: Tensor | None, permutation: Permutation, activation: str | Activation,
    recompute_pre_activation: bool = False,
) -> Tensor:
    """hidden [R, d_ff] = act(x[token(r)] · up_weight[e(r)]ᵀ + up_bias[e(r)]); differentiable in x, up_weight
    and up_bias. When a gradient will be asked for, GEMM 1 keeps the [R, N] pre-activation for backward,
    unless recompute_pre_activation, which makes the backward recompute it (module docstring: the trade-off).
    An inference call (no gradient) never writes it."""
    store = not recompute_pre_activation and native.grad_required(x, up_weight, up_bias)
    return expert_up_op(x, up_weight, up_bias, *permutation, resolve(activation).spec, store)[0]


def expert_down_combine(
    hidden: Tensor, down_weight: Tensor, down_bias: Tensor | None, permutation: Permutation, weights: Tensor
) -> Tensor:
    """y [T, d] = Σ_s weights[t, s]·(hidden[row(t, s)] · down_weight[e]ᵀ + down_bias[e]); differentiable in
    hidden, down_weight, down_bias and weights."""
    return expert_down_combine_op(hidden, down_weight, down_bias, *permutation, weights)
