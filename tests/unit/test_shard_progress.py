"""The teacher stage's progress in the flow (``flows.seed_flow.ShardProgress``): shards counted from those done
before, views summed from the records, a line at most every ``every`` seconds and always for the last shard."""

from __future__ import annotations

import logging

import pytest

from flows.seed_flow import ShardProgress


def test_progress_counts_from_the_shards_done_before_and_always_reports_the_last(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.shard_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        quiet = ShardProgress(logger, None, total=5, before=2, every=3600.0)  # a retry: 2 of 5 done before it
        for _ in range(3):
            quiet({"teacher_forwards": 200})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("teacher: 5/5 shards embedded (100 %), ")  # only the last
    assert quiet.views == 600

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger.name):
        every = ShardProgress(logger, None, total=4, before=0, every=0.0)
        for _ in range(4):
            every({"teacher_forwards": 10})
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "teacher: 1/4 shards embedded (25 %)", "teacher: 2/4 shards embedded (50 %)",
        "teacher: 3/4 shards embedded (75 %)", "teacher: 4/4 shards embedded (100 %)"]
