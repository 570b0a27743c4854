"""NVIDIA DALI loader: a sampler's exact order → file read → decode → crop/flip → normalize → torch.

Graph (one pipeline per rank):

    fn.external_source   batch-wise (encoded path, label) in the sampler's order
    fn.io.file.read      file bytes, read by DALI's worker threads
    train  fn.decoders.image_random_crop → fn.resize(size × size)          ("random_resized_crop")
           or fn.decoders.image → resize shorter side → center crop → zero-pad random crop
                                                                              ("pad_crop", CIFAR-style)
    eval   fn.decoders.image → fn.resize(shorter side = resize_size) → center crop
    fn.crop_mirror_normalize  (random horizontal flip in train) → float32 / float16, CHW or HWC
    DALIGenericIterator  → (images, labels) torch tensors

`spec.device_id=None` builds the CPU-only pipeline (no GPU, no libcuda needed: tests and CPU
runs). An integer `spec.device_id` decodes with `device="mixed"` (nvJPEG / nvImageCodec) and
returns CUDA tensors on that device.

Order and sharding come from the sampler (pipelines/samplers.py): every sample's label is
emitted in the sampler's exact order, and each rank's sampler yields that rank's shard.

DALI 2.4 has no bfloat16 data type (`nvidia.dali.types.DALIDataType` lists FLOAT, FLOAT16,
… but no BFLOAT16, and crop_mirror_normalize supports FLOAT, FLOAT16, INT8, UINT8), so
`dtype="bfloat16"` normalizes in float32 inside DALI and casts the batch in torch on the
output device (one elementwise pass); float32 and float16 are produced by DALI itself.

Eval geometry vs torchvision (the fallback): DALI resizes the longer side to
round(long · resize / short) where torchvision truncates, and centers the crop at offset
floor((in − crop)/2 + ½) where torchvision rounds half to even; each is at most one pixel
apart. Interpolation (bilinear, antialiased) and JPEG decoding (grayscale and CMYK
included) agree with PIL to a few levels (tests/test_dali_loader.py).

A missing or corrupt image stops loading with a `DataError` naming the file: DALI's own
decoder error does not name it, so on a pipeline error the batches fed but not yet
returned are re-checked with PIL to find the culprit(s). With `on_bad_image="skip"` each
culprit is instead replaced by the next image of its class that PIL decodes (the class's
images in index order, cyclically: the torchvision loader's choice), listed in
`bad_images`, and a fresh pipeline resumes the epoch at the first batch not yet returned
(same sample order; the augmentation draws after that point come from the new pipeline's
seed, so an epoch that met a bad image is not bit-identical to one that did not).

Resume (`checkpointing=True`): DALI's own checkpointing (`enable_checkpointing`,
`DALIGenericIterator.checkpoints()`, `Pipeline(checkpoint=...)`) saves the state of every
random operator after the last *returned* batch (prefetched batches are accounted for by
DALI). DALI does not capture an iterable external source, so `state_dict()` adds the
epoch and the samples returned, and `load_state_dict()` restarts the sampler there
(`set_position`): the restored loader returns the same batches bit for bit
(tests/test_bad_data.py, CPU pipeline). Not covered: a pipeline rebuilt after a bad image
(its generators restart from the seed), and a different number of ranks.
"""

from __future__ import annotations

import collections
import math
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from pipelines.spec import LoaderSpec
from pipelines.splits import DataError, SameClassOrder, SplitIndex

try:  # DALI is optional at import time: `dali_available()` tells callers to fall back.
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    _DALI_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising something else
    _DALI_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def dali_available() -> bool:
    """True when nvidia.dali and its PyTorch plugin import."""
    return _DALI_IMPORT_ERROR is None


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _dali_dtype(dtype: str):
    """DALI's output type for `dtype`, or FLOAT when DALI lacks it (bfloat16: cast in torch)."""
    if dtype == "float32":
        return types.FLOAT
    if dtype == "float16":
        return types.FLOAT16
    return getattr(types, "BFLOAT16", types.FLOAT)


class _SamplerSource:
    """Iterable for `fn.external_source(batch=True, cycle="raise")`: one epoch per `iter()`.

    DALI calls `iter()` when the pipeline is (re)started, i.e. from `DaliLoader.__iter__`
    after the caller's `set_epoch`, so the order is the sampler's current epoch.
    """

    def __init__(self, index: SplitIndex, sampler, batch_size: int, drop_last: bool) -> None:
        self.index, self.sampler, self.batch_size, self.drop_last = index, sampler, batch_size, drop_last
        self._encoded = [np.frombuffer(str(p).encode("utf-8"), dtype=np.uint8) for p in index.paths]
        self.fed: collections.deque[list[int]] = collections.deque()  # batches fed, not yet returned
        self.order: list[int] = []
        self.pos = 0
        self._fresh = True
        self.replace: dict[int, int] = {}  # bad data-set index → the same-class image read instead
        self.restart: tuple[list[int], int] | None = None  # (order, position) the next pipeline resumes at

    def epoch_order(self) -> list[int]:
        order = list(range(len(self.index))) if self.sampler is None else list(self.sampler)
        n = len(self.index)
        bad = [i for i in order[:1] + order[-1:] if not 0 <= i < n]
        if bad:
            raise ValueError(f"sampler yielded index {bad[0]}, outside the data set's [0, {n - 1}]")
        return order

    def __iter__(self) -> "_SamplerSource":
        # DALI calls iter() again as soon as an epoch's data runs out, i.e. before the
        # caller's set_epoch for the next epoch; the order is therefore drawn lazily, on the
        # first batch request, which DALI makes only after the pipeline is reset.
        self._fresh = True
        return self

    def __next__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._fresh:
            if self.restart is not None:  # a pipeline rebuilt mid-epoch after a bad image
                (self.order, self.pos), self.restart = self.restart, None
            else:
                self.order, self.pos = self.epoch_order(), 0
            self._fresh = False
        left = len(self.order) - self.pos
        if left <= 0 or (self.drop_last and left < self.batch_size):
            raise StopIteration
        batch = self.order[self.pos : self.pos + self.batch_size]
        self.pos += len(batch)
        self.fed.append(batch)
        labels = self.index.labels
        encoded = [self._encoded[self.replace.get(i, i)] for i in batch]
        return encoded, [np.array([labels[i]], dtype=np.int64) for i in batch]


def _pil_error(path: Path) -> str | None:
    """None when PIL fully decodes the file, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # PIL raises several types for missing / truncated / corrupt files
        return f"{type(exc).__name__}: {exc}"
    return None


def _find_broken(paths: Sequence[Path]) -> list[str]:
    """Decode each file with PIL; return 'path (reason)' for every one that fails."""
    return [f"{p} ({err})" for p in paths if (err := _pil_error(p)) is not None]


class DaliLoader:
    """Iterate (images, labels) batches of one split through a DALI pipeline, as `spec` says
    (pipelines/spec.py: the same LoaderSpec as the torchvision loader).

    images: spec.layout "NCHW" (B, 3, S, S), "NHWC" (B, S, S, 3), or "channels_last" (B, 3, S, S)
    with channels-last strides (a zero-copy view of DALI's HWC output); spec.dtype float32 /
    float16 / bfloat16; values (pixel/255 − mean) / std. labels: int64 (B,), in the
    sampler's order. CPU tensors when spec.device_id is None, else CUDA tensors on that device.
    DALI runs spec.workers threads (2 when 0) with spec.prefetch batches queued, seeded by spec.seed.

    Train (`train=True`): `sampler` gives the order (any sampler of pipelines/samplers.py,
    or any iterable of indices with `set_epoch`; default InstanceSampler(spec.seed)); the last
    incomplete batch is dropped unless spec.drop_last is False. Eval: `sampler=None` is the
    data set's order; all images kept. Call `set_epoch(e)` before iterating an epoch (it
    forwards to the sampler). `checkpointing`: DALI's enable_checkpointing, for state_dict.
    """

    def __init__(self, index: SplitIndex, spec: LoaderSpec, train: bool, *, sampler=None,
                 checkpointing: bool = False) -> None:
        if not dali_available():
            raise RuntimeError(
                f"NVIDIA DALI is not usable ({_DALI_IMPORT_ERROR}); install nvidia-dali-cuda130 or use the "
                "torchvision loader (pipelines.loader.make_loader)"
            )
        if sampler is not None and not hasattr(sampler, "set_epoch"):
            raise ValueError(f"sampler must have set_epoch(epoch) (pipelines.samplers), got {type(sampler).__name__}")
        if sampler is None and train:  # as make_loader: a fresh permutation per epoch
            from pipelines.samplers import InstanceSampler

            sampler = InstanceSampler(index.labels, index.num_classes, seed=spec.seed)
        device_id = spec.device_id
        if device_id is not None:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"DALI loader asked for GPU {device_id} (mixed decode), but torch sees no CUDA device; "
                    "to run on CPU pass device_id=None (data.loader=dali on a CPU machine) or use the torchvision loader"
                )
            if not 0 <= device_id < torch.cuda.device_count():
                raise RuntimeError(
                    f"DALI loader asked for GPU {device_id}, but only {torch.cuda.device_count()} are visible; "
                    "pass a valid device_id, or device_id=None for the CPU pipeline"
                )
        self.index, self.spec, self.train, self.sampler = index, spec, train, sampler
        self.batch_size, self.device_id = spec.batch_size, device_id
        self.drop_last = train if spec.drop_last is None else spec.drop_last
        self.native_dtype = spec.dtype != "bfloat16" or hasattr(types, "BFLOAT16")
        self._source = _SamplerSource(index, sampler, spec.batch_size, self.drop_last)
        self._iterator = None
        self._epoch_done = True
        self.on_bad_image, self.max_bad_images = spec.on_bad_image, spec.max_bad_images
        self.bad_images: list[tuple[str, str]] = []  # (path, reason), unique, in the order met (as ImageLoader)
        self.bad_count = 0  # bad files met while loading (a file is checked again only in a fresh loader)
        self._same_class: SameClassOrder | None = None
        self.checkpointing = checkpointing
        self._restore: str | None = None  # a DALI checkpoint the next pipeline starts from (load_state_dict)
        self._returned = 0  # samples returned in the current epoch

    # ---- sampler passthrough --------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches of the next epoch."""
        n = len(self.index) if self.sampler is None else len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # ---- pipeline ---------------------------------------------------------------------------
    def _define(self):
        spec, gpu = self.spec, self.device_id is not None
        size, pad = spec.image_size, spec.crop_padding
        out_dtype = _dali_dtype(spec.dtype)
        out_layout = "CHW" if spec.layout == "NCHW" else "HWC"
        mean = [255.0 * m for m in spec.mean]
        std = [255.0 * s for s in spec.std]
        decoder = "mixed" if gpu else "cpu"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=spec.workers or 2,
            device_id=self.device_id,
            seed=spec.seed,
            prefetch_queue_depth=spec.prefetch,
            enable_checkpointing=self.checkpointing,
            checkpoint=self._restore,
        )
        def pipe():
            paths, labels = fn.external_source(
                source=self._source, num_outputs=2, batch=True, cycle="raise", dtype=[types.UINT8, types.INT64],
            )
            encoded = fn.io.file.read(paths)
            mirror = 0
            if self.train and spec.augment == "random_resized_crop":
                images = fn.decoders.image_random_crop(
                    encoded,
                    device=decoder,
                    output_type=types.RGB,
                    random_area=list(spec.random_area),
                    random_aspect_ratio=list(spec.random_aspect_ratio),
                    num_attempts=10,
                )
                images = fn.resize(images, resize_x=size, resize_y=size)
                crop = None
            else:
                images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=spec.eval_resize())
                crop = (size, size)
                if self.train and pad > 0:  # CIFAR-style: center crop, then a random crop of the zero-padded image
                    images = fn.crop(images, crop=(size, size))
                    offsets = [float(v) for v in range(-pad, pad + 1)]
                    anchor = fn.cast(fn.random.uniform(values=offsets, shape=[2]), dtype=types.INT32)
                    images = fn.slice(
                        images, anchor, [size, size], axes=[0, 1], normalized_anchor=False, normalized_shape=False,
                        out_of_bounds_policy="pad", fill_values=0,
                    )
                    crop = None
            if self.train and spec.hflip:
                mirror = fn.random.coin_flip(probability=0.5)
            kw = dict(crop=crop) if crop is not None else {}
            images = fn.crop_mirror_normalize(
                images, dtype=out_dtype, output_layout=out_layout, mean=mean, std=std, mirror=mirror, **kw
            )
            return images, labels

        return pipe()

    def _start(self) -> None:
        with warnings.catch_warnings():
            # DALI cannot capture an iterable source's state; load_state_dict restarts ours at the position.
            warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
            pipe = self._define()
            self._restore = None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
                pipe.build()
            self._iterator = DALIGenericIterator(
                pipe,
                ["images", "labels"],
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=False,
                prepare_first_batch=False,
            )
        except Exception as exc:
            where = f"GPU {self.device_id} (mixed decode)" if self.device_id is not None else "CPU"
            hint = (
                "; to run on CPU pass device_id=None (data.loader=dali on a CPU machine) or use the torchvision loader"
                if self.device_id is not None
                else "; the torchvision loader (pipelines.loader.make_loader) needs no DALI"
            )
            raise RuntimeError(f"DALI pipeline could not start on {where}: {type(exc).__name__}: {exc}{hint}") from exc

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is None or not self._epoch_done:
            # First epoch, or the previous one was abandoned midway: DALI cannot rewind a
            # pipeline mid-epoch, so a fresh one starts (the external source re-reads the sampler).
            self._iterator = None
            self._start()
        else:
            self._iterator.reset()  # calls iter() on the source: the sampler's current epoch
        self._epoch_done = False
        self._returned = self._source_start()
        it = self._iterator
        while True:
            try:
                out = next(it)
            except StopIteration:
                self._epoch_done = True
                return
            except RuntimeError as exc:
                self._iterator = None
                if self.on_bad_image == "skip" and self._replace_broken():
                    self._start()  # resumes at the first batch not yet returned (_SamplerSource.restart)
                    it = self._iterator
                    continue
                raise self._explain(exc) from exc
            self._returned += len(self._source.fed.popleft())
            yield self._to_torch(out[0])

    # ---- resume (checkpointing=True) -------------------------------------------------------
    def _source_start(self) -> int:
        return getattr(self.sampler, "position", 0)

    def state_dict(self) -> dict:
        """{"epoch", "position": samples of this rank's epoch returned, "dali": the pipeline's
        checkpoint (its random-number generators after the last returned batch)}."""
        if not self.checkpointing:
            raise RuntimeError("DaliLoader.state_dict needs checkpointing=True (DALI's enable_checkpointing)")
        if self._iterator is None:
            raise RuntimeError("DaliLoader.state_dict: no pipeline yet (iterate first)")
        return {"epoch": getattr(self.sampler, "epoch", 0), "position": self._returned,
                "dali": self._iterator.checkpoints()[0]}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration continues `state`'s epoch at its position, with DALI's
        random-number generators restored from its checkpoint (sampler.set_position)."""
        if not self.checkpointing:
            raise RuntimeError("DaliLoader.load_state_dict needs checkpointing=True (DALI's enable_checkpointing)")
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.set_position(int(state["position"]))
        self._restore = state["dali"]
        self._iterator, self._epoch_done = None, True

    def _replace_broken(self) -> bool:
        """After a pipeline error: map every image of the pending batches that PIL cannot decode
        to a decodable image of its class, record it, and set the source to resume at the first
        pending batch. False when PIL decodes them all (the error is not a bad image)."""
        src = self._source
        pending = [i for batch in src.fed for i in batch]
        found = False
        for i in dict.fromkeys(pending):  # unique, in order
            path = self.index.paths[src.replace.get(i, i)]
            err = _pil_error(path)
            if err is None:
                continue
            found = True
            self._record(str(path), err)
            src.replace[i] = self._replacement(i)
        if found:
            src.restart = (src.order, src.pos - len(pending))
            src.fed.clear()
        return found

    def _record(self, path: str, reason: str) -> None:
        self.bad_count += 1
        if path not in {p for p, _ in self.bad_images}:
            self.bad_images.append((path, reason))
        if len(self.bad_images) > self.max_bad_images * len(self.index):
            shown = "; ".join(f"{p} ({r})" for p, r in self.bad_images[:5])
            raise DataError(
                f"{len(self.bad_images)} of {len(self.index)} images of {self.index.split_file} cannot be read, "
                f"more than data.max_bad_images={self.max_bad_images:g} of them; e.g. {shown}"
            )

    def _replacement(self, i: int) -> int:
        """The next image of i's class (index order, cyclically) that PIL decodes."""
        if self._same_class is None:
            self._same_class = SameClassOrder(self.index)
        known_bad = {p for p, _ in self.bad_images}
        for j in self._same_class(i):
            path = self.index.paths[j]
            if str(path) in known_bad:
                continue
            err = _pil_error(path)
            if err is None:
                return j
            self._record(str(path), err)
        raise DataError(
            f"cannot read image {self.index.paths[i]}, and no other image of its class {int(self.index.labels[i])} "
            "can replace it"
        )

    def _to_torch(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = out["images"], out["labels"].reshape(-1)
        if not self.native_dtype:
            images = images.to(_torch_dtype(self.spec.dtype))
        if self.spec.layout == "channels_last":
            images = images.permute(0, 3, 1, 2)  # NHWC memory, NCHW shape: torch.channels_last
        return images, labels

    def _explain(self, exc: Exception) -> Exception:
        """Turn a DALI pipeline error into a DataError naming the broken file(s) when one is found."""
        pending = [i for batch in self._source.fed for i in batch]
        paths = [self.index.paths[i] for i in pending]
        broken = _find_broken(paths)
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if broken:
            return DataError(
                f"cannot read image {broken[0]}"
                + (f"; also broken in the same batches: {'; '.join(broken[1:6])}" if len(broken) > 1 else "")
                + f" [DALI: {first_line}]"
            )
        return RuntimeError(
            f"DALI pipeline failed on a batch of {len(paths)} images (e.g. {[str(p) for p in paths[:3]]}), "
            f"all of which PIL can decode: {exc}"
        )

