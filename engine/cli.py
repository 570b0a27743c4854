"""Command line: `engine train | eval | rescale | sweep | calibrate | compare | study | data check`.

    engine train [--preset NAME] [--config FILE] [--out DIR] [--resume [auto]] [--print-config] [key=value ...]
    engine eval --checkpoint PATH [--split test|val] [dotted.key=value ...]
    engine rescale --checkpoint PATH --gamma G          (post-hoc RS, one γ)
    engine rescale --checkpoint PATH --sweep 0:1:0.1    (γ chosen on val, reported on test)
    engine sweep --out DIR --grid method=ce,eo_uc --seeds 0,1,2 [key=value ...]
    engine data check SPLIT --root DIR [--num-classes N] [--json]
    engine calibrate --checkpoint PATH --method {rs,tau_norm,logit_adjust,crt,lws} [--sweep A:B:S] [--epochs N]
    engine compare RUN... [--out DIR]
    engine study [--out docs/study] [--seeds 0,1,2] [--ratios 10,50,100] [--profiles exp,step] [key=value ...]

Each command parses its arguments and calls one function; what it prints is the command's output
(progress and notes go through `logging`, set up once here). Every `EngineError` prints one clear
line and exits with its `exit_code` (2: bad input — config, data, checkpoint; 1: training stopped);
`engine train` exits 75 when a SIGTERM/SIGUSR1 stopped it with a checkpoint (requeue with --resume auto).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from engine.config import DEFAULT_PRESET, RS_COUNTS, available_presets, load_config
from engine.errors import ConfigError, EngineError
from engine.experiments.study_design import PRESETS as STUDY_PRESETS
from engine.logs import launch_rank, setup_logging
from engine.posthoc import METHODS as CALIBRATIONS
from engine.posthoc import SWEEPS, inclusive_range


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine", description="Long-tailed image recognition training engine")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the embedded Digits-LT default)")
    t.add_argument("--preset", default=None, help=f"preset name (default {DEFAULT_PRESET}; {', '.join(available_presets())})")
    t.add_argument("--config", default=None, help="YAML file applied after the preset")
    t.add_argument("--out", default=None, help="run folder (default runs/<method>-<time>-s<seed>-<4 hex>)")
    t.add_argument("--resume", nargs="?", const="yes", default=None, metavar="auto",
                   help="continue the run in --out from its last.pt; `--resume auto`: continue when last.pt "
                        "exists, start fresh otherwise (job scripts that are requeued)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    t.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. method=ce optim.lr=0.05")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its test (or val) split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("overrides", nargs="*", help="dotted.key=value on the checkpoint's config that leave the model as "
                                                "trained, e.g. data.root=/new/place eval.batch_size=512")

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


def _add_experiments(sub) -> None:
    s = sub.add_parser("sweep", help="train a grid × seeds, choose on val, report test (mean ± std)")
    s.add_argument("--out", required=True, help="sweep folder (finished runs in it are re-used)")
    s.add_argument("--preset", default=DEFAULT_PRESET)
    s.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    s.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable)")
    s.add_argument("--select-by", default="method", help="grid key whose values each get their own choice")
    s.add_argument("--jobs", type=int, default=1, help="training processes in parallel")
    s.add_argument("overrides", nargs="*", help="dotted.key=value applied to every run")

    st = sub.add_parser("study", help="the papers' ablation study (all methods × ratios × profiles × seeds) + claims check")
    st.add_argument("--out", default="docs/study", help="study folder (runs under OUT/runs are re-used; default docs/study)")
    st.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    st.add_argument("--ratios", default="10,50,100", help="comma-separated imbalance ratios")
    st.add_argument("--profiles", default="exp,step", help="comma-separated imbalance profiles (exp, step)")
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
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser(
        "check", help="scan split files: missing/corrupt images, labels, duplicates, leakage, class counts, shot groups",
        description="Check one or more split files. Each split is reported on its own (bad lines, labels, missing / "
                    "unreadable / corrupt images, duplicate lines, conflicting labels, class counts); with several "
                    "splits (e.g. `engine data check train.txt val.txt test.txt --root DIR`) images shared between "
                    "splits (leakage) and images with different labels in different splits are reported too. "
                    "Without --decode every image is opened (header read); --decode decodes every image.")
    dc.add_argument("split", nargs="+", help="split file(s) (`relative/path label` per line)")
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


def _parse_sweep(text: str) -> list[float]:
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--sweep expects START:STOP:STEP, e.g. 0:1:0.1; got {text!r}") from None
    if step <= 0 or stop < start or start < 0:
        raise ConfigError(f"--sweep {text!r}: expected 0 ≤ START ≤ STOP and STEP > 0")
    return inclusive_range(start, stop, step)


def _cmd_train(args) -> tuple[list[str], int]:
    """Exit 0: trained; 75 (PREEMPTED_EXIT_CODE): stopped by SIGTERM/SIGUSR1 with a checkpoint (requeue and
    run again with --resume auto)."""
    from engine.config import to_yaml
    from engine.evaluate import format_table
    from engine.preemption import Preempted
    from engine.train import train

    resume: bool | str = False
    if args.resume in ("yes", "auto"):
        resume = True if args.resume == "yes" else "auto"
    elif args.resume is not None:  # `--resume key=value`: argparse took the first override as the flag's value
        if "=" not in args.resume:
            raise ConfigError(f"--resume takes no value or 'auto', got {args.resume!r}")
        args.overrides.insert(0, args.resume)
        resume = True
    preset = args.preset if (args.preset or args.config) else DEFAULT_PRESET
    cfg = load_config(preset, args.config, args.overrides)
    if args.print_config:
        return [to_yaml(cfg).rstrip()], 0
    if resume and not args.out:
        raise ConfigError("--resume needs --out DIR (the run folder to continue)")
    try:  # no --out: runs/<method>-<time>-s<seed>-<4 random hex>, chosen by rank 0 (engine.train.default_run_dir)
        metrics = train(cfg, args.out, resume=resume)
    except Preempted as exc:
        return [], exc.exit_code
    return [format_table({f"test ({cfg.method})": metrics}), f"run folder: {metrics['run_dir']}"], 0


def _cmd_eval(args) -> list[str]:
    from engine.experiments.checkpoints import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, args.split, args.overrides)[1]


def _cmd_calibrate(args) -> list[str]:
    from engine.experiments.checkpoints import calibrate_checkpoint

    if args.sweep is not None and args.method not in SWEEPS:
        raise ConfigError(f"--sweep goes with --method {'/'.join(SWEEPS)}, got --method {args.method}")
    values = _parse_sweep(args.sweep) if args.sweep is not None else None
    return calibrate_checkpoint(args.checkpoint, args.method, values, args.epochs, args.lr, args.batch_size,
                                args.seed, rs_count=args.counts)[1]


def _cmd_rescale(args) -> list[str]:
    """`engine rescale` = `engine calibrate --method rs` (--gamma: a one-value sweep; --save: that γ's checkpoint)."""
    from engine.experiments.checkpoints import calibrate_checkpoint

    if args.gamma is not None and args.gamma < 0:
        raise ConfigError(f"--gamma must be ≥ 0, got {args.gamma}")
    if args.save and args.gamma is None:
        raise ConfigError("--save goes with --gamma (re-run with the γ the sweep chose)")
    values = [args.gamma] if args.gamma is not None else _parse_sweep(args.sweep)
    return calibrate_checkpoint(args.checkpoint, "rs", values, save=args.save, rs_count=args.counts)[1]


def _cmd_sweep(args) -> list[str]:
    from engine.experiments.sweep import markdown, parse_grid, run_sweep

    summary = run_sweep(Path(args.out), args.preset, parse_grid(args.grid), _ints(args.seeds, "--seeds"),
                        args.overrides, args.select_by, args.jobs)
    return [markdown(summary)]


def _cmd_compare(args) -> list[str]:
    from engine.experiments.compare import compare_runs

    result = compare_runs([Path(r) for r in args.runs], Path(args.out))
    return [result["table"], "written: " + ", ".join(map(str, result["written"]))]


def _cmd_study(args) -> list[str]:
    from engine.experiments import study, study_design

    seeds = _ints(args.seeds, "--seeds")
    try:
        ratios = [float(v) for v in args.ratios.split(",")]
    except ValueError:
        raise ConfigError(f"--ratios expects comma-separated numbers, got {args.ratios!r}") from None
    epochs = args.epochs or study_design.DEFAULT_EPOCHS
    arch = args.arch or study_design.DEFAULT_ARCH
    size = args.image_size or study_design.DEFAULT_IMAGE_SIZE[args.format]
    words = ["engine", "study", "--out", args.out, "--seeds", args.seeds, "--ratios", args.ratios, "--profiles",
             args.profiles, "--epochs", str(epochs), "--arch", arch, "--image-size", str(size)]
    if args.format != "digits_lt":
        words += ["--format", args.format, "--root", args.root]
    if args.jobs != 1:
        words += ["--jobs", str(args.jobs)]
    summary = study.run_study(args.out, seeds, ratios, args.profiles.split(","), epochs, arch, size, args.overrides,
                              args.format, args.root, args.jobs,
                              " ".join(shlex.quote(w) for w in [*words, *args.overrides]))
    return study.summary_lines(summary, Path(args.out))


def _cmd_data(args) -> tuple[list[str], int]:
    """`engine data check`: exit 0 when the splits are clean, 1 when it found problems."""
    from pipelines.check import check_splits, format_multi_report, write_bad_list

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be ≥ 1, got {args.num_classes}")
    result = check_splits(args.split, args.root, num_classes=args.num_classes, many=args.many, few=args.few,
                          workers=args.jobs, decode=args.decode, progress=not args.json,
                          allow_outside_root=args.allow_outside_root)
    lines = [json.dumps(result["splits"][0] if len(args.split) == 1 else result, indent=2) if args.json
             else format_multi_report(result)]
    if args.bad_list:
        write_bad_list(args.bad_list, result["bad"], args.root)
        lines.append(f"{len(result['bad'])} bad images listed in {args.bad_list}")
    return lines, 0 if result["ok"] else 1


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "rescale": _cmd_rescale, "sweep": _cmd_sweep,
            "calibrate": _cmd_calibrate, "compare": _cmd_compare, "data": _cmd_data, "study": _cmd_study}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        output = COMMANDS[args.command](args)
    except EngineError as exc:
        print(f"engine {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    lines, code = output if isinstance(output, tuple) else (output, 0)
    if launch_rank() == 0:  # under torchrun every rank returns here; the output is printed once
        for line in lines:
            print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
