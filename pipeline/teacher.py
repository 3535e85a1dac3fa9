"""Teacher stage: run the frozen teacher once over V replayable views of every image into the cache.

Recipe per input shard: read each image, draw its V views, decode and augment them in batches, run
the teacher (bf16 autocast + channels_last on CUDA), L2-normalise, write the shard's rows, then its
completion record (in a background thread, while the next shard is embedded). Reading, decoding and augmentation run ``cache.prefetch`` batches ahead: in
``cache.workers`` processes that each own whole shards (on CUDA they only read and draw, and a thread
of this process decodes with nvJPEG and augments on the GPU), or with no workers in one thread. On a
CPU whose cores the forward's threads fill, both are automatically off: the data path runs between
forwards (``seed.devices.read_ahead``).
The Prefect flow runs ``run`` or ``run_processes`` in one task; on Dask, ``embed_shard`` per shard task.

``run_processes`` spreads the shards over several processes on this node, one or more per GPU:
each is ``seed teacher --shards ...`` on its own device, writing the same bytes as one process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from seed import cache, launcher
from seed.augment import apply_batch
from seed.views import P, blur_note, draw_many, recipe_fields
from seed.config import RunConfig, to_dict, write_run_files
from seed.devices import (autocast, cpu_cores, data_workers, read_ahead, require_cpu_threads,
                          resolve_device, set_cpu_threads)
from seed.errors import SeedError
from seed.models import Encoder, freeze
from seed.prefetch import WriteBehind, prefetch
from seed.decode import Decoder
from seed.shards import (DamagedShard, Sample, count_samples, damage_handler, expand_urls, image_size, iter_shard,
                         shard_lengths)
from seed.storage import Storage
from seed.teachers import LoadReport, TeacherLoader, load_teacher
from seed.workers import PackedSamples, SharedSlots, shard_workers

log = logging.getLogger(__name__)
_RECORDS_EVERY_S = 2.0  # how often run_processes lists the records its processes write (progress only)
_told_recorded: dict[str, bool] = {}  # caches whose recorded settings this process has named against the config


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


def make_plan(cfg: RunConfig, storage: Storage, *, check_cache: bool = False) -> Plan:
    """The shards, their sample counts (counted once per shard, ``Storage.shard_lengths_record``) and rows.

    ``check_cache``: refuse when the cache exists and one of its shards now has another sample count,
    naming the shards (leave it off to overwrite the cache).
    """
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    lengths = shard_lengths(urls, record=storage.shard_lengths_record(), damaged=cfg.data.damaged)
    empty = [u for u, n in zip(urls, lengths) if n == 0]
    if empty:
        raise SeedError(f"empty shard(s), no samples: {', '.join(empty[:3])}")
    capacity = cfg.cache.shard_capacity or max(lengths)
    too_big = [(u, n) for u, n in zip(urls, lengths) if n > capacity]
    if too_big:
        raise SeedError(f"shard {too_big[0][0]} has {too_big[0][1]} samples, more than cache.shard_capacity={capacity}")
    url = storage.cache_url(cfg.cache.name)
    if check_cache and cache.exists(url):
        made = cache.attributes(cache.open_group(url)).get("fingerprint_fields", {})
        then = dict(zip(made.get("shards", []), made.get("shard_lengths", [])))
        names = [u.rsplit("/", 1)[-1] for u in urls]
        changed = [f"shard {n} had {then[n]} samples when the cache was made, now {k}"
                   for n, k in zip(names, lengths) if n in then and then[n] != k]
        if changed:
            more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
            raise SeedError(f"{url}: {'; '.join(changed[:5])}{more}; its rows no longer match the shards. "
                            "Use --overwrite to rebuild it, or another cache name.")
    return Plan(url, tuple(urls), tuple(lengths), capacity)


def fingerprint_fields(cfg: RunConfig, report: LoadReport, dim: int, plan: Plan) -> dict[str, Any]:
    """What determines the cached values (see ``seed.cache``): not paths, not batch size or device."""
    t = cfg.teacher
    # settings that pick other weights or another head from the same file; named only when not the default,
    # so the caches made before they were fingerprinted keep theirs
    chosen = {k: v for k, v, default in (("dino_weights", t.dino_weights, "teacher"),
                                         ("head_activation", t.head_activation, "auto")) if v != default}
    return {
        "teacher": {"arch": t.arch, "checkpoint_sha256": report.sha256, "format": report.format,
                    "output": t.output, "small_input": t.small_input, **chosen},
        "recipe": recipe_fields(cfg.cache.recipe),
        "resolution": cfg.cache.resolution, "seed": cfg.cache.seed, "views": cfg.cache.views, "dim": dim,
        "shards": [u.rsplit("/", 1)[-1] for u in plan.urls], "shard_lengths": list(plan.lengths),
        "capacity": plan.capacity,
    }


def prepare(cfg: RunConfig, storage: Storage, teacher: Encoder, report: LoadReport, *,
            overwrite: bool = False, coordinator: bool = True) -> tuple[Plan, zarr.Group]:
    """Plan the stage and create (or re-open, checking the fingerprint) the cache. The ``coordinator`` (a run
    over every shard, not a ``--shards`` worker: it alone writes the root attributes) also removes what killed
    writers left half-written (``cache.remove_stale_partials``) and takes back the records of damaged shards
    since repaired (``reopen_repaired``)."""
    plan = make_plan(cfg, storage, check_cache=not overwrite)
    note = blur_note(cfg.cache.recipe, cfg.cache.resolution)
    if note:
        log.warning(note)
    device = resolve_device(cfg.cache.device)
    fields = fingerprint_fields(cfg, report, teacher.out_dim, plan)
    r = cfg.cache.resolution
    group = cache.create(plan.cache_url, fields=fields, capacity=plan.capacity, n_shards=len(plan.urls),
                         views=cfg.cache.views, dim=teacher.out_dim, overwrite=overwrite, attrs={
                             "config": to_dict(cfg), "shard_urls": list(plan.urls),
                             # batch size, CPU threads, the CUDA graph and the augmentation kernels fix the
                             # views' and the forward's last bits: every writer uses these
                             "cpu_threads": cfg.cache.cpu_threads or torch.get_num_threads(),
                             "batch_size": cfg.cache.batch_size, "cuda_graph": cfg.cache.cuda_graph,
                             "fused_augment": cfg.cache.fused_augment,
                             "teacher": {"arch": cfg.teacher.arch, "checkpoint": cfg.teacher.checkpoint,
                                         "format": report.format, "output": cfg.teacher.output,
                                         "dropped_keys": report.dropped[:50]},
                             "preprocessing": {"input_size": [3, r, r], "interpolation": "bilinear",
                                               "decode": Decoder(device).name,
                                               "mean": teacher.mean.flatten().tolist(),
                                               "std": teacher.std.flatten().tolist(),
                                               "views": "replayed from augment rows (seed.augment)"},
                         })
    made = cache.attributes(group).get("preprocessing", {}).get("decode")
    if made is not None and made != Decoder(device).name:
        log.warning("%s was begun decoding with %s; this run decodes with %s on %s, so its shards are embedded "
                    "otherwise than the others (CUDA decodes with nvJPEG and computes in bfloat16, the CPU decodes "
                    "with PIL and computes in float32): finish it on the kind of device it was begun on",
                    plan.cache_url, made, Decoder(device).name, device)
    if coordinator:
        cache.remove_stale_partials(plan.cache_url)
        reopen_repaired(plan, group)
    return plan, group


def reopen_repaired(plan: Plan, group: zarr.Group) -> list[int]:
    """The shards recorded as damaged (``data.damaged=keep``) whose files now read whole: their records are
    taken back so this run embeds them again (``cache.reopen_shards``). Each such shard is read through on
    every run (its images are not decoded); one still damaged, or that cannot be read now (a missing file, a
    store that does not answer), stays done as recorded."""
    repaired = []
    for s, damage in cache.damaged_shards(group).items():
        try:
            n = count_samples(plan.urls[s])
        except DamagedShard:
            continue
        except (SeedError, OSError) as exc:
            log.warning("%s: recorded as damaged; could not read it to see whether it was repaired (%s); it stays "
                        "as recorded", plan.urls[s], exc)
            continue
        if n != plan.lengths[s]:  # the plan counted the damaged copy, and the rows were laid out for that count
            raise SeedError(f"{plan.urls[s]}: recorded as damaged in {plan.cache_url}, it now reads whole with {n} "
                            f"samples where the cache has rows for {plan.lengths[s]}; rebuild the cache with "
                            "--overwrite (or name another cache)")
        log.warning("%s: recorded as damaged (%s of %s samples read), it now reads whole; embedding it again "
                    "(the cache gets a new revision: a bank made from it is built again)",
                    plan.urls[s], damage["read"], damage["expected"])
        repaired.append(s)
    cache.reopen_shards(group, repaired, "repaired: the shard recorded as damaged reads whole")
    return repaired


def cpu_threads(group: zarr.Group) -> int:
    """The CPU thread count every writer of this cache uses (0 = not fixed)."""
    return int(cache.attributes(group).get("cpu_threads", 0))


def _chunks(samples: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


View = tuple[Any, np.ndarray, int, int]
"""One view to make: its image (decoded uint8 ``[3, h, w]``, or ``(Sample, (h, w))`` still encoded, with the
size from its header), parameters, row, view."""


def _view_jobs(url: str, shard_len: int, cfg: RunConfig, batch_size: int, meta: dict[str, np.ndarray],
               skipped: list[dict[str, str]], decoder: Decoder | None,
               damage: list[DamagedShard]) -> Iterator[list[View]]:
    """Read a shard once, draw V views per image, yield them ``batch_size`` at a time in shard order.

    ``decoder`` decodes a batch's worth of images at a time (one nvJPEG call on CUDA) and views are
    drawn for the decoded size; without one, images stay encoded and views are drawn for the size in
    their header (the GPU decodes them later, ``_decode_views``). Batches hold the same views in the
    same order either way. Fills ``meta`` (keys, labels, sizes, augment, valid) and ``skipped``, and
    ``damage`` when the shard is damaged and ``data.damaged=keep`` (else ``DamagedShard`` is raised).
    """
    c = cfg.cache
    pending: list[View] = []
    n = 0
    for chunk in _chunks(iter_shard(url, damage_handler(cfg.data.damaged, damage)), max(1, batch_size // c.views)):
        n += len(chunk)
        if chunk[-1].index >= shard_len:
            raise SeedError(f"{url}: more samples than the {shard_len} planned; the shard changed since the cache was made")
        images: list[Any] = decoder.decode(chunk) if decoder is not None else [_sized(s) for s in chunk]
        kept: list[tuple[Sample, Any, tuple[int, int]]] = []
        for sample, image in zip(chunk, images):
            meta["keys"][sample.index] = sample.key
            meta["labels"][sample.index] = sample.label
            if isinstance(image, ValueError):
                skipped.append({"key": sample.key, "reason": str(image)})
                continue
            h, w = image.shape[-2:] if isinstance(image, torch.Tensor) else image[1]
            kept.append((sample, image, (int(h), int(w))))
        # the chunk's views drawn at once (the rows draw_views gives, image by image)
        drawn = draw_many(c.recipe, seed=c.seed, keys=[s.key for s, _, _ in kept], sizes=[hw for _, _, hw in kept],
                          views=c.views)
        for (sample, image, hw), views in zip(kept, drawn):
            meta["sizes"][sample.index] = hw
            meta["augment"][sample.index] = views
            meta["valid"][sample.index] = True
            pending += [(image, views[v], sample.index, v) for v in range(c.views)]
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
    if pending:
        yield pending
    if n != shard_len and not (damage and n < shard_len):
        raise SeedError(f"{url}: {n} samples, but the plan counted {shard_len}; the shard changed since the cache was made")


def _sized(sample: Sample) -> tuple[Sample, tuple[int, int]] | ValueError:
    try:
        return sample, image_size(sample)
    except ValueError as exc:
        return exc


def _augment(views: list[View], cfg: RunConfig, device: torch.device,
             slots: SharedSlots | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``(x, rows, views)``: decoded views augmented on ``device`` (in one of a worker's ``slots`` when given)."""
    params = torch.from_numpy(np.stack([p for _, p, _, _ in views]))         # on the host: see apply_batch
    moved: dict[int, torch.Tensor] = {}                                       # each image once, not once per view
    for im, _, _, _ in views:
        if id(im) not in moved:
            moved[id(im)] = im.to(device)
    images = [moved[id(im)] for im, _, _, _ in views]
    r = cfg.cache.resolution
    out = None if slots is None else slots.empty(len(views), 3, r, r)
    x = apply_batch(images, params, cfg.cache.recipe, r, device, out, fused_augment=cfg.cache.fused_augment)
    return x, np.array([r for *_, r, _ in views]), np.array([v for *_, v in views])


@torch.inference_mode()
def embed(teacher: Encoder, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """L2-normalised teacher output of a float batch in [0, 1], as float32 on CPU."""
    x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device):
        out = teacher(x)
    return F.normalize(out.float(), dim=1).cpu()


_capturing = threading.Lock()  # one CUDA graph capture at a time in this process


class Forward:
    """The stage's teacher forward: ``forward(x)`` is ``embed(teacher, x, device)``, by replaying a CUDA graph
    on CUDA when ``graph`` is set.

    An eager forward launches a few hundred kernels from Python (ResNet-50 with bf16 autocast), each
    one taking the interpreter lock that this process's data thread also needs to decode and augment
    the next batch; with the data thread busy the GPU waits for launches. A graph launches the whole
    forward (and the L2 normalisation) in one call. It is captured once per stage run, at the cache's
    batch size, before the data thread starts (captures of concurrent shard tasks in one process take
    turns, and errors only in the capturing thread): a shorter batch (a shard's last) fills the first
    rows of the captured input and takes those rows of the output (rows do not mix in an eval-mode
    forward; the other rows are the previous batch's, computed and dropped).

    The graph runs the same kernels at the same batch size as an eager forward, so its values are
    those of eager full batches; a shard's last, shorter batch runs at the full size too, where
    eager runs it at its own. A model that cannot be captured (a host sync in its forward) falls
    back to eager with a warning naming the reason. ``mode``: ``cuda graph`` or ``eager``.
    """

    def __init__(self, teacher: Encoder, device: torch.device, *, batch_size: int, resolution: int, graph: bool):
        self.teacher, self.device, self.mode = teacher, device, "eager"
        self._graph: torch.cuda.CUDAGraph | None = None
        if graph and device.type == "cuda":
            try:
                self._capture(batch_size, resolution)
                self.mode = "cuda graph"
            except RuntimeError as exc:  # capture refused: what stands is still an eager forward
                self._graph = None
                log.warning("cache.cuda_graph: the teacher %s could not be captured as a CUDA graph (%s); its forward "
                            "runs eagerly (set cache.cuda_graph=false to skip the attempt)", type(teacher).__name__,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        # graphs need autocast's weight-cast cache off: a cached cast would be freed after capture
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = self.teacher(x)
        return F.normalize(out.float(), dim=1)

    def _capture(self, batch_size: int, resolution: int) -> None:
        x = torch.zeros(batch_size, 3, resolution, resolution, device=self.device).contiguous(
            memory_format=torch.channels_last)
        stream = torch.cuda.Stream(self.device)   # one stream for warm-up and capture (library handles made here)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._normalised(x)
            with _capturing, torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                out = self._normalised(x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._x, self._out, self._graph = x, out, graph

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised teacher output of a float batch in [0, 1], as float32 on CPU."""
        if self._graph is None:
            return embed(self.teacher, x, self.device)
        parts = []
        for start in range(0, x.shape[0], self._x.shape[0]):
            part = x[start:start + self._x.shape[0]]
            self._x[: part.shape[0]].copy_(part, non_blocking=True)
            self._graph.replay()
            parts.append(self._out[: part.shape[0]].cpu())                  # waits: the next replay overwrites it
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclasses.dataclass
class _Views:
    """A batch of one shard's augmented views, from whichever process made it."""

    shard: int
    x: torch.Tensor                 # B x 3 x r x r
    rows: np.ndarray                # B, rows within the shard
    views: np.ndarray               # B
    failed: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # rows whose image did not decode
    dropped: int = 0                # views left out for those rows


@dataclasses.dataclass
class _Encoded:
    """A batch of one shard's views with their images still encoded (made by a worker for the GPU).

    Pickled (from the worker to this process) with the distinct images' bytes in one tensor
    (``PackedSamples``), so they cross through shared memory; the V views of an image share it again.
    """

    shard: int
    views: list[View]
    slots: SharedSlots | None = dataclasses.field(default=None, repr=False, compare=False)  # the worker's, to pack into

    def samples(self) -> tuple[list[Sample], list[int]]:
        """The batch's distinct samples (an image's V views share one) and each view's index among them."""
        slot: dict[int, int] = {}
        distinct: list[Sample] = []
        for (sample, _), *_ in self.views:
            if slot.setdefault(id(sample), len(distinct)) == len(distinct):
                distinct.append(sample)
        return distinct, [slot[id(sample)] for (sample, _), *_ in self.views]

    def __getstate__(self) -> dict[str, Any]:
        distinct, slots = self.samples()
        return {"shard": self.shard, "packed": PackedSamples.pack(distinct, self.slots),
                "views": [(i, size, params, row, v) for i, ((_, size), params, row, v) in zip(slots, self.views)]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        samples = state["packed"].unpack()
        self.shard, self.slots = state["shard"], None
        self.views = [((samples[i], size), params, row, v) for i, size, params, row, v in state["views"]]


def _decode_views(item: _Encoded, decoder: Decoder, cfg: RunConfig, device: torch.device) -> _Views:
    """Decode a batch's distinct images (nvJPEG on CUDA) and augment its views on ``device``.

    An image whose header read but whose data does not decode, or decodes to another size than its
    header said, leaves the batch and is reported in ``failed`` (its row becomes a skipped sample).
    """
    distinct, slots = item.samples()
    decoded = decoder.decode(distinct)
    ready: list[View] = []
    failed: dict[int, str] = {}
    for slot, ((sample, size), params, row, v) in zip(slots, item.views):
        image = decoded[slot]
        if isinstance(image, ValueError):
            failed[row] = str(image)
        elif tuple(image.shape[-2:]) != tuple(size):
            failed[row] = f"decodes to {tuple(image.shape[-2:])}, its header says {tuple(size)}"
        else:
            ready.append((image, params, row, v))
    dropped = len(item.views) - len(ready)
    if not ready:
        return _Views(item.shard, torch.empty(0), np.zeros(0, np.int64), np.zeros(0, np.int64), sorted(failed.items()),
                      dropped)
    x, rows, views = _augment(ready, cfg, device)
    return _Views(item.shard, x, rows, views, sorted(failed.items()), dropped)


@dataclasses.dataclass
class _ShardDone:
    """The end of a shard: its rows' metadata (everything but the embeddings) and what was skipped."""

    shard: int
    meta: dict[str, np.ndarray]
    skipped: list[dict[str, str]]
    decode: str
    damaged: dict[str, Any] | None  # what was read and lost of a damaged shard kept by data.damaged=keep


def _shard_items(cfg: RunConfig, plan: Plan, shards: list[int], batch_size: int, device: torch.device,
                 encoded: bool = False, slots: SharedSlots | None = None) -> Iterator[_Views | _Encoded | _ShardDone]:
    """Every view batch of ``shards``, shard after shard, each shard closed by its ``_ShardDone``.

    ``encoded``: leave the images encoded (``_Encoded``: the main process decodes them on the GPU);
    otherwise decode and augment here, on ``device``. A worker's ``slots``: the shared buffers it writes the
    views (or the images' bytes) into, sent by reference.
    """
    decoder = None if encoded else Decoder(device)
    cap, V = plan.capacity, cfg.cache.views
    for shard in shards:
        meta: dict[str, np.ndarray] = {
            "augment": np.full((cap, V, P), np.nan, dtype=np.float32),
            "keys": np.full(cap, "", dtype=object),
            "labels": np.full(cap, -1, dtype=np.int32),
            "valid": np.zeros(cap, dtype=bool),
            "sizes": np.zeros((cap, 2), dtype=np.int32),
        }
        skipped: list[dict[str, str]] = []
        damage: list[DamagedShard] = []
        for views in _view_jobs(plan.urls[shard], plan.lengths[shard], cfg, batch_size, meta, skipped, decoder, damage):
            if encoded:
                yield _Encoded(shard, views, slots)
            else:
                made = _Views(shard, *_augment(views, cfg, device, slots))
                yield made if slots is None else slots.send(made)
        meta["keys"] = meta["keys"].astype(str)
        yield _ShardDone(shard, meta, skipped, decoder.name if decoder is not None else "nvjpeg",
                         _damage_record(damage, meta, plan.lengths[shard]))


def _damage_record(damage: list[DamagedShard], meta: dict[str, np.ndarray], expected: int) -> dict[str, Any] | None:
    """What a damaged shard kept and lost: the samples read whole before the damage keep their rows; the
    rows after them stay invalid. ``lost`` counts the samples the shard should have had past them
    (None when the count itself came from scanning the damaged shard: what followed is unknown)."""
    if not damage:
        return None
    read = int(np.count_nonzero(meta["keys"] != ""))
    return {"error": str(damage[0]), "offset": damage[0].offset, "read": read, "expected": expected,
            "lost": expected - read if expected > read else None,
            "last_key": str(meta["keys"][read - 1]) if read else None}


def _worker_items(cfg: RunConfig, plan: Plan, batch_size: int, encoded: bool, slots: SharedSlots | None,
                  shards: Sequence[int]) -> Iterator[_Views | _Encoded | _ShardDone]:
    """A worker's part of the stage's input, whole shards each, so every row, view and batch is what one
    process makes (and, on the CPU, the cache the same bytes). ``encoded``: the worker only reads shards
    and draws views; the main process decodes on the GPU."""
    return _shard_items(cfg, plan, list(shards), batch_size, torch.device("cpu"), encoded, slots)


def _stream(cfg: RunConfig, plan: Plan, shards: list[int], batch_size: int, device: torch.device,
            workers: int, depth: int) -> Iterator[_Views | _ShardDone]:
    """Decoded, augmented view batches, made ``depth`` ahead.

    No workers: one background thread reads, decodes and augments on ``device`` (nvJPEG and the GPU
    on CUDA), or with ``depth`` 0 this thread, between forwards. Workers on the CPU: each reads, decodes
    and augments whole shards. Workers on CUDA: each reads whole shards and draws their views; a
    background thread of this process decodes (nvJPEG) and augments on the GPU.
    """
    if workers == 0:
        items = cast(Iterator[_Views | _ShardDone], _shard_items(cfg, plan, shards, batch_size, device))
        return prefetch(items, depth)
    gpu = device.type == "cuda"
    r = cfg.cache.resolution
    # the views on the CPU; the batches' encoded bytes (of any size) for the GPU
    slots = SharedSlots.for_workers(workers, depth, 0 if gpu else batch_size * 3 * r * r * 4)
    made = shard_workers(shards, functools.partial(_worker_items, cfg, plan, batch_size, gpu, slots), workers=workers,
                         depth=depth)
    if not gpu:
        return cast(Iterator[_Views | _ShardDone], made)
    decoder = Decoder(device)
    return prefetch((_decode_views(it, decoder, cfg, device) if isinstance(it, _Encoded) else it for it in made),
                    depth)


def embed_shards(cfg: RunConfig, plan: Plan, group: zarr.Group, shards: list[int], teacher: Encoder, *, workers: int = 0,
                 on_views: Callable[[int], Any] | None = None,
                 on_shard: Callable[[dict[str, Any]], Any] | None = None) -> dict[int, dict[str, Any]]:
    """Run ``teacher`` over input shards; write each shard's rows, then its completion record, as it ends
    (and hand the record to ``on_shard`` once both are written).

    ``workers`` processes each own whole shards (on the CPU they read, decode and augment; on CUDA they
    read and draw views, and a thread here decodes and augments on the GPU); 0 = one background thread.
    On the CPU the process must use the cache's thread count (``set_cpu_threads(cpu_threads(group))``,
    done once by the entry points): it fixes the forward's last bits, so every writer of the cache
    gives the same bytes. A shard is written in a background thread while the next one is embedded
    (``seed.prefetch.WriteBehind``).
    """
    device = resolve_device(cfg.cache.device)
    if device.type == "cpu":
        require_cpu_threads(cpu_threads(group), plan.cache_url)
    # the augmentation kernels move a view's last bits on the GPU: every writer of the cache uses the recorded choice
    attrs = cache.attributes(group)
    recorded = attrs.get("fused_augment")
    if recorded is not None and bool(recorded) != cfg.cache.fused_augment:
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, fused_augment=bool(recorded)))
    batch_size = int(attrs.get("batch_size", cfg.cache.batch_size))
    graph = bool(attrs.get("cuda_graph", cfg.cache.cuda_graph))
    if not _told_recorded.get(plan.cache_url):
        _told_recorded[plan.cache_url] = True  # once per cache and process, not per shard task
        for name, setting, used in (("cache.batch_size", cfg.cache.batch_size, batch_size),
                                    ("cache.cuda_graph", cfg.cache.cuda_graph, graph)):
            if setting != used:
                log.warning("%s=%s: this cache was begun with %s, which every writer of it uses (it fixes the "
                            "forward's last bits); to change it, make the cache again (--overwrite)", name, setting, used)
    teacher.to(device)
    freeze(teacher)  # eval mode whoever loaded it: a training-mode BatchNorm would mix the rows of a batch
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    cap, V, D = plan.capacity, cfg.cache.views, teacher.out_dim
    forward = Forward(teacher, device, batch_size=batch_size, resolution=cfg.cache.resolution, graph=graph)
    emb: dict[int, np.ndarray] = {}
    forwards: dict[int, int] = {}
    forward_s: dict[int, float] = {}
    started: dict[int, float] = {}
    records: dict[int, dict[str, Any]] = {}
    failed: dict[int, list[tuple[int, str]]] = {}
    first_wait: dict[int, float] = {}  # seconds this thread waited for the shard's first batch
    waited: dict[int, float] = {}      # and for its other batches
    depth = read_ahead(cfg.cache.prefetch, device, workers, model_threads=_model_threads(device))

    def record_written(s: int, record: dict[str, Any]) -> None:
        records[s] = record
        if on_shard is not None:
            on_shard(record)

    asked = time.perf_counter()
    # a shard's rows and record are written in the background while the next shard is embedded
    with WriteBehind("seed-teacher-write") as writes:
        for item in _stream(cfg, plan, shards, batch_size, device, workers, depth):
            got = time.perf_counter()
            s = item.shard
            if s not in emb:  # the shard's first item
                emb[s] = np.full((cap, V, D), np.nan, dtype=np.float16)
                forwards[s], forward_s[s], started[s], waited[s], first_wait[s] = 0, 0.0, got, 0.0, got - asked
            else:
                waited[s] += got - asked
            if isinstance(item, _Views):
                failed.setdefault(s, []).extend(item.failed)
                if len(item.rows):
                    t0 = time.perf_counter()
                    z = forward(item.x)
                    forward_s[s] += time.perf_counter() - t0
                    if not torch.isfinite(z).all():  # stored as valid, NaN rows would look like embeddings to every later stage
                        bad = sorted({int(r) for r in item.rows[~torch.isfinite(z).all(dim=1).numpy()]})
                        raise SeedError(f"{plan.urls[s]}: the teacher gave non-finite embeddings for {len(bad)} of "
                                        f"{len(item.rows)} views of a batch (rows {bad[:5]} of the shard); check the teacher's "
                                        f"weights ({cfg.teacher.checkpoint or cfg.teacher.arch}); nothing of this shard is written")
                    forwards[s] += len(item.rows)
                    emb[s][item.rows, item.views] = z.numpy().astype(np.float16)
                if on_views is not None:
                    on_views(len(item.rows) + item.dropped)
                asked = time.perf_counter()
                continue
            _drop_failed(item, failed.pop(s, []), emb[s])
            record = {
                "url": plan.urls[s], "samples": plan.lengths[s], "valid": int(item.meta["valid"].sum()),
                "skipped": item.skipped, "teacher_forwards": forwards.pop(s), "teacher_seconds": round(forward_s.pop(s), 4),
                "input_wait_seconds": round(waited.pop(s), 4), "first_batch_wait_seconds": round(first_wait.pop(s), 4),
                "seconds": round(time.perf_counter() - started.pop(s), 4), "device": str(device), "decode": item.decode,
                "forward": forward.mode,
                "workers": workers, "read_ahead": depth, "cores": cpu_cores(), "finished_at": round(time.time(), 3),
                **({"damaged": item.damaged} if item.damaged is not None else {}),
            }
            writes.submit(functools.partial(cache.write_shard, group, s, {**item.meta, "embeddings": emb.pop(s)}, record),
                          then=functools.partial(record_written, s, record))
            asked = time.perf_counter()
    return records


def _model_threads(device: torch.device) -> int | None:
    """The forward's intra-op threads on the CPU (the cache's ``cpu_threads`` once set), which take their cores
    before the data path's workers and thread; None on CUDA."""
    return torch.get_num_threads() if device.type == "cpu" else None


def _drop_failed(done: _ShardDone, failed: list[tuple[int, str]], emb: np.ndarray) -> None:
    """Rows whose image read but did not decode on the GPU become skipped samples, as on the CPU path."""
    for row in sorted({r for r, _ in failed}):
        reason = next(why for r, why in failed if r == row)
        done.meta["valid"][row] = False
        done.meta["augment"][row] = np.nan
        done.meta["sizes"][row] = 0
        emb[row] = np.nan
        done.skipped.append({"key": str(done.meta["keys"][row]), "reason": reason})


def embed_shard(cfg: RunConfig, plan: Plan, group: zarr.Group, shard: int, teacher: Encoder, *,
                workers: int = 0) -> dict[str, Any]:
    """One input shard in this process: the Dask layout's unit of work. ``workers``: 1, a data worker process reads
    the shard (``shard_task_workers``); 0, a background thread of this process."""
    return embed_shards(cfg, plan, group, [shard], teacher, workers=min(workers, 1))[shard]


_daemon_noted = False


def shard_task_workers(setting: int, device: torch.device) -> int:
    """Data worker processes for one shard's task (``embed_shard``): ``cache.workers`` as ``run`` resolves it, at most
    one (a worker owns whole shards), and none in a daemonic process, which may not start processes: a Dask worker
    is one unless started with ``DASK_DISTRIBUTED__WORKER__DAEMON=False`` (said once per process)."""
    global _daemon_noted
    workers = min(1, data_workers(setting, device, model_threads=_model_threads(device)))
    if workers and multiprocessing.current_process().daemon:
        if not _daemon_noted:
            _daemon_noted = True
            log.warning("this process is daemonic (a Dask worker by default) and may not start processes: its teacher "
                        "shard tasks read their shards in a thread, not a data worker process; start the Dask workers "
                        "with DASK_DISTRIBUTED__WORKER__DAEMON=False to give each task one")
        return 0
    return workers


def run(cfg: RunConfig, storage: Storage, *, overwrite: bool = False, shards: list[int] | None = None,
        finalize: bool = True, progress: bool = True, load: TeacherLoader = load_teacher,
        on_shard: Callable[[dict[str, Any]], Any] | None = None, tidy: bool = True) -> TeacherResult:
    """The whole stage in this process: skip done shards, embed the rest, mark the cache complete.

    ``shards``: only these input shards (one worker's part); ``finalize``: mark the cache complete
    when every shard is done (only the coordinator should: it writes the root attributes); ``on_shard``:
    called with each shard's completion record as the shard is written; ``tidy``: as the coordinator, remove
    stale partial files and take back repaired shards (``prepare``; False where the caller has just done it).
    ``overwrite`` and ``shards`` do not combine: each worker would remove the cache the others are writing.
    """
    from seed.report import progress_bar

    if overwrite and shards is not None:
        raise SeedError("--overwrite does not combine with --shards: every worker would delete the cache the others "
                        "are writing; make the cache again once (seed teacher --overwrite, or delete it), then start "
                        "the --shards workers")

    if shards is not None:  # before the teacher is loaded and the shards counted
        n = len(expand_urls(storage.resolve("shards", cfg.data.train)))
        bad = sorted({s for s in shards if not 0 <= s < n})
        twice = sorted({s for s in shards if shards.count(s) > 1})
        if bad or twice:
            raise SeedError(f"--shards: {'indices out of range 0..' + str(n - 1) + ': ' + str(bad) if bad else ''}"
                            f"{'; ' if bad and twice else ''}{'repeated: ' + str(twice) if twice else ''}")
    teacher, report = load(cfg.teacher)
    plan, group = prepare(cfg, storage, teacher, report, overwrite=overwrite, coordinator=shards is None and tidy)
    device = resolve_device(cfg.cache.device)
    if device.type == "cpu":
        set_cpu_threads(cpu_threads(group))
    todo_all = range(len(plan.urls)) if shards is None else shards
    done = set(cache.done_shards(group))
    todo = [s for s in todo_all if s not in done]
    total_views = sum(plan.lengths[s] for s in todo) * cfg.cache.views
    workers = min(data_workers(cfg.cache.workers, device, model_threads=_model_threads(device)), len(todo))
    with progress_bar(total=total_views, unit="view", desc=f"teacher ({len(todo)} shards, {workers} workers)",
                      disable=not progress, smoothing=0.1) as bar:  # closed before any error prints
        records = embed_shards(cfg, plan, group, todo, teacher, workers=workers, on_views=bar.update,
                               on_shard=on_shard) if todo else {}
    totals = None
    if finalize and len(set(cache.done_shards(group))) == len(plan.urls):
        totals = cache.finalize(group, plan.cache_url)
    return TeacherResult(plan.cache_url, len(plan.urls), tuple(sorted(records)), tuple(sorted(done & set(todo_all))), totals)



def process_devices(cfg: RunConfig, n: int) -> list[str]:
    """The device of each of ``n`` teacher processes (0 = one per visible GPU): ``seed.launcher.process_devices``
    of ``cache.device``."""
    return launcher.process_devices(cfg.cache.device, n, "cache.device")


def processes_config(cfg: RunConfig, n: int, cores: list[int] | None = None) -> RunConfig:
    """``cfg`` as ``n`` teacher processes on this node run it: on the CPU, with the forward's threads unset
    (``cache.cpu_threads`` 0), one thread per core of a process's share of the cores (``cores``, default this
    process's). What a new cache records, so whatever lays the cache out first (this stage, or the flow before
    it) must use it."""
    devices = process_devices(cfg, n)
    shares = launcher.process_cores(len(devices), cores)
    if shares is None or devices[0] != "cpu" or cfg.cache.cpu_threads:
        return cfg
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, cpu_threads=min(map(len, shares))))


def run_processes(cfg: RunConfig, storage: Storage, n: int, *, overwrite: bool = False, progress: bool = True,
                  load: TeacherLoader = load_teacher,
                  on_shard: Callable[[dict[str, Any]], Any] | None = None, tidy: bool = True) -> TeacherResult:
    """The stage in ``n`` processes on this node (0 = one per visible GPU), each over every n-th shard left.

    Each process is pinned to a share of this process's cores (``process_cores``), so that what it takes
    automatically (data workers, and on the CPU its forward's threads) counts its share, as ``torchrun``'s
    ranks count theirs: 8 GPU processes on a 16-core node take one worker each, not 4. On the CPU a new
    cache's forwards run one thread per core of a share unless ``cache.cpu_threads`` says otherwise:
    processes that each run their data path between their own forwards on their own cores, where one
    process's forward would spread its threads over all the cores and its data path would take them from it.

    This process lays out the cache (``prepare``), starts ``seed teacher --shards ...`` per device
    from ``process_devices``, shows the shards done, and marks the cache complete once all are. A
    failed process stops the others; the shards finished so far are kept, and a re-run embeds the
    rest. Each process's output goes to a temporary log file, whose last lines the error quotes.
    ``on_shard``: called here with each shard's completion record once this process sees it; ``tidy``: as
    ``run``'s.
    """
    from seed.report import progress_bar

    devices = process_devices(cfg, n)
    shares = launcher.process_cores(len(devices))
    cfg = processes_config(cfg, n)
    teacher, report = load(cfg.teacher)
    plan, group = prepare(cfg, storage, teacher, report, overwrite=overwrite, coordinator=tidy)
    del teacher
    done = set(cache.done_shards(group))
    todo = [s for s in range(len(plan.urls)) if s not in done]
    parts = [(i, device, todo[i::len(devices)]) for i, device in enumerate(devices) if todo[i::len(devices)]]
    with tempfile.TemporaryDirectory(prefix="seed-teacher-") as tmp, launcher.Children(tmp) as children:
        config, roots = write_run_files(cfg, storage, tmp)
        bar = progress_bar(total=len(plan.urls), initial=len(done), unit="shard", disable=not progress,
                           desc=f"teacher ({len(parts)} processes: {', '.join(sorted(set(devices)))})")
        try:
            for i, device, part in parts:
                children.start([sys.executable, "-m", "pipeline.cli", "teacher", "-c", config, "--storage", roots,
                                "--shards", ",".join(map(str, part)), "--set", f"cache.device={device}", "--quiet"],
                               cores=shares[i] if shares is not None else None)
            failed = _wait(children, plan.cache_url, bar, done, on_shard)
        finally:
            bar.close()
        if failed is not None:
            _, device, part = parts[failed]
            raise children.error(failed, f"teacher process on {device} (shards {part})",
                                 "shards finished so far are kept, re-run to embed the rest")
    group = cache.open_group(plan.cache_url, "r+")
    totals = cache.finalize(group, plan.cache_url)
    return TeacherResult(plan.cache_url, len(plan.urls), tuple(sorted(todo)), tuple(sorted(done)), totals)


def _wait(children: launcher.Children, url: str, bar: Any, seen: set[int],
          on_shard: Callable[[dict[str, Any]], Any] | None) -> int | None:
    """Wait for every process, advancing ``bar`` and calling ``on_shard`` as shards complete (``seen``: those done
    before); the index of the first failed process, or None."""
    seen = set(seen)
    listed_at = 0.0
    while True:
        finished, bad = children.poll()
        if finished or time.monotonic() - listed_at >= _RECORDS_EVERY_S:
            listed_at = time.monotonic()
            try:  # one listing, then only the new records read: not every record every time
                new = sorted(cache.listed_records(url) - seen)
                group = cache.open_group(url, "r") if new else None
                for s in new:
                    record = cache.shard_record(group, s) if group is not None else None
                    if record is None:
                        continue  # its directory listed before its file was written: the next round reads it
                    seen.add(s)
                    bar.update(1)
                    if on_shard is not None:
                        on_shard(record)
            except OSError as exc:  # the store failed one round (a connection reset): progress only, the processes go on
                log.debug("listing the records of %s failed (%s); trying again", url, exc)
        if finished:
            return bad
        time.sleep(0.5)
