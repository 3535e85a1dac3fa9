"""The ``seed`` Prefect flow: pretrain (if needed) -> teacher (a task per shard) -> bank -> students -> evaluation.

Every stage is idempotent at the data level: a stage whose output exists with a matching
fingerprint is skipped with a log line, so ``seed/full`` re-runs only what changed, and
``seed/student`` (stages student + evaluate) never loads the teacher. Prefect's own result
caching is off (``NO_CACHE``): the Zarr completion records are the source of truth and still
hold when Prefect's database is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Iterator
from typing import Any, cast
from uuid import UUID

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import bank as bank_stage
from pipeline import evaluate as evaluate_stage
from pipeline import pretrain as pretrain_stage
from pipeline import student as student_stage
from pipeline import teacher as teacher_stage
from seed import cache
from seed.config import RunConfig, TeacherConfig, from_dict, load_config, to_dict
from seed.devices import resolve_device, set_cpu_threads
from seed.models import Encoder
from seed.report import markdown_table
from seed.storage import Storage, load_storage
from seed.teachers import LoadReport, load_teacher

ALL_STAGES = ["pretrain", "teacher", "bank", "student", "evaluate"]
DEFAULT_CONFIG = "configs/demo.yaml"


def _cfg(data: dict[str, Any]) -> RunConfig:
    return from_dict(RunConfig, data)


_loaded: dict[tuple[TeacherConfig, str], tuple[Encoder, LoadReport]] = {}
_loading = threading.Lock()
_free_gpus: queue.SimpleQueue[int] | None = None


def shared_teacher(cfg: TeacherConfig, device: str = "") -> tuple[Encoder, LoadReport]:
    """One teacher per process, configuration and device: shard tasks in worker threads share it.

    A module-level function (not an object holding the lock), so Dask pickles the tasks that call
    it by reference.
    """
    with _loading:
        if (cfg, device) not in _loaded:
            _loaded[(cfg, device)] = load_teacher(cfg)
        return _loaded[(cfg, device)]


@contextlib.contextmanager
def task_device(setting: str) -> Iterator[str]:
    """The device one shard task uses: with several GPUs in this process and ``cache.device`` auto or
    cuda, a GPU no other task of this process holds (the tasks wait for one); else ``setting``.

    So ``teacher_workers`` = the GPU count runs one shard per GPU at a time. Dask workers pin one GPU
    each by their environment (``CUDA_VISIBLE_DEVICES``): they see one GPU and take it.
    """
    global _free_gpus
    if setting not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        yield setting
        return
    with _loading:
        if _free_gpus is None:
            _free_gpus = queue.SimpleQueue()
            for i in range(torch.cuda.device_count()):
                _free_gpus.put(i)
    gpu = _free_gpus.get()
    try:
        yield f"cuda:{gpu}"
    finally:
        _free_gpus.put(gpu)


def _progress(key: str, description: str) -> UUID:
    """A progress artifact at 0 % (Prefect's sync/async dual API is typed as a union; in a flow it is sync)."""
    return cast(UUID, create_progress_artifact(0.0, key=key, description=description))


@task(cache_policy=NO_CACHE)
def pretrain_teacher(cfg_data: dict[str, Any], storage_file: str | None) -> pretrain_stage.PretrainResult:
    """MoCo-v2 pre-training when the config names no teacher checkpoint (reused when already made)."""
    log = get_run_logger()
    result = pretrain_stage.run(_cfg(cfg_data), load_storage(storage_file), progress=False,
                                on_epoch=lambda e, row: log.info("pretrain epoch %d: %s", e + 1, row["loss"]))
    log.info(("reusing" if result.skipped else "trained") + " teacher %s", result.checkpoint)
    return result


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, task_run_name="teacher-shard-{shard}")
def embed_shard(cfg_data: dict[str, Any], storage_file: str | None, plan: dict[str, Any], shard: int) -> dict[str, Any]:
    """The teacher over one input shard; a task per shard, so shards can run on several workers or machines."""
    cfg = _cfg(cfg_data)
    p = teacher_stage.Plan(**{**plan, "urls": tuple(plan["urls"]), "lengths": tuple(plan["lengths"])})
    group = cache.open_group(p.cache_url, "r+")
    done = cache.shard_record(group, shard)
    if done is not None:  # finished by an earlier (killed) run
        return done
    if resolve_device(cfg.cache.device).type == "cpu":  # same value in every task: no race between threads
        set_cpu_threads(teacher_stage.cpu_threads(group))
    with task_device(cfg.cache.device) as device:
        encoder, _ = shared_teacher(cfg.teacher, device)
        return teacher_stage.embed_shard(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, device=device)),
                                         p, group, shard, encoder)


@flow(name="seed-teacher-shards", log_prints=True)
def teacher_shards(cfg_data: dict[str, Any], storage_file: str | None, plan: dict[str, Any], todo: list[int]) -> int:
    """Submit the shard tasks to this flow's task runner and report progress as they finish."""
    progress = _progress("teacher-progress", "teacher stage: shards done")
    futures = [embed_shard.submit(cfg_data, storage_file, plan, s) for s in todo]
    for n, future in enumerate(as_completed(futures), 1):
        future.result()
        update_progress_artifact(progress, 100.0 * n / len(todo))
    return len(futures)


def run_teacher(cfg: RunConfig, storage: Storage, storage_file: str | None, workers: int,
                dask_address: str | None) -> dict[str, Any]:
    log = get_run_logger()
    plan, group = teacher_stage.prepare(cfg, storage, *shared_teacher(cfg.teacher, cfg.cache.device))
    done = set(cache.done_shards(group))
    todo = [s for s in range(len(plan.urls)) if s not in done]
    if not todo and cache.attributes(group).get("status") == "complete":
        log.info("teacher stage: cache %s is complete with a matching fingerprint; skipped (no teacher forward)",
                 plan.cache_url)
        return dict(cache.attributes(group)["totals"])
    if done:
        log.info("teacher stage: %d of %d shards already done; embedding the other %d", len(done), len(plan.urls), len(todo))
    if dask_address:
        from prefect_dask import DaskTaskRunner  # optional: pip install seed-distill[dask]

        runner: Any = DaskTaskRunner(address=dask_address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=max(1, workers))
    plan_data = dataclasses.asdict(plan)
    teacher_shards.with_options(task_runner=runner)(to_dict(cfg), storage_file, plan_data, todo)
    totals = cache.finalize(cache.open_group(plan.cache_url, "r+"), plan.cache_url)
    log.info("teacher stage complete: %s", totals)
    return totals


@task(cache_policy=NO_CACHE)
def build_bank(cfg_data: dict[str, Any], storage_file: str | None) -> bank_stage.BankResult:
    log = get_run_logger()
    result = bank_stage.run(_cfg(cfg_data), load_storage(storage_file), progress=False)
    s = result.summary
    if result.skipped:
        log.info("bank stage: bank of %s complete with a matching fingerprint; skipped", result.cache)
    else:
        log.info("bank stage: %s views at %.0f views/s; captured mass mean %.4f", s["views"], s["views_per_s"],
                 s["fidelity"]["mass"]["mean"])
    return result


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_students(cfg_data: dict[str, Any], storage_file: str | None) -> student_stage.StudentResult:
    """The students, in this process or, with ``train.nproc`` > 1, in ranks started by torchrun.

    A crashed attempt (a rank killed, a node rebooted) is retried once by Prefect; every attempt,
    and every re-run of the flow, continues from the last epoch checkpoint of the same config.
    """
    log = get_run_logger()
    cfg, storage = _cfg(cfg_data), load_storage(storage_file)
    epochs = cfg.train.optim.epochs
    done = student_stage.completed(cfg, storage)
    if done is not None:
        log.info("student stage: run %s already trained for %d epochs on this cache and bank; skipped", cfg.train.run, epochs)
        return done
    start = student_stage.resumable(cfg, storage)
    if start:
        log.info("student stage: run %s continues from its epoch %d checkpoints", cfg.train.run, start)
    progress = _progress("student-progress", "student stage: epochs done")

    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        update_progress_artifact(progress, 100.0 * (epoch + 1) / epochs)
        losses = ", ".join(f"{name} {value:.4f}" for name, value in row["loss"].items())
        log.info("epoch %d/%d: loss %s; %.0f images/s", epoch + 1, epochs, losses, row["images_per_s"])

    nproc = student_stage.processes(cfg)
    if nproc > 1:
        log.info("student stage: %d processes (torchrun)", nproc)
        result = student_stage.launch(cfg, storage, resume=start > 0, on_epoch=on_epoch, on_line=log.info)
    else:
        result = student_stage.run(cfg, storage, resume=start > 0, progress=False, on_epoch=on_epoch, load=shared_teacher)
    create_table_artifact([{"epoch": m["epoch"], "seconds": m["seconds"], "images_per_s": m["images_per_s"],
                            "teacher_forwards": m["teacher_forwards"], **{f"loss {k}": round(v, 4) for k, v in m["loss"].items()}}
                           for m in result.metrics], key="student-metrics", description=f"run {cfg.train.run}")
    return result


@task(cache_policy=NO_CACHE)
def evaluate(cfg_data: dict[str, Any], storage_file: str | None, include_teacher: bool) -> evaluate_stage.EvaluationResult:
    result = evaluate_stage.run(_cfg(cfg_data), load_storage(storage_file), include_teacher=include_teacher,
                                progress=False, load=shared_teacher)
    table = markdown_table(result.results, [("name", "encoder"), ("knn", "kNN top-1 (%)"), ("nn1", "1-NN (%)"),
                                            ("linear", "linear (%)"), ("probe", "probe"), ("init", "notes")])
    create_markdown_artifact(f"# Evaluation\n\n{table}\n\nReport: `{result.report}`\n", key="evaluation")
    return result


def _overrides(overrides: list[str], run: str | None, student_arch: str | None, epochs: int | None) -> list[str]:
    out = list(overrides)
    if run:
        out.append(f"train.run={run}")
    if student_arch:
        out.append(f"train.students=[{{arch: {student_arch}}}]")
    if epochs:
        out.append(f"train.optim.epochs={epochs}")
    return out


@flow(name="seed", log_prints=True)
def seed(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None, stages: list[str] | None = None,
         run: str | None = None, student_arch: str | None = None, epochs: int | None = None,
         storage: str | None = None, teacher_workers: int = 1, dask_address: str | None = None) -> dict[str, Any]:
    """SEED with a run-once teacher cache.

    Args:
        config: run config YAML. overrides: ``section.field=value`` strings.
        stages: any of pretrain, teacher, bank, student, evaluate (default: all).
        run, student_arch, epochs: shortcuts for train.run, train.students, train.optim.epochs.
        storage: storage.yaml (default: ./storage.yaml). teacher_workers: shard tasks at once.
        dask_address: run the shard tasks on this Dask scheduler (several machines, one cache).
    """
    log = get_run_logger()
    stages = list(stages or ALL_STAGES)
    unknown = sorted(set(stages) - set(ALL_STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {ALL_STAGES}")
    cfg = load_config(config, _overrides(overrides or [], run, student_arch, epochs))
    store = load_storage(storage)
    result: dict[str, Any] = {"stages": stages}
    if "pretrain" in stages and not cfg.teacher.checkpoint:
        made = pretrain_teacher(to_dict(cfg), storage)
        cfg = dataclasses.replace(cfg, teacher=made.teacher)
        result["pretrain"] = made.checkpoint
    if "teacher" in stages:
        result["teacher"] = run_teacher(cfg, store, storage, teacher_workers, dask_address)
        url = store.cache_url(cfg.cache.name)
        info = cache.attributes(cache.open_group(url, "r"))
        create_table_artifact([{"cache": url, "N": info["N"], "V": info["V"], "D": info["D"], **info["totals"]}],
                              key="cache-summary", description="teacher cache")
    if "bank" in stages:
        built = build_bank(to_dict(cfg), storage)
        result["bank"] = {"skipped": built.skipped, **{k: v for k, v in built.summary.items() if k != "fields"}}
    if "student" in stages:
        trained = train_students(to_dict(cfg), storage)
        result["student"] = {"run": trained.run, "students": trained.students, "skipped": trained.skipped,
                             "teacher_forwards": trained.teacher_forwards}
    if "evaluate" in stages:
        include_teacher = "teacher" in stages and bool(cfg.teacher.checkpoint)
        scored = evaluate(to_dict(cfg), storage, include_teacher)
        result["evaluation"] = {"report": scored.report, "results": scored.results}
        log.info("report: %s", scored.report)
    return result
