"""Issue 21: a bounded cost per analysed step. When analysing every layer at once would cost
more than ``step_overhead`` of a plain step, layers take turns across analysed steps; each
layer's numbers are those of a monitor analysing every layer at that step (exact, not
approximated), and only the analysed layers are published at each step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_conditioning.capture.turns as turns_module
from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.capture.plan import MomentPlan
from lightning_conditioning.capture.turns import TurnTaker, moment_seconds


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))


def test_cost_model_grows_with_rows_and_width_and_a_block_is_cheaper_than_dense_when_rows_are_few() -> None:
    dense = MomentPlan("fc", "grad", 3072, "dense", 0)
    sketch = MomentPlan("fc", "grad", 3072, "sketch", 0, rank=32, block=2048)
    assert moment_seconds(dense, 4096) > moment_seconds(dense, 2048) > moment_seconds(dense, 128)
    assert moment_seconds(sketch, 2048) < moment_seconds(dense, 2048)
    # beyond one block the rows are shrunk block by block: the cost grows linearly in rows
    assert math.isclose(moment_seconds(sketch, 8192), 4 * moment_seconds(sketch, 2048))
    assert moment_seconds(MomentPlan("emb", "input", 50257, "diagonal", 0), 2048) < 1e-3


def test_turns_cycle_through_every_layer_within_the_capacity_and_adapt_to_measurements() -> None:
    moments = [MomentPlan(f"l{i}", moment, 1024, "dense", 0) for i in range(6) for moment in ("input", "grad")]
    taker = TurnTaker(moments, train_parameters=6 * 1024 * 1024, share=0.5)
    one = taker.layer_seconds("l0")
    seen: list[str] = []
    for _ in range(3):
        turn = taker.next_turn(capacity=2.5 * one)
        assert turn is not None and len(turn) == 2
        seen += sorted(turn)
    assert seen == [f"l{i}" for i in range(6)]  # every layer once, in the model's order
    assert taker.next_turn(capacity=100 * one) is None  # all fit: no turns
    # measured plain steps set the capacity; an analysed step slower than modelled shrinks it
    taker.scale = 1.0
    for _ in range(3):
        taker.observe_plain(40.0)
    assert taker.plain_seconds() == 40.0 and math.isclose(taker.capacity(), 20.0)
    taker._plain = [1.0]
    assert math.isclose(taker.capacity(), 0.5)  # the share of a short step: no floor
    taker._plain = [40.0]
    taker.next_turn(capacity=2.5 * one)
    taker.observe_analysed(40.0 + 2 * (2 * one))  # twice the modelled extra of its two layers
    assert math.isclose(taker.scale, math.sqrt(2.0))
    # the turn's model is re-read at the rows its window held: a quarter of the rows guessed
    taker.next_turn(capacity=2.5 * one)
    turn = sorted(taker._turn or ())
    taker.observe_rows({name: turns_module.ROWS_GUESS // 4 for name in taker.layers})
    at_rows = sum(taker.layer_seconds(name) for name in turn)
    assert at_rows < 2 * one
    before = taker.scale
    taker.observe_analysed(40.0 + 2 * at_rows)
    assert math.isclose(taker.scale, math.sqrt(before * 2.0))
    state = taker.state_dict()
    again = TurnTaker(moments, train_parameters=1, share=0.5)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_a_model_over_the_floor_takes_turns_sized_by_the_share_of_a_short_step() -> None:
    """GPT-2 small at 512 tokens a step: the whole analysis is over MIN_TURN_SECONDS, the plain
    step short; the floor must not size the turns (it let one window take 47 of 51 layers)."""
    moments = [MomentPlan(f"l{i}", moment, 1024, "dense", 0) for i in range(40) for moment in ("input", "grad")]
    taker = TurnTaker(moments, train_parameters=10**6, share=0.35)
    assert not taker.fits_anywhere()
    for _ in range(3):
        taker.observe_plain(5.0)
    turn = taker.next_turn()
    assert turn is not None
    spent = sum(taker.layer_seconds(name) for name in turn)
    assert spent <= taker.capacity() or len(turn) == 1
    assert spent < turns_module.MIN_TURN_SECONDS / 2


def test_share_none_or_a_small_model_analyses_every_layer_every_time() -> None:
    monitor = ConditioningMonitor(_mlp(), every_n_steps=1, warn_diagnosis=False)
    assert monitor.turns is not None and monitor.turns.next_turn() is None  # under MIN_TURN_SECONDS
    with pytest.raises(ValueError, match="step_overhead"):
        ConditioningMonitor(_mlp(), step_overhead=0)
    monitor.close()


def test_layers_taking_turns_get_the_numbers_of_a_full_analysis_of_the_same_step(monkeypatch) -> None:
    monkeypatch.setattr(turns_module, "MIN_TURN_SECONDS", 0.0)
    model = _mlp()
    messages: list[str] = []
    turned = ConditioningMonitor(
        model, every_n_steps=1, analysis="sync", warn_diagnosis=False, step_overhead=1e-9, info=messages.append
    )
    full = ConditioningMonitor(model, every_n_steps=1, analysis="sync", warn_diagnosis=False, step_overhead=None)
    g = torch.Generator().manual_seed(1)
    windows = []
    for step in range(4):
        x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
        with turned.track(step), full.track(step):
            nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad()
        windows.append(sorted(turned.window_results))
        assert sorted(full.window_results) == ["0", "2", "4"]
        for name, result in turned.window_results.items():
            reference = full.window_results[name]
            assert result.step == reference.step == step
            for label in ("input", "grad", "fim"):
                assert getattr(result, label).lambda_max == getattr(reference, label).lambda_max
                assert getattr(result, label).kappa == getattr(reference, label).kappa
            torch.testing.assert_close(result.input.eigenvalues, reference.input.eigenvalues, rtol=0, atol=0)
        metrics = {k for r in turned.window_results.values() for k in r.metrics()}
        assert all(k.split("/")[1] in turned.window_results for k in metrics)
    assert windows == [["0"], ["2"], ["4"], ["0"]]  # one layer a step, in turn
    # results keep every layer's latest analysis, each with its own step
    assert {name: r.step for name, r in turned.results.items()} == {"0": 3, "2": 1, "4": 2}
    assert any("take turns" in m for m in messages)
    assert turned.state_dict()["turns"]["position"] == 1
    turned.close()
    full.close()


def test_a_plain_step_is_timed_from_its_first_micro_batch_to_the_next_step(monkeypatch) -> None:
    """The turns' plain-step period spans every micro-batch of the step (gradient accumulation
    calls ``begin`` once per micro-batch with the same step)."""
    import lightning_conditioning.monitors.conditioning as monitor_module

    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: next(clock))
    model = _mlp()
    monitor = ConditioningMonitor(model, every_n_steps=10, warn_diagnosis=False)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    for step in (1, 2):  # not scheduled: plain steps of three micro-batches each
        for micro in range(3):
            with monitor.track(step, last_micro_batch=micro == 2):
                nn.functional.cross_entropy(model(x), y).backward()
    monitor.begin(3)
    assert monitor.turns is not None and monitor.turns._plain == [3.0, 3.0]
    monitor.close()


def test_the_step_before_is_timed_before_the_next_window_takes_its_turn(monkeypatch) -> None:
    """The window opening at step 2 chooses its layers knowing plain step 1's period (it was
    timed after the turn was chosen, which left the turn on the cost model's plain step)."""
    model = _mlp()
    monitor = ConditioningMonitor(model, every_n_steps=2, warn_diagnosis=False)
    assert monitor.turns is not None
    plain_known: list[int] = []
    original = monitor._next_turn
    monkeypatch.setattr(monitor, "_next_turn", lambda: plain_known.append(len(monitor.turns._plain)) or original())
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    for step in range(3):
        with monitor.track(step):
            nn.functional.cross_entropy(model(x), y).backward()
    assert plain_known == [0, 1]  # step 0: none yet; step 2: step 1's
    monitor.close()


def test_the_modelled_plain_step_follows_the_median_layers_rows_not_a_per_pixel_one() -> None:
    """A ViT's patch embedding (or a ResNet's first convolution) reads a row per pixel: before
    a plain step is measured, the modelled plain step follows the typical layer's rows (taking
    the largest made ViT-B/16's plain step 49 minutes, and one window took every layer)."""
    moments = [MomentPlan(f"l{i}", "input", 768, "dense", 0) for i in range(5)]
    taker = TurnTaker(moments, train_parameters=86_000_000, share=0.35)
    taker.observe_rows({"l0": 401_408, **{f"l{i}": 1_576 for i in range(1, 5)}})
    expected = turns_module.TRAIN_SECONDS * 6 * 86_000_000 * 1_576
    assert math.isclose(taker.plain_seconds(), expected)
    taker.observe_plain(5.0)
    assert taker.plain_seconds() == 5.0
