"""`engine train | eval | rescale | sweep` end to end on CPU, and every bad input the CLI must catch."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny, write_image

from engine.checkpoint import load_checkpoint
from engine.cli import main
from engine.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(trained, capsys):
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "metrics.json", "curves.png", "per_class.png", "offsets.png",
                 "train.log"):
        assert (trained / name).is_file() and (trained / name).stat().st_size > 0, name
    log = (trained / "train.log").read_text()
    assert "epoch 1/2  loss" in log and "epoch 2/2  loss" in log  # every epoch, even with run.progress=false
    assert not list(trained.glob(".*tmp"))  # no temp files left behind
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class"):
        assert key in metrics
    assert len(metrics["per_class"]) == 10 and metrics["method"] == "ce" and metrics["seed"] == 0
    assert metrics["class_counts"] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    per_class = metrics["per_class"]
    assert metrics["top1"] == pytest.approx(sum(per_class) / 10)  # balanced test split
    # many: n > 20 (classes 0, 1); few: n < 5 (classes 8, 9)
    assert metrics["many"] == pytest.approx((per_class[0] + per_class[1]) / 2)
    assert metrics["few"] == pytest.approx((per_class[8] + per_class[9]) / 2)
    log = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in log)
    saved = load_config(None, trained / "config.yaml")
    assert saved.method == "ce" and saved.model.arch == "resnet8_cifar"
    assert load_checkpoint(trained / "last.pt")["epoch"] == 2  # the epoch to continue: training is complete


@pytest.mark.slow
def test_eval_reproduces_the_final_test_metrics(trained):
    assert main(["eval", "--checkpoint", str(trained / "last.pt")]) == 0
    metrics = json.loads((trained / "metrics.json").read_text())
    ev = json.loads((trained / "eval_test.json").read_text())
    assert ev["top1"] == pytest.approx(metrics["top1"]) and ev["per_class"] == pytest.approx(metrics["per_class"])


@pytest.mark.slow
def test_rescale_gamma_and_sweep(trained, tmp_path):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert main(["rescale", "--checkpoint", str(trained / "last.pt"), "--gamma", "0"]) == 0
    one = json.loads((trained / "calibrate_rs.json").read_text())  # engine rescale = engine calibrate --method rs
    assert one["chosen"] == 0 and one["test"]["top1"] == pytest.approx(metrics["top1"])

    saved = tmp_path / "rs.pt"
    assert main(["rescale", "--checkpoint", str(trained / "last.pt"), "--gamma", "0.5", "--save", str(saved)]) == 0
    w0 = load_checkpoint(trained / "last.pt")["model"]["head.weight"]
    w1 = load_checkpoint(saved)["model"]["head.weight"]
    counts = torch.tensor(metrics["class_counts"], dtype=torch.float64)
    torch.testing.assert_close(w1, w0 * ((counts.max() / counts) ** 0.5).float()[:, None])

    assert main(["rescale", "--checkpoint", str(trained / "last.pt"), "--sweep", "0:1:0.25"]) == 0
    sweep = json.loads((trained / "calibrate_rs.json").read_text())
    assert [r["gamma"] for r in sweep["rows"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    best = max(sweep["rows"], key=lambda r: (r["val"]["top1"], -r["gamma"]))
    assert sweep["method"] == "rs" and sweep["parameter"] == "gamma" and sweep["chosen"] == best["gamma"]
    assert (trained / "calibrate_rs.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_refuses_a_changed_config(trained_copy, capsys):
    args = [a for a in tiny("x") if not a.startswith("data.cache_dir")]
    cache = load_config(None, trained_copy / "config.yaml").data.cache_dir
    before = (trained_copy / "last.pt").read_bytes()
    assert main(["train", "--out", str(trained_copy), "--resume", f"data.cache_dir={cache}", *args, "method=eo"]) == 2
    assert "config differs" in capsys.readouterr().err
    assert (trained_copy / "last.pt").read_bytes() == before


# ----------------------------------------------------------------------------- bad input


def _run_bad(args, capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "a failed start must not leave a run folder"
    return err


@pytest.mark.parametrize("argv, method, seed", [
    (["method=ce", "--resume", "auto", "seed=3"], "ce", 3),  # overrides before and after the flag and its value
    (["--resume", "auto", "method=ce", "--out", "X", "seed=3"], "ce", 3),
    (["method=eo", "seed=1", "--resume", "method=ce", "seed=3"], "ce", 3),  # a bare --resume leaves the override
])
def test_overrides_go_before_or_after_resume_in_their_order(argv, method, seed, capsys):
    assert main(["train", "--print-config", *argv]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["method"], cfg["seed"]) == (method, seed)


def test_unknown_key_and_wrong_type(capsys, tmp_path):
    assert "unknown config key 'optim.lrr'" in _run_bad(["optim.lrr=0.1"], capsys, tmp_path)
    assert "config key 'epochs' expects an integer, got 'many'" in _run_bad(["epochs=many"], capsys, tmp_path)
    assert "unknown preset 'imagenet'" in _run_bad(["--preset", "imagenet"], capsys, tmp_path)


@pytest.fixture
def split_root(tmp_path):
    """A 3-class image folder with train/val/test split files in the ImageNet-LT format."""
    root = tmp_path / "data"
    for c in range(3):
        for i in range(4):
            write_image(root / f"c{c}" / f"{i}.jpg", seed=10 * c + i)
    rows = "".join(f"c{c}/{i}.jpg {c}\n" for c in range(3) for i in range(4))
    for name in ("train", "val", "test"):
        (root / f"{name}.txt").write_text(rows)
    return root


def _split_args(root):
    return ["data.format=split_files", f"data.root={root}", "data.train_split=train.txt", "data.val_split=val.txt",
            "data.test_split=test.txt", "model.arch=resnet8_cifar", "epochs=1", "data.image_size=16",
            "optim.warmup_epochs=0", "run.progress=false", "optim.batch_size=4"]


@pytest.mark.slow
def test_split_files_dataset_trains(split_root, tmp_path):
    out = tmp_path / "ok"
    assert main(["train", "--out", str(out), *_split_args(split_root), "method=ce"]) == 0
    assert json.loads((out / "metrics.json").read_text())["class_counts"] == [4, 4, 4]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda r: (r / "c1" / "2.jpg").unlink(), r"train.txt: 1 of 12 images are missing, e.g. .*c1/2.jpg \(line 7\)"),
        (lambda r: (r / "train.txt").write_text("c0/0.jpg 0\nc0/1.jpg\n"), r"train.txt:2: expected 'relative/path label'"),
        (lambda r: (r / "val.txt").write_text("c0/0.jpg 0\nc0/1.jpg 7\n"), r"val.txt:2: label 7 is outside \[0, 2\]"),
        (lambda r: (r / "train.txt").write_text("c0/0.jpg 0\nc2/0.jpg 2\n"), r"1 of 3 classes have no images \(classes \[1\]\)"),
    ],
)
def test_bad_split_files(split_root, edit, match, capsys, tmp_path):
    edit(split_root)
    err = _run_bad(_split_args(split_root), capsys, tmp_path)
    assert re.search(match, err), err


def test_empty_or_missing_data_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in _run_bad(_split_args(empty), capsys, tmp_path)
    assert "does not exist" in _run_bad(_split_args(tmp_path / "nowhere"), capsys, tmp_path)


def test_corrupt_image_names_the_file(split_root, tmp_path, capsys):
    (split_root / "c2" / "3.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *_split_args(split_root)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {split_root / 'c2' / '3.jpg'}" in err, err
    assert not out.exists()  # met before the first checkpoint: nothing left behind


@pytest.mark.slow
def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path, digits_cache, monkeypatch, capsys):
    from engine.heads import Head

    real_loss, calls = Head.loss, []

    def loss_turns_nan(self, features, labels):
        calls.append(1)
        out = real_loss(self, features, labels)
        return out * float("nan") if len(calls) == 9 else out  # 118 images / 16 → 7 steps an epoch

    monkeypatch.setattr(Head, "loss", loss_turns_nan)
    out = tmp_path / "nan"
    code = main(["train", "--out", str(out), *tiny(digits_cache), "optim.batch_size=16"])
    err = capsys.readouterr().err
    assert code == 1 and "loss is nan at epoch 2, step 8" in err and "last complete checkpoint" in err, err
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # epoch 1's checkpoint, intact
    assert not (out / "metrics.json").exists()

    # NaN before the first checkpoint: training had started, so the folder stays (status failed, no last.pt).
    calls.clear()
    monkeypatch.setattr(Head, "loss", lambda self, f, y: real_loss(self, f, y) * float("nan"))
    out2 = tmp_path / "nan2"
    assert main(["train", "--out", str(out2), *tiny(digits_cache)]) == 1
    assert "loss is nan at epoch 1, step 0" in capsys.readouterr().err and not (out2 / "last.pt").exists()
    assert json.loads((out2 / "status.json").read_text())["state"] == "failed"


@pytest.mark.slow
def test_existing_run_folder_is_not_overwritten(trained_copy, digits_cache, capsys):
    before = {p.name: p.read_bytes() for p in trained_copy.iterdir() if p.is_file()}
    assert main(["train", "--out", str(trained_copy), *tiny(digits_cache)]) == 1
    assert "already holds files" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in trained_copy.iterdir() if p.is_file()} == before


def test_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_chooses_on_validation(tmp_path, digits_cache):
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "--seeds", "0,1", "--grid", "method=ce,wvn",
                 *tiny(digits_cache), "epochs=1", "eval.diagnostics=false"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert set(summary["chosen"]) == {"ce", "wvn"}
    ce = next(p for p in summary["points"] if p["point"] == {"method": "ce"})
    runs = [json.loads((out / "method-ce" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert ce["test"]["top1"]["mean"] == pytest.approx(sum(r["top1"] for r in runs) / 2)
    assert "| method-ce" in (out / "sweep.md").read_text()


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = [b.split("```")[0].strip() for b in readme.split("```bash")[1:]]
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd in ci, f"README test command not found verbatim in .ci/run:\n{test_cmd}"


@pytest.mark.slow  # a child process importing torch
def test_engine_entry_point_runs():
    exe = Path(sys.executable).parent / "engine"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.cli"]
    out = subprocess.run([*cmd, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--preset" in out.stdout


def test_data_check_finds_every_problem(split_root, capsys):
    (split_root / "c1" / "0.jpg").write_bytes(b"corrupt")
    (split_root / "c2" / "1.jpg").unlink()
    split = split_root / "check.txt"
    split.write_text((split_root / "train.txt").read_text() + "c0/0.jpg nine\n")
    assert main(["data", "check", str(split), "--root", str(split_root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"]
    text = json.dumps(report)
    assert "c1/0.jpg" in text and "c2/1.jpg" in text and "nine" in text
    assert main(["data", "check", str(split_root / "val.txt"), "--root", str(split_root)]) == 1  # c1/0.jpg corrupt there too
    (split_root / "c1" / "0.jpg").unlink()
    write_image(split_root / "c1" / "0.jpg", (5, 5))
    write_image(split_root / "c2" / "1.jpg", (5, 5))
    assert main(["data", "check", str(split_root / "train.txt"), "--root", str(split_root)]) == 0
