"""Screening verdicts remembered in the run folder (pipelines/screen_cache.py): a restart checks only
changed images, a broken cache is ignored, and under torch.distributed only rank 0 opens images."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import engine_env, free_port, write_image

import pipelines.check as check
from pipelines.screen_cache import CACHE_NAME, FORMAT, ScreenCache, screen_once
from pipelines.splits import DataError, SplitIndex

REPO = Path(__file__).resolve().parents[1]


def _jpeg(path: Path, seed: int) -> Path:
    write_image(path, seed=seed)
    return path


def _splits(root: Path) -> tuple[SplitIndex, SplitIndex, SplitIndex]:
    """train: 6 images, #4 a text file named .jpg; val (also test): 3 images, #1 a truncated JPEG."""
    train = [_jpeg(root / "train" / f"{i}.jpg", i) for i in range(6)]
    train[4].write_text("not an image")
    val = [_jpeg(root / "val" / f"{i}.jpg", 10 + i) for i in range(3)]
    val[1].write_bytes(val[1].read_bytes()[:40])  # header intact, body cut: opens, does not decode
    labels = np.array([0, 1, 0, 1, 0, 1])
    tr = SplitIndex(root / "train.txt", train, labels, 2)
    va = SplitIndex(root / "val.txt", val, labels[:3], 2)
    return tr, va, va


def _cfg(root: Path, **kw) -> SimpleNamespace:
    base = dict(root=str(root), exclude_file="", verify_images="on", on_bad_image="skip", max_bad_images=0.5,
                num_workers=0)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def opened(monkeypatch):
    """The paths every image check opens (both levels), in call order."""
    seen: list[str] = []
    lock = threading.Lock()
    for name in ("_open_header", "_decode"):
        real = getattr(check, name)

        def counted(path, real=real):
            with lock:
                seen.append(Path(path).name if Path(path).parent.name != "val" else f"val/{Path(path).name}")
            return real(path)

        monkeypatch.setattr(check, name, counted)
    return seen


@pytest.fixture
def data(tmp_path):
    """(image root, run folder, splits) with the images written once."""
    root = tmp_path / "data"
    return root, tmp_path / "run", _splits(root)


def _screen(data, **kw):
    root, run, splits = data
    return screen_once(splits, _cfg(root, **kw), builtin=False, progress=False, run_dir=run)


def test_restart_reuses_every_verdict_and_opens_nothing(data, opened):
    root, run, _ = data
    first = _screen(data)
    assert len(opened) == 6 + 3  # train opened, val (= test) decoded once
    stamp = (run / CACHE_NAME).stat().st_mtime_ns

    opened.clear()
    second = _screen(data)
    assert opened == []  # every verdict, good and bad, came from the cache
    assert second[1] == first[1] and [str(p) for p, _ in second[1]] == [str(root / "train/4.jpg"),
                                                                         str(root / "val/1.jpg")]
    assert [len(s) for s in second[0]] == [len(s) for s in first[0]] == [5, 2, 2]
    assert (run / CACHE_NAME).stat().st_mtime_ns == stamp  # nothing changed: not rewritten


def test_changed_files_are_checked_again(data, opened):
    root, run, _ = data
    _screen(data)
    # touched (same bytes, new mtime), resized (same mtime), and a bad file repaired
    st = (root / "train/0.jpg").stat()
    os.utime(root / "train/0.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    st = (root / "val/2.jpg").stat()
    with open(root / "val/2.jpg", "ab") as f:
        f.write(b"\0")
    os.utime(root / "val/2.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    _jpeg(root / "train/4.jpg", 99)
    opened.clear()
    _, bad = _screen(data)
    assert sorted(opened) == ["0.jpg", "4.jpg", "val/2.jpg"]
    assert [Path(p).name for p, _ in bad] == ["1.jpg"]  # train/4 repaired; val/1 remembered bad


def test_deleted_file_is_found(data, opened):
    root, run, _ = data
    _screen(data)
    (root / "train/2.jpg").unlink()
    opened.clear()
    _, bad = _screen(data)
    assert opened == ["2.jpg"]
    assert (str(root / "train/2.jpg"), "no such file") in bad
    with pytest.raises(DataError, match=r"train/2\.jpg \(no such file\)"):
        _screen(data, on_bad_image="fail")


@pytest.mark.parametrize("content", [
    b"{not json", b"\x80\x04\x95 a pickle", b"[1, 2]", b'{"format": "something else"}',
    json.dumps({"format": FORMAT, "root": "/", "open": {"paths": ["a"], "size": [1, 2], "mtime_ns": [3], "bad": {}},
                "decode": {"paths": [], "size": [], "mtime_ns": [], "bad": {}}}).encode(),
    json.dumps({"format": FORMAT, "root": "/", "open": {"paths": ["a"], "size": [1], "mtime_ns": [3], "bad": {}},
                "decode": {"paths": ["b"], "size": [1], "mtime_ns": [3], "bad": {"7": "corrupt"}}}).encode(),
    json.dumps({"format": FORMAT, "root": "/", "open": {"paths": ["a"], "size": [1], "mtime_ns": [3], "bad": {}}}
               ).encode(),
])
def test_broken_cache_is_ignored_with_a_warning(data, opened, caplog, content):
    root, run, _ = data
    run.mkdir()
    (run / CACHE_NAME).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="pipelines.screen_cache"):
        _, bad = _screen(data)
    assert len(opened) == 9 and len(bad) == 2
    assert f"ignoring the screening cache {run / CACHE_NAME}" in caplog.text
    assert json.loads((run / CACHE_NAME).read_text())["format"] == FORMAT  # replaced by a good one


def test_cache_claiming_a_bad_file_good_is_not_trusted_for_another_stat(data, opened):
    root, run, _ = data
    _screen(data)
    doc = json.loads((run / CACHE_NAME).read_text())
    for level in ("open", "decode"):
        doc[level]["bad"] = {}  # every file claimed good ...
        doc[level]["size"] = [s + 1 for s in doc[level]["size"]]  # ... but for sizes the files do not have
    (run / CACHE_NAME).write_text(json.dumps(doc))
    opened.clear()
    _, bad = _screen(data)
    assert len(opened) == 9 and len(bad) == 2


def test_cache_is_written_atomically(data, monkeypatch, caplog):
    root, run, _ = data
    _screen(data)
    before = (run / CACHE_NAME).read_bytes()
    _jpeg(root / "train/4.jpg", 99)  # a change to write

    def disk_full(rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipelines.screen_cache._columns", disk_full)
    with caplog.at_level(logging.WARNING, logger="pipelines.screen_cache"):
        _screen(data)
    assert "cannot write the screening cache" in caplog.text and "ENOSPC" in caplog.text
    assert (run / CACHE_NAME).read_bytes() == before and sorted(p.name for p in run.iterdir()) == [CACHE_NAME]


def test_load_of_a_missing_cache_is_empty_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cache = ScreenCache.load(tmp_path / CACHE_NAME)
    assert cache.old == ({}, {}) and caplog.text == ""


def test_a_folder_holding_only_the_screening_cache_takes_a_new_run(tmp_path):
    """A run killed between screening and its first file leaves screened.json: no obstacle to a new start."""
    from common.errors import TrainingError
    from engine.distributed import DistInfo
    from engine.run_folder import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    (run / CACHE_NAME).write_text("{}")
    folder = RunFolder.open(run, False, DistInfo())
    folder.release()
    assert (folder.created, folder.resuming) == (False, False)
    (run / "notes.txt").write_text("someone else's file")
    with pytest.raises(TrainingError, match="already holds files"):
        RunFolder.open(run, False, DistInfo())


WORKER = """
import json, os, sys
from pathlib import Path
import PIL.Image
import pipelines.check as check
import engine.data
from engine.config import load_config
from engine.distributed import init_distributed, shutdown

calls = []
def counted(real, what):
    def f(*a, **k):
        calls.append(what)
        return real(*a, **k)
    return f
check._open_header = counted(check._open_header, "open")
check._decode = counted(check._decode, "decode")
screening = []
real_stat = os.stat
def stat(path, *a, **k):  # a stat of an image while screening (os.stat, pathlib's exists / is_file)
    if screening and os.fspath(path).endswith(".jpg"):
        calls.append("stat")
    return real_stat(path, *a, **k)
os.stat = stat
real_screen = engine.data.screen_once
def screen_once(*a, **k):
    screening.append(1)
    try:
        return real_screen(*a, **k)
    finally:
        screening.clear()
engine.data.screen_once = screen_once
PIL.Image.open = counted(PIL.Image.open, "pil")
dist = init_distributed("cpu")
data = engine.data.load_data(load_config(overrides=sys.argv[3:]), Path(sys.argv[2]), dist)
out = {"calls": calls, "bad": data.bad_images, "sizes": [len(data.train), len(data.val), len(data.test)]}
Path(sys.argv[1], f"rank{dist.rank}.json").write_text(json.dumps(out))
shutdown()
"""


@pytest.mark.slow
def test_two_gloo_ranks_only_rank_0_opens_images(tmp_path):
    root, run = tmp_path / "data", tmp_path / "run"
    tr, va, _ = _splits(root)
    for index in (tr, va):
        rows = [f"{p.relative_to(root)} {lab}" for p, lab in zip(index.paths, index.labels)]
        index.split_file.write_text("\n".join(rows) + "\n")
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    env = engine_env(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    over = ["data.format=split_files", f"data.root={root}", "data.train_split=train.txt", "data.val_split=val.txt",
            "data.verify_images=on", "data.on_bad_image=skip", "data.max_bad_images=0.5", "run.progress=false"]
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(tmp_path / "worker.py"), str(tmp_path), str(run), *over]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"].count("open") == 6 and r0["calls"].count("decode") == 3 and "stat" in r0["calls"]
    assert r1["calls"] == []  # no image opened, decoded or stat'ed by rank 1's screening
    assert r0["bad"] == r1["bad"] and len(r0["bad"]) == 2
    assert r0["sizes"] == r1["sizes"] == [5, 2, 2]
    assert (run / CACHE_NAME).is_file()
