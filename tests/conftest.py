"""Shared test setup.

Without a CUDA device the Triton kernels run under Triton's interpreter on CPU tensors
(how CI, which has no GPU, tests them): TRITON_INTERPRET=1 must be set before any
Triton kernel module is imported, so it is decided here, first. On a CUDA machine the
variable is left alone and the same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One Digits-LT cache folder (PNG files + split files) for the whole test session."""
    return tmp_path_factory.mktemp("lt-engine-cache")
