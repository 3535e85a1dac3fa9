"""TensorBoard event files from the training loop: one scalar per step, equal to what metrics.jsonl records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.student as student_stage
from seed.train import tensorboard_writer
from tests.conftest import cache_and_bank, small_config

TRAIN = ("bank.size=64", "bank.topk=8", "train.optim.batch_size=50", "train.optim.epochs=2", "train.loader.shuffle_buffer=200",
         "train.optim.warmup_epochs=1", "train.students=[{arch: mobilenetv3_small_050}, {arch: resnet10t}]")
STEPS = 300 // 50  # per epoch: 3 shards of 100 images, batches of 50


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shards_root: Path, moco_checkpoint: Path):
    """A complete cache and bank over 300 real images (2 views)."""
    root = tmp_path_factory.mktemp("tb")
    _, storage = cache_and_bank(root, shards_root, moco_checkpoint, *TRAIN)
    return moco_checkpoint, storage, root


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_event_files_hold_one_scalar_per_step_matching_the_metrics(prepared) -> None:
    ckpt, storage, root = prepared
    result = student_stage.run(small_config(ckpt, *TRAIN, "train.run=tb"), storage, progress=False)
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    for name in ("mobilenetv3_small_050", "resnet10t"):
        rows = _jsonl(root / "runs" / "tb" / name / "metrics.jsonl")  # still written, one line per epoch
        scalars = _scalars(root / "runs" / "tb" / name / "tb")
        assert {"train/loss", "train/lr", "train/images_per_s", "epoch/loss"} <= set(scalars)
        losses = scalars["train/loss"]
        assert [step for step, _ in losses] == list(range(1, 2 * STEPS + 1))
        for epoch, row in enumerate(rows):
            per_step = [v for _, v in losses[epoch * STEPS:(epoch + 1) * STEPS]]
            assert sum(per_step) / STEPS == pytest.approx(row["loss"], rel=1e-6)  # event values are float32
            assert row["loss"] == result.metrics[epoch]["loss"][name]
        assert scalars["epoch/loss"] == [(STEPS, pytest.approx(rows[0]["loss"], rel=1e-6)),
                                         (2 * STEPS, pytest.approx(rows[1]["loss"], rel=1e-6))]
        lrs = scalars["train/lr"]
        assert [step for step, _ in lrs] == list(range(1, 2 * STEPS + 1))
        assert lrs[STEPS - 1][1] == pytest.approx(rows[0]["lr_end"]) and lrs[-1][1] == pytest.approx(rows[1]["lr_end"])
        assert lrs[0][1] < lrs[STEPS - 1][1]  # warm-up over the first epoch
        assert all(v > 0 for _, v in scalars["train/images_per_s"]) and len(scalars["train/images_per_s"]) == 2 * STEPS


def test_a_fresh_run_in_the_same_directory_replaces_the_old_steps(prepared) -> None:
    ckpt, storage, root = prepared
    first = student_stage.run(small_config(ckpt, *TRAIN, "train.run=again", "train.students=[{arch: resnet10t}]"),
                              storage, progress=False)
    # the worst order for TensorBoard: the old file read after the new one (as a file of the same second with
    # a per-process counter of 9 against the new one's 10 would be); purge_step alone then keeps its steps
    for old in (root / "runs" / "again" / "resnet10t" / "tb").glob("events.out.tfevents.*"):
        old.rename(old.with_name("events.out.tfevents.9999999999.old"))
    second = student_stage.run(small_config(ckpt, *TRAIN, "train.run=again", "train.students=[{arch: resnet10t}]",
                                            "train.seed=5"), storage, progress=False)
    assert first.metrics[0]["loss"] != second.metrics[0]["loss"]
    losses = _scalars(root / "runs" / "again" / "resnet10t" / "tb")["train/loss"]
    assert [step for step, _ in losses] == list(range(1, 2 * STEPS + 1))  # not the first run's steps as well
    assert sum(v for _, v in losses[:STEPS]) / STEPS == pytest.approx(second.metrics[0]["loss"]["resnet10t"], rel=1e-6)


def test_asking_for_tensorboard_without_the_package_names_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['tensorboard'] = None\n"  # as if the package were not installed
            "from seed.errors import SeedError\nfrom seed.train import tensorboard_writer\n"
            f"assert tensorboard_writer(None, [{str(tmp_path)!r}]) is None\n"
            f"try:\n    tensorboard_writer(True, [{str(tmp_path)!r}])\n"
            "except SeedError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("train.tensorboard is true but the tensorboard package is not installed: "
                           "pip install 'seed-distill[tensorboard]', or set train.tensorboard=false")


def test_automatic_tensorboard_is_local_only_and_false_means_off(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    assert tensorboard_writer(None, [str(tmp_path)]) is SummaryWriter
    assert tensorboard_writer(None, [str(tmp_path), "s3://bucket/runs/x"]) is None
    assert tensorboard_writer(True, ["s3://bucket/runs/x"]) is SummaryWriter
    assert tensorboard_writer(False, [str(tmp_path)]) is None
