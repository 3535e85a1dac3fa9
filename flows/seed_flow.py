"""The ``seed`` Prefect flow: pretrain (if needed) -> teacher -> bank -> students -> evaluation.

The teacher stage runs as ``seed teacher`` does (one task: this process with its data workers, or
``teacher_workers`` processes, one per GPU), or with ``dask_address`` as one task per shard on a Dask
cluster.

Every stage is idempotent at the data level: a stage whose output exists with a matching
fingerprint is skipped with a log line, so ``seed/full`` re-runs only what changed, and
``seed/student`` (stages student + evaluate) never loads the teacher. Prefect's own result
caching is off (``NO_CACHE``): the Zarr completion records are the source of truth and still
hold when Prefect's database is gone.

The run's log reads as a transcript (``flows.follow`` prints it in a terminal): a banner per stage
(``== [2/5] teacher: ...``), progress (teacher shards done of total, training steps and epochs with
their losses) and each stage's outcome in words; the library's own ``seed.*`` log lines (the
training loop's progress) and ``pipeline.*`` warnings go to the run's log too. Progress artifacts
(``pretrain-progress``, ``teacher-progress``, ``student-progress``, ``evaluation-progress``) belong to the
flow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal, cast
from uuid import UUID

import torch
from pydantic import Field
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import as_completed
from prefect.logging.handlers import APILogHandler

from pipeline import bank as bank_stage
from pipeline import evaluate as evaluate_stage
from pipeline import pretrain as pretrain_stage
from pipeline import student as student_stage
from pipeline import teacher as teacher_stage
from seed import cache
from seed.config import RunConfig, TeacherConfig, from_dict, load_config, require_cache, to_dict
from seed.devices import resolve_device, set_cpu_threads
from seed.errors import MachineError, SeedError
from seed.models import Encoder
from seed.report import epoch_text, loss_text, markdown_table, teacher_totals_text
from seed.storage import Storage, is_url, load_storage
from seed.teachers import LoadReport, load_teacher

ALL_STAGES = ["pretrain", "teacher", "bank", "student", "evaluate"]
Stage = Literal["pretrain", "teacher", "bank", "student", "evaluate"]  # the flow's parameter schema names them
DEFAULT_CONFIG = "configs/demo.yaml"


def _cfg(data: dict[str, Any]) -> RunConfig:
    return from_dict(RunConfig, data)


def retry_a_crash(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for the stages' tasks: retry the machine's failures (a killed rank or process,
    a lost connection, a full disk since cleared: ``MachineError``, ``OSError``, anything else), not a user's
    mistake (a ``SeedError``), which fails the same way again. What the failed attempt finished is kept and
    the retry continues from there."""
    try:
        state.result()
    except MachineError:
        return True
    except SeedError:
        return False
    except BaseException:
        return True
    return True


_loaded: dict[tuple[TeacherConfig, str, Any], tuple[Encoder, LoadReport]] = {}
_loading = threading.Lock()
_free_gpus: queue.SimpleQueue[int] | None = None


def shared_teacher(cfg: TeacherConfig, device: str = "") -> tuple[Encoder, LoadReport]:
    """One teacher per process, configuration and device: a flow run's stages, and the Dask shard tasks in a
    worker's threads, share it.

    A module-level function (not an object holding the lock), so Dask pickles the tasks that call
    it by reference. With a ``device``, the teacher is moved there (and on CUDA to channels-last) once, here,
    as the teacher stage would: a first conversion swaps the parameters' storage, which must not happen
    while another task's thread replays a CUDA graph that reads them.
    """
    key = (cfg, device, _file_identity(cfg.checkpoint))  # a checkpoint rewritten at its path is loaded again
    with _loading:
        if key not in _loaded:
            encoder, report = load_teacher(cfg)
            if device:
                dev = resolve_device(device)
                encoder.to(dev)
                if dev.type == "cuda":
                    encoder.to(memory_format=torch.channels_last)
            _loaded[key] = encoder, report
        return _loaded[key]


def release_device_teachers() -> None:
    """Drop the teachers ``shared_teacher`` moved to a device (the teacher stage's): the stages after it load
    their own copy where they need one, and a teacher left on the GPU would hold its memory through the
    students' training."""
    with _loading:
        for key in [k for k in _loaded if k[1]]:
            del _loaded[key]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _file_identity(path: str | None) -> Any:
    """What tells a rewritten file at ``path`` from the one before: its size and modification time (None for no
    checkpoint or one not on a local file system: a URL is taken as it was first read)."""
    if not path or is_url(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def task_device(setting: str) -> Iterator[str]:
    """The device one shard task (the Dask layout) uses: with several GPUs in this process and ``cache.device``
    auto or cuda, a GPU no other task of this process holds (the tasks wait for one); else ``setting``.

    So a Dask worker that sees several GPUs, with as many threads, runs one shard per GPU at a time. Dask
    workers pinned to one GPU each by their environment (``CUDA_VISIBLE_DEVICES``) see one GPU and take it.
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


_current_run: list[UUID] = []  # the flow run that last routed the library's logs in this process


def _in_run(record: logging.LogRecord) -> bool:
    """Whether a library line goes to a run's log: from a run's own thread, or from a thread the library started
    (a data prefetcher, whose context has no run) while a run of this process routes them, to that run."""
    if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
        return True
    if _current_run:
        record.flow_run_id = _current_run[0]
        return True
    return False


def stop_forwarding(flow: Any = None, flow_run: Any = None, state: Any = None) -> None:
    """The end of the run that forwarded the library's lines (a flow's state hook: flow, flow run, state): lines
    from threads are no longer its, and outside a run are not sent (a process that goes on, a test or a script
    calling flows in turn, would otherwise send them to a finished run, through a server that may be gone)."""
    _current_run.clear()


def _user_mistake_without_traceback(record: logging.LogRecord) -> bool:
    """Prefect's engines log a run's exception with its traceback; a ``SeedError`` (a user's mistake, said in
    one line) keeps the line and loses the traceback."""
    if record.exc_info and isinstance(record.exc_info[1], SeedError):
        record.exc_info, record.exc_text = None, None
    return True


def forward_library_logs() -> None:
    """Send the library's log lines (``seed.*`` from INFO: training progress; ``pipeline.*`` warnings)
    to the current flow run's log, handlers added once per process; lines logged outside any run are not sent.
    And log a user's mistake (``SeedError``) in the run without a traceback. The flow calls ``stop_forwarding``
    as it ends (its state hooks)."""
    run = FlowRunContext.get()
    if run is not None and run.flow_run is not None:
        _current_run[:] = [run.flow_run.id]
    for name in ("seed", "pipeline"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = APILogHandler(level=logging.INFO)
            handler.addFilter(_in_run)
            logger.addHandler(handler)
    logging.getLogger("seed").setLevel(logging.INFO)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if _user_mistake_without_traceback not in logger.filters:
            logger.addFilter(_user_mistake_without_traceback)


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}" if seconds > 0 else "-"


def _retrying() -> bool:
    """Whether this task run is a retry (Prefect's second attempt after a crash)."""
    ctx = TaskRunContext.get()
    return ctx is not None and ctx.task_run.run_count > 1


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_a_crash)
def pretrain_teacher(cfg_data: dict[str, Any], storage_file: str | None) -> pretrain_stage.PretrainResult:
    """MoCo-v2 pre-training when the config names no teacher checkpoint (reused when already made), in this
    process or, with ``pretrain.nproc`` > 1, in ranks started by torchrun. A pre-training of the same settings
    that stopped part-way (a crashed attempt, retried once, or an earlier run of the flow) continues from its
    last checkpoint (an epoch's end, or a step inside one)."""
    log = get_run_logger()
    cfg = _cfg(cfg_data)
    epochs = cfg.pretrain.optim.epochs
    progress = _progress("pretrain-progress", f"pre-training {cfg.pretrain.name}: 0 of {epochs} epochs")

    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        update_progress_artifact(progress, 100.0 * (epoch + 1) / epochs,
                                 description=f"pre-training {cfg.pretrain.name}: {epoch + 1} of {epochs} epochs")
        log.info(epoch_text("pretrain", epoch + 1, epochs, row))

    storage = load_storage(storage_file)
    start = pretrain_stage.resumable(cfg, storage)
    if start:
        log.info("pre-training %s continues from its checkpoint at %s", cfg.pretrain.name, start)
    resume = bool(start) or _retrying()
    if pretrain_stage.processes(cfg) > 1:  # the launcher logs that the ranks start, when they do
        result = pretrain_stage.launch(cfg, storage, resume=resume, on_epoch=on_epoch, on_line=log.info)
    else:
        result = pretrain_stage.run(cfg, storage, resume=resume, progress=False, on_epoch=on_epoch)
    if result.skipped:
        update_progress_artifact(progress, 100.0, description=f"pre-training {cfg.pretrain.name}: reused")
    log.info(("reusing the teacher made earlier: " if result.skipped else "teacher written: ") + result.checkpoint)
    return result


class ShardProgress:
    """The teacher stage's progress as shards finish (``__call__`` takes each shard's completion record): the
    progress artifact and a line ``teacher: 16/20 shards embedded (80 %), 3,042 views/s``, at most every
    ``every`` seconds and for the last shard. (Each is a call to the Prefect server, made between the
    stage's batches: once per shard they cost the demo's stage several percent.)"""

    def __init__(self, log: Any, progress: UUID | None, total: int, before: int, every: float = 10.0):
        self.log, self.progress, self.total, self.done, self.every = log, progress, total, before, every
        self.views = 0
        self.t0 = self.last = time.perf_counter()

    def __call__(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.views += int(record["teacher_forwards"])
        now = time.perf_counter()
        if self.done == self.total or now - self.last >= self.every:
            self.last = now
            if self.progress is not None:
                update_progress_artifact(self.progress, 100.0 * self.done / self.total,
                                         description=f"teacher stage: {self.done} of {self.total} shards embedded")
            self.log.info("teacher: %d/%d shards embedded (%d %%), %s views/s", self.done, self.total,
                          100 * self.done // self.total, _rate(self.views, now - self.t0))


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_a_crash)
def embed_here(cfg_data: dict[str, Any], storage_file: str | None, processes: int, total: int,
               progress: UUID | None) -> dict[str, Any]:
    """The teacher stage on this machine, as ``seed teacher`` runs it: in this process, its data path in
    ``cache.workers`` worker processes, or (``processes`` other than 1) as ``seed teacher --procs``, process i on
    ``cuda:i`` (0: one per visible GPU; on the CPU, pinned shares of the cores). The cache's totals.

    A crashed attempt is retried once; it, like a re-run, embeds only the shards without a completion record.
    The flow's ``run_teacher`` has tidied the cache and taken back repaired shards (``teacher_stage.prepare``),
    so this does not again.
    """
    log = get_run_logger()
    cfg, storage = _cfg(cfg_data), load_storage(storage_file)
    before = len(cache.done_shards(cache.open_group(storage.cache_url(cfg.cache.name), "r")))  # a retry counts its own
    report = ShardProgress(log, progress, total, before)
    if processes == 1:
        result = teacher_stage.run(cfg, storage, progress=False, on_shard=report, tidy=False,
                                   load=functools.partial(shared_teacher, device=cfg.cache.device))
    else:
        log.info("teacher stage: %s (seed teacher --procs)", f"{processes} processes" if processes else "a process per GPU")
        result = teacher_stage.run_processes(cfg, storage, processes, progress=False, on_shard=report, tidy=False)
    assert result.totals is not None  # every shard is done: the stage marked the cache complete
    return result.totals


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_a_crash,
      task_run_name="teacher-shard-{shard}")
def embed_shard(cfg_data: dict[str, Any], storage_file: str | None, plan: dict[str, Any], shard: int) -> dict[str, Any]:
    """The teacher over one input shard: the Dask layout's task, so shards run on several machines."""
    cfg = _cfg(cfg_data)
    load_storage(storage_file)  # its storage options (an object store's endpoint, credentials) in this worker process
    p = teacher_stage.Plan(**{**plan, "urls": tuple(plan["urls"]), "lengths": tuple(plan["lengths"])})
    group = cache.open_group(p.cache_url, "r+")
    done = cache.shard_record(group, shard)
    if done is not None:  # finished by an earlier (killed) run
        return done
    if resolve_device(cfg.cache.device).type == "cpu":  # same value in every task: no race between threads
        set_cpu_threads(teacher_stage.cpu_threads(group))
    with task_device(cfg.cache.device) as device:
        encoder, _ = shared_teacher(cfg.teacher, device)
        workers = teacher_stage.shard_task_workers(cfg.cache.workers, resolve_device(device))
        return teacher_stage.embed_shard(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, device=device)),
                                         p, group, shard, encoder, workers=workers)


@flow(name="seed-teacher-shards", log_prints=True)
def teacher_shards(cfg_data: dict[str, Any], storage_file: str | None, plan: dict[str, Any], todo: list[int],
                   progress: UUID | None = None) -> int:
    """Submit the shard tasks to this flow's task runner (Dask's) and report progress as they finish.

    ``progress``: the parent flow's progress artifact, so it shows on the ``seed`` run's page.
    """
    total = len(plan["urls"])
    report = ShardProgress(get_run_logger(), progress, total, total - len(todo))
    futures = [embed_shard.submit(cfg_data, storage_file, plan, s) for s in todo]
    for future in as_completed(futures):
        report(future.result())
    return len(futures)


def run_teacher(cfg: RunConfig, storage: Storage, storage_file: str | None, workers: int,
                dask_address: str | None) -> dict[str, Any]:
    log = get_run_logger()
    if workers != 1 and not dask_address:  # as seed teacher --procs: a new cache records its processes' threads
        cfg = teacher_stage.processes_config(cfg, workers)
    plan, group = teacher_stage.prepare(cfg, storage, *shared_teacher(cfg.teacher, cfg.cache.device))
    done = set(cache.done_shards(group))
    todo = [s for s in range(len(plan.urls)) if s not in done]
    if not todo and cache.attributes(group).get("status") == "complete":
        log.info("teacher stage: cache %s is complete with a matching fingerprint; skipped (no teacher forward)",
                 plan.cache_url)
        return dict(cache.attributes(group)["totals"])
    if done:
        log.info("teacher stage: %d of %d shards already done; embedding the other %d", len(done), len(plan.urls), len(todo))
    progress = _progress("teacher-progress", f"teacher stage: {len(done)} of {len(plan.urls)} shards embedded")
    if dask_address:
        try:
            from prefect_dask import DaskTaskRunner  # optional: pip install seed-distill[dask]
        except ImportError as exc:
            raise SeedError(f"dask_address={dask_address} needs prefect-dask, which is not installed: "
                            "pip install 'seed-distill[dask]'") from exc

        runner: Any = DaskTaskRunner(address=dask_address)
        teacher_shards.with_options(task_runner=runner)(to_dict(cfg), storage_file, dataclasses.asdict(plan), todo,
                                                        progress)
        totals = cache.finalize(cache.open_group(plan.cache_url, "r+"), plan.cache_url)
    else:
        totals = embed_here(to_dict(cfg), storage_file, workers, len(plan.urls), progress)
    log.info("teacher stage complete: %s -> %s", teacher_totals_text(totals), plan.cache_url)
    return totals


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_a_crash)
def build_bank(cfg_data: dict[str, Any], storage_file: str | None) -> bank_stage.BankResult:
    """The bank stage; a crashed attempt is retried once and resumes from the target blocks it recorded."""
    log = get_run_logger()
    result = bank_stage.run(_cfg(cfg_data), load_storage(storage_file), progress=False)
    s = result.summary
    if result.skipped:
        log.info("bank stage: bank of %s complete with a matching fingerprint; skipped", result.cache)
    else:
        log.info("bank stage: K=%d entries, top-%d targets of %s views at %s views/s; the top-k capture %.1f %% of "
                 "p_T's mass on average", s["K"], s["topk"], f"{s['views']:,}", f"{s['views_per_s']:,.0f}",
                 100 * s["fidelity"]["mass"]["mean"])
    return result


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_a_crash)
def train_students(cfg_data: dict[str, Any], storage_file: str | None) -> student_stage.StudentResult:
    """The students, in this process or, with ``train.nproc`` > 1, in ranks started by torchrun.

    A crashed attempt (a rank killed, a node rebooted) is retried once by Prefect; every attempt,
    and every re-run of the flow, continues from the last checkpoint of the same config (an epoch's end, or a
    step inside one: ``train.checkpoint_steps``).
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
        log.info("student stage: run %s continues from its checkpoints at %s", cfg.train.run, start)
    progress = _progress("student-progress", f"student run {cfg.train.run}: {start.epoch} of {epochs} epochs")

    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        update_progress_artifact(progress, 100.0 * (epoch + 1) / epochs,
                                 description=f"student run {cfg.train.run}: {epoch + 1} of {epochs} epochs")
        log.info(epoch_text("student", epoch + 1, epochs, row))

    if student_stage.processes(cfg) > 1:  # the launcher logs that the ranks start
        result = student_stage.launch(cfg, storage, resume=bool(start), on_epoch=on_epoch, on_line=log.info)
    else:
        result = student_stage.run(cfg, storage, resume=bool(start), progress=False, on_epoch=on_epoch, load=shared_teacher)
    create_table_artifact([{"epoch": m["epoch"], "seconds": m["seconds"], "images_per_s": m["images_per_s"],
                            "teacher_forwards": m["teacher_forwards"], **{f"loss {k}": loss_text(v) for k, v in m["loss"].items()}}
                           for m in result.metrics], key="student-metrics", description=f"run {cfg.train.run}")
    log.info("student stage complete: %s", ", ".join(f"{name} -> {path}" for name, path in result.students.items()))
    return result


class PhaseProgress:
    """The evaluation's progress, told (what, done, total, unit) after each step of each phase (a split's features,
    an encoder's kNN, its probe): the progress artifact and a line ``evaluate: train features (4 encoders):
    12,800 of 20,000 images (64 %)``, at most every ``every`` seconds, and at a phase's end when that phase
    had a line of its own (short phases stay silent)."""

    def __init__(self, log: Any, progress: UUID | None, every: float = 10.0):
        self.log, self.progress, self.every = log, progress, every
        self.what, self.spoken = "", False
        self.last = time.perf_counter()

    def __call__(self, what: str, done: int, total: int | None, unit: str) -> None:
        if what != self.what:
            self.what, self.spoken = what, False
        now = time.perf_counter()
        end = total is not None and done >= total
        if now - self.last < self.every and not (end and self.spoken):
            return
        self.last, self.spoken = now, True
        of = f"{done:,} of {total:,} {unit} ({100 * done // total} %)" if total else f"{done:,} {unit}"
        if self.progress is not None:
            update_progress_artifact(self.progress, 100.0 * done / total if total else 0.0,
                                     description=f"evaluation: {what}, {of}")
        self.log.info("evaluate: %s: %s", what, of)


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_a_crash)
def evaluate(cfg_data: dict[str, Any], storage_file: str | None, include_teacher: bool,
             processes: int = 1) -> evaluate_stage.EvaluationResult:
    """The evaluation, its features extracted by ``processes`` processes (as ``seed evaluate --procs``); a crashed
    attempt is retried once (from the start: it writes its report last)."""
    log = get_run_logger()
    progress = _progress("evaluation-progress", "evaluation: loading the encoders")
    if processes != 1:
        log.info("evaluate: features extracted by %s (seed evaluate --procs)",
                 f"{processes} processes" if processes else "a process per GPU")
    result = evaluate_stage.run(_cfg(cfg_data), load_storage(storage_file), include_teacher=include_teacher,
                                progress=False, load=shared_teacher, on_progress=PhaseProgress(log, progress),
                                procs=processes)
    update_progress_artifact(progress, 100.0, description=f"evaluation: {len(result.results)} rows in the report")
    table = markdown_table(result.results, [("name", "encoder"), ("knn", "kNN top-1 (%)"), ("nn1", "1-NN (%)"),
                                            ("linear", "linear (%)"), ("probe", "probe"), ("init", "notes")])
    create_markdown_artifact(f"# Evaluation\n\n{table}\n\nReport: `{result.report}`\n", key="evaluation")
    log.info("evaluate: %d encoders scored in %.0f s (%.0f s of it reading features)", len(result.results),
             result.seconds, result.feature_seconds)
    width = max(len(r["name"]) for r in result.results)
    for r in result.results:
        log.info("%s  kNN %s %%  linear %s %%", r["name"].ljust(width), _percent(r.get("knn")), _percent(r.get("linear")))
    return result


def _percent(value: float | None) -> str:
    return "    -" if value is None else f"{value:5.1f}"


def stage_texts(cfg: RunConfig) -> dict[str, str]:
    """What each stage does, in words, for its banner."""
    p, t = cfg.pretrain, cfg.train
    how = "from the cache (no teacher)" if t.mode == "cached" else "online (the teacher runs on every batch)"
    return {
        "pretrain": f"{'MoCo-v2' if p.method == 'moco' else 'supervised'} pre-training of a {p.arch} teacher, "
                    f"{_epochs(p.optim.epochs)}",
        "teacher": f"{cfg.teacher.arch} embeds {cfg.cache.views} views of every image at {cfg.cache.resolution} px "
                   f"-> cache {cfg.cache.name}",
        "bank": f"a bank of {cfg.bank.size:,} cached views and the top-{cfg.bank.topk} teacher targets of every view",
        "student": f"{', '.join(s.label for s in t.students)}, {_epochs(t.optim.epochs)} {how}, run {t.run}",
        "evaluate": "features of the train and test images for every encoder, kNN and linear probes, the report",
    }


def _overrides(overrides: list[str], run: str | None, student_arch: str | None, epochs: int | None) -> list[str]:
    out = list(overrides)  # the shortcuts after them: a shortcut given wins (an empty or zero one is refused)
    if run is not None:
        out.append(f"train.run={run}")
    if student_arch is not None:
        out.append(f"train.students=[{{arch: {json.dumps(student_arch)}}}]")  # quoted: any text stays one name
    if epochs is not None:
        out.append(f"train.optim.epochs={epochs}")
    return out


@flow(name="seed", log_prints=True, on_completion=[stop_forwarding], on_failure=[stop_forwarding],
      on_cancellation=[stop_forwarding], on_crashed=[stop_forwarding])
def seed(config: str = DEFAULT_CONFIG, overrides: list[str] | None = None,
         stages: Annotated[list[Stage], Field(min_length=1)] | None = None,
         run: str | None = None, student_arch: str | None = None, epochs: Annotated[int, Field(ge=1)] | None = None,
         storage: str | None = None, teacher_workers: Annotated[int, Field(ge=0)] = 1,
         dask_address: str | None = None, evaluate_workers: Annotated[int, Field(ge=0)] = 1) -> dict[str, Any]:
    """SEED with a run-once teacher cache.

    Args:
        config: run config YAML. overrides: ``section.field=value`` strings.
        stages: one or more of pretrain, teacher, bank, student, evaluate (default: all).
        run, student_arch, epochs: shortcuts for train.run, train.students, train.optim.epochs (applied after
            ``overrides``).
        storage: storage.yaml (default: ./storage.yaml).
        teacher_workers: teacher processes on this machine: 1, this one (its data path in ``cache.workers``
            processes); N > 1, N processes, process i on ``cuda:i`` (on the CPU, pinned shares of the cores);
            0, one per visible GPU.
        dask_address: run the teacher stage as one task per shard on this Dask scheduler (several machines,
            one cache); ``teacher_workers`` is then unused.
        evaluate_workers: processes that extract the evaluation's features, as ``teacher_workers`` (the scores
            are computed in the flow's process).

    The parameters are checked against their types when a run is created (an unknown stage, an empty list of
    stages, ``epochs`` below 1, ``teacher_workers`` or ``evaluate_workers`` below 0 are refused by the Prefect
    server, before any run).
    """
    log = get_run_logger()
    wanted: list[str] = list(stages or ALL_STAGES)
    if dask_address and teacher_workers != 1:
        log.warning("teacher_workers=%d is not used with dask_address: the Dask workers run the shards", teacher_workers)
    cfg = load_config(config, _overrides(overrides or [], run, student_arch, epochs))
    store = load_storage(storage)
    forward_library_logs()
    planned = [s for s in ALL_STAGES if s in wanted and (s != "pretrain" or not cfg.teacher.checkpoint)]
    texts = stage_texts(cfg)
    log.info("seed run %s (%s): %s", cfg.train.run, config, " -> ".join(planned))

    def banner(stage: str) -> None:
        log.info("== [%d/%d] %s: %s", planned.index(stage) + 1, len(planned), stage, texts[stage])

    checked = "teacher" in wanted

    def need_cache() -> None:
        """Before the first stage that reads a cache this run did not make: one line naming the caches
        under the caches root and the config that made each, instead of a stage failing on it."""
        nonlocal checked
        if not checked:
            require_cache(cfg, store)
            checked = True

    result: dict[str, Any] = {"stages": wanted}
    if "pretrain" in planned:
        banner("pretrain")
        made = pretrain_teacher(to_dict(cfg), storage)
        cfg = dataclasses.replace(cfg, teacher=pretrain_stage.with_pretrained(cfg.teacher, made.teacher))
        result["pretrain"] = made.checkpoint
    if "teacher" in wanted:
        banner("teacher")
        result["teacher"] = run_teacher(cfg, store, storage, teacher_workers, dask_address)
        release_device_teachers()
        url = store.cache_url(cfg.cache.name)
        info = cache.attributes(cache.open_group(url, "r"))
        create_table_artifact([{"cache": url, "N": info["N"], "V": info["V"], "D": info["D"], **info["totals"]}],
                              key="cache-summary", description="teacher cache")
    if "bank" in wanted:
        banner("bank")
        need_cache()
        built = build_bank(to_dict(cfg), storage)
        result["bank"] = {"skipped": built.skipped, **{k: v for k, v in built.summary.items() if k != "fields"}}
    if "student" in wanted:
        banner("student")
        need_cache()
        trained = train_students(to_dict(cfg), storage)
        result["student"] = {"run": trained.run, "students": trained.students, "skipped": trained.skipped,
                             "teacher_forwards": trained.teacher_forwards}
    if "evaluate" in wanted:
        banner("evaluate")
        need_cache()
        include_teacher = "teacher" in wanted and bool(cfg.teacher.checkpoint)
        scored = evaluate(to_dict(cfg), storage, include_teacher, evaluate_workers)
        result["evaluation"] = {"report": scored.report, "results": scored.results}
        log.info("report: %s", scored.report)
    return result
