"""Weight domination without false alarms (issue 14, item 5).

Exactly-zero layers (a zero-initialised BatchNorm γ or head after them) are reported as such;
the absolute threshold does not fire for a ratio that has been small since the layer's first
check (LayerScale at 1e-6); a fall of the ratio by orders of magnitude relative to the layer's
own history is flagged (ResNet-110's last layer, whose ratio never crossed 1e-4); no finding or
warning ever shows a NaN or an unfilled quantity. Small models and the monitor directly, plus
one Lightning Trainer test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import pytest
import torch
from helpers import SequentialClassifier, fit, loader, seeded
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback, WeightDominationMonitor
from lightning_conditioning.maths.domination import (
    DominationRules,
    RatioHistory,
    WeightStatistics,
    domination_reasons,
    is_dominated,
    ratio_fall,
    record_ratio,
)
from lightning_conditioning.views.diagnosis import diagnose, format_findings, short_warning

#: ResNet-110's last linear layer on the MNIST sample (example_projects/cifar_resnet/results.md):
#: (step, σmax(∇W)/σmax(W), batch loss); the minimum 6.75e-4 is at step ≈ 40 in the run
RESNET110_FC = [
    (0, 21.5, 4.14),
    (1, 5.2, 16.2),
    (2, 6.17, 41.9),
    (3, 2.75, 49.3),
    (5, 0.791, 17.8),
    (10, 0.0123, 2.67),
    (15, 0.00937, 2.48),
    (20, 0.00342, 2.33),
    (30, 0.000952, 2.29),
    (40, 0.000675, 2.28),
    (50, 0.000871, 2.28),
    (75, 0.00284, 2.26),
    (99, 0.00945, 2.11),
]


def _stats(ratio: float) -> WeightStatistics:
    """The statistics of a layer with σmax(W) = ‖W‖_F = 1 and a gradient ratio ``ratio``."""
    return WeightStatistics(1.0, ratio, ratio, 1.0, ratio, ratio)


# ------------------------------------------------------------------ small models
class ZeroGammaBlock(nn.Module):
    """A residual block whose last BatchNorm γ starts at 0 (timm's / torchvision's zero_init_residual)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class LayerScaleBlock(nn.Module):
    """``x + γ ⊙ relu(fc(x))`` with a learnable γ at 1e-6 (ConvNeXt / CaiT LayerScale)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * torch.relu(self.fc(x))


def _zero_gamma_resnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        ZeroGammaBlock(8),
        ZeroGammaBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _train(
    net: nn.Module,
    monitor: WeightDominationMonitor,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int | None = None,
) -> Iterator[int]:
    """Train ``steps`` steps, checking each one; yields after every completed check."""
    for step in range(steps):
        rows = slice(None) if batch is None else torch.arange(step * batch, (step + 1) * batch) % len(x)
        loss = nn.functional.cross_entropy(net(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        monitor.before_optimizer_step(step, loss=float(loss.detach()))
        optimizer.step()
        monitor.after_optimizer_step()
        yield step


class Recorder:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.infos: list[str] = []


def _monitor(net: nn.Module, **options: object) -> tuple[WeightDominationMonitor, Recorder]:
    record = Recorder()
    monitor = WeightDominationMonitor(
        net, every_n_steps=1, warn=record.warnings.append, info=record.infos.append, **options
    )  # type: ignore[arg-type]
    return monitor, record


# ------------------------------------------------------------------ (a) exactly zero
def test_zero_init_batchnorm_gamma_gives_zero_gradient_layers_not_domination() -> None:
    net = seeded(_zero_gamma_resnet)
    monitor, record = _monitor(net, patience=1)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    branch = ["2.conv1", "2.conv2", "3.conv1", "3.conv2"]
    for step in _train(net, monitor, optimizer, x, y, steps=3):
        if step == 0:
            stats = monitor.results
            assert {n: stats[n].status for n in branch} == dict.fromkeys(branch, "zero_gradient")
            assert all(stats[n].grad_weight_ratio == 0 for n in branch)  # what the old rule read as 0 < 1e-4
            assert monitor.zero_layers == dict.fromkeys(branch, "zero_gradient")
            assert stats["0"].status == stats["6"].status == "ok"
            findings = diagnose({}, monitor.domination_table())
            assert [(f.rule, f.severity, f.layers) for f in findings] == [("exactly_zero", "info", tuple(branch))]
            assert "zero-initialised scale" in findings[0].message
        assert monitor.dominated == [], (step, monitor.reasons)
    assert record.warnings == []
    assert len(record.infos) == 1  # named once, not per check
    assert all(name in record.infos[0] for name in branch) and "BatchNorm γ" in record.infos[0]
    assert monitor.zero_layers == {}  # γ has moved: the branch learns
    assert not any(is_dominated(s, 1e-4) for s in monitor.results.values() if s.status != "ok")


def test_zero_init_head_gives_zero_weight_and_zero_gradient_before_it() -> None:
    net = seeded(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    nn.init.zeros_(net[2].weight)
    monitor, record = _monitor(net, patience=1)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in _train(net, monitor, optimizer, x, y, steps=3):
        if step == 0:
            assert {n: s.status for n, s in monitor.results.items()} == {"0": "zero_gradient", "2": "zero_weight"}
            assert math.isinf(monitor.results["2"].grad_weight_ratio)
            assert "history" not in monitor.state_dict() or monitor.history == {}  # nothing to remember yet
        assert monitor.dominated == []
    assert record.warnings == [] and len(record.infos) == 1
    assert "1 layer has an exactly zero weight gradient" in record.infos[0] and "a head): 0." in record.infos[0]
    assert "1 layer has an exactly zero weight, zero-initialised" in record.infos[0] and "do): 2." in record.infos[0]
    assert set(monitor.history) == {"0", "2"}  # the histories start with the first nonzero check


# ------------------------------------------------------------------ (b) LayerScale
def test_layerscale_layers_are_not_dominated_in_the_first_checks() -> None:
    def make() -> nn.Sequential:
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), LayerScaleBlock(32), LayerScaleBlock(32), nn.Linear(32, 4))

    net = seeded(make)
    monitor, record = _monitor(net, patience=3)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 20, generator=generator), torch.randint(0, 4, (256,), generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)  # γ grows slowly
    old_rule_checks = 0
    for _ in _train(net, monitor, optimizer, x, y, steps=8, batch=32):
        ratios = {n: monitor.results[n].grad_weight_ratio for n in ("2.fc", "3.fc")}
        old_rule_checks += all(is_dominated(monitor.results[n], 1e-4) for n in ratios)
        assert monitor.dominated == [], (ratios, monitor.reasons)
        assert all(s.status == "ok" for s in monitor.results.values())
    assert old_rule_checks >= 3  # the absolute threshold alone would have warned (patience 3)
    assert record.warnings == [] and record.infos == []
    assert all(monitor.history[n].peak_step > 0 for n in ("2.fc", "3.fc"))  # their ratio rises


# ------------------------------------------------------------------ (c) the layer's own history
def test_resnet110_fall_is_flagged_by_history_while_threshold_never_fires() -> None:
    rules = DominationRules()  # threshold 1e-4, fall_factor 1000
    assert all(ratio > rules.threshold for _, ratio, _ in RESNET110_FC)
    for with_loss in (False, True):
        history: RatioHistory | None = None
        flagged: dict[int, tuple[str, ...]] = {}
        for step, ratio, loss in RESNET110_FC:
            used = loss if with_loss else None
            history = record_ratio(history, ratio, step, used)
            flagged[step] = domination_reasons(_stats(ratio), history, rules, used)
        assert history is not None and (history.peak_ratio, history.peak_step) == (21.5, 0)
        assert all(reasons in ((), ("fallen",)) for reasons in flagged.values())  # never the threshold
        # ≥ 1000× below the peak (net of the loss) from step 10 on; still at step 99 (1.2e3×
        # net of the loss, which is 2.1 there against 0.13 with LastBN)
        assert [s for s, r in flagged.items() if r] == [10, 15, 20, 30, 40, 50, 75, 99]
        assert ratio_fall(history, 0.000675, 2.28 if with_loss else None) == pytest.approx(
            21.5 / 0.000675 * (2.28 / 4.14 if with_loss else 1.0)
        )
    # the same fall through the monitor: one warning naming the history rule and add_last_bn
    monitor, record, feed = _synthetic_monitor()
    for step, ratio, loss in RESNET110_FC:
        feed(step, ratio, loss)
    assert len(record.warnings) == 1, record.warnings
    # (SGD at lr 0.1 moves it by 0.1 × the ratio: at step 10 (1.2e-3) it still learns, so the
    # three consecutive checks are 15, 20, 30)
    assert "at step 30" in record.warnings[0] and "3 consecutive checks" in record.warnings[0]
    assert (
        "12,490× below its own peak 21.5 at step 0 net of the loss (the ratio fell 22,580×, the loss 1.8×); "
        "it has stayed at least 1000× below its own peak"
    ) in record.warnings[0]
    assert "add_last_bn" in record.warnings[0] and "nan" not in record.warnings[0]


def _synthetic_monitor(
    **options: object,
) -> tuple[WeightDominationMonitor, Recorder, Callable[[int, float, float | None], None]]:
    """A monitor on a 2×2 linear 'last layer' whose σmax(∇W)/σmax(W) is set by hand."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    monitor, record = _monitor(model, **options)
    weight = model[0].weight

    def feed(step: int, ratio: float, loss: float | None) -> None:
        with torch.no_grad():
            weight.copy_(torch.eye(2))
        weight.grad = torch.eye(2) * ratio
        assert monitor.before_optimizer_step(step, loss=loss)
        with torch.no_grad():
            weight.sub_(0.1 * weight.grad)  # an SGD step (lr 0.1): it moves by 0.1 × the ratio
        monitor.after_optimizer_step()

    return monitor, record, feed


def test_fluctuating_healthy_ratio_is_never_flagged() -> None:
    generator = torch.Generator().manual_seed(0)
    ratios = 10 ** (-3 + torch.rand(2000, generator=generator, dtype=torch.float64))  # within 10×
    losses = torch.linspace(2.3, 0.05, 2000, dtype=torch.float64)
    for with_loss in (False, True):
        history = None
        for step, (ratio, loss) in enumerate(zip(ratios.tolist(), losses.tolist())):
            used = loss if with_loss else None
            history = record_ratio(history, ratio, step, used)
            assert domination_reasons(_stats(ratio), history, DominationRules(threshold=2e-3), used) == (), step
    assert history is not None and history.checks == 2000
    monitor, record, feed = _synthetic_monitor(patience=1, threshold=2e-3)
    for step, ratio in enumerate(ratios[:200].tolist()):
        feed(step, ratio, None)
        assert monitor.dominated == []
    assert record.warnings == []


def test_ratio_that_falls_with_a_vanishing_loss_is_not_flagged() -> None:
    # measured: a BN-MLP on MNIST (SGD, momentum 0.9) driven to a training loss of ~1e-4; its
    # first layer's ratio fell 4.8e4× (2.18 → 4.59e-5) while the loss fell 2.4e4×
    history = record_ratio(None, 2.18, step=0, loss=2.30)
    history = record_ratio(history, 4.59e-5, step=2660, loss=9.5e-5)
    stats = _stats(4.59e-5)
    assert ratio_fall(history, 4.59e-5, 9.5e-5) == pytest.approx(1.96, rel=1e-2)
    assert domination_reasons(stats, history, DominationRules(), loss=9.5e-5) == ()
    # without the loss the monitor cannot tell convergence from domination: documented
    blind = record_ratio(record_ratio(None, 2.18, step=0), 4.59e-5, step=2660)
    assert domination_reasons(stats, blind, DominationRules()) == ("fallen", "below_threshold")
    assert domination_reasons(stats, blind, DominationRules(fall_factor=None)) == ("below_threshold",)


def test_history_survives_a_checkpoint() -> None:
    series = RESNET110_FC[:9]  # through step 30: the third check in a row that it no longer learns
    whole, whole_record, feed_whole = _synthetic_monitor()
    first, _, feed_first = _synthetic_monitor()
    for step, ratio, loss in series[:5]:
        feed_whole(step, ratio, loss)
        feed_first(step, ratio, loss)
    state = first.state_dict()
    assert state["history"]["0"] == {"peak_ratio": 21.5, "peak_step": 0, "peak_loss": 4.14, "checks": 5}
    path_state = _roundtrip(state)
    resumed, resumed_record, feed_resumed = _synthetic_monitor()
    resumed.load_state_dict(path_state)
    for step, ratio, loss in series[5:]:
        feed_whole(step, ratio, loss)
        feed_resumed(step, ratio, loss)
        assert resumed.reasons == whole.reasons, step
    assert resumed.history == whole.history
    assert resumed_record.warnings == whole_record.warnings != []
    callback = WeightDominationCallback()
    callback.load_state_dict(path_state)
    assert callback.state_dict()["history"] == state["history"]


def _roundtrip(state: dict) -> dict:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain Python values only


@pytest.mark.parametrize("fall_factor", [1, 0.5, float("nan"), float("inf"), True, "1000"])
def test_bad_fall_factor(fall_factor: object) -> None:
    with pytest.raises(ValueError, match="fall_factor"):
        WeightDominationCallback(fall_factor=fall_factor)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fall_factor"):
        WeightDominationMonitor(nn.Linear(2, 2), fall_factor=fall_factor)  # type: ignore[arg-type]
    assert WeightDominationCallback(fall_factor=None).fall_factor is None


# ------------------------------------------------------------------ (d) never "nan"
def test_no_finding_shows_nan_or_an_unfilled_quantity() -> None:
    nan = float("nan")
    domination = {
        "pending": {
            "grad_weight_ratio": 1e-6,
            "grad_weight_ratio_peak": 0.1,
            "grad_weight_ratio_peak_step": 0.0,
            "grad_weight_ratio_fall": 1e5,
            "dominated": 1.0,
        },
        "diverged": {"grad_weight_ratio": nan, "update_weight_ratio": nan, "dominated": 0.0},
        "zero_grad": {"grad_weight_ratio": 0.0, "grad_spectral_norm": 0.0, "update_weight_ratio": 0.0},
        "zero_weight": {"weight_spectral_norm": 0.0, "update_weight_ratio": nan},
        "logged": {"grad_weight_ratio": 5e-5},  # read back from logged scalars: no verdict
        "blocked": {"update_weight_ratio": 0.0},
    }
    table = {name: {"input_lambda_max": 1.0} for name in domination}
    findings = diagnose(table, domination, dominated_layers=nan)
    rules = {f.rule: f for f in findings}
    assert rules["weight_domination"].layers == ("pending", "logged", "blocked")
    assert rules["exactly_zero"].layers == ("zero_grad", "zero_weight")
    text = format_findings(findings) + "".join(short_warning(f) + str(f) for f in findings)
    assert "nan" not in text.lower(), text
    assert "100,000× below its own peak 0.1 at step 0" in text
    assert "σmax(ΔW)/σmax(W) = 0)" in text  # the blocked layer's update ratio is shown


class GrowWeight(SequentialClassifier):
    """Multiplies one layer's weight by 1e3 before step ``at`` (its ratio falls ~1e6×: it sits
    before a BatchNorm, so ∇W shrinks as W grows)."""

    def __init__(self, net: nn.Module, layer: int, at: int) -> None:
        super().__init__(net)
        self.layer, self.at = layer, at

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        if self.trainer.global_step == self.at:
            with torch.no_grad():
                self.net[self.layer].weight.mul_(1e3)


def _bn_mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    features = 20
    for _ in range(3):
        layers += [nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU()]
        features = 32
    return nn.Sequential(*layers, nn.Linear(features, 4))  # net.0, net.3, net.6, net.9


class Snapshot(pl.Callback):
    """Between ConditioningCallback and WeightDominationCallback: what the diagnosis says while
    the domination check of the step still waits for its update ratio."""

    def __init__(self, conditioning: ConditioningCallback, domination: WeightDominationCallback) -> None:
        self.conditioning, self.domination = conditioning, domination
        self.seen: dict[int, tuple[list, dict[str, dict[str, float]]]] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        assert self.domination.monitor is not None and self.domination.monitor.pending_step is not None
        self.seen[trainer.global_step - 1] = (self.conditioning.findings(), self.domination.domination_table())


def test_trainer_diagnosis_reads_a_pending_check_without_nan() -> None:
    # ConditioningCallback first: its analysis (and diagnosis) runs before the domination check
    # has its update ratio, the situation that printed "σmax(ΔW)/σmax(W) = nan"
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(192, 20, generator=generator), torch.randint(0, 4, (192,), generator=generator)
    conditioning = ConditioningCallback(every_n_steps=1, log_histograms=False, tensorboard_layout=False)
    domination = WeightDominationCallback(every_n_steps=1, patience=2)
    snapshot = Snapshot(conditioning, domination)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, logger = fit(
            GrowWeight(seeded(_bn_mlp), layer=3, at=3),
            loader(x, y, 32),
            [conditioning, snapshot, domination],
            max_steps=6,
        )
    texts = [str(w.message) for w in caught]
    domination_warnings = [t for t in texts if "in weight domination at step" in t]
    assert len(domination_warnings) == 1 and "'net.3'" in domination_warnings[0]
    assert "at least 1000× below its own peak and below 0.0001" in domination_warnings[0]
    headline = "ConditioningMonitor: step 3: 1 layer(s) in weight domination"
    diagnosis_warnings = [t for t in texts if t.startswith(headline)]
    assert len(diagnosis_warnings) == 1, texts
    findings, table = snapshot.seen[3]  # the step the weight grew: pending, no update ratio yet
    assert "update_weight_ratio" not in table["net.3"] and table["net.3"]["dominated"] == 1.0
    weight = {f.rule: f for f in findings}["weight_domination"]
    assert weight.layers == ("net.3",) and "below its own peak" in weight.message
    assert "σmax(ΔW)" not in weight.message and "update_weight_ratio[net.3]" not in weight.evidence
    shown = texts + [format_findings(f) for f, _ in snapshot.seen.values()]
    assert not any("nan" in t.lower() for t in shown)
    assert [s for s, (f, _) in snapshot.seen.items() if f] == [3, 4, 5]  # nothing before the fall
    assert domination.dominated == ["net.3"] and domination.reasons["net.3"] == ("fallen", "below_threshold")
    # the training loss reached the monitor: the histories are net of the loss
    assert all(h.peak_loss is not None and h.peak_loss > 0 for h in domination.history.values())
    assert logger.history[5]["weight_domination/dominated_layers"] == 1.0


def test_a_layer_the_step_visibly_moves_is_learning_not_dominated() -> None:
    """AdamW turns a tiny gradient ratio (1e-5) into a full-size step: the layer learns."""
    history = record_ratio(record_ratio(None, 0.1, 0), 1e-5, step=20)
    pending = _stats(1e-5)
    assert domination_reasons(pending, history) == ("fallen", "below_threshold")  # provisional
    moved = pending.with_update_norm(0.03)  # σmax(ΔW)/σmax(W) = 3%: it learns
    assert domination_reasons(moved, history) == ()
    still = pending.with_update_norm(1e-6)  # an SGD step with lr 0.1 barely moves it
    assert domination_reasons(still, history) == ("fallen", "below_threshold")
