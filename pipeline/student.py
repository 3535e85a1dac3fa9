"""Student stage: train one or more students by SEED, from the cache (no teacher) or online.

Recipe: resolve the shards -> open the cache and its bank, refusing a missing, incomplete or
mismatched one (cached mode) or load the teacher (online mode) -> build the students -> train
them together on the same decoded batches -> write checkpoints, metrics and the resolved config
under ``<runs>/<train.run>/<student>/``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import yaml

from seed import bank_store, cache, checkpoint
from seed.augment import Recipe
from seed.config import RunConfig, from_dict, outcome, to_dict
from seed.data import CachedSource, FreshViews, Source, rank_shards
from seed.decode import Decoder
from seed.devices import resolve_device
from seed.errors import SeedError
from seed.models import mlp_encoder
from seed.objectives import ObjectiveFactory, Queue, create_objective
from seed.shards import expand_urls, shard_lengths
from seed.storage import Storage, join, write_text
from seed.teachers import TeacherLoader, load_teacher
from seed.train import Loop, distributed, make_member, train

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
    device = resolve_device(t.device)
    rank, world = distributed()
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    meta: dict[str, Any] = {"mode": t.mode, "config": to_dict(cfg)}
    tau_t = t.tau_t or cfg.bank.tau_t
    data: Source
    if t.mode == "cached":
        url = storage.cache_url(cfg.cache.name)
        group, bank = bank_store.open_bank(url, cfg.bank)
        fields = cache.attributes(group)["fingerprint_fields"]
        check_shards_match(urls, fields, url)
        dim = int(cache.attributes(group)["D"])
        recipe = from_dict(Recipe, fields["recipe"], "cache.recipe")  # the cache's, whatever the config says
        resolution = int(fields["resolution"])
        if t.targets == "sparse" and t.tau_t and t.tau_t != cfg.bank.tau_t:
            raise SeedError(f"train.tau_t={t.tau_t} differs from the cached targets' bank.tau_t={cfg.bank.tau_t}; "
                            "use train.targets=dense or rebuild the bank")
        make = objective or functools.partial(create_objective, "seed-cached")
        obj = make(bank_vectors=torch.from_numpy(bank.vectors()).to(device),
                   bank_rows=torch.from_numpy(bank.ids()[:, 0]).to(device),
                   tau_s=t.tau_s, tau_t=tau_t, dense=t.targets == "dense")
        cached = source(group, bank, view=t.view, seed=t.seed, dense=t.targets == "dense")
        data, per_shard = cached, cached.valid_counts().tolist()
        check_decode(cache.attributes(group), Decoder(device).name, url)
        meta |= {"cache_fingerprint": cache.attributes(group)["fingerprint"], "bank_fingerprint": bank.fingerprint,
                 "cache": url, "teacher_forwards_cached": cache.attributes(group)["totals"]["teacher_forwards"]}
    else:
        teacher, report = load(cfg.teacher)
        teacher = teacher.to(device)
        dim, recipe, resolution = teacher.out_dim, cfg.cache.recipe, cfg.cache.resolution
        make = objective or functools.partial(create_objective, "seed-online")
        obj = make(teacher=teacher, queue=Queue(t.queue or cfg.bank.size, dim, device, t.seed), tau_s=t.tau_s, tau_t=tau_t)
        data = FreshViews(recipe, seed=cfg.cache.seed + 1)
        per_shard = shard_lengths(urls)
        meta |= {"teacher_sha256": report.sha256}
    out = storage.run_dir(t.run)
    members = []
    for i, s in enumerate(t.students):
        torch.manual_seed(t.seed + i)
        model = mlp_encoder(s.arch, dim, small_input=s.small_input)
        members.append(make_member(s.label, model, join(out, s.label), optim=t.optim, device=device,
                                   meta={**meta, "arch": s.arch, "small_input": s.small_input, "dim": dim}))
    rank_counts = [sum(per_shard[i] for i in rank_shards(len(urls), r, world)) for r in range(world)]
    loop = Loop(optim=t.optim, loader=t.loader, seed=t.seed, resolution=resolution, recipe=recipe)
    if rank == 0:
        write_text(join(out, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=True))
    metrics = train(members, obj, urls, data, rank_counts, loop, device=device, resume=resume,
                    progress=progress, on_epoch=on_epoch)
    return StudentResult(out, t.mode, {m.name: m.checkpoint for m in members}, metrics,
                         sum(r["teacher_forwards"] for r in metrics))


def completed(cfg: RunConfig, storage: Storage) -> StudentResult | None:
    """The finished run, when every student trained ``optim.epochs`` with this config on this cache and bank."""
    if cfg.train.mode != "cached":
        return None
    try:
        group, bank = bank_store.open_bank(storage.cache_url(cfg.cache.name), cfg.bank)
    except SeedError:
        return None
    students = {s.label: storage.student_checkpoint(cfg.train.run, s.label) for s in cfg.train.students}
    metrics: list[dict[str, Any]] = []
    for url in students.values():
        if not checkpoint.exists(url):
            return None
        state = checkpoint.load(url)
        if (state.get("epoch") != cfg.train.optim.epochs or outcome(state.get("config", {}).get("train", {})) != outcome(cfg.train)
                or state.get("cache_fingerprint") != cache.attributes(group)["fingerprint"]
                or state.get("bank_fingerprint") != bank.fingerprint):
            return None
        metrics = state.get("metrics", [])
    return StudentResult(storage.run_dir(cfg.train.run), cfg.train.mode, students, metrics, 0, skipped=True)
