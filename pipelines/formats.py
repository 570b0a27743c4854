"""Data-set formats, each read into one `SplitIndex` of (absolute path, label).

* ImageNet-LT / Places-LT split files: `read_split` (pipelines/splits.py), re-exported.
* iNaturalist 2018 COCO-style json (`images`, `annotations`, `categories`): `read_inat`.
  Category ids are mapped to contiguous labels in sorted id order; the mapping
  (label → category id) is returned so that the validation json, read with the training
  mapping, gets the same labels.
* An image folder, one sub-folder per class (torchvision's ImageFolder layout):
  `read_image_folder`. Sorted class names → labels 0..C−1; the names are returned.
* CIFAR-10-LT / CIFAR-100-LT from the standard CIFAR python pickles a user already has:
  `build_cifar_lt` selects a long-tailed training subset (Cui et al. 2019 counts, fixed
  seed), writes the selected images once as PNG files plus split files to a cache folder
  (as pipelines/digits_lt.py does) and the result is read with `read_split` like any
  ImageNet-LT split, so it goes through the same loaders.

Class counts are computed afterwards, once, by `pipelines.splits.class_counts`.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from common.io import atomic_write_bytes
from pipelines.long_tail import long_tailed_counts
from pipelines.splits import DataError, SplitIndex, image_path, outside_root, read_split, write_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FORMATS = ("split_files", "inat", "image_folder", "cifar10_lt", "cifar100_lt")

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "LabeledIndex",
    "CifarLTSplits",
    "read_split",
    "read_inat",
    "read_image_folder",
    "CifarUnpickler",
    "load_cifar_pickles",
    "build_cifar_lt",
    "read_index",
]


@dataclass(frozen=True)
class LabeledIndex:
    """An index plus what its labels stand for: `class_names[label]` (a category id for iNat)."""

    index: SplitIndex
    class_names: list[str]


def _check_exist(source: Path, paths: list[Path]) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise DataError(f"{source}: {len(missing)} of {len(paths)} images are missing, e.g. {shown}")


# ---- iNaturalist 2018 -----------------------------------------------------------------------
def read_inat(
    json_file: str | Path,
    root: str | Path,
    category_ids: Sequence[int] | None = None,
    allow_outside_root: bool = False,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> tuple[SplitIndex, list[int]]:
    """Read an iNaturalist-2018-style COCO json into an index; return (index, category_ids).

    `category_ids[label]` is the json category id of `label`. Pass the list returned for the
    training json when reading the validation json, so both use the same labels (the
    validation json lists the same categories, but an explicit mapping makes it certain).
    Every image needs exactly one annotation; `file_name` is relative to `root` and may not
    leave it unless `allow_outside_root` (as `read_split`). Images in `exclude` (normalized
    paths, `image_path`) are dropped before the images are checked to exist.
    """
    json_file, root = Path(json_file), Path(root)
    if not root.is_dir():
        raise DataError(f"image root {root} does not exist or is not a folder")
    doc = _load_coco_json(json_file)
    category_ids, file_of, label_by_image = _inat_labels(json_file, doc, category_ids)
    unlabeled = [iid for iid in file_of if iid not in label_by_image]
    if unlabeled:
        raise DataError(
            f"{json_file}: {len(unlabeled)} of {len(file_of)} images have no annotation "
            f"(e.g. image_id {unlabeled[:5]}); a training/validation json needs one per image"
        )
    if not file_of:
        raise DataError(f"{json_file} lists no images")
    ids = [i for i in file_of if image_path(root, file_of[i]) not in exclude]  # the json's image order
    if not ids:
        raise DataError(f"{json_file}: all {len(file_of)} images are excluded by data.exclude_file")
    if not allow_outside_root:
        for n, i in enumerate(file_of):
            if (escaped := outside_root(root, file_of[i])) is not None:
                raise DataError(
                    f"{json_file}: images[{n}] file_name {file_of[i]!r} resolves to {escaped}, outside the image "
                    f"root {root}; expected a path under the root (set data.allow_outside_root=true to allow it)"
                )
    paths = [root / file_of[i] for i in ids]
    _check_exist(json_file, paths)
    labels = np.array([label_by_image[i] for i in ids], dtype=np.int64)
    return SplitIndex(json_file, paths, labels, len(category_ids)), list(category_ids)


def _load_coco_json(json_file: Path) -> dict:
    """The json object of an iNaturalist-style file, with its 'images' and 'annotations' lists present."""
    try:
        doc = json.loads(json_file.read_text())
    except OSError as exc:
        raise DataError(f"cannot read iNaturalist json {json_file}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_file}:{exc.lineno}: not valid json ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{json_file}: expected a json object with 'images', 'annotations', 'categories'")
    absent = [k for k in ("images", "annotations") if k not in doc]
    if absent:
        raise DataError(f"{json_file}: missing key(s) {absent}; expected COCO-style 'images', 'annotations', 'categories'")
    return doc


def _inat_labels(json_file: Path, doc: dict, category_ids: Sequence[int] | None) -> tuple[list[int], dict, dict]:
    """(category ids, {image id: file name}, {image id: label}) of a COCO-style document: one annotation
    per image, every category among `category_ids` (default: the document's own, sorted)."""
    try:
        if category_ids is None:
            if "categories" not in doc:
                raise DataError(f"{json_file}: no 'categories' list and no category_ids mapping given")
            category_ids = sorted({int(c["id"]) for c in doc["categories"]})
        label_of = {int(cid): label for label, cid in enumerate(category_ids)}
        if len(label_of) != len(category_ids):
            raise DataError(f"{json_file}: category_ids mapping has duplicate ids")
        file_of = {}
        for img in doc["images"]:
            file_of[int(img["id"])] = img["file_name"]
        label_by_image: dict[int, int] = {}
        for i, ann in enumerate(doc["annotations"]):
            image_id, cid = int(ann["image_id"]), int(ann["category_id"])
            if cid not in label_of:
                raise DataError(
                    f"{json_file}: annotations[{i}] has category_id {cid}, which is not among the "
                    f"{len(label_of)} categories (ids {min(label_of)}..{max(label_of)})"
                )
            if image_id not in file_of:
                raise DataError(f"{json_file}: annotations[{i}] refers to image_id {image_id}, which is not in 'images'")
            if image_id in label_by_image:
                raise DataError(f"{json_file}: image_id {image_id} has more than one annotation (annotations[{i}])")
            label_by_image[image_id] = label_of[cid]
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{json_file}: malformed COCO-style entry ({type(exc).__name__}: {exc})") from None
    return list(category_ids), file_of, label_by_image


# ---- image folder -----------------------------------------------------------------------------
def read_image_folder(
    folder: str | Path,
    class_names: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> tuple[SplitIndex, list[str]]:
    """Index `folder/<class>/**/<image>`: sorted class names → labels; return (index, class_names).

    Files are matched by extension (case-insensitive) and sorted within a class. Pass the
    training folder's `class_names` when reading a validation folder so labels agree; a
    class folder that is absent there is an empty class (reported by `class_counts`). Images in
    `exclude` (normalized paths, `image_path`) are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = found
        if not class_names:
            raise DataError(f"image folder {folder} has no class sub-folders; expected {folder}/<class>/<image>")
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(f"{folder}: class folders {unknown[:10]} are not among the {len(class_names)} given classes")
    exts = {e.lower() for e in extensions}
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        cdir = folder / name
        if not cdir.is_dir():
            continue
        files = sorted(p for p in cdir.rglob("*")
                       if p.suffix.lower() in exts and p.is_file() and os.path.normpath(p) not in exclude)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"image folder {folder} has no images with extensions {sorted(exts)}")
    return SplitIndex(folder, paths, np.asarray(labels, dtype=np.int64), len(class_names)), list(class_names)


# ---- CIFAR-10/100-LT -----------------------------------------------------------------------------
CIFAR_FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], ["test_batch"]),
    "cifar100": (["train"], ["test"]),
}
CIFAR_SUBDIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_META = {"cifar10": ("batches.meta", b"label_names"), "cifar100": ("meta", b"fine_label_names")}


@dataclass(frozen=True)
class CifarLTSplits:
    root: Path  # image root: split paths are relative to it
    train: Path
    test: Path
    class_names: list[str]
    counts: list[int]  # training images per class (the long-tailed profile)


def _cifar_dir(cifar_dir: Path, variant: str) -> Path:
    first = CIFAR_FILES[variant][0][0]
    for candidate in (cifar_dir, cifar_dir / CIFAR_SUBDIR[variant]):
        if (candidate / first).is_file():
            return candidate
    raise DataError(
        f"no {variant} python pickles in {cifar_dir} (looked for {first} there and in "
        f"{cifar_dir / CIFAR_SUBDIR[variant]}); expected the standard files {CIFAR_FILES[variant]}"
    )


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables an official CIFAR pickle names, under every module path numpy has used.

    The files were written by Python 2 with numpy 1.x (`numpy.core.multiarray._reconstruct`,
    `numpy.ndarray`, `numpy.dtype`); numpy ≥ 2 pickles name `numpy._core.multiarray`, and
    protocol 5 reconstructs from a buffer with `numpy._core.numeric._frombuffer`. The objects
    are taken from numpy's own reducers, so no module is imported by name.
    """
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as pickle protocols 0–2 use it for bytes (`encode(str, 'latin1')`), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as encode(str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin1")


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what the official CIFAR python files contain.

    Dicts, lists, tuples, bytes/str, ints, floats and bools are built by pickle opcodes
    without any global; the only globals admitted are numpy's array/dtype reconstruction
    (`_numpy_globals`) and `_codecs.encode(str, 'latin1')` (bytes in protocol ≤ 2). Any other
    global (`os.system`, `builtins.eval`, `subprocess.Popen`, …) is refused before it is
    called, naming it; persistent ids are refused too (the default Unpickler's behaviour).
    """

    ALLOWED: ClassVar[dict[tuple[str, str], object]] = {**_numpy_globals(), ("_codecs", "encode"): _latin1_encode}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}'") from None


def _unpickle(path: Path) -> dict:
    """Read one CIFAR python pickle through `CifarUnpickler`: a file naming any other global is refused."""
    try:
        with open(path, "rb") as f:
            doc = CifarUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read CIFAR file {path}: {exc.strerror}") from None
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused global"):
            allowed = sorted({f"{m}.{n}" for m, n in CifarUnpickler.ALLOWED})
            raise DataError(
                f"{path}: {exc}; a CIFAR python file holds only dicts, lists, bytes/str, ints and numpy arrays "
                f"(allowed globals: {', '.join(allowed)}). The file was NOT loaded: it is not an official CIFAR "
                "file and may be crafted to run code"
            ) from None
        raise DataError(f"{path} is not a CIFAR python pickle (UnpicklingError: {exc})") from None
    except Exception as exc:  # truncated / garbage files raise many types (EOFError, ValueError, …)
        raise DataError(f"{path} is not a CIFAR python pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(doc).__name__}")
    return doc


def load_cifar_pickles(cifar_dir: str | Path, variant: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 RGB and labels (N,) int64 from the standard CIFAR pickles."""
    if variant not in CIFAR_FILES:
        raise DataError(f"unknown CIFAR variant {variant!r}; expected one of {sorted(CIFAR_FILES)}")
    base = _cifar_dir(Path(cifar_dir), variant)
    label_key = b"labels" if variant == "cifar10" else b"fine_labels"
    images, labels = [], []
    for name in CIFAR_FILES[variant][0 if train else 1]:
        path = base / name
        doc = _unpickle(path)
        if b"data" not in doc or label_key not in doc:
            raise DataError(f"{path}: expected keys b'data' and {label_key!r}, found {sorted(doc)[:8]}")
        data = np.asarray(doc[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: b'data' has shape {data.shape}; expected (N, 3072) = N × 3×32×32")
        lab = np.asarray(doc[label_key], dtype=np.int64)
        if len(lab) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(lab)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    out_labels = np.concatenate(labels)
    num_classes = 10 if variant == "cifar10" else 100
    if out_labels.min() < 0 or out_labels.max() >= num_classes:
        raise DataError(f"{base}: labels span [{out_labels.min()}, {out_labels.max()}], expected [0, {num_classes - 1}]")
    return np.ascontiguousarray(np.concatenate(images)), out_labels


def _class_names(base: Path, variant: str) -> list[str]:
    num_classes = 10 if variant == "cifar10" else 100
    meta_file, key = CIFAR_META[variant]
    if (base / meta_file).is_file():
        names = _unpickle(base / meta_file).get(key)
        if names is not None and len(names) == num_classes:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """Write once: skip an existing file; temp file + rename so a crash never leaves half a PNG."""
    from PIL import Image

    if path.is_file():
        return
    atomic_write_bytes(path, lambda f: Image.fromarray(pixels, mode="RGB").save(f, format="PNG"))


def build_cifar_lt(
    cifar_dir: str | Path,
    cache_dir: str | Path,
    variant: str = "cifar10",
    imbalance_ratio: float = 100.0,
    profile: str = "exp",
    seed: int = 0,
    n_max: int | None = None,
) -> CifarLTSplits:
    """CIFAR-10-LT / CIFAR-100-LT: write the selected images as PNGs + split files; return where.

    Class i keeps n_i = long_tailed_counts(C, n_max, IF, profile)[i] training images
    (Cui et al.: exp n_max·IF^(−i/(C−1)); step), chosen as the first n_i of the class's
    images in a permutation drawn from `seed` (as Cao et al.'s IMBALANCECIFAR does with
    np.random.seed). `n_max` defaults to the smallest per-class training count (5,000 /
    500 for the real data). The test split is the full balanced test set.

    Layout under `cache_dir`:
        <variant>/images/{train,test}/<label>/<index>.png   (index into the pickles' order)
        <variant>/splits/seed<S>_train_<profile>_if<IF>_nmax<N>.txt, test.txt
    """
    if variant not in CIFAR_FILES:
        raise DataError(f"unknown CIFAR variant {variant!r}; expected one of {sorted(CIFAR_FILES)}")
    base = _cifar_dir(Path(cifar_dir), variant)
    num_classes = 10 if variant == "cifar10" else 100
    train_x, train_y = load_cifar_pickles(base, variant, train=True)
    test_x, test_y = load_cifar_pickles(base, variant, train=False)
    per_class = np.bincount(train_y, minlength=num_classes)
    available = int(per_class.min())
    n_max = available if n_max is None else int(n_max)
    if available < n_max:
        raise DataError(
            f"{base}: class {int(per_class.argmin())} has {available} training images, fewer than n_max={n_max}"
        )
    try:
        counts = long_tailed_counts(num_classes, n_max, imbalance_ratio, profile)
    except ValueError as exc:
        raise DataError(f"{variant}-LT: {exc}") from None

    rng = np.random.default_rng(seed)
    selected: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero(train_y == c)
        selected += idx[rng.permutation(len(idx))[: counts[c]]].tolist()

    root = Path(cache_dir) / variant
    try:
        (root / "splits").mkdir(parents=True, exist_ok=True)
        train_rows = []
        for i in selected:
            rel = f"images/train/{train_y[i]}/{i:05d}.png"
            _write_png(root / rel, train_x[i])
            train_rows.append((rel, int(train_y[i])))
        test_rows = []
        for i in range(len(test_y)):
            rel = f"images/test/{test_y[i]}/{i:05d}.png"
            _write_png(root / rel, test_x[i])
            test_rows.append((rel, int(test_y[i])))
        train = root / "splits" / f"seed{seed}_train_{profile}_if{imbalance_ratio:g}_nmax{n_max}.txt"
        test = root / "splits" / "test.txt"
        write_split(train, train_rows)
        write_split(test, test_rows)
    except OSError as exc:
        raise DataError(f"cannot write {variant}-LT to cache folder {root}: {exc}") from None
    return CifarLTSplits(root, train, test, _class_names(base, variant), counts)


# ---- one entry point ------------------------------------------------------------------------------
def _checked(li: LabeledIndex, num_classes: int | None) -> LabeledIndex:
    if num_classes is not None and li.index.num_classes != num_classes:
        raise DataError(f"{li.index.split_file}: {li.index.num_classes} classes found, but num_classes={num_classes} was given")
    return li


def read_index(
    fmt: str,
    source: str | Path,
    root: str | Path | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    allow_outside_root: bool = False,
) -> LabeledIndex:
    """Read one split of any format: `fmt` in ("split_files", "inat", "image_folder").

    split_files: `source` is the split file, `root` the image root.
    inat: `source` is the json, `root` the image root; `class_names` are category ids
          (from the training split) as strings or ints.
    image_folder: `source` is the folder (`root` unused); `class_names` from training.
    CIFAR-LT is built first with `build_cifar_lt` and then read as split files.
    """
    if fmt == "split_files":
        if root is None:
            raise DataError("format 'split_files' needs the image root")
        index = read_split(source, root, num_classes, allow_outside_root)
        names = list(class_names) if class_names is not None else [str(i) for i in range(index.num_classes)]
        return LabeledIndex(index, names)
    if fmt == "inat":
        if root is None:
            raise DataError("format 'inat' needs the image root")
        ids = [int(c) for c in class_names] if class_names is not None else None
        index, ids = read_inat(source, root, ids, allow_outside_root)
        return _checked(LabeledIndex(index, [str(c) for c in ids]), num_classes)
    if fmt == "image_folder":
        index, names = read_image_folder(source, class_names)
        return _checked(LabeledIndex(index, names), num_classes)
    raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS[:3]} (CIFAR-LT: build_cifar_lt first)")
