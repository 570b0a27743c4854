"""DALI CPU pipeline (device_id=None): shapes, layouts, dtypes, normalization, sampler order; the fallback loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image
from PIL import Image

from pipelines.samplers import ClassAwareSampler, InstanceSampler
from pipelines.splits import DataError, SplitIndex

dali = pytest.importorskip("pipelines.dali")
if not dali.dali_available():
    pytest.skip(f"NVIDIA DALI is not importable: {dali._DALI_IMPORT_ERROR}", allow_module_level=True)

from pipelines.dali import DaliLoader  # noqa: E402
from pipelines.loader import make_loader  # noqa: E402
from pipelines.spec import LoaderSpec  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 32  # crop size; eval resize = round(32·256/224) = 37


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it close to the original, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    ch = [127 + 100 * np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(3, 9)) for _ in range(3)]
    return np.clip(np.stack(ch, -1), 0, 255).astype(np.uint8)


def _write_set(folder: Path, n: int = 24, num_classes: int = 3) -> SplitIndex:
    modes = ["RGB", "RGB", "L", "CMYK"]
    paths, labels = [], []
    for i in range(n):
        h, w = 37 + (i * 7) % 30, 40 + (i * 11) % 45  # varied sizes, shorter side ≥ 37
        p = folder / f"{i:03d}.jpg"
        write_image(p, mode=modes[i % 4], pixels=_smooth_image(h, w, i), format="JPEG", quality=95)
        paths.append(p)
        labels.append(i % num_classes)
    return SplitIndex(folder / "split.txt", paths, np.asarray(labels, dtype=np.int64), num_classes)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> SplitIndex:
    return _write_set(tmp_path_factory.mktemp("jpegs"))


def _spec(batch_size: int, **kw) -> LoaderSpec:
    """The tests' LoaderSpec: SIZE px, their mean/std, CPU, 0 workers (DALI: 2 threads)."""
    kw.setdefault("image_size", SIZE)
    return LoaderSpec(batch_size, mean=MEAN, std=STD, **kw)


def _loader(index, batch_size=8, train=True, sampler=None, **kw) -> DaliLoader:
    return DaliLoader(index, _spec(batch_size, **kw), train, sampler=sampler)


@pytest.mark.parametrize(
    "layout,dtype,shape,torch_dtype",
    [
        ("NCHW", "float32", (8, 3, SIZE, SIZE), torch.float32),
        ("NHWC", "float16", (8, SIZE, SIZE, 3), torch.float16),
        ("channels_last", "bfloat16", (8, 3, SIZE, SIZE), torch.bfloat16),
    ],
)
def test_train_batches_shapes_layouts_dtypes(index, layout, dtype, shape, torch_dtype):
    sampler = InstanceSampler(index.labels, seed=0)
    loader = _loader(index, sampler=sampler, layout=layout, dtype=dtype)
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 24 images, drop_last in train
    for x, y in batches:
        assert tuple(x.shape) == shape and x.dtype == torch_dtype and x.device.type == "cpu"
        assert y.dtype == torch.int64 and y.shape == (8,)
        assert torch.isfinite(x.float()).all()
        # Normalized pixels lie within [(0 − mean)/std, (1 − mean)/std] of some channel.
        assert x.float().min() >= -2.2 and x.float().max() <= 2.7
    if layout == "channels_last":
        assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    else:
        assert batches[0][0].is_contiguous()


def test_labels_follow_the_sampler_exactly(index):
    # Class-aware, rank 1 of 2, two epochs, then a resumed epoch; batch 5 keeps the tail (eval-style).
    sampler = ClassAwareSampler(index.labels, seed=3, rank=1, world_size=2, num_samples=30)
    loader = _loader(index, batch_size=5, sampler=sampler, drop_last=False, augment="random_resized_crop")
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        got = torch.cat([y for _, y in loader]).tolist()
        assert got == index.labels[sampler.rank_order(epoch)].tolist()
        assert len(got) == 15
    sampler.set_epoch(1)
    sampler.set_position(7)
    got = [y.tolist() for _, y in loader]
    assert [len(b) for b in got] == [5, 3]
    assert sum(got, []) == index.labels[sampler.rank_order(1)[7:]].tolist()


def test_abandoned_epoch_restarts_with_the_right_order(index):
    sampler = InstanceSampler(index.labels, seed=9)
    loader = _loader(index, batch_size=4, sampler=sampler)
    it = iter(loader)
    next(it)  # leave epoch 0 after one batch
    loader.set_epoch(1)
    got = torch.cat([y for _, y in loader]).tolist()
    assert got == index.labels[sampler.rank_order(1)].tolist()


def test_eval_center_crop_normalization_matches_numpy(index, tmp_path):
    # Shorter side == resize size (37), so the resize is the identity and the center crop is exact.
    h, w = 37, 61
    pixels = _smooth_image(h, w, seed=123)
    write_image(tmp_path / "a.jpg", pixels=pixels, quality=95)
    decoded = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"), dtype=np.float64)
    single = SplitIndex(tmp_path / "s.txt", [tmp_path / "a.jpg"], np.array([2]), 3)
    (x, y), = list(_loader(single, batch_size=1, train=False, layout="NHWC"))
    # DALI centers with the offset rounded half up, floor((in − crop)/2 + ½): (3, 15) here;
    # torchvision's CenterCrop rounds half to even, (2, 14). A one-pixel shift would fail below.
    top, left = int(np.floor((h - SIZE) / 2 + 0.5)), int(np.floor((w - SIZE) / 2 + 0.5))
    assert (top, left) == (3, 15)
    expected = (decoded[top : top + SIZE, left : left + SIZE] / 255.0 - np.array(MEAN)) / np.array(STD)
    err = np.abs(x[0].numpy().astype(np.float64) - expected)
    assert y.tolist() == [2]
    assert err.mean() < 0.01 and err.max() < 0.1  # DALI's and PIL's JPEG decoders may differ by a level or two


def _reference_eval(path: Path, resize: int = 37, size: int = SIZE) -> np.ndarray:
    """PIL/numpy reference of DALI's eval graph (HWC, normalized).

    DALI's conventions, each one pixel away from torchvision's at worst: the longer side is
    resized to round(long · resize / short) (torchvision truncates), and the center-crop
    offset is floor((in − crop)/2 + ½) (torchvision rounds half to even). Interpolation is
    bilinear with antialiasing in both, as PIL's BILINEAR resize.
    """
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = resize / min(w, h)
    new_w = resize if w <= h else int(np.floor(w * scale + 0.5))
    new_h = resize if h < w else int(np.floor(h * scale + 0.5))
    a = np.asarray(img.resize((new_w, new_h), Image.BILINEAR), dtype=np.float64)
    top, left = int(np.floor((new_h - size) / 2 + 0.5)), int(np.floor((new_w - size) / 2 + 0.5))
    return (a[top : top + size, left : left + size] / 255.0 - np.array(MEAN)) / np.array(STD)


def test_eval_resize_and_crop_match_pil_on_varied_images(index):
    """Resize (shorter side = round(32·256/224) = 37) + center crop on varied sizes, grayscale and CMYK."""
    (x, y), = list(_loader(index, batch_size=len(index), train=False))
    assert y.tolist() == index.labels.tolist()
    for i, p in enumerate(index.paths):
        err = np.abs(x[i].permute(1, 2, 0).numpy() - _reference_eval(p))
        assert err.mean() < 0.03 and err.max() < 0.25, (p.name, Image.open(p).mode, err.mean(), err.max())
    # Grayscale JPEGs come out with three equal channels.
    raw = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    gray = raw[2::4]
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)


def test_eval_against_the_torchvision_fallback(index):
    """Same batches and labels; values agree up to the one-pixel size/offset conventions above."""
    dl = _loader(index, batch_size=8, train=False)
    tv = make_loader(index, _spec(8), False)
    assert len(dl) == len(tv) == 3
    for (xd, yd), (xt, yt) in zip(dl, tv):
        assert xd.shape == xt.shape and yd.tolist() == yt.tolist()
        assert (xd - xt).abs().mean() < 0.3  # these test images vary fast; a one-pixel shift shows


def test_flip_and_pad_crop_values(index):
    """pad_crop without padding = resize + center crop: every train image is the eval image or its mirror."""
    sub = SplitIndex(index.split_file, index.paths[:8], index.labels[:8], 3)
    sampler = InstanceSampler(sub.labels, seed=1)
    train = _loader(sub, batch_size=8, sampler=sampler, augment="pad_crop", crop_padding=0, hflip=True, seed=5)
    evals = _loader(sub, batch_size=8, train=False, augment="pad_crop")
    (xe, _), = list(evals)
    order = sampler.rank_order(0)
    (xt, yt), = list(train)
    flipped = 0
    for k, i in enumerate(order):
        if torch.allclose(xt[k], xe[i], atol=1e-5):
            continue
        assert torch.allclose(xt[k], xe[i].flip(-1), atol=1e-5), f"sample {k} is neither the eval crop nor its mirror"
        flipped += 1
    assert 0 < flipped < 8
    # With padding 4 some crops reach into the zero padding: pixel 0 → (0 − mean)/std exactly.
    padded = _loader(sub, batch_size=8, sampler=sampler, augment="pad_crop", crop_padding=4, hflip=False, seed=5)
    (xp, _), = list(padded)
    zero = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)
    border = (xp - zero).abs().amax(dim=1) < 1e-4  # pixels equal to a zero pixel in all channels
    assert border.any()


def test_corrupt_and_missing_files_are_named(index, tmp_path):
    paths = list(index.paths[:8])
    bad = tmp_path / "corrupt.jpg"
    data = index.paths[0].read_bytes()
    bad.write_bytes(data[:200] + b"\x00not a jpeg" * 20)
    paths[5] = bad
    broken = SplitIndex(index.split_file, paths, index.labels[:8], 3)
    with pytest.raises(DataError, match=r"cannot read image .*corrupt\.jpg"):
        list(_loader(broken, batch_size=4, train=False))
    gone = tmp_path / "gone.jpg"
    gone.write_bytes(data)
    paths[5] = gone
    missing = SplitIndex(index.split_file, paths, index.labels[:8], 3)
    loader = _loader(missing, batch_size=4, train=False)
    gone.unlink()  # deleted after the split was read
    with pytest.raises(DataError, match=r"cannot read image .*gone\.jpg"):
        list(loader)


def test_fallback_loader_matches_dali_batches(index):
    """torchvision path: same sampler → same label order, batch shapes, layout and dtype as DALI."""
    for layout, dtype in (("NHWC", "float16"), ("channels_last", "float32")):
        s1 = ClassAwareSampler(index.labels, seed=4, rank=0, world_size=2)
        s2 = ClassAwareSampler(index.labels, seed=4, rank=0, world_size=2)
        s1.set_epoch(2)
        dl = _loader(index, batch_size=4, sampler=s1, layout=layout, dtype=dtype)
        dl.set_epoch(2)
        tv = make_loader(index, _spec(4, layout=layout, dtype=dtype), True, sampler=s2)
        tv.sampler.set_epoch(2)
        bd, bt = list(dl), list(tv)
        assert len(bd) == len(bt) == 3
        for (xd, yd), (xt, yt) in zip(bd, bt):
            assert xd.shape == xt.shape and xd.dtype == xt.dtype and xd.stride() == xt.stride()
            assert yd.tolist() == yt.tolist()
    # The engine's default path is unchanged: InstanceSampler, NCHW float32.
    tv = make_loader(index, _spec(8, augment="pad_crop", crop_padding=4, hflip=True), True)
    x, y = next(iter(tv))
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and type(tv.sampler).__name__ == "InstanceSampler"


def test_fallback_loader_names_a_corrupt_file(index, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"junk" * 10)
    broken = SplitIndex(index.split_file, [index.paths[0], bad], np.array([0, 1]), 3)
    with pytest.raises(DataError, match=r"cannot read image .*bad\.jpg"):
        list(make_loader(broken, _spec(2), False))


def test_bad_options_and_gpu_request_say_what_to_do(index):
    with pytest.raises(ValueError, match=r"dtype 'int8' is not supported; expected one of"):
        _loader(index, dtype="int8")
    with pytest.raises(ValueError, match=r"layout 'CHW' is not supported"):
        _loader(index, layout="CHW")
    with pytest.raises(ValueError, match="resize_size 20 is smaller than the crop image_size 32"):
        _loader(index, train=False, resize_size=20)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"torch sees no CUDA device; to run on CPU pass device_id=None"):
            DaliLoader(index, LoaderSpec(4, device_id=0), False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed (GPU) decode needs a CUDA device; CPU pipeline tested above")
def test_mixed_decode_on_gpu(index):
    sampler = InstanceSampler(index.labels, seed=0)
    spec = LoaderSpec(8, image_size=SIZE, device_id=0, layout="channels_last", dtype="float16")
    loader = DaliLoader(index, spec, True, sampler=sampler)
    batches = list(loader)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.is_cuda and x.dtype == torch.float16 and x.shape == (8, 3, SIZE, SIZE)
    assert torch.cat([b[1].cpu() for b in batches]).tolist() == index.labels[sampler.rank_order(0)].tolist()


def test_train_without_sampler_shuffles_per_epoch_from_the_seed(index):
    loader = _loader(index, batch_size=8, seed=6)
    assert isinstance(loader.sampler, InstanceSampler)  # what the engine's set_epoch call reaches
    reference = InstanceSampler(index.labels, seed=6)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        assert torch.cat([y for _, y in loader]).tolist() == index.labels[reference.rank_order(epoch)].tolist()
