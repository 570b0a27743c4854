"""Bad images: checked before training, skipped and listed during it, excluded on request;
loader-level bitwise resume with workers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import write_jpeg

from pipelines.check import (
    find_bad_images,
    read_exclusions,
    screen_splits,
    write_bad_list,
)
from pipelines.loader import make_loader
from pipelines.samplers import ClassAwareSampler, InstanceSampler
from pipelines.spec import LoaderSpec
from pipelines.splits import DataError, SplitIndex, read_split, write_split

SIZE, MEAN, STD = 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _jpeg(path: Path, seed: int) -> Path:
    write_jpeg(path, (56, 48), seed=seed)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, body cut: opens, fails to decode
    return path


def _set(folder: Path, n: int = 12, num_classes: int = 2) -> SplitIndex:
    paths = [_jpeg(folder / f"c{i % num_classes}" / f"{i:02d}.jpg", i) for i in range(n)]
    return SplitIndex(folder / "split.txt", paths, np.arange(n, dtype=np.int64) % num_classes, num_classes)


@pytest.fixture
def broken(tmp_path):
    """12 images of 2 classes; #3 truncated JPEG (class 1), #4 a text file named .jpg (class 0)."""
    index = _set(tmp_path / "img")
    _truncate(index.paths[3])
    index.paths[4].write_text("not an image at all")
    return index


def _spec(batch_size: int, augment: str = "pad_crop", **kw) -> LoaderSpec:
    """SIZE px, the tests' mean/std; CIFAR-style resize + center crop (+ pad crop in train) by default."""
    return LoaderSpec(batch_size, image_size=SIZE, augment=augment, mean=MEAN, std=STD, **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_torchvision_loader_skips_and_names_bad_images(broken, num_workers):
    loader = make_loader(broken, _spec(4, workers=num_workers, on_bad_image="skip", max_bad_images=0.5), False)
    batches = list(loader)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == broken.labels.tolist()  # every position keeps its label
    # The replacement is the next image of the same class in index order: 3 → 5, 4 → 6.
    good = list(make_loader(SplitIndex(broken.split_file, [broken.paths[5], broken.paths[6]], np.array([1, 0]), 2),
                            _spec(2), False))[0][0]
    assert torch.equal(images[3], good[0]) and torch.equal(images[4], good[1])
    assert [p for p, _ in loader.bad_images] == [str(broken.paths[3]), str(broken.paths[4])]
    assert "truncated" in loader.bad_images[0][1].lower() and "cannot identify" in loader.bad_images[1][1]
    list(loader)  # a second epoch meets them again: listed once, counted twice
    assert len(loader.bad_images) == 2 and loader.bad_count == 4


def test_fail_policy_names_the_file_and_threshold_stops_a_skip_run(broken):
    with pytest.raises(DataError, match=r"cannot read image .*03\.jpg \(OSError: .*[Tt]runcated"):
        list(make_loader(broken, _spec(4), False))
    loader = make_loader(broken, _spec(4, on_bad_image="skip", max_bad_images=0.1), False)
    with pytest.raises(DataError, match=r"2 of 12 images .* more than data.max_bad_images=0.1"):
        list(loader)


def test_a_class_with_no_readable_image_is_an_error(tmp_path):
    index = _set(tmp_path, n=4)
    for i in (1, 3):  # all of class 1
        _truncate(index.paths[i])
    with pytest.raises(DataError, match="none of the 1 other images of its class 1"):
        list(make_loader(index, _spec(4, on_bad_image="skip", max_bad_images=1.0), False))


def test_training_loader_with_sampler_and_layout_skips_too(broken):
    sampler = ClassAwareSampler(broken.labels, seed=1)
    spec = _spec(4, crop_padding=2, hflip=True, layout="NHWC", dtype="float16", on_bad_image="skip", max_bad_images=0.5)
    loader = make_loader(broken, spec, True, sampler=sampler)
    loader.sampler.set_epoch(3)
    xs = [x for x, _ in loader]
    assert len(xs) == 3 and xs[0].shape == (4, SIZE, SIZE, 3) and xs[0].dtype == torch.float16
    assert loader.sampler is sampler and len(loader) == 3


def test_dali_loader_skips_and_names_bad_images(broken):
    dali = pytest.importorskip("pipelines.dali")
    if not dali.dali_available():
        pytest.skip(f"NVIDIA DALI is not importable: {dali._DALI_IMPORT_ERROR}")
    kw = dict(augment="random_resized_crop", workers=1)
    loader = dali.DaliLoader(broken, _spec(4, on_bad_image="skip", max_bad_images=0.5, **kw), False)
    batches = list(loader)
    images = torch.cat([x for x, _ in batches])
    assert torch.cat([y for _, y in batches]).tolist() == broken.labels.tolist()
    assert [p for p, _ in loader.bad_images] == [str(broken.paths[3]), str(broken.paths[4])]
    ref = torch.cat([x for x, _ in dali.DaliLoader(
        SplitIndex(broken.split_file, [broken.paths[5], broken.paths[6]], np.array([1, 0]), 2), _spec(2, **kw), False)])
    assert torch.equal(images[3], ref[0]) and torch.equal(images[4], ref[1])
    assert len(list(loader)) == 3  # the next epoch reads the replacements directly
    with pytest.raises(DataError, match=r"cannot read image .*03\.jpg"):
        list(dali.DaliLoader(broken, _spec(4, **kw), False))
    with pytest.raises(DataError, match="more than data.max_bad_images=0.05"):
        list(dali.DaliLoader(broken, _spec(4, on_bad_image="skip", max_bad_images=0.05, **kw), False))


# ---- before training ----------------------------------------------------------------------------------
def _cfg(root: Path, **kw) -> SimpleNamespace:
    base = dict(root=str(root), exclude_file="", verify_images="auto", on_bad_image="fail", max_bad_images=0.5,
                num_workers=0)
    return SimpleNamespace(**{**base, **kw})


def test_open_check_for_train_decode_check_for_val(broken):
    # a truncated JPEG opens (header intact) but does not decode; a text file does neither
    assert [i for i, _ in find_bad_images(broken.paths, decode=False, jobs=2, progress=False)] == [4]
    assert [i for i, _ in find_bad_images(broken.paths, decode=True, jobs=2, progress=False)] == [3, 4]


def test_screen_splits_fail_lists_every_bad_image(broken, tmp_path):
    val = broken
    train = _set(tmp_path / "train", n=6)
    with pytest.raises(DataError) as err:
        screen_splits((train, val, val), _cfg(tmp_path), progress=False)
    msg = str(err.value)
    assert "2 of 12 images cannot be read" in msg and "03.jpg" in msg and "04.jpg" in msg and "\n" not in msg
    assert "data.on_bad_image=skip" in msg and "--decode" in msg


def test_screen_splits_skip_drops_and_returns_the_bad_list(broken, tmp_path):
    train = broken
    val = _set(tmp_path / "val", n=4)
    _truncate(val.paths[1])
    (tr, va, te), bad = screen_splits((train, val, val), _cfg(tmp_path, on_bad_image="skip"), progress=False)
    assert len(tr) == 11 and str(broken.paths[4]) not in map(str, tr.paths)  # train: only the unopenable file
    assert len(va) == 3 and te is va  # val is test: checked once
    assert [p for p, _ in bad] == [str(broken.paths[4]), str(val.paths[1])]
    with pytest.raises(DataError, match="more than data.max_bad_images=0.01"):
        screen_splits((train, val, val), _cfg(tmp_path, on_bad_image="skip", max_bad_images=0.01), progress=False)


def test_builtin_data_is_not_checked_unless_asked(broken, tmp_path):
    good = _set(tmp_path / "g", n=4)
    splits, bad = screen_splits((good, broken, broken), _cfg(tmp_path), builtin=True, progress=False)
    assert splits[1] is broken and bad == []
    with pytest.raises(DataError):
        screen_splits((good, broken, broken), _cfg(tmp_path, verify_images="on"), builtin=True, progress=False)
    splits, _ = screen_splits((good, broken, broken), _cfg(tmp_path, verify_images="off"), progress=False)
    assert splits[1] is broken


def test_exclusion_file_round_trip(broken, tmp_path):
    root = tmp_path / "img"
    bad = [(str(broken.paths[3]), "OSError: image file is\ntruncated"), (str(broken.paths[4]), "not an image")]
    listing = tmp_path / "bad.txt"
    write_bad_list(listing, bad, root)
    assert listing.read_text().splitlines()[0] == "c1/03.jpg\tOSError: image file is truncated"
    assert read_exclusions(listing, root) == {str(broken.paths[3]), str(broken.paths[4])}
    split = tmp_path / "split.txt"
    write_split(split, [(str(p.relative_to(root)), int(lab)) for p, lab in zip(broken.paths, broken.labels)])
    index = read_split(split, root, exclude=read_exclusions(listing, root))
    (tr, _, _), found = screen_splits((index, index, index), _cfg(root), progress=False)
    assert len(tr) == 10 and found == []  # excluded as the split is read: nothing left to fail on
    with pytest.raises(DataError, match="cannot read exclusion file"):
        read_exclusions(tmp_path / "nope.txt", root)
    listing.write_bytes(b"c1/03.jpg\tok\nc0/\xff.jpg\tbad\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: byte 0xff is not UTF-8"):
        read_exclusions(listing, root)


def _split_files(root: Path, n_val: int) -> tuple[SplitIndex, list[str]]:
    """8 JPEGs under root/img, train.txt listing all, val.txt the first n_val; the engine overrides reading them."""
    index = _set(root / "img", n=8)
    rows = [f"{p.relative_to(root)} {lab}" for p, lab in zip(index.paths, index.labels)]
    (root / "train.txt").write_text("\n".join(rows) + "\n")
    (root / "val.txt").write_text("\n".join(rows[:n_val]) + "\n")
    return index, ["data.format=split_files", f"data.root={root}", "data.train_split=train.txt",
                   "data.val_split=val.txt", "run.progress=false"]


def test_load_data_checks_images_before_training(tmp_path):
    from engine.config import load_config
    from engine.data import load_data

    index, over = _split_files(tmp_path / "root", n_val=4)
    _truncate(index.paths[2])  # in train (opens: kept) and in val (does not decode)
    with pytest.raises(DataError, match=r"cannot read image .*02\.jpg .*val\.txt: 1 of 4 images cannot be read"):
        load_data(load_config(overrides=over))
    data = load_data(load_config(overrides=over + ["data.on_bad_image=skip", "data.max_bad_images=0.3"]))
    assert len(data.val) == len(data.test) == 3 and len(data.train) == 8
    assert [p for p, _ in data.bad_images] == [str(index.paths[2])]


def test_default_digits_run_checks_nothing(tmp_path):
    from engine.config import load_config
    from engine.data import load_data

    data = load_data(load_config(overrides=[f"data.cache_dir={tmp_path}"]))
    assert data.bad_images == []


# ---- loader-level bitwise resume with workers ---------------------------------------------
def _train_loader(index, num_workers, start=0, epoch=1):
    sampler = InstanceSampler(index.labels, index.num_classes, seed=5)
    sampler.set_epoch(epoch)
    sampler.set_position(start)
    return make_loader(index, _spec(2, crop_padding=4, hflip=True, workers=num_workers), True, sampler=sampler)


def test_resume_mid_epoch_with_workers_gives_the_same_batches(tmp_path):
    index = _set(tmp_path, n=12, num_classes=3)
    full = list(_train_loader(index, num_workers=2))
    p = 3  # batches already trained on
    torch.manual_seed(1234)  # the workers' base seed (drawn from the global RNG) must not matter
    tail = list(_train_loader(index, num_workers=2, start=p * 2))
    assert len(full) == 6 and len(tail) == 3
    for (xa, ya), (xb, yb) in zip(full[p:], tail):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # the randomness is really there: another epoch, or another position, gives other crops
    other = list(_train_loader(index, num_workers=2, epoch=2))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, other))


def test_num_workers_0_keeps_the_global_rng_stream(tmp_path):
    """The default digits run must not change its numbers: num_workers=0 draws from torch's global RNG."""
    index = _set(tmp_path, n=8, num_classes=2)
    torch.manual_seed(7)
    a = list(_train_loader(index, num_workers=0))
    torch.manual_seed(7)
    b = list(_train_loader(index, num_workers=0))
    torch.manual_seed(8)
    c = list(_train_loader(index, num_workers=0))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


# ---- engine data check: --decode, --bad-list, duplicates, leakage, conflicting labels ---------
def _split_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(6):
        _jpeg(root / f"c{i % 2}" / f"{i}.jpg", i)
    (root / "train.txt").write_text("c0/0.jpg 0\nc1/1.jpg 1\nc0/2.jpg 0\nc1/3.jpg 1\nc0/2.jpg 0\nc1/1.jpg 0\n")
    (root / "val.txt").write_text("c0/4.jpg 0\nc1/3.jpg 1\n")
    (root / "test.txt").write_text("c1/5.jpg 1\nc0/4.jpg 1\n")
    return root


def test_check_reports_duplicates_and_conflicting_labels_within_a_split(tmp_path):
    from pipelines.check import check_split, format_check_report

    root = _split_root(tmp_path)
    r = check_split(root / "train.txt", root)
    assert {d["path"]: d["lines"] for d in r["duplicates"]} == {str(root / "c1/1.jpg"): [2, 6],
                                                                str(root / "c0/2.jpg"): [3, 5]}
    assert r["conflicting_labels"] == [{"path": str(root / "c1/1.jpg"), "lines": [2, 6], "labels": [0, 1]}]
    assert not r["ok"]
    text = format_check_report(r)
    assert "duplicate lines" in text and "conflicting labels" in text and "labels [0, 1] on lines [2, 6]" in text


def test_check_reports_leakage_and_label_conflicts_between_splits(tmp_path, capsys):
    from engine.cli import main

    root = _split_root(tmp_path)
    assert main(["data", "check", str(root / "val.txt"), str(root / "test.txt"), "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "images in more than one split (leakage): 1" in out
    assert "c0/4.jpg: val.txt:1 (label 0), test.txt:2 (label 1)" in out
    assert "images with different labels in different splits: 1" in out
    assert main(["data", "check", *(str(root / f"{s}.txt") for s in ("train", "val", "test")), "--root", str(root),
                 "--json"]) == 1
    import json

    result = json.loads(capsys.readouterr().out)
    shared = {Path(s["path"]).name: sorted(Path(w["split"]).name for w in s["where"]) for s in result["shared"]}
    assert shared == {"3.jpg": ["train.txt", "val.txt"], "4.jpg": ["test.txt", "val.txt"]}
    assert [Path(c["path"]).name for c in result["conflicting_labels"]] == ["4.jpg"]
    (root / "clean.txt").write_text("c1/5.jpg 1\nc0/0.jpg 0\n")
    assert main(["data", "check", str(root / "val.txt"), str(root / "clean.txt"), "--root", str(root)]) == 0


def test_check_decode_writes_the_bad_list_that_training_excludes(tmp_path, capsys):
    from engine.cli import main

    root = _split_root(tmp_path)
    (root / "train.txt").write_text("".join(f"c{i % 2}/{i}.jpg {i % 2}\n" for i in range(6)))
    _truncate(root / "c1" / "3.jpg")
    (root / "c0" / "4.jpg").write_text("text")
    bad_list = tmp_path / "bad.txt"
    # without --decode: the header read finds the text file only
    assert main(["data", "check", str(root / "train.txt"), "--root", str(root), "--bad-list", str(bad_list)]) == 1
    assert [line.split("\t")[0] for line in bad_list.read_text().splitlines()] == ["c0/4.jpg"]
    assert "header read" in capsys.readouterr().out
    assert main(["data", "check", str(root / "train.txt"), "--root", str(root), "--decode", "--jobs", "2",
                 "--bad-list", str(bad_list)]) == 1
    assert [line.split("\t")[0] for line in bad_list.read_text().splitlines()] == ["c1/3.jpg", "c0/4.jpg"]
    # the list is an exclusion file: those images are gone before training, nothing else is checked as bad
    index = read_split(root / "train.txt", root, exclude=read_exclusions(bad_list, root))
    (tr, _, _), bad = screen_splits((index, index, index), _cfg(root), progress=False)
    assert len(tr) == 4 and bad == []
    assert main(["data", "check", str(root / "train.txt"), "--root", str(root), "--jobs", "0"]) == 2


def test_a_bad_list_naming_missing_images_is_accepted_as_the_exclusion_file(tmp_path, capsys):
    """`engine data check --decode --bad-list F` lists missing images too; data.exclude_file=F drops them
    before the readers check that images exist, so the run's data load."""
    from engine.cli import main
    from engine.config import load_config
    from engine.data import load_data

    root = tmp_path / "root"
    index, over = _split_files(root, n_val=4)
    index.paths[6].unlink()  # missing, in train
    _truncate(index.paths[2])  # does not decode, in train and val
    bad_list = tmp_path / "bad.txt"
    assert main(["data", "check", str(root / "train.txt"), str(root / "val.txt"), "--root", str(root), "--decode",
                 "--bad-list", str(bad_list)]) == 1
    assert {line.split("\t")[0] for line in bad_list.read_text().splitlines()} == {"img/c0/02.jpg", "img/c0/06.jpg"}
    data = load_data(load_config(overrides=over + [f"data.exclude_file={bad_list}"]))
    assert (len(data.train), len(data.val), data.bad_images) == (6, 3, [])
    assert str(index.paths[6]) not in map(str, data.train.paths)


def test_check_flags_paths_outside_the_root_without_opening_them(tmp_path):
    from pipelines.check import check_split

    root = _split_root(tmp_path)
    _jpeg(tmp_path / "secret.jpg", 9)
    (root / "evil.txt").write_text("c0/0.jpg 0\n../secret.jpg 1\n")
    r = check_split(root / "evil.txt", root)
    assert r["outside_root"] == [{"line": 2, "path": str(root / "../secret.jpg")}] and not r["ok"]
    assert check_split(root / "evil.txt", root, allow_outside_root=True)["outside_root"] == []


def test_loader_state_dict_resumes_with_workers(tmp_path):
    index = _set(tmp_path, n=12, num_classes=3)
    a = _train_loader(index, num_workers=2)
    full, state = [], None
    for k, batch in enumerate(a):
        full.append(batch)
        if k == 1:
            state = a.state_dict()
    assert state == {"epoch": 1, "position": 4}
    b = _train_loader(index, num_workers=2, epoch=0)
    b.load_state_dict(state)
    tail = list(b)
    assert len(tail) == 4 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(full[2:], tail))


def test_dali_checkpoint_resumes_bit_for_bit(tmp_path):
    dali = pytest.importorskip("pipelines.dali")
    if not dali.dali_available():
        pytest.skip(f"NVIDIA DALI is not importable: {dali._DALI_IMPORT_ERROR}")
    index = _set(tmp_path, n=16, num_classes=2)

    def loader():
        sampler = InstanceSampler(index.labels, 2, seed=3)
        spec = _spec(2, augment="random_resized_crop", workers=1, seed=11)
        return dali.DaliLoader(index, spec, True, sampler=sampler, checkpointing=True)

    a = loader()
    a.set_epoch(1)
    full, state = [], None
    for k, batch in enumerate(a):
        full.append(batch)
        if k == 2:
            state = a.state_dict()
    assert state["position"] == 6 and state["epoch"] == 1
    b = loader()
    b.load_state_dict(state)
    tail = list(b)
    assert len(tail) == 5
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(full[3:], tail))
    a.set_epoch(2)
    b.set_epoch(2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))  # the generators continue alike into the next epoch
    c = loader()  # without the DALI checkpoint the crops differ: the test can fail
    c.set_epoch(1)
    c.sampler.set_position(6)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(full[3:], c))


def test_engine_loaders_skip_a_truncated_training_jpeg(tmp_path):
    """The run's path: load_data keeps a train JPEG that opens, the train loader meets it mid-epoch and replaces it."""
    from engine.config import load_config
    from engine.data import load_data, make_loaders, train_features_loader
    from engine.distributed import DistInfo

    index, over = _split_files(tmp_path / "root", n_val=2)
    _truncate(index.paths[5])
    cfg = load_config(overrides=[*over, "optim.batch_size=4", "data.on_bad_image=skip", "data.max_bad_images=0.2",
                                 "data.num_workers=2"])
    data = load_data(cfg)
    assert len(data.train) == 8 and data.bad_images == []  # it opens: kept for the loader to meet
    train, _, _ = make_loaders(cfg, data, DistInfo())
    train.sampler.set_epoch(0)
    assert sum(len(y) for _, y in train) == 8
    assert [p for p, _ in train.bad_images] == [str(index.paths[5])]
    feats = train_features_loader(cfg, data, DistInfo())
    assert sum(len(y) for _, y in feats) == 8 and len(feats.bad_images) == 1
