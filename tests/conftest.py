"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported: it
makes Triton kernels run on CPU tensors (how CI, which has no GPU, tests them).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
