"""The Prefect flow: full, then student-only without the teacher; skips; Dask; refusal; the followed transcript."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from flows.seed_flow import seed
from seed import cache
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


def _follow(state) -> tuple[int, str, list]:
    """What ``python -m flows.follow`` prints for a finished run, its exit code and the run's artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.follow import follow

    APILogHandler().flush()  # the run's last log batch
    lines: list[str] = []
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        code = follow(client, run_id, lines.append, poll=0.2, quiet=0.5)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return code, "\n".join(lines), artifacts


def test_full_then_student_only(harness, tmp_path: Path, storage_file: str) -> None:
    config = str(ROOT / "configs" / "demo.yaml")
    state = seed(config=config, overrides=TINY, storage=storage_file, return_state=True)
    first = state.result()
    assert first["pretrain"].endswith("flow-teacher/teacher.pth")
    assert first["teacher"]["teacher_forwards"] == 300 * 2 == _forwards(tmp_path)
    assert first["student"]["skipped"] is False and Path(first["evaluation"]["report"]).exists()
    assert [r["kind"] for r in first["evaluation"]["results"]].count("teacher") == 1

    # the followed transcript: link, a banner per stage in order, progress, losses as the project recorded them
    code, text, artifacts = _follow(state)
    assert code == 0, text
    assert "Prefect UI: http://127.0.0.1:" in text and f"/runs/flow-run/{state.state_details.flow_run_id}" in text
    banners = [text.index(f"== [{i}/5] {stage}: ") for i, stage in enumerate(["pretrain", "teacher", "bank", "student",
                                                                              "evaluate"], 1)]
    assert banners == sorted(banners), text
    assert re.search(r"pretrain epoch 1/1: moco loss \d+\.\d+, [\d,]+ images/s", text), text
    assert "teacher: 3/3 shards embedded (100 %)" in text and "teacher stage complete: 300 images (300 valid" in text
    loss = json.loads((tmp_path / "runs" / "flow" / "mobilenetv3_small_050" / "metrics.jsonl").read_text())["loss"]
    assert f"student epoch 1/1: mobilenetv3_small_050 loss {loss:#.4g}, " in text
    assert f"| {loss:#.4g} |" in Path(first["evaluation"]["report"]).read_text()  # the report's loss column: 4 digits
    assert re.search(r"mobilenetv3_small_050 \(cached SEED\) +kNN +\d+\.\d %", text), text
    assert re.search(r"flow run \S+: Completed in \d+", text.splitlines()[-1]), text
    for noise in ("{'", "Finished in state Completed", "Created task run", "prefect.flow-run"):
        assert noise not in text, (noise, text)
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert set(progress) == {"pretrain-progress", "teacher-progress", "student-progress",
                             "evaluation-progress"}  # all on the run's own page
    assert all(a.data == 100.0 for a in progress.values())
    assert progress["teacher-progress"].description == "teacher stage: 3 of 3 shards embedded"
    assert progress["student-progress"].description == "student run flow: 1 of 1 epochs"
    assert progress["evaluation-progress"].description == "evaluation: 4 rows in the report"

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
    state = seed(config=str(ROOT / "configs" / "demo.yaml"), overrides=[*TINY, "cache.name=absent"], storage=storage_file,
                 stages=["student"], return_state=True)
    with pytest.raises(SeedError, match="no cache at .*absent.zarr"):
        state.result()
    code, text, _ = _follow(state)
    assert code == 1 and "== [1/1] student: " in text
    assert "Traceback" not in text and text.count("no cache at") == 1, text  # said once, before any task runs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:  # the run's own log (the UI's): the mistake without a traceback
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert any("no cache at" in log.message for log in logs) and not any("Traceback" in log.message for log in logs)
    assert re.search(r"flow run \S+: Failed after \d+ s: .*no cache at .*absent\.zarr", text), text


def test_a_crash_is_retried_and_a_user_mistake_is_not(harness) -> None:
    """The stages' retry condition in Prefect's own task engine: one attempt for a ``SeedError``, two for a crashed
    process or any other failure."""
    from prefect import flow, task

    from flows.seed_flow import retry_a_crash
    from seed.errors import MachineError

    attempts: list[str] = []

    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=retry_a_crash)
    def fails(error: Exception) -> None:
        attempts.append(type(error).__name__)
        raise error

    @flow
    def run(error: Exception) -> None:
        fails(error)

    for error in (SeedError("a foreign cache"), MachineError("a rank was killed"), OSError("no space left")):
        assert run(error, return_state=True).is_failed()
    assert attempts == ["SeedError", "MachineError", "MachineError", "OSError", "OSError"]


def test_a_damaged_shard_fails_the_teacher_task_once(harness, tmp_path: Path, shards_root: Path,
                                                     moco_checkpoint: Path) -> None:
    """A user's mistake inside a stage's task (a shard cut short, ``data.damaged=fail``) is reported after one
    attempt: a retry would read the same damaged file."""
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    data = tmp_path / "shards" / "fm" / "train"
    data.mkdir(parents=True)
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "_info.json"):
        shutil.copy(shards_root / "fm" / "train" / name, data)
    cut = data / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 300])
    storage_file = tmp_path / "storage.yaml"
    storage_file.write_text(f"shards: {tmp_path / 'shards'}\ncaches: {tmp_path}/caches\nruns: {tmp_path}/runs\n"
                            f"reports: {tmp_path}/reports\n")
    state = seed(config=str(ROOT / "configs" / "demo.yaml"),
                 overrides=[*TINY, f"teacher.checkpoint={moco_checkpoint}", "cache.name=cut"],
                 storage=str(storage_file), stages=["teacher"], return_state=True)
    with pytest.raises(SeedError, match="damaged tar shard"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    teacher = [r for r in runs if r.name.startswith("embed_here")]
    assert len(teacher) == 1 and teacher[0].run_count == 1, [(r.name, r.run_count) for r in runs]


def test_bad_flow_parameters_are_refused_before_any_stage(harness, storage_file: str) -> None:
    """Checked against the flow's parameter types (the same schema the Prefect server checks a deployment run's
    parameters against when the run is created)."""
    from prefect.exceptions import ParameterTypeError

    config = str(ROOT / "configs" / "demo.yaml")
    for params, message in (({"teacher_workers": -1}, "teacher_workers: Input should be greater than or equal to 0"),
                            ({"evaluate_workers": -2}, "evaluate_workers: Input should be greater than or equal to 0"),
                            ({"stages": ["teacher", "train"]}, r"stages.1: Input should be 'pretrain', 'teacher'"),
                            ({"stages": []}, "stages: List should have at least 1 item"),
                            ({"epochs": 0}, "epochs: Input should be greater than or equal to 1")):
        state = seed(config=config, overrides=TINY, storage=storage_file, return_state=True, **params)
        with pytest.raises(ParameterTypeError, match=message):
            state.result()
        code, text, _ = _follow(state)
        assert code == 1 and "== [" not in text, text  # no stage started


def test_dask_cluster_writes_the_same_cache_as_one_process(harness, tmp_path: Path, storage_file: str,
                                                           moco_checkpoint: Path) -> None:
    import dask
    from distributed import LocalCluster

    overrides = [*TINY, f"teacher.checkpoint={moco_checkpoint}"]
    config = str(ROOT / "configs" / "demo.yaml")
    seed(config=config, overrides=[*overrides, "cache.name=serial"], storage=storage_file, stages=["teacher"])
    environ = dict(os.environ)  # distributed sets OMP_NUM_THREADS=1 etc. in this process's environment
    try:
        # Dask's default workers are daemonic, so a shard task may not start a data worker process: it reads in a
        # thread; workers started non-daemonic give each task one (cache.workers=1: the CPU rule alone gives none)
        for name, daemon in (("dask", True), ("dask-workers", False)):
            with dask.config.set({"distributed.worker.daemon": daemon}), LocalCluster(
                    n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
                seed(config=config, overrides=[*overrides, f"cache.name={name}", "cache.workers=1"], storage=storage_file,
                     stages=["teacher"], dask_address=cluster.scheduler_address)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    for name, workers in (("dask", 0), ("dask-workers", 1)):
        b = _assert_same_cache(tmp_path, "serial", name)
        assert b.attrs["status"] == "complete" and b.attrs["totals"]["teacher_forwards"] == 600
        assert {cache.shard_record(b, s)["workers"] for s in range(3)} == {workers}, name


def _assert_same_cache(tmp_path: Path, one: str, other: str) -> zarr.Group:
    a = zarr.open_group(str(tmp_path / "caches" / f"{one}.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "caches" / f"{other}.zarr"), mode="r")
    for name in ("embeddings", "augment", "keys", "labels", "valid"):
        x, y = a[name][:], b[name][:]
        assert (x.tobytes() == y.tobytes()) if x.dtype.kind == "f" else np.array_equal(x, y), name
    return b


def test_teacher_workers_run_the_stage_in_processes_and_write_the_same_cache(harness, tmp_path: Path, storage_file: str,
                                                                            moco_checkpoint: Path) -> None:
    """``teacher_workers=2``: the flow's teacher stage runs as ``seed teacher --procs 2`` (two processes, each pinned
    to its share of the cores), reports its shards as they finish, and writes the bytes of the default layout, here
    with a data worker process started from the flow's task."""
    config = str(ROOT / "configs" / "demo.yaml")
    overrides = [*TINY, f"teacher.checkpoint={moco_checkpoint}", "cache.cpu_threads=2"]
    seed(config=config, overrides=[*overrides, "cache.name=here", "cache.workers=1"], storage=storage_file,
         stages=["teacher"])
    state = seed(config=config, overrides=[*overrides, "cache.name=procs"], storage=storage_file, stages=["teacher"],
                 teacher_workers=2, return_state=True)
    assert state.result()["teacher"]["teacher_forwards"] == 600
    procs = _assert_same_cache(tmp_path, "here", "procs")
    here = zarr.open_group(str(tmp_path / "caches" / "here.zarr"), mode="r")
    cores = len(os.sched_getaffinity(0))
    assert {(cache.shard_record(here, s)["cores"], cache.shard_record(here, s)["workers"]) for s in range(3)} == {(cores, 1)}
    if cores >= 2:
        assert {cache.shard_record(procs, s)["cores"] for s in range(3)} <= {cores // 2, cores - cores // 2}
    code, text, artifacts = _follow(state)
    assert code == 0, text
    assert "teacher stage: 2 processes (seed teacher --procs)" in text and "teacher: 3/3 shards embedded (100 %)" in text
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert progress["teacher-progress"].data == 100.0


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
    """Wait for the first checkpoint, then SIGKILL the torchrun rank with LOCAL_RANK=1."""
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
            seen["parent"] = [v for v in environ if v.startswith(b"SEED_PARENT_PID=")]
            seen["state"] = checkpoint.load(str(checkpoint_file))
            return


def test_student_stage_on_two_ranks_resumes_after_a_rank_is_killed(harness, tmp_path: Path, storage_file: str,
                                                                     moco_checkpoint: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import threading

    from seed import checkpoint

    config = str(ROOT / "configs" / "demo.yaml")
    overrides = [*TINY, f"teacher.checkpoint={moco_checkpoint}", "cache.views=2", "train.nproc=2", "train.device=cpu",
                 "train.optim.epochs=4", "train.optim.batch_size=25", "train.students=[{arch: resnet10t}]",
                 "train.checkpoint_steps=2"]
    seed(config=config, overrides=overrides, storage=storage_file, stages=["teacher", "bank"])
    ckpt = tmp_path / "runs" / "flow" / "resnet10t" / "checkpoint.pt"
    seen: dict = {}
    killer = threading.Thread(target=_kill_rank_one_after_first_epoch, args=(ckpt, seen))
    killer.start()
    with caplog.at_level(logging.INFO):
        result = seed(config=config, overrides=overrides, storage=storage_file, stages=["student"])
    killer.join()
    assert "killed" in seen, "no rank was found to kill"
    # through torchrun, each rank knows the launching process (this one), and would end with it (seed.lifetime)
    assert seen["parent"] == [f"SEED_PARENT_PID={os.getpid()}".encode()]
    # killed once the first checkpoint was written, at step 2 of epoch 1 (train.checkpoint_steps) or later
    killed_at = checkpoint.Position.of(seen["state"])
    assert checkpoint.Position(0, 2) <= killed_at < checkpoint.Position(4)  # the retry had steps left to train
    state = checkpoint.load(str(ckpt))
    assert result["student"]["skipped"] is False and state["epoch"] == 4
    assert [m["epoch"] for m in state["metrics"]] == [1, 2, 3, 4]
    # the retry continued from the checkpoint (the rows before the kill are the first attempt's), not from epoch 0
    assert state["metrics"][:killed_at.epoch] == seen["state"]["metrics"]
    assert f"run flow continues from its checkpoints at {killed_at}" in caplog.text, caplog.text[-3000:]
    # 3 shards split 2 + 1 between the ranks: min(200, 100) // 25 = 4 steps an epoch
    assert all(m["steps"] == 4 for m in state["metrics"])


def test_pretraining_on_two_ranks_in_the_flow(harness, tmp_path: Path, storage_file: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """``pretrain.nproc=2``: the flow's pre-training task starts torchrun, relays rank 0's epochs to the run's log,
    and hands the teacher the ranks made to the next stage."""
    import logging

    from seed import checkpoint

    config = str(ROOT / "configs" / "demo.yaml")
    overrides = [*TINY, "pretrain.nproc=2", "pretrain.device=cpu", "pretrain.optim.batch_size=32"]
    with caplog.at_level(logging.INFO):
        result = seed(config=config, overrides=overrides, storage=storage_file, stages=["pretrain"])
    assert "pre-training: 2 processes (torchrun)" in caplog.text, caplog.text[-3000:]
    assert re.search(r"pretrain epoch 1/1: moco loss \d+\.\d+", caplog.text), caplog.text[-3000:]
    made = checkpoint.load(result["pretrain"])
    # 3 shards split 2 + 1 between the ranks: min(200, 100) // 32 = 3 steps an epoch, on each rank
    assert made["trains"]["ranks"] == 2 and [m["steps"] for m in made["metrics"]] == [3]
    state = checkpoint.load(str(tmp_path / "runs" / "flow-teacher" / "moco" / "checkpoint.pt"))
    assert state["world"] == 2 and state["epoch"] == 1


def test_parameters_a_deployment_run_cannot_take_are_refused_by_the_server_in_one_line(harness, capsys) -> None:
    """``flows.follow --deployment seed/full --param teacher_workers=-1``: the server checks the parameters
    against the flow's types when it creates the run and refuses (HTTP 409); follow says what it refused,
    in one line, instead of calling the server unreachable."""
    from flows.follow import main
    from flows.serve import deployments

    for deployment in deployments():
        deployment.apply()
    for param, refused in (("teacher_workers=-1", "teacher_workers"), ('stages=["student", "train"]', "stages")):
        assert main(["--deployment", "seed/full", "--param", param]) == 2
        err = capsys.readouterr().err
        assert err.startswith("follow: the Prefect server at ") and "refused it (HTTP 409)" in err, err
        assert refused in err and "cannot reach" not in err and err.count("\n") == 1, err


def test_library_lines_logged_from_a_thread_of_the_run_reach_its_log(harness) -> None:
    """The data path logs from threads it starts (the prefetcher: a damaged sample kept, say); those threads have
    no Prefect run context, and their lines still reach the run's log (the UI, flows.follow)."""
    import logging
    import threading

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.seed_flow import _current_run, forward_library_logs, stop_forwarding

    @flow(on_completion=[stop_forwarding])
    def with_a_thread() -> None:
        forward_library_logs()
        worker = threading.Thread(target=lambda: logging.getLogger("seed.shards").warning("kept a damaged sample"))
        worker.start()
        worker.join()

    state = with_a_thread(return_state=True)
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert any(log.message == "kept a damaged sample" for log in logs), [log.message for log in logs]
    assert _current_run == []  # after the run, a thread's line goes to no run (no server needed to drop it)
