"""Extra passes (true Fisher, probe batches), precisions, and the rest of a real run."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordingLogger, SequentialClassifier, fit, loader, seeded
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback


def _data(n=64, shape=(12,), classes=5, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def mlp():
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.2),
        nn.Conv2d(6, 6, 3, stride=2),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )


MODES = {
    "piggyback": dict(),
    "probe": dict(probe_batches=2),
    "true_fisher": dict(fisher="true"),
    "true_fisher_probe": dict(fisher="true", probe_batches=2),
}


def _everything(factory, shape, callbacks):
    """Train 5 steps; return every piece of state training owns."""
    x, y = _data(shape=shape)
    pl.seed_everything(11, verbose=False)
    module = SequentialClassifier(factory())
    trainer, _ = fit(module, loader(x, y, 16), callbacks, max_steps=5)
    optimizer = trainer.optimizers[0].state_dict()
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "grads": {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
        "momentum": [s["momentum_buffer"].clone() for s in optimizer["state"].values()],
        "rng": torch.get_rng_state(),
        "modes": [m.training for m in module.modules()],
    }


@functools.cache
def _plain(factory, shape):
    """The unwatched run, trained once per model and shared by every mode (read only)."""
    return _everything(factory, shape, [])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("factory, shape", [(mlp, (12,)), (cnn, (3, 8, 8))], ids=["mlp", "cnn"])
def test_every_mode_leaves_training_bit_identical(mode, factory, shape) -> None:
    plain = _plain(factory, shape)
    watched = _everything(
        factory,
        shape,
        [ConditioningCallback(every_n_steps=1, **MODES[mode]), WeightDominationCallback(every_n_steps=1)],
    )
    assert plain["state"].keys() == watched["state"].keys()
    for key in plain["state"]:
        assert torch.equal(plain["state"][key], watched["state"][key]), key
    assert plain["grads"].keys() == watched["grads"].keys()
    for key in plain["grads"]:
        assert torch.equal(plain["grads"][key], watched["grads"][key]), key
    assert all(torch.equal(a, b) for a, b in zip(plain["momentum"], watched["momentum"]))
    assert torch.equal(plain["rng"], watched["rng"])
    assert plain["modes"] == watched["modes"]


def test_true_fisher_matches_its_expectation_on_the_logits() -> None:
    # E_y[(p - e_y)(p - e_y)ᵀ] = diag(p) - p pᵀ: the true Fisher's Σ∇h of the logits layer
    x, y = _data(n=2048, shape=(12,))
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)))
    with torch.no_grad():
        p = torch.softmax(net(x).double(), dim=1)
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    true_cb = ConditioningCallback(every_n_steps=1, fisher="true")
    empirical_cb = ConditioningCallback(every_n_steps=1)
    fit(SequentialClassifier(copy.deepcopy(net)), loader(x, y, 2048), [true_cb])
    fit(SequentialClassifier(copy.deepcopy(net)), loader(x, y, 2048), [empirical_cb])
    got = true_cb.results["net.2"].grad
    assert got is not None
    assert got.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(expected).max()), rel=0.1)
    # the labels differ, the inputs do not
    same_input = empirical_cb.results["net.2"].input
    assert same_input is not None and true_cb.results["net.2"].input is not None
    assert true_cb.results["net.2"].input.lambda_max == pytest.approx(same_input.lambda_max, rel=1e-6)
    assert got.lambda_max != pytest.approx(empirical_cb.results["net.2"].grad.lambda_max, rel=1e-3)


def test_probe_batches_compare_like_with_like() -> None:
    x, y = _data(n=96)
    probe = ConditioningCallback(every_n_steps=1, probe_batches=2)
    current = ConditioningCallback(every_n_steps=1)
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
    # lr 0: parameters never move, so only the analysed data can change the numbers
    _, probe_log = fit(SequentialClassifier(copy.deepcopy(net), lr=0.0), loader(x, y, 16), [probe], max_steps=4)
    _, current_log = fit(SequentialClassifier(copy.deepcopy(net), lr=0.0), loader(x, y, 16), [current], max_steps=4)
    key = "conditioning/net.2/fim_lambda_max"
    probe_values = [probe_log.history[s][key] for s in range(4)]
    assert probe_values == pytest.approx([probe_values[0]] * 4, rel=1e-12)
    assert len({round(current_log.history[s][key], 9) for s in range(4)}) == 4
    assert probe.results["net.0"].input_rows == 32  # the two held batches of 16


def _fp16_plugin(init_scale: float = 2.0**10) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_float16_with_grad_scaler_matches_float32() -> None:
    x, y = _data()
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
    fp32, fp16 = ConditioningCallback(every_n_steps=1), ConditioningCallback(every_n_steps=1)
    fit(SequentialClassifier(copy.deepcopy(net)), loader(x, y, 64), [fp32])
    fit(SequentialClassifier(copy.deepcopy(net)), loader(x, y, 64), [fp16], plugins=[_fp16_plugin()])
    for name in ("net.0", "net.2"):
        a, b = fp32.results[name].metrics(), fp16.results[name].metrics()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-2), key


def test_float16_overflow_steps_log_nothing() -> None:
    x, y = _data()
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
    # the diagnosis may warn about rank deficiency: only the capture's own warnings count here
    callback = ConditioningCallback(every_n_steps=1, warn_diagnosis=False)
    plugin = _fp16_plugin(init_scale=2.0**22)  # the first steps overflow and back off
    scales = []

    class Scale(pl.Callback):
        def on_train_batch_end(self, *args):
            scales.append(plugin.scaler.get_scale())

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no NaN/Inf warning either
        warnings.filterwarnings("ignore", ".*logging interval.*")
        _, logger = fit(
            SequentialClassifier(net), loader(x, y, 16), [callback, Scale()], max_steps=12, plugins=[plugin]
        )
    overflowed = {s for s in range(12) if scales[s] < (scales[s - 1] if s else 2.0**22)}
    assert overflowed and len(overflowed) < 12
    assert set(logger.history) == set(range(12)) - overflowed
    for metrics in logger.history.values():
        assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("precision, rel", [("bf16-mixed", 5e-2), ("64-true", 1e-10)])
def test_other_precisions(precision: str, rel: float) -> None:
    x, y = _data()
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
    reference = ConditioningCallback(every_n_steps=1, statistics_dtype="float64")
    other = ConditioningCallback(every_n_steps=1, statistics_dtype="float64")
    fit(SequentialClassifier(copy.deepcopy(net).double()), loader(x.double(), y, 64), [reference])
    data = loader(x.double(), y, 64) if precision == "64-true" else loader(x, y, 64)
    fit(SequentialClassifier(copy.deepcopy(net)), data, [other], precision=precision)
    for name in ("net.0", "net.2"):
        expected = reference.results[name].metrics()
        got = other.results[name].metrics()
        for key in ("input_lambda_max", "grad_lambda_max", "fim_lambda_max", "fim_kappa_50"):
            full = f"conditioning/{name}/{key}"
            assert got[full] == pytest.approx(expected[full], rel=rel), full


def test_compiled_module_gives_the_same_numbers() -> None:
    x, y = _data()
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 5)))
    eager, compiled = ConditioningCallback(every_n_steps=1), ConditioningCallback(every_n_steps=1)
    fit(SequentialClassifier(copy.deepcopy(net)), loader(x, y, 32), [eager], max_steps=2)

    class Compiled(SequentialClassifier):
        def forward(self, inputs):
            return self.compiled(inputs)

    module = Compiled(copy.deepcopy(net))
    module.compiled = torch.compile(module.net, backend="aot_eager")
    fit(module, loader(x, y, 32), [compiled], max_steps=2)
    for name in ("net.0", "net.2"):
        a, b = eager.results[name].metrics(), compiled.results[name].metrics()
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers (GAN-style alternation)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.second = nn.Linear(16, 5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self.second(self.first(x)), y)
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.1)]


def test_manual_optimization_with_two_optimizers() -> None:
    x, y = _data()
    callback = ConditioningCallback(every_n_steps=2)
    trainer, logger = fit(
        TwoOptimizers(), loader(x, y, 16), [callback, WeightDominationCallback(every_n_steps=2)], max_steps=8
    )
    assert trainer.global_step == 8
    assert sorted(s for s, m in logger.history.items() if any(k.startswith("conditioning/") for k in m)) == [0, 2, 4, 6]
    # both backward passes of an analysed batch count: each layer saw 2 × 16 rows
    assert callback.results["second"].grad_rows == 32


class Branchy(pl.LightningModule):
    """A frozen first layer fed raw data, and a branch used on even batches only."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(12, 16).requires_grad_(False)
        self.odd_only = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.frozen(x))
        if batch_idx % 2:
            h = torch.relu(self.odd_only(h))
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_frozen_and_sometimes_unused_layers() -> None:
    x, y = _data()
    callback = ConditioningCallback(every_n_steps=1)
    with pytest.warns(UserWarning, match="never fired"):
        _, logger = fit(Branchy(), loader(x, y, 16), [callback], max_steps=4)
    assert "conditioning/odd_only/fim_lambda_max" not in logger.history[0]
    assert "conditioning/odd_only/fim_lambda_max" in logger.history[1]
    # the frozen first layer has inputs but no output gradient: Σx only
    assert "conditioning/frozen/input_lambda_max" in logger.history[0]
    assert "conditioning/frozen/grad_lambda_max" not in logger.history[0]
    assert callback.results["frozen"].status == "no_grad"


@pytest.mark.parametrize("extra", [dict(), dict(probe_batches=2)], ids=["piggyback", "probe"])
def test_resumed_run_logs_the_same_steps(tmp_path: Path, extra: dict) -> None:
    x, y = _data(n=64)  # 4 batches per epoch: checkpoints at epoch ends resume exactly

    def run(max_steps, ckpt_path=None, checkpoint=False):
        pl.seed_everything(5, verbose=False)
        module = SequentialClassifier(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
        callbacks = [ConditioningCallback(every_n_steps=2, **extra)]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1))
        logger = RecordingLogger()
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=callbacks,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=checkpoint,
            deterministic=True,
        )
        trainer.fit(module, loader(x, y, 16), ckpt_path=ckpt_path)
        return logger.history

    whole = run(10, checkpoint=True)
    resumed = run(10, ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert sorted(whole) == [0, 2, 4, 6, 8]
    assert sorted(resumed) == [4, 6, 8]
    for step in (4, 6, 8):
        for key, value in whole[step].items():
            assert resumed[step][key] == pytest.approx(value, rel=1e-6), (step, key)


def test_window_steps_sum_consecutive_steps() -> None:
    # lr 0: a 4-step window of batches of 16 is one analysis of the same 64 examples
    x, y = _data(n=64)
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
    windowed = ConditioningCallback(every_n_steps=4, window_steps=4, statistics_dtype="float64")
    whole = ConditioningCallback(every_n_steps=1, statistics_dtype="float64")
    _, log_windowed = fit(SequentialClassifier(copy.deepcopy(net), lr=0.0), loader(x, y, 16), [windowed], max_steps=8)
    _, log_whole = fit(SequentialClassifier(copy.deepcopy(net), lr=0.0), loader(x, y, 64), [whole])
    assert sorted(log_windowed.history) == [3, 7]
    for key, value in log_whole.history[0].items():
        assert log_windowed.history[3][key] == pytest.approx(value, rel=1e-6), key
    assert windowed.results["net.0"].input_rows == 64 and windowed.results["net.0"].step == 7
    with pytest.raises(ValueError, match="window_steps"):
        ConditioningCallback(every_n_steps=2, window_steps=3)
