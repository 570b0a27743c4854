"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported: it
makes Triton kernels run on CPU tensors (how CI, which has no GPU, tests them).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One Digits-LT cache folder (PNG files + split files) for the whole test session."""
    return tmp_path_factory.mktemp("lt-engine-cache")
