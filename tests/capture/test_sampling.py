"""Issue 21: a bounded cost per analysed step whatever the tokens per step. Passes of more than
``max_rows`` rows add a uniform sample to each moment, weighted to stand for every row; the
relative standard error of λmax that the sampling leaves is measured and logged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from thread_ranks import ThreadWorld, in_threads
from torch import nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.capture.plan import MomentPlan
from lightning_conditioning.capture.turns import TurnTaker
from lightning_conditioning.distributed.owners import sum_windows
from lightning_conditioning.maths.accumulate import LayerWindow, SecondMomentSum
from lightning_conditioning.maths.sampling import DEFAULT_ROW_LIMIT, RowSampler, SampleTally
from lightning_conditioning.maths.sketch import SketchedMomentSum


def _rows(count: int, dim: int, seed: int = 0, tail: float = 0.0) -> torch.Tensor:
    """Rows with a decaying spectrum (and, with ``tail``, a heavy-tailed scale per row)."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    rows = torch.randn(count, dim, generator=generator, dtype=torch.float64) * scales
    if tail:
        rows *= torch.exp(tail * torch.randn(count, 1, generator=generator, dtype=torch.float64))
    return rows


def _chosen(count: int, limit: int, seed: int = 0) -> torch.Tensor:
    """The rows a fresh sampler draws first (its own generator, seeded alike)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]


def test_a_sampled_sum_is_the_scaled_gram_of_the_drawn_rows_and_leaves_the_global_generator_alone() -> None:
    rows = _rows(500, 12)
    total = SecondMomentSum(12, torch.device("cpu"), track_row_sum=True, sampler=RowSampler(64))
    state = torch.get_rng_state()
    total.add_rows(rows)
    assert torch.equal(torch.get_rng_state(), state)  # training draws stay bit-identical
    kept = rows.numpy()[_chosen(500, 64).numpy()]
    assert total.rows == 500 and total.tally.kept == 64 and total.tally.rows == 500
    np.testing.assert_allclose(total.sum_outer.numpy(), kept.T @ kept * (500 / 64), rtol=1e-12)
    assert total.sum_rows is not None
    np.testing.assert_allclose(total.sum_rows.numpy(), kept.sum(0) * (500 / 64), rtol=1e-12)
    # the homogeneous moment stays a Gram of rows (positive semi-definite)
    assert torch.linalg.eigvalsh(total.mean(homogeneous=True)).min() > -1e-12


def test_within_the_limit_every_row_enters_bit_for_bit() -> None:
    rows = _rows(300, 9).float()
    sampled = SecondMomentSum(9, torch.device("cpu"), sampler=RowSampler(300))
    plain = SecondMomentSum(9, torch.device("cpu"))
    sampled.add_rows(rows, 2.5)
    plain.add_rows(rows, 2.5)
    assert torch.equal(sampled.mean(), plain.mean()) and not sampled.tally.sampled


def test_a_sampled_sketch_stands_for_every_row_and_keeps_an_exact_diagonal_of_its_sample() -> None:
    rows = _rows(900, 40, seed=1)
    sketch = SketchedMomentSum(
        40, torch.device("cpu"), rank=8, block_rows=80, track_diagonal=True, sampler=RowSampler(100)
    )
    sketch.add_rows(rows, 3.0)
    kept = rows.numpy()[_chosen(900, 100).numpy()]
    reference = 3.0 * (900 / 100) * kept.T @ kept / 900
    mean = sketch.mean()
    assert sketch.rows == 900 and sketch.tally.kept == 100
    assert mean.diagonal is not None
    np.testing.assert_allclose(mean.diagonal.numpy(), np.diag(reference), rtol=1e-12)
    sketch.add_rows(rows, 3.0)  # the budget is spent: nothing enters, nothing is counted
    assert sketch.rows == 900 and sketch.tally.rows == 1800 and sketch.tally.counted == 900
    low = float(torch.linalg.eigvalsh(torch.as_tensor(reference))[-1])
    values, delta = sketch.sketcher.eigenvalues()
    assert float(values[0]) / 900 <= low * (1 + 1e-9) <= float(values[0]) / 900 + delta / 900 + 1e-12


@pytest.mark.parametrize("tail", [0.0, 0.5, 1.0])
def test_the_reported_error_matches_the_spread_of_lambda_max_over_independent_samples(tail: float) -> None:
    """The sum is unbiased; λmax of a sample is not (convexity: it sits above the full λmax
    on average, by less than the reported error at a light tail), and the reported error is its
    standard deviation, measured on the sample (heavy-tailed rows: a wider bar)."""
    rows = _rows(6000, 24, seed=2, tail=tail)
    full_sum = rows.T @ rows
    full = float(torch.linalg.eigvalsh(full_sum)[-1])
    estimates, reported, sums = [], [], []
    for seed in range(60):
        total = SecondMomentSum(24, torch.device("cpu"), sampler=RowSampler(400, seed=seed))
        total.add_rows(rows)
        sums.append(total.sum_outer.clone())
        estimates.append(float(torch.linalg.eigvalsh(total.sum_outer)[-1]) / full)
        reported.append(total.tally.relative_error())
    one = float((sums[0] - full_sum).norm() / full_sum.norm())
    assert float((torch.stack(sums).mean(0) - full_sum).norm() / full_sum.norm()) < 2.5 * one / math.sqrt(60)
    spread = float(np.std(estimates, ddof=1))
    assert 1 / 1.5 < float(np.median(reported)) / spread < 1.5, (np.median(reported), spread)
    if tail == 0.0:
        assert 0 <= float(np.mean(estimates)) - 1 < float(np.median(reported))


def test_the_tallies_sum_over_processes_like_the_row_counts() -> None:
    world = ThreadWorld(2)
    parts = [_rows(700, 6, seed=3), _rows(300, 6, seed=4)]

    def work(rank: int) -> tuple[int, int, float]:
        window = LayerWindow(6, 3, 6, torch.device("cpu"), sampler=RowSampler(200))
        window.input.add_rows(parts[rank])
        window.grad.add_rows(parts[rank][:, :3])
        sum_windows({"fc": window}, set(), {}, world.collectives(rank).all_reduce, None, rank)
        tally = window.input.tally
        return window.input.rows, tally.kept, tally.relative_error()

    (rows, kept, error), other = in_threads(world, work)  # type: ignore[misc]
    assert (rows, kept) == (1000, 200 + 200) and other == (rows, kept, error)
    alone = SampleTally()
    RowSampler(200).sample(parts[0], 1.0, alone)
    assert 0 < error < alone.relative_error()  # two samples: a smaller error than one


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


def _train(monitor_options: dict[str, object] | None, tokens: int) -> tuple[nn.Module, ConditioningMonitor | None]:
    model = _TokenModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = (
        ConditioningMonitor(
            model,
            warn_diagnosis=False,
            analysis="sync",
            loss_reduction="token_mean",
            info=lambda _: None,
            **monitor_options,
        )
        if monitor_options is not None
        else None
    )
    generator = torch.Generator().manual_seed(5)
    for step in range(2):
        ids = torch.randint(0, 50, (4, tokens // 4), generator=generator)
        if monitor is not None:
            with monitor.track(step):
                nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        else:
            nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, monitor


def test_by_default_a_pass_of_more_than_2048_tokens_is_sampled_and_says_so_and_training_is_unchanged() -> None:
    assert ConditioningOptions().max_rows == DEFAULT_ROW_LIMIT == 2048
    plain, _ = _train(None, 8192)
    model, monitor = _train({}, 8192)
    assert monitor is not None
    for mine, theirs in zip(model.parameters(), plain.parameters()):
        assert torch.equal(mine, theirs)
    result = monitor.results["up"]
    assert result.input_rows == result.grad_rows == 8192  # the mean is over every row
    kept, error = result.sampling["input"]
    assert kept == 2048 and 0 < error < 0.2
    assert result.input is not None and result.grad is not None and result.grad.rank <= 48
    metrics = result.metrics()
    assert metrics["conditioning/up/input_kept_rows"] == 2048
    assert metrics["conditioning/up/grad_sampling_error"] == pytest.approx(result.sampling["grad"][1])
    assert "conditioning/up/fim_sampling_error" in metrics
    # the embedding's Σx is token counts (a lookup: every row), its Σ∇h is sampled
    assert "input" not in monitor.results["embed"].sampling and "grad" in monitor.results["embed"].sampling
    # at or under the limit nothing is sampled or logged
    _, small = _train({}, 2048)
    assert small is not None and all(not r.sampling for r in small.results.values())
    assert not any("kept_rows" in k for r in small.results.values() for k in r.metrics())


def test_the_sampled_numbers_are_those_of_the_drawn_rows_against_a_float64_reference() -> None:
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(10, 6)).double()
    x = _rows(3000, 10, seed=6)
    monitor = ConditioningMonitor(
        layer,
        every_n_steps=1,
        warn_diagnosis=False,
        analysis="sync",
        loss_reduction="sum",
        max_rows=500,
        info=lambda _: None,
    )
    with monitor.track(0):
        layer(x).square().sum().backward()
    kept = x.numpy()[_chosen(3000, 500).numpy()]
    reference = kept.T @ kept * (3000 / 500) / 3000
    result = monitor.results["0"]
    assert result.input is not None
    assert result.input.lambda_max == pytest.approx(float(np.linalg.eigvalsh(reference)[-1]), rel=1e-10)
    for percent in (50, 80, 100):
        values = np.linalg.eigvalsh(reference)[::-1]
        assert result.input.kappa[percent] == pytest.approx(
            values[0] / values[math.ceil(percent / 100 * 10) - 1], rel=1e-8
        )
    monitor.close()


def test_under_gradient_accumulation_the_budget_is_per_step_and_spent_passes_are_left_out() -> None:
    """Three micro-batches of 1,500 rows, ``max_rows=2048``: the first enters whole, the second
    adds a sample of the 548 rows left, weighted 1,500/548, the third adds nothing and is not
    counted: the moment is the mean over the 3,000 rows of the first two passes."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(8, 4)).double()
    parts = [_rows(1500, 8, seed=seed) for seed in (7, 8, 9)]
    monitor = ConditioningMonitor(
        net, every_n_steps=1, warn_diagnosis=False, analysis="sync", loss_reduction="sum", info=lambda _: None
    )
    with monitor.track(0):
        for x in parts:
            net(x).square().sum().backward()
    second = parts[1].numpy()[_chosen(1500, 548).numpy()]
    first = parts[0].numpy()
    reference = (first.T @ first + second.T @ second * (1500 / 548)) / 3000
    result = monitor.results["0"]
    assert result.input is not None and result.input_rows == 3000
    assert result.sampling["input"][0] == 2048
    assert result.input.lambda_max == pytest.approx(float(np.linalg.eigvalsh(reference)[-1]), rel=1e-10)
    monitor.close()


def test_turns_take_a_share_of_a_plain_step_at_the_rows_kept() -> None:
    moments = [MomentPlan(f"l{i}", "grad", 1024, "dense", 0) for i in range(4)]
    taker = TurnTaker(moments, train_parameters=10**6, share=0.5)
    taker.scale = 1.0
    taker.observe_plain(40.0)
    taker.observe_rows({name: 8192 for name in taker.layers}, kept={name: 2048 for name in taker.layers})
    assert taker.kept_share() == 0.25 and math.isclose(taker.capacity(), 5.0)
    assert taker.rows["l0"] == 2048 and taker.seen["l0"] == 8192  # the cost model: the kept rows
    restored = TurnTaker(moments, train_parameters=10**6, share=0.5)
    restored.load_state_dict(taker.state_dict())
    assert restored.kept_share() == 0.25


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "2048"])
def test_max_rows_must_be_a_positive_int_or_none(bad: object) -> None:
    with pytest.raises(ValueError, match="max_rows"):
        ConditioningOptions(max_rows=bad)  # type: ignore[arg-type]
    assert ConditioningOptions(max_rows=None).max_rows is None


def test_layers_that_share_one_input_report_its_sampling_too() -> None:
    class QKV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(x) * self.k(x) + self.v(x)

    model = QKV()
    monitor = ConditioningMonitor(model, every_n_steps=1, analysis="sync", warn_diagnosis=False, info=lambda _: None)
    with monitor.track(0):
        model(torch.randn(3000, 8)).square().mean().backward()
    readings = {name: monitor.results[name].sampling["input"] for name in ("q", "k", "v")}
    assert len(set(readings.values())) == 1 and readings["q"][0] == 2048
    assert {monitor.results[name].input_rows for name in readings} == {3000}
    monitor.close()
