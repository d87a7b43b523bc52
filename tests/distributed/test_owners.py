"""Moments sharded by owner: each dense moment is summed to one process, which solves it.

Two "processes" run as two threads of this one (a barrier-based sum stands in for the
collectives), so the whole gather → solve → summarise path runs with its real collectives
order; ``tests/distributed/test_ddp.py`` runs the same under 2-process gloo DDP.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from thread_ranks import ThreadWorld, in_threads
from torch import nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.analysis.results import LayerConditioning
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.distributed.owners import owners_of
from lightning_conditioning.maths.accumulate import LayerWindow
from lightning_conditioning.maths.solvers import SKETCH, SolverPlan, plan_solver

WIDTH = 64


def _net(width: int = WIDTH) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 32), nn.Tanh(), nn.Linear(32, 5)).double()


@functools.cache
def _template(width: int) -> nn.Sequential:
    """Built once, in the test's thread: threads building their own would draw their weights
    from the one global generator at once (each rank would get other weights)."""
    return _net(width)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return (
        torch.randn(24, 12, generator=generator, dtype=torch.float64),
        torch.randint(0, 5, (24,), generator=generator),
    )


def _run(
    x: torch.Tensor,
    y: torch.Tensor,
    collectives: Collectives | None,
    solver: SolverPlan | None = None,
    width: int = WIDTH,
    budget: int | str = "auto",
) -> tuple[dict[str, LayerConditioning], int]:
    net = copy.deepcopy(_template(width))
    monitor = ConditioningMonitor(
        net,
        every_n_steps=1,
        collectives=collectives,
        warn_diagnosis=False,
        analysis="sync",
        step_overhead=None,
        solver=solver,
        loss_reduction="sum",
        memory_budget=budget,
    )  # type: ignore[arg-type]
    with monitor.track(0):
        nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    monitor.close()
    if width != WIDTH:  # a 600-wide Σ∇h (2.9 MB) does not fit 512 KiB: it is sketched
        assert monitor.plan is not None and monitor.plan.of("0", "grad").method == "sketch"
    return monitor.results, monitor.moment_bytes


def _two_ranks(
    x: torch.Tensor, y: torch.Tensor, owners: bool = True, **options: object
) -> tuple[list[tuple[dict[str, LayerConditioning], int]], ThreadWorld]:
    world = ThreadWorld(2)
    split = 10  # uneven on purpose
    _template(int(options.get("width", WIDTH)))  # type: ignore[call-overload]

    def work(rank: int) -> tuple[dict[str, LayerConditioning], int]:
        part = slice(0, split) if rank == 0 else slice(split, None)
        return _run(x[part], y[part], world.collectives(rank, owners), **options)  # type: ignore[arg-type]

    return in_threads(world, work), world  # type: ignore[return-value]


def _assert_same(results: dict[str, LayerConditioning], reference: dict[str, LayerConditioning]) -> None:
    assert set(results) == set(reference)
    for name, expected in reference.items():
        got = results[name]
        assert (got.status, got.note) == (expected.status, expected.note), name
        assert got.metrics() == pytest.approx(expected.metrics(), rel=1e-9, nan_ok=True), name


def test_each_dense_moment_lives_on_its_owner_and_the_numbers_are_one_process() -> None:
    x, y = _data()
    alone, alone_bytes = _run(x, y, None)
    ranks, world = _two_ranks(x, y)
    assert sorted(set(world.reduced_to)) == [0, 1]  # both ranks own something
    for results, _ in ranks:
        _assert_same(results, alone)
    assert ranks[0][0]["0"].metrics() == ranks[1][0]["0"].metrics()  # bit-equal across ranks
    held = [bytes_ for _, bytes_ in ranks]
    # Σx 12² + Σ∇h 64², 64² + 32², 32² + 5² (float64): each rank holds about half, the
    # diagonals of the others' moments aside
    assert all(b < 0.65 * alone_bytes for b in held), (held, alone_bytes)
    assert sum(held) == pytest.approx(alone_bytes, rel=0.05)


def test_a_sketched_moment_is_merged_and_solved_on_its_owner_only() -> None:
    """The first layer's 600-wide Σ∇h is sketched (a 512 KiB budget): every rank's sketch is
    reduced to the layer's owner, which merges and solves it; the other rank gets its
    eigenvalues back. 24 rows fit the sketch: exact, and equal to one process."""
    x, y = _data()
    budget = 512 << 10
    alone, alone_bytes = _run(x, y, None, width=600, budget=budget)
    ranks, world = _two_ranks(x, y, width=600, budget=budget)
    for results, _ in ranks:
        _assert_same(results, alone)
        assert results["0"].grad is not None and results["0"].grad.exact
    held = [bytes_ for _, bytes_ in ranks]
    assert min(held) < 0.5 * alone_bytes and sum(held) == pytest.approx(alone_bytes, rel=0.05), (held, alone_bytes)


def test_without_a_reduce_to_owner_every_rank_holds_every_moment() -> None:
    x, y = _data()
    alone, alone_bytes = _run(x, y, None)
    ranks, world = _two_ranks(x, y, owners=False)
    assert world.reduced_to == []
    for results, bytes_ in ranks:
        _assert_same(results, alone)
        assert bytes_ == alone_bytes


def test_a_non_finite_moment_is_reported_alike_on_every_rank() -> None:
    """Rank 1's rows hold an Inf: the first layer's Σx is non-finite. Its owner sees the
    matrix, the other rank only its diagonal and the owner's word; both report what one
    process reports."""
    x, y = _data()
    x[15, 3] = math.inf
    alone, _ = _run(x, y, None)
    assert alone["0"].status == "nonfinite"
    ranks, _ = _two_ranks(x, y)
    for results, _ in ranks:
        _assert_same(results, alone)


def test_a_moment_whose_solver_cannot_share_stays_on_every_rank() -> None:
    """A solver plan that gives 64-wide moments an approximate solver (solved on every rank,
    its spectrum cannot travel back): the layers holding one get no owner (all-reduced)."""

    def plan(layer: str, dim: int):  # type: ignore[no-untyped-def]
        return SKETCH if dim == WIDTH else plan_solver(None, layer, dim)

    windows = {
        name: LayerWindow(i, g, i, torch.device("cpu"))
        for name, (i, g) in {"0": (12, WIDTH), "2": (WIDTH, 32), "4": (32, 5)}.items()
    }
    shardable = lambda layer, dim: plan_solver(plan, layer, dim) is not SKETCH  # noqa: E731
    assert owners_of(windows, {}, set(), 2, shardable) == {"4": 0}
    # by the values held: "2" (64² + 32²) to rank 0, "0" (12² + 64²) and "4" (32² + 5²) to rank 1
    assert owners_of(windows, {}, set(), 2) == {"0": 1, "2": 0, "4": 1}
