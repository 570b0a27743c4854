"""Images → tensors: a split index, a per-epoch sampler, torchvision transforms, a DataLoader.

This is the plain torchvision path (CPU decode with PIL), and the fallback when
NVIDIA DALI (pipelines/dali.py) is missing. The sampler is deterministic from
(seed, epoch), so a run's batch order does not depend on how many epochs ran
before it in this process. `make_loader(index, spec, train)` takes the same
`LoaderSpec` (pipelines/spec.py) as DaliLoader and any sampler of pipelines/samplers.py,
and produces DALI's batch layout and dtype (`layout="NHWC"` / `"channels_last"`,
`dtype="float16"` / `"bfloat16"`), so the two loaders are interchangeable;
`spec_transform` is the torchvision counterpart of the DALI graph (random-resized crop /
resize + center crop, or CIFAR's pad crop).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T

from pipelines.spec import LAYOUTS, LoaderSpec
from pipelines.splits import DataError, SameClassOrder, SplitIndex
from pipelines.workers import ignore_stop_signals, track_workers

BadImage = tuple[str, str]  # (path, reason)


def read_rgb(path) -> Image.Image:
    """Open and fully decode one image as RGB (PIL raises for missing / truncated / corrupt files)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ImageListDataset(Dataset):
    """(image, label) pairs of one split.

    on_bad_image="fail": an unreadable image stops with a DataError naming its path.
    on_bad_image="skip": it is replaced by the next readable image of the same class (the
    class's images in index order, cyclically from the bad one: a deterministic choice that
    does not depend on which worker reads it), and the item is (image, label, bad) where
    `bad` lists the (path, reason) of every file that failed on the way; `SkipCollate`
    gathers them per batch and `ImageLoader` strips them off in the main process.

    An index `i` may also be a (i, epoch, position) tuple (`PositionedSampler`): the
    transform's randomness is then seeded from (seed, epoch, position), so a sample's
    augmentation does not depend on which worker draws it, or when (bitwise resume).
    """

    def __init__(self, index: SplitIndex, transform, on_bad_image: str = "fail", seed: int = 0) -> None:
        if on_bad_image not in ("fail", "skip"):
            raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
        self.index, self.transform, self.on_bad_image, self.seed = index, transform, on_bad_image, int(seed)
        self._same_class: SameClassOrder | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _replacements(self, i: int) -> list[int]:
        if self._same_class is None:  # built on the first bad image only
            self._same_class = SameClassOrder(self.index)
        return self._same_class(i)

    def __getitem__(self, item):
        if isinstance(item, tuple):  # (index, epoch, position) from PositionedSampler
            i, epoch, position = item
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, position]).generate_state(1)[0]))
        else:
            i = item
        path, label = self.index.paths[i], int(self.index.labels[i])
        try:
            img = read_rgb(path)
        except Exception as exc:  # PIL raises several types for truncated / corrupt / missing files
            if self.on_bad_image == "fail":
                raise DataError(f"cannot read image {path} ({_reason(exc)})") from None
            bad: list[BadImage] = [(str(path), _reason(exc))]
            for j in self._replacements(i):
                try:
                    img = read_rgb(self.index.paths[j])
                    break
                except Exception as exc_j:
                    bad.append((str(self.index.paths[j]), _reason(exc_j)))
            else:
                raise DataError(
                    f"cannot read image {path} ({bad[0][1]}), and none of the {len(bad) - 1} other images of its "
                    f"class {label} can replace it (e.g. {bad[1:3]})"
                ) from None
            return self.transform(img), label, bad
        if self.on_bad_image == "skip":
            return self.transform(img), label, []
        return self.transform(img), label


class SkipCollate:
    """Collate (image, label, bad) items: the inner collate's (images, labels) plus the batch's bad list."""

    def __init__(self, inner=None) -> None:
        self.inner = inner or default_collate

    def __call__(self, batch):
        images, labels = self.inner([(b[0], b[1]) for b in batch])
        return images, labels, [bad for b in batch for bad in b[2]]


class PositionedSampler(Sampler):
    """Yield (index, epoch, position) from an epoch sampler: position is the sample's place
    in the epoch's global order (rank r's k-th sample is k·world_size + r), counted from the
    sampler's resume offset, so a sample's augmentation seed is the same whether the epoch
    runs through or restarts at a checkpoint's position, and differs between ranks."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        epoch, start = getattr(self.sampler, "epoch", 0), getattr(self.sampler, "position", 0)
        rank, world = getattr(self.sampler, "rank", 0), getattr(self.sampler, "world_size", 1)
        for k, i in enumerate(self.sampler, start=start):
            yield (i, epoch, k * world + rank)

    def __len__(self) -> int:
        return len(self.sampler)


class ImageLoader:
    """A DataLoader that yields (images, labels) and keeps the bad images its workers met.

    `bad_images`: every (path, reason) replaced so far, unique, in the order first met
    (they cross from the worker processes with each batch). `bad_count`: replacements made,
    repeats included. With on_bad_image="skip", more than `max_bad_images` × the split's
    size distinct bad images stops the run with a DataError. `sampler` is the epoch
    sampler (set_epoch / set_position as before); other attributes are the DataLoader's.
    """

    def __init__(self, loader: DataLoader, sampler, on_bad_image: str = "fail", max_bad_images: float = 0.0) -> None:
        self.loader, self.sampler, self.on_bad_image, self.max_bad_images = loader, sampler, on_bad_image, max_bad_images
        self.bad_images: list[BadImage] = []
        self.bad_count = 0
        self._seen: set[str] = set()
        self._returned = 0  # samples of this rank's epoch returned so far (state_dict)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)

    def __iter__(self):
        self._returned = getattr(self.sampler, "position", 0)
        batches = iter(self.loader)
        track_workers(getattr(batches, "_workers", ()))
        try:
            for batch in batches:
                if self.on_bad_image == "skip":
                    images, labels, bad = batch
                    if bad:
                        self._record(bad)
                    batch = (images, labels)
                self._returned += len(batch[1])
                yield batch
        except BaseException:  # a failed or abandoned epoch shuts its workers down (pipelines/workers.py)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
                self.loader._iterator = None  # persistent workers: the next epoch starts new ones
            raise

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position": samples of this rank's epoch returned so far} (DaliLoader's keys, minus "dali")."""
        return {"epoch": getattr(self.sampler, "epoch", 0), "position": self._returned}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues `state`'s epoch at its position (bit for bit with
        position-seeded augmentation, i.e. with workers; with num_workers=0 the caller
        restores torch's global RNG as well)."""
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.set_position(int(state["position"]))

    def _record(self, bad: list[BadImage]) -> None:
        self.bad_count += len(bad)
        for path, reason in bad:
            if path not in self._seen:
                self._seen.add(path)
                self.bad_images.append((path, reason))
        size = len(self.loader.dataset)
        if len(self.bad_images) > self.max_bad_images * size:
            shown = "; ".join(f"{p} ({r})" for p, r in self.bad_images[:5])
            raise DataError(
                f"{len(self.bad_images)} of {size} images of {self.loader.dataset.index.split_file} cannot be read, "
                f"more than data.max_bad_images={self.max_bad_images:g} of them; e.g. {shown}"
            )


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


def spec_transform(spec: LoaderSpec, train: bool):
    """The torchvision transform of `spec` (its `augment`), the counterpart of DaliLoader's graph."""
    if spec.augment == "random_resized_crop":
        return build_imagenet_transform(train, spec.image_size, spec.mean, spec.std, spec.resize_size, spec.hflip,
                                        spec.random_area, spec.random_aspect_ratio)
    return build_transform(train, spec.image_size, spec.mean, spec.std, spec.crop_padding, spec.hflip)


def make_loader(
    index: SplitIndex,
    spec: LoaderSpec,
    train: bool,
    *,
    sampler: Sampler[int] | None = None,
    position_seeded: bool | None = None,
) -> ImageLoader:
    """An `ImageLoader` (a DataLoader yielding (images, labels)) over `index`, as `spec` says
    (pipelines/spec.py: batch size, `spec_transform`, workers, layout / dtype, bad images).

    Train without `sampler`: InstanceSampler(spec.seed), a fresh permutation per epoch.
    `sampler`: any index sampler with set_epoch, e.g. pipelines.samplers.build_sampler(...)
    (class-aware, square-root, progressive, rank-sharded, resumable); used for eval too.
    spec.drop_last None: `train and len(index) > batch_size`. spec.layout / spec.dtype match
    DaliLoader's output. spec.on_bad_image / spec.max_bad_images: see ImageListDataset and
    ImageLoader ("skip" replaces an unreadable image by another of its class and lists it in
    `loader.bad_images`). Workers ignore the stop signals (pipelines/workers.py).
    position_seeded: seed each sample's augmentation from (seed, epoch, position in the
    epoch) instead of the workers' RNG streams, so a mid-epoch restart (sampler.set_position)
    gives the same batches bit for bit. Default: on for a training loader with workers (the
    workers=0 path keeps the process's global RNG stream).
    """
    if sampler is None and train:
        from pipelines.samplers import InstanceSampler

        sampler = InstanceSampler(index.labels, index.num_classes, seed=spec.seed)
    if position_seeded is None:
        position_seeded = train and spec.workers > 0 and hasattr(sampler, "set_position")
    if position_seeded and not hasattr(sampler, "epoch"):
        raise ValueError(f"position_seeded needs an epoch sampler (pipelines.samplers), got {type(sampler).__name__}")
    collate = BatchCollate(spec.layout, spec.dtype) if (spec.layout, spec.dtype) != ("NCHW", "float32") else None
    extra: dict[str, Any] = {}
    if spec.on_bad_image == "skip":
        extra["collate_fn"] = SkipCollate(collate)
    elif collate is not None:
        extra["collate_fn"] = collate
    dataset = ImageListDataset(index, spec_transform(spec, train), spec.on_bad_image,
                               seed=getattr(sampler, "seed", spec.seed))
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=PositionedSampler(sampler) if position_seeded else sampler,
        shuffle=False,
        drop_last=(train and len(index) > spec.batch_size) if spec.drop_last is None else spec.drop_last,
        num_workers=spec.workers,
        pin_memory=spec.device_id is not None,
        persistent_workers=spec.workers > 0,
        worker_init_fn=ignore_stop_signals,  # SIGTERM / SIGINT / SIGUSR1 are the main process's to handle
        **extra,
    )
    return ImageLoader(loader, sampler, spec.on_bad_image, spec.max_bad_images)
