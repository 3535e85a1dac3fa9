"""Progress in the flow. The teacher stage's (``flows.seed_flow.ShardProgress``): shards counted from those done
before, views summed from the records, a line at most every ``every`` seconds and always for the last shard. The
evaluation's (``PhaseProgress``): a line at most every ``every`` seconds, and a phase's end when it had a line."""

from __future__ import annotations

import logging

import pytest

from flows.seed_flow import PhaseProgress, ShardProgress


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


def test_evaluation_progress_is_throttled_and_ends_the_phases_it_spoke_of(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.phase_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        quiet = PhaseProgress(logger, None, every=3600.0)   # nothing is due: short phases stay silent
        for done in (100, 200, 300):
            quiet("train features (2 encoders)", done, 300, "images")
        quiet("linear probe teacher", 30, 30, "epochs")
    assert caplog.records == []

    with caplog.at_level(logging.INFO, logger=logger.name):
        chatty = PhaseProgress(logger, None, every=0.0)
        chatty("train features (2 encoders)", 12_800, 20_000, "images")
        chatty("train features (2 encoders)", 20_000, 20_000, "images")
        chatty("test features (2 encoders)", 256, None, "images")          # shards that do not say their length
        chatty("kNN teacher", 20_000, 20_000, "training rows")
    assert [r.getMessage() for r in caplog.records] == [
        "evaluate: train features (2 encoders): 12,800 of 20,000 images (64 %)",
        "evaluate: train features (2 encoders): 20,000 of 20,000 images (100 %)",
        "evaluate: test features (2 encoders): 256 images",
        "evaluate: kNN teacher: 20,000 of 20,000 training rows (100 %)"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger.name):
        ends = PhaseProgress(logger, None, every=3600.0)
        ends.last -= 7200                                                    # the first step is due
        ends("kNN student 0", 5, 40, "training rows")
        ends("kNN student 0", 20, 40, "training rows")                      # not due
        ends("kNN student 0", 40, 40, "training rows")                      # the end of a phase that spoke
    assert [r.getMessage() for r in caplog.records] == [
        "evaluate: kNN student 0: 5 of 40 training rows (12 %)", "evaluate: kNN student 0: 40 of 40 training rows (100 %)"]


def test_the_flows_shortcut_parameters_come_after_the_overrides_and_empty_ones_are_refused() -> None:
    """``seed(run=..., student_arch=..., epochs=...)``: a shortcut given wins over ``overrides``; an empty or zero
    one is refused by the config's own checks instead of being dropped silently."""
    from flows.seed_flow import _overrides
    from seed.config import load_config
    from seed.errors import SeedError

    cfg = load_config(None, _overrides(["train.run=a", "train.optim.epochs=2"], "b", None, 5))
    assert (cfg.train.run, cfg.train.optim.epochs) == ("b", 5)
    assert load_config(None, _overrides(["train.run=a"], None, None, None)).train.run == "a"
    for run, arch, epochs, message in (("", None, None, "train.run"), (None, "", None, "train.students.0..arch must name"),
                                       (None, None, 0, "train.optim.epochs must be > 0")):
        with pytest.raises(SeedError, match=message):
            load_config(None, _overrides([], run, arch, epochs))


def test_the_shared_teacher_is_loaded_again_when_its_file_is_rewritten(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Dask workers outlive runs: a teacher checkpoint rewritten at the same path (pre-training run again with other
    settings) is loaded again, not served from the copy the worker loaded before."""
    import os

    import timm
    import torch

    from flows.seed_flow import shared_teacher
    from seed.config import TeacherConfig

    path = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), path)
    cfg = TeacherConfig(arch="resnet10t", checkpoint=str(path), format="timm", output="pooled")
    first, _ = shared_teacher(cfg)
    assert shared_teacher(cfg)[0] is first                                     # the same file: the same copy
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), path)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000_000))              # a later modification time for sure
    second, _ = shared_teacher(cfg)
    assert second is not first
    assert not torch.equal(next(second.parameters()), next(first.parameters()))
    # the teacher stage's copy, moved to its device, is dropped after the stage; the plain one stays
    from flows.seed_flow import release_device_teachers

    on_device, _ = shared_teacher(cfg, "cpu")
    release_device_teachers()
    assert shared_teacher(cfg)[0] is second and shared_teacher(cfg, "cpu")[0] is not on_device


def test_a_complete_caches_totals_read_as_words_for_the_cli_and_the_flow() -> None:
    from seed.report import teacher_totals_text

    totals = {"samples": 20000, "valid": 19998, "skipped": 2, "teacher_forwards": 39996, "teacher_seconds": 20.0,
              "input_wait_seconds": 1.0, "first_batch_wait_seconds": 0.5, "stage_seconds": 29.5}
    assert teacher_totals_text(totals) == ("20,000 images (19,998 valid, 2 skipped), 39,996 teacher forwards (2,000 "
                                           "views/s in the forward; waited for its input 1.0 s of 30.0 s (3%))")
