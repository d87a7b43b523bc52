"""Moments too large to keep dense: the memory plan, Frequent Directions sketches with
certified error bars (against dense float64 eigenvalues), their merge over processes, and
real fits of a Linear(65536, 10) and a GPT-2-sized vocabulary head with the default options."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.capture.hooks import find_layers
from lightning_conditioning.capture.plan import plan_analysis
from lightning_conditioning.maths.sketch import FrequentDirections, SketchedMomentSum
from lightning_conditioning.maths.solvers import SketchSolver

SPECTRA = ("power_law", "flat", "outliers", "rank_deficient")


def _rows(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    """Rows whose Gram has the named spectrum shape."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    index = torch.arange(1, d + 1, dtype=torch.float64)
    scales = {
        "power_law": index**-1.0,
        "flat": torch.ones(d, dtype=torch.float64),
        "outliers": torch.cat(
            [torch.tensor([30.0, 20.0, 10.0], dtype=torch.float64), torch.ones(d - 3, dtype=torch.float64)]
        ),
        "rank_deficient": torch.cat(
            [torch.ones(d // 4, dtype=torch.float64), torch.zeros(d - d // 4, dtype=torch.float64)]
        ),
    }[kind]
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scales.sqrt() @ basis.T


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("d", [64, 512])
def test_sketch_intervals_hold_every_true_eigenvalue(kind: str, d: int) -> None:
    for seed in range(3):
        rows = _rows(kind, 3 * d, d, seed)
        sketch = FrequentDirections(d, rank=16, device=torch.device("cpu"))
        for chunk in rows.split(37):  # uneven chunks, as micro-batches arrive
            sketch.add_rows(chunk)
        values, shrinkage = sketch.eigenvalues()
        truth = torch.linalg.eigvalsh(rows.T @ rows).flip(0)
        listed = values.numel()
        assert shrinkage > 0 and listed <= 32
        tolerance = 1e-9 * float(truth[0])
        assert bool((truth[:listed] >= values - tolerance).all())  # certified lower ends
        assert bool((truth[:listed] <= values + shrinkage + tolerance).all())  # upper ends
        assert bool((truth[listed:] <= shrinkage + tolerance).all())  # the unlisted tail


def test_sketch_is_exact_while_rows_fit_and_merges_over_processes() -> None:
    rows = _rows("power_law", 20, 50, 0)
    whole = FrequentDirections(50, rank=16, device=torch.device("cpu"))
    whole.add_rows(rows)
    values, shrinkage = whole.eigenvalues()
    truth = torch.linalg.eigvalsh(rows.T @ rows).flip(0)
    assert shrinkage == 0.0
    torch.testing.assert_close(values, truth[:20], rtol=1e-10, atol=1e-12)
    # two "ranks" sketch halves of 200 rows; the merge keeps the certified bound
    rows = _rows("outliers", 200, 50, 1)
    first, second = (FrequentDirections(50, rank=8, device=torch.device("cpu")) for _ in range(2))
    first.add_rows(rows[:100])
    second.add_rows(rows[100:])
    first.merge(second.sketch(), second.shrinkage, second.rows)
    merged, delta = first.eigenvalues()
    truth = torch.linalg.eigvalsh(rows.T @ rows).flip(0)
    assert first.rows == 200
    assert bool((truth[: merged.numel()] >= merged - 1e-9).all())
    assert bool((truth[: merged.numel()] <= merged + delta + 1e-9).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_block_of_rows_wider_than_the_sketch_is_exact(dtype: torch.dtype) -> None:
    """A step's rows (fewer than the dimension, more than the sketch keeps) are shrunk in one
    block: the moment's nonzero spectrum is exact (the n × n Gram of the rows, float64), the
    sketch still holds its certified bound, and a later add falls back to the bound."""
    d, n, weight = 3000, 700, 2.5
    rows = _rows("power_law", n, d, 3).to(dtype)
    before = rows.clone()
    acc = SketchedMomentSum(d, torch.device("cpu"), rank=8)
    acc.add_rows(rows, weight)
    assert torch.equal(rows, before)  # the caller's rows are never written
    moment = acc.mean()
    wide = rows.to(torch.float64)
    truth = torch.linalg.eigvalsh(weight * wide @ wide.T / n).flip(0)  # nonzero part, n values
    assert moment.exact and moment.eigenvalues is not None
    torch.testing.assert_close(moment.eigenvalues, truth, rtol=1e-10, atol=1e-13 * float(truth[0]))
    solved = SketchSolver()(moment)
    assert solved.exact and solved.eigenvalues.numel() == d and solved.structural_zeros == d - n
    torch.testing.assert_close(solved.eigenvalues[:n], truth, rtol=1e-10, atol=1e-13 * float(truth[0]))
    # the sketch itself keeps FD's guarantee (what a merge or a later add builds on)
    sketched = torch.linalg.eigvalsh(moment.sketch @ moment.sketch.T).flip(0)
    assert moment.shrinkage > 0
    assert bool((truth[:8] >= sketched - 1e-9 * float(truth[0])).all())
    assert bool((truth[:8] <= sketched + moment.shrinkage + 1e-9 * float(truth[0])).all())
    # a second add of the same window: no longer exact, the certified interval still holds
    more = _rows("flat", 50, d, 4).to(dtype)
    acc.add_rows(more, weight)
    moment = acc.mean()
    assert moment.eigenvalues is None and not moment.exact
    both = torch.cat([wide, more.to(torch.float64)])
    truth = torch.linalg.eigvalsh(weight * both @ both.T / (n + 50)).flip(0)
    values = torch.linalg.eigvalsh(moment.sketch @ moment.sketch.T).flip(0)
    assert bool((truth[: values.numel()] >= values - 1e-9 * float(truth[0])).all())
    assert bool((truth[: values.numel()] <= values + moment.shrinkage + 1e-9 * float(truth[0])).all())


def test_rows_beyond_one_block_are_shrunk_block_by_block_with_the_bound() -> None:
    d = 400
    rows = _rows("outliers", 900, d, 5)
    sketch = FrequentDirections(d, rank=16, device=torch.device("cpu"), block_rows=256)
    sketch.add_rows(rows)
    values, delta = sketch.eigenvalues()
    truth = torch.linalg.eigvalsh(rows.T @ rows).flip(0)
    assert sketch.exact_eigenvalues is None and delta > 0 and sketch.rows == 900
    assert bool((truth[: values.numel()] >= values - 1e-9 * float(truth[0])).all())
    assert bool((truth[: values.numel()] <= values + delta + 1e-9 * float(truth[0])).all())
    assert bool((truth[values.numel() :] <= delta + 1e-9 * float(truth[0])).all())


def test_plan_keeps_small_moments_dense_and_sketches_or_skips_the_rest() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4096), nn.Conv2d(4096, 2, 1))
    plan = plan_analysis(find_layers(model), budget=32 << 20)
    methods = {(m.layer, m.moment): m.method for m in plan.moments}
    assert methods[("0", "input")] == methods[("0", "grad")] == "dense"
    assert methods[("1", "grad")] == "sketch"  # 4096² float64 = 128 MiB > 32 MiB
    assert methods[("2", "input")] == "sketch"  # a conv hands its positions over as rows
    assert plan.nbytes <= plan.peak_nbytes <= plan.budget and plan.skipped_layers == []
    # a layer kind whose adapter hands over ready Grams only is skipped, with the reason
    from lightning_conditioning.capture.adapters import ConvChannelAdapter

    class GramsOnly(ConvChannelAdapter):
        def sketchable(self, module: nn.Module, moment: str) -> bool:
            return False

    layers = {
        name: (module, GramsOnly() if name == "2" else adapter)
        for name, (module, adapter) in find_layers(model).items()
    }
    plan = plan_analysis(layers, budget=32 << 20)
    assert plan.skipped_layers == ["2"] and "ready Grams" in plan.of("2", "input").reason
    # a tiny budget: no room for even a minimal sketch and its block: skipped, never over budget
    plan = plan_analysis(find_layers(model), budget=1 << 20)
    assert plan.peak_nbytes <= plan.budget and "1" in plan.skipped_layers
    with pytest.raises(ValueError, match="memory_budget"):
        ConditioningMonitor(model, memory_budget=-1)


def test_sketched_layer_results_carry_error_bars_that_hold_the_dense_truth() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 3))
    data = [
        (torch.randn(96, 256) @ torch.diag(torch.linspace(3, 0.1, 256)), torch.randint(0, 3, (96,))) for _ in range(4)
    ]

    def run(budget: int | str) -> ConditioningMonitor:
        monitor = ConditioningMonitor(
            model,
            every_n_steps=4,
            window_steps=4,
            memory_budget=budget,
            warn_diagnosis=False,
            kappa_percents=(1, 10, 50),
        )
        for step, (x, y) in enumerate(data):
            with monitor.track(step):
                nn.functional.cross_entropy(model(x), y).backward()
            model.zero_grad()
        monitor.close()
        return monitor

    dense, sketched = run(1 << 30), run(1 << 21)  # 2 MiB: the 512² moments do not fit
    assert sketched.plan.of("0", "grad").method == "sketch"
    truth, approx = dense.results["0"].grad, sketched.results["0"].grad
    low, high = approx.lambda_max_bounds
    assert low <= truth.lambda_max * (1 + 1e-9) and truth.lambda_max <= high * (1 + 1e-9)
    assert approx.kappa_status[1] == "estimate"
    k_low, k_high = approx.kappa_bounds[1]
    assert k_low * (1 - 1e-9) <= truth.kappa[1] <= k_high * (1 + 1e-9)
    metrics = sketched.results["0"].metrics("c")
    assert {
        "c/0/grad_lambda_max_low",
        "c/0/grad_lambda_max_high",
        "c/0/grad_kappa_1_estimate",
        "c/0/grad_kappa_1_estimate_low",
    } <= set(metrics)
    assert "c/0/grad_rank" not in metrics  # not measured for a sketch
    fim_low, fim_high = sketched.results["0"].fim.lambda_max_bounds
    assert fim_low * (1 - 1e-9) <= dense.results["0"].fim.lambda_max <= fim_high * (1 + 1e-9)


_FIT = textwrap.dedent("""
    import json, resource, sys, torch, lightning.pytorch as pl
    from torch import nn
    from lightning_conditioning import ConditioningCallback
    kind, monitored = sys.argv[1], sys.argv[2] == "1"
    torch.manual_seed(0)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            if kind == "wide":
                self.net = nn.Sequential(nn.Linear(65536, 10))
            else:  # a GPT-2-sized vocabulary head on a small body
                self.net = nn.Sequential(nn.Embedding(50257, 32), nn.Linear(32, 50257))
        def training_step(self, batch, _):
            x, y = batch
            out = self.net(x)
            return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    from torch.utils.data import DataLoader, TensorDataset
    if kind == "wide":
        data = DataLoader(TensorDataset(torch.randn(96, 65536), torch.randint(0, 10, (96,))), batch_size=32)
    else:
        data = DataLoader(TensorDataset(torch.randint(0, 50257, (12, 64)), torch.randint(0, 50257, (12, 64))),
                          batch_size=4)
    callbacks = [ConditioningCallback(every_n_steps=1, log_histograms=False)] if monitored else []
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(Module(), data)
    out = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if monitored:
        monitor = callbacks[0].monitor
        out.update(plan=monitor.plan.nbytes, budget=monitor.plan.budget,
                   methods=sorted({m.method for m in monitor.plan.moments}),
                   statuses=sorted({r.status for r in callbacks[0].results.values()}),
                   lambda_max=[r.grad.lambda_max for r in callbacks[0].results.values()])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def huge_fits() -> dict[tuple[str, bool], dict]:
    """The four fits, side by side (fresh interpreters, each mostly on one core; each one's peak
    memory is its own)."""
    started = {
        (kind, monitored): subprocess.Popen(
            [sys.executable, "-c", _FIT, kind, "1" if monitored else "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in ("wide", "vocabulary")
        for monitored in (False, True)
    }
    out = {}
    for key, process in started.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        finally:
            process.kill()
        assert process.returncode == 0, stderr[-3000:]
        out[key] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.slow  # four fresh interpreters (~30 s)
@pytest.mark.parametrize("kind", ["wide", "vocabulary"])
def test_huge_moments_fit_with_default_options_in_bounded_memory(
    kind: str, huge_fits: dict[tuple[str, bool], dict]
) -> None:
    plain, monitored = huge_fits[(kind, False)], huge_fits[(kind, True)]
    assert monitored["plan"] <= monitored["budget"]
    assert "sketch" in monitored["methods"] and monitored["statuses"] == ["ok"]
    assert all(math.isfinite(v) and v > 0 for v in monitored["lambda_max"])
    # dense, Σx of the wide layer would be 32 GiB and Σ∇h of the head 18.8 GiB
    extra = monitored["maxrss"] - plain["maxrss"]
    assert extra < monitored["budget"] + (256 << 20), extra / 2**20


def test_sketched_sum_refuses_ready_grams() -> None:
    acc = SketchedMomentSum(4, torch.device("cpu"), rank=2)
    with pytest.raises(RuntimeError, match="rows"):
        acc.add(torch.eye(4), 4)


def test_lanczos_through_the_solver_plan_gives_error_bars_that_hold_the_dense_values() -> None:
    from lightning_conditioning.maths.krylov import LanczosSolver
    from lightning_conditioning.maths.solvers import DENSE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1200, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(3000, 1200) @ torch.diag(torch.linspace(2, 0.1, 1200))
    y = torch.randint(0, 3, (3000,))
    results = {}
    for name, plan in (("dense", None), ("lanczos", lambda layer, d: LanczosSolver() if d > 1000 else DENSE)):
        monitor = ConditioningMonitor(model, every_n_steps=1, solver=plan, warn_diagnosis=False, analysis="sync")
        with monitor.track(0):
            nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad()
        monitor.close()
        results[name] = monitor.results["0"]
    truth, approx = results["dense"].input, results["lanczos"].input
    assert approx.solver == "lanczos-slq" and not approx.exact
    low, high = approx.lambda_max_bounds
    assert low <= truth.lambda_max * (1 + 1e-12) and truth.lambda_max <= high * (1 + 1e-12)
    assert abs(approx.lambda_max / truth.lambda_max - 1) < 1e-3
    for percent in (50, 80):
        assert approx.kappa_status[percent] == "estimate"
        k_low, k_high = approx.kappa_bounds[percent]
        assert k_low <= truth.kappa[percent] <= k_high, percent
    assert approx.kappa_status[100] == "lower_bound" and approx.kappa[100] <= truth.kappa[100]
    assert results["lanczos"].fim.lambda_max_bounds is not None  # the sub-FIM bracketed too


def test_plan_keeps_room_for_a_gpt2_sized_head_instead_of_more_dense_moments() -> None:
    """The default budget of GPT-2 small (its parameter bytes) once went to dense 768/2304
    moments first and left no room for the 50,257-token head, which was skipped."""
    blocks = [nn.Linear(768, 2304), nn.Linear(768, 768), nn.Linear(768, 3072), nn.Linear(3072, 768)]
    model = nn.Sequential(
        *[copy for _ in range(12) for copy in (nn.Linear(b.in_features, b.out_features) for b in blocks)],
        nn.Linear(768, 50257),
    )
    plan = plan_analysis(find_layers(model), budget=475 << 20)
    assert plan.skipped_layers == [] and plan.nbytes <= plan.budget
    assert plan.of(str(len(model) - 1), "grad").method == "sketch"
