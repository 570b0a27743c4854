"""Every bad input a user can give any command: one `engine <cmd>: error: …` line naming the key, flag or
file, exit code 2, no traceback, nothing left behind.

Most cases fail while the arguments or the config are parsed; the few that need a trained checkpoint
share one tiny run (trained once for the module). Each case is (command as named in the error line,
argv built from the fixtures, a text the error line must contain).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import write_image

import engine.train as train_mod
from engine.cli import main


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, digits_cache, trained):
    """Paths the cases refer to: the shared tiny trained checkpoint, a re-scaled one, bad files of every kind."""
    base = tmp_path_factory.mktemp("bad")
    run = trained
    ckpt = run / "last.pt"
    rescaled = base / "rescaled.pt"
    assert main(["rescale", "--checkpoint", str(ckpt), "--gamma", "0.5", "--save", str(rescaled)]) == 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    no_config = base / "no_config.pt"
    torch.save({k: v for k, v in state.items() if k != "config"}, no_config)
    no_counts = base / "no_counts.pt"
    torch.save({k: v for k, v in state.items() if k != "class_counts"}, no_counts)
    misfit = base / "misfit.pt"  # the weights of another architecture under this config
    torch.save({**state, "config": {**state["config"], "model": {**state["config"]["model"], "arch": "resnet20_cifar"}}},
               misfit)
    garbage = base / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    a_file = base / "a_file.txt"
    a_file.write_text("in the way\n")
    files = {
        "bad_yaml": "optim: {lr: [1\n",
        "list_yaml": "- method\n- ce\n",
        "tag_yaml": "method: !!python/object/apply:os.system ['touch pwned']\n",
        "unknown_yaml": "optim:\n  lrr: 0.1\n",
        "bad_metrics.json": "{not json",
        "other_metrics.json": json.dumps({"top1": 1.0}),
    }
    for name, text in files.items():
        (base / name).write_text(text)
    data = base / "data"  # a 3-class split_files folder with one bad split file per problem
    for c in range(3):
        for i in range(3):
            write_image(data / f"c{c}" / f"{i}.jpg", seed=10 * c + i)
    good = "".join(f"c{c}/{i}.jpg {c}\n" for c in range(3) for i in range(3))
    splits = {"train.txt": good, "noLabel.txt": "c0/0.jpg 0\nc0/1.jpg\n", "bigLabel.txt": good + "c0/2.jpg 7\n",
              "textLabel.txt": "c0/0.jpg zero\n", "emptyClass.txt": "c0/0.jpg 0\nc2/0.jpg 2\n",
              "escape.txt": good + "../../../../etc/passwd 0\n", "missing.txt": good + "c1/9.jpg 1\n"}
    for name, text in splits.items():
        (data / name).write_text(text)
    (data / "c1" / "2.jpg").write_bytes(b"not a jpeg")  # corrupt: in every split that lists it
    (data / "notUtf8.txt").write_bytes(good.encode() + b"c0/\xe9t\xe9.jpg 0\n")
    return SimpleNamespace(base=base, run=run, ckpt=ckpt, rescaled=rescaled, no_config=no_config, garbage=garbage,
                           no_counts=no_counts, misfit=misfit,
                           file=a_file, data=data, cache=digits_cache)


def _split(c, train: str, val: str = "train.txt") -> list[str]:
    return ["data.format=split_files", f"data.root={c.data}", f"data.train_split={train}", f"data.val_split={val}",
            "model.arch=resnet8_cifar", "epochs=1", "optim.warmup_epochs=0", "data.image_size=16", "run.progress=false"]


def _train(*overrides):
    return lambda c: ["train", "--out", str(c.base / "never"), *overrides]


def _ck(cmd, *args):
    return lambda c: [cmd, "--checkpoint", str(c.ckpt), *args]


# (error-line command, argv(ctx), text the line must name: str or callable(ctx))
CASES = {
    # --- bad values that would otherwise end in a traceback
    "eval.batch_size=0": ("train", _train("eval.batch_size=0"), "eval.batch_size"),
    "run.threads=-1": ("train", _train("run.threads=-1"), "run.threads"),
    "seed=-1": ("train", _train("seed=-1"), "'seed'"),
    "momentum=-1": ("train", _train("optim.momentum=-1"), "optim.momentum"),
    "weight_decay=-1": ("train", _train("optim.weight_decay=-1"), "optim.weight_decay"),
    "imbalance_ratio=200": ("train", _train("data.imbalance_ratio=200"), "data.imbalance_ratio"),
    "many_threshold=-5": ("train", _train("eval.many_threshold=-5"), "eval.many_threshold"),
    "ckpt-without-config": ("eval", lambda c: ["eval", "--checkpoint", str(c.no_config)], "'config'"),
    "ckpt-without-class-counts": ("eval", lambda c: ["eval", "--checkpoint", str(c.no_counts)], "'class_counts'"),
    "ckpt-weights-misfit-arch": ("eval", lambda c: ["eval", "--checkpoint", str(c.misfit)], "does not fit"),
    "rescale-sweep-inf": ("rescale", _ck("rescale", "--sweep", "0:inf:0.1"), "--sweep"),
    "rescale-sweep-nan": ("rescale", _ck("rescale", "--sweep", "0:nan:0.1"), "--sweep"),
    "rescale-gamma-nan": ("rescale", _ck("rescale", "--gamma", "nan"), "--gamma"),
    "rescale-gamma-inf": ("rescale", _ck("rescale", "--gamma", "inf"), "--gamma"),
    "rescale-out-is-file": ("rescale", lambda c: ["rescale", "--checkpoint", str(c.ckpt), "--gamma", "0",
                                                  "--out", str(c.file)], lambda c: str(c.file)),
    "calibrate-out-is-file": ("calibrate", lambda c: ["calibrate", "--checkpoint", str(c.ckpt), "--method", "rs",
                                                      "--out", str(c.file)], lambda c: str(c.file)),
    "data-check-num-classes-3": ("data check", lambda c: ["data", "check", str(c.data / "train.txt"), "--root",
                                                          str(c.data), "--num-classes", "-3"], "--num-classes"),
    # --- config: keys, types, files
    "unknown-key": ("train", _train("optim.lrr=0.1"), "optim.lrr"),
    "readme-data.dataset": ("train", _train("data.dataset=cifar10"), "data.dataset"),
    "wrong-type": ("train", _train("epochs=many"), "'epochs'"),
    "section-not-mapping": ("train", _train("optim=3"), "'optim'"),
    "override-no-equals": ("train", _train("optim.lr"), "optim.lr"),
    "override-empty-key": ("train", _train("=3"), "'=3'"),
    "override-bad-yaml": ("train", _train("optim.lr=[1"), "optim.lr"),
    "lr-inf": ("train", _train("optim.lr=.inf"), "optim.lr"),
    "lr-nan": ("train", _train("optim.lr=.nan"), "optim.lr"),
    "lr-0": ("train", _train("optim.lr=0"), "optim.lr"),
    "epochs-0": ("train", _train("epochs=0"), "'epochs'"),
    "unknown-method": ("train", _train("method=softmax"), "'method'"),
    "unknown-arch": ("train", _train("model.arch=resnet9000"), "model.arch"),
    "unknown-format": ("train", _train("data.format=coco"), "data.format"),
    "batch-0": ("train", _train("optim.batch_size=0"), "optim.batch_size"),
    "grad-accum-not-divisor": ("train", _train("optim.grad_accum=3"), "optim.batch_size"),
    "thresholds-unordered": ("train", _train("eval.few_threshold=50", "eval.many_threshold=10"), "eval.few_threshold"),
    "split-files-no-root": ("train", _train("data.format=split_files"), "data.root"),
    "split-files-no-train": ("train", _train("data.format=split_files", "data.root=/tmp"), "data.train_split"),
    "cb_beta-1": ("train", _train("loss.cb_beta=1"), "loss.cb_beta"),
    "milestone-past-end": ("train", _train("optim.schedule=multistep", "optim.milestones=[100]"), "optim.milestones"),
    "in-loop-rs-without-wvn": ("train", _train("method=ce", "rescale.in_loop=true"), "rescale.in_loop"),
    "std-0": ("train", _train("data.std=[0,1,1]"), "data.std"),
    "mean-2-values": ("train", _train("data.mean=[0.5,0.5]"), "data.mean"),
    "device-tpu": ("train", _train("run.device=tpu"), "run.device"),
    "on-bad-image": ("train", _train("data.on_bad_image=ignore"), "data.on_bad_image"),
    "max-bad-images-2": ("train", _train("data.max_bad_images=2"), "data.max_bad_images"),
    "image-size-4": ("train", _train("data.image_size=4"), "data.image_size"),
    "checkpoint-every-1": ("train", _train("run.checkpoint_every=-1"), "run.checkpoint_every"),
    "workers-1": ("train", _train("data.num_workers=-1"), "data.num_workers"),
    "smoothing-1": ("train", _train("loss.label_smoothing=1"), "loss.label_smoothing"),
    "rs-gamma-negative": ("train", _train("rescale.gamma=-1"), "rescale.gamma"),
    "unknown-preset": ("train", _train("--preset", "imagenet"), "'imagenet'"),
    "config-missing": ("train", lambda c: _train("--config", str(c.base / "none.yaml"))(c), "none.yaml"),
    "config-bad-yaml": ("train", lambda c: _train("--config", str(c.base / "bad_yaml"))(c), "bad_yaml"),
    "config-list": ("train", lambda c: _train("--config", str(c.base / "list_yaml"))(c), "list_yaml"),
    "config-python-tag": ("train", lambda c: _train("--config", str(c.base / "tag_yaml"))(c), "tag_yaml"),
    "config-unknown-key": ("train", lambda c: _train("--config", str(c.base / "unknown_yaml"))(c), "optim.lrr"),
    "resume-without-out": ("train", lambda c: ["train", "--resume"], "--out"),
    "train-unknown-flag": ("train", lambda c: ["train", "--epochs", "3"], "--epochs"),
    "out-given-twice": ("train", lambda c: ["train", "--out", str(c.base / "A"), "--out", str(c.base / "B")],
                        lambda c: f"--out given twice: '{c.base / 'A'}' and '{c.base / 'B'}'"),
    "preset-given-twice": ("train", lambda c: _train("--preset", "digits-lt", "--preset", "cifar10-lt-resnet32")(c),
                           "--preset given twice: 'digits-lt' and 'cifar10-lt-resnet32'"),
    "resume-value-not-auto": ("train", lambda c: _train("--resume", "later")(c), "'later'"),
    "eval-split-given-twice": ("eval", _ck("eval", "--split", "val", "--split", "test"),
                               "--split given twice: 'val' and 'test'"),
    # --- data: split files (fail while the data are read, before any run folder is written)
    "root-missing": ("train", lambda c: _train(*_split(c, "train.txt"), f"data.root={c.base / 'nowhere'}")(c),
                     "nowhere"),
    "split-file-missing": ("train", lambda c: _train(*_split(c, "absent.txt"))(c), "absent.txt"),
    "split-line-no-label": ("train", lambda c: _train(*_split(c, "noLabel.txt"))(c), "noLabel.txt:2"),
    "split-label-text": ("train", lambda c: _train(*_split(c, "textLabel.txt"))(c), "textLabel.txt:1"),
    "split-label-outside": ("train", lambda c: _train(*_split(c, "train.txt", "bigLabel.txt"))(c), "bigLabel.txt:10"),
    "split-class-empty": ("train", lambda c: _train(*_split(c, "emptyClass.txt", "emptyClass.txt"))(c), "classes [1]"),
    "split-path-escapes-root": ("train", lambda c: _train(*_split(c, "escape.txt"))(c), "etc/passwd"),
    "split-image-missing": ("train", lambda c: _train(*_split(c, "missing.txt"))(c), "c1/9.jpg"),
    "split-image-corrupt": ("train", lambda c: _train(*_split(c, "train.txt"))(c), "c1/2.jpg"),
    "split-not-utf8": ("train", lambda c: _train(*_split(c, "notUtf8.txt"))(c), "notUtf8.txt:10: byte 0xe9"),
    "split-train-label-above-eval": ("train", lambda c: _train(*_split(c, "bigLabel.txt", "train.txt"))(c),
                                     "bigLabel.txt:10: label 7"),
    # --- eval (the checkpoint side; the command is another helper's)
    "eval-missing": ("eval", lambda c: ["eval", "--checkpoint", str(c.base / "none.pt")], "none.pt"),
    "eval-garbage": ("eval", lambda c: ["eval", "--checkpoint", str(c.garbage)], "garbage.pt"),
    "eval-split-train": ("eval", _ck("eval", "--split", "train"), "--split"),
    "eval-no-checkpoint": ("eval", lambda c: ["eval"], "--checkpoint"),
    # --- calibrate
    "calibrate-unknown-method": ("calibrate", _ck("calibrate", "--method", "platt"), "--method"),
    "calibrate-crt-with-sweep": ("calibrate", _ck("calibrate", "--method", "crt", "--sweep", "0:1:0.1"), "--sweep"),
    "calibrate-sweep-inf": ("calibrate", _ck("calibrate", "--method", "tau_norm", "--sweep", "0:inf:0.1"), "--sweep"),
    "calibrate-sweep-reversed": ("calibrate", _ck("calibrate", "--method", "rs", "--sweep", "1:0:0.1"), "--sweep"),
    "calibrate-sweep-two-parts": ("calibrate", _ck("calibrate", "--method", "rs", "--sweep", "0:1"), "--sweep"),
    "calibrate-sweep-step-0": ("calibrate", _ck("calibrate", "--method", "rs", "--sweep", "0:1:0"), "--sweep"),
    "calibrate-sweep-huge": ("calibrate", _ck("calibrate", "--method", "rs", "--sweep", "0:1:1e-9"), "--sweep"),
    "calibrate-epochs-0": ("calibrate", _ck("calibrate", "--method", "crt", "--epochs", "0"), "--epochs"),
    "calibrate-lr-negative": ("calibrate", _ck("calibrate", "--method", "lws", "--lr", "-1"), "--lr"),
    "calibrate-lr-nan": ("calibrate", _ck("calibrate", "--method", "lws", "--lr", "nan"), "--lr"),
    "calibrate-batch-0": ("calibrate", _ck("calibrate", "--method", "crt", "--batch-size", "0"), "--batch-size"),
    "calibrate-seed-negative": ("calibrate", _ck("calibrate", "--method", "crt", "--seed", "-1"), "--seed"),
    "calibrate-counts-not-rs": ("calibrate", _ck("calibrate", "--method", "tau_norm", "--counts", "profile"),
                                "--counts"),
    "calibrate-missing-ckpt": ("calibrate", lambda c: ["calibrate", "--checkpoint", str(c.base / "none.pt"),
                                                       "--method", "rs"], "none.pt"),
    "calibrate-rescaled-ckpt": ("calibrate", lambda c: ["calibrate", "--checkpoint", str(c.rescaled), "--method",
                                                        "tau_norm"], "rescaled.pt"),
    "calibrate-counts-unknown": ("calibrate", _ck("calibrate", "--method", "rs", "--counts", "bogus"), "--counts"),
    # --- rescale
    "rescale-gamma-negative": ("rescale", _ck("rescale", "--gamma", "-1"), "--gamma"),
    "rescale-gamma-text": ("rescale", _ck("rescale", "--gamma", "half"), "--gamma"),
    "rescale-gamma-and-sweep": ("rescale", _ck("rescale", "--gamma", "0", "--sweep", "0:1:0.5"), "--sweep"),
    "rescale-neither": ("rescale", _ck("rescale"), "--gamma"),
    "rescale-save-without-gamma": ("rescale", _ck("rescale", "--sweep", "0:1:0.5", "--save", "x.pt"), "--save"),
    "rescale-save-is-folder": ("rescale", lambda c: _ck("rescale", "--gamma", "0.5", "--save", str(c.base))(c),
                               lambda c: str(c.base)),
    "rescale-twice": ("rescale", lambda c: ["rescale", "--checkpoint", str(c.rescaled), "--gamma", "0.5"],
                      "rescaled.pt"),
    "rescale-sweep-negative": ("rescale", _ck("rescale", "--sweep", "-1:1:0.5"), "--sweep"),
    # --- sweep
    "sweep-seeds-text": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--seeds", "a,b"], "--seeds"),
    "sweep-seeds-empty": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--seeds", ""], "--seeds"),
    "sweep-seeds-negative": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--seeds", "-1"], "seed"),
    "sweep-seeds-repeated": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--seeds", "0,0"], "--seeds"),
    "sweep-grid-no-equals": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--grid", "method"], "--grid"),
    "sweep-grid-empty-value": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--grid", "method=ce,"],
                               "--grid"),
    "sweep-grid-bad-value": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--grid", "method=ce,xx"],
                             "'method'"),
    "sweep-grid-unknown-key": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--grid", "optim.lrr=1,2"],
                               "optim.lrr"),
    "sweep-grid-repeated-key": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--grid", "method=ce",
                                                    "--grid", "method=wvn"], "--grid"),
    "sweep-jobs-0": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--jobs", "0"], "--jobs"),
    "sweep-select-by-unknown": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--grid", "method=ce",
                                                    "--select-by", "optim.lr"], "--select-by"),
    "sweep-preset-unknown": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "--preset", "nope"], "'nope'"),
    "sweep-out-is-file": ("sweep", lambda c: ["sweep", "--out", str(c.file)], lambda c: str(c.file)),
    "sweep-bad-override": ("sweep", lambda c: ["sweep", "--out", str(c.base / "sw"), "optim.lr=-1"], "optim.lr"),
    "sweep-no-out": ("sweep", lambda c: ["sweep"], "--out"),
    # --- study
    "study-seeds-text": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--seeds", "x"], "--seeds"),
    "study-ratios-text": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--ratios", "a"], "--ratios"),
    "study-ratio-below-1": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--ratios", "0.5"],
                            "data.imbalance_ratio"),
    "study-profile-unknown": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--profiles", "linear"],
                              "data.imbalance_profile"),
    "study-cifar-without-root": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--format", "cifar10_lt"],
                                 "--root"),
    "study-epochs-0": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--epochs", "0"], "epochs"),
    "study-image-size-0": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--image-size", "0"],
                           "image_size"),
    "study-jobs-0": ("study", lambda c: ["study", "--out", str(c.base / "st"), "--jobs", "0"], "--jobs"),
    "study-out-is-file": ("study", lambda c: ["study", "--out", str(c.file)], lambda c: str(c.file)),
    "study-format-unknown": ("study", lambda c: ["study", "--format", "mnist"], "--format"),
    # --- compare
    "compare-missing-run": ("compare", lambda c: ["compare", str(c.base / "nowhere")], "nowhere"),
    "compare-not-a-run": ("compare", lambda c: ["compare", str(c.data)], lambda c: str(c.data)),
    "compare-bad-json": ("compare", lambda c: ["compare", str(c.base / "bad_metrics.json")], "bad_metrics.json"),
    "compare-other-json": ("compare", lambda c: ["compare", str(c.base / "other_metrics.json")], "other_metrics.json"),
    "compare-out-is-file": ("compare", lambda c: ["compare", str(c.run), "--out", str(c.file)], lambda c: str(c.file)),
    "compare-no-runs": ("compare", lambda c: ["compare"], "runs"),
    # --- data check
    "data-check-split-missing": ("data check", lambda c: ["data", "check", str(c.base / "absent.txt"), "--root",
                                                          str(c.data)], "absent.txt"),
    "data-check-split-nowhere": ("data check", lambda c: ["data", "check", "absent.txt", "--root", str(c.data)],
                                 lambda c: str(c.data / "absent.txt")),
    "data-check-root-missing": ("data check", lambda c: ["data", "check", str(c.data / "train.txt"), "--root",
                                                         str(c.base / "nowhere")], "nowhere"),
    "data-check-jobs-0": ("data check", lambda c: ["data", "check", str(c.data / "train.txt"), "--root", str(c.data),
                                                   "--jobs", "0"], "--jobs"),
    "data-check-few-above-many": ("data check", lambda c: ["data", "check", str(c.data / "train.txt"), "--root",
                                                           str(c.data), "--many", "5", "--few", "50"], "--few"),
    "data-check-bad-list-is-folder": ("data check", lambda c: ["data", "check", str(c.data / "train.txt"), "--root",
                                                               str(c.data), "--bad-list", str(c.base)],
                                      lambda c: str(c.base)),
    "data-check-no-root": ("data check", lambda c: ["data", "check", str(c.data / "train.txt")], "--root"),
    "data-no-subcommand": ("data", lambda c: ["data"], "check"),
    # --- engine status
    "status-no-run-dir": ("status", lambda c: ["status"], "RUN_DIR"),
    "status-not-a-run-folder": ("status", lambda c: ["status", str(c.data)], lambda c: str(c.data)),
    "status-file-not-folder": ("status", lambda c: ["status", str(c.file)], lambda c: str(c.file)),
    # --- the command itself
    "unknown-command": ("", lambda c: ["fly"], "'fly'"),
    "no-command": ("", lambda c: [], "command"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, ctx, capsys, monkeypatch):
    cmd, argv, needle = CASES[name]
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: pytest.fail(f"{name}: training started"))
    argv = argv(ctx)
    needle = needle(ctx) if callable(needle) else needle
    before = sorted(p.name for p in ctx.base.iterdir())
    code = main(argv)
    out, err = capsys.readouterr()
    prefix = f"engine {cmd}: error: " if cmd else "engine: error: "
    assert code == 2, f"exit {code} for {argv}\nstderr:\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith(prefix), err
    assert needle in errors[0], f"{needle!r} not named in: {errors[0]}"
    assert sorted(p.name for p in ctx.base.iterdir()) == before, "a failed command left files behind"
    assert not out  # a failed command prints no result


class _Paths:
    """A stand-in for `ctx`: every attribute is a distinct path, enough to build each case's argv."""

    def __getattr__(self, name: str) -> Path:
        return Path("/ctx") / name


def test_every_command_has_cases_and_each_case_runs_the_command_it_names():
    """Every `engine` command and `engine data check` has bad-input cases, and each case's argv starts with the
    command whose error prefix it expects (a case filed under the wrong command would test nothing it claims)."""
    from engine.cli import COMMANDS

    named = {cmd for cmd, _, _ in CASES.values()}
    missing = (set(COMMANDS) | {"data check", ""}) - named
    assert not missing, f"no bad-input case for: {sorted(missing)}"
    for name, (cmd, argv, needle) in CASES.items():
        words = argv(_Paths())
        if cmd:
            assert words[:len(cmd.split())] == cmd.split(), f"{name}: filed under {cmd!r}, runs {words[:2]}"
        else:
            assert not words or words[0] not in COMMANDS, f"{name}: filed under no command, runs {words[0]!r}"
        assert needle(_Paths()) if callable(needle) else needle, f"{name}: empty text to look for"



# ----------------------------------------------------------------------------- post-hoc on a read-only folder


def _read_only(monkeypatch, folder):
    """Simulate a read-only `folder` (we run as root: chmod would not stop us): common.io's temp file there fails
    with EROFS, as the kernel's would; every other folder stays writable."""
    import errno
    import tempfile
    from types import SimpleNamespace

    import common.io

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve() == Path(folder).resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return tempfile.mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(common.io, "tempfile", SimpleNamespace(mkstemp=mkstemp))


@pytest.mark.parametrize("argv,written", [
    (["calibrate", "--method", "tau_norm", "--sweep", "0:1:0.5"], "calibrate_tau_norm.json"),
    (["rescale", "--gamma", "0.5"], "calibrate_rs.json"),
])
def test_posthoc_prints_its_result_before_a_read_only_folder_fails(argv, written, ctx, capsys, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in ctx.run.iterdir()}
    _read_only(monkeypatch, ctx.run)
    code = main([argv[0], "--checkpoint", str(ctx.ckpt), *argv[1:]])
    out, err = capsys.readouterr()
    assert code == 1, err  # StorageError.exit_code
    assert "test before" in out and "chosen" in out  # the result, printed before the write was tried
    line = err.strip()
    assert line == f"engine {argv[0]}: error: cannot write {ctx.run / written}: Read-only file system (EROFS)", err
    assert {p.name: p.stat().st_mtime_ns for p in ctx.run.iterdir()} == before

    # --out DIR: the same command writes there instead, the checkpoint's folder is left alone.
    elsewhere = ctx.base.parent / f"out-{argv[0]}"
    assert main([argv[0], "--checkpoint", str(ctx.ckpt), *argv[1:], "--out", str(elsewhere)]) == 0
    out = capsys.readouterr().out
    assert json.loads((elsewhere / written).read_text())["checkpoint"] == str(ctx.ckpt)
    assert (elsewhere / written.replace(".json", ".png")).stat().st_size > 0
    assert f"written: {elsewhere / written}" in out
    assert {p.name: p.stat().st_mtime_ns for p in ctx.run.iterdir()} == before


# ----------------------------------------------------------------------------- README examples cannot drift

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("data", "model", "loss", "optim", "rescale", "eval", "run")


def test_readme_config_keys_exist_and_examples_parse(tmp_path):
    """Every config key the README names exists; every `engine train|sweep … key=value` line and every
    ```yaml block parses with load_config (the key, the type and the value checks)."""
    from engine.config import DEFAULT_PRESET, Config, flatten, load_config, to_dict

    text = README.read_text()
    known = set(flatten(to_dict(Config())))
    named = set(re.findall(rf"(?<![\w/.-])((?:{'|'.join(SECTIONS)})\.[a-z_]+)\b(?![./(])", text))
    assert named and not named - known, f"README names config keys that do not exist: {sorted(named - known)}"
    commands = [line for line in text.splitlines() if re.search(r"engine(\.cli)? (train|sweep)\b", line)]
    checked = 0
    for line in commands:
        words = line.replace("`", " ").split()
        preset = words[words.index("--preset") + 1] if "--preset" in words else DEFAULT_PRESET
        overrides, grid = [], []
        for prev, word in zip(["", *words], words):
            key = word.split("=", 1)[0]
            if "=" not in word or not (key in {"method", "seed", "epochs"} or key.split(".")[0] in SECTIONS):
                continue
            (grid if prev == "--grid" else overrides).append(word)
        if "data.format=split_files" in overrides:
            overrides.append("data.root=/data")  # the example gives it; validation only needs it non-empty
        for g in grid or [""]:
            key, _, values = g.partition("=")
            for value in values.split(",") if g else [None]:
                load_config(preset, None, [*overrides, *([f"{key}={value}"] if g else [])])
                checked += 1
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme{i}.yaml"
        path.write_text("\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines()))
        load_config(DEFAULT_PRESET, path)
    assert checked >= 3 and blocks, (checked, len(blocks))
