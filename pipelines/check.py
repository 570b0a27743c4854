"""Image and split checks: `engine data check`, and the check `load_data` runs before training.

`check_split` reads a split through the same parser as `read_split` (pipelines/splits.py,
`parse_split`), but where `read_split` stops at the first problem it collects ALL of them:
lines that do not parse (non-UTF-8 bytes included), labels out of range, paths leaving the root, missing files, files
that cannot be read (permissions, folders) and files PIL cannot fully decode (truncated,
corrupt, not an image; `decode=False` only opens them, a header read), duplicate lines and
one image with different labels. It also reports the label range, per-class counts, empty
classes and the many/medium/few-shot partition (Liu et al. 2019: many > 100, few < 20
training images). `check_splits` adds what only several splits show: images shared between
splits (leakage) and label conflicts between them.

Before training, `screen_splits` opens every train image and decodes every val/test image
(threads, a progress bar), and applies `data.on_bad_image` (fail: one error listing them; skip:
dropped and returned, up to `data.max_bad_images`). `write_bad_list` / `read_exclusions` are
the exclusion file's two sides: `relative/path<TAB>reason` per line; the readers drop the
excluded images before they check that images exist (engine/data.py passes them on).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from common.io import atomic_write_text
from pipelines.long_tail import shot_groups
from pipelines.progress import progress_bar
from pipelines.splits import DataError, SplitIndex, SplitLine, image_path, outside_root, parse_split, repeated_images


def _decode(path: Path) -> tuple[str, str] | None:
    """None if PIL decodes the whole image; else (kind, reason) with kind missing/unreadable/corrupt."""
    from PIL import Image

    if not path.exists():
        return "missing", "no such file"
    if not path.is_file():
        return "unreadable", "not a regular file"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}"
    try:
        with Image.open(path) as img:
            img.load()  # full decode: a truncated or corrupt body fails here, not at open()
            if img.width < 1 or img.height < 1:
                return "corrupt", f"empty image {img.width}×{img.height}"
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return "corrupt", f"{type(exc).__name__}: {exc}"
    return None


def _open_header(path: Path) -> tuple[str, str] | None:
    """None if PIL identifies the file and reads a non-empty size from its header; else (kind, reason)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.width < 1 or img.height < 1:
                return "corrupt", f"empty image {img.width}×{img.height}"
    except FileNotFoundError:
        return "missing", "no such file"
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ...
        return "corrupt", f"{type(exc).__name__}: {exc}"
    return None


def _scan(paths: list[Path], check, jobs: int | None, progress: bool, desc: str) -> list[tuple[str, str] | None]:
    """`check(path)` for every path in `jobs` threads (PIL releases the GIL while decoding;
    default min(8, CPU count)), in order, with a progress bar on stderr when `progress` (pipelines/progress.py)."""
    n_jobs = jobs or min(8, os.cpu_count() or 1)
    out: list[tuple[str, str] | None] = []
    with ThreadPoolExecutor(max_workers=n_jobs) as pool, progress_bar(
        total=len(paths), desc=desc, unit="img", disable=not progress, leave=False
    ) as bar:
        for res in pool.map(check, paths, chunksize=64):
            out.append(res)
            bar.update()
    return out


def _image_problems(root: Path, lines: list[SplitLine], decode: bool, workers: int | None, progress: bool,
                    desc: str) -> dict[str, list[dict[str, Any]]]:
    """Every image of `lines` decoded (or opened): {missing, unreadable, corrupt: [{line, path, error}]}."""
    paths = [root / line.rel for line in lines]
    results = _scan(paths, _decode if decode else _open_header, workers, progress, desc)
    problems: dict[str, list[dict[str, Any]]] = {"missing": [], "unreadable": [], "corrupt": []}
    for line, path, res in zip(lines, paths, results):
        if res is not None:
            problems[res[0]].append({"line": line.lineno, "path": str(path), "error": res[1]})
    return problems


def check_split(
    split_file: str | Path,
    root: str | Path,
    num_classes: int | None = None,
    many: int = 100,
    few: int = 20,
    workers: int | None = None,
    decode: bool = True,
    progress: bool = False,
    allow_outside_root: bool = False,
) -> dict[str, Any]:
    """Scan `split_file` (`relative/path label` lines under `root`, parsed by `parse_split`) and decode
    every image (`decode=False`: open every image, a header read).

    Returns a dict (JSON-serialisable) with:
      split_file, root, num_lines, num_images (parsed lines), num_classes,
      label_min, label_max, bad_lines [{line, text, error}], out_of_range [{line, label}],
      missing / unreadable / corrupt [{line, path, error}], class_counts [int],
      empty_classes [int], shots {many, medium, few: [class ids]} (many: n > `many`,
      few: n < `few`, medium otherwise; empty classes count as few),
      outside_root [{line, path}] (paths leaving `root`, not opened, unless `allow_outside_root`),
      duplicates [{path, lines}] (one image on several lines), conflicting_labels
      [{path, lines, labels}] (one image with different labels), decoded (bool),
      ok (no problem at all).
    `num_classes=None` takes one more than the largest label. `workers` threads decode
    (PIL releases the GIL while decoding); default min(8, CPU count).
    """
    split_file, root = Path(split_file), Path(root)
    if few > many:
        raise ValueError(f"few-shot threshold {few} is above the many-shot threshold {many}")
    lines, bad_lines = parse_split(split_file)
    if not root.is_dir():
        raise DataError(f"image root {root} does not exist or is not a folder")
    labels = np.array([line.label for line in lines], dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    outside = [] if allow_outside_root else [line for line in lines if outside_root(root, line.rel)]
    skipped = {line.lineno for line in outside}  # never opened: the path is not the user's to read
    problems = _image_problems(root, [line for line in lines if line.lineno not in skipped], decode, workers,
                               progress, f"{'decoding' if decode else 'opening'} {split_file.name}")
    repeated = repeated_images(lines, root)
    conflicts = {path: found for path, found in repeated.items() if len({line.label for line in found}) > 1}
    counts = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
    report: dict[str, Any] = {
        "split_file": str(split_file),
        "root": str(root),
        "num_lines": len(lines) + len(bad_lines),
        "num_images": len(lines),
        "num_classes": num_classes,
        "label_min": int(labels.min()) if len(labels) else None,
        "label_max": int(labels.max()) if len(labels) else None,
        "bad_lines": [{"line": b.lineno, "text": b.text, "error": b.error} for b in bad_lines],
        "out_of_range": [{"line": line.lineno, "label": line.label} for line in lines
                         if not 0 <= line.label < num_classes],
        **problems,
        "outside_root": [{"line": line.lineno, "path": str(root / line.rel)} for line in outside],
        "duplicates": [{"path": path, "lines": [line.lineno for line in found]} for path, found in repeated.items()],
        "conflicting_labels": [{"path": path, "lines": [line.lineno for line in found],
                                "labels": sorted({line.label for line in found})} for path, found in conflicts.items()],
        "decoded": decode,
        "class_counts": counts.tolist(),
        "empty_classes": np.flatnonzero(counts == 0).tolist(),
        "shots": {name: ids.tolist() for name, ids in shot_groups(counts, many, few).items()},
        "thresholds": {"many": many, "few": few},
    }
    report["ok"] = not (bad_lines or report["out_of_range"] or report["empty_classes"] or any(problems.values())
                        or not lines or outside or repeated)
    return report


def format_check_report(report: dict[str, Any], max_listed: int = 20) -> str:
    """A human-readable summary of `check_split`'s dict: counts first, then every problem (up to max_listed each)."""
    counts = report["class_counts"]
    lines = [
        f"split {report['split_file']} (root {report['root']})",
        f"  {report['num_images']} images on {report['num_lines']} lines, {report['num_classes']} classes, "
        f"labels {report['label_min']}..{report['label_max']}",
    ]
    if counts:
        nz = [c for c in counts if c > 0]
        ratio = f", imbalance ratio {max(nz) / min(nz):.1f}" if nz else ""
        lines.append(f"  per class: max {max(counts)}, min {min(counts)}{ratio}")
    t, s = report["thresholds"], report["shots"]
    lines.append(
        f"  shots: many (>{t['many']}) {len(s['many'])}, medium ({t['few']}..{t['many']}) {len(s['medium'])}, "
        f"few (<{t['few']}) {len(s['few'])} classes"
    )

    def section(title: str, items: list, fmt) -> None:
        if not items:
            return
        lines.append(f"  {title}: {len(items)}")
        lines.extend(f"    {fmt(x)}" for x in items[:max_listed])
        if len(items) > max_listed:
            lines.append(f"    … and {len(items) - max_listed} more")

    section("lines that do not parse", report["bad_lines"], lambda x: f"line {x['line']}: {x['error']}: {x['text']!r}")
    top = report["num_classes"] - 1
    section("labels out of range", report["out_of_range"], lambda x: f"line {x['line']}: label {x['label']} not in [0, {top}]")
    for kind in ("missing", "unreadable", "corrupt"):
        section(f"{kind} images", report[kind], lambda x: f"line {x['line']}: {x['path']} ({x['error']})")
    section("paths outside the root (not opened; data.allow_outside_root)", report["outside_root"],
            lambda x: f"line {x['line']}: {x['path']}")
    section("duplicate lines (one image listed more than once)", report["duplicates"],
            lambda x: f"{x['path']} on lines {x['lines']}")
    section("conflicting labels (one image, different labels)", report["conflicting_labels"],
            lambda x: f"{x['path']}: labels {x['labels']} on lines {x['lines']}")
    section("empty classes", report["empty_classes"], lambda c: f"class {c}")
    if not report["decoded"]:
        lines.append("  images were opened (header read), not decoded: --decode decodes every image")
    lines.append("  OK" if report["ok"] else "  PROBLEMS FOUND")
    return "\n".join(lines)


def check_splits(split_files: list[str | Path], root: str | Path, **kw) -> dict[str, Any]:
    """`check_split` on each split file, plus what only several splits show:

    shared [{path, where: [{split, line, label}]}]: one image in more than one split (leakage
    between train / val / test); conflicting_labels [{path, where}]: one image with different
    labels in different splits (a conflict inside one split is in that split's report).
    `bad` lists (path, reason) of every missing / unreadable / corrupt image of all splits
    (`write_bad_list` writes it as an exclusion file). ok: every split ok and nothing shared.
    """
    reports = [check_split(f, root, **kw) for f in split_files]
    where: dict[str, list[dict[str, Any]]] = {}
    for f in split_files:
        for line in parse_split(f)[0]:
            where.setdefault(image_path(Path(root), line.rel), []).append(
                {"split": str(f), "line": line.lineno, "label": line.label})
    shared = [{"path": p, "where": w} for p, w in where.items() if len({x["split"] for x in w}) > 1]
    conflicts = [s for s in shared if len({x["label"] for x in s["where"]}) > 1]
    bad = [(x["path"], f"{kind}: {x['error']}") for rep in reports for kind in ("missing", "unreadable", "corrupt")
           for x in rep[kind]]
    ok = all(r["ok"] for r in reports) and not shared
    return {"splits": reports, "shared": shared, "conflicting_labels": conflicts, "bad": bad, "ok": ok}


def format_multi_report(result: dict[str, Any], max_listed: int = 20) -> str:
    """`format_check_report` for each split, then images shared between splits and their label conflicts."""
    parts = [format_check_report(r, max_listed) for r in result["splits"]]
    if len(result["splits"]) > 1:
        lines = [f"across {len(result['splits'])} splits:"]
        for title, items in (("images in more than one split (leakage)", result["shared"]),
                             ("images with different labels in different splits", result["conflicting_labels"])):
            lines.append(f"  {title}: {len(items)}")
            for x in items[:max_listed]:
                at = ", ".join(f"{Path(w['split']).name}:{w['line']} (label {w['label']})" for w in x["where"])
                lines.append(f"    {x['path']}: {at}")
            if len(items) > max_listed:
                lines.append(f"    … and {len(items) - max_listed} more")
        lines.append("  OK" if result["ok"] else "  PROBLEMS FOUND")
        parts.append("\n".join(lines))
    return "\n".join(parts)


# ---- before training: every image opens (train) or decodes (val/test) ----------------------------------
def find_bad_images(
    paths: list[Path], decode: bool = True, jobs: int | None = None, desc: str = "checking images", progress: bool = True
) -> list[tuple[int, str]]:
    """(position in `paths`, reason) of every image that does not fully decode (`decode`) or
    whose header PIL cannot read (`decode=False`, a cheap per-file open), checked in `jobs`
    threads with a progress bar."""
    results = _scan(paths, _decode if decode else _open_header, jobs, progress, desc)
    return [(i, res[1]) for i, res in enumerate(results) if res is not None]


def read_exclusions(exclude_file: str | Path, root: str | Path) -> set[str]:
    """The normalized absolute paths listed in an exclusion file (one path relative to `root`
    per line, optionally followed by a tab and a reason, as `write_bad_list` writes; blank
    lines and lines starting with '#' are ignored)."""
    exclude_file = Path(exclude_file)
    try:
        text = exclude_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read exclusion file {exclude_file} (data.exclude_file): {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise DataError(f"{exclude_file}:{line}: byte {exc.object[exc.start]:#04x} is not UTF-8 (data.exclude_file); "
                        "expected UTF-8 text") from None
    out = set()
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.add(image_path(Path(root), line.split("\t", 1)[0].strip()))
    return out


def write_bad_list(path: str | Path, bad: list[tuple[str, str]], root: str | Path | None = None) -> None:
    """Write `path<TAB>reason` lines (paths relative to `root` when under it) atomically:
    the format `data.exclude_file` reads."""
    path = Path(path)
    lines = []
    for p, reason in bad:
        rel = os.path.relpath(p, root) if root is not None else str(p)
        if rel.startswith(".."):  # not under the root: keep the absolute path
            rel = str(p)
        lines.append(f"{rel}\t{' '.join(reason.split())}\n")
    atomic_write_text(path, "".join(lines))


def drop_images(index: SplitIndex, drop: set[int]) -> SplitIndex:
    """The index without the images at positions `drop` (labels and num_classes kept)."""
    keep = [i for i in range(len(index)) if i not in drop]
    return SplitIndex(index.split_file, [index.paths[i] for i in keep], index.labels[keep], index.num_classes)


def screen_splits(
    splits: tuple[SplitIndex, ...],
    data_cfg,
    builtin: bool = False,
    progress: bool = True,
    cache=None,
) -> tuple[tuple[SplitIndex, ...], list[tuple[str, str]]]:
    """Before training: check the images of the splits; return (splits, bad list).

    `splits` is (train, val, test) (val and test may be the same object). `data_cfg` is the
    data config (engine.config.DataConfig): verify_images, on_bad_image, max_bad_images,
    num_workers. The first split (train) is checked by opening every file
    (header read); the others are fully decoded (they are small). With on_bad_image="fail"
    any bad image is a DataError listing them; with "skip" they are dropped from their
    split and returned as (path, reason) — unless more than max_bad_images of a split is
    bad. `builtin`: images this engine wrote itself (digits_lt, cifar*_lt): verify_images
    "auto" skips their check. The images of `data.exclude_file` are not in `splits` (the readers drop them).
    `cache`: an object whose `find_bad` stands in for `find_bad_images` (same arguments and
    result), e.g. pipelines/screen_cache.py's remembered verdicts.
    """
    d = data_cfg
    verify = d.verify_images == "on" or (d.verify_images == "auto" and not builtin)
    jobs = max(d.num_workers, min(8, os.cpu_count() or 1))
    done: dict[tuple, SplitIndex] = {}  # val and test may be one file, read twice: checked once

    def key(k: int, index: SplitIndex) -> tuple:
        return os.path.abspath(index.split_file), k == 0, len(index)

    bad_all: list[tuple[str, str]] = []
    for k, index in enumerate(splits):
        if key(k, index) in done:
            continue
        bad: list[tuple[int, str]] = []
        if verify:
            name = "train" if k == 0 else ("val" if k == 1 else "test")
            find_bad = cache.find_bad if cache is not None else find_bad_images
            bad = find_bad(index.paths, decode=k > 0, jobs=jobs, progress=progress,
                           desc=f"{'opening' if k == 0 else 'decoding'} {name} images")
        if bad:
            listed = "; ".join(f"{index.paths[i]} ({r})" for i, r in bad[:10])
            if d.on_bad_image == "fail":
                first, reason = bad[0]
                raise DataError(
                    f"cannot read image {index.paths[first]} ({reason}); {index.split_file}: {len(bad)} of "
                    f"{len(index)} images cannot be read: {listed}{' …' if len(bad) > 10 else ''}; expected every image to "
                    f"{'open' if k == 0 else 'decode'} (data.on_bad_image=skip drops them, data.exclude_file lists "
                    "them; `engine data check --decode --bad-list FILE` writes such a list)"
                )
            if len(bad) > d.max_bad_images * len(index):
                raise DataError(
                    f"{index.split_file}: {len(bad)} of {len(index)} images cannot be read, more than "
                    f"data.max_bad_images={d.max_bad_images:g} of the split: {listed}"
                )
            bad_all += [(str(index.paths[i]), r) for i, r in bad]
        done[key(k, index)] = drop_images(index, {i for i, _ in bad}) if bad else index
    return tuple(done[key(k, s)] for k, s in enumerate(splits)), bad_all
