"""The four CIFAR residual networks of Huang et al. (2020), Sec. 5, as one LightningModule.

* ``resnet``: He et al. (2015) post-activation ResNet, option-A shortcuts (:func:`cifar_resnet`).
* ``preresnet``: the pre-activation ResNet (He et al., 2016) *with* its extra BN-ReLU before
  the average pooling (:func:`cifar_preresnet`).
* ``preresnetv1``: the same without that extra BN-ReLU (``final_bn=False``), the paper's
  "PreResNetv1".
* ``lastbn``: ``add_last_bn(cifar_resnet(depth))``, the paper's "ResNetLastBN": one
  ``BatchNorm1d`` on the pooled features, right before the final Linear (then ``fc.linear``).

The optimiser is fb.resnet.torch's (the code the paper ran): SGD with Nesterov momentum 0.9,
dampening 0, weight decay 1e-4 on *every* parameter (Torch7's ``optim.sgd`` decays the whole
flattened parameter vector, BN scales and biases included), lr 0.1 divided by 10 at epochs 81
and 122 of 164.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_conditioning.models import add_last_bn, cifar_preresnet, cifar_resnet, find_last_linear

ARCHS: tuple[str, ...] = ("resnet", "preresnet", "preresnetv1", "lastbn")
LABELS: dict[str, str] = {
    "resnet": "ResNet",
    "preresnet": "PreResNet",
    "preresnetv1": "PreResNetv1",
    "lastbn": "ResNetLastBN",
}


def build_model(arch: str, depth: int, num_classes: int = 10) -> nn.Module:
    """One of :data:`ARCHS` at ``depth`` (``6n + 2``: 8, 20, 56, 110, 230, 1202, ...)."""
    if arch == "resnet":
        return cifar_resnet(depth, num_classes)
    if arch == "preresnet":
        return cifar_preresnet(depth, num_classes, final_bn=True)
    if arch == "preresnetv1":
        return cifar_preresnet(depth, num_classes, final_bn=False)
    if arch == "lastbn":
        return add_last_bn(cifar_resnet(depth, num_classes))
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


class CifarResNetModule(pl.LightningModule):
    """A CIFAR ResNet variant trained with the fb.resnet.torch recipe.

    Args:
        arch: one of :data:`ARCHS`.
        depth: network depth (``6n + 2``).
        num_classes: 10 or 100.
        lr: initial learning rate (0.1).
        momentum / nesterov / weight_decay: SGD settings (0.9, True, 1e-4).
        milestones: epochs at which the learning rate is multiplied by ``gamma``
            ((81, 122) of 164 epochs).
        gamma: learning-rate decay factor (0.1).

    Logs ``train_loss`` and ``train_error`` per step, ``val_loss`` / ``val_error`` per
    validation epoch and ``test_loss`` / ``test_error`` in ``trainer.test``.
    """

    def __init__(
        self,
        arch: str = "resnet",
        depth: int = 110,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        milestones: Sequence[int] = (81, 122),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(arch, depth, num_classes)
        self.last_linear = "model." + find_last_linear(self.model)[0]  # model.fc or model.fc.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _shared(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        error = (logits.argmax(1) != y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        self.log(f"{stage}_error", error, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._shared(batch, "train")
        if not torch.isfinite(loss):
            self.trainer.should_stop = True  # diverged: stop after this step, the run records it
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared(batch, "test")

    def configure_optimizers(self) -> Any:
        h: Any = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=h.lr, momentum=h.momentum, nesterov=h.nesterov, weight_decay=h.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(h.milestones), gamma=h.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def negative_bn_beta_fraction(module: nn.Module) -> float:
    """Fraction of negative BatchNorm2d shifts β over the whole network.

    The paper explains the drop of λmax(Σx) after the initial spike by BN shifts turning
    negative and switching off the ReLUs after the residual additions.
    """
    betas = [
        m.bias.detach().flatten() for m in module.modules() if isinstance(m, nn.BatchNorm2d) and m.bias is not None
    ]
    if not betas:
        return float("nan")
    flat = torch.cat(betas)
    if not bool(torch.isfinite(flat).all()):
        return float("nan")
    return float((flat < 0).float().mean())
