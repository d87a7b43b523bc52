"""A small classifier and a synthetic DataModule for the LightningCLI example (no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SyntheticClassification(pl.LightningDataModule):
    """Gaussian inputs with labels from a fixed random linear teacher."""

    def __init__(self, samples: int = 512, features: int = 32, classes: int = 10, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.hparams.samples, self.hparams.features, generator=generator)
        teacher = torch.randn(self.hparams.features, self.hparams.classes, generator=generator)
        self.dataset = TensorDataset(x, (x @ teacher).argmax(1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=True)


class MLPClassifier(pl.LightningModule):
    """``depth`` ReLU Linear layers of ``width`` units, optionally with BatchNorm."""

    def __init__(
        self,
        features: int = 32,
        classes: int = 10,
        depth: int = 4,
        width: int = 64,
        batch_norm: bool = False,
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        size = features
        for _ in range(depth - 1):
            layers += [nn.Linear(size, width), *([nn.BatchNorm1d(width)] if batch_norm else []), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
