"""Collect `bench_*.py` files when `pytest benchmarks` is given the directory.

pyproject's pytest settings only collect `test_*.py` (under tests/); benchmark files are
named `bench_*.py` so that a plain `pytest` never runs them.
"""

import pytest


def pytest_collect_file(file_path, parent):
    # Files named explicitly on the command line are collected by pytest itself already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
