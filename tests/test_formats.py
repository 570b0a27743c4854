"""Every format's parser: split files, iNaturalist json, image folder, CIFAR-10/100-LT from fake pickles."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import write_image, write_jpeg
from PIL import Image

from pipelines.formats import build_cifar_lt, load_cifar_pickles, read_image_folder, read_inat, read_index
from pipelines.long_tail import long_tailed_counts
from pipelines.splits import DataError, class_counts, read_split


# ---- split files (ImageNet-LT / Places-LT) ------------------------------------------------------
def test_split_file_through_read_index(tmp_path):
    for i, (w, h, mode) in enumerate([(40, 30, "RGB"), (17, 60, "L"), (33, 33, "CMYK")]):
        write_jpeg(tmp_path / "train" / f"n{i}" / f"{i}.JPEG", (w, h), mode, seed=i)
    split = tmp_path / "ImageNet_LT_train.txt"
    split.write_text("train/n0/0.JPEG 0\ntrain/n1/1.JPEG 2\n\ntrain/n2/2.JPEG 2\n")
    li = read_index("split_files", split, tmp_path, num_classes=3)
    assert [p.name for p in li.index.paths] == ["0.JPEG", "1.JPEG", "2.JPEG"]
    assert li.index.labels.tolist() == [0, 2, 2]
    with pytest.raises(DataError, match=r"1 of 3 classes have no images \(classes \[1\]\)"):
        class_counts(li.index)
    split.write_text("train/n0/0.JPEG 0\ntrain/n1/1.JPEG two\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_train.txt:2: label 'two' is not an integer"):
        read_split(split, tmp_path)


# ---- iNaturalist 2018 ---------------------------------------------------------------------------
def _inat_doc(entries: list[tuple[str, int]], category_ids: list[int]) -> dict:
    return {
        "info": {"year": 2018},
        "images": [{"id": 100 + i, "file_name": f, "width": 32, "height": 32} for i, (f, _) in enumerate(entries)],
        "annotations": [{"id": i, "image_id": 100 + i, "category_id": c} for i, (_, c) in enumerate(entries)],
        "categories": [{"id": c, "name": f"species {c}", "supercategory": "Plantae"} for c in category_ids],
    }


def test_inat_maps_category_ids_in_sorted_order(tmp_path):
    entries = [("train_val2018/Plantae/5013/a.jpg", 5013), ("train_val2018/Aves/7/b.jpg", 7), ("train_val2018/Aves/42/c.jpg", 42)]
    entries.append(("train_val2018/Aves/7/d.jpg", 7))
    for i, (f, _) in enumerate(entries):
        write_jpeg(tmp_path / f, (20 + i, 24), seed=i)
    cats = [5013, 42, 7, 999]  # listed unsorted; 999 has no training image
    (tmp_path / "train2018.json").write_text(json.dumps(_inat_doc(entries, cats)))
    index, ids = read_inat(tmp_path / "train2018.json", tmp_path)
    assert ids == [7, 42, 999, 5013]
    assert index.num_classes == 4
    assert index.labels.tolist() == [3, 0, 1, 0]
    assert index.paths[0] == tmp_path / "train_val2018/Plantae/5013/a.jpg"
    assert np.bincount(index.labels, minlength=4).tolist() == [2, 1, 0, 1]

    # The validation json, read with the training mapping, agrees on labels.
    val = [("train_val2018/Aves/42/c.jpg", 42), ("train_val2018/Plantae/5013/a.jpg", 5013)]
    (tmp_path / "val2018.json").write_text(json.dumps(_inat_doc(val, [42, 5013])))
    vindex, vids = read_inat(tmp_path / "val2018.json", tmp_path, ids)
    assert vids == ids and vindex.labels.tolist() == [1, 3]
    li = read_index("inat", tmp_path / "val2018.json", tmp_path, class_names=[str(c) for c in ids])
    assert li.index.labels.tolist() == [1, 3] and li.class_names == ["7", "42", "999", "5013"]


def test_inat_bad_input_is_named(tmp_path):
    write_jpeg(tmp_path / "a.jpg", (8, 8))
    doc = _inat_doc([("a.jpg", 3)], [1, 2])
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotations\[0\] has category_id 3, which is not among the 2 categories"):
        read_inat(tmp_path / "t.json", tmp_path)
    doc = _inat_doc([("a.jpg", 1), ("missing.jpg", 2)], [1, 2])
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"1 of 2 images are missing, e.g. .*missing.jpg"):
        read_inat(tmp_path / "t.json", tmp_path)
    doc["annotations"] = doc["annotations"][:1]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"1 of 2 images have no annotation \(e.g. image_id \[101\]\)"):
        read_inat(tmp_path / "t.json", tmp_path)
    (tmp_path / "t.json").write_text('{"images": [\n')
    with pytest.raises(DataError, match=r"t.json:2: not valid json"):
        read_inat(tmp_path / "t.json", tmp_path)


# ---- image folder -----------------------------------------------------------------------------------
def test_image_folder_sorted_classes_and_extensions(tmp_path):
    write_jpeg(tmp_path / "zebra" / "1.jpg", (30, 20))
    write_jpeg(tmp_path / "zebra" / "0.JPEG", (20, 30), "L")
    write_jpeg(tmp_path / "ant" / "sub" / "x.jpeg", (16, 16), "CMYK")
    write_image(tmp_path / "ant" / "y.png", (9, 9))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "bee").mkdir()  # a class folder with no image: an empty class
    index, names = read_image_folder(tmp_path)
    assert names == ["ant", "bee", "zebra"]
    paths = [p.relative_to(tmp_path).as_posix() for p in index.paths]
    assert paths == ["ant/sub/x.jpeg", "ant/y.png", "zebra/0.JPEG", "zebra/1.jpg"]
    assert index.labels.tolist() == [0, 0, 2, 2]
    with pytest.raises(DataError, match=r"classes \[1\]"):
        class_counts(index)
    val, _ = read_image_folder(tmp_path, class_names=["ant", "bee", "zebra", "yak"])
    assert val.num_classes == 4
    with pytest.raises(DataError, match=r"class folders \['zebra'\] are not among"):
        read_image_folder(tmp_path, class_names=["ant", "bee"])
    with pytest.raises(DataError, match="has no class sub-folders"):
        read_image_folder(tmp_path / "ant" / "sub")


# ---- CIFAR-10/100-LT ----------------------------------------------------------------------------------
def _fake_cifar(folder: Path, variant: str, per_class: int = 20, test_per_class: int = 3) -> dict[str, np.ndarray]:
    """Tiny pickles in the real CIFAR format (uint8 rows of 3×32×32, b'labels' / b'fine_labels')."""
    folder.mkdir(parents=True)
    num_classes = 10 if variant == "cifar10" else 100
    key = b"labels" if variant == "cifar10" else b"fine_labels"
    rng = np.random.default_rng(0)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if variant == "cifar10" else ["train"]
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    for name, part in zip(train_files, np.array_split(np.arange(len(labels)), len(train_files))):
        doc = {b"batch_label": name.encode(), key: labels[part].tolist(), b"data": data[part]}
        if variant == "cifar100":
            doc[b"coarse_labels"] = (labels[part] // 5).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(doc, f)
    tlabels = np.repeat(np.arange(num_classes), test_per_class)
    tdata = rng.integers(0, 256, (len(tlabels), 3072), dtype=np.uint8)
    with open(folder / ("test_batch" if variant == "cifar10" else "test"), "wb") as f:
        pickle.dump({key: tlabels.tolist(), b"data": tdata}, f)
    if variant == "cifar10":
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return {"data": data, "labels": labels}


@pytest.mark.parametrize("variant,profile,ratio",
                         [("cifar10", "exp", 10.0), ("cifar10", "step", 10.0), ("cifar100", "exp", 20.0)])
def test_cifar_lt_counts_pixels_and_split_files(tmp_path, variant, profile, ratio):
    sub = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    fake = _fake_cifar(tmp_path / "src" / sub, variant)
    x, y = load_cifar_pickles(tmp_path / "src", variant, train=True)
    assert x.shape == (len(fake["labels"]), 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[5], fake["data"][5].reshape(3, 32, 32).transpose(1, 2, 0))

    splits = build_cifar_lt(tmp_path / "src", tmp_path / "cache", variant, ratio, profile, seed=0)
    num_classes = 10 if variant == "cifar10" else 100
    expected = long_tailed_counts(num_classes, 20, ratio, profile)
    assert splits.counts == expected
    train = read_split(splits.train, splits.root, num_classes)
    assert class_counts(train).tolist() == expected
    test = read_split(splits.test, splits.root, num_classes)
    assert class_counts(test).tolist() == [3] * num_classes
    # Pixels survive the PNG round trip, and every file maps back to its pickle row and label.
    for p, label in list(zip(train.paths, train.labels))[:: max(1, len(train) // 15)]:
        row = int(p.stem)
        assert fake["labels"][row] == label
        np.testing.assert_array_equal(np.asarray(Image.open(p)), x[row])
    if variant == "cifar10":
        assert splits.class_names[:2] == ["c0", "c1"]

    # Fixed seed: rebuilding gives the same selection; another seed a different one (same counts).
    first = splits.train.read_text()
    assert build_cifar_lt(tmp_path / "src", tmp_path / "cache", variant, ratio, profile, seed=0).train.read_text() == first
    other = build_cifar_lt(tmp_path / "src", tmp_path / "cache", variant, ratio, profile, seed=1)
    assert other.train.read_text() != first
    assert class_counts(read_split(other.train, other.root, num_classes)).tolist() == expected


def test_cifar_bad_input(tmp_path):
    with pytest.raises(DataError, match=r"no cifar10 python pickles in .*data_batch_1"):
        build_cifar_lt(tmp_path, tmp_path / "cache")
    _fake_cifar(tmp_path / "c10", "cifar10", per_class=4)
    with pytest.raises(DataError, match="fewer than n_max=5"):
        build_cifar_lt(tmp_path / "c10", tmp_path / "cache", n_max=5)
    with pytest.raises(DataError, match="leaves a class with no image"):
        build_cifar_lt(tmp_path / "c10", tmp_path / "cache", imbalance_ratio=100.0)
    (tmp_path / "c10" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR python pickle"):
        build_cifar_lt(tmp_path / "c10", tmp_path / "cache", imbalance_ratio=2.0)
