"""Untrusted data never runs code: CIFAR pickles, split paths that leave data.root."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import write_image

from pipelines.formats import (
    CifarUnpickler,
    build_cifar_lt,
    load_cifar_pickles,
    read_inat,
)
from pipelines.splits import DataError, read_split


class _RunsShell:
    """A pickle payload: unpickling calls os.system(command) (the classic attack)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _official_cifar10(folder: Path, per_class: int = 6, protocol: int = 2) -> None:
    """The official CIFAR-10 python layout: data_batch_1..5 + test_batch + batches.meta, keys as bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [c for c in range(10) for _ in range(per_class)]
        doc = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": labels,
            b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(doc, f, protocol=protocol)
    with open(folder / "batches.meta", "wb") as f:
        meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 10000, b"num_vis": 3072}
        pickle.dump(meta, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_official_cifar_layout_still_loads(tmp_path, protocol):
    _official_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    x, y = load_cifar_pickles(tmp_path, "cifar10", train=True)
    assert x.shape == (5 * 60, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [30] * 10
    splits = build_cifar_lt(tmp_path, tmp_path / "cache", "cifar10", 5.0, n_max=20)
    assert splits.class_names == [f"c{i}" for i in range(10)]  # the meta file went through the same unpickler


def test_cifar100_layout_with_fine_and_coarse_labels_loads(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    labels = list(range(100)) * 2
    for name in ("train", "test"):
        doc = {b"filenames": [b"x"] * 200, b"batch_label": b"training batch 1 of 1", b"fine_labels": labels,
               b"coarse_labels": [c // 5 for c in labels], b"data": np.zeros((200, 3072), np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(doc, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}" for i in range(100)], b"coarse_label_names": ["c"] * 20}, f, 2)
    x, y = load_cifar_pickles(tmp_path, "cifar100", train=True)
    assert x.shape == (200, 32, 32, 3) and y.tolist() == labels


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar_payload_never_runs(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    _official_cifar10(folder)
    marker = tmp_path / "PWNED"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _RunsShell(f"touch {marker}"), b"labels": [0]}, f, protocol=protocol)
    with pytest.raises(DataError) as err:
        load_cifar_pickles(tmp_path, "cifar10", train=True)
    assert not marker.exists(), "the pickle payload ran"
    message = str(err.value)
    assert "data_batch_1" in message and "refused global 'posix.system'" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="refused global"):  # the CLI/engine path: build_cifar_lt
        build_cifar_lt(tmp_path, tmp_path / "cache")
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.Popen", "numpy.load", "_codecs.decode"])
def test_any_other_global_is_refused_by_name(tmp_path, target):
    module, name = target.rsplit(".", 1)
    payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: GLOBAL module name, call with ('1',)
    path = tmp_path / "payload"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=f"refused global '{module}.{name}'"), open(path, "rb") as f:
        CifarUnpickler(f, encoding="bytes").load()


def test_codecs_encode_only_as_latin1(tmp_path):
    # protocol ≤ 2 writes bytes as _codecs.encode(str, 'latin1'); any other codec is refused
    path = tmp_path / "p"
    path.write_bytes(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="only as encode"), open(path, "rb") as f:
        CifarUnpickler(f, encoding="bytes").load()


def test_garbage_cifar_file_is_one_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _official_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00(")  # truncated
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR python pickle"):
        load_cifar_pickles(tmp_path, "cifar10", train=True)


# ---- paths that leave data.root ------------------------------------------------------------------------
def _image(path: Path) -> Path:
    write_image(path, (4, 4))
    return path


@pytest.mark.parametrize("line", ["../outside.png 0", "a/../../outside.png 0", "{abs} 0"])
def test_split_path_outside_root_is_refused(tmp_path, line):
    root = tmp_path / "root"
    _image(root / "a" / "in.png")
    outside = _image(tmp_path / "outside.png")
    split = tmp_path / "split.txt"
    split.write_text(f"a/in.png 0\n\n{line.format(abs=outside)}\n")
    with pytest.raises(DataError) as err:
        read_split(split, root)
    msg = str(err.value)
    assert f"{split}:3:" in msg and str(outside) in msg and "data.allow_outside_root" in msg
    index = read_split(split, root, allow_outside_root=True)
    assert len(index) == 2


def test_paths_inside_root_are_fine(tmp_path):
    root = tmp_path / "root"
    _image(root / "a" / "in.png")
    (root / "b").mkdir()
    split = tmp_path / "split.txt"
    split.write_text(f"a/./in.png 0\nb/../a/in.png 1\n{root / 'a' / 'in.png'} 0\n")
    assert len(read_split(split, root)) == 3


def test_inat_file_name_outside_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _image(tmp_path / "x.jpg")
    doc = {"images": [{"id": 1, "file_name": "../x.jpg"}], "annotations": [{"image_id": 1, "category_id": 3}],
           "categories": [{"id": 3}]}
    (tmp_path / "train.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"images\[0\] file_name '../x.jpg' resolves to .*outside the image root"):
        read_inat(tmp_path / "train.json", root)
    assert len(read_inat(tmp_path / "train.json", root, allow_outside_root=True)[0]) == 1


def test_config_keys_validated():
    from engine.config import ConfigError, load_config

    cfg = load_config(overrides=["data.allow_outside_root=true", "data.on_bad_image=skip", "data.max_bad_images=0.05"])
    assert cfg.data.allow_outside_root and cfg.data.on_bad_image == "skip" and cfg.data.max_bad_images == 0.05
    for bad, key in [("data.on_bad_image=ignore", "data.on_bad_image"), ("data.max_bad_images=1.5", "data.max_bad_images"),
                     ("data.verify_images=maybe", "data.verify_images")]:
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[bad])
    assert load_config("imagenet-lt-resnext50", overrides=["data.root=/x"]).data.on_bad_image == "skip"
    assert load_config().data.on_bad_image == "fail"


def test_missing_image_after_blank_lines_names_its_real_line(tmp_path):
    root = tmp_path / "root"
    _image(root / "a.png")
    split = tmp_path / "split.txt"
    split.write_text("a.png 0\n\n\nmissing.png 1\n")
    with pytest.raises(DataError, match=r"missing\.png \(line 4\)"):
        read_split(split, root)
