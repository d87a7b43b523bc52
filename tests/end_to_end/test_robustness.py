"""Random architectures never crash or log NaN; 1,000 analysed steps do not leak."""

from __future__ import annotations

import gc
import math
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordingLogger, SequentialClassifier, fit, loader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@st.composite
def architectures(draw):
    """(net, input shape): conv blocks then linear blocks, random widths, BN, in-place, skips."""
    channels = draw(st.integers(1, 4))
    size = draw(st.sampled_from([4, 6]))
    layers: list[nn.Module] = []
    input_shape = (channels, size, size)
    for _ in range(draw(st.integers(0, 3))):
        out = draw(st.integers(1, 6))
        block: list[nn.Module] = [nn.Conv2d(channels, out, 3, padding=1, bias=draw(st.booleans()))]
        if draw(st.booleans()):
            block.append(nn.BatchNorm2d(out))
        block.append(nn.ReLU(inplace=draw(st.booleans())))
        if out == channels and draw(st.booleans()):
            layers.append(Residual(nn.Sequential(*block)))
        else:
            layers += block
        channels = out
    layers.append(nn.Flatten())
    features = channels * size * size
    for _ in range(draw(st.integers(0, 3))):
        out = draw(st.integers(1, 12))
        block = [nn.Linear(features, out)]
        if draw(st.booleans()):
            block.append(nn.BatchNorm1d(out))
        block.append(nn.ReLU(inplace=draw(st.booleans())))
        if out == features and draw(st.booleans()):
            layers.append(Residual(nn.Sequential(*block)))
        else:
            layers += block
        features = out
    layers.append(nn.Linear(features, 3))
    return nn.Sequential(*layers), input_shape


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=architectures(),
    conv_mode=st.sampled_from(["channel", "patch"]),
    mode=st.sampled_from([{}, {"fisher": "true"}, {"probe_batches": 1}]),
    seed=st.integers(0, 10),
)
def test_random_architectures(arch, conv_mode, mode, seed) -> None:
    net, input_shape = arch
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(12, *input_shape, generator=generator)
    y = torch.randint(0, 3, (12,), generator=generator)
    conditioning = ConditioningCallback(every_n_steps=1, conv_mode=conv_mode, **mode)
    domination = WeightDominationCallback(every_n_steps=1, patience=1)
    module = SequentialClassifier(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, logger = fit(module, loader(x, y, 6), [conditioning, domination], max_steps=3)
    assert logger.history, "nothing logged"
    for metrics in logger.history.values():
        for key, value in metrics.items():
            assert math.isfinite(value), key
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_hundreds_of_analysed_steps_do_not_leak() -> None:
    samples: dict[int, tuple[int, int]] = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (100, 600):
                gc.collect()
                tensors = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
                samples[trainer.global_step] = (_resident_bytes(), tensors)

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 12, generator=generator), torch.randint(0, 5, (256,), generator=generator)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    module = SequentialClassifier(net, lr=0.01)
    conditioning = ConditioningCallback(every_n_steps=1, kappa_percents=(50, 100))

    class Discard(RecordingLogger):  # the sink path runs, nothing is kept by the test itself
        def log_metrics(self, metrics, step=None):
            self.calls = getattr(self, "calls", 0) + 1

    logger = Discard()
    trainer = pl.Trainer(
        max_steps=600,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[conditioning, WeightDominationCallback(every_n_steps=1), Probe()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(x, y, 32))
    assert logger.calls >= 1200
    (rss_100, tensors_100), (rss_600, tensors_600) = samples[100], samples[600]
    # resident memory: a leak of 8 KiB per analysed step would add 4 MiB; one tensor per step, 500
    assert rss_600 - rss_100 < 4 * 2**20, (rss_100, rss_600)
    assert tensors_600 - tensors_100 <= 10, (tensors_100, tensors_600)
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0
    assert conditioning.results["net.4"].step == 599
