"""Images → tensors: a split index, a per-epoch sampler, torchvision transforms, a DataLoader.

This is the plain torchvision path (CPU decode with PIL). The sampler is
deterministic from (seed, epoch), so a run's batch order does not depend on
how many epochs ran before it in this process.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from pipelines.splits import DataError, SplitIndex


class ImageListDataset(Dataset):
    """(image, label) pairs of one split; an unreadable image stops with its path."""

    def __init__(self, index: SplitIndex, transform) -> None:
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        path = self.index.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:  # PIL raises several types for truncated / corrupt / missing files
            raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from None
        return self.transform(img), int(self.index.labels[i])


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch, drawn from (seed, epoch) only."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def build_transform(
    train: bool,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 0,
    hflip: bool = False,
):
    """Train: resize, random crop with padding, optional flip; eval: resize + center crop."""
    steps: list = [T.Resize(image_size), T.CenterCrop(image_size)]
    if train:
        if crop_padding:
            steps.append(T.RandomCrop(image_size, padding=crop_padding))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def make_loader(
    index: SplitIndex,
    transform,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = EpochShuffleSampler(len(index), seed) if train else None
    return DataLoader(
        ImageListDataset(index, transform),
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=train and len(index) > batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
