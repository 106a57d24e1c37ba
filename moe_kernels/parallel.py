"""Expert parallelism: the experts sharded over a torch.distributed group, tokens exchanged all-to-all.

``expert_parallel(layer, group)`` turns a ``moe_kernels.MoE`` into an ``ExpertParallelMoE`` in place: of the
group's W ranks, rank r keeps experts [r·E/W, (r+1)·E/W) (its expert parameters become those slices, names
unchanged) and the router stays replicated (data parallel: keep it in sync like any replicated parameter).

The forward, on each rank's own tokens x [T, d]:
1. route locally with the layer's router: weights [T, S], expert ids [T, S], and this rank's aux loss;
2. count exchange, one all_gather of int32: every rank's assignments per (slot, expert) (per expert when
   dropless) and its x dtype. Every rank then knows every split size and every capacity decision;
3. dispatch, all_to_all: one row per kept assignment to the rank that owns its expert, in expert order
   (the expert ids are not sent: rows arrive grouped by expert and step 2 says how many of each);
4. the local experts: the received rows are a producer of "rows grouped by expert" with one slot per
   row (the backend's permute on their local expert ids), run through the backend's expert_up and
   expert_down_combine with weight 1, unchanged kernels;
5. return, all_to_all back (the reverse splits), then y[t] = Σ_s weights[t, s]·row(t, s) in slot order.
Autograd flows through both exchanges (their backward is the reverse exchange), so expert gradients hold
the contributions of every rank's tokens (the gradient of Σ_r loss_r) and the router's gradient the rank's
own. With data parallelism on top, average the router like any replicated parameter, keep the sharded
experts out of that averaging, and divide their gradients by W where the replicated ones are averaged.

Capacity counts the whole group's tokens: capacity_factor·(Σ_r T_r)·S/E per expert, kept in the
single-process layer's priority on the ranks' tokens concatenated in rank order: slot-major first (every
token's first choice before any second choice), then rank, then token order. With S = 1 that is rank,
then token order. Results therefore equal the single-process layer's on the concatenated tokens.

Nothing is overlapped yet: the count exchange, the two all_to_alls and the expert GEMMs run one after the
other on the caller's stream (and the split sizes are read on the host, which waits for the routing).
Overlapping the exchange with the GEMMs is a later step.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .activations import resolve as resolve_activation
from .backends import Backend, resolve
from .layer import MoE
from .pipeline import expert_capacity

# The dtype code each rank sends with its counts, so that ranks calling with different dtypes get an error.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ExpertParallelMoE(MoE):
    """A ``moe_kernels.MoE`` whose experts are sharded over a process group; made by ``expert_parallel``.

    ``group``: the process group; ``first_expert``: the global id of this rank's first expert. ``num_experts``
    stays the global E; the expert parameters hold E/W experts. ``state_dict()`` holds the local slices
    (names unchanged), ``load_state_dict`` takes a full or a local one, ``full_state_dict()`` gathers the
    full one. Every rank of the group must call forward (and backward) in step, as with any collective.
    """

    group: dist.ProcessGroup
    first_expert: int

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        tokens = x.reshape(-1, self.d_model)
        backend = resolve(self.backend, x.device, x.dtype)
        # The layer's router on this rank's tokens; its aux loss is these tokens' alone.
        routing = self._take_aux_loss(self.gate(tokens, use_kernel=backend.fused_routing))
        y = _experts_across_group(self, backend, tokens, routing.weights, routing.experts)
        return self._add_shared_expert(tokens, y).view(x.shape)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded layer's state dict (experts [E, ...]), on every rank; collective (see ``full_state_dict``)."""
        return full_state_dict(self)

    def extra_repr(self) -> str:
        local = self.experts.down_proj.shape[0]
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        experts = f"experts [{self.first_expert}, {self.first_expert + local})"
        return f"{super().extra_repr()}, {experts} on rank {rank} of {world}"


def expert_parallel(layer: MoE, group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
    """Shard ``layer``'s experts over ``group`` (None: the default group), in place; returns the layer.

    Collective: every rank of the group calls it with a layer of the same configuration (checked: an error
    names what differs). Build the optimizer after the conversion (the expert Parameters are replaced).
    """
    if type(layer) is not MoE:
        raise TypeError(
            f"layer must be a moe_kernels.MoE (not a subclass, not already expert-parallel), got {type(layer).__name__}"
        )
    if layer.gate.chooses_tokens or layer.expert_capacity is not None:
        raise ValueError(
            f"expert_parallel takes token-choice routers with capacity_factor or dropless; got router "
            f"{layer.router!r}, expert_capacity={layer.expert_capacity!r}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "expert_parallel needs torch.distributed initialised: call torch.distributed.init_process_group first"
        )
    group = dist.group.WORLD if group is None else group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group {group!r}")
    if layer.num_experts % world:
        raise ValueError(
            f"num_experts={layer.num_experts} is not divisible by the group's size {world}: "
            f"each rank must hold as many experts"
        )
    _check_same_layer_everywhere(layer, group, world)

    local = layer.num_experts // world
    first = rank * local
    for name, parameter in list(layer.experts.named_parameters(recurse=False)):
        shard = nn.Parameter(parameter.detach()[first : first + local].clone(), requires_grad=parameter.requires_grad)
        setattr(layer.experts, name, shard)
    layer.experts.register_load_state_dict_pre_hook(
        functools.partial(_take_local_slice, first=first, local=local, num_experts=layer.num_experts)
    )
    layer.__class__ = ExpertParallelMoE
    layer.group = group
    layer.first_expert = first
    return layer


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every expert-parallel layer's expert parameters gathered whole, [E, ...].

    The result equals the unsharded model's state dict (Hugging Face names and shapes), on every rank;
    each rank holds the full experts of one layer at a time while gathering. Collective: every rank of
    each such layer's group calls it.
    """
    state = module.state_dict()
    for path, layer in module.named_modules():
        if isinstance(layer, ExpertParallelMoE):
            prefix = f"{path}.experts." if path else "experts."
            world = dist.get_world_size(layer.group)
            for name, parameter in layer.experts.named_parameters(recurse=False):
                local = parameter.detach().contiguous()
                full = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))
                dist.all_gather_single(full, local, group=layer.group)
                state[prefix + name] = full
    return state


def assignment_counts(experts: Tensor, num_experts: int, by_slot: bool) -> Tensor:
    """experts [T, S] int → [S, E] int64 assignments per (slot, expert), or [1, E] summed over slots."""
    num_tokens, slots = experts.shape
    if by_slot:
        slot = torch.arange(slots, device=experts.device).expand(num_tokens, slots)
    else:
        slot = torch.zeros_like(experts)
    key = slot.long() * num_experts + experts.long()
    return torch.bincount(key.flatten(), minlength=(slots if by_slot else 1) * num_experts).view(-1, num_experts)


def kept_counts(counts: Tensor, capacity: int | None) -> Tensor:
    """counts [W, S, E] (rank, slot, expert) → how many of them their experts keep, [W, S, E].

    Each expert keeps its first ``capacity`` assignments in the order slot, then rank, then token: the
    single-process layer's order on the ranks' tokens concatenated in rank order. None: all (dropless).
    """
    if capacity is None:
        return counts
    num_ranks, slots, num_experts = counts.shape
    slot_then_rank = counts.transpose(0, 1).reshape(slots * num_ranks, num_experts)
    before = slot_then_rank.cumsum(0) - slot_then_rank
    kept = (capacity - before).clamp(min=0).minimum(slot_then_rank)
    return kept.view(slots, num_ranks, num_experts).transpose(0, 1)


def rows_between_ranks(kept: Tensor) -> Tensor:
    """kept [W, S, E] (from ``kept_counts``) → [W, W] int64: rows rank i sends to rank j in one dispatch."""
    num_ranks, _, num_experts = kept.shape
    return kept.sum(1).view(num_ranks, num_ranks, num_experts // num_ranks).sum(2)


class _Plan(NamedTuple):
    """This rank's part of one exchange, the same on every rank up to whose part it is.

    send_sizes, receive_sizes: [W] lists of rows to / from each rank. local_experts: [N_in] int32, the local
    expert id of each received row. kept: [S', E] int64, this rank's kept assignments per (slot, expert).
    """

    send_sizes: list[int]
    receive_sizes: list[int]
    local_experts: Tensor
    kept: Tensor


def _experts_across_group(
    layer: ExpertParallelMoE, backend: Backend, tokens: Tensor, weights: Tensor, experts: Tensor
) -> Tensor:
    """y [T, d] in tokens' dtype: Σ_s weights[t, s]·expert_{experts[t, s]}(tokens[t]), the experts on their ranks."""
    num_tokens = experts.shape[0]
    group = layer.group
    plan = _plan(layer, tokens.dtype, experts)
    send_assignments, rows = _dispatch_order(experts, plan.kept)

    send_rows = tokens[send_assignments % max(num_tokens, 1)]
    if torch.is_grad_enabled() and not send_rows.requires_grad:
        # The reverse exchanges run in backward on every rank or on none: the rows this rank receives may
        # need a gradient for their sender even when its own tokens need none.
        send_rows.requires_grad_()
    received = _AllToAll.apply(send_rows, plan.send_sizes, plan.receive_sizes, group)

    local_experts = layer.experts.down_proj.shape[0]
    permutation = backend.permute(plan.local_experts[:, None], local_experts, None)
    activation = resolve_activation(layer.activation)
    hidden = backend.expert_up(
        received, layer.experts.up_weight, layer.experts.up_bias, permutation, activation, layer.recompute_pre_activation
    )
    ones = torch.ones(received.shape[0], 1, dtype=weights.dtype, device=weights.device)
    expert_rows = backend.expert_down_combine(hidden, layer.experts.down_weight, layer.experts.down_bias, permutation, ones)
    returned = _AllToAll.apply(expert_rows, plan.receive_sizes, plan.send_sizes, group)

    # A dropped slot (row -1) reads the appended zero row, also when no row came back at all.
    returned_and_zero = torch.cat([returned, returned.new_zeros(1, returned.shape[1])])
    per_slot = returned_and_zero[rows].to(weights.dtype)
    return (weights.unsqueeze(-1) * per_slot).sum(1).to(tokens.dtype)


def _plan(layer: ExpertParallelMoE, dtype: torch.dtype, experts: Tensor) -> _Plan:
    """The count exchange (one all_gather) and what every rank derives from it (see ``_Plan``)."""
    if dtype not in _DTYPES:
        raise TypeError(f"an expert-parallel layer computes in one of {_DTYPES}, got x of dtype {dtype}")
    group, world = layer.group, dist.get_world_size(layer.group)
    rank = dist.get_rank(group)
    by_slot = layer.capacity_factor is not None
    counts = assignment_counts(experts, layer.num_experts, by_slot).to(torch.int32)
    message = torch.cat([counts.new_tensor([_DTYPES.index(dtype)]), counts.flatten()])
    gathered = message.new_empty(world * message.numel())
    dist.all_gather_single(gathered, message, group=group)
    gathered = gathered.view(world, -1).cpu()
    codes = gathered[:, 0]
    if (codes != codes[0]).any():
        received = ", ".join(f"rank {r}: {_DTYPES[c]}" for r, c in enumerate(codes.tolist()))
        raise ValueError(f"every rank of an expert-parallel layer must call it with x of one dtype; got {received}")
    all_counts = gathered[:, 1:].view(world, -1, layer.num_experts).long()
    capacity = None
    if by_slot:
        total_tokens = int(all_counts[:, 0].sum())
        capacity = expert_capacity(layer.capacity_factor, total_tokens, layer.k, layer.num_experts)
    kept = kept_counts(all_counts, capacity)
    rows = rows_between_ranks(kept)
    local = layer.num_experts // world
    first = layer.first_expert
    received_per_expert = kept.sum(1)[:, first : first + local]  # [W, local]: rows from each rank for each expert
    local_ids = torch.arange(local, dtype=torch.int32).repeat(world)
    local_experts = local_ids.repeat_interleave(received_per_expert.flatten())
    device = experts.device
    return _Plan(rows[rank].tolist(), rows[:, rank].tolist(), local_experts.to(device), kept[rank].to(device))


def _dispatch_order(experts: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """The rows this rank sends, in expert order: returns (send_assignments [N] int64, rows [T, S] int64).

    send_assignments holds the slot-major assignment s·T + t of each sent row; rows[t, s] is the send row of
    assignment (t, s), -1 where capacity dropped it. kept: [S', E] from ``kept_counts`` for this rank (S' = 1:
    dropless, everything is kept). Within an expert, rows go slot-major, then in token order.
    """
    num_tokens, slots = experts.shape
    num_experts = kept.shape[1]
    slot_major = experts.t().reshape(-1).long()
    order = torch.sort(slot_major, stable=True).indices
    kept_slots = kept.shape[0]
    # Counting groups (expert, slot), or (expert) when dropless; the stable sort keeps token order within each.
    slot = order // max(num_tokens, 1) if kept_slots > 1 else torch.zeros_like(order)
    group = slot_major[order] * kept_slots + slot
    group_counts = torch.bincount(group, minlength=num_experts * kept_slots)
    group_starts = group_counts.cumsum(0) - group_counts
    position = torch.arange(order.shape[0], device=order.device) - group_starts[group]
    send_assignments = order[position < kept.t().reshape(-1)[group]]
    row_of_assignment = torch.full_like(slot_major, -1)
    row_of_assignment[send_assignments] = torch.arange(send_assignments.shape[0], device=order.device)
    return send_assignments, row_of_assignment.view(slots, num_tokens).t()


class _AllToAll(torch.autograd.Function):
    """rows [Σ send_sizes, ...] → [Σ receive_sizes, ...] over the group; backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, rows: Tensor, send_sizes: list[int], receive_sizes: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.sizes, ctx.group = (send_sizes, receive_sizes), group
        received = rows.new_empty((sum(receive_sizes),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(received, rows.contiguous(), receive_sizes, send_sizes, group=group)
        return received

    @staticmethod
    def backward(ctx, grad_received: Tensor):
        send_sizes, receive_sizes = ctx.sizes
        return _AllToAll.apply(grad_received.contiguous(), receive_sizes, send_sizes, ctx.group), None, None, None


def _check_same_layer_everywhere(layer: MoE, group: dist.ProcessGroup, world: int) -> None:
    """Every rank's layer has the same configuration, parameter dtype and backend; else a ValueError on every rank."""
    description = dict(layer.constructor_arguments(), dtype=layer.experts.down_proj.dtype, backend=layer.backend)
    descriptions: list[dict] = [None] * world
    dist.all_gather_object(descriptions, description, group=group)
    for rank, other in enumerate(descriptions):
        differences = [f"{key}={descriptions[0][key]!r} on rank 0, {other[key]!r} on rank {rank}"
                       for key in description if other[key] != descriptions[0][key]]
        if differences:
            raise ValueError(f"expert_parallel: the ranks' layers differ: {'; '.join(differences)}")


def _take_local_slice(module, state_dict, prefix, *args, first: int, local: int, num_experts: int) -> None:
    """Load-state-dict pre-hook of the experts: a full [E, ...] expert tensor is replaced by this rank's slice."""
    for name, _ in module.named_parameters(recurse=False):
        value = state_dict.get(prefix + name)
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == num_experts != local:
            state_dict[prefix + name] = value[first : first + local]
