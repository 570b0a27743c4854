"""Shared test setup.

Without a CUDA device the Triton kernels run under Triton's interpreter on CPU tensors
(how CI, which has no GPU, tests them): TRITON_INTERPRET=1 must be set before any
Triton kernel module is imported, so it is decided here, first. On a CUDA machine the
variable is left alone and the same tests run the compiled kernels.

Session fixtures: one Digits-LT cache, and one tiny trained run that every test needing
"some finished run" reads (tests that write into a run folder take `trained_copy`).
"""

import os
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import tiny  # noqa: E402


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One Digits-LT cache folder (PNG files + split files) for the whole test session."""
    return tmp_path_factory.mktemp("lt-engine-cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, digits_cache):
    """One finished `engine train` run (helpers.tiny, method=ce, seed 0, 2 epochs) for the whole session.

    Tests may add post-hoc outputs (eval_test.json, calibrate_*.json) next to it but must not change what
    training wrote; a test that needs a pristine folder takes `trained_copy`.
    """
    from engine.cli import main

    out = tmp_path_factory.mktemp("shared-run") / "tiny"
    assert main(["train", "--out", str(out), *tiny(digits_cache), "method=ce"]) == 0
    return out


@pytest.fixture
def trained_copy(trained, tmp_path):
    """A private copy of the shared `trained` run folder, for tests that resume or rewrite it."""
    return shutil.copytree(trained, tmp_path / "tiny")
