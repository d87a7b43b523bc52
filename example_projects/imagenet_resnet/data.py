"""ImageNet through ``torchvision.datasets.ImageFolder``, or ``FakeData`` for smoke runs.

``--data-dir`` must hold ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (the usual layout;
the validation set re-sorted into class folders). Nothing is downloaded.
Training: RandomResizedCrop + horizontal flip; validation: resize to 256/224 of the crop size,
centre crop. Both normalised with the ImageNet mean/std. (fb.resnet.torch also adds colour
jitter and PCA lighting noise; torchvision's reference recipe, used here, does not.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transforms(train: bool, size: int) -> Any:
    """The standard ImageNet train / validation transforms at crop ``size``."""
    from torchvision import transforms as T

    if train:
        steps: list[Any] = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


class ImageNetDataModule(pl.LightningDataModule):
    """Train/val loaders for ImageFolder ImageNet or, with ``data_dir=None``, FakeData.

    Args:
        data_dir: folder with ``train/`` and ``val/``; ``None``: FakeData.
        batch_size: per-device batch size.
        image_size: crop size (224; smoke: 64).
        num_workers: DataLoader workers per device.
        fake_size: (train, val) sizes of FakeData.
        fake_classes: classes of FakeData.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        image_size: int = 224,
        num_workers: int = 8,
        fake_size: tuple[int, int] = (64, 32),
        fake_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir, self.batch_size, self.image_size = data_dir, batch_size, image_size
        self.num_workers = num_workers
        self.fake_size, self.fake_classes = fake_size, fake_classes
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """1000 for ImageNet (counted from ``train/``), ``fake_classes`` for FakeData."""
        if self.data_dir is None:
            return self.fake_classes
        return sum(1 for p in (Path(self.data_dir) / "train").iterdir() if p.is_dir())

    def setup(self, stage: str) -> None:
        from torchvision.datasets import FakeData, ImageFolder

        size = self.image_size
        if self.data_dir is None:
            shape = (3, size, size)
            self.train_set = FakeData(self.fake_size[0], shape, self.fake_classes, transforms(True, size))
            self.val_set = FakeData(
                self.fake_size[1], shape, self.fake_classes, transforms(False, size), random_offset=10**6
            )
        else:
            root = Path(self.data_dir)
            self.train_set = ImageFolder(str(root / "train"), transforms(True, size))
            self.val_set = ImageFolder(str(root / "val"), transforms(False, size))

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)
