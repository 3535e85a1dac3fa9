"""The Prefect flow: full, then student-only without the teacher; skips; Dask; refusal."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from flows.seed_flow import seed
from seed.errors import SeedError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.train=fm/train/train-{000000..000002}.tar", "data.test=fm/test/test-000000.tar", "pretrain.optim.epochs=1",
        "pretrain.optim.batch_size=64", "pretrain.queue=128", "pretrain.name=flow-teacher", "cache.name=flow",
        "bank.size=64", "bank.topk=8", "train.optim.epochs=1", "train.optim.batch_size=64", "train.run=flow"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


@pytest.fixture()
def storage_file(tmp_path: Path, shards_root: Path) -> str:
    path = tmp_path / "storage.yaml"
    path.write_text(f"shards: {shards_root}\ncaches: {tmp_path}/caches\nruns: {tmp_path}/runs\nreports: {tmp_path}/reports\n")
    return str(path)


def _forwards(tmp_path: Path, name: str = "flow") -> int:
    return zarr.open_group(str(tmp_path / "caches" / f"{name}.zarr"), mode="r").attrs["totals"]["teacher_forwards"]


def test_full_then_student_only(harness, tmp_path: Path, storage_file: str) -> None:
    config = str(ROOT / "configs" / "demo.yaml")
    first = seed(config=config, overrides=TINY, storage=storage_file)
    assert first["pretrain"].endswith("flow-teacher/teacher.pth")
    assert first["teacher"]["teacher_forwards"] == 300 * 2 == _forwards(tmp_path)
    assert first["student"]["skipped"] is False and Path(first["evaluation"]["report"]).exists()
    assert [r["kind"] for r in first["evaluation"]["results"]].count("teacher") == 1

    teacher_file = Path(first["pretrain"])
    teacher_file.rename(teacher_file.with_suffix(".away"))  # the student deployment must not need the teacher
    second = seed(config=config, overrides=[*TINY, f"teacher.checkpoint={teacher_file}"], storage=storage_file,
                  stages=["student", "evaluate"], run="second", student_arch="resnet10t", epochs=1)
    assert _forwards(tmp_path) == 600  # no teacher forward in the student-only run
    assert second["student"]["skipped"] is False and list(second["student"]["students"]) == ["resnet10t"]
    names = [r["name"] for r in second["evaluation"]["results"]]
    assert "resnet10t (cached SEED)" in names and any(r["kind"] == "teacher" for r in second["evaluation"]["results"])
    assert (tmp_path / "runs" / "second" / "report.md").exists()


def test_rerun_skips_complete_stages(harness, tmp_path: Path, storage_file: str) -> None:
    config = str(ROOT / "configs" / "demo.yaml")
    seed(config=config, overrides=TINY, storage=storage_file, stages=["pretrain", "teacher", "bank", "student"])
    again = seed(config=config, overrides=TINY, storage=storage_file, stages=["pretrain", "teacher", "bank", "student"])
    assert _forwards(tmp_path) == 600
    assert again["bank"]["skipped"] is True and again["student"]["skipped"] is True


def test_student_only_refuses_a_missing_cache(harness, storage_file: str) -> None:
    with pytest.raises(SeedError, match="no cache at .*absent.zarr"):
        seed(config=str(ROOT / "configs" / "demo.yaml"), overrides=[*TINY, "cache.name=absent"], storage=storage_file,
             stages=["student"])


def test_dask_cluster_writes_the_same_cache_as_one_process(harness, tmp_path: Path, storage_file: str,
                                                           moco_checkpoint: Path) -> None:
    from distributed import LocalCluster

    overrides = [*TINY, f"teacher.checkpoint={moco_checkpoint}"]
    config = str(ROOT / "configs" / "demo.yaml")
    seed(config=config, overrides=[*overrides, "cache.name=serial"], storage=storage_file, stages=["teacher"])
    environ = dict(os.environ)  # distributed sets OMP_NUM_THREADS=1 etc. in this process's environment
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster:
            seed(config=config, overrides=[*overrides, "cache.name=dask"], storage=storage_file, stages=["teacher"],
                 dask_address=cluster.scheduler_address)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    a = zarr.open_group(str(tmp_path / "caches" / "serial.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "caches" / "dask.zarr"), mode="r")
    for name in ("embeddings", "augment", "keys", "labels", "valid"):
        x, y = a[name][:], b[name][:]
        assert (x.tobytes() == y.tobytes()) if x.dtype.kind == "f" else np.array_equal(x, y), name
    assert b.attrs["status"] == "complete" and b.attrs["totals"]["teacher_forwards"] == 600


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_rank_one_after_first_epoch(checkpoint_file: Path, seen: dict) -> None:
    """Wait for the first epoch's checkpoint, then SIGKILL the torchrun rank with LOCAL_RANK=1."""
    import signal
    import time

    from seed import checkpoint

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not checkpoint_file.exists():
        time.sleep(0.05)
    for pid in _descendants(os.getpid()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"LOCAL_RANK=1" in environ:
            os.kill(pid, signal.SIGKILL)
            seen["killed"] = pid
            seen["state"] = checkpoint.load(str(checkpoint_file))
            return


def test_student_stage_on_two_ranks_resumes_after_a_rank_is_killed(harness, tmp_path: Path, storage_file: str,
                                                                     moco_checkpoint: Path) -> None:
    import threading

    from seed import checkpoint

    config = str(ROOT / "configs" / "demo.yaml")
    overrides = [*TINY, f"teacher.checkpoint={moco_checkpoint}", "cache.views=2", "train.nproc=2", "train.device=cpu",
                 "train.optim.epochs=4", "train.optim.batch_size=25", "train.students=[{arch: resnet10t}]"]
    seed(config=config, overrides=overrides, storage=storage_file, stages=["teacher", "bank"])
    ckpt = tmp_path / "runs" / "flow" / "resnet10t" / "checkpoint.pt"
    seen: dict = {}
    killer = threading.Thread(target=_kill_rank_one_after_first_epoch, args=(ckpt, seen))
    killer.start()
    result = seed(config=config, overrides=overrides, storage=storage_file, stages=["student"])
    killer.join()
    assert "killed" in seen, "no rank was found to kill"
    killed_at = seen["state"]["epoch"]
    assert 1 <= killed_at < 4  # killed mid-run: the retry had epochs left to train
    state = checkpoint.load(str(ckpt))
    assert result["student"]["skipped"] is False and state["epoch"] == 4
    assert [m["epoch"] for m in state["metrics"]] == [1, 2, 3, 4]
    # the retry continued from the checkpoint (the rows before the kill are the first attempt's), not from epoch 0
    assert state["metrics"][:killed_at] == seen["state"]["metrics"]
    # 3 shards split 2 + 1 between the ranks: min(200, 100) // 25 = 4 steps an epoch
    assert all(m["steps"] == 4 for m in state["metrics"])
