"""The paper's deep MLP: Plain or BatchNorm, PyTorch/Torch7 default init or He init."""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn


class DeepMLP(pl.LightningModule):
    """``depth`` Linear layers of ``width`` ReLU units on flat MNIST, trained by plain SGD.

    Args:
        norm: ``"plain"`` or ``"bn"`` (BatchNorm1d after every hidden Linear, before ReLU).
        init: ``"default"``: PyTorch's ``nn.Linear`` reset, U(±1/√fan_in) — the Torch7 reset
            the paper calls "random initialization"; ``"he"``: N(0, 2/fan_in).
        bias: hidden/output Linear layers with a bias. The paper's debug layers have none;
            at the default init, biases stall the forward decay of λmax(Σx) after a few
            layers, so ``False`` is the default.
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 256,
        norm: Literal["plain", "bn"] = "plain",
        init: Literal["default", "he"] = "default",
        bias: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        features = 784
        for _ in range(depth - 1):
            layers.append(nn.Linear(features, width, bias=bias))
            if norm == "bn":
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            features = width
        layers.append(nn.Linear(features, 10, bias=bias))
        self.net = nn.Sequential(*layers)
        if init == "he":
            for module in self.net:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=math.sqrt(2.0 / module.in_features))
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    @property
    def linear_names(self) -> list[str]:
        """Qualified names of the Linear layers, input to output."""
        return [f"net.{i}" for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", nn.functional.cross_entropy(logits, y))
        self.log("test_error", (logits.argmax(1) != y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
