"""Logging set up once: rank-0 filter, a per-run log file that gets DEBUG lines and is detached afterwards."""

import logging

from engine.logs import RankZeroFilter, log_to_file


def _record(msg="hello"):
    return logging.LogRecord("engine.train", logging.INFO, __file__, 1, msg, None, None)


def test_rank_zero_filter_passes_rank_zero_only(monkeypatch):
    assert RankZeroFilter(rank=0).filter(_record()) and not RankZeroFilter(rank=1).filter(_record())
    monkeypatch.setenv("RANK", "3")  # torchrun's environment
    assert not RankZeroFilter().filter(_record())


def test_log_to_file_writes_debug_lines_and_detaches(tmp_path):
    logger = logging.getLogger("engine.train")
    with log_to_file(tmp_path / "run" / "train.log", rank=0):
        logger.debug("epoch 1/2  loss 0.5")
    logger.info("after the run")  # not in this run's file any more
    text = (tmp_path / "run" / "train.log").read_text()
    assert "DEBUG engine.train: epoch 1/2  loss 0.5" in text and "after the run" not in text
    with log_to_file(tmp_path / "other.log", rank=1):  # not rank 0: nothing written
        logger.info("rank 1 speaks")
    assert (tmp_path / "other.log").read_text() == ""
