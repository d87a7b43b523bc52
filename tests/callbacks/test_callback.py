"""ConditioningCallback inside a real Trainer: schedule, counts, training untouched, errors."""

from __future__ import annotations

import math
import pickle
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordingLogger, SequentialClassifier, fit, loader, seeded
from torch import nn

from lightning_conditioning import ConditioningCallback


def _data(n: int = 64, shape: tuple[int, ...] = (12,), classes: int = 5):
    generator = torch.Generator().manual_seed(2)
    return torch.randn(n, *shape, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def bn_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_schedule_logs_every_n_optimizer_steps() -> None:
    x, y = _data()
    callback = ConditioningCallback(every_n_steps=3)
    _, logger = fit(SequentialClassifier(seeded(mlp)), loader(x, y, 8), [callback], max_steps=7)
    assert sorted(logger.history) == [0, 3, 6]
    expected_keys = (
        {
            f"conditioning/{layer}/{kind}_{stat}"
            for layer in ("net.0", "net.2")
            for kind in ("input", "grad", "fim")
            for stat in ("lambda_max", "rank")
        }
        | {f"conditioning/{layer}/{k}_input_units" for layer in ("net.0", "net.2") for k in ("dead", "full")}
        | {
            f"conditioning/{layer}/{q}"
            for layer in ("net.0", "net.2")  # SGD: the stability margin
            for q in ("lr_lambda_max", "stability_limit", "lambda_max_share")
        }
        | {
            f"conditioning/{layer}/{q}"
            for layer in ("net.0", "net.2")  # outlier features of Σx
            for q in ("input_outlier_ratio", "input_outlier_feature")
        }
    )
    logged = set(logger.history[6])
    kappas = {k for k in logged if "_kappa_" in k}
    assert logged - kappas == expected_keys
    # each κ_p once: a measurement, or marked (8 rows per step < 12 or 16 dims: zeros)
    for layer in ("net.0", "net.2"):
        for kind in ("input", "grad", "fim"):
            for p in (50, 80, 100):
                base = f"conditioning/{layer}/{kind}_kappa_{p}"
                assert len(kappas & {base, base + "_lower_bound", base + "_infinite"}) == 1
    assert len(kappas) == 2 * 3 * 3
    assert "conditioning/net.0/input_kappa_80_infinite" in kappas  # λ_10 of 12, rank <= 8
    assert all(r.step == 6 for r in callback.results.values())
    assert callback.layer_names == ["net.0", "net.2"]


def test_custom_percents_and_layer_selection() -> None:
    x, y = _data()
    callback = ConditioningCallback(every_n_steps=1, kappa_percents=[90, 99.5], include=["net.2"])
    _, logger = fit(SequentialClassifier(seeded(mlp)), loader(x, y, 64), [callback])
    keys = set(logger.history[0])
    assert "conditioning/net.2/input_kappa_99_5" in keys
    assert "conditioning/net.2/fim_kappa_90" in keys or "conditioning/net.2/fim_kappa_90_lower_bound" in keys
    assert not any("net.0" in k for k in keys)
    excluded = ConditioningCallback(every_n_steps=1, exclude=["net.*"])
    with pytest.warns(UserWarning, match="removed every layer"):
        fit(SequentialClassifier(seeded(mlp)), loader(x, y, 64), [excluded])


def test_dead_and_full_units_are_exact() -> None:
    # units 0-2 of the hidden layer never fire, units 3-4 always fire, the rest vary
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        net[0].weight[:3] = 0.0
        net[0].weight[3:5] = 0.05 * torch.randn(2, 6)  # varying, but always > 0
        net[0].bias[:3] = -1.0
        net[0].bias[3:5] = 2.0
        net[0].weight[5:] = torch.randn(5, 6)
        net[0].bias[5:] = 0.0
    x = torch.randn(40, 6)
    x[:, 0] = -torch.rand(40)  # an input feature that is never > 0 ...
    x[:, 1] = torch.rand(40) + 0.1  # ... and one that always is
    y = torch.randint(0, 3, (40,))
    callback = ConditioningCallback(every_n_steps=1)
    _, logger = fit(SequentialClassifier(net, lr=0.0), loader(x, y, 40), [callback])
    logged = logger.history[0]
    assert logged["conditioning/net.2/dead_input_units"] == 3
    assert logged["conditioning/net.2/full_input_units"] == 2
    assert logged["conditioning/net.0/dead_input_units"] == 1
    assert logged["conditioning/net.0/full_input_units"] == 1
    # the dead units are exact zeros of Σx: rank 10 - 3
    result = callback.results["net.2"]
    assert result.input is not None and result.input.rank == 7


def _train_state(factory, callbacks, data, **kwargs) -> dict[str, torch.Tensor]:
    pl.seed_everything(123, verbose=False)
    module = SequentialClassifier(factory())
    fit(module, data, callbacks, max_steps=6, **kwargs)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("factory", [mlp, bn_cnn], ids=["mlp", "bn_cnn_inplace_dropout"])
@pytest.mark.parametrize("conv_mode", ["channel", "patch"])
def test_training_is_bit_identical(factory, conv_mode: str) -> None:
    shape = (12,) if factory is mlp else (3, 8, 8)
    x, y = _data(shape=shape)
    data = loader(x, y, 16)
    plain = _train_state(factory, [], data)
    watched = _train_state(factory, [ConditioningCallback(every_n_steps=1, conv_mode=conv_mode)], data)
    assert plain.keys() == watched.keys()
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


class _Explodes(pl.LightningModule):
    """Two heads: ``bad`` sees an infinite input (its output is detached), ``good`` is fine."""

    def __init__(self) -> None:
        super().__init__()
        self.good = nn.Linear(4, 2)
        self.bad = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        inf_input = torch.full_like(x, float("inf"))
        _ = self.bad(inf_input).detach()
        return nn.functional.cross_entropy(self.good(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.good.parameters(), lr=0.1)


def test_nonfinite_layer_logs_nothing_and_others_still_log() -> None:
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    callback = ConditioningCallback(every_n_steps=1)
    with pytest.warns(UserWarning, match="NaN/Inf"):
        _, logger = fit(_Explodes(), loader(x, y, 16), [callback])
    logged = logger.history[0]
    assert not any(k.startswith("conditioning/bad/") for k in logged)
    assert "conditioning/good/fim_lambda_max" in logged
    assert callback.results["bad"].status == "nonfinite"
    assert callback.results["good"].status == "ok"


class _Silent(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.used(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.used.parameters(), lr=0.1)


def test_silent_layers_are_reported_once() -> None:
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    callback = ConditioningCallback(every_n_steps=1)
    with pytest.warns(UserWarning, match="never fired") as record:
        fit(_Silent(), loader(x, y, 4), [callback], max_steps=3)
    assert sum("never fired" in str(w.message) for w in record) == 1
    assert callback.results["unused"].status == "no_data"


def test_linear_on_sequence_input_and_module_called_twice() -> None:
    class Twice(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch  # x: (B, T, 4)
            h = self.proj(torch.relu(self.proj(x)))  # called twice
            return nn.functional.cross_entropy(self.head(h).mean(1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = torch.randn(8, 5, 4), torch.randint(0, 3, (8,))
    callback = ConditioningCallback(every_n_steps=1)
    fit(Twice(), loader(x, y, 8), [callback])
    proj, head = callback.results["proj"], callback.results["head"]
    assert proj.input_rows == proj.grad_rows == 2 * 8 * 5
    assert head.input_rows == head.grad_rows == 8 * 5
    assert proj.status == head.status == "ok"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(every_n_steps=0), ValueError),
        (dict(every_n_steps=2.5), TypeError),
        (dict(conv_mode="im2col"), ValueError),
        (dict(kappa_percents=[0]), ValueError),
        (dict(kappa_percents=[101]), ValueError),
        (dict(kappa_percents=[]), ValueError),
        (dict(loss_reduction="avg"), ValueError),
        (dict(statistics_dtype="float16"), ValueError),
        (dict(rank_rtol=-1.0), ValueError),
        (dict(rank_rtol=1.0), ValueError),
        (dict(rank_rtol="1e-7"), ValueError),
        (dict(rank_rtol=True), ValueError),
        (dict(rank_rtol=math.nan), ValueError),
        (dict(kappa_definition="percentile"), ValueError),
        (dict(layer_types=[int]), TypeError),
    ],
)
def test_bad_arguments_fail_early(kwargs, error) -> None:
    with pytest.raises(error) as raised:
        ConditioningCallback(**kwargs)
    # the message names the argument and the value that was given
    name = next(iter(kwargs))
    assert name in str(raised.value)


def test_kappa_percents_given_as_fractions_fail_with_the_percents_meant() -> None:
    with pytest.raises(ValueError, match=r"got \[0\.5, 0\.8, 1\.0\]: fractions\? Use \[50, 80, 100\]"):
        ConditioningCallback(kappa_percents=[0.5, 0.8, 1.0])
    with pytest.raises(ValueError, match=r"Use \[99\.5\]"):
        ConditioningCallback(kappa_percents=[0.995])
    # a small percent beside a larger one is meant
    assert ConditioningCallback(kappa_percents=[0.5, 50]).options.kappa_percents == (0.5, 50)
    assert ConditioningCallback(kappa_percents=[1]).options.kappa_percents == (1,)


def test_precision_defaults_and_rank_rtol_only_raises_the_floor() -> None:
    x, y = _data()
    default = ConditioningCallback(every_n_steps=1)
    assert default.statistics_dtype == "auto" and default.kappa_definition == "paper"
    coarse = ConditioningCallback(every_n_steps=1, rank_rtol=1e-2)
    below = ConditioningCallback(every_n_steps=1, rank_rtol=0.0)
    for callback in (default, coarse, below):
        fit(SequentialClassifier(seeded(mlp)), loader(x, y, 64), [callback], max_steps=1)
    # "auto" on the CPU forms float64 Grams: the derived floor of 64 rows, 12 dims
    floor = default.results["net.0"].input.rtol
    assert floor == pytest.approx(1e3 * (2.0**-53 * 8 + 2.0**-53 * 12))
    assert below.results["net.0"].input.rtol == floor  # rank_rtol=0 cannot lower it
    assert coarse.results["net.0"].input.rtol == 1e-2


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_hooks_removed_after_fit_and_model_pickles() -> None:
    x, y = _data()
    module = SequentialClassifier(seeded(mlp))
    fit(module, loader(x, y, 16), [ConditioningCallback(every_n_steps=1)], max_steps=2)
    assert _hook_count(module) == 0
    pickle.dumps(module.net)


def test_hooks_removed_when_fit_raises() -> None:
    class Boom(SequentialClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    x, y = _data()
    module = Boom(seeded(mlp))
    callback = ConditioningCallback(every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[callback],
        logger=RecordingLogger(),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, loader(x, y, 16))
    assert _hook_count(module) == 0
    pickle.dumps(module.net)


def test_validation_and_deepcopies_do_not_add_rows() -> None:
    import copy

    class WithCopy(SequentialClassifier):
        def training_step(self, batch, batch_idx):
            twin = copy.deepcopy(self.net)  # carries our hooks: they must ignore it
            with torch.no_grad():
                twin(batch[0])
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            self(batch[0])

    x, y = _data()
    callback = ConditioningCallback(every_n_steps=1)
    module = WithCopy(seeded(mlp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, loader(x, y, 64), [callback], val_check_interval=1, limit_val_batches=1)
    assert callback.results["net.0"].input_rows == 64


def test_long_analyses_are_announced(caplog) -> None:
    import logging

    class Wide(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2700, 2)  # Σx of 2700²: estimated 1.2 s

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.fc(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = torch.randn(8, 2700), torch.randint(0, 2, (8,))
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(Wide(), loader(x, y, 8), [ConditioningCallback(every_n_steps=1, memory_budget=1 << 30)])
    messages = [r.getMessage() for r in caplog.records]
    assert any("eigen-analysis of 1 layers (largest Σx 2700×2700)" in m for m in messages), messages
    assert any("analysis done in" in m for m in messages)
