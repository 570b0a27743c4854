"""One renderer for what reports show: Markdown tables, mean ± std cells, PNG figures.

matplotlib is imported on the first figure (Agg backend), never at import: `import engine.train`
stays free of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.io import atomic_write_bytes


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    """A number as text (×scale), '–' for a missing one."""
    return f"{value * scale:.{digits}f}" if isinstance(value, (int, float)) else "–"


def mean_std(values: Sequence[float | None]) -> dict | None:
    """{'mean', 'std' (population, as numpy), 'n'} over the values that are not None; None if none is."""
    vals = [v for v in values if v is not None]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)} if vals else None


def fmt_mean_std(stat: dict | None, digits: int = 1) -> str:
    return "–" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args, **kwargs):
    return pyplot().subplots(*args, **kwargs)


def save_png(fig, path: str | Path) -> None:
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)
