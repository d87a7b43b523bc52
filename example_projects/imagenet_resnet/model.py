"""torchvision ResNet-18/50, optionally with the paper's LastBN, as a LightningModule (Table A1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_conditioning.models import add_last_bn, find_last_linear

ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_model(arch: str, num_classes: int = 1000, last_bn: bool = False, dropout: float = 0.0) -> nn.Module:
    """A randomly initialised torchvision ResNet (``weights=None``: nothing is downloaded).

    ``dropout > 0`` puts ``nn.Dropout(dropout)`` in front of the classifier (Table A1's "DR=0.3"
    column); ``last_bn`` then inserts the BatchNorm1d between that dropout and the Linear
    (``fc = Sequential(Dropout, LastBN(bn, linear))``).
    """
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if dropout > 0:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    if last_bn:
        add_last_bn(model)
    return model


class ImageNetResNet(pl.LightningModule):
    """ImageNet classification with fb.resnet.torch / He et al. (2015) SGD.

    Args:
        arch: torchvision ResNet name.
        num_classes: 1000 for ImageNet.
        last_bn: the paper's ResNetLastBN (one BatchNorm1d before ``fc``).
        dropout: dropout before the classifier (0: none).
        lr: learning rate (already scaled to the global batch: 0.1 × batch / 256).
        momentum / nesterov / weight_decay: SGD settings (0.9, Nesterov, 1e-4 on every parameter).
        schedule: ``"step"``: ×``gamma`` at each epoch of ``milestones``; ``"cosine"``: cosine
            decay to 0 over ``epochs`` (per step).
        epochs: training length, used by the cosine schedule.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 1000,
        last_bn: bool = False,
        dropout: float = 0.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        schedule: str = "step",
        milestones: Sequence[int] = (30, 60, 90),
        gamma: float = 0.1,
        epochs: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes, last_bn, dropout)
        self.last_linear = "model." + find_last_linear(self.model)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        self.log("train_error", (logits.argmax(1) != y).float().mean(), on_step=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_top1_error", (top5[:, 0] != y).float().mean(), sync_dist=True, prog_bar=True)
        self.log("val_top5_error", 1 - (top5 == y[:, None]).any(1).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        h: Any = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=h.lr, momentum=h.momentum, nesterov=h.nesterov, weight_decay=h.weight_decay
        )
        if h.schedule == "cosine":
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
        step = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(h.milestones), gamma=h.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, "interval": "epoch"}}
