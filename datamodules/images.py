"""Image classification data with timm's transforms.

Sources: ``builtin:digits`` (scikit-learn's 1,797 8×8 digits, upsampled to ``image_size`` as 3-channel
images: the offline default), a local ImageFolder (``root/train/<class>/*.png`` and ``root/val/...``), or a
hub dataset (``hfds/<name>``) through ``timm.data.create_dataset``. Training augmentation comes from
``timm.data.create_transform`` (RandAugment via ``auto_augment``, random erasing via ``re_prob``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform
from torch.utils.data import Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader


class DigitsDataset(Dataset):
    """scikit-learn's digits as RGB PIL images (0..16 scaled to 0..255), one seeded split of it."""

    def __init__(self, train: bool, val_fraction: float = 0.2, seed: int = 1234, transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        index = np.arange(len(images))
        train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed,
                                              stratify=digits.target)
        keep = np.sort(train_idx if train else val_idx)
        self.images, self.targets = images[keep], digits.target[keep].astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class ImageDataModule(L.LightningDataModule):
    """Images for classification.

    Args:
        source: ``builtin:digits``, an ImageFolder root (with ``train``/``val`` sub-folders), or ``hfds/<name>``.
        image_size: side of the square network input.
        auto_augment: timm RandAugment spec for training, e.g. ``rand-m9-mstd0.5-inc1``; ``None`` for none.
        re_prob: random-erasing probability. ``scale``: RandomResizedCrop area range. ``hflip``: flip probability.
        eval_crop_pct: centre-crop fraction for evaluation (ImageNet recipes use 0.875; digits 1.0).
        limit_train: keep a seeded random subset of this many training images (e.g. a calibration set).
        num_classes: filled from the data at setup (10 for digits).
    """

    def __init__(self, source: str = "builtin:digits", image_size: int = 32, batch_size: int = 64,
                 auto_augment: str | None = None, re_prob: float = 0.0, scale: tuple[float, float] = (0.7, 1.0),
                 hflip: float = 0.0, interpolation: str = "bilinear", mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 std: tuple[float, ...] = IMAGENET_DEFAULT_STD, val_fraction: float = 0.2, limit_train: int | None = None,
                 train_split: str = "train", val_split: str = "validation", seed: int = 1234, shuffle: bool = True,
                 num_workers: int = 0, eval_crop_pct: float = 1.0):
        super().__init__()
        self.source, self.image_size, self.batch_size = source, image_size, batch_size
        self.val_fraction, self.limit_train, self.seed, self.shuffle = val_fraction, limit_train, seed, shuffle
        self.train_split, self.val_split, self.num_workers = train_split, val_split, num_workers
        common = dict(input_size=(3, image_size, image_size), interpolation=interpolation, mean=mean, std=std)
        self.train_transform = create_transform(**common, is_training=True, auto_augment=auto_augment,
                                                re_prob=re_prob, scale=scale, hflip=hflip)
        self.eval_transform = create_transform(**common, is_training=False, crop_pct=eval_crop_pct)
        if source.startswith((".", "/", "~")) and not Path(source).expanduser().is_dir():
            raise FileNotFoundError(f"Image folder {source!r} does not exist. Give an ImageFolder root, "
                                    "'hfds/<name>' for a hub dataset, or 'builtin:digits'.")
        self.train_set = None
        self.num_classes = 10 if source == "builtin:digits" else None

    def _datasets(self):
        if self.source == "builtin:digits":
            return (DigitsDataset(True, self.val_fraction, self.seed, self.train_transform),
                    DigitsDataset(False, self.val_fraction, self.seed, self.eval_transform))
        if self.source.startswith("builtin"):
            raise ValueError(f"Unknown built-in image set {self.source!r}; the built-in set is 'builtin:digits'.")
        root = None if self.source.startswith("hfds/") else str(Path(self.source).expanduser())
        name = self.source if root is None else ""
        try:
            train = create_dataset(name, root=root, split=self.train_split, is_training=True)
            val = create_dataset(name, root=root, split=self.val_split, is_training=False)
        except Exception as err:
            raise ValueError(f"Could not load images from {self.source!r} (split {self.train_split!r}/"
                             f"{self.val_split!r}): {type(err).__name__}: {err}") from None
        train.transform, val.transform = self.train_transform, self.eval_transform
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set = self._datasets()
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise ValueError(f"The image dataset {self.source!r} has an empty train or validation split.")
        if self.num_classes is None:
            reader = getattr(self.train_set, "reader", None)
            self.num_classes = len(getattr(reader, "class_to_idx", {})) or None
        if self.limit_train is not None and self.limit_train < len(self.train_set):
            keep = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.seed))
            self.train_set = Subset(self.train_set, keep[: self.limit_train].sort().values.tolist())

    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
                                  num_workers=self.num_workers)

    def val_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> StatefulDataLoader:
        return self.val_dataloader()
