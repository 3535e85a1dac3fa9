"""Teacher stage: run the frozen teacher once over V replayable views of every image into the cache.

Recipe per input shard: decode each image once, draw its V views, augment them in batches, run
the teacher (bf16 autocast + channels_last on CUDA), L2-normalise, write the shard's rows, then
its completion record. Decoding and augmentation run one batch ahead in a thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from seed import cache
from seed.augment import P, apply_batch, draw_views
from seed.config import RunConfig, to_dict
from seed.devices import require_cpu_threads, resolve_device, set_cpu_threads
from seed.errors import SeedError
from seed.models import Encoder
from seed.prefetch import prefetch
from seed.shards import decode_image, expand_urls, iter_shard, shard_lengths
from seed.storage import Storage
from seed.teachers import LoadReport, TeacherLoader, load_teacher


@dataclasses.dataclass(frozen=True)
class Plan:
    """The input shards of the teacher stage and where their rows go."""

    cache_url: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    capacity: int


@dataclasses.dataclass(frozen=True)
class TeacherResult:
    """What the stage did: the cache, the shards it embedded now and those already done."""

    cache: str
    shards: int
    embedded: tuple[int, ...]
    skipped_done: tuple[int, ...]
    totals: dict[str, Any] | None  # set once the cache is complete


def make_plan(cfg: RunConfig, storage: Storage) -> Plan:
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    lengths = shard_lengths(urls)
    empty = [u for u, n in zip(urls, lengths) if n == 0]
    if empty:
        raise SeedError(f"empty shard(s), no samples: {', '.join(empty[:3])}")
    capacity = cfg.cache.shard_capacity or max(lengths)
    too_big = [(u, n) for u, n in zip(urls, lengths) if n > capacity]
    if too_big:
        raise SeedError(f"shard {too_big[0][0]} has {too_big[0][1]} samples, more than cache.shard_capacity={capacity}")
    return Plan(storage.cache_url(cfg.cache.name), tuple(urls), tuple(lengths), capacity)


def fingerprint_fields(cfg: RunConfig, report: LoadReport, dim: int, plan: Plan) -> dict[str, Any]:
    """What determines the cached values (see ``seed.cache``): not paths, not batch size or device."""
    t = cfg.teacher
    return {
        "teacher": {"arch": t.arch, "checkpoint_sha256": report.sha256, "format": report.format,
                    "output": t.output, "small_input": t.small_input},
        "recipe": to_dict(cfg.cache.recipe),
        "resolution": cfg.cache.resolution, "seed": cfg.cache.seed, "views": cfg.cache.views, "dim": dim,
        "shards": [u.rsplit("/", 1)[-1] for u in plan.urls], "shard_lengths": list(plan.lengths),
        "capacity": plan.capacity,
    }


def prepare(cfg: RunConfig, storage: Storage, teacher: Encoder, report: LoadReport, *,
            overwrite: bool = False) -> tuple[Plan, zarr.Group]:
    """Plan the stage and create (or re-open, checking the fingerprint) the cache."""
    plan = make_plan(cfg, storage)
    fields = fingerprint_fields(cfg, report, teacher.out_dim, plan)
    r = cfg.cache.resolution
    group = cache.create(plan.cache_url, fields=fields, capacity=plan.capacity, n_shards=len(plan.urls),
                         views=cfg.cache.views, dim=teacher.out_dim, overwrite=overwrite, attrs={
                             "config": to_dict(cfg), "shard_urls": list(plan.urls),
                             # batch size and CPU threads fix the forward's last bits: every writer uses these
                             "cpu_threads": cfg.cache.cpu_threads or torch.get_num_threads(),
                             "batch_size": cfg.cache.batch_size,
                             "teacher": {"arch": cfg.teacher.arch, "checkpoint": cfg.teacher.checkpoint,
                                         "format": report.format, "output": cfg.teacher.output,
                                         "dropped_keys": report.dropped[:50]},
                             "preprocessing": {"input_size": [3, r, r], "interpolation": "bilinear",
                                               "mean": teacher.mean.flatten().tolist(),
                                               "std": teacher.std.flatten().tolist(),
                                               "views": "replayed from augment rows (seed.augment)"},
                         })
    return plan, group


def cpu_threads(group: zarr.Group) -> int:
    """The CPU thread count every writer of this cache uses (0 = not fixed)."""
    return int(cache.attributes(group).get("cpu_threads", 0))


def _view_batches(url: str, shard_len: int, cfg: RunConfig, batch_size: int, meta: dict[str, np.ndarray],
                  skipped: list[dict[str, str]]) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """Decode a shard once, draw V views per image, yield augmented batches ``(x, rows, views)``.

    Fills ``meta`` (keys, labels, sizes, augment, valid) and ``skipped`` as it goes.
    """
    c = cfg.cache
    pending: list[tuple[torch.Tensor, np.ndarray, int, int]] = []

    def batch(items: list[tuple[torch.Tensor, np.ndarray, int, int]]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        params = torch.from_numpy(np.stack([p for _, p, _, _ in items]))
        x = apply_batch([im for im, _, _, _ in items], params, c.recipe, c.resolution)
        return x, np.array([r for *_, r, _ in items]), np.array([v for *_, v in items])

    n = 0
    for sample in iter_shard(url):
        n += 1
        if sample.index >= shard_len:
            raise SeedError(f"{url}: more samples than the {shard_len} planned; the shard changed since the cache was made")
        meta["keys"][sample.index] = sample.key
        meta["labels"][sample.index] = sample.label
        try:
            image = decode_image(sample)
        except ValueError as exc:
            skipped.append({"key": sample.key, "reason": str(exc)})
            continue
        h, w = image.shape[-2:]
        views = draw_views(c.recipe, seed=c.seed, key=sample.key, views=c.views, height=h, width=w)
        meta["sizes"][sample.index] = (h, w)
        meta["augment"][sample.index] = views
        meta["valid"][sample.index] = True
        pending += [(image, views[v], sample.index, v) for v in range(c.views)]
        while len(pending) >= batch_size:
            yield batch(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield batch(pending)
    if n != shard_len:
        raise SeedError(f"{url}: {n} samples, but the plan counted {shard_len}; the shard changed since the cache was made")


@torch.inference_mode()
def embed(teacher: Encoder, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """L2-normalised teacher output of a float batch in [0, 1], as float32 on CPU."""
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = teacher(x)
    else:
        out = teacher(x)
    return F.normalize(out.float(), dim=1).cpu()


def embed_shard(cfg: RunConfig, plan: Plan, group: zarr.Group, shard: int, teacher: Encoder, *,
                on_views: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run ``teacher`` over one input shard and write its rows, then its completion record.

    On the CPU the process must use the cache's thread count (``set_cpu_threads(cpu_threads(group))``,
    done once by the entry points): it fixes the forward's last bits, so every writer of the cache
    gives the same bytes.
    """
    start = time.perf_counter()
    device = resolve_device(cfg.cache.device)
    if device.type == "cpu":
        require_cpu_threads(cpu_threads(group), plan.cache_url)
    teacher.to(device)
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    cap, V, D = plan.capacity, cfg.cache.views, teacher.out_dim
    meta: dict[str, np.ndarray] = {
        "embeddings": np.full((cap, V, D), np.nan, dtype=np.float16),
        "augment": np.full((cap, V, P), np.nan, dtype=np.float32),
        "keys": np.full(cap, "", dtype=object),
        "labels": np.full(cap, -1, dtype=np.int32),
        "valid": np.zeros(cap, dtype=bool),
        "sizes": np.zeros((cap, 2), dtype=np.int32),
    }
    skipped: list[dict[str, str]] = []
    forwards, forward_s = 0, 0.0
    url = plan.urls[shard]
    batch_size = int(cache.attributes(group).get("batch_size", cfg.cache.batch_size))
    views_in = _view_batches(url, plan.lengths[shard], cfg, batch_size, meta, skipped)
    for x, rows, views in prefetch(views_in, cfg.cache.prefetch):
        t0 = time.perf_counter()
        z = embed(teacher, x, device)
        forward_s += time.perf_counter() - t0
        forwards += len(rows)
        meta["embeddings"][rows, views] = z.numpy().astype(np.float16)
        if on_views is not None:
            on_views(len(rows))
    meta["keys"] = meta["keys"].astype(str)
    record = {
        "url": url, "samples": plan.lengths[shard], "valid": int(meta["valid"].sum()), "skipped": skipped,
        "teacher_forwards": forwards, "teacher_seconds": round(forward_s, 4),
        "seconds": round(time.perf_counter() - start, 4), "device": str(device),
    }
    cache.write_shard(group, shard, meta, record)
    return record


def run(cfg: RunConfig, storage: Storage, *, overwrite: bool = False, shards: list[int] | None = None,
        finalize: bool = True, progress: bool = True, load: TeacherLoader = load_teacher) -> TeacherResult:
    """The whole stage in this process: skip done shards, embed the rest, mark the cache complete.

    ``shards``: only these input shards (one worker's part); ``finalize``: mark the cache complete
    when every shard is done (only the coordinator should: it writes the root attributes).
    """
    from tqdm import tqdm

    teacher, report = load(cfg.teacher)
    plan, group = prepare(cfg, storage, teacher, report, overwrite=overwrite)
    if resolve_device(cfg.cache.device).type == "cpu":
        set_cpu_threads(cpu_threads(group))
    todo_all = range(len(plan.urls)) if shards is None else shards
    done = set(cache.done_shards(group))
    todo = [s for s in todo_all if s not in done]
    total_views = sum(plan.lengths[s] for s in todo) * cfg.cache.views
    bar = tqdm(total=total_views, unit="view", desc=f"teacher 0/{len(todo)} shards", disable=not progress, smoothing=0.1)
    records = {}
    for i, s in enumerate(todo):
        records[s] = embed_shard(cfg, plan, group, s, teacher, on_views=bar.update)
        bar.set_description(f"teacher {i + 1}/{len(todo)} shards")
    bar.close()
    totals = None
    if finalize and len(set(cache.done_shards(group))) == len(plan.urls):
        totals = cache.finalize(group, plan.cache_url)
    return TeacherResult(plan.cache_url, len(plan.urls), tuple(sorted(records)), tuple(sorted(done & set(todo_all))), totals)

