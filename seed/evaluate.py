"""Frozen-feature evaluation: weighted kNN (FAISS, cosine) and a linear probe, streamed from the shards.

Features come from one pass over a split's shards that feeds every encoder the same batches:
decode -> the whole image resized to the evaluation resolution (no crop, no flip, no colour
change) -> each encoder's features, of which only the float32 rows are kept (``extract_all``), on
local disk (``seed.features``: unnamed temporary files, under ``TMPDIR``), not in memory. So memory does
not grow with N: no image is kept except the raw-pixel baseline's bounded, seeded subsample
(``PixelSample``), and no feature row except those a score is reading.

kNN follows the InstDisc/DINO protocol: cosine similarity on L2-normalised features, the k = 20
nearest training images vote with weight exp(sim / 0.07); 1-NN is reported beside it. The training
rows go through exact inner-product indexes a block at a time (512 MiB of float32 each), every
block searched by every query batch and the neighbours merged, so one block, one query batch and
the n_test x k neighbours are all it holds. The linear probe is multinomial logistic regression on
standardised features: full-batch L-BFGS while the standardised training set is small
(n x d <= ``LBFGS_MAX_ELEMENTS``, read into memory), mini-batch Adam on the same objective beyond
(``SGD_EPOCHS`` epochs, on the GPU when there is one, each batch read from disk, or on a GPU from the rows
read onto it once when they fit: ``probe_resident``). Both
are seeded; each score says which one it used.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from seed.augment import apply_batch
from seed.views import COL, P, Recipe
from seed.decode import Decoder
from seed.devices import autocast
from seed.errors import SeedError
from seed.features import FeatureFile, FeatureWriter, Rows, check_disk, write_rows
from seed.prefetch import prefetch
from seed.report import OnProgress, Progress
from seed.shards import Damaged, Sample, damage_handler, decode_image, iter_shard, lengths_from_info
from seed.workers import PackedSamples, SharedSlots, shard_workers

IDENTITY = Recipe()
EVAL_BATCH = 256           # images per forward; a batch never spans two shards
QUERY_BATCH = 8192         # kNN queries per search call
LBFGS_MAX_ELEMENTS = 1 << 27  # n x d up to which the probe is full-batch L-BFGS (512 MiB of standardised float32)
SGD_EPOCHS = 30
SGD_BATCH = 1024
SGD_LR = 1e-2

Encode = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)


def identity_params(n: int) -> torch.Tensor:
    """View rows that keep the whole image unchanged (box = image, no flip, no colour change)."""
    rows = torch.zeros(n, P)
    rows[:, COL["crop_w"]] = rows[:, COL["crop_h"]] = 1.0
    rows[:, [COL["brightness"], COL["contrast"], COL["saturation"]]] = 1.0
    rows[:, COL["order_0"]: COL["order_3"] + 1] = torch.arange(4, dtype=torch.float32)
    return rows


# ---------------------------------------------------------------------------------------------
# Small sets held in memory (tests, the Fashion-MNIST benchmark). The stage streams: extract_all.


def images(urls: Sequence[str], resolution: int, batch_size: int = 512) -> tuple[list[torch.Tensor], np.ndarray]:
    """All decodable images of ``urls`` as float batches in [0, 1] at ``resolution``, and their labels.

    Holds every image (N x 3 x r x r float32): for small sets only; ``extract_all`` streams.
    """
    out, labels, pending = [], [], []
    for url in urls:
        for sample in iter_shard(url):
            try:
                pending.append(decode_image(sample))
            except ValueError:
                continue
            labels.append(sample.label)
            if len(pending) == batch_size:
                out.append(apply_batch(pending, identity_params(len(pending)), IDENTITY, resolution))
                pending = []
    if pending:
        out.append(apply_batch(pending, identity_params(len(pending)), IDENTITY, resolution))
    return out, np.asarray(labels, dtype=np.int64)


@torch.inference_mode()
def extract(fn: Encode, batches: Sequence[torch.Tensor], device: torch.device) -> np.ndarray:
    """Features ``[n, d]`` (float32) of every batch through ``fn``."""
    feats = []
    for x in batches:
        with autocast(device):
            feats.append(fn(x.to(device)).float().cpu())
    return torch.cat(feats).numpy()


def pixels(batches: Sequence[torch.Tensor]) -> np.ndarray:
    """The raw-pixel baseline's features of batches held in memory: flattened images."""
    return torch.cat([x.flatten(1) for x in batches]).numpy()


# ---------------------------------------------------------------------------------------------
# Streaming extraction


@dataclasses.dataclass(frozen=True)
class PixelSample:
    """Which images the raw-pixel baseline keeps: at most ``max_images`` of a split, resized to
    ``resolution`` px (``min(resolution, evaluation resolution)``).

    An image is in when its seeded key hash is among the ``max_images`` smallest of the split, so
    the subsample is uniform, known before the pass ends, and the same for any worker count. The
    default keeps all of a Fashion-MNIST-sized split, so the baseline the teacher is held against
    has the same memory bank as the teacher's kNN: 60,000 x 3 x 32 x 32 float32 is 737 MB.
    """

    max_images: int = 60_000
    resolution: int = 32
    seed: int = 0

    def priority(self, key: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{self.seed}/{key}".encode(), digest_size=8).digest(), "big")


@dataclasses.dataclass
class Extracted:
    """One split's features, in shard order (tar order within a shard): undecodable samples left out."""

    features: dict[str, FeatureFile]  # encoder name -> [n, d] float32 rows on local disk
    labels: np.ndarray                # [n] int64
    pixels: np.ndarray | None         # [m, 3 * r * r] float32 in [0, 1]: the baseline's subsample, shard order
    pixel_labels: np.ndarray | None   # [m]
    pixel_resolution: int = 0
    skipped: int = 0                  # samples that did not decode

    @property
    def n(self) -> int:
        return len(self.labels)

    def close(self) -> None:
        """Give every encoder's feature file its disk space back (those closed already stay closed)."""
        for rows in self.features.values():
            rows.close()

    def __enter__(self) -> Extracted:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclasses.dataclass
class _Chunk:
    """Up to ``EVAL_BATCH`` consecutive samples of one shard: decoded (``x``) or still encoded (``packed``: their
    bytes in one tensor, in the worker's shared buffers)."""

    shard: int
    read: int                         # samples read, decodable or not (for progress)
    index: np.ndarray                 # [b] positions in the shard of the decodable ones
    keys: list[str]
    labels: np.ndarray                # [b]
    x: torch.Tensor | None = None     # [b, 3, r, r] float in [0, 1]
    packed: PackedSamples | None = None


def _decode(shard: int, samples: list[Sample], decoder: Decoder, resolution: int,
            slots: SharedSlots | None = None, fused_augment: bool = False) -> _Chunk:
    """The batch's decodable images, resized whole to ``resolution`` on the decoder's device (in one of a
    worker's ``slots`` when given; ``fused_augment``: see ``apply_batch``)."""
    kept, decoded = [], []
    for sample, image in zip(samples, decoder.decode(samples)):
        if not isinstance(image, ValueError):
            kept.append(sample)
            decoded.append(image)
    out = None if slots is None or not decoded else slots.empty(len(decoded), 3, resolution, resolution)
    x = (apply_batch(decoded, identity_params(len(decoded)), IDENTITY, resolution, decoder.device, out, fused_augment)
         if decoded
         else torch.empty(0, 3, resolution, resolution, device=decoder.device))
    return _Chunk(shard, len(samples), np.array([s.index for s in kept], dtype=np.int64), [s.key for s in kept],
                  np.array([s.label for s in kept], dtype=np.int64), x=x)


def _shard_chunks(urls: Sequence[str], shards: Sequence[int], resolution: int, batch_size: int,
                  decoder: Decoder | None, damaged: Damaged = "stop",
                  slots: SharedSlots | None = None, fused_augment: bool = False) -> Iterator[_Chunk]:
    """The shards' samples in batches; decoded on ``decoder``'s device, or left encoded when it is None."""
    for shard in shards:
        pending: list[Sample] = []
        for sample in iter_shard(urls[shard], damage_handler(damaged)):
            pending.append(sample)
            if len(pending) == batch_size:
                yield _make_chunk(shard, pending, decoder, resolution, slots, fused_augment)
                pending = []
        if pending:
            yield _make_chunk(shard, pending, decoder, resolution, slots, fused_augment)


def _make_chunk(shard: int, samples: list[Sample], decoder: Decoder | None, resolution: int,
                slots: SharedSlots | None, fused_augment: bool = False) -> _Chunk:
    if decoder is None:
        return _Chunk(shard, len(samples), np.zeros(0, np.int64), [], np.zeros(0, np.int64),
                      packed=PackedSamples.pack(samples, slots))
    chunk = _decode(shard, samples, decoder, resolution, slots, fused_augment)
    return chunk if slots is None else slots.send(chunk)


def _worker_chunks(urls: Sequence[str], resolution: int, batch_size: int, decode: bool, damaged: Damaged,
                   slots: SharedSlots | None, shards: Sequence[int]) -> Iterator[_Chunk]:
    """A worker's shards, whole: on the CPU decoded and resized (into ``slots``), on CUDA left encoded (the
    main process decodes them with nvJPEG)."""
    decoder = Decoder(torch.device("cpu")) if decode else None
    return _shard_chunks(urls, shards, resolution, batch_size, decoder, damaged, slots)


def _chunks(urls: Sequence[str], resolution: int, device: torch.device, *, batch_size: int, workers: int,
            depth: int = 2, damaged: Damaged = "stop", fused_augment: bool = False,
            shards: Sequence[int] | None = None) -> Iterator[_Chunk]:
    """Decoded batches of the ``shards`` of ``urls`` (default: all), in no particular order (the caller restores
    shard order).

    No workers: one background thread reads, decodes and resizes on ``device``. Workers on the CPU
    each read, decode and resize whole shards; on CUDA they only read, and a background thread here
    decodes (nvJPEG) and resizes on the GPU.
    """
    shards = range(len(urls)) if shards is None else shards
    if workers == 0 or not shards:
        yield from prefetch(_shard_chunks(urls, shards, resolution, batch_size, Decoder(device), damaged,
                                          fused_augment=fused_augment), depth)
        return
    gpu = device.type == "cuda"
    workers = min(workers, len(shards))
    # the resized images on the CPU; the encoded bytes (of any size) for the GPU
    slots = SharedSlots.for_workers(workers, depth, 0 if gpu else batch_size * 3 * resolution ** 2 * 4)
    items = shard_workers(shards, functools.partial(_worker_chunks, urls, resolution, batch_size, not gpu,
                                                              damaged, slots), workers=workers, depth=depth)
    if not gpu:
        yield from items
        return
    decoder = Decoder(device)
    yield from prefetch((_decode(c.shard, c.packed.unpack() if c.packed else [], decoder, resolution,
                                 fused_augment=fused_augment) for c in items), depth)


class _PixelKeeper:
    """The bottom-``max_images`` samples by key priority, as flattened images at the sample's resolution."""

    def __init__(self, spec: PixelSample, resolution: int):
        self.spec, self.resolution = spec, min(spec.resolution, resolution)
        # ((-priority, -shard, -position), (shard, position), pixels, label)
        self.heap: list[tuple[tuple[int, int, int], tuple[int, int], np.ndarray, int]] = []

    def offer(self, chunk: _Chunk, x: torch.Tensor) -> None:
        if self.spec.max_images <= 0:
            return
        prio = [self.spec.priority(k) for k in chunk.keys]
        full = len(self.heap) >= self.spec.max_images
        take = [i for i, p in enumerate(prio) if not full or p <= -self.heap[0][0][0]]
        if not take:
            return
        small = x[take]
        if self.resolution != x.shape[-1]:  # downscale with an antialiasing filter: plain bilinear would alias
            small = nn.functional.interpolate(small, size=(self.resolution, self.resolution), mode="bilinear",
                                              antialias=True, align_corners=False)
        rows = small.flatten(1).float().cpu().numpy()
        for j, i in enumerate(take):
            # a copy: a view would keep the whole batch's rows alive as long as this one is kept
            self._add(prio[i], (chunk.shard, int(chunk.index[i])), rows[j].copy(), int(chunk.labels[i]))

    def _add(self, priority: int, place: tuple[int, int], row: np.ndarray, label: int) -> None:
        """Keep the sample while it is among the ``max_images`` smallest by (priority, place): a key two samples
        share keeps the earlier, whatever the order they are offered in (workers, processes)."""
        entry = ((-priority, -place[0], -place[1]), place, row, label)  # the heap's top: the one to give up first
        if len(self.heap) < self.spec.max_images:
            heapq.heappush(self.heap, entry)
        elif entry[0] > self.heap[0][0]:
            heapq.heapreplace(self.heap, entry)

    def entries(self) -> dict[str, np.ndarray]:
        """What it keeps, as arrays (``merge`` takes them): another process's keeper handed over."""
        d = 3 * self.resolution ** 2
        return {"priority": np.array([-e[0][0] for e in self.heap], np.uint64),
                "place": np.array([e[1] for e in self.heap], np.int64).reshape(-1, 2),
                "pixels": np.stack([e[2] for e in self.heap]) if self.heap else np.zeros((0, d), np.float32),
                "label": np.array([e[3] for e in self.heap], np.int64)}

    def merge(self, entries: Mapping[str, np.ndarray]) -> None:
        """Offer another keeper's ``entries``: keepers of disjoint shards merged keep what one keeper of them all
        would have kept."""
        for p, place, row, label in zip(entries["priority"].tolist(), entries["place"].tolist(), entries["pixels"],
                                        entries["label"].tolist()):
            self._add(p, (place[0], place[1]), row.copy(), label)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        kept = sorted(self.heap, key=lambda e: e[1])
        d = 3 * self.resolution ** 2
        return (np.stack([e[2] for e in kept]) if kept else np.zeros((0, d), np.float32),
                np.array([e[3] for e in kept], dtype=np.int64))


def extract_all(encoders: Mapping[str, Encode], urls: Sequence[str], resolution: int, device: torch.device, *,
                batch_size: int = EVAL_BATCH, workers: int = 0, depth: int = 2, pixels: PixelSample | None = None,
                progress: bool = False, desc: str = "features", damaged: Damaged = "stop",
                directory: str | None = None, on_progress: OnProgress | None = None,
                fused_augment: bool = False) -> Extracted:
    """Every encoder's features of every decodable image of ``urls``, in one pass over the shards.

    Each batch is decoded and resized once and goes through all ``encoders`` (bf16 autocast on CUDA);
    only the float32 feature rows are kept, written to unnamed files in ``directory`` (default: the
    temporary directory, ``TMPDIR``) and read in shard order whatever the worker count. When the shards
    say how many samples they hold, a disk without room for the rows is refused at the first batch.
    ``pixels``: also keep that subsample's images for the raw-pixel baseline. ``damaged``: ``data.damaged``
    (``keep`` scores the samples a damaged shard holds before its damage, with a warning naming it).
    ``progress``: a bar over the images read; ``on_progress``: told the same (``seed.report.Progress``).
    ``fused_augment``: on CUDA, the images resized by a Triton kernel (see ``apply_batch``).
    """
    directory = directory or tempfile.gettempdir()
    lengths = lengths_from_info(list(urls))  # the total for the progress bar and the room check, when the shards say it
    what = f"{desc} ({len(encoders)} encoder{'' if len(encoders) == 1 else 's'})"
    bar = Progress(what, sum(lengths) if lengths else None, "images", show=progress, report=on_progress, smoothing=0.1)
    writers: dict[str, FeatureWriter] = {}
    features: dict[str, FeatureFile] = {}
    order: list[tuple[int, int]] = []
    labels: list[np.ndarray] = []
    keeper = _PixelKeeper(pixels, resolution) if pixels is not None else None
    try:  # the bar closes before an error is printed, never after it
        for name in encoders:
            writers[name] = FeatureWriter(directory)
        chunks = _chunks(urls, resolution, device, batch_size=batch_size, workers=workers, depth=depth,
                         damaged=damaged, fused_augment=fused_augment)
        for chunk, rows in _forwards(encoders, chunks, urls, device, keeper, bar):
            if not order and rows:
                check_disk(directory, sum(lengths) if lengths else None, [r.shape[1] for r in rows.values()])
            for name, r in rows.items():
                writers[name].append(r)
            order.append((chunk.shard, int(chunk.index[0])))
            labels.append(chunk.labels)
        rank = sorted(range(len(order)), key=order.__getitem__)
        sizes = [len(y) for y in labels]
        for name in encoders:
            features[name] = writers.pop(name).finish(sizes, rank)
    except BaseException:
        for w in writers.values():
            w.file.close()
        for f in features.values():
            f.close()
        raise
    finally:
        bar.close()
    y = np.concatenate([labels[i] for i in rank]) if labels else np.zeros(0, np.int64)
    px, py = keeper.result() if keeper is not None else (None, None)
    return Extracted(features, y, px, py, keeper.resolution if keeper is not None else 0, bar.done - len(y))


def _forwards(encoders: Mapping[str, Encode], chunks: Iterator[_Chunk], urls: Sequence[str], device: torch.device,
              keeper: _PixelKeeper | None, bar: Progress) -> Iterator[tuple[_Chunk, dict[str, np.ndarray]]]:
    """Each batch that holds a decodable image, and its float32 rows through every encoder (bf16 autocast on
    CUDA), by encoder name; ``keeper`` is offered the batch, ``bar`` advanced by the samples read."""
    for chunk in chunks:
        bar.update(chunk.read)
        if not len(chunk.labels):
            continue
        if chunk.labels.min() < 0:  # a vote for class -1 would go to the last class; the probe would fail
            key = chunk.keys[int(np.argmax(chunk.labels < 0))]
            raise SeedError(f"{urls[chunk.shard]}: sample {key!r} has no label (a .cls member, or .json with "
                            "'label'); the evaluation scores classes, so every train and test sample needs one")
        assert chunk.x is not None
        with torch.inference_mode():
            x = chunk.x.to(device)
            with autocast(device):  # every encoder's forward queued before the first copy back waits for one
                outs = {name: fn(x).float() for name, fn in encoders.items()}
            rows = {name: out.cpu().numpy() for name, out in outs.items()}
            if keeper is not None:
                keeper.offer(chunk, x)
        yield chunk, rows


# ---------------------------------------------------------------------------------------------
# Extraction in several processes (``seed evaluate --procs``): each process extracts some shards of a split
# into files the parent made (``extract_part``), the parent reads them as one (``gather_parts``)


@dataclasses.dataclass
class Part:
    """One process's share of a split (``extract_part``): the file rows its decodable samples were written to and
    their labels, in the order written; each encoder's width; the samples that did not decode; its pixel keeper's
    entries (``_PixelKeeper.entries``)."""

    rows: np.ndarray
    labels: np.ndarray
    widths: dict[str, int]
    skipped: int
    pixels: dict[str, np.ndarray]

    def save(self, path: str) -> None:
        arrays: dict[str, Any] = {"rows": self.rows, "labels": self.labels, "widths": np.array(json.dumps(self.widths)),
                                  "skipped": np.array(self.skipped), **{f"pixels_{k}": v for k, v in self.pixels.items()}}
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str) -> Part:
        with np.load(path) as f:
            return cls(f["rows"], f["labels"], json.loads(str(f["widths"])), int(f["skipped"]),
                       {k[len("pixels_"):]: f[k] for k in f.files if k.startswith("pixels_")})


def extract_part(encoders: Mapping[str, Encode], urls: Sequence[str], shards: Sequence[int], lengths: Sequence[int],
                 files: Mapping[str, int], resolution: int, device: torch.device, *, batch_size: int = EVAL_BATCH,
                 workers: int = 0, depth: int = 2, pixels: PixelSample | None = None, desc: str = "features",
                 damaged: Damaged = "stop", directory: str | None = None, on_progress: OnProgress | None = None,
                 fused_augment: bool = False) -> Part:
    """``extract_all`` of the ``shards`` of ``urls`` only, each encoder's rows written into its file (``files``:
    encoder name -> descriptor of a file shared by the processes of a split) at their places in the whole split:
    sample i of shard s at row ``sum(lengths[:s]) + i`` (``lengths``: every shard's sample count). Rows of samples
    that do not decode are left as holes. ``directory``: the files' directory, checked for room for the whole
    split. ``on_progress``: told the samples read (no bar is shown)."""
    directory = directory or tempfile.gettempdir()
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    bar = Progress(desc, sum(lengths[s] for s in shards), "images", report=on_progress)
    keeper = _PixelKeeper(pixels, resolution) if pixels is not None else None
    written: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    widths: dict[str, int] = {}
    chunks = _chunks(urls, resolution, device, batch_size=batch_size, workers=workers, depth=depth, damaged=damaged,
                     fused_augment=fused_augment, shards=shards)
    for chunk, rows in _forwards(encoders, chunks, urls, device, keeper, bar):
        if int(chunk.index[-1]) >= lengths[chunk.shard]:
            raise SeedError(f"{urls[chunk.shard]} holds more than the {lengths[chunk.shard]} samples counted for it "
                            "(its _info.json says so, or it changed while read): describe it again (seed shards "
                            "describe DIR --overwrite)")
        if not widths:
            widths = {name: r.shape[1] for name, r in rows.items()}
            check_disk(directory, int(starts[-1]), list(widths.values()))
        at = starts[chunk.shard] + chunk.index
        for name, r in rows.items():
            write_rows(files[name], r, at, directory)
        written.append(at)
        labels.append(chunk.labels)
    bar.close()
    done = np.concatenate(written) if written else np.zeros(0, np.int64)
    return Part(done, np.concatenate(labels) if labels else np.zeros(0, np.int64), widths, bar.done - len(done),
                keeper.entries() if keeper is not None else {})


def gather_parts(parts: Iterable[Part], files: Mapping[str, IO[bytes]], resolution: int,
                 pixels: PixelSample | None = None) -> Extracted:
    """The split whose ``parts`` were written into ``files`` (encoder name -> file), in shard order as
    ``extract_all`` gives it: its holes (samples that did not decode) left out, the pixel keepers merged (each part
    merged as it comes, so that a part's keeper, up to ``max_images`` rows, is held only until it is merged)."""
    keeper = _PixelKeeper(pixels, resolution) if pixels is not None else None
    rows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    widths: dict[str, int] = {}
    skipped = 0
    for part in parts:
        rows.append(part.rows)
        labels.append(part.labels)
        widths = widths or part.widths
        skipped += part.skipped
        if keeper is not None:
            keeper.merge(part.pixels)
    at = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    rank = np.argsort(at, kind="stable")
    at, y = at[rank], y[rank]
    order = None if len(at) == 0 or int(at[-1]) == len(at) - 1 else at  # no hole: the file as it is
    features = {name: FeatureFile(f, len(at), widths.get(name, 0), order) for name, f in files.items()}
    px, py = keeper.result() if keeper is not None else (None, None)
    return Extracted(features, y, px, py, keeper.resolution if keeper is not None else 0, skipped)


# ---------------------------------------------------------------------------------------------
# Scores


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _rows(n: int, size: int) -> list[slice]:
    """``n`` rows in nearly equal slices of at most ``size``: no slice is much smaller than the others,
    so every search call takes FAISS's same (BLAS) path and batched results equal unbatched ones."""
    parts = max(1, math.ceil(n / size))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class _TorchFlatIP:
    """Exact inner-product search with torch on a GPU, for FAISS builds without GPU support: the
    training rows live on the device, and a search scans them ``block`` rows at a time, merging
    each block's top-k, so its memory is one ``[queries, block]`` float32 array. Neighbours may
    order differently from FAISS where similarities tie to the last float bit."""

    def __init__(self, device: torch.device, block: int = 65_536):
        self.device, self.block = device, block
        self.parts: list[torch.Tensor] = []

    def add(self, x: np.ndarray) -> None:
        self.parts.append(torch.from_numpy(x).to(self.device))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = torch.from_numpy(q).to(self.device)
        best_s = torch.full((len(q), 0), float("-inf"), device=self.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.int64, device=self.device)
        offset = 0
        for part in self.parts:
            for lo in range(0, len(part), self.block):
                sims = queries @ part[lo: lo + self.block].T
                top = torch.topk(sims, min(k, sims.shape[1]), dim=1)
                merged_s = torch.cat([best_s, top.values], dim=1)
                merged_i = torch.cat([best_i, top.indices + offset + lo], dim=1)
                keep = torch.topk(merged_s, min(k, merged_s.shape[1]), dim=1)
                best_s, best_i = keep.values, merged_i.gather(1, keep.indices)
            offset += len(part)
        return best_s.cpu().numpy(), best_i.cpu().numpy()


def _flat_ip(d: int, device: torch.device | None) -> Callable[[], Any]:
    """A maker of empty exact inner-product indexes: FAISS on the GPU when it was built with GPU support
    and ``device`` is CUDA (all sharing one resources object, which the maker keeps alive), torch on the
    GPU when FAISS has no GPU support, FAISS on the CPU otherwise."""
    import faiss

    if device is not None and device.type == "cuda":
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            return lambda: faiss.index_cpu_to_gpu(res, device.index or 0, faiss.IndexFlatIP(d))
        return lambda: _TorchFlatIP(device)
    return lambda: faiss.IndexFlatIP(d)


@dataclasses.dataclass
class Scores:
    knn: float       # weighted kNN top-1, %
    nn1: float       # 1-NN top-1, %
    linear: float    # linear probe top-1, %
    probe: str = ""  # which linear probe: full-batch L-BFGS or mini-batch Adam

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def knn_predict(train: Rows, train_labels: np.ndarray, test: Rows, *, k: int = 20, t: float = 0.07,
                n_classes: int | None = None, center: bool = False, batch_size: int = QUERY_BATCH,
                block: int | None = None, device: torch.device | None = None, progress: bool = False,
                desc: str = "kNN", on_progress: OnProgress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weighted-kNN predictions, 1-NN predictions) by cosine similarity through exact inner-product indexes.

    The normalised training rows go into an index ``block`` rows at a time (default: ``LBFGS_MAX_ELEMENTS / d``
    rows, 512 MiB of float32, but at least ``batch_size``; all of a Fashion-MNIST-sized set), added ``batch_size``
    at a time; every
    query batch of ``batch_size`` searches each block, and the blocks' neighbours are merged per query. So one
    block, one query batch and the n_test x k neighbours are held, whatever the number of training rows.
    ``progress``: a bar over the training rows searched; ``on_progress``: told the same.
    """
    import faiss

    n, d = train.shape
    k = min(k, n)  # fewer training rows than k: every one is a neighbour
    mean = _mean(train).astype(np.float32)[None] if center else None  # centred: minus the training mean

    def prepared(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(_normalise(x - mean if mean is not None else x), dtype=np.float32)

    queries = _rows(len(test), batch_size)
    heaps = [faiss.ResultHeap(q.stop - q.start, k, keep_max=True) for q in queries]
    new_index = _flat_ip(d, device)
    with Progress(desc, n, "training rows", show=progress, report=on_progress) as bar:
        for part in _rows(n, block or max(batch_size, LBFGS_MAX_ELEMENTS // max(d, 1))):
            index = new_index()
            for rows in _rows(part.stop - part.start, batch_size):
                index.add(prepared(train[part.start + rows.start: part.start + rows.stop]))
            for heap, rows in zip(heaps, queries):
                sims, idx = index.search(prepared(test[rows]), k)                # b x k, rows of this block
                heap.add_result(sims, np.where(idx >= 0, idx + part.start, -1))
            del index
            bar.update(part.stop - part.start)
    n_classes = n_classes or int(train_labels.max()) + 1
    weighted = np.zeros(len(test), np.int64)
    nearest = np.zeros(len(test), np.int64)
    for heap, rows in zip(heaps, queries):
        heap.finalize()
        sims, idx = heap.D, heap.I
        votes = np.zeros((len(sims), n_classes))
        np.add.at(votes, (np.arange(len(sims))[:, None], train_labels[idx]), np.exp(sims / t))
        weighted[rows], nearest[rows] = votes.argmax(axis=1), train_labels[idx[:, 0]]
    return weighted, nearest


def probe_method(n: int, d: int, classes: int = 0) -> str:
    """``lbfgs`` while the full batch's widest float32 arrays, the standardised training set (n x d) and its
    logits (n x classes, and their gradient), stay within ``LBFGS_MAX_ELEMENTS``, else ``sgd``. A report picks
    one for all its encoders (``score``'s ``method``): the two probes' scores differ by a point or two."""
    return "lbfgs" if n * max(d, classes) <= LBFGS_MAX_ELEMENTS else "sgd"


def _scale(std: np.ndarray) -> np.ndarray:
    """Standardisation's divisor: ``std + 1e-6``, or 1 for a column constant on the training rows (a dead
    channel), whose test values would otherwise be multiplied by a million."""
    return np.where(std < 1e-6, 1.0, std + 1e-6).astype(std.dtype)


def probe_name(method: str) -> str:
    return "full-batch L-BFGS" if method == "lbfgs" else f"mini-batch Adam, {SGD_EPOCHS} epochs"


def linear_probe(train: Rows, train_labels: np.ndarray, test: Rows, *, seed: int = 0, weight_decay: float = 1e-4,
                 max_iter: int = 200, method: str = "auto", device: torch.device | None = None, progress: bool = False,
                 desc: str = "linear probe", on_progress: OnProgress | None = None,
                 resident: bool | None = None) -> np.ndarray:
    """Predictions of a logistic-regression probe on standardised features.

    ``method``: ``lbfgs`` (full batch, on the CPU), ``sgd`` (mini-batch Adam, on ``device``), or
    ``auto`` (``probe_method``). Both minimise cross-entropy + ``weight_decay`` x ||W||^2. ``progress``: a bar
    over Adam's epochs, or L-BFGS's evaluations of the objective (at most 1.25 x ``max_iter`` + 25); ``on_progress``:
    told the same. ``resident`` (``sgd``): the standardised training rows read once onto ``device`` and every batch
    gathered there, rather than each batch read from the rows (default: on CUDA when they take at most half the
    device's free memory, ``probe_resident``); the same predictions either way.
    """
    method = probe_method(len(train), train.shape[1], int(train_labels.max()) + 1) if method == "auto" else method
    if method == "sgd":
        device = device or torch.device("cpu")
        return _sgd_probe(train, train_labels, test, seed=seed, weight_decay=weight_decay, device=device,
                          progress=progress, desc=desc, on_progress=on_progress,
                          resident=probe_resident(len(train), train.shape[1], device) if resident is None else resident)
    if method != "lbfgs":
        raise ValueError(f"unknown probe method {method!r} (expected auto, lbfgs or sgd)")
    torch.manual_seed(seed)
    # full batch, at most LBFGS_MAX_ELEMENTS training floats: read once and standardised in place
    rows_tr, rows_te = _float32_copy(train), _float32_copy(test)
    mean, std = rows_tr.mean(axis=0), _scale(rows_tr.std(axis=0))
    for x in (rows_tr, rows_te):
        x -= mean
        x /= std
    xtr, xte = torch.from_numpy(rows_tr), torch.from_numpy(rows_te)
    y = torch.from_numpy(train_labels)
    n_classes = int(train_labels.max()) + 1
    model = nn.Linear(xtr.shape[1], n_classes)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xtr), y) + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        bar.update()
        return loss

    # torch's L-BFGS stops after the iteration that reaches max_iter iterations or its default max_eval
    # (1.25 x max_iter) evaluations, and one iteration's line search makes at most 25 (max_ls): the bar's bound
    with Progress(desc, max_iter * 5 // 4 + 25, "evaluations", show=progress, report=on_progress) as bar:
        opt.step(closure)
        bar.finish()
    with torch.no_grad():
        return model(xte).argmax(dim=1).numpy()


def _float32_copy(x: Rows) -> np.ndarray:
    """The rows as a float32 array the caller may change: a ``FeatureFile``'s read is one already."""
    return x[:] if isinstance(x, FeatureFile) else np.array(x, dtype=np.float32)


def _blocks(x: Rows) -> list[slice]:
    """Row blocks of 2^22 floats: what the column statistics read at a time (no full-size copy)."""
    return _rows(len(x), max(1, (1 << 22) // max(x.shape[1], 1)))


def _mean(x: Rows) -> np.ndarray:
    """Per-column mean, summed in float64 over row blocks."""
    total = np.zeros(x.shape[1])
    for r in _blocks(x):
        total += x[r].sum(axis=0, dtype=np.float64)
    return total / len(x)


def _moments(x: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation, two passes in float64 over row blocks."""
    mean = _mean(x)
    sq = np.zeros(x.shape[1])
    for r in _blocks(x):
        sq += ((x[r] - mean) ** 2).sum(axis=0)
    return mean, np.sqrt(sq / len(x))


def probe_resident(n: int, d: int, device: torch.device) -> bool:
    """Whether the mini-batch probe holds its ``[n, d]`` standardised float32 training rows on ``device``: on CUDA,
    when they take at most half its free memory (ImageNet-1k at width 2,048: 10.5 GB). On the CPU the rows stay on
    disk, read a batch at a time, so that memory does not grow with N."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return n * d * 4 <= free // 2


def _held(train: Rows, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The training rows standardised on ``device``, copied there a block at a time (the rows themselves are never
    changed); None, with a warning, when the device has no room after all (what ``probe_resident`` saw was taken
    since): the probe then reads each batch from the rows."""
    try:
        held = torch.empty(train.shape, dtype=torch.float32, device=device)
    except torch.cuda.OutOfMemoryError:
        log.warning("linear probe: no room on %s for the %.1f GB of training rows after all; each batch is read from "
                    "the feature file instead", device, train.shape[0] * train.shape[1] * 4 / 1e9)
        return None
    for r in _blocks(train):
        block = held[r]
        block.copy_(torch.from_numpy(np.ascontiguousarray(train[r])))
        block.sub_(mean).div_(std)
    return held


def _sgd_probe(train: Rows, train_labels: np.ndarray, test: Rows, *, seed: int, weight_decay: float,
               device: torch.device, epochs: int = SGD_EPOCHS, batch_size: int = SGD_BATCH, lr: float = SGD_LR,
               progress: bool = False, desc: str = "linear probe", on_progress: OnProgress | None = None,
               resident: bool = False) -> np.ndarray:
    """Mini-batch Adam: ``epochs`` passes in seeded orders, ``batch_size`` rows a step, learning rate
    cosine-decayed from ``lr`` to 0. Each batch is gathered from the rows (in memory, or read from their
    file) and standardised on ``device``, so only the model and one batch live there; ``resident``: the rows
    standardised on ``device`` once, a block at a time, and every batch gathered there (one sequential read of
    the rows instead of a read per row and epoch: at ImageNet size 38 M of them per encoder)."""
    gen = torch.Generator().manual_seed(seed)
    mean_np, std_np = _moments(train)
    mean = torch.from_numpy(mean_np).float().to(device)
    std = torch.from_numpy(_scale(std_np)).float().to(device)
    labels = torch.from_numpy(train_labels)
    held = _held(train, mean, std, device) if resident else None
    if held is not None:
        labels = labels.to(device)
    n_classes = int(train_labels.max()) + 1
    torch.manual_seed(seed)
    model = nn.Linear(train.shape[1], n_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(train) / batch_size))
    with Progress(desc, epochs, "epochs", show=progress, report=on_progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(train), generator=gen).numpy()
            for start in range(0, len(train), batch_size):
                idx = np.sort(perm[start:start + batch_size])  # sorted: contiguous reads from the host rows
                if held is not None:
                    rows = torch.from_numpy(idx).to(device)
                    x, y = held[rows], labels[rows]
                else:
                    # the gathered rows are a fresh array (index arrays copy): standardised in place, no temporaries
                    x = torch.from_numpy(train[idx]).to(device, torch.float32).sub_(mean).div_(std)
                    y = labels[idx].to(device)
                loss = nn.functional.cross_entropy(model(x), y) + weight_decay * model.weight.pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                del x, loss  # before the next batch is read: one batch in memory at a time
            bar.update()
    if held is not None:
        del held
        if device.type == "cuda":  # its memory back to the device, where the next probe_resident asks for it
            torch.cuda.empty_cache()
    out = np.zeros(len(test), np.int64)
    with torch.no_grad():
        for r in _rows(len(test), QUERY_BATCH):
            x = (torch.from_numpy(np.ascontiguousarray(test[r])).to(device, torch.float32) - mean) / std
            out[r] = model(x).argmax(dim=1).cpu().numpy()
    return out


def score(train: Rows, train_labels: np.ndarray, test: Rows, test_labels: np.ndarray, *,
          center: bool = False, seed: int = 0, device: torch.device | None = None, progress: bool = False,
          name: str = "", on_progress: OnProgress | None = None, method: str = "auto") -> Scores:
    """kNN, 1-NN and linear-probe top-1 (%) of one encoder's features; the probe ``method`` (``lbfgs``, ``sgd``,
    or ``auto``: as ``probe_method`` picks it for these features; a report passes the one it picked for all its
    encoders). ``progress``: bars over the kNN's training rows and the probe's steps, named after ``name``;
    ``on_progress``: told the same."""
    weighted, nearest = knn_predict(train, train_labels, test, center=center, device=device, progress=progress,
                                    desc=f"kNN {name}".strip(), on_progress=on_progress)
    method = probe_method(len(train), train.shape[1], int(train_labels.max()) + 1) if method == "auto" else method
    linear = linear_probe(train, train_labels, test, seed=seed, method=method, device=device, progress=progress,
                          desc=f"linear probe {name}".strip(), on_progress=on_progress)
    acc = lambda pred: float((pred == test_labels).mean() * 100)  # noqa: E731
    return Scores(knn=acc(weighted), nn1=acc(nearest), linear=acc(linear), probe=probe_name(method))
