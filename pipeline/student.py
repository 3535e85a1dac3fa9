"""Student stage: train one or more students by SEED, from the cache (no teacher) or online.

Recipe: resolve the shards -> open the cache and its bank, refusing a missing, incomplete or
mismatched one (cached mode) or load the teacher (online mode) -> build the students -> train
them together on the same decoded batches -> write checkpoints, metrics and the resolved config
under ``<runs>/<train.run>/<student>/``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import yaml

from pipeline.bank import open_bank
from pipeline.teacher import cache_url, resolve_device
from seed.augment import Recipe
from seed.config import RunConfig, from_dict, to_dict
from seed.data import CachedSource, FreshViews, rank_shards
from seed.errors import SeedError
from seed.models import student_encoder
from seed.shards import expand_urls, shard_lengths
from seed.storage import Storage, join
from seed.teachers import load_teacher
from seed.train import CachedSeed, LoopConfig, OnlineSeed, Queue, distributed, make_member, train


def run_dir(cfg: RunConfig, storage: Storage) -> str:
    return storage.resolve("runs", cfg.train.run)


def check_shards_match(urls: list[str], fields: dict[str, Any], url: str) -> None:
    """The configured shards must be the ones the cache was made from (same names, same order)."""
    names = [u.rsplit("/", 1)[-1] for u in urls]
    if names != fields["shards"]:
        raise SeedError(f"{url} was made from {len(fields['shards'])} shards ({fields['shards'][0]} ...), "
                        f"but data.train gives {len(names)} ({names[0]} ...); point data.train at the cache's shards")


def run(cfg: RunConfig, storage: Storage, *, resume: bool = False, progress: bool = True,
        on_epoch: Any = None) -> dict[str, Any]:
    t = cfg.train
    device = resolve_device(t.device)
    rank, world = distributed()
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    meta: dict[str, Any] = {"mode": t.mode, "config": to_dict(cfg)}
    if t.mode == "cached":
        url = cache_url(cfg, storage)
        group, bank = open_bank(url, cfg.bank)
        fields = group.attrs["fingerprint_fields"]
        check_shards_match(urls, fields, url)
        dim = int(group.attrs["D"])
        recipe = from_dict(Recipe, fields["recipe"], "cache.recipe")  # the cache's, whatever the config says
        resolution = int(fields["resolution"])
        bank_vectors = torch.from_numpy(bank["vectors"][:].astype(np.float32)).to(device)
        bank_rows = torch.from_numpy(bank["ids"][:, 0].astype(np.int64)).to(device)
        objective: Any = CachedSeed(bank_vectors, bank_rows, tau_s=t.tau_s, tau_t=t.tau_t or cfg.bank.tau_t,
                                    dense=t.targets == "dense")
        if t.targets == "sparse" and t.tau_t and t.tau_t != cfg.bank.tau_t:
            raise SeedError(f"train.tau_t={t.tau_t} differs from the cached targets' bank.tau_t={cfg.bank.tau_t}; "
                            "use train.targets=dense or rebuild the bank")
        source: Any = CachedSource(group, bank, view=t.view, seed=t.seed, dense=t.targets == "dense")
        per_shard = source.valid_counts().tolist()
        meta |= {"cache_fingerprint": group.attrs["fingerprint"], "bank_fingerprint": bank.attrs["fingerprint"],
                 "cache": url, "teacher_forwards_cached": group.attrs["totals"]["teacher_forwards"]}
    else:
        teacher, report = load_teacher(cfg.teacher)
        teacher = teacher.to(device)
        dim, recipe, resolution = teacher.out_dim, cfg.cache.recipe, cfg.cache.resolution
        objective = OnlineSeed(teacher, Queue(t.queue or cfg.bank.size, dim, device, t.seed), tau_s=t.tau_s,
                               tau_t=t.tau_t or cfg.bank.tau_t)
        source = FreshViews(recipe, seed=cfg.cache.seed + 1)
        per_shard = shard_lengths(urls)
        meta |= {"teacher_sha256": report.sha256}
    out = run_dir(cfg, storage)
    members = []
    for i, s in enumerate(t.students):
        torch.manual_seed(t.seed + i)
        model = student_encoder(s.arch, dim, small_input=s.small_input)
        members.append(make_member(s.label, model, join(out, s.label), momentum=t.momentum, weight_decay=t.weight_decay,
                                   device=device, meta={**meta, "arch": s.arch, "small_input": s.small_input, "dim": dim}))
    rank_counts = [sum(per_shard[i] for i in rank_shards(len(urls), r, world)) for r in range(world)]
    loop = LoopConfig(epochs=t.epochs, batch_size=t.batch_size, base_lr=t.base_lr, warmup_epochs=t.warmup_epochs,
                      seed=t.seed, shuffle_buffer=t.shuffle_buffer, prefetch=t.prefetch, resolution=resolution, recipe=recipe)
    if rank == 0:
        _write_config(cfg, out)
    metrics = train(members, objective, urls, source, rank_counts, loop, device=device, resume=resume,
                    progress=progress, on_epoch=on_epoch)
    return {"run": out, "mode": t.mode, "students": {m.name: join(m.out, "checkpoint.pt") for m in members},
            "metrics": metrics, "teacher_forwards": sum(r["teacher_forwards"] for r in metrics)}


def _write_config(cfg: RunConfig, out: str) -> None:
    import fsspec

    fs, _, (path,) = fsspec.get_fs_token_paths(out)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/config.yaml", "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=True)


def is_complete(cfg: RunConfig, storage: Storage) -> bool:
    """Every student of the run finished ``train.epochs`` with this config on this cache and bank."""
    from seed import checkpoint

    if cfg.train.mode != "cached":
        return False
    try:
        group, bank = open_bank(cache_url(cfg, storage), cfg.bank)
    except SeedError:
        return False
    out = run_dir(cfg, storage)
    for s in cfg.train.students:
        url = join(out, s.label, "checkpoint.pt")
        if not checkpoint.exists(url):
            return False
        state = checkpoint.load(url)
        if (state.get("epoch") != cfg.train.epochs or state.get("config", {}).get("train") != to_dict(cfg.train)
                or state.get("cache_fingerprint") != group.attrs["fingerprint"]
                or state.get("bank_fingerprint") != bank.attrs["fingerprint"]):
            return False
    return True


def completed_summary(cfg: RunConfig, storage: Storage) -> dict[str, Any]:
    from seed import checkpoint

    out = run_dir(cfg, storage)
    students = {s.label: join(out, s.label, "checkpoint.pt") for s in cfg.train.students}
    metrics = checkpoint.load(next(iter(students.values()))).get("metrics", [])
    return {"run": out, "mode": cfg.train.mode, "students": students, "metrics": metrics, "teacher_forwards": 0}
