"""Command line: `engine train | eval | rescale | sweep | calibrate | compare | study | data check`.

    engine train [--preset NAME] [--config FILE] [--out DIR] [--resume [auto]] [--print-config] [key=value ...]
    engine eval --checkpoint PATH [--split test|val] [--out DIR] [dotted.key=value ...]
    engine rescale --checkpoint PATH --gamma G          (post-hoc RS, one γ)
    engine rescale --checkpoint PATH --sweep 0:1:0.1    (γ chosen on val, reported on test)
    engine sweep --out DIR --grid method=ce,eo_uc --seeds 0,1,2 [key=value ...]
    engine data check SPLIT --root DIR [--num-classes N] [--json]
    engine calibrate --checkpoint PATH --method {rs,tau_norm,logit_adjust,crt,lws} [--sweep A:B:S] [--epochs N]
    engine compare RUN... [--out DIR]
    engine study [--out docs/study] [--seeds 0,1,2] [--ratios 10,50,100] [--profiles exp,step] [key=value ...]
    engine study --suite baselines [--out docs/baselines] [--splits exp-if50,...] [--methods ce,...] [key=value ...]
    engine study --suite order [--out docs/order] [--seeds 0,1,2] [key=value ...]
    engine status RUN_DIR [--json]                      (exit 0 finished, 75 preempted, 1 failed/dead, 3 running)

Each command parses its arguments and calls one function; what it prints is the command's output
(progress and notes go through `logging`, set up once here). Every `EngineError` prints one clear
line and exits with its `exit_code` (2: bad input — config, data, checkpoint; 1: training stopped);
`engine train` exits 75 when a SIGTERM/SIGUSR1 stopped it with a checkpoint (requeue with --resume auto);
`engine status RUN_DIR` says the same from the run folder, whatever exit code a launcher made of it.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import shlex
import sys
from pathlib import Path

from common.errors import ConfigError, EngineError, StorageError
from common.io import check_folder
from engine.config import DEFAULT_PRESET, RS_COUNTS, available_presets, load_config
from engine.experiments.study_design import BASELINE_SPLITS
from engine.experiments.study_design import PRESETS as STUDY_PRESETS
from engine.experiments.study_design import SUITES as STUDY_SUITES
from engine.logs import launch_rank, setup_logging
from engine.posthoc import CALIBRATIONS, SWEEPS, inclusive_range


class _StoreOnce(argparse.Action):
    """A single-valued flag's store: the flag given twice is an error naming both values (no silent last wins)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.given: list = []

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string is not None and self.given:
            parser.error(f"{option_string} given twice: {self.given[0]!r} and {values!r}; give it once")
        if option_string is not None:
            self.given.append(values)
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse with the engine's one-line error (`engine <cmd>: error: …`, exit 2) instead of usage + error,
    and single-valued flags that may be given once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _bare_resume(argv: list[str]) -> list[str]:
    """`--resume` followed by a key=value is the flag without a value, then an override (argparse would
    take the override as the flag's optional value)."""
    return ["--resume=yes" if arg == "--resume" and "=" in next_arg else arg
            for arg, next_arg in zip(argv, [*argv[1:], ""], strict=False)]


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="engine", description="Long-tailed image recognition training engine")
    sub = p.add_subparsers(dest="command", metavar="command", required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the embedded Digits-LT default)")
    t.add_argument("--preset", default=None, help=f"preset name (default {DEFAULT_PRESET}; {', '.join(available_presets())})")
    t.add_argument("--config", default=None, help="YAML file applied after the preset")
    t.add_argument("--out", default=None, help="run folder (default runs/<method>-<time>-s<seed>-<4 hex>)")
    t.add_argument("--resume", nargs="?", const="yes", default=None, metavar="auto",
                   help="continue the run in --out from its last.pt; `--resume auto`: continue when last.pt "
                        "exists, start fresh otherwise (job scripts that are requeued)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML, the values in use noted (the scaled lr), and exit")
    t.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. method=ce optim.lr=0.05")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its test (or val) split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--out", default=None, help="folder for eval_<split>.json (default: the checkpoint's folder)")
    e.add_argument("overrides", nargs="*", help="dotted.key=value on the checkpoint's config that leave the model as "
                                                "trained, e.g. data.root=/new/place eval.batch_size=512")

    st = sub.add_parser("status", help="how a run stands (status.json): exit 0 finished, 75 preempted, 1 failed "
                                       "or dead, 3 running")
    st.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (engine train --out)")
    st.add_argument("--json", action="store_true", help="print the status as JSON (with exit_code and summary)")

    _add_posthoc(sub)
    _add_experiments(sub)
    _add_data(sub)
    return p


def _add_posthoc(sub) -> None:
    r = sub.add_parser("rescale", help="post-hoc re-scaling w_i ← (n_1/n_i)^γ w_i (= engine calibrate --method rs)")
    r.add_argument("--checkpoint", required=True)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--gamma", type=float, help="one γ: report val and test")
    g.add_argument("--sweep", help="START:STOP:STEP (inclusive), γ chosen on val, e.g. 0:1:0.1")
    r.add_argument("--save", default=None, help="with --gamma: write the re-scaled checkpoint here")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="folder for calibrate_rs.json / .png (default: the checkpoint's folder)")
    r.add_argument("--counts", choices=RS_COUNTS, default=None,
                   help="n_i of RS: observed training counts, or the un-rounded profile n_max·IF^(−i/(C−1)) of the "
                        "official AdjustBnd4Imbalance code (default: the run's rescale.counts)")
    c = sub.add_parser("calibrate", help="post-hoc calibration of a checkpoint, chosen on val, reported on test")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--method", required=True, choices=CALIBRATIONS)
    c.add_argument("--sweep", default=None,
                   help="rs/tau_norm/logit_adjust: START:STOP:STEP (default 0:1:0.05 for rs, 0:2:0.1)")
    c.add_argument("--epochs", type=int, default=10, help="crt/lws: epochs on the collected training features")
    c.add_argument("--lr", type=float, default=0.1, help="crt/lws: SGD learning rate (cosine schedule)")
    c.add_argument("--batch-size", type=int, default=128, help="crt/lws: class-aware batch size")
    c.add_argument("--seed", type=int, default=0, help="crt/lws: init and sampling seed")
    c.add_argument("--counts", choices=RS_COUNTS, default=None,
                   help="rs: n_k observed or the un-rounded long-tailed profile (default: the run's rescale.counts)")
    c.add_argument("--out", default=None, metavar="DIR",
                   help="folder for calibrate_<method>.json / .png (default: the checkpoint's folder)")


def _add_experiments(sub) -> None:
    s = sub.add_parser("sweep", help="train a grid × seeds, choose on val, report test (mean ± std)")
    s.add_argument("--out", required=True,
                   help="sweep folder (finished runs with the same config are re-used, unfinished ones resumed)")
    s.add_argument("--preset", default=DEFAULT_PRESET)
    s.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    s.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable)")
    s.add_argument("--select-by", default=None,
                   help="grid key whose values each get their own choice (default: method; without a method "
                        "grid: one choice over all points)")
    s.add_argument("--jobs", type=int, default=1, help="training processes in parallel")
    s.add_argument("overrides", nargs="*", help="dotted.key=value applied to every run")

    st = sub.add_parser("study", help="the papers' ablation study + claims check (--suite ablation), or every "
                        "baseline tuned on val against EO+UC (--suite baselines), or the ablation order across "
                        "scale (--suite order)")
    st.add_argument("--suite", default="ablation", choices=STUDY_SUITES,
                    help="ablation: the papers' methods × ratios × profiles; baselines: every method's grid × splits; "
                    "order: ce / eo / uc_only / eo_uc along depth, width, feature dim, data size, IF, λ1")
    st.add_argument("--out", default=None, help="study folder (runs under OUT/runs are re-used; default "
                    "docs/study, docs/baselines or docs/order for those suites)")
    st.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    st.add_argument("--ratios", default=None, help="ablation: comma-separated imbalance ratios (default 10,50,100)")
    st.add_argument("--profiles", default=None, help="ablation: comma-separated imbalance profiles (default exp,step)")
    st.add_argument("--splits", default=None, help="baselines: comma-separated PROFILE-ifRATIO "
                    "(default exp-if50,exp-if100,step-if10)")
    st.add_argument("--methods", default=None, help="baselines: comma-separated table rows (default: all; a post-hoc "
                    "row trains its base method too)")
    st.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: the study's recipe)")
    st.add_argument("--arch", default=None, help="model.arch (default: the study's recipe)")
    st.add_argument("--image-size", type=int, default=None, help="data.image_size (default: the study's recipe)")
    st.add_argument("--format", default="digits_lt", choices=tuple(STUDY_PRESETS),
                    help="data set (cifar*_lt: give --root with the CIFAR python pickles)")
    st.add_argument("--root", default="", help="data.root for --format cifar10_lt / cifar100_lt")
    st.add_argument("--jobs", type=int, default=1, help="training processes in parallel (1 torch thread each)")
    st.add_argument("overrides", nargs="*", help="dotted.key=value applied to every run")

    m = sub.add_parser("compare", help="many/medium/few/all table and plot across run folders")
    m.add_argument("runs", nargs="+", help="run folders (or metrics.json files)")
    m.add_argument("--out", default="compare", help="folder for compare.md / compare.json / compare.png")


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", metavar="check", required=True)
    dc = dsub.add_parser(
        "check", help="scan split files: missing/corrupt images, labels, duplicates, leakage, class counts, shot groups",
        description="Check one or more split files. Each split is reported on its own (bad lines, labels, missing / "
                    "unreadable / corrupt images, duplicate lines, conflicting labels, class counts); with several "
                    "splits (e.g. `engine data check train.txt val.txt test.txt --root DIR`) images shared between "
                    "splits (leakage) and images with different labels in different splits are reported too. "
                    "Without --decode every image is opened (header read); --decode decodes every image.")
    dc.add_argument("split", nargs="+",
                    help="split file(s) (`relative/path label` per line): an absolute path, or a path relative to "
                         "the current folder when it exists there (that wins), else relative to --root (as engine "
                         "train finds data.train_split under data.root)")
    dc.add_argument("--root", required=True, help="image root the split's paths are relative to")
    dc.add_argument("--num-classes", type=int, default=None, help="labels must lie in [0, N) (default: inferred)")
    dc.add_argument("--many", type=int, default=100, help="many-shot: more than this many images")
    dc.add_argument("--few", type=int, default=20, help="few-shot: fewer than this many images")
    dc.add_argument("--json", action="store_true", help="print the full report as JSON")
    dc.add_argument("--decode", action="store_true", help="fully decode every image (default: open, a header read)")
    dc.add_argument("--jobs", type=int, default=None, help="threads checking images (default min(8, CPUs))")
    dc.add_argument("--bad-list", default=None, metavar="FILE",
                    help="write every missing/unreadable/corrupt image here, one path relative to --root per line "
                         "(tab, reason): the format data.exclude_file reads")
    dc.add_argument("--allow-outside-root", action="store_true", help="accept paths that leave --root")


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _seeds(text: str, flag: str = "--seeds") -> list[int]:
    seeds = _ints(text, flag)
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise ConfigError(f"{flag} expects distinct integers ≥ 0, got {text!r}")
    return seeds


MAX_SWEEP_VALUES = 10_000  # a typo such as STEP 1e-9 would otherwise build a list of a billion values


def _parse_sweep(text: str, flag: str = "--sweep") -> list[float]:
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"{flag} expects START:STOP:STEP, e.g. 0:1:0.1; got {text!r}") from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise ConfigError(f"{flag} {text!r}: START, STOP and STEP must be finite numbers")
    if step <= 0 or stop < start or start < 0:
        raise ConfigError(f"{flag} {text!r}: expected 0 ≤ START ≤ STOP and STEP > 0")
    if (stop - start) / step >= MAX_SWEEP_VALUES:
        raise ConfigError(f"{flag} {text!r} has more than {MAX_SWEEP_VALUES} values; expected a coarser STEP")
    return inclusive_range(start, stop, step)


def _positive(value: float | int, flag: str, integer: bool = True) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag} must be {'an integer' if integer else 'a finite number'} > 0, got {value}")


def _out_dir(path: str | None, flag: str = "--out") -> Path | None:
    return None if path is None else check_folder(path, flag)


def _out_file(path: str | None, flag: str) -> Path | None:
    """An output file given on the command line: it may exist (replaced) or not yet; a folder is refused."""
    if path is not None and Path(path).is_dir():
        raise ConfigError(f"{flag} {path} is a folder, expected a file path")
    return None if path is None else Path(path)


def _show(lines: list[str]) -> None:
    """Print a command's result lines now (rank 0 only): before it writes files that might fail."""
    if launch_rank() == 0:
        for line in lines:
            print(line, flush=True)


def _cmd_train(args) -> tuple[list[str], int]:
    """Exit 0: trained; 75 (PREEMPTED_EXIT_CODE): stopped by SIGTERM/SIGUSR1 with a checkpoint (requeue and
    run again with --resume auto)."""
    from engine.config import to_annotated_yaml
    from engine.evaluate import format_table
    from engine.preemption import Preempted
    from engine.train import train

    resume: bool | str = False
    if args.resume in ("yes", "auto"):
        resume = True if args.resume == "yes" else "auto"
    elif args.resume is not None:
        raise ConfigError(f"--resume takes no value or 'auto', got {args.resume!r}")
    preset = args.preset if (args.preset or args.config) else DEFAULT_PRESET
    cfg = load_config(preset, args.config, args.overrides)
    if args.print_config:
        return [to_annotated_yaml(cfg).rstrip()], 0  # the YAML, with the values in use noted (scaled lr)
    if resume and not args.out:
        raise ConfigError("--resume needs --out DIR (the run folder to continue)")
    try:  # no --out: runs/<method>-<time>-s<seed>-<4 random hex>, chosen by rank 0 (engine.train.default_run_dir)
        metrics = train(cfg, args.out, resume=resume)
    except Preempted as exc:
        return [], exc.exit_code
    return [format_table({f"test ({cfg.method})": metrics}), f"run folder: {metrics['run_dir']}"], 0


def _cmd_status(args) -> tuple[list[str], int]:
    """One line (or --json) and the exit code of engine.run_status.describe."""
    from engine.run_status import describe

    code, line, status = describe(args.run_dir)
    if args.json:
        return [json.dumps({**(status or {}), "exit_code": code, "summary": line}, indent=2)], code
    return [line], code


def _cmd_eval(args) -> list[str]:
    from engine.experiments.checkpoints import evaluate_checkpoint, write_evaluation

    out = _out_dir(args.out)
    result, lines = evaluate_checkpoint(args.checkpoint, args.split, args.overrides)
    _show(lines)  # before writing: a read-only folder still shows the result
    return write_evaluation(result, out)


def _calibration(args, method: str, values: list[float] | None, **kw) -> list[str]:
    """Load, compute and print the result, then write it (--out, default the checkpoint's folder): a folder that
    cannot be written still leaves the printed result, and the command ends in one StorageError line."""
    from engine.experiments.checkpoints import calibrate_checkpoint, write_calibration

    out, save = _out_dir(args.out), _out_file(kw.pop("save", None), "--save")
    run, result, lines = calibrate_checkpoint(args.checkpoint, method, values, rs_count=args.counts, **kw)
    _show(lines)
    return write_calibration(run, result, out, save)


def _cmd_calibrate(args) -> list[str]:
    if args.sweep is not None and args.method not in SWEEPS:
        raise ConfigError(f"--sweep goes with --method {'/'.join(SWEEPS)}, got --method {args.method}")
    if args.counts is not None and args.method != "rs":
        raise ConfigError(f"--counts goes with --method rs, got --method {args.method}")
    _positive(args.epochs, "--epochs")
    _positive(args.lr, "--lr", integer=False)
    _positive(args.batch_size, "--batch-size")
    if args.seed < 0:
        raise ConfigError(f"--seed must be an integer ≥ 0, got {args.seed}")
    values = _parse_sweep(args.sweep) if args.sweep is not None else None
    return _calibration(args, args.method, values, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        seed=args.seed)


def _cmd_rescale(args) -> list[str]:
    """`engine rescale` = `engine calibrate --method rs` (--gamma: a one-value sweep; --save: that γ's checkpoint)."""
    if args.gamma is not None and not (math.isfinite(args.gamma) and args.gamma >= 0):
        raise ConfigError(f"--gamma must be a finite number ≥ 0, got {args.gamma}")
    if args.save and args.gamma is None:
        raise ConfigError("--save goes with --gamma (re-run with the γ the sweep chose)")
    values = [args.gamma] if args.gamma is not None else _parse_sweep(args.sweep)
    return _calibration(args, "rs", values, save=args.save)


def _cmd_sweep(args) -> list[str]:
    from engine.experiments.sweep import markdown, parse_grid, run_sweep

    grid, seeds, out = parse_grid(args.grid), _seeds(args.seeds), _out_dir(args.out)
    if args.select_by is not None and args.select_by not in grid:
        raise ConfigError(f"--select-by {args.select_by!r} is not a --grid key (grid keys: {', '.join(grid) or 'none'})")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {args.jobs}")
    summary = run_sweep(out, args.preset, grid, seeds, args.overrides, args.select_by or "method", args.jobs)
    return [markdown(summary)]


def _cmd_compare(args) -> list[str]:
    from engine.experiments.compare import compare_runs

    result = compare_runs([Path(r) for r in args.runs], _out_dir(args.out))
    return [result["table"], "written: " + ", ".join(map(str, result["written"]))]


def _cmd_study(args) -> list[str]:
    from engine.experiments import study_design

    seeds = _seeds(args.seeds)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.format != "digits_lt" and not args.root:
        raise ConfigError(f"--format {args.format} needs --root (the folder with the CIFAR python pickles)")
    epochs = study_design.DEFAULT_EPOCHS if args.epochs is None else args.epochs
    arch = args.arch or study_design.DEFAULT_ARCH
    size = study_design.DEFAULT_IMAGE_SIZE[args.format] if args.image_size is None else args.image_size
    recipe = ["--epochs", str(epochs), "--arch", arch, "--image-size", str(size)]
    if args.format != "digits_lt":
        recipe += ["--format", args.format, "--root", args.root]
    if args.jobs != 1:
        recipe += ["--jobs", str(args.jobs)]
    run = {"ablation": _study_ablation, "baselines": _study_baselines, "order": _study_order}[args.suite]
    return run(args, seeds, epochs, arch, size, recipe)


def _refuse_flags(args, flags: tuple[str, ...]) -> None:
    given = [f"--{f}" for f in flags if getattr(args, f) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: not an option of --suite {args.suite}")


def _study_ablation(args, seeds, epochs, arch, size, recipe) -> list[str]:
    from engine.experiments import study

    _refuse_flags(args, ("splits", "methods"))
    out_text, ratios_text = args.out or "docs/study", args.ratios or "10,50,100"
    profiles = args.profiles or "exp,step"
    out = _out_dir(out_text)
    try:
        ratios = [float(v) for v in ratios_text.split(",")]
    except ValueError:
        raise ConfigError(f"--ratios expects comma-separated numbers, got {ratios_text!r}") from None
    words = ["engine", "study", "--out", out_text, "--seeds", args.seeds, "--ratios", ratios_text, "--profiles",
             profiles, *recipe]
    summary = study.run_study(out_text, seeds, ratios, profiles.split(","), epochs, arch, size, args.overrides,
                              args.format, args.root, args.jobs,
                              " ".join(shlex.quote(w) for w in [*words, *args.overrides]))
    return study.summary_lines(summary, out)


def _study_baselines(args, seeds, epochs, arch, size, recipe) -> list[str]:
    from engine.experiments import study_baselines

    _refuse_flags(args, ("ratios", "profiles"))
    out_text, splits = args.out or "docs/baselines", args.splits or ",".join(BASELINE_SPLITS)
    out = _out_dir(out_text)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    words = ["engine", "study", "--suite", "baselines", "--out", out_text, "--seeds", args.seeds, "--splits", splits,
             *([] if methods is None else ["--methods", ",".join(methods)]), *recipe]
    summary = study_baselines.run_baselines(out_text, seeds, study_baselines.parse_splits(splits), methods, epochs,
                                            arch, size, args.overrides, args.format, args.root, args.jobs,
                                            " ".join(shlex.quote(w) for w in [*words, *args.overrides]))
    return study_baselines.summary_lines(summary, out)


def _study_order(args, seeds, epochs, arch, size, recipe) -> list[str]:
    from engine.experiments import study_order

    _refuse_flags(args, ("ratios", "profiles", "splits", "methods", "arch"))
    if args.format != "digits_lt":
        raise ConfigError(f"--format {args.format}: --suite order runs on digits_lt (its data-size axis is "
                          "Digits-LT's n_max)")
    out_text = args.out or "docs/order"
    out = _out_dir(out_text)
    words = ["engine", "study", "--suite", "order", "--out", out_text, "--seeds", args.seeds, "--epochs", str(epochs),
             "--image-size", str(size), *(["--jobs", str(args.jobs)] if args.jobs != 1 else [])]
    summary = study_order.run_order(out_text, seeds, epochs, size, args.overrides, args.jobs,
                                    " ".join(shlex.quote(w) for w in [*words, *args.overrides]))
    return study_order.summary_lines(summary, out)


def _split_path(split: str, root: str) -> str:
    """A split file of `engine data check`: absolute or existing relative to the current folder as
    given, else under --root (where `engine train` looks for data.train_split)."""
    from pipelines.splits import DataError

    path = Path(split)
    if path.is_absolute() or path.exists():
        return split
    under_root = Path(root) / path
    if under_root.exists():
        return str(under_root)
    raise DataError(f"split file {split} not found: neither {path.absolute()} nor {under_root} exists; "
                    "expected a split file relative to the current folder or to --root")


def _cmd_data(args) -> tuple[list[str], int]:
    """`engine data check`: exit 0 when the splits are clean, 1 when it found problems."""
    from pipelines.check import check_splits, format_multi_report, write_bad_list

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be ≥ 1, got {args.num_classes}")
    if args.many < 0 or args.few < 0 or args.few > args.many + 1:
        raise ConfigError(f"--few {args.few} and --many {args.many}: expected 0 ≤ --few ≤ --many + 1")
    _out_file(args.bad_list, "--bad-list")
    splits = [_split_path(s, args.root) for s in args.split]
    result = check_splits(splits, args.root, num_classes=args.num_classes, many=args.many, few=args.few,
                          workers=args.jobs, decode=args.decode, progress=not args.json,
                          allow_outside_root=args.allow_outside_root)
    lines = [json.dumps(result["splits"][0] if len(splits) == 1 else result, indent=2) if args.json
             else format_multi_report(result)]
    if args.bad_list:
        write_bad_list(args.bad_list, result["bad"], args.root)
        lines.append(f"{len(result['bad'])} bad images listed in {args.bad_list}")
    return lines, 0 if result["ok"] else 1


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "rescale": _cmd_rescale, "sweep": _cmd_sweep,
            "calibrate": _cmd_calibrate, "compare": _cmd_compare, "data": _cmd_data, "study": _cmd_study,
            "status": _cmd_status}


def main(argv: list[str] | None = None) -> int:
    try:
        args, unknown = _parser().parse_known_args(_bare_resume(sys.argv[1:] if argv is None else argv))
        name = f"data {args.data_command}" if args.command == "data" else args.command
        if hasattr(args, "overrides"):  # key=value after a flag that follows earlier overrides: still an override
            args.overrides += [u for u in unknown if not u.startswith("-")]
            unknown = [u for u in unknown if u.startswith("-")]
        if unknown:  # named by the sub-command they were given to
            _Parser(prog=f"engine {name}").error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse: --help (0) or one `engine <cmd>: error:` line (2), already printed
        return exc.code if isinstance(exc.code, int) else 0
    setup_logging()
    try:
        output = COMMANDS[args.command](args)
    except EngineError as exc:  # one line, whatever the message: a log reader greps for `error:`
        print(f"engine {name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file the library reads or writes without naming it in an EngineError
        cause = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"engine {name}: error: {where}{exc.strerror or exc}{cause}", file=sys.stderr)
        return StorageError.exit_code
    lines, code = output if isinstance(output, tuple) else (output, 0)
    _show(lines)  # under torchrun every rank returns here; the output is printed once
    return code


if __name__ == "__main__":
    sys.exit(main())
