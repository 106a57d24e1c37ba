"""Expert parallelism (moe_kernels.parallel) against the single-process layer on the concatenated tokens.

The distributed checks run in W = 2 and W = 4 processes (torch.multiprocessing spawn, gloo, a file://
rendezvous in a temporary directory, a timeout on the process group so that a broken exchange errors
instead of hanging). Starting a process that imports torch costs seconds here, so each W runs every check
in one spawn. MOE_KERNELS_TEST_DISTRIBUTED=full adds larger layers, more routers and activations, and the
Triton backend under the interpreter; the default is the quick set.

Tolerance: everything is float64 and both sides compute the same sums in different row groupings, so the
float64 floor of helpers.assert_close (1e-10 of the magnitude) applies.
"""
from __future__ import annotations

import copy
import datetime
import multiprocessing
import os
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe_kernels
from helpers import assert_close, randomize_, skewed_input
from moe_kernels import parallel, reference
from moe_kernels.parallel import assignment_counts, expert_parallel, kept_counts, rows_between_ranks

FULL = os.environ.get("MOE_KERNELS_TEST_DISTRIBUTED") == "full"
TIMEOUT = datetime.timedelta(seconds=60)

# (d_model, d_ff, E per rank, k, router, activation, capacity_factor, token shapes of ranks 0, 1, ..., skew, eval)
# Token shapes cycle over the ranks: uneven counts, an empty rank, a 3-D input.
QUICK_CASES = [
    (12, 10, 2, 2, "topk", "swiglu", None, [(5,), (0,), (2, 3), (9,)], False, False),
    (10, 8, 2, 1, "switch", "relu", 0.75, [(7,), (4,), (0,), (11,)], True, False),
    (8, 6, 1, "E", "topk", "geglu", None, [(3,), (6,), (1,), (0,)], False, False),
    (12, 8, 2, 2, "topk", "swiglu", 0.5, [(9,), (6,), (12,), (1,)], False, False),
]
PRIORITY_CASE = QUICK_CASES[3]  # capacity with k = 2: where the priority order matters
FULL_CASES = [
    (16, 24, 4, 4, "topk", "silu", 1.25, [(33,), (17,), (0,), (40,)], False, False),
    (10, 12, 2, 2, "noisy_topk", "gelu", None, [(8,), (13,), (5,), (0,)], False, True),
    (9, 14, 3, 3, "topk", "gpt_oss_swiglu", 1.0, [(2, 7), (11,), (6,), (3,)], True, False),
    (16, 16, 4, 1, "switch", "relu", 1.0, [(64,), (0,), (31,), (50,)], False, False),
]


def _cases(world: int) -> list[tuple]:
    return QUICK_CASES + (FULL_CASES if FULL else [])


# ---------------------------------------------------------------------------------------------------------
# In one process: the capacity priority and the conversion's own errors.


@pytest.mark.parametrize(
    "world,slots,experts_per_rank,capacity", [(2, 2, 3, 2), (4, 3, 1, 5), (3, 1, 2, 3), (4, 2, 2, 0), (2, 4, 2, None)]
)
def test_kept_counts_is_the_single_process_priority(world, slots, experts_per_rank, capacity):
    """Each rank keeps, per (slot, expert), exactly what the single-process layer keeps of that rank's
    assignments on the concatenated tokens (reference.kept_assignments: slot-major, then token order)."""
    generator = torch.Generator().manual_seed(zlib.crc32(repr((world, slots, experts_per_rank, capacity)).encode()))
    num_experts = world * experts_per_rank
    tokens = [int(t) for t in torch.randint(4, 9, (world,), generator=generator)]
    if world > 2:
        tokens[1] = 0  # an empty rank among non-empty ones
    # Skewed: expert 0 is often first and often second choice, so a small capacity drops some of each.
    scores = torch.rand(sum(tokens), num_experts, generator=generator) + 0.5 * (torch.arange(num_experts) == 0)
    experts = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :slots].to(torch.int32)
    kept_reference = reference.kept_assignments(experts, num_experts, capacity)

    per_rank = experts.split(tokens)
    counts = torch.stack([assignment_counts(e, num_experts, by_slot=True) for e in per_rank])
    kept = kept_counts(counts, capacity)
    for rank, (rank_experts, rank_kept) in enumerate(zip(per_rank, kept_reference.split(tokens))):
        expected = assignment_counts(torch.where(rank_kept, rank_experts, num_experts), num_experts + 1, by_slot=True)
        assert torch.equal(kept[rank], expected[:, :num_experts]), f"rank {rank}"
    sent = rows_between_ranks(kept)
    assert sent.sum() == kept_reference.sum()
    owner = experts.long() // experts_per_rank
    source = torch.repeat_interleave(torch.arange(world), torch.tensor(tokens))
    expected_sent = torch.zeros(world, world, dtype=torch.long).index_put_(
        (source[:, None].expand_as(owner)[kept_reference], owner[kept_reference]), torch.tensor(1), accumulate=True
    )
    assert torch.equal(sent, expected_sent)
    if capacity and slots > 1:
        rank_first = kept_counts(counts.reshape(1, -1, num_experts), capacity).view_as(counts)
        assert not torch.equal(rank_first, kept), "the data cannot tell the priorities apart"


def test_expert_parallel_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(moe_kernels.MoE(8, 8, 4, k=2))


def test_expert_parallel_takes_only_the_fast_layer():
    with pytest.raises(TypeError, match="moe_kernels.MoE"):
        expert_parallel(reference.MoE(8, 8, 4, k=2))


# ---------------------------------------------------------------------------------------------------------
# In W processes.


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world, tmp_path):
    """Every check of _worker, in W processes."""
    spawn(_worker, world, tmp_path, _cases(world))


def spawn(function, world: int, directory, *args) -> None:
    """Run function(rank, world, *args) in W processes joined in a gloo group; a failure reports every
    rank's traceback (the rank torch.multiprocessing names is not always the first to fail).

    The processes fork from a server that imported torch and this module once (start method "forkserver"),
    instead of each importing them again (seconds each on two cores).
    """
    multiprocessing.set_forkserver_preload(["torch", "moe_kernels", __name__])
    try:
        arguments = (function, world, str(directory), *args)
        mp.start_processes(_run_logged, args=arguments, nprocs=world, start_method="forkserver")
    except mp.ProcessRaisedException:
        logs = sorted(directory.glob("rank*.log"))
        report = "\n".join(f"---- {log.name}\n{log.read_text()}" for log in logs)
    else:
        return
    pytest.fail(report, pytrace=False)


def _run_logged(rank: int, function, world: int, directory: str, *args) -> None:
    rendezvous = f"file://{directory}/rendezvous"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        function(rank, world, *args)
    except BaseException:
        with open(f"{directory}/rank{rank}.log", "w") as log:
            log.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, cases: list[tuple]) -> None:
    torch.set_num_threads(1)
    for case in cases:
        _check_case(case, rank, world)
    _assert_priorities_differ(PRIORITY_CASE, world)
    _check_case(cases[0], rank, world, frozen_rank=0)
    _check_determinism(cases[0], rank, world)
    _check_no_grad(cases[0], rank, world)
    _check_state_dicts(rank, world)
    _check_misconfigured_groups(rank, world)
    if FULL:
        _check_case(cases[0], rank, world, backend="triton", dtype=torch.float32)
        _check_case(cases[1], rank, world, backend="triton", dtype=torch.float32)


def _build(case: tuple, world: int):
    """The full float64 reference layer and every rank's tokens and output gradients (same on every rank)."""
    d, d_ff, per_rank, k, router, activation, capacity, shapes, skew, evaluation = case
    num_experts = per_rank * world
    torch.manual_seed(zlib.crc32(repr((case, world)).encode()))
    full = reference.MoE(d, d_ff, num_experts, k=num_experts if k == "E" else k, router=router,
                         activation=activation, capacity_factor=capacity)
    full = randomize_(full, skew).double().train(not evaluation)
    xs = [skewed_input(shapes[r % len(shapes)] + (d,), skew, full).detach().double() for r in range(world)]
    dys = [torch.randn(x.shape, dtype=torch.float64) for x in xs]
    return full, xs, dys


def _single_process(layer, xs, dys):
    """``layer`` on the concatenated tokens: y, x.grad and every parameter's gradient of Σ_r (y_r·dy_r + aux_r),
    with aux_r the layer's aux loss on rank r's tokens alone; and every aux_r. All float64."""
    d, dtype = layer.d_model, next(layer.parameters()).dtype
    x = torch.cat([x.reshape(-1, d) for x in xs]).to(dtype).requires_grad_()
    y = layer(x)
    loss = (y.double() * torch.cat([dy.reshape(-1, d) for dy in dys])).sum()
    aux = []
    for rank_x in x.split([rank_x.numel() // d for rank_x in xs]):
        layer(rank_x)
        aux.append(layer.aux_loss.detach().double())
        loss = loss + layer.aux_loss.double()
    parameters = dict(layer.named_parameters())
    gradients = torch.autograd.grad(loss, [x] + list(parameters.values()), allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for p, g in zip([x] + list(parameters.values()), gradients)]
    layer.aux_loss = None  # a graph's output: the layer must stay deep-copyable
    parameter_gradients = {name: g.double() for name, g in zip(parameters, gradients[1:])}
    return y.detach().double(), gradients[0].double(), parameter_gradients, aux


def _expert_parallel_step(full, x, dy, backend: str = "torch", dtype=torch.float64, x_requires_grad: bool = True):
    """Convert a copy of ``full`` and run forward and backward of y·dy + aux_loss on this rank's tokens."""
    layer = expert_parallel(moe_kernels.MoE.from_reference(copy.deepcopy(full).to(dtype), backend=backend))
    x = x.to(dtype).requires_grad_(x_requires_grad)
    y = layer(x)
    ((y.double() * dy).sum() + layer.aux_loss.double()).backward()
    return layer, y.detach(), x.grad


def _check_case(case, rank, world, backend: str = "torch", dtype=torch.float64, frozen_rank: int | None = None):
    """y, x.grad, aux_loss, the summed router gradient and the local experts' gradients of this rank against
    the single-process layer on every rank's tokens. float64: against the reference loop; other dtypes: at most
    2× (3× for gradients) the error of the single-process fast layer at that dtype (helpers' rule).
    ``frozen_rank``: that rank's tokens need no gradient (the others' still get theirs)."""
    full, xs, dys = _build(case, world)
    exact = _single_process(full, xs, dys)
    baseline = exact
    if dtype != torch.float64:
        single = moe_kernels.MoE.from_reference(copy.deepcopy(full).to(dtype), backend=backend)
        baseline = _single_process(single, xs, dys)
    layer, y, x_grad = _expert_parallel_step(full, xs[rank], dys[rank], backend, dtype, rank != frozen_rank)
    router_grad = layer.gate.weight.grad.double()
    dist.all_reduce(router_grad)

    what = f"case {case}, W={world}, rank {rank}, {backend}, {dtype}"
    counts = [x.reshape(-1, full.d_model).shape[0] for x in xs]
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])

    def check(actual, pick, factor, name):
        assert_close(actual.double(), pick(*baseline), pick(*exact), dtype, factor, f"{name}, {what}")

    local = slice(rank * full.num_experts // world, (rank + 1) * full.num_experts // world)
    assert y.shape == xs[rank].shape, what
    check(y.reshape(-1, full.d_model), lambda y, x_grad, grads, aux: y[mine], 2, "y")
    if rank == frozen_rank:
        assert x_grad is None, what
    else:
        check(x_grad.reshape(-1, full.d_model), lambda y, x_grad, grads, aux: x_grad[mine], 3, "x.grad")
    check(layer.aux_loss.detach(), lambda y, x_grad, grads, aux: aux[rank], 2, "aux_loss")
    check(router_grad, lambda y, x_grad, grads, aux: grads["gate.weight"], 3, "gate.weight.grad summed over ranks")
    for name, parameter in layer.experts.named_parameters():
        key = f"experts.{name}"
        check(parameter.grad, lambda y, x_grad, grads, aux: grads[key][local], 3, f"{key}.grad")


def _assert_priorities_differ(case, world):
    """The data of ``case`` tells slot-major-then-rank priority from rank-first priority (else its capacity
    check could not fail for the wrong one)."""
    full, xs, _ = _build(case, world)
    backend = moe_kernels.backends.resolve("torch", torch.device("cpu"))
    routed = [parallel._route(full, backend, x.reshape(-1, full.d_model))[1] for x in xs]
    counts = torch.stack([assignment_counts(e, full.num_experts, by_slot=True) for e in routed])
    total = sum(e.shape[0] for e in routed)
    capacity = moe_kernels.pipeline.expert_capacity(full.capacity_factor, total, full.k, full.num_experts)
    rank_first = kept_counts(counts.reshape(1, -1, full.num_experts), capacity).view_as(counts)
    assert not torch.equal(rank_first, kept_counts(counts, capacity)), f"{case}: the data cannot tell the orders apart"


def _check_no_grad(case, rank, world):
    """Under torch.no_grad (no graph, no exchange in backward) the output is the one of grad mode."""
    full, xs, dys = _build(case, world)
    layer, y, _ = _expert_parallel_step(full, xs[rank], dys[rank], dtype=torch.float32)
    with torch.no_grad():
        y_no_grad = layer(xs[rank].float())
    assert not y_no_grad.requires_grad
    assert_close(y_no_grad.double(), y.double(), y.double(), torch.float32, 1, f"y under no_grad, rank {rank}")


def _check_determinism(case, rank, world):
    """Two runs (1 and 2 threads) give bitwise the same outputs and gradients."""
    full, xs, dys = _build(case, world)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        layer, y, x_grad = _expert_parallel_step(full, xs[rank], dys[rank])
        results.append([y, x_grad] + [p.grad for p in layer.parameters()])
    torch.set_num_threads(1)
    for index, (first, second) in enumerate(zip(*results)):
        assert torch.equal(first, second), f"result {index} differs between runs on rank {rank}"


def _check_state_dicts(rank, world):
    """Local state dicts keep the names; full ones load (taking the slice) and come back whole."""
    torch.manual_seed(11)
    full = randomize_(moe_kernels.MoE(8, 6, 2 * world, k=2, activation="swiglu"))
    other = randomize_(moe_kernels.MoE(8, 6, 2 * world, k=2, activation="swiglu"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), copy.deepcopy(full))
    expected_model_state = {name: value.clone() for name, value in model.state_dict().items()}
    expert_parallel(model[1])

    local_state = model.state_dict()
    assert list(local_state) == list(expected_model_state)
    assert local_state["1.experts.down_proj"].shape == (2, 8, 6)
    for name, value in parallel.full_state_dict(model).items():
        assert torch.equal(value, expected_model_state[name]), name

    layer = model[1]
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.experts.gate_up_proj, other.experts.gate_up_proj[2 * rank : 2 * rank + 2])
    for name, value in layer.full_state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    layer.experts.down_proj.data.zero_()
    layer.load_state_dict(local_state_of(other, rank))
    assert torch.equal(layer.experts.down_proj, other.experts.down_proj[2 * rank : 2 * rank + 2])


def local_state_of(layer, rank):
    return {name: value[2 * rank : 2 * rank + 2] if name.startswith("experts.") else value
            for name, value in layer.state_dict().items()}


def _check_misconfigured_groups(rank, world):
    """Each mistake gets a ValueError naming it, on every rank, and the group stays usable."""
    with pytest.raises(ValueError, match=f"num_experts={world + 1} is not divisible"):
        expert_parallel(moe_kernels.MoE(8, 6, world + 1, k=1))
    with pytest.raises(ValueError, match="d_ff=6 on rank 0, 7 on rank 1"):
        expert_parallel(moe_kernels.MoE(8, 6 + (rank == 1), world, k=1))
    layer = expert_parallel(moe_kernels.MoE(8, 6, world, k=1))
    with pytest.raises(ValueError, match="torch.float64 .*torch.float32|one dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64 if rank == 0 else torch.float32))
    lonely = dist.new_group([0])
    if rank == 1:
        with pytest.raises(ValueError, match="not a member"):
            expert_parallel(moe_kernels.MoE(8, 6, world, k=1), lonely)
    dist.barrier()
