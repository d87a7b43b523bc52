"""Probe batches are drawn without moving anything training depends on.

The reference is the same run without the callback: with a shuffled loader whose order comes
from a seeded generator (the loader's or the sampler's own), with loader workers, with two
loaders combined, with Dropout in the model, every final parameter must be ``torch.equal``
and the batches training saw the same, in the same order. The probe batches themselves must be
the first batches of the first epoch (what the option documents), but with loader workers,
whose iterator has taken the epoch's first indices before ``on_train_start``.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import SequentialClassifier, fit
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_conditioning import ConditioningCallback
from lightning_conditioning.capture.passes import draw_probe_batches

N, FEATURES, CLASSES, BATCH = 48, 10, 3, 16


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(N, FEATURES, generator=generator), torch.randint(0, CLASSES, (N,), generator=generator)
    )


def _loader(kind: str) -> Any:
    data = _dataset()
    if kind == "loader_generator":
        return DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2))
    if kind == "sampler_generator":
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(2))
        return DataLoader(data, batch_size=BATCH, sampler=sampler)
    if kind == "global_stream":  # no generator: the order comes from torch's global stream
        return DataLoader(data, batch_size=BATCH, shuffle=True)
    if kind == "persistent_workers":
        return DataLoader(
            data,
            batch_size=BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(2),
            num_workers=1,
            persistent_workers=True,
        )
    assert kind == "two_loaders"
    return {"a": _loader("loader_generator"), "b": _loader("sampler_generator")}


class Recording(SequentialClassifier):
    """Dropout in the net; every training batch kept (the order training saw)."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, CLASSES)))
        self.seen: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch)
        if isinstance(batch, dict):  # two loaders: one loss over both
            return sum(super(Recording, self).training_step(part, batch_idx) for part in batch.values())
        return super().training_step(batch, batch_idx)


def _run(kind: str, callbacks: list[pl.Callback]) -> Recording:
    pl.seed_everything(0, verbose=False)
    module = Recording()
    fit(module, _loader(kind), callbacks, max_steps=-1, max_epochs=2)
    return module


def _flat(batches: list[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for batch in batches:
        parts = batch.values() if isinstance(batch, dict) else [batch]
        out += [t for part in parts for t in part]
    return out


@pytest.mark.parametrize(
    "options", [dict(probe_batches=2), dict(fisher="true", probe_batches=1)], ids=["probe", "true_fisher_probe"]
)
@pytest.mark.parametrize(
    "kind", ["loader_generator", "sampler_generator", "global_stream", "persistent_workers", "two_loaders"]
)
def test_probe_batches_leave_a_shuffled_run_bit_identical(kind: str, options: dict[str, Any]) -> None:
    plain = _run(kind, [])
    if kind == "two_loaders":  # the model is called on one part of the combined batch
        options = dict(
            options,
            forward_fn=lambda module, batch: module(batch["a"][0]),
            loss_fn=lambda logits, batch: nn.functional.cross_entropy(logits, batch["a"][1]),
        )
    callback = ConditioningCallback(every_n_steps=1, **options)  # type: ignore[arg-type]
    watched = _run(kind, [callback])
    assert len(plain.seen) == len(watched.seen) == 2 * 3
    for seen_plain, seen_watched in zip(_flat(plain.seen), _flat(watched.seen)):
        assert torch.equal(seen_plain, seen_watched)
    for (name, p), q in zip(plain.named_parameters(), watched.parameters()):
        assert torch.equal(p, q), name
    held = callback.state_dict()["held_batches"]
    assert len(held) == options["probe_batches"]
    if kind == "persistent_workers":  # workers drew the epoch's first indices already
        return
    # the probe batches are the first batches of the first epoch
    for probe, first in zip(_flat(held), _flat(plain.seen[: len(held)])):
        assert torch.equal(probe, first)
    assert callback.results  # and they were analysed


def test_draw_leaves_every_random_stream_as_it_was() -> None:
    data = _loader("loader_generator")
    epoch = iter(data)  # as a training loop holds it before its first batch
    random.random(), np.random.rand()  # something to keep: not the streams' initial states
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), data.generator.get_state())
    probe = draw_probe_batches(data, 2)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert torch.equal(data.generator.get_state(), states[3])
    batches = list(epoch)
    assert len(probe) == 2 and all(torch.equal(p[0], b[0]) for p, b in zip(probe, batches))


def test_draw_returns_what_a_short_loader_has() -> None:
    data = DataLoader(_dataset(), batch_size=N)
    assert len(draw_probe_batches(data, 3)) == 1


def test_too_few_batches_warn_and_use_what_there_is() -> None:
    callback = ConditioningCallback(every_n_steps=1, probe_batches=4)
    pl.seed_everything(0, verbose=False)
    with pytest.warns(UserWarning, match="asked for 4 probe batches, the training data has 3"):
        fit(Recording(), _loader("loader_generator"), [callback], max_steps=1)
    assert len(callback.state_dict()["held_batches"]) == 3
