"""What a new user reads first: selection messages, warnings with the remedy on its own line,
the report table's κ matching the diagnosis."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_conditioning import ConditioningMonitor
from lightning_conditioning.report.tables import format_layer_table
from lightning_conditioning.views.diagnosis import diagnose


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_an_include_that_matches_nothing_names_the_layers_and_the_filter() -> None:
    with pytest.warns(UserWarning) as caught:
        monitor = ConditioningMonitor(Net(), include=["head.*"], collectives=None)
    message = str(caught[0].message)
    assert "include=['head.*'] matched none of the 2 analysable layers" in message
    assert "body.0, head" in message and "whole qualified name" in message
    assert monitor.layer_names == []
    with pytest.warns(UserWarning, match=r"include pattern\(s\) \['nothere'\] matched none"):
        monitor = ConditioningMonitor(Net(), include=["head", "nothere"], collectives=None)
    assert monitor.layer_names == ["head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConditioningMonitor(Net(), include=["head"], collectives=None).close()


def test_diagnosis_warnings_put_the_remedy_on_its_own_line() -> None:
    net = Net()
    with torch.no_grad():
        net.body[0].bias.fill_(-100.0)  # every hidden unit dead
    monitor = ConditioningMonitor(net, every_n_steps=1, collectives=None)
    with pytest.warns(UserWarning) as caught:
        with monitor.track(0):
            nn.functional.cross_entropy(net(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    dead = [str(w.message) for w in caught if "dead" in str(w.message)]
    assert dead and all("\nRemedy: " in text for text in dead)
    first_line = dead[0].split("\n")[0]
    assert not first_line.rstrip().endswith("Remedy:")
    # short sentences: every line reads at a glance, the full text stays in findings()
    assert all(len(line) <= 220 for text in dead for line in text.split("\n"))
    assert any(len(f.message) > 0 for f in monitor.findings())


def test_the_table_shows_the_kappa_the_diagnosis_quotes() -> None:
    table = {
        f"l{i}": {"input_lambda_max": 1.0, "input_kappa_50": 10.0 if i else 1e4, "input_kappa_100": 20.0}
        for i in range(5)
    }
    findings = [f for f in diagnose(table) if f.rule == "ill_conditioned"]
    assert findings and "input_kappa_50" in findings[0].message
    header = format_layer_table(table).splitlines()[0]
    assert "κ50(Σx)" in header and "κ100" not in header


def test_the_default_schedule_gives_enough_points_early_and_regularly_later() -> None:
    net = Net()
    monitor = ConditioningMonitor(net, collectives=None, warn_diagnosis=False)
    for step in range(160):
        with monitor.track(step):
            nn.functional.cross_entropy(net(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    assert monitor.analysed_steps == [0, 1, 2, 4, 8, 16, 32, 64, 100]
    assert monitor.schedule_note() is None
    sparse = ConditioningMonitor(Net(), every_n_steps=50, collectives=None, warn_diagnosis=False)
    for step in range(60):
        with sparse.track(step):
            nn.functional.cross_entropy(net(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    note = sparse.schedule_note()
    assert note is not None and "only 2 analyses" in note and "every_n_steps" in note
    with pytest.raises(ValueError, match="set every_n_steps"):
        ConditioningMonitor(Net(), window_steps=4)


def test_the_callback_notes_a_sparse_schedule_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from helpers import SequentialClassifier, fit, loader

    from lightning_conditioning import ConditioningCallback

    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = SequentialClassifier(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    with caplog.at_level(logging.INFO):
        fit(model, loader(x, y, 16), [ConditioningCallback(every_n_steps=3, warn_diagnosis=False)], max_steps=4)
    assert any("only 2 analyses" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_stability_margin_against_the_known_divergence_threshold(factor: float) -> None:
    """A linear model with loss ½·mean((Xw − y)²) has Hessian Σx: gradient descent converges
    iff lr < 2/λmax(Σx). The Fisher pass samples y = h ∓ 1, so Σ∇h = 1 exactly and the
    sub-FIM is Σx: the logged lr·λmax must be lr·λmax(Σx), and the rule fire only above 2."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 0.5, 0.2], dtype=torch.float64
    )
    y = torch.randn(64, 1, generator=generator, dtype=torch.float64)
    lambda_max = float(torch.linalg.eigvalsh(x.T @ x / 64)[-1])
    lr = factor * 2.0 / lambda_max
    model = nn.Sequential(nn.Linear(4, 1, bias=False)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = ConditioningMonitor(model, every_n_steps=1, collectives=None, optimizer=optimizer)
    losses = []
    for step in range(30):
        with monitor.track(step):  # the Fisher pass: gradients through autograd.grad only
            h = model(x)
            signs = torch.where(torch.rand(h.shape, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
            sampled = 0.5 * ((h - (h.detach() - signs)) ** 2).mean()
            torch.autograd.grad(sampled, model[0].weight)
        loss = 0.5 * ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    margin = monitor.results["0"].margin
    assert margin["lr_lambda_max"] == pytest.approx(factor * 2.0, rel=1e-9)
    assert margin["stability_limit"] == 2.0 and margin["lambda_max_share"] == 1.0
    keys = monitor.results["0"].metrics()
    assert keys["conditioning/0/lr_lambda_max"] == pytest.approx(factor * 2.0, rel=1e-9)
    fired = [f for f in monitor.findings() if f.rule == "step_size"]
    diverged = losses[-1] > losses[0]
    assert diverged == (factor > 1) and bool(fired) == (factor > 1)
    monitor.close()


def test_adaptive_optimizers_get_no_margin() -> None:
    net = Net()
    monitor = ConditioningMonitor(
        net, every_n_steps=1, collectives=None, warn_diagnosis=False, optimizer=torch.optim.Adam(net.parameters())
    )
    with monitor.track(0):
        nn.functional.cross_entropy(net(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    assert all(not r.margin for r in monitor.results.values())
    assert not any("lr_lambda_max" in k for r in monitor.results.values() for k in r.metrics())
