"""`check_split` finds every broken file and line, reports counts, empty classes and shot groups."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import write_image, write_jpeg

from pipelines.check import check_split, format_check_report
from pipelines.splits import DataError


def test_check_finds_every_problem(tmp_path):
    rows = []
    modes = ["RGB", "L", "CMYK"]
    # class 0: 25 images (medium), class 1: 3 (few), class 2: empty, class 3: 101 tiny PNGs (many)
    for i in range(25):
        write_jpeg(tmp_path / f"c0/{i}.jpg", (16 + i, 20), modes[i % 3], seed=i)
        rows.append(f"c0/{i}.jpg 0")
    for i in range(3):
        write_jpeg(tmp_path / f"c1/{i}.jpg", (12, 30), seed=100 + i)
        rows.append(f"c1/{i}.jpg 1")
    for i in range(101):
        write_image(tmp_path / f"c3/{i}.png", (2, 2), "L", seed=i)
        rows.append(f"c3/{i}.png 3")
    # Broken files, each a different way:
    good = (tmp_path / "c0/0.jpg").read_bytes()
    (tmp_path / "c0/0.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "c0/1.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)  # corrupt header
    (tmp_path / "c1/0.jpg").write_bytes(b"")  # empty file
    (tmp_path / "c0/2.jpg").unlink()  # missing
    (tmp_path / "c3/folder.png").mkdir()  # a folder where an image should be
    rows.append("c3/folder.png 3")
    rows.insert(5, "no_label_here")  # bad line (line 6)
    rows.append("c0/3.jpg three")  # bad label
    rows.append("c0/4.jpg 7")  # out of range
    split = tmp_path / "train.txt"
    split.write_text("\n".join(rows) + "\n")

    r = check_split(split, tmp_path, num_classes=4)
    assert r["ok"] is False
    assert r["num_lines"] == len(rows) and r["num_images"] == len(rows) - 2
    assert [b["line"] for b in r["bad_lines"]] == [6, len(rows) - 1]
    assert r["out_of_range"] == [{"line": len(rows), "label": 7}]
    assert sorted(Path(m["path"]).name for m in r["missing"]) == ["2.jpg"]
    assert [Path(m["path"]).name for m in r["unreadable"]] == ["folder.png"]
    corrupt = sorted(Path(m["path"]).relative_to(tmp_path).as_posix() for m in r["corrupt"])
    assert corrupt == ["c0/0.jpg", "c0/1.jpg", "c1/0.jpg"]
    assert all(m["error"] for m in r["corrupt"])
    assert r["class_counts"] == [25, 3, 0, 102]  # parsed, in-range lines per class
    assert r["empty_classes"] == [2]
    assert r["shots"] == {"many": [3], "medium": [0], "few": [1, 2]}
    assert r["label_min"] == 0 and r["label_max"] == 7
    json.dumps(r)  # serialisable as is (for --json output)

    text = format_check_report(r)
    for needle in ("c0/0.jpg", "c0/1.jpg", "c1/0.jpg", "2.jpg", "folder.png", "line 6", "label 7", "class 2", "PROBLEMS FOUND"):
        assert needle in text, needle


def test_clean_split_is_ok_and_inferred_classes(tmp_path):
    rows = []
    for label in range(3):
        for i in range(2):
            write_jpeg(tmp_path / f"{label}_{i}.jpg", (10 + i, 9), seed=label * 10 + i)
            rows.append(f"{label}_{i}.jpg {label}")
    (tmp_path / "s.txt").write_text("\n".join(rows))
    r = check_split(tmp_path / "s.txt", tmp_path, many=1, few=1)
    assert r["ok"] and r["num_classes"] == 3 and r["class_counts"] == [2, 2, 2]
    assert r["shots"] == {"many": [0, 1, 2], "medium": [], "few": []}
    assert format_check_report(r).endswith("OK")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_permission_denied_is_unreadable(tmp_path):
    write_jpeg(tmp_path / "a.jpg", (8, 8))
    (tmp_path / "a.jpg").chmod(0)
    (tmp_path / "s.txt").write_text("a.jpg 0\n")
    try:
        r = check_split(tmp_path / "s.txt", tmp_path)
    finally:
        (tmp_path / "a.jpg").chmod(0o644)
    assert [Path(u["path"]).name for u in r["unreadable"]] == ["a.jpg"] and not r["ok"]


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="cannot read split file"):
        check_split(tmp_path / "nope.txt", tmp_path)
    (tmp_path / "s.txt").write_text("a.jpg 0\n")
    with pytest.raises(DataError, match="image root .* does not exist"):
        check_split(tmp_path / "s.txt", tmp_path / "missing_root")
    with pytest.raises(ValueError, match="few-shot threshold 50 is above"):
        check_split(tmp_path / "s.txt", tmp_path, many=10, few=50)


def test_a_non_utf8_line_is_a_bad_line_not_a_traceback(tmp_path, capsys):
    from engine.cli import main

    write_jpeg(tmp_path / "a.jpg", (8, 8))
    (tmp_path / "s.txt").write_bytes(b"a.jpg 0\ncaf\xe9.jpg 0\n")
    r = check_split(tmp_path / "s.txt", tmp_path)
    assert [(b["line"], b["error"]) for b in r["bad_lines"]] == [(2, "byte 0xe9 at column 4 is not UTF-8; expected UTF-8 text")]
    assert r["num_lines"] == 2 and not r["ok"]
    assert main(["data", "check", str(tmp_path / "s.txt"), "--root", str(tmp_path)]) == 1
    assert "line 2: byte 0xe9 at column 4 is not UTF-8" in capsys.readouterr().out


def test_split_is_found_under_root_as_train_finds_it(tmp_path, monkeypatch, capsys):
    """SPLIT: absolute, or relative to the current folder when it exists there (that wins), else under --root."""
    from engine.cli import main

    root = tmp_path / "root"
    write_jpeg(root / "a.jpg", (8, 8))
    (root / "train.txt").write_text("a.jpg 0\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["data", "check", "train.txt", "--root", str(root)]) == 0
    assert f"split {root / 'train.txt'} (root {root})" in capsys.readouterr().out
    (elsewhere / "train.txt").write_text("a.jpg 0\na.jpg 0\n")  # a duplicate: this one is checked, not root's
    assert main(["data", "check", "train.txt", "--root", str(root)]) == 1
    assert "split train.txt" in capsys.readouterr().out
    assert main(["data", "check", str(root / "train.txt"), "--root", str(root)]) == 0
    capsys.readouterr()
    assert main(["data", "check", "absent.txt", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"neither {elsewhere / 'absent.txt'} nor {root / 'absent.txt'} exists" in err and "Traceback" not in err
