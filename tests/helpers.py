"""Shared test helpers (importable from test modules: pytest puts tests/ on sys.path).

One of each: a free TCP port, the `engine` command as a child process (argv, environment, runner),
an image writer, a model config and the overrides of a tiny training run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.config import Config

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for MASTER_PORT of a gloo group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_argv(*args: str) -> list[str]:
    """The argv of `engine ARGS...` in this interpreter: `python -m engine.cli ARGS...`."""
    return [sys.executable, "-m", "engine.cli", *args]


def engine_env(**extra: str) -> dict:
    """The environment of a child `engine` process: this repository first on PYTHONPATH, no inherited WORLD_SIZE
    (a plain `engine train` must not think it is one of several ranks), plus `extra`."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("WORLD_SIZE", None)
    return env


def run_ok(argv: list[str], cwd: Path, timeout: float = 150, **env: str) -> subprocess.CompletedProcess:
    """Run `argv` in `cwd` (created) with `engine_env(**env)`; fails the test with both streams unless it exits 0."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(argv, cwd=cwd, env=engine_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}\nexit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def write_image(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", seed: int = 0,
                pixels: np.ndarray | None = None, **save) -> bytes:
    """An image at `path` (folders created; the format from the suffix unless `save` names one); returns its bytes.

    The pixels are `pixels` (an H×W×3 uint8 array) when given, else random ones of `size` (w, h) from `seed`;
    they are converted to PIL `mode` before saving. `save` goes to `Image.save` (format=, quality=, ...).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, **save)
    return path.read_bytes()


def write_jpeg(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0, quality: int = 90) -> bytes:
    """A random-pixel JPEG of `size` (w, h) in PIL `mode` at `path` (folders created); returns its bytes."""
    return write_image(path, size, mode, seed, format="JPEG", quality=quality)


def model_config(arch: str, method: str = "eo_uc", pretrained: str = "") -> Config:
    """A default Config with the given backbone and method: the input of `engine.models.build_model`."""
    cfg = Config()
    cfg.model.arch, cfg.model.pretrained, cfg.method = arch, pretrained, method
    return cfg


def tiny(cache) -> list[str]:
    """Overrides for a run of a few seconds: ResNet-8, 16 px, 2 epochs, a small Digits-LT in `cache`."""
    return [
        f"data.cache_dir={cache}", "model.arch=resnet8_cifar", "epochs=2", "data.n_max=30", "data.imbalance_ratio=10",
        "data.val_per_class=5", "data.test_per_class=8", "data.image_size=16", "optim.batch_size=32",
        "optim.warmup_epochs=0", "eval.many_threshold=20", "eval.few_threshold=5", "run.progress=false",
    ]


def call_without_training(monkeypatch, args: list[str]) -> None:
    """`engine <args>` in this process, failing if it trains anything (every run must be re-used)."""
    import engine.train as train_mod
    from engine.cli import main

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    with monkeypatch.context() as m:
        m.setattr(train_mod, "train", no_training)
        assert main(args) == 0
