"""Long-tailed split construction, Digits-LT, and the split-file reader's checks."""

import logging

import numpy as np
import pytest
from helpers import write_image
from PIL import Image

from pipelines.digits_lt import build_digits_lt
from pipelines.long_tail import long_tailed_counts
from pipelines.splits import DataError, class_counts, read_split


def test_exp_profile_is_cui_et_al_formula():
    counts = long_tailed_counts(10, 100, 50, "exp")
    assert counts == [int(100 * (1 / 50) ** (i / 9)) for i in range(10)]
    assert counts == [100, 64, 41, 27, 17, 11, 7, 4, 3, 2]
    assert long_tailed_counts(100, 500, 100, "exp")[-1] == 5  # CIFAR-100-LT, IF 100


def test_step_profile():
    assert long_tailed_counts(10, 100, 10, "step") == [100] * 5 + [10] * 5
    assert long_tailed_counts(5, 100, 10, "step") == [100, 100, 10, 10, 10]


def test_profile_errors():
    with pytest.raises(ValueError, match="unknown imbalance profile"):
        long_tailed_counts(10, 100, 10, "linear")
    with pytest.raises(ValueError, match="leaves a class with no image"):
        long_tailed_counts(10, 10, 100, "exp")


@pytest.mark.parametrize("profile,ratio", [("exp", 50), ("exp", 10), ("step", 100)])
def test_digits_lt_splits(digits_cache, profile, ratio):
    s = build_digits_lt(digits_cache, ratio, profile, seed=1, n_max=100, val_per_class=20, test_per_class=50)
    train, val, test = (read_split(p, s.root, 10) for p in (s.train, s.val, s.test))
    assert class_counts(train).tolist() == long_tailed_counts(10, 100, ratio, profile)
    assert class_counts(val).tolist() == [20] * 10
    assert class_counts(test).tolist() == [50] * 10
    sets = [set(map(str, x.paths)) for x in (train, val, test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    img = Image.open(train.paths[0])
    assert img.size == (8, 8) and img.mode == "L"


def test_digits_lt_is_deterministic_and_seed_dependent(digits_cache):
    a = build_digits_lt(digits_cache, 50, "exp", seed=3)
    first = a.train.read_text()
    assert build_digits_lt(digits_cache, 50, "exp", seed=3).train.read_text() == first
    assert build_digits_lt(digits_cache, 50, "exp", seed=4).train.read_text() != first


def test_digits_lt_too_many_requested(digits_cache):
    with pytest.raises(DataError, match="lower data.n_max"):
        build_digits_lt(digits_cache, 10, "exp", n_max=150)


@pytest.fixture
def image_root(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"img{i}.png", (4, 4), seed=i)
    return tmp_path


def _write(tmp_path, text):
    p = tmp_path / "split.txt"
    p.write_text(text)
    return p


def test_read_split_good(image_root):
    idx = read_split(_write(image_root, "img0.png 0\n\nimg1.png 2\nimg2.png 1\n"), image_root)
    assert idx.labels.tolist() == [0, 2, 1] and idx.num_classes == 3
    assert idx.paths[1] == image_root / "img1.png"


@pytest.mark.parametrize(
    "text,match",
    [
        ("img0.png 0\nimg1.png\n", r"split.txt:2: expected 'relative/path label'"),
        ("img0.png 0\nimg1.png one\n", r"split.txt:2: label 'one' is not an integer"),
        ("img0.png 0\nimg1.png 5\n", r"split.txt:2: label 5 is outside \[0, 2\]"),
        ("img0.png -1\n", r"split.txt:1: label -1 is outside"),
        ("img0.png 0\nmissing.png 1\n", r"1 of 2 images are missing, e.g. .*missing.png \(line 2\)"),
        ("\n\n", "lists no images"),
    ],
)
def test_read_split_errors_name_file_and_line(image_root, text, match):
    with pytest.raises(DataError, match=match):
        read_split(_write(image_root, text), image_root, num_classes=3)


def test_missing_root_and_split(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        read_split(tmp_path / "s.txt", tmp_path / "nope")
    with pytest.raises(DataError, match="cannot read split file"):
        read_split(tmp_path / "s.txt", tmp_path)


def test_empty_class_is_an_error(image_root):
    idx = read_split(_write(image_root, "img0.png 0\nimg1.png 2\n"), image_root, num_classes=3)
    with pytest.raises(DataError, match=r"1 of 3 classes have no images \(classes \[1\]\)"):
        class_counts(idx)
    assert class_counts(idx, require_all=False).tolist() == [1, 0, 1]
    assert np.issubdtype(class_counts(idx, require_all=False).dtype, np.integer)


def test_a_non_utf8_line_is_one_error_naming_file_and_line(image_root):
    split = image_root / "split.txt"
    split.write_bytes(b"img0.png 0\nimg\xff1.png 1\n")
    with pytest.raises(DataError, match=r"split\.txt:2: byte 0xff at column 4 is not UTF-8") as err:
        read_split(split, image_root)
    assert "\n" not in str(err.value) and "img\ufffd1.png" in str(err.value)  # the byte shown as U+FFFD


def test_duplicate_lines_are_a_warning_with_the_count(image_root, caplog):
    split = _write(image_root, "img0.png 0\nimg1.png 1\nimg0.png 0\n./img1.png 2\nimg2.png 2\nimg0.png 0\n")
    with caplog.at_level(logging.WARNING, logger="pipelines.splits"):
        idx = read_split(split, image_root)
    assert len(idx) == 6  # every line is kept as written
    assert "split.txt: 3 duplicate lines (2 images listed more than once, 1 of them with different labels" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.splits"):
        read_split(_write(image_root, "img0.png 0\nimg1.png 1\n"), image_root)
    assert caplog.text == ""


def _split_files_run(root, train: str, val: str, *over: str):
    from engine.config import load_config

    (root / "train.txt").write_text(train)
    (root / "val.txt").write_text(val)
    return load_config(overrides=["data.format=split_files", f"data.root={root}", "data.train_split=train.txt",
                                  "data.val_split=val.txt", "run.progress=false", *over])


def test_a_train_label_above_every_eval_label_is_an_error_on_its_line(image_root):
    """`10` in a 10-class set: with data.num_classes=0 it would be an 11th class that is never evaluated."""
    from engine.data import load_data

    val = "img0.png 0\nimg1.png 1\nimg2.png 2\n"
    cfg = _split_files_run(image_root, "img0.png 0\nimg1.png 1\nimg2.png 2\nimg2.png 3\n", val)
    with pytest.raises(DataError, match=r"train\.txt:4: label 3 is above every label of .*val\.txt \(0\.\.2\)") as err:
        load_data(cfg)
    assert "\n" not in str(err.value) and "data.num_classes" in str(err.value)
    cfg = _split_files_run(image_root, "img0.png 0\nimg1.png 1\nimg2.png 2\n", val)
    assert load_data(cfg).num_classes == 3
    cfg = _split_files_run(image_root, "img0.png 0\nimg1.png 1\nimg2.png 2\nimg2.png 3\n", val, "data.num_classes=4")
    assert load_data(cfg).num_classes == 4  # given: the user's choice, no inference to guard
