"""pipelines/progress.py: a tqdm bar on a terminal; plain periodic lines, never a carriage return, on a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from pipelines.progress import LineProgress, progress_bar

REPO = Path(__file__).resolve().parents[1]


def test_a_pipe_gets_periodic_plain_lines_with_rate_and_eta_and_no_carriage_returns():
    script = ("import time\nimport pipelines.progress as p\np.LINE_INTERVAL_S = 0.05\n"
              "bar = p.progress_bar(range(40), desc='epoch 1/3', unit='it')\n"
              "for i in bar:\n    time.sleep(0.01)\n    bar.set_postfix(loss='0.500')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) >= 3, done.stderr  # ~0.4 s of work, a line every 0.05 s, and the last one at the end
    pattern = r"epoch 1/3: \d+/40 it \(\d+%\), [\d.e+]+ it/s, ETA \d:\d\d:\d\d, loss=0\.500"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert lines[-1].startswith("epoch 1/3: 40/40 it (100%)"), lines


def test_the_line_counts_from_the_resume_position():
    bar = LineProgress(desc="epoch 2/5", total=100, initial=40, unit="it", interval=30)
    bar._start = 0.0
    bar.update(20)
    bar.set_postfix(img_s="400")
    assert bar.line(now=10.0) == "epoch 2/5: 60/100 it (60%), 2 it/s, ETA 0:00:20, img_s=400"


def test_quiet_under_one_interval_or_when_disabled(capsys):
    for disable in (False, True):
        with progress_bar(total=5, desc="check", unit="img", disable=disable) as bar:
            bar.update(5)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_tqdm_bar():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal:
        bar = progress_bar(range(3), desc="eval", file=terminal)
        assert isinstance(bar, tqdm)
        assert list(bar) == [0, 1, 2]
    os.close(master)
