"""The diagnosis rules: unit cases on plain tables, then purpose-built nets (1-2 steps each)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Blocked, SequentialClassifier, fit, loader, seeded
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback
from lightning_conditioning.views.diagnosis import Finding, Thresholds, diagnose, format_findings
from lightning_conditioning.views.tables import conditioning_table, split_metrics


def _rules(findings: list[Finding]) -> dict[str, Finding]:
    return {f.rule: f for f in findings}


# ------------------------------------------------------------------ rules on plain tables
def test_depth_trends_forward_and_backward() -> None:
    table = {f"l{i}": {"input_lambda_max": 2.0 * 0.1**i, "grad_lambda_max": 1e3 * 3.0 ** -(9 - i)} for i in range(10)}
    found = _rules(diagnose(table))
    assert set(found) == {"vanishing_forward", "vanishing_backward"}
    assert found["vanishing_forward"].layer == "l2"  # first value below 1/10 of l0's 2.0
    assert found["vanishing_forward"].evidence["slope_decades_per_layer"] == pytest.approx(-1.0)
    assert found["vanishing_backward"].layer == "l6"  # 3^-3 = 1/27 < 1/10 of l9's
    growing = {f"l{i}": {"input_lambda_max": 4.0**i} for i in range(8)}
    # the last layer then stands out as well
    assert [f.rule for f in diagnose(growing)] == ["exploding_forward", "last_layer_input"]


def test_quiet_on_flat_short_or_noisy_tables() -> None:
    flat = {f"l{i}": {"input_lambda_max": 1.0 + 0.5 * (i % 2), "grad_lambda_max": 0.3} for i in range(12)}
    assert diagnose(flat) == []
    short = {f"l{i}": {"input_lambda_max": 10.0**-i} for i in range(3)}
    assert diagnose(short) == []  # fewer than min_layers
    gentle = {f"l{i}": {"input_lambda_max": 10.0 ** (-0.5 * i)} for i in range(6)}
    assert diagnose(gentle) == []  # 2.5 decades in all: below total_decades
    assert [f.rule for f in diagnose(gentle, thresholds=Thresholds(total_decades=2))] == ["vanishing_forward"]


def test_dead_units_kappa_outlier_and_last_layer() -> None:
    table = {
        f"l{i}": {
            "input_lambda_max": 1.0,
            "input_kappa_50": 10.0,
            "input_kappa_100": 1e4,
            "dead_input_units": 1.0,
            "input_units": 64.0,
        }
        for i in range(6)
    }
    table["l0"]["dead_input_units"] = 60.0  # the data's own zero features: never flagged
    table["l3"]["dead_input_units"] = 40.0
    table["l4"]["input_kappa_50"] = 5e3
    table["l5"]["input_lambda_max"] = 50.0
    found = _rules(diagnose(table))
    assert set(found) == {"dead_units", "ill_conditioned", "last_layer_input"}
    assert found["dead_units"].layers == ("l3",)
    assert found["dead_units"].evidence == {"dead_fraction[l3]": 0.625}
    assert found["ill_conditioned"].layers == ("l4",)
    assert found["last_layer_input"].severity == "info"
    assert "add_last_bn" in found["last_layer_input"].remedy
    domination = {"l5": {"grad_weight_ratio": 1e-6, "update_weight_ratio": 1e-7}}
    found = _rules(diagnose(table, domination, dominated_layers=1.0))
    assert found["last_layer_input"].severity == "warning"
    assert found["weight_domination"].evidence["dominated_layers"] == 1.0
    assert "add_last_bn" in found["weight_domination"].remedy


def test_format_findings_lists_evidence() -> None:
    text = format_findings(diagnose({f"l{i}": {"input_lambda_max": 10.0**-i} for i in range(6)}))
    assert text.startswith("1 finding:\n1. [warning] vanishing_forward at l2")
    assert "slope_decades_per_layer=-1" in text and "remedy:" in text


def _kappa_table() -> dict[str, dict[str, float]]:
    """Six healthy layers (κ measured, full rank), the last one a 10-way classifier."""
    return {
        f"l{i}": {
            "input_lambda_max": 1.0,
            "input_kappa_50": 10.0 + i,
            "grad_kappa_50": 5.0,
            "input_rank": 8.0,
            "input_dim": 8.0,
            "grad_rank": 10.0,
            "grad_dim": 10.0,
        }
        for i in range(6)
    }


def test_rank_deficiency_fires_on_lower_bounds_and_infinities() -> None:
    assert diagnose(_kappa_table()) == []  # clean: every κ_p a measurement
    table = _kappa_table()
    del table["l1"]["input_kappa_50"]
    table["l1"].update(input_kappa_50_lower_bound=3e11, input_rank=3.0)
    del table["l2"]["input_kappa_50"]
    table["l2"].update(input_kappa_50_infinite=1.0, input_rank=2.0, dead_input_units=6.0, input_units=8.0)
    del table["l3"]["input_kappa_50"]
    table["l3"]["fim_kappa_80_infinite"] = 1.0
    found = _rules(diagnose(table))
    rank = found.pop("rank_deficient")
    assert set(found) == {"dead_units"}  # l2's 6/8 dead units; no ill_conditioned from 3e11
    assert rank.layers == ("l1", "l2", "l3") and rank.layer == "l1"
    assert rank.evidence == {
        "input_kappa_50_lower_bound[l1]": 3e11,
        "input_rank[l1]": 3.0,
        "input_kappa_50_infinite[l2]": math.inf,
        "input_rank[l2]": 2.0,
        "fim_kappa_80_infinite[l3]": math.inf,
    }
    assert "l1 Σx: κ_50 ≥ 3e+11 (rank 3 of 8; λ_p under the resolution floor)" in rank.message
    assert "l2 Σx: κ_50 = ∞ (rank 2 of 8; 6 dead input units)" in rank.message
    assert "l3 sub-FIM: κ_80 = ∞" in rank.message
    text = format_findings([rank])
    assert "resolution floor" in text and "remedy:" in text and "statistics_dtype" in text


def test_rank_deficiency_of_softmax_logits_is_expected() -> None:
    table = _kappa_table()
    del table["l5"]["grad_kappa_50"]
    table["l5"].update(grad_kappa_50_lower_bound=1e12, grad_rank=9.0, fim_kappa_80_lower_bound=1e13)
    assert diagnose(table) == []  # one direction of the logits' Σ∇h: the softmax's
    assert diagnose(table, last_layer="l4")[0].layers == ("l5",)  # not the classifier: reported
    table["l5"]["grad_rank"] = 7.0  # three directions lost: more than softmax explains
    (finding,) = diagnose(table)
    assert finding.rule == "rank_deficient" and "l5 Σ∇h: κ_50 ≥ 1e+12 (rank 7 of 10" in finding.message
    table["l0"]["grad_kappa_50_lower_bound"] = table["l0"].pop("grad_kappa_50")
    assert diagnose(table)[0].layers == ("l0", "l5")  # an inner layer's Σ∇h always counts


def test_kappa_outlier_ignores_lower_bounds() -> None:
    table = _kappa_table()
    table["l4"]["input_kappa_50"] = 5e3  # a measured outlier
    table["l1"]["input_kappa_50_lower_bound"] = table["l1"].pop("input_kappa_50") * 1e9
    found = _rules(diagnose(table))
    assert found["ill_conditioned"].layers == ("l4",)
    assert "input_kappa_50[l1]" not in found["ill_conditioned"].evidence
    # median of l0, l2, l3, l5 (10, 12, 13, 15); with l1's bound 1.1e10 as a value it would be 13
    assert found["ill_conditioned"].evidence["median_others[l4]"] == 12.5
    assert found["rank_deficient"].layers == ("l1",)


# ------------------------------------------------------------------ purpose-built nets
def _mlp(depth: int = 20, width: int = 64, bn: bool = False, std: float = 0.5) -> nn.Sequential:
    layers: list[nn.Module] = []
    features = 32
    for _ in range(depth - 1):
        linear = nn.Linear(features, width, bias=False)
        nn.init.normal_(linear.weight, 0.0, std / math.sqrt(features))
        layers += [linear, *([nn.BatchNorm1d(width)] if bn else []), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, 10))
    return nn.Sequential(*layers)


def _analyse(
    net: nn.Module, steps: int = 1, module: type[SequentialClassifier] = SequentialClassifier, **module_kwargs: object
):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    conditioning = ConditioningCallback(every_n_steps=1, log_figures=False, log_histograms=False)
    domination = WeightDominationCallback(every_n_steps=1)
    _, logger = fit(module(net, **module_kwargs), loader(x, y, 64), [conditioning, domination], max_steps=steps)
    last = max(logger.history)
    split = split_metrics(logger.history[last])
    table = conditioning_table(conditioning.results)
    return diagnose(table, split.domination, dominated_layers=split.dominated_layers)


@pytest.fixture(autouse=True)
def _no_denormals():
    torch.set_flush_denormal(True)  # plain deep nets at small init crawl otherwise
    yield
    torch.set_flush_denormal(False)  # torch's default (the call returns support, not the old state)


def test_plain_deep_mlp_vanishes_and_is_located() -> None:
    found = _rules(_analyse(seeded(_mlp)))
    forward, backward = found["vanishing_forward"], found["vanishing_backward"]
    # about -0.9 decades per layer (×0.125: weight variance 0.25/fan_in, halved by the ReLU)
    assert forward.evidence["slope_decades_per_layer"] == pytest.approx(-0.9, abs=0.15)
    assert forward.layer in ("net.4", "net.6")  # λmax(Σx) 10× below the first layer's
    assert backward.evidence["slope_decades_per_layer"] < -0.5
    assert backward.layer in ("net.34", "net.32")


def test_batchnorm_deep_mlp_does_not_vanish() -> None:
    rules = {f.rule for f in _analyse(seeded(lambda: _mlp(bn=True)))}
    assert not rules & {"vanishing_forward", "vanishing_backward", "exploding_forward", "exploding_backward"}


def _small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))


def test_blocked_layer_is_weight_dominated() -> None:
    found = _rules(_analyse(seeded(_small), steps=2, module=Blocked, blocked=("net.2",)))
    assert set(found) == {"weight_domination"}
    assert found["weight_domination"].layers == ("net.2",)
    evidence = found["weight_domination"].evidence
    assert evidence["update_weight_ratio[net.2]"] == 0 and evidence["dominated_layers"] == 1


def test_dead_layer_is_found() -> None:
    net = seeded(_small)
    with torch.no_grad():
        net[2].bias.fill_(-100.0)  # the ReLU after net.2 is always 0
    found = _rules(_analyse(net))
    assert found["dead_units"].layers == ("net.4",)
    assert found["dead_units"].evidence["dead_fraction[net.4]"] == 1.0


def test_healthy_small_net_has_no_findings() -> None:
    findings = _analyse(seeded(_small), steps=2)
    assert findings == [], format_findings(findings)


def test_rank_deficiency_remedy_suggests_float64_only_where_it_was_not_used() -> None:
    table = _kappa_table()
    table["l1"]["input_kappa_50_lower_bound"] = table["l1"].pop("input_kappa_50") * 1e9

    def remedy(**kwargs: object) -> str:
        return _rules(diagnose(table, **kwargs))["rank_deficient"].remedy  # type: ignore[arg-type]

    assert "statistics_dtype" not in remedy(statistics_float64=True)
    assert "`statistics_dtype='float64'` lowers the floor," in remedy(statistics_float64=False)
    assert "lowers the floor if the statistics were float32" in remedy()  # a report from logs


def test_the_monitor_knows_its_statistics_were_float64() -> None:
    import torch
    from torch import nn

    from lightning_conditioning import ConditioningMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 3))  # Σx of 64 dims from 8 rows: ∞ κ_p
    monitor = ConditioningMonitor(model, every_n_steps=1, warn_diagnosis=False)
    with monitor.track(0):
        model(torch.randn(8, 64)).square().mean().backward()
    (finding,) = [f for f in monitor.findings() if f.rule == "rank_deficient"]
    assert monitor.capture is not None and monitor.capture.statistics_dtype == torch.float64  # CPU "auto"
    assert "statistics_dtype" not in finding.remedy
