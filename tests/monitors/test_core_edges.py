"""Edges of the core found in review: nothing resolved, autocast, late gradients, window gaps,
computed vs structural zeros, per-rank precisions, collective devices, RNG, state keys."""

from __future__ import annotations

import copy
import types
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_conditioning import ConditioningCallback, ConditioningMonitor, WeightDominationCallback
from lightning_conditioning.analysis.results import analyse_layer
from lightning_conditioning.capture.hooks import LayerCapture, find_layers
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.maths.accumulate import LayerMoments
from lightning_conditioning.maths.precision import float64_slowdown
from lightning_conditioning.maths.spectra import summarize_spectrum


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _step(model: nn.Module, n: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("definition", ["paper", "nonzero"])
def test_nothing_resolved_gives_lower_bounds_never_an_exact_value(definition: str) -> None:
    values = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    summary = summarize_spectrum(values, (50, 100), rtol=1.0, definition=definition)  # type: ignore[arg-type]
    assert summary.rank == 0
    assert summary.kappa_status == {50: "lower_bound", 100: "lower_bound"}
    assert summary.kappa == {50: 1.0, 100: 1.0}


def test_computed_zeros_are_not_structural_zeros() -> None:
    duplicated = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # x₂ = x₁
    moments = LayerMoments(duplicated, None, 8, 0, torch.ones(2), torch.ones(2))
    result = analyse_layer("fc", 0, moments, percents=(80, 100))
    assert result.input is not None and result.input.structural_rank == 2
    # λ₂ = 0 in exact arithmetic, but nothing structural says so: a bound, not ∞
    assert result.input.kappa_status[80] == "lower_bound"
    dead = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # unit 2 never active
    result = analyse_layer("fc", 0, LayerMoments(dead, None, 8, 0, torch.ones(2), torch.ones(2)), percents=(80,))
    assert result.input is not None and result.input.kappa_status[80] == "infinite"


def test_grams_leave_autocast_alone() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    capture = LayerCapture(find_layers(conv), statistics_dtype=torch.float32)
    capture.attach()
    capture.active = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(2, 3, 8, 8)).float().square().mean().backward()
    capture.detach()
    window = capture.windows["2"]
    assert window.input.resolution == 2.0**-7  # the rows were bf16 (autocast's output) …
    assert window.input.gram_roundoff == 2.0**-24  # … but the Gram was float32


def test_late_gradients_are_ignored_and_warned_about() -> None:
    model = mlp()
    twin = copy.deepcopy(model)  # no optimizer: the weights stay those of step 2
    monitor = ConditioningMonitor(model, every_n_steps=2, collectives=None, warn_diagnosis=False)
    with monitor.track(0):
        loss = _step(model)  # the backward is (wrongly) left outside the block
    loss.backward()
    assert monitor.results["2"].status == "no_grad"
    with pytest.warns(UserWarning, match="arrived after their window"):
        with monitor.track(2):
            _step(model, 32).backward()
    reference = ConditioningMonitor(twin, every_n_steps=1, collectives=None, warn_diagnosis=False)
    with reference.track(0):
        _step(twin, 32).backward()
    # step 0's stale gradient did not join step 2's window
    assert monitor.results["2"].grad_rows == 32
    assert monitor.results["2"].metrics() == pytest.approx(reference.results["2"].metrics(), rel=1e-12)
    monitor.close()
    reference.close()


def test_a_window_holds_consecutive_steps_only() -> None:
    model = mlp()
    monitor = ConditioningMonitor(model, every_n_steps=4, window_steps=3, collectives=None, warn_diagnosis=False)
    finished = []
    for step in (0, 1, 2, 4, 6, 8, 9, 10):  # 5 is skipped: the window 4-6 is incomplete
        with monitor.track(step):
            _step(model).backward()
        if monitor.updated:
            finished.append(step)
    assert finished == [2, 10]
    assert monitor.results["0"].input_rows == 3 * 16
    # a run resumed in the middle of a window waits for the next one
    with monitor.track(13):
        _step(model).backward()
    assert not monitor.capturing and monitor.current_step is None
    monitor.close()


def test_ranks_share_the_coarsest_precision() -> None:
    def filled(dtype: torch.dtype) -> LayerCapture:
        model = mlp()
        capture = LayerCapture(find_layers(model), statistics_dtype=torch.float64)
        capture.attach()
        capture.active = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _step(model).backward()
        capture.detach()
        return capture

    other, mine = filled(torch.bfloat16), filled(torch.float32)
    theirs: list[torch.Tensor] = []
    other.all_reduce(lambda tensor, op: theirs.append(tensor.clone()) or tensor)
    calls = iter(theirs)

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:  # two ranks: mine and other
        them = next(calls)
        return tensor + them if op == "sum" else torch.maximum(tensor, them)

    assert mine.windows["2"].input.resolution < 2.0**-7
    mine.all_reduce(reduce)
    assert mine.windows["2"].input.resolution == 2.0**-7  # the bf16 rank's rows set the floor
    assert mine.windows["2"].input.rows == 32


def test_collectives_reduce_from_their_device() -> None:
    seen: list[torch.device] = []

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        seen.append(tensor.device)
        return torch.full(tensor.shape, 2.0)

    group = Collectives(reduce, world_size=2, device=torch.device("meta"))
    out = group.all_reduce(torch.ones(3), "sum")
    assert seen == [torch.device("meta")] and out.device.type == "cpu" and out.tolist() == [2.0] * 3


def test_measuring_the_float64_slowdown_draws_no_random_numbers() -> None:
    before = torch.get_rng_state()
    assert float64_slowdown(torch.device("cpu"), size=64, repeats=1) > 0
    assert torch.equal(before, torch.get_rng_state())


def _set_up(callback: Any) -> Any:
    callback.setup(types.SimpleNamespace(callbacks=[callback]), None, "validate")  # type: ignore[arg-type]
    return callback


def test_state_keys_follow_the_prefix_only() -> None:
    first, second = _set_up(ConditioningCallback(every_n_steps=5)), _set_up(ConditioningCallback(every_n_steps=7))
    assert first.state_key == second.state_key == "ConditioningCallback{'prefix': 'conditioning'}"
    assert _set_up(ConditioningCallback(prefix="a")).state_key != _set_up(ConditioningCallback(prefix="b")).state_key
    assert (
        _set_up(WeightDominationCallback(prefix="a")).state_key
        != _set_up(WeightDominationCallback(prefix="b")).state_key
    )


def test_zero_gradient_layers_log_true_zeros_and_are_explained_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)  # a zero-initialised head: no gradient reaches layer 0
    monitor = ConditioningMonitor(model, every_n_steps=1, warn_diagnosis=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            with monitor.track(step):
                nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
    notes = [str(w.message) for w in caught if "zero statistics" in str(w.message)]
    assert len(notes) == 1 and "0: Σ∇h is exactly zero" in notes[0]  # once, with the reason
    metrics = monitor.results["0"].metrics("c")
    assert metrics["c/0/grad_lambda_max"] == 0.0 and metrics["c/0/fim_lambda_max"] == 0.0
    assert not any("kappa" in k for k in metrics if k.startswith("c/0/grad") or k.startswith("c/0/fim"))
    assert monitor.results["2"].note is None
    assert monitor.state_dict()["noted"] and monitor.results["0"].note.startswith("Σ∇h is exactly zero")
