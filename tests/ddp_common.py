"""Shared by the DDP tests and the standalone DDP script: a module whose ranks get uneven data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_conditioning import ConditioningCallback

SIZES = (10, 6)  # samples of rank 0 and rank 1: uneven on purpose


def full_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    n = sum(SIZES)
    return torch.randn(n, 12, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def make_net(batch_norm: bool = False, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    middle: list[nn.Module] = [nn.BatchNorm1d(width)] if batch_norm else []
    return nn.Sequential(nn.Linear(12, width), *middle, nn.ReLU(), nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, 5))


class SharedReaders(nn.Module):
    """Two layers that read one tensor (as q/k/v do), except on rank 1, where ``b`` reads a
    copy: rank 0 shares one Σx and rank 1 keeps two, which the ranks must reconcile."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(12, 16), nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        apart = torch.distributed.is_initialized() and torch.distributed.get_rank() == 1
        return self.head(torch.relu(self.a(x) + self.b(x.clone() if apart else x)))


class RankData(pl.LightningModule):
    """Rank r trains on its own slice of ``full_data()`` in one batch; 1 process: all of it."""

    def __init__(self, batch_norm: bool = False, width: int = 16, shared: bool = False) -> None:
        super().__init__()
        # float64 end to end: per-row arithmetic does not depend on the batch split, so the
        # comparison isolates how ranks are combined (float32 rounding differs by GEMM shape,
        # and κ_100 ~ 1e5 amplifies it to ~1e-3)
        self.net = (SharedReaders() if shared else make_net(batch_norm, width)).double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        x, y = full_data()
        x = x.double()
        if self.trainer.world_size > 1:
            start = sum(SIZES[: self.global_rank])
            x, y = x[start : start + SIZES[self.global_rank]], y[start : start + SIZES[self.global_rank]]
        return DataLoader(TensorDataset(x, y), batch_size=len(x))


class DumpResults(pl.Callback):
    """Every rank writes the metrics its ConditioningCallback holds after fit."""

    def __init__(self, conditioning: ConditioningCallback, out: Path) -> None:
        self.conditioning, self.out = conditioning, Path(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics: dict[str, float] = {}
        for result in self.conditioning.results.values():
            metrics.update(result.metrics())
        path = self.out / f"rank{trainer.global_rank}.json"
        monitor = self.conditioning.monitor
        assert monitor is not None
        path.write_text(
            json.dumps({"world_size": trainer.world_size, "metrics": metrics, "moment_bytes": monitor.moment_bytes})
        )


def run(
    out: Path,
    strategy: str,
    devices: int,
    batch_norm: bool = False,
    width: int = 16,
    memory_budget: int | str = "auto",
    shared: bool = False,
) -> None:
    conditioning = ConditioningCallback(every_n_steps=1, memory_budget=memory_budget)  # type: ignore[arg-type]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        callbacks=[conditioning, DumpResults(conditioning, out)],
        logger=pl.loggers.CSVLogger(out, name="csv"),
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(RankData(batch_norm, width, shared))


class ShuffledDropout(pl.LightningModule):
    """Dropout, and a shuffled loader that Lightning gives a DistributedSampler under DDP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        x, y = full_data()
        return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True)


class DumpParameters(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = trainer.train_dataloader.sampler  # type: ignore[union-attr]
        torch.save(
            {"params": [p.detach().clone() for p in pl_module.parameters()], "sampler": type(sampler).__name__},
            self.out / f"params{trainer.global_rank}.pt",
        )


def run_shuffled(out: Path, probe_batches: int) -> None:
    """Two epochs of 2-rank DDP on a DistributedSampler, with or without probe batches."""
    callbacks: list[pl.Callback] = [DumpParameters(out)]
    if probe_batches:
        callbacks.insert(0, ConditioningCallback(every_n_steps=1, probe_batches=probe_batches))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ShuffledDropout())
