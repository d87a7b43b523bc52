"""Outlier features: ``max_i Σx_ii / median_i Σx_ii`` of every layer equals the float64 diagonal
of Σx (dense, sketched, with the homogeneous coordinate left out), and a planted feature fires
the rule where an unplanted model does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.analysis.results import analyse_layer
from lightning_conditioning.capture.hooks import LayerCapture, find_layers
from lightning_conditioning.capture.plan import plan_analysis
from lightning_conditioning.maths.features import outlier_feature
from lightning_conditioning.views.diagnosis import Thresholds, diagnose
from lightning_conditioning.views.tables import split_metrics


def _net(width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _inputs(width: int = 64, planted: float = 1.0, rows: int = 256) -> torch.Tensor:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, 2] *= planted
    return x


def _reference(rows: torch.Tensor, homogeneous: bool = False) -> tuple[float, int]:
    """max / median of the float64 mean squares of the features (a column of ones appended and
    then left out when ``homogeneous``)."""
    if homogeneous:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    gram = rows.T @ rows / rows.shape[0]
    diagonal = torch.diagonal(gram)[:-1] if homogeneous else torch.diagonal(gram)
    values = sorted(diagonal.tolist())
    median = values[(len(values) - 1) // 2]  # the lower middle value, as torch.median
    return max(values) / median, int(torch.argmax(diagonal))


def _first_layer_input(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    return seen


@pytest.mark.parametrize("planted", [1.0, 100.0])
def test_the_ratio_is_the_float64_diagonal_and_a_planted_feature_fires_the_rule(planted: float) -> None:
    net, x = _net(), _inputs(planted=planted)
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    seen = _first_layer_input(net, x)
    monitor = ConditioningMonitor(net, every_n_steps=1, statistics_dtype="float64", warn_diagnosis=False)
    with monitor.track(0):
        nn.functional.cross_entropy(net(x), y).backward()
    result = monitor.results["0"]
    ratio, feature = _reference(seen[0])
    assert result.input_outlier_ratio == pytest.approx(ratio, rel=1e-9)
    assert result.input_outlier_feature == feature
    assert result.metrics()["conditioning/0/input_outlier_ratio"] == pytest.approx(ratio, rel=1e-9)
    fired = [f for f in monitor.findings() if f.rule == "outlier_features"]
    if planted == 1.0:
        assert ratio < Thresholds().outlier_ratio and not fired
    else:  # a feature ×100 has a mean square ~10⁴× the others'
        assert ratio > 1e3 and feature == 2
        assert [f.layers for f in fired] == [("0",)]
        assert "feature 2" in fired[0].message
    # the logged keys read back: the rule fires from a table of logged scalars too
    table = split_metrics(result.metrics()).conditioning
    assert table["0"]["input_outlier_feature"] == feature
    assert [f.rule for f in diagnose(table) if f.rule == "outlier_features"] == (["outlier_features"] if fired else [])
    # a layer of fewer features than outlier_min_features (a squeeze-excitation bottleneck) is left alone
    narrow = {"0": {**table["0"], "input_units": 8.0}}
    assert not [f for f in diagnose(narrow) if f.rule == "outlier_features"]
    monitor.close()


def test_a_sketched_input_moment_keeps_its_exact_diagonal() -> None:
    """A 300-wide Σx over a 500 KiB budget is sketched (400 rows: the sketch shrinks): its
    outlier reading comes from the exact diagonal kept beside the sketch."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(300, 3)).double()
    plan = plan_analysis(find_layers(net), 500 << 10)
    assert plan.of("0", "input").method == "sketch"
    capture = LayerCapture(find_layers(net), statistics_dtype=torch.float64, model=net, plan=plan)
    capture.attach()
    capture.active = True
    x = _inputs(width=300, planted=30.0, rows=400)
    net(x).square().sum().backward()
    moments = capture.moments()["0"]
    assert moments.input_second_moment.shrinkage > 0  # type: ignore[union-attr]
    result = analyse_layer("0", 0, moments)
    ratio, feature = _reference(x)
    assert result.input_outlier_ratio == pytest.approx(ratio, rel=1e-9)
    assert result.input_outlier_feature == feature == 2


def test_the_homogeneous_coordinate_is_no_feature() -> None:
    """With ``include_bias`` Σx carries a constant 1 whose mean square (1) dwarfs features of
    mean square 1e-4: it is left out of the reading."""
    net = _net()
    x = _inputs() * 1e-2
    seen = _first_layer_input(net, x)
    monitor = ConditioningMonitor(
        net, every_n_steps=1, statistics_dtype="float64", include_bias=True, warn_diagnosis=False
    )
    with monitor.track(0):
        net(x).square().sum().backward()
    ratio, feature = _reference(seen[0], homogeneous=True)
    assert monitor.results["0"].input_outlier_ratio == pytest.approx(ratio, rel=1e-9)
    assert monitor.results["0"].input_outlier_feature == feature
    assert ratio < Thresholds().outlier_ratio
    monitor.close()


def test_embeddings_have_no_outlier_reading_and_a_zero_median_is_none() -> None:
    embedding = nn.Sequential(nn.Embedding(10, 4))
    monitor = ConditioningMonitor(embedding, every_n_steps=1, warn_diagnosis=False)
    with monitor.track(0):
        embedding(torch.tensor([[1, 2, 2, 3]])).sum().backward()
    assert monitor.results["0"].input_outlier_ratio is None
    assert "conditioning/0/input_outlier_ratio" not in monitor.results["0"].metrics()
    monitor.close()
    assert outlier_feature(torch.tensor([0.0, 0.0, 5.0])).ratio is None
