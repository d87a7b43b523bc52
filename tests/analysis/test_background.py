"""Analyses in a background thread: the same numbers as in the training thread, logged at the
step they belong to, training untouched, the user's thread setting untouched."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time

import pytest
import torch
from helpers import SequentialClassifier, fit, loader, seeded
from torch import nn

from lightning_conditioning import ConditioningCallback, ConditioningMonitor


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _run(net: nn.Module, analysis: str) -> tuple[dict[int, dict[str, float]], list[int], list[torch.Tensor]]:
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    seen: dict[int, dict[str, float]] = {}
    updated_at: list[int] = []
    with ConditioningMonitor(net, every_n_steps=2, analysis=analysis, warn_diagnosis=False) as monitor:
        for step in range(6):
            x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
            with monitor.track(step):
                nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            if monitor.updated:
                updated_at.append(step)
                seen[monitor.results_step] = {k: v for r in monitor.results.values() for k, v in r.metrics().items()}
        monitor.wait()
        if monitor.updated and monitor.results_step not in seen:
            seen[monitor.results_step] = {k: v for r in monitor.results.values() for k, v in r.metrics().items()}
    return seen, updated_at, [p.detach().clone() for p in net.parameters()]


def test_background_analysis_gives_the_same_numbers_at_the_same_steps() -> None:
    threads = torch.get_num_threads()
    sync, sync_updates, sync_params = _run(seeded(mlp), "sync")
    background, _, background_params = _run(seeded(mlp), "background")
    assert sorted(sync) == sorted(background) == [0, 2, 4]
    assert sync_updates == [0, 2, 4]
    for step in sync:
        assert set(sync[step]) == set(background[step])
        for key, value in sync[step].items():
            assert math.isclose(background[step][key], value, rel_tol=1e-12), key
    for a, b in zip(sync_params, background_params):
        assert torch.equal(a, b)  # training untouched
    assert torch.get_num_threads() == threads  # the worker set only its own thread


def test_callback_logs_background_results_at_their_own_step() -> None:
    x, y = torch.randn(96, 12), torch.randint(0, 5, (96,))
    initial = seeded(mlp)
    logged = {}
    for analysis in ("sync", "background"):
        callback = ConditioningCallback(every_n_steps=2, analysis=analysis, log_histograms=False, warn_diagnosis=False)
        _, logger = fit(SequentialClassifier(copy.deepcopy(initial)), loader(x, y, 16), [callback], max_steps=6)
        logged[analysis] = {
            step: {k: v for k, v in row.items() if k.startswith("conditioning/")}
            for step, row in logger.history.items()
        }
        logged[analysis] = {s: row for s, row in logged[analysis].items() if row}
    assert sorted(logged["sync"]) == sorted(logged["background"]) == [0, 2, 4]
    for step, row in logged["sync"].items():
        for key, value in row.items():
            assert math.isclose(logged["background"][step][key], value, rel_tol=1e-12), key


def _published_steps(monkeypatch, analysis: str, slow: bool, quick_steps: set[int]) -> list[int]:
    """Steps whose results a caller sees, logging :attr:`results` each time ``end``/``poll``/
    ``wait`` returns True (as the callbacks do), with each background analysis made slow so
    that it is still in flight when the next window ends."""
    import lightning_conditioning.analysis.window as window_module
    import lightning_conditioning.monitors.conditioning as monitor_module

    analyse = window_module.analyse_moments

    def slow_analysis(moments, step, *args, **kwargs):
        if slow:
            time.sleep(0.3)
        return analyse(moments, step, *args, **kwargs)

    monkeypatch.setattr(window_module, "analyse_moments", slow_analysis)
    estimate = iter([0.0 if step in quick_steps else 100.0 for step in range(6)])
    monkeypatch.setattr(monitor_module, "estimated_seconds", lambda moments: next(estimate))
    monkeypatch.setattr(monitor_module, "background_helps", lambda device: True)  # spare cores
    net = seeded(mlp)
    published: list[int] = []
    with ConditioningMonitor(net, every_n_steps=1, analysis=analysis, warn_diagnosis=False) as monitor:
        for step in range(6):
            if monitor.poll():
                published.append(monitor.results_step)
            x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
            with monitor.capture_pass() if monitor.begin(step) else contextlib.nullcontext():
                nn.functional.cross_entropy(net(x), y).backward()
            if monitor.end(step):
                published.append(monitor.results_step)
        if monitor.wait():
            published.append(monitor.results_step)
    return published


@pytest.mark.parametrize(
    "analysis,quick_steps", [("background", set()), ("auto", set()), ("auto", {1, 2, 4}), ("auto", {0, 3, 4, 5})]
)
def test_no_result_is_lost_when_analyses_overlap(monkeypatch, analysis: str, quick_steps: set[int]) -> None:
    """A window that ends while the previous analysis is still in flight waits for it and
    reports it in the same call; an analysis quick enough for the training thread goes to the
    background all the same while an earlier one is pending, so every window's results are
    published exactly once, in step order (CI lost steps 0 and 2 under load before)."""
    for slow in (True, False):
        assert _published_steps(monkeypatch, analysis, slow, quick_steps) == list(range(6))


@pytest.mark.parametrize("budget,overlap", [(250_000, False), (64 << 20, True)])
def test_a_window_waits_for_the_analysis_in_flight_when_two_windows_do_not_fit(
    monkeypatch, budget: int, overlap: bool
) -> None:
    """The analysed sums are the window's own memory (handed over, no copy); a window opening
    while they are analysed allocates new ones. When the plan has no room for both within
    ``memory_budget``, the window waits for the analysis: no step is captured while it runs."""
    import lightning_conditioning.analysis.window as window_module

    analyse = window_module.analyse_moments
    events: list[tuple[str, int]] = []

    def slow_analysis(moments, step, *args, **kwargs):
        time.sleep(0.4)  # the training thread runs the next step meanwhile (or waits)
        events.append(("analysed", step))
        return analyse(moments, step, *args, **kwargs)

    monkeypatch.setattr(window_module, "analyse_moments", slow_analysis)
    net = seeded(mlp)
    monitor = ConditioningMonitor(
        net, every_n_steps=1, analysis="background", memory_budget=budget, warn_diagnosis=False
    )
    assert monitor.plan is not None and monitor.plan.overlap_fits is overlap
    assert {m.method for m in monitor.plan.moments} == {"dense"}
    published = []
    with monitor:
        for step in range(3):
            x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
            with monitor.track(step):
                events.append(("captured", step))
                nn.functional.cross_entropy(net(x), y).backward()
            if monitor.updated:
                published.append(monitor.results_step)
        if monitor.wait():
            published.append(monitor.results_step)
    assert published == [0, 1, 2]
    waited = [("captured", 0), ("analysed", 0), ("captured", 1), ("analysed", 1), ("captured", 2), ("analysed", 2)]
    assert (events == waited) is not overlap


def test_auto_analyses_in_the_training_thread_when_every_core_trains(monkeypatch) -> None:
    """``"auto"`` sends a long analysis to the worker only when it can run beside training
    (an accelerator, or cores the training thread's intra-op threads leave free)."""
    import lightning_conditioning.monitors.conditioning as monitor_module
    from lightning_conditioning.analysis.window import background_helps

    monkeypatch.setattr(monitor_module, "estimated_seconds", lambda moments: 100.0)
    for spare, background in ((True, True), (False, False)):
        monkeypatch.setattr(monitor_module, "background_helps", lambda device, spare=spare: spare)
        net = seeded(mlp)
        with ConditioningMonitor(net, every_n_steps=1, warn_diagnosis=False) as monitor:
            with monitor.track(0):
                nn.functional.cross_entropy(net(torch.randn(8, 12)), torch.randint(0, 5, (8,))).backward()
            assert monitor.updated is not background  # analysed at once, or pending in the worker
            assert monitor._background.pending is background
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert background_helps(torch.device("cpu")) is (len(os.sched_getaffinity(0)) > 1)
        torch.set_num_threads(max(len(os.sched_getaffinity(0)), 1))
        assert not background_helps(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert background_helps(torch.device("meta"))


def test_solves_in_the_training_thread_use_one_thread_and_restore_the_users(monkeypatch) -> None:
    """An analysis in the training thread solves with one intra-op thread (an OpenMP team
    spinning on a busy core stalls small solves) and gives the user's setting back."""
    seen: list[int] = []
    eigvalsh = torch.linalg.eigvalsh

    def recording(matrix, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return eigvalsh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", recording)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        net = seeded(mlp)
        with ConditioningMonitor(net, every_n_steps=1, analysis="sync", warn_diagnosis=False) as monitor:
            with monitor.track(0):
                nn.functional.cross_entropy(net(torch.randn(32, 12)), torch.randint(0, 5, (32,))).backward()
            assert monitor.updated
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
