"""ConditioningMonitor / WeightDominationMonitor: the Lightning-free core, and the callbacks as
thin shells over it (same numbers, same keys, bit-identical training)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import SequentialClassifier, fit, loader, seeded
from torch import nn

from lightning_conditioning import (
    ConditioningCallback,
    ConditioningMonitor,
    WeightDominationCallback,
    WeightDominationMonitor,
)
from lightning_conditioning.distributed.collectives import Collectives


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(n, 12, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def _plain_loop(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, **options: object
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """SGD (momentum 0.9, lr 0.05, as SequentialClassifier) with both monitors; the scalars
    of every analysed step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    conditioning: dict[int, dict[str, float]] = {}
    domination: dict[int, dict[str, float]] = {}
    named = nn.ModuleDict({"net": net})  # layer names as in SequentialClassifier: net.0, …
    with ConditioningMonitor(named, collectives=None, optimizer=optimizer, **options) as monitor:  # type: ignore[arg-type]
        checker = WeightDominationMonitor(named, every_n_steps=int(options.get("every_n_steps", 100)))  # type: ignore[call-overload]
        for step in range(steps):
            xb, yb = x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch]
            with monitor.track(step):
                loss = nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
            checker.before_optimizer_step(step, loss=loss.item())  # as the callback reads it
            optimizer.step()
            optimizer.zero_grad()
            if checker.pending_step is not None:
                domination[step] = checker.after_optimizer_step()
            if monitor.updated:
                conditioning[step] = {k: v for r in monitor.results.values() for k, v in r.metrics().items()}
    return conditioning, domination


@pytest.mark.parametrize("window_steps", [1, 2])
def test_monitor_in_a_plain_loop_equals_the_callback_in_a_trainer(window_steps: int) -> None:
    x, y = _data(96)
    initial = seeded(mlp)
    options = dict(every_n_steps=2, window_steps=window_steps, warn_diagnosis=False)
    by_hand = copy.deepcopy(initial)
    conditioning, domination = _plain_loop(by_hand, x, y, steps=6, batch=16, **options)

    module = SequentialClassifier(copy.deepcopy(initial))
    callback = ConditioningCallback(**options, log_histograms=False)  # type: ignore[arg-type]
    checker = WeightDominationCallback(every_n_steps=2)
    _, logger = fit(module, loader(x, y, 16), [callback, checker], max_steps=6)

    # bit-identical training, with or without either monitor
    untouched = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(untouched.parameters(), lr=0.05, momentum=0.9)
    for step in range(6):
        nn.functional.cross_entropy(
            untouched(x[step * 16 : (step + 1) * 16]), y[step * 16 : (step + 1) * 16]
        ).backward()
        optimizer.step()
        optimizer.zero_grad()
    for a, b, c in zip(by_hand.parameters(), module.net.parameters(), untouched.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)

    expected_steps = [s for s in range(6) if s % 2 == window_steps - 1]
    assert sorted(conditioning) == expected_steps
    for step in expected_steps:
        logged = logger.history[step]
        mine = {k: v for k, v in logged.items() if k.startswith("conditioning/")}
        assert set(mine) == set(conditioning[step])
        for key, value in conditioning[step].items():
            assert math.isclose(mine[key], value, rel_tol=1e-12), key
    for step, metrics in domination.items():
        theirs = {k: v for k, v in logger.history[step].items() if k.startswith("weight_domination/")}
        assert set(theirs) == set(metrics)
        for key, value in metrics.items():
            assert math.isclose(theirs[key], value, rel_tol=1e-12), key


def test_track_with_accumulation_sums_the_micro_batches() -> None:
    x, y = _data(32)
    net = seeded(mlp)
    whole_net, parts_net = copy.deepcopy(net), copy.deepcopy(net)
    whole = ConditioningMonitor(whole_net, every_n_steps=1, collectives=None, warn_diagnosis=False)
    with whole.track(0):
        nn.functional.cross_entropy(whole_net(x), y).backward()
    parts = ConditioningMonitor(parts_net, every_n_steps=1, collectives=None, warn_diagnosis=False)
    for i in range(2):
        xb, yb = x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]
        # the loss divided by the 2 micro-batches, as Lightning does: grad_multiplier undoes it
        with parts.track(0, grad_multiplier=2.0, last_micro_batch=i == 1):
            (nn.functional.cross_entropy(parts_net(xb), yb) / 2).backward()
        assert parts.updated == (i == 1)
    for name, result in whole.results.items():
        other = parts.results[name]
        assert result.input is not None and other.input is not None
        assert result.grad is not None and other.grad is not None
        torch.testing.assert_close(other.input.eigenvalues, result.input.eigenvalues, rtol=1e-9, atol=1e-12)
        # rows of two 16-row micro-batches (×16 each, ×2 for the division) = the 32-row batch's
        # per-example gradients (×32)
        torch.testing.assert_close(other.grad.eigenvalues, result.grad.eigenvalues, rtol=1e-9, atol=1e-12)


def test_core_imports_neither_lightning_nor_tensorboard() -> None:
    code = (
        "import sys\n"
        "from lightning_conditioning import ConditioningMonitor, WeightDominationMonitor\n"
        "import lightning_conditioning.monitors.conditioning, lightning_conditioning.monitors.domination\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'tensorboard'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_and_bad_options_fail_early() -> None:
    net = mlp()
    with pytest.raises(TypeError, match="unknown option"):
        ConditioningMonitor(net, every_steps=3)
    with pytest.raises(ValueError, match="window_steps"):
        ConditioningMonitor(net, every_n_steps=2, window_steps=3)
    assert not any(m._forward_hooks for m in net.modules())  # nothing was attached


def test_close_removes_every_hook_and_keeps_results() -> None:
    net = mlp()
    x, y = _data(16)
    with ConditioningMonitor(net, every_n_steps=1, collectives=None, warn_diagnosis=False) as monitor:
        with monitor.track(0):
            nn.functional.cross_entropy(net(x), y).backward()
        # one per layer, and one on their parent (the host of functional uses of their weights)
        assert monitor.updated and sum(len(m._forward_hooks) for m in net.modules()) == 4
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0
    assert set(monitor.results) == {"0", "2", "4"}


def test_two_conditioning_callbacks_with_different_options_in_one_trainer() -> None:
    x, y = _data()
    channel = ConditioningCallback(every_n_steps=1, prefix="all")
    nonzero = ConditioningCallback(every_n_steps=2, prefix="nonzero", kappa_definition="nonzero")
    assert channel.state_key != nonzero.state_key
    _, logger = fit(SequentialClassifier(seeded(mlp)), loader(x, y, 16), [channel, nonzero], max_steps=3)
    assert any(k.startswith("all/") for k in logger.history[1])
    assert not any(k.startswith("nonzero/") for k in logger.history[1])
    assert any(k.startswith("nonzero/") for k in logger.history[2])


def test_diagnosis_state_survives_a_checkpoint() -> None:
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every hidden unit dead: the dead-units rule fires
    x, y = _data(16)
    first = ConditioningCallback(every_n_steps=1)
    with pytest.warns(UserWarning):
        fit(SequentialClassifier(copy.deepcopy(net)), loader(x, y, 16), [first], max_steps=1)
    state = first.state_dict()
    assert state["fired_rules"], "a rule should have fired"
    resumed = ConditioningCallback(every_n_steps=1)
    resumed.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(SequentialClassifier(copy.deepcopy(net)), loader(x, y, 16), [resumed], max_steps=1)
    fired_again = [w for w in caught if any(rule in str(w.message) for rule in ("dead", "κ_p is not"))]
    assert not fired_again, [str(w.message)[:80] for w in fired_again]


def test_collectives_reduce_through_a_given_callable() -> None:
    calls: list[str] = []

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        calls.append(op)
        return tensor  # a "group" of one real process posing as rank 0 of 2

    x, y = _data(16)
    net = seeded(mlp)
    reference_net = copy.deepcopy(net)
    monitor = ConditioningMonitor(
        net, every_n_steps=1, warn_diagnosis=False, collectives=Collectives(reduce, world_size=2, rank=0)
    )
    with monitor.track(0):
        nn.functional.cross_entropy(net(x), y).backward()
    # the per-unit maxima (and precisions, shared inputs), the sums, then the shared-out
    # eigenvalues: three collectives
    assert calls == ["max", "sum", "sum"]
    reference = ConditioningMonitor(reference_net, every_n_steps=1, collectives=None, warn_diagnosis=False)
    with reference.track(0):
        nn.functional.cross_entropy(reference_net(x), y).backward()
    # rank 1's share never arrives from this fake group: those layers are solved locally
    # instead of failing; every layer matches the one-process analysis
    for name, result in reference.results.items():
        assert monitor.results[name].metrics() == pytest.approx(result.metrics(), rel=1e-12)


class _FirstInputOfBilinear:
    """Analyse nn.Bilinear through its first input, as a Linear would be."""

    def __new__(cls) -> object:
        from lightning_conditioning.capture.adapters import LinearAdapter

        class Adapter(LinearAdapter):
            def dims(self, module: nn.Module) -> tuple[int, int, int]:
                return module.in1_features, module.out_features, module.in1_features

        return Adapter()


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 4)
        self.both = nn.Bilinear(4, 4, 3)
        self.rnn = nn.GRU(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.both(h, h)


def test_registering_an_adapter_is_enough_and_the_rest_is_reported() -> None:
    from lightning_conditioning import register_adapter
    from lightning_conditioning.capture import registry

    model = _Pair()
    with pytest.warns(
        UserWarning,
        match=r"both \(Bilinear, 51 parameters\): a layer kind with no adapter; "
        r"rnn \(GRU, 150 parameters\): a recurrent",
    ):
        before = ConditioningMonitor(model, collectives=None)
    assert before.layer_names == ["first"]
    before.close()
    register_adapter(nn.Bilinear, lambda module, mode: _FirstInputOfBilinear())
    try:
        with pytest.warns(UserWarning, match=r"1 weight-bearing module.*rnn \(GRU") as caught:
            monitor = ConditioningMonitor(model, every_n_steps=1, collectives=None, warn_diagnosis=False)
        assert "Bilinear" not in str(caught[0].message)
        assert monitor.layer_names == ["first", "both"]
        with monitor.track(0):
            model(torch.randn(8, 6)).square().mean().backward()
        assert monitor.results["both"].status == "ok"
        assert monitor.results["both"].input is not None and monitor.results["both"].input.dim == 4
        monitor.close()
        # leaving a module out on purpose is a choice: nothing to report
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ConditioningMonitor(model, collectives=None, exclude=["rnn"]).close()
    finally:
        registry._REGISTRY.pop()


def test_windows_follow_a_model_moved_after_the_hooks() -> None:
    # the meta device stands in for an accelerator: a model moved after the monitor was made
    # (as Lightning's strategy does after `setup`) gets its sums where its activations are
    net = mlp()
    monitor = ConditioningMonitor(net, every_n_steps=1, collectives=None)
    assert monitor.capture is not None
    assert {w.device.type for w in monitor.capture.windows.values()} == {"cpu"}
    net.to("meta")
    assert monitor.begin(0)
    with monitor.capture_pass():
        net(torch.randn(4, 12, device="meta"))
    assert {w.device.type for w in monitor.capture.windows.values()} == {"meta"}
    monitor.close()


def test_importing_the_package_and_version_load_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import lightning_conditioning\n"
        "from lightning_conditioning.report.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--version'])\n"
        "assert lightning_conditioning.__version__ in out.getvalue(), out.getvalue()\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConditioningCallback(every_n_steps=1, conv_mode="channel"),
        lambda: WeightDominationCallback(every_n_steps=1),
    ],
    ids=["conditioning", "weight_domination"],
)
def test_two_callbacks_with_one_prefix_fail_at_setup_naming_prefix(make: Any) -> None:
    first, second = make(), make()
    # Lightning's own check at Trainer(...) passes (it could not say what to change) ...
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[first, second],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    x, y = _data(16)
    name = type(first).__name__
    prefix = first.prefix
    with pytest.raises(
        ValueError,
        match=rf"2 {name}s in this Trainer log under prefix='{prefix}'.*"
        rf"Give each its own prefix=, e\.g\. {name}\(\.\.\., prefix='{prefix}_2'\)",
    ):
        trainer.fit(SequentialClassifier(seeded(mlp)), loader(x, y, 16))
    # ... and with their own prefixes they train side by side
    first.prefix, second.prefix = "a", "b"
    fit(SequentialClassifier(seeded(mlp)), loader(x, y, 16), [first, second], max_steps=1)
