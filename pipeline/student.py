"""Student stage: train one or more students by SEED, from the cache (no teacher) or online.

Recipe: resolve the shards -> open the cache and its bank, refusing a missing, incomplete or
mismatched one (cached mode) or load the teacher (online mode) -> build the students -> train
them together on the same decoded batches -> write checkpoints, metrics (and TensorBoard event files
in ``<student>/tb/``, see ``train.tensorboard``) and the resolved config under ``<runs>/<train.run>/<student>/``.

``train.nproc`` > 1 runs the stage in that many processes on this node: ``launch`` starts
``torchrun`` over the command line (``pipeline.cli student``, ``seed.launcher``), one rank per GPU on
CUDA, and follows its output; the flow and ``seed student`` both use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import yaml

from seed import bank_store, cache, checkpoint
from seed.checkpoint import Position
from seed.views import Recipe, recipe_fields
from seed.config import RunConfig, from_dict, outcome, to_dict, write_run_files
from seed.data import CachedSource, FreshViews, Source, rank_shards
from seed.decode import Decoder
from seed.devices import Launch, join_process_group, resolve_device
from seed.errors import SeedError
from seed.launcher import node_processes, torchrun
from seed.models import mlp_encoder
from seed.objectives import ObjectiveFactory, Queue, create_objective
from seed.shards import expand_urls, shard_lengths
from seed.storage import Storage, join, write_text
from seed.teachers import TeacherLoader, file_sha256, load_teacher
from seed.train import Loop, make_member, train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StudentResult:
    """A student run: where it is, each student's checkpoint, the per-epoch metrics."""

    run: str
    mode: str
    students: dict[str, str]
    metrics: list[dict[str, Any]]
    teacher_forwards: int
    skipped: bool = False


def check_shards_match(urls: list[str], fields: dict[str, Any], url: str) -> None:
    """The configured shards must be the ones the cache was made from (same names, same order)."""
    names = [u.rsplit("/", 1)[-1] for u in urls]
    if names != fields["shards"]:
        raise SeedError(f"{url} was made from {len(fields['shards'])} shards ({fields['shards'][0]} ...), "
                        f"but data.train gives {len(names)} ({names[0]} ...); point data.train at the cache's shards")


def check_decode(attrs: dict[str, Any], decode: str, url: str) -> None:
    """Warn when the student decodes images differently from the teacher stage that made the cache.

    nvJPEG and PIL may differ by a grey level in places, so the student then sees the cached view
    up to that difference.
    """
    made = (attrs.get("preprocessing") or {}).get("decode", "pil")
    if made != decode:
        log.warning("%s: the cached views were decoded with %s, this student stage decodes with %s; "
                    "replayed views may differ from the cached ones by a grey level", url, made, decode)


def run(cfg: RunConfig, storage: Storage, *, resume: bool = False, progress: bool = True,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None, load: TeacherLoader = load_teacher,
        objective: ObjectiveFactory | None = None, source: type[CachedSource] = CachedSource) -> StudentResult:
    """Train the configured students.

    ``load`` is only called in online mode. ``objective`` replaces the registered objective class
    (``seed-cached`` or ``seed-online``) and is called with the same arguments; ``source`` replaces
    the cached data source class (benchmarks and tests use both).
    """
    t = cfg.train
    launched = Launch.from_env()
    if launched.local_world != processes(cfg):
        raise SeedError(f"train.nproc={t.nproc} asks for {processes(cfg)} processes on this node but this one is one of "
                        f"{launched.local_world}; run `seed student`, which starts torchrun itself, or set "
                        f"train.nproc={launched.local_world}")
    device = resolve_device(t.device)
    rank, world = join_process_group(device)
    if resume:
        _check_resume(cfg, storage, rank, world)
    elif rank == 0 and (start := resumable(cfg, storage)):
        log.warning("student run %s stopped at %s of %d with these settings; training again from the first "
                    "epoch as asked (pass --resume to continue; the flow does)", t.run, start, t.optim.epochs)
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    meta: dict[str, Any] = {"mode": t.mode, "config": to_dict(cfg), "against": trained_against(cfg)}
    tau_t = t.tau_t or cfg.bank.tau_t
    data: Source
    if t.mode == "cached":
        url = storage.cache_url(cfg.cache.name)
        queue_mode = t.bank == "queue"  # a FIFO of cached embeddings: the cache alone, no bank stage
        group, banks = (cache.open_complete(url), []) if queue_mode else bank_store.open_banks(url, cfg.bank)
        bank = banks[0] if banks else None
        fields = cache.attributes(group)["fingerprint_fields"]
        check_shards_match(urls, fields, url)
        dim = int(cache.attributes(group)["D"])
        recipe = from_dict(Recipe, fields["recipe"], "cache.recipe")  # the cache's, whatever the config says
        resolution = int(fields["resolution"])
        if t.targets == "sparse" and t.tau_t and t.tau_t != cfg.bank.tau_t and not queue_mode:
            raise SeedError(f"train.tau_t={t.tau_t} differs from the cached targets' bank.tau_t={cfg.bank.tau_t}; "
                            "use train.targets=dense or rebuild the bank")
        if queue_mode:  # dense targets in fp32 over the queue, computed per step (seed.objectives.CachedQueueSeed)
            make = objective or functools.partial(create_objective, "seed-cached-queue")
            obj = make(queue=Queue(t.queue or cfg.bank.size, dim, device, t.seed), tau_s=t.tau_s, tau_t=tau_t)
        else:
            assert bank is not None
            make = objective or functools.partial(create_objective, "seed-cached")
            obj = make(bank_vectors=torch.from_numpy(np.stack([k.vectors() for k in banks])).to(device),
                       bank_rows=torch.from_numpy(np.stack([k.ids()[:, 0] for k in banks])).to(device),
                       tau_s=t.tau_s, tau_t=tau_t, dense=t.targets == "dense", tail=t.tail)
        dense = t.targets == "dense" or queue_mode
        cached = source(group, banks or None, view=t.view, seed=t.seed, dense=dense)
        data, per_shard = cached, cached.valid_counts().tolist()
        check_decode(cache.attributes(group), Decoder(device).name, url)
        if rank == 0 and (note := cache.shard_mix_note(cache.shard_label_mix(group), t.loader.shuffle_buffer)):
            log.warning("%s: %s", url, note)
        if rank == 0:
            _note_views_in_one_chunk(url, group, [] if dense else banks)
        # the revision changes with the rows (a repaired shard embedded again), which a queue-mode student reads too
        revision = cache.attributes(group).get("revision")
        meta |= {**({"cache_revision": revision} if revision is not None else {}),
                 "cache_fingerprint": cache.attributes(group)["fingerprint"],
                 "bank_fingerprint": bank.fingerprint if bank is not None else "queue",
                 "cache": url, "teacher_forwards_cached": cache.attributes(group)["totals"]["teacher_forwards"]}
    else:
        teacher, report = load(cfg.teacher)
        teacher = teacher.to(device)
        dim, recipe, resolution = teacher.out_dim, cfg.cache.recipe, cfg.cache.resolution
        make = objective or functools.partial(create_objective, "seed-online")
        obj = make(teacher=teacher, queue=Queue(t.queue or cfg.bank.size, dim, device, t.seed), tau_s=t.tau_s, tau_t=tau_t)
        per_shard = shard_lengths(urls, record=storage.shard_lengths_record(), damaged=cfg.data.damaged)
        data = FreshViews.over(urls, per_shard, recipe, seed=cfg.cache.seed + 1, damaged=cfg.data.damaged)
        meta |= {"teacher_sha256": report.sha256}
    out = storage.run_dir(t.run)
    members = []
    for i, s in enumerate(t.students):
        torch.manual_seed(t.seed + i)
        model = mlp_encoder(s.arch, dim, small_input=s.small_input)
        members.append(make_member(s.label, model, join(out, s.label), optim=t.optim, device=device,
                                   meta={**meta, "arch": s.arch, "small_input": s.small_input, "dim": dim}))
    rank_counts = [sum(per_shard[i] for i in rank_shards(len(urls), r, world)) for r in range(world)]
    loop = Loop(optim=t.optim, loader=t.loader, seed=t.seed, resolution=resolution, recipe=recipe,
                checkpoint_steps=t.checkpoint_steps)
    if rank == 0:
        write_text(join(out, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=True))
    metrics = train(members, obj, urls, data, rank_counts, loop, device=device, resume=resume,
                    progress=progress, on_epoch=on_epoch, tensorboard=t.tensorboard)
    return StudentResult(out, t.mode, {m.name: m.checkpoint for m in members}, metrics,
                         sum(r["teacher_forwards"] for r in metrics))


def trained_against(cfg: RunConfig) -> dict[str, Any]:
    """What the students learn from beyond the ``train`` section and the cache's and bank's fingerprints: the
    teacher temperature in force and, with a queue (``train.bank=queue``, online SEED), its length; online,
    the teacher and the views it is shown."""
    t = cfg.train
    out: dict[str, Any] = {"tau_t": t.tau_t or cfg.bank.tau_t}
    if t.mode != "cached" or t.bank == "queue":
        out["queue"] = t.queue or cfg.bank.size
    if t.mode != "cached":
        out |= {"teacher": to_dict(cfg.teacher), "recipe": recipe_fields(cfg.cache.recipe),
                "resolution": cfg.cache.resolution, "views_seed": cfg.cache.seed}
    return json.loads(json.dumps(out))


def _check_resume(cfg: RunConfig, storage: Storage, rank: int, world: int) -> None:
    """Before ``--resume`` touches the run (its ``config.yaml`` included): refuse checkpoints made with other
    training settings (``outcome`` of the ``train`` section: the learning rate, tau_s, epochs ...), which would
    continue another run, or report a finished one, under this config's name; say when there is nothing to
    resume. (What the students trained against, the cache, bank and teacher, is checked as each is loaded.)

    Rank 0 reads the checkpoints (one read of each, not one a rank: they hold the optimiser's state too) and
    hands its verdict to the others, so every rank stops on the same one-line error."""
    problem = _resume_problem(cfg, storage) if rank == 0 else None
    if world > 1:
        verdict = [problem]
        torch.distributed.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem is not None:
        raise SeedError(problem)


def _resume_problem(cfg: RunConfig, storage: Storage) -> str | None:
    """Why this run's checkpoints cannot be resumed under ``cfg`` (``_check_resume``); None when they can. A save
    that a kill cut short is settled first, so what is judged is what the run would resume."""
    checkpoint.settle([storage.student_checkpoint(cfg.train.run, s.label) for s in cfg.train.students])
    found = False
    for s in cfg.train.students:
        url = storage.student_checkpoint(cfg.train.run, s.label)
        if not checkpoint.exists(url):
            continue
        found = True
        was = checkpoint.load(url).get("config", {}).get("train")
        # the settings both name (a checkpoint of an older version has fewer or other ones, and none before 0.2)
        diffs = cache.diff_fields({"train": outcome(was)}, {"train": outcome(cfg.train)}, "checkpoint",
                                  common=True) if was is not None else []
        if diffs:
            return (f"{url}: cannot resume, it was trained with other settings: {'; '.join(diffs)}; resume "
                    "with its settings, or start again without --resume (or under another train.run)")
    if not found:
        log.warning("--resume: run %s has no checkpoint yet; training from the first epoch", cfg.train.run)
    return None


def _matches(state: dict[str, Any], cfg: RunConfig, group: Any, bank: Any) -> bool:
    """A checkpoint made with this training config (and, cached, this cache and bank), against the same
    teacher temperature, queue and (online) teacher (``trained_against``; checkpoints made before it was
    recorded are judged by the rest)."""
    if outcome(state.get("config", {}).get("train", {})) != outcome(cfg.train):
        return False
    if "against" in state and state["against"] != trained_against(cfg):
        return False
    # online: the teacher's file itself (its config names a path, which pre-training may rewrite in place)
    if group is None and state.get("teacher_sha256") and cfg.teacher.checkpoint:
        try:
            if file_sha256(cfg.teacher.checkpoint) != state["teacher_sha256"]:
                return False
        except OSError:
            return False
    return group is None or (state.get("cache_fingerprint") == cache.attributes(group)["fingerprint"]
                             and state.get("cache_revision") == cache.attributes(group).get("revision")
                             and state.get("bank_fingerprint") == (bank.fingerprint if bank is not None else "queue"))


def _checkpoints(cfg: RunConfig, storage: Storage) -> list[dict[str, Any]] | None:
    """Every student's checkpoint when all exist and were made with this config, cache and bank; else None."""
    group = bank = None
    if cfg.train.mode == "cached":
        url = storage.cache_url(cfg.cache.name)
        try:
            group, bank = ((cache.open_complete(url), None) if cfg.train.bank == "queue"
                           else bank_store.open_bank(url, cfg.bank))
        except SeedError:
            return None
    urls = [storage.student_checkpoint(cfg.train.run, s.label) for s in cfg.train.students]
    checkpoint.settle(urls)  # their save at an epoch's end, if a kill cut it short
    states = []
    for url in urls:
        if not checkpoint.exists(url):
            return None
        state = checkpoint.load(url)
        if not _matches(state, cfg, group, bank):
            return None
        states.append(state)
    return states


def completed(cfg: RunConfig, storage: Storage) -> StudentResult | None:
    """The finished run, when every student trained ``optim.epochs`` with this config on this cache and bank."""
    if cfg.train.mode != "cached":
        return None
    states = _checkpoints(cfg, storage)
    if states is None or any(s.get("epoch") != cfg.train.optim.epochs for s in states):
        return None
    students = {s.label: storage.student_checkpoint(cfg.train.run, s.label) for s in cfg.train.students}
    return StudentResult(storage.run_dir(cfg.train.run), cfg.train.mode, students, states[-1].get("metrics", []), 0,
                         skipped=True)


def resumable(cfg: RunConfig, storage: Storage) -> Position:
    """Where a crashed or interrupted run of this config can continue from (false: start afresh).

    Every student must have a checkpoint of this config (and cache and bank) at the same position,
    short of ``optim.epochs``.
    """
    states = _checkpoints(cfg, storage)
    positions = {Position.of(s) for s in states or []}
    if len(positions) != 1:
        return Position()
    at = positions.pop()
    return at if at.epoch < cfg.train.optim.epochs else Position()


def _note_views_in_one_chunk(url: str, group: Any, banks: list[bank_store.Bank]) -> None:
    """Warn when the cache's embeddings or the banks' targets keep all views of a row in one chunk (made before
    each view had chunks of its own): they read, slower, as before."""
    arrays = {"embeddings": cache.array(group, "embeddings")}
    arrays |= {f"{bank.group.basename}/{name}": cache.array(bank.group, name) for bank in banks for name in ("indices", "logp")}
    if old := cache.views_in_one_chunk(arrays):
        per_chunk = max(int(arrays[name].chunks[1]) for name in old)
        log.warning("%s: %s keep %d views of a row in one chunk (made before each view had chunks of its own): each "
                    "epoch reads up to %d times the bytes of the view it uses; made again (seed teacher --overwrite, then "
                    "seed bank) they read one view's", url, ", ".join(old), per_chunk, per_chunk)


def processes(cfg: RunConfig) -> int:
    """Processes the stage runs in on this node: ``train.nproc``, 0 = one per visible GPU (1 without)."""
    return node_processes(cfg.train.nproc)


def launch(cfg: RunConfig, storage: Storage, *, resume: bool = False,
           on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
           on_line: Callable[[str], None] = print) -> StudentResult:
    """Train in ``processes(cfg)`` ranks started by ``torchrun`` on this node (``seed.launcher``), and wait.

    The ranks read the resolved config and storage roots from a temporary directory, so they run
    exactly this ``cfg``. Rank 0's epoch reports go to ``on_epoch``, every other line of their output
    to ``on_line``. A rank that fails stops them all; the epoch checkpoints written so far stay for
    ``resume``.
    """
    with tempfile.TemporaryDirectory(prefix="seed-student-") as tmp:
        config, roots = write_run_files(cfg, storage, tmp)
        torchrun(["-m", "pipeline.cli", "student", "-c", config, "--storage", roots, "--events",
                  *(["--resume"] if resume else [])], processes(cfg), stage="student stage",
                 on_epoch=on_epoch, on_line=on_line)
    states = _checkpoints(cfg, storage)
    if states is None:
        raise SeedError(f"torchrun finished but run {cfg.train.run} has no checkpoint of this config for every student")
    students = {s.label: storage.student_checkpoint(cfg.train.run, s.label) for s in cfg.train.students}
    metrics = states[-1].get("metrics", [])
    return StudentResult(storage.run_dir(cfg.train.run), cfg.train.mode, students, metrics,
                         sum(r["teacher_forwards"] for r in metrics))
