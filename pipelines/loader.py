"""Images → tensors: a split index, a per-epoch sampler, torchvision transforms, a DataLoader.

This is the plain torchvision path (CPU decode with PIL), and the fallback when
NVIDIA DALI (pipelines/dali.py) is missing. The sampler is deterministic from
(seed, epoch), so a run's batch order does not depend on how many epochs ran
before it in this process. `make_loader` also takes any sampler of
pipelines/samplers.py and can produce DALI's batch layout and dtype
(`layout="NHWC"` / `"channels_last"`, `dtype="float16"` / `"bfloat16"`), so the
two loaders are interchangeable; `build_imagenet_transform` is the torchvision
counterpart of the DALI graph (random-resized crop / resize + center crop).
"""

from __future__ import annotations

from typing import Any, Sequence

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


def build_imagenet_transform(
    train: bool,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize_size: int | None = None,
    hflip: bool = True,
    random_area: tuple[float, float] = (0.08, 1.0),
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """The torchvision twin of DaliLoader's "random_resized_crop" graph.

    Train: RandomResizedCrop(image_size, scale=random_area, ratio=random_aspect_ratio),
    optional flip. Eval: Resize(shorter side = resize_size, default round(size·256/224)),
    CenterCrop(image_size). Then ToTensor + Normalize(mean, std).
    """
    if train:
        steps: list = [T.RandomResizedCrop(image_size, scale=tuple(random_area), ratio=tuple(random_aspect_ratio))]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        resize = resize_size or int(round(image_size * 256 / 224))
        if resize < image_size:
            raise ValueError(f"resize_size {resize} is smaller than the crop image_size {image_size}")
        steps = [T.Resize(resize), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


LAYOUTS = ("NCHW", "NHWC", "channels_last")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BatchCollate:
    """Stack (CHW image, label) pairs into DALI's batch layout and dtype (picklable for workers).

    NCHW: (B, C, H, W) contiguous; NHWC: (B, H, W, C) contiguous; channels_last: (B, C, H, W)
    shape with channels-last strides (torch.channels_last), as DaliLoader returns them.
    """

    def __init__(self, layout: str = "NCHW", dtype: str = "float32") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not supported; expected one of {LAYOUTS}")
        if dtype not in DTYPES:
            raise ValueError(f"output dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        self.layout, self.dtype = layout, dtype

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([b[0] for b in batch]).to(DTYPES[self.dtype])
        labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
        if self.layout == "NHWC":
            images = images.permute(0, 2, 3, 1).contiguous()
        elif self.layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels


def make_loader(
    index: SplitIndex,
    transform,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler[int] | None = None,
    layout: str = "NCHW",
    dtype: str = "float32",
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader over `index`: (images, labels) batches.

    Train without `sampler`: InstanceSampler(seed), a fresh permutation per epoch.
    `sampler`: any index sampler with set_epoch, e.g. pipelines.samplers.build_sampler(...)
    (class-aware, square-root, progressive, rank-sharded, resumable); used for eval too.
    drop_last: default `train and len(index) > batch_size` (as before).
    layout / dtype: "NCHW" | "NHWC" | "channels_last", "float32" | "float16" | "bfloat16",
    matching DaliLoader's output.
    """
    if sampler is None and train:
        from pipelines.samplers import InstanceSampler

        sampler = InstanceSampler(index.labels, index.num_classes, seed=seed)
    extra: dict[str, Any] = {}
    if (layout, dtype) != ("NCHW", "float32"):
        extra["collate_fn"] = BatchCollate(layout, dtype)
    return DataLoader(
        ImageListDataset(index, transform),
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=(train and len(index) > batch_size) if drop_last is None else drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        **extra,
    )
