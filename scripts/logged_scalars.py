"""Every scalar both callbacks log in two small fits, as JSON, to compare two commits (a
restructuring must leave every logged key and number as it was).

The fits: a tiny Llama (`transformers`, 2 blocks, grouped-query attention, AdamW) on random
tokens and a small CNN (SGD with momentum) on random images, 3 steps each, both callbacks
analysing every step. Needs the test extras (`transformers`).

    python scripts/logged_scalars.py OUT.json                  # this checkout's package
    git worktree add /tmp/before <commit>
    (cd /tmp/before && PYTHONPATH=/tmp/before python /path/to/scripts/logged_scalars.py /tmp/before.json)
    python scripts/logged_scalars.py --compare /tmp/before.json OUT.json

``--compare`` prints the count of keys per fit and every key or value that differs (NaN equals
NaN); it exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class _Recorder(Logger):
    """Every logged scalar as ``{"step/key": value}``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.rows[f"{step}/{key}"] = float(value)

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class _TinyLlama(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        self.model = transformers.LlamaForCausalLM(config)

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), 1e-3)


class _SmallCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
        )

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), 0.1, momentum=0.9)


def logged_scalars() -> dict[str, dict[str, float]]:
    """``{fit: {"step/key": value}}`` of both fits."""
    from lightning_conditioning import ConditioningCallback, WeightDominationCallback

    def tokens(generator: torch.Generator) -> TensorDataset:
        return TensorDataset(torch.randint(0, 96, (24, 32), generator=generator))

    def images(generator: torch.Generator) -> TensorDataset:
        return TensorDataset(
            torch.randn(48, 3, 8, 8, generator=generator), torch.randint(0, 10, (48,), generator=generator)
        )

    fits: dict[str, tuple[type[pl.LightningModule], Callable[[torch.Generator], TensorDataset]]] = {
        "llama": (_TinyLlama, tokens),
        "cnn": (_SmallCNN, images),
    }
    out = {}
    for name, (module, data) in fits.items():
        recorder = _Recorder()
        dataset = data(torch.Generator().manual_seed(1))  # each fit's data from the same seed
        trainer = pl.Trainer(
            max_steps=3,
            logger=recorder,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[ConditioningCallback(every_n_steps=1), WeightDominationCallback(every_n_steps=1)],
        )
        trainer.fit(module(), DataLoader(dataset, batch_size=8))
        out[name] = recorder.rows
    return out


def differences(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> list[str]:
    """Each key present on one side only and each value that differs (NaN equals NaN)."""
    found = []
    for fit in sorted(set(before) | set(after)):
        a, b = before.get(fit, {}), after.get(fit, {})
        found += [f"{fit}: {key} only before" for key in sorted(set(a) - set(b))]
        found += [f"{fit}: {key} only after" for key in sorted(set(b) - set(a))]
        found += [
            f"{fit}: {key}: {a[key]!r} → {b[key]!r}"
            for key in sorted(set(a) & set(b))
            if not (a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])))
        ]
    return found


def main(argv: list[str] | None = None) -> int:
    """Write the scalars, or compare two files; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="where to write the JSON")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.load(open(path)) for path in args.compare)
        for fit in sorted(after):
            print(f"{fit}: {len(before.get(fit, {}))} scalars before, {len(after[fit])} after")
        found = differences(before, after)
        print("\n".join(found) if found else "identical: every key and every value")
        return 1 if found else 0
    if not args.out:
        parser.error("give OUT.json or --compare BEFORE AFTER")
    scalars = logged_scalars()
    with open(args.out, "w") as file:
        json.dump(scalars, file, indent=0, sort_keys=True)
    print({fit: len(rows) for fit, rows in scalars.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
