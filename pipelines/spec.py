"""LoaderSpec: what a loader makes of a split, shared by the torchvision and the DALI loader.

One frozen value holds every setting of a run's loaders: batch size, image geometry and
augmentation, normalization, output layout and dtype, workers, seed, device and the bad-image
policy. engine/data.py builds it once from the Config; `make_loader(index, spec, train)`
(pipelines/loader.py) and `DaliLoader(index, spec, train)` (pipelines/dali.py) take it, so the
two loaders read the same settings by the same names. A variant (the evaluation batch size)
is `dataclasses.replace(spec, batch_size=...)`. Torch-free: it only names and checks values.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("NCHW", "NHWC", "channels_last")
DTYPES = ("float32", "float16", "bfloat16")
AUGMENTS = ("random_resized_crop", "pad_crop")
BAD_IMAGE_POLICIES = ("fail", "skip")


@dataclass(frozen=True)
class LoaderSpec:
    """Settings of one loader (per rank).

    batch_size: samples per batch. image_size: the square output side.
    augment: "random_resized_crop" (ImageNet: random-resized crop in train; eval resizes the
      shorter side to resize_size, default round(size·256/224), then center-crops) or
      "pad_crop" (CIFAR: resize + center crop; train adds a random crop of the image zero-padded
      by crop_padding). hflip: random horizontal flip in train. random_area / random_aspect_ratio:
      the random-resized crop's ranges.
    mean / std: per-channel normalization of pixel/255.
    layout: "NCHW" | "NHWC" | "channels_last"; dtype: "float32" | "float16" | "bfloat16".
    workers: torchvision DataLoader worker processes, or DALI threads (0: DALI uses 2).
    prefetch: DALI's prefetch queue depth (batches).
    seed: the default train sampler's seed and DALI's pipeline seed.
    device_id: the CUDA device the batches are for (DALI decodes there, "mixed"; torchvision
      pins host memory), None for the CPU.
    drop_last: None drops the last incomplete batch in train only.
    on_bad_image / max_bad_images: "fail" stops at an unreadable image; "skip" replaces it by
      another image of its class, up to max_bad_images × the split's size distinct bad images.
    """

    batch_size: int
    image_size: int = 224
    augment: str = "random_resized_crop"
    resize_size: int | None = None
    hflip: bool = True
    crop_padding: int = 4
    random_area: tuple[float, float] = (0.08, 1.0)
    random_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    dtype: str = "float32"
    workers: int = 0
    prefetch: int = 2
    seed: int = 0
    device_id: int | None = None
    drop_last: bool | None = None
    on_bad_image: str = "fail"
    max_bad_images: float = 0.0

    def __post_init__(self) -> None:
        for name, value, choices in (("layout", self.layout, LAYOUTS), ("dtype", self.dtype, DTYPES),
                                     ("augment", self.augment, AUGMENTS),
                                     ("on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)):
            if value not in choices:
                raise ValueError(f"loader {name} {value!r} is not supported; expected one of {choices}")
        if self.batch_size < 1 or self.image_size < 1:
            raise ValueError(f"batch_size and image_size must be ≥ 1, got {self.batch_size} and {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got mean={list(self.mean)}, "
                             f"std={list(self.std)}")
        if self.workers < 0:
            raise ValueError(f"workers must be ≥ 0, got {self.workers}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than the crop image_size {self.image_size}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "random_area", tuple(self.random_area))
        object.__setattr__(self, "random_aspect_ratio", tuple(self.random_aspect_ratio))

    def eval_resize(self) -> int:
        """The eval resize of the shorter side: resize_size, else round(size·256/224) for
        random_resized_crop (the 256 → 224 protocol, scaled) and image_size for pad_crop."""
        if self.resize_size:
            return self.resize_size
        if self.augment == "pad_crop":
            return self.image_size
        return int(round(self.image_size * 256 / 224))
