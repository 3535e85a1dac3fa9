"""The training data path: stream shards, pick a cached view per row block (or draw new ones), replay, batch.

One pass over the data per epoch: shards in a seeded order (split by rank for DDP), samples
through a seeded shuffle buffer that holds *encoded* images (memory does not grow with image
size), then batches decoded (nvJPEG on CUDA, PIL otherwise) and augmented in one call on the
model's device. What a sample carries
besides its image comes from a *source*:

- ``CachedSource``: the cached view's replay parameters, the teacher embedding and the sparse
  targets, read one input shard's row block at a time (memory does not grow with N);
- ``FreshViews``: new views drawn from (seed, key, epoch-dependent view index), for online SEED
  and MoCo-v2 pre-training (several views per image).

Everything random is a function of (seed, epoch, shard, position), so an epoch is the same
whether or not the run was resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from seed import cache
from seed.augment import apply_batch
from seed.views import Recipe, draw_views
from seed.prefetch import prefetch
from seed.decode import Decoder
from seed.errors import SeedError
from seed.shards import (Damaged, DamagedShard, OnDamage, Sample, damage_handler, headers_read, image_size,
                         iter_shard)
from seed.workers import PackedSamples, SharedSlots, as_is, reraise, shard_workers

if TYPE_CHECKING:
    import zarr

    from seed.bank_store import Bank

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Batch:
    """Views ready for a model: ``x [B*n_views, 3, r, r]`` (view-major) plus per-image data."""

    x: torch.Tensor
    rows: torch.Tensor             # [B] cache rows (-1 when there is no cache)
    labels: torch.Tensor           # [B]
    extra: dict[str, torch.Tensor]  # cached teacher embeddings and targets, by name
    n_views: int = 1


@dataclasses.dataclass
class Example:
    sample: Sample                 # the encoded image, decoded when its batch is made
    size: tuple[int, int]          # its (height, width), which the view parameters were drawn for
    params: np.ndarray             # [n_views, P]
    row: int
    label: int
    extra: dict[str, np.ndarray]


def rng_for(seed: int, *words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


MakeExample = Callable[[int, Sample], "Example | None"]


class Source(Protocol):
    """What a training example carries besides its image, per input shard and epoch.

    ``exact_counts``: whether the per-shard counts the epoch is planned from are exactly the examples the
    source makes (a cache's valid rows), or only an upper bound (samples counted in the tar, some of which
    have no readable image and are skipped).
    """

    exact_counts: bool

    def load(self, shard: int, epoch: int) -> MakeExample:
        """A function of (index in the shard, sample) -> the example, or None to skip the sample."""
        ...

    def on_damage(self, shard: int) -> OnDamage | None:
        """What reading ``shard`` does at damage (``seed.shards.iter_shard``): None raises ``DamagedShard``."""
        ...

    def rows(self, shard: int) -> np.ndarray | None:
        """The sample indices of ``shard`` it makes examples of, in order, when they are known without reading
        the shard (a cache's valid rows); None otherwise. Lets a resumed epoch skip shards it need not read."""
        ...


class CachedSource:
    """Per input shard, the cached rows: which view to use and its replay/teacher data.

    One view per row block and epoch: ``cycle`` uses view ``(epoch + shard) mod V``; ``random`` draws one from
    (seed, epoch, shard). A block then reads only that view's chunks of the embeddings and targets (1/V of the
    bytes). Each image still gets its own view of every epoch from the same distribution as a draw per image
    would give it: its V views are independent draws, so which index two images share says nothing about
    their views.
    """

    exact_counts = True  # the cache's valid rows
    changed_hint = "rebuild the cache: seed teacher --overwrite"

    def __init__(self, group: zarr.Group, bank: Bank | Sequence[Bank] | None, *, view: str, seed: int, dense: bool):
        self.banks: list[Bank] = [] if bank is None else list(bank) if isinstance(bank, (list, tuple)) else [bank]  # type: ignore[list-item]
        self.group, self.view, self.seed, self.dense = group, view, seed, dense
        self.capacity = int(cache.attributes(group)["capacity"])
        self.V = int(cache.attributes(group)["V"])
        self.damaged = cache.damaged_shards(group)
        self._valid: np.ndarray | None = None  # the whole column, read once by ``rows``

    def on_damage(self, shard: int) -> OnDamage | None:
        """A shard the teacher stage recorded as damaged (``data.damaged=keep``) reads up to the same damage
        (its rows after it are invalid); damage anywhere else means the shard changed since: an error."""
        record = self.damaged.get(shard)
        if record is None:
            return None

        def recorded(exc: DamagedShard) -> None:
            if exc.offset != record["offset"]:
                raise SeedError(f"{exc.url}: damaged at byte {exc.offset}, but the cache recorded its damage at byte "
                                f"{record['offset']}; the shard changed since the cache was made") from exc

        return recorded

    def rows(self, shard: int) -> np.ndarray:
        if self._valid is None:
            self._valid = np.asarray(cache.read(self.group, "valid"), dtype=bool)
        return np.flatnonzero(self._valid[shard * self.capacity:(shard + 1) * self.capacity])

    def valid_counts(self) -> np.ndarray:
        valid = cache.read(self.group, "valid")
        return valid.reshape(-1, self.capacity).sum(axis=1)

    def load(self, shard: int, epoch: int) -> MakeExample:
        rows = slice(shard * self.capacity, (shard + 1) * self.capacity)
        valid = cache.read(self.group, "valid", rows)
        if self.view == "cycle":
            v = (epoch + shard) % self.V
        else:
            v = int(rng_for(self.seed, epoch, shard).integers(0, self.V))
        augment = cache.read(self.group, "augment", (rows, v))               # cap x P
        emb = cache.read(self.group, "embeddings", (rows, v))                # cap x D
        sizes = cache.read(self.group, "sizes", rows)                        # cap x 2, decoded (h, w)
        keys = cache.read(self.group, "keys", rows)                          # cap: what each row was made from
        # rotating banks: this epoch's bank is rotation epoch mod R; each example says which (its targets' bank)
        rotation = epoch % len(self.banks) if self.banks else 0
        targets = {} if self.dense or not self.banks else self.banks[rotation].targets(rows, v)   # cap x k each
        base = shard * self.capacity

        def make(index: int, sample: Sample) -> Example | None:
            if index >= self.capacity:  # the shard grew past the rows the cache holds for it
                raise SeedError(f"{sample.url}: sample {index} ({sample.key!r}) is past the {self.capacity} rows the "
                                "cache holds for each shard; the shard changed since the cache was made (rebuild it: "
                                "seed teacher --overwrite)")
            if not valid[index]:
                return None  # skipped at the teacher stage (undecodable)
            if keys[index] != sample.key:  # rows pair with samples by position: the same names, other contents
                raise SeedError(f"{sample.url}: sample {index} is {sample.key!r}, but the cache's row {base + index} "
                                f"was made from {str(keys[index])!r}; the shard changed since the cache was made "
                                "(rebuild it: seed teacher --overwrite)")
            # copies: a view into the block's arrays would keep them whole for as long as the example waits in
            # the shuffle buffer
            extra = {"z_t": emb[index].astype(np.float32), "rotation": np.int64(rotation)}
            extra.update({name: arr[index].copy() for name, arr in targets.items()})
            h, w = (int(s) for s in sizes[index])
            return Example(sample, (h, w), augment[index][None].copy(), base + index, sample.label, extra)

        return make


def sampled_label_mix(urls: Sequence[str], lengths: Sequence[int], *, per_shard: int = 100,
                      shards: int = 16) -> cache.LabelMix | None:
    """``cache.label_mix`` of the first ``per_shard`` samples of at most ``shards`` shards spread over ``urls``:
    whether the input shards look sorted by class, told before training from the labels of a few hundred
    samples instead of a pass over the data (when a shard is sorted, its first images show it). ``lengths``:
    the shards' sample counts. None when there is nothing to tell (fewer than three labels known) or a
    sampled shard does not read (the stage then names what is wrong with it)."""
    n = min(shards, len(urls))
    picks = sorted({round(i * (len(urls) - 1) / max(1, n - 1)) for i in range(n)})  # all of them when few
    labels = np.full((len(picks), per_shard), -1, dtype=np.int64)
    valid = np.zeros((len(picks), per_shard), dtype=bool)
    try:
        for row, i in enumerate(picks):
            for col, sample in enumerate(itertools.islice(iter_shard(urls[i]), per_shard)):
                labels[row, col], valid[row, col] = sample.label, sample.image is not None
    except (SeedError, OSError):
        return None
    mix = cache.label_mix(labels, valid)
    return None if mix is None else dataclasses.replace(mix, per_shard=float(np.mean(lengths)))


class FreshViews:
    """``n_views`` new views per image and epoch, drawn from (seed, key, epoch * n_views + i).

    A sample without a readable image header is skipped, so the tar's counts are an upper bound on the examples,
    known exactly only by reading the shards. ``counts``: the shards' sample counts, given when every sample's
    header is known to read (``seed.shards.headers_read``: ``seed shards`` writes no other) and a damaged shard
    stops the run; the counts are then exact, and a run resumed inside an epoch fast-forwards by counting
    (``examples``) instead of reading every shard before its position.
    """

    changed_hint = "write the shards and their _info.json again (seed shards)"

    def __init__(self, recipe: Recipe, *, seed: int, n_views: int = 1, damaged: Damaged = "stop",
                 counts: Sequence[int] | None = None):
        self.recipe, self.seed, self.n_views, self.damaged = recipe, seed, n_views, damaged
        self.counts = None if counts is None or damaged != "stop" else list(counts)  # a kept damage cuts a shard short
        self.exact_counts = self.counts is not None

    @classmethod
    def over(cls, urls: Sequence[str], lengths: Sequence[int], recipe: Recipe, *, seed: int, n_views: int = 1,
             damaged: Damaged = "stop") -> FreshViews:
        """Fresh views of the shards ``urls`` (``lengths`` samples each), counted exactly where their ``_info.json``
        says every image header read (``seed.shards.headers_read``)."""
        return cls(recipe, seed=seed, n_views=n_views, damaged=damaged,
                   counts=lengths if headers_read(list(urls)) else None)

    def on_damage(self, shard: int) -> OnDamage | None:
        return damage_handler(self.damaged)

    def rows(self, shard: int) -> np.ndarray | None:
        return None if self.counts is None else np.arange(self.counts[shard])

    def load(self, shard: int, epoch: int) -> MakeExample:
        def make(index: int, sample: Sample) -> Example | None:
            if self.counts is not None and index >= self.counts[shard]:
                raise SeedError(f"{sample.url}: sample {index} ({sample.key!r}) is past the {self.counts[shard]} samples "
                                f"the shards' _info.json counts in it: the shard changed since; {self.changed_hint}")
            try:
                h, w = image_size(sample)
            except ValueError as exc:
                if self.exact_counts:
                    raise SeedError(f"{sample.url}: sample {index} ({sample.key!r}) has no readable image header ({exc}), "
                                    "but the shards' _info.json says every header read when they were written: the shard "
                                    f"changed since (or the image reader did); {self.changed_hint}") from exc
                return None  # no readable image header: skipped (a body that fails later is an error)
            params = draw_views(self.recipe, seed=self.seed, key=sample.key, views=self.n_views,
                                first=epoch * self.n_views, height=h, width=w)
            return Example(sample, (h, w), params, -1, sample.label, {})

        return make


def rank_shards(n_shards: int, rank: int = 0, world: int = 1) -> list[int]:
    """The shards of one DDP rank: a fixed subset, so every epoch gives a rank the same number of examples."""
    return list(range(rank, n_shards, world))


def shard_order(n_shards: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's shards in a seeded per-epoch order."""
    mine = rank_shards(n_shards, rank, world)
    return [mine[i] for i in rng_for(seed, epoch, 10**6 + rank).permutation(len(mine))]


def examples(urls: Sequence[str], order: Sequence[int], source: Source, epoch: int, *, seed: int,
             shuffle_buffer: int, skip: int = 0) -> Iterator[Example]:
    """Examples of the given shards through a seeded shuffle buffer, less the first ``skip``.

    When the source knows its rows without reading the shards (``Source.rows``: a cache, or fresh views of
    shards whose every header reads), the stream is
    fast-forwarded by counting (``_fast_forward``): only the shards whose examples the shuffle buffer holds
    at that point are read (about the last ``shuffle_buffer / shard size`` x a few of them), not every shard
    before it. Otherwise the first ``skip`` examples are made and dropped.
    """
    rng = rng_for(seed, epoch, 2 * 10**6)
    buffer: list[Example] = []
    start, after = 0, -1  # the shard (position in ``order``) to read from, past its sample ``after``
    if skip:
        at = _fast_forward(order, source, rng, shuffle_buffer, skip)
        if at is None:
            yield from itertools.islice(examples(urls, order, source, epoch, seed=seed, shuffle_buffer=shuffle_buffer),
                                        skip, None)
            return
        start, after, ghosts, flushed = at
        buffer = _materialise(urls, source, epoch, ghosts[flushed or 0:])
        if flushed is not None:  # the skip ends inside the final flush: the rest of the shuffled buffer
            yield from buffer
            return
    for position in range(start, len(order)):
        shard = order[position]
        make = source.load(shard, epoch)
        for sample in iter_shard(urls[shard], source.on_damage(shard)):
            if position == start and sample.index <= after:
                continue  # in the stream before the skip
            ex = make(sample.index, sample)
            if ex is None:
                continue
            if len(buffer) < shuffle_buffer:
                buffer.append(ex)
                continue
            j = int(rng.integers(0, len(buffer)))
            buffer[j], ex = ex, buffer[j]
            yield ex
    rng.shuffle(buffer)
    yield from buffer


Ghost = tuple[int, int]  # an example known by (shard, sample index) alone


def _fast_forward(order: Sequence[int], source: Source, rng: np.random.Generator, shuffle_buffer: int,
                  skip: int) -> tuple[int, int, list[Ghost], int | None] | None:
    """``examples``' shuffle buffer run on (shard, index) pairs, from ``Source.rows``, until ``skip`` examples
    have left it: ``(position in order, last sample index read there, the buffer, None)``, or, when the skip
    ends in the final flush, ``(len(order), -1, the shuffled buffer, how many of it were yielded)``. ``rng`` is
    left where ``examples`` would have it. None when the source does not know its rows."""
    rows = [source.rows(shard) for shard in order]
    if any(r is None for r in rows):
        return None
    buffer: list[Ghost] = []
    taken = 0
    for position, (shard, indices) in enumerate(zip(order, rows)):
        for index in indices.tolist():  # type: ignore[union-attr]
            if len(buffer) < shuffle_buffer:
                buffer.append((shard, index))
                continue
            buffer[int(rng.integers(0, len(buffer)))] = (shard, index)
            taken += 1
            if taken == skip:
                return position, index, buffer, None
    rng.shuffle(buffer)
    if skip - taken > len(buffer):
        raise SeedError(f"cannot skip {skip} examples of an epoch of {taken + len(buffer)}")
    return len(order), -1, buffer, skip - taken


def _materialise(urls: Sequence[str], source: Source, epoch: int, ghosts: list[Ghost]) -> list[Example]:
    """The examples of ``ghosts``, in their order, each of their shards read once (up to the last one needed)."""
    wanted: dict[int, set[int]] = {}
    for shard, index in ghosts:
        wanted.setdefault(shard, set()).add(index)
    made: dict[Ghost, Example] = {}
    for shard, indices in wanted.items():
        make, last = source.load(shard, epoch), max(indices)
        for sample in iter_shard(urls[shard], source.on_damage(shard)):
            if sample.index in indices:
                ex = make(sample.index, sample)
                if ex is not None:
                    made[shard, sample.index] = ex
            if sample.index >= last:
                break
    missing = [g for g in ghosts if g not in made]
    if missing:
        shard, index = missing[0]
        raise SeedError(f"{urls[shard]}: sample {index} makes no example although it was counted; the shard changed "
                        f"since; {getattr(source, 'changed_hint', 'read it again')}")
    return [made[g] for g in ghosts]


def decode_items(items: list[Example], decoder: Decoder) -> tuple[list[Example], list[torch.Tensor]]:
    """The examples that decode and their images.

    A cached example (``row >= 0``) decoded at the teacher stage: if it does not decode now, or not to
    the size its views were drawn for, the shard changed since, and that is an error. A fresh example
    (no cache) was only checked by its header: one whose data does not decode is skipped, as an
    undecodable sample is everywhere else, and its place in the batch goes to the batch's first examples
    again (with a warning naming it), so that every batch keeps its size: DDP ranks gather equal batches.
    """
    kept, images, failed = [], [], []
    for it, image in zip(items, decoder.decode([it.sample for it in items])):
        where = f"{it.sample.url}: sample {it.sample.key!r}"
        if isinstance(image, ValueError) or tuple(image.shape[-2:]) != it.size:
            if it.row < 0:
                failed.append(f"{where} ({image if isinstance(image, ValueError) else 'another size than its header'})")
                continue
            if isinstance(image, ValueError):
                raise SeedError(f"{where} does not decode any more ({image}); did the shard change?")
            raise SeedError(f"{where} decodes to {tuple(image.shape[-2:])}, its views were drawn for {it.size}; "
                            "did the shard change?")
        kept.append(it)
        images.append(image)
    if failed:
        if not kept:
            raise SeedError(f"no image of a batch of {len(items)} decodes; the first: {failed[0]}")
        log.warning("skipped %d image(s) that do not decode, their places in the batch repeating its first "
                    "examples: %s", len(failed), "; ".join(failed))
        for j in range(len(failed)):
            kept.append(kept[j])
            images.append(images[j])
    return kept, images


def collate(items: list[Example], recipe: Recipe, resolution: int, decoder: Decoder,
            device: torch.device | None = None, slots: SharedSlots | None = None, fused_augment: bool = False) -> Batch:
    """Decode and augment the batch in one call each; views are laid out view-major (all first views, then second ...).

    ``x`` is made on ``device`` (the model's; the CPU when None), in one of a worker's ``slots`` when given.
    ``fused_augment``: see ``apply_batch``.
    """
    device = device or torch.device("cpu")
    n_views = items[0].params.shape[0]
    items, decoded = decode_items(items, decoder)
    decoded = [im.to(device) for im in decoded]                              # once per image, not per view
    images = [decoded[i] for v in range(n_views) for i in range(len(items))]
    params = torch.from_numpy(np.concatenate([np.stack([it.params[v] for it in items]) for v in range(n_views)]))
    out = None if slots is None else slots.empty(len(images), 3, resolution, resolution)
    x = apply_batch(images, params, recipe, resolution, device, out, fused_augment)  # rows on the host: see apply_batch
    extra = {name: torch.from_numpy(np.stack([it.extra[name] for it in items])) for name in items[0].extra}
    return Batch(x, torch.tensor([it.row for it in items]), torch.tensor([it.label for it in items]), extra, n_views)


def _jobs(urls: Sequence[str], order: Sequence[int], source: Source, epoch: int, *, batch_size: int, steps: int,
          seed: int, shuffle_buffer: int, skip: int = 0) -> Iterator[list[Example]]:
    """The epoch's batches as lists of encoded examples: exactly ``steps`` full ones (DDP ranks must agree), less
    the first ``skip`` (made, not yielded: a run resumed inside the epoch goes on with the batches that follow).

    A source whose counts are only an upper bound (``exact_counts`` false) may run short of ``steps`` batches
    by the samples it skipped: up to ``TOP_UP`` of the epoch's examples (and at least one batch) are then made
    again from the start of the same epoch's stream, with a warning. A larger shortfall, or any with exact
    counts, leaves the epoch short, which the training loop reports as an error.
    """
    items: list[Example] = []
    # the stream leaves out the skipped batches' examples itself when the source's counts are exact (``examples``
    # fast-forwards); otherwise their batches are made here and dropped
    ahead = skip if source.exact_counts else 0
    made = ahead
    stream = examples(urls, order, source, epoch, seed=seed, shuffle_buffer=shuffle_buffer, skip=ahead * batch_size)
    if not source.exact_counts:
        stream = _topped_up(stream, lambda: examples(urls, order, source, epoch, seed=seed, shuffle_buffer=shuffle_buffer),
                            steps * batch_size, batch_size)
    for ex in stream:
        items.append(ex)
        if len(items) == batch_size:
            made += 1
            if made > skip:
                yield items
            items = []
            if made == steps:
                return


TOP_UP = 0.05  # the share of an epoch's examples a source without exact counts may make again


def _topped_up(stream: Iterator[Example], again: Callable[[], Iterator[Example]], wanted: int,
               batch_size: int) -> Iterator[Example]:
    """``stream``, then, when it ends before ``wanted`` examples by at most ``TOP_UP`` of them (or one batch),
    the missing ones from ``again()`` (the same stream from its start)."""
    n = 0
    for ex in stream:
        n += 1
        yield ex
    short = wanted - n
    if 0 < short <= max(batch_size, int(TOP_UP * wanted)):
        log.warning("the shards gave %d examples, %d fewer than counted (samples without a readable image are "
                    "counted, then skipped): the epoch's first %d examples are used again to complete its %d batches",
                    n, short, short, wanted // batch_size)
        yield from itertools.islice(again(), short)


class _Composed:
    """A composed batch's examples, pickled (from the composing worker to this process) with their images'
    bytes in one tensor (``PackedSamples``), so they cross through shared memory."""

    def __init__(self, examples: list[Example], slots: SharedSlots | None = None):
        self.examples, self.slots = examples, slots  # the composing worker's buffers, to pack the bytes into

    def __getstate__(self) -> dict[str, Any]:
        packed = PackedSamples.pack([ex.sample for ex in self.examples], self.slots)
        # the examples hold the packed (byte-less) samples: pickled once, shared by both lists
        return {"packed": packed, "examples": [dataclasses.replace(ex, sample=sample)
                                               for ex, sample in zip(self.examples, packed.samples)]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.slots = None
        self.examples = [dataclasses.replace(ex, sample=sample)
                         for ex, sample in zip(state["examples"], state["packed"].unpack())]


def _composed(urls: Sequence[str], source: Source, epoch: int, order: Sequence[int], *, batch_size: int, steps: int,
              seed: int, shuffle_buffer: int, skip: int, slots: SharedSlots) -> Iterator[_Composed]:
    """``_jobs`` with the shard order last: what the composing worker runs (``seed.workers.ShardSplit``
    hands its one worker every shard, in order). The images' bytes cross in its ``slots``."""
    for job in _jobs(urls, order, source, epoch, batch_size=batch_size, steps=steps, seed=seed,
                     shuffle_buffer=shuffle_buffer, skip=skip):
        yield _Composed(job, slots)


class _CollateJob(torch.utils.data.Dataset):
    """Worker side: an index is one batch's examples; the item is that batch, decoded and augmented on the CPU."""

    def __init__(self, recipe: Recipe, resolution: int):
        self.recipe, self.resolution = recipe, resolution
        self.decoder = Decoder(torch.device("cpu"))
        self.slots: SharedSlots | None = None  # set before the workers start

    def __getitem__(self, items: list[Example]) -> Batch | SeedError:
        try:
            batch = collate(items, self.recipe, self.resolution, self.decoder, slots=self.slots)
            return batch if self.slots is None else self.slots.send(batch)
        except SeedError as exc:  # handed back as an item: the DataLoader would wrap it in its own traceback
            return exc


class _Jobs:
    """The sampler of a persistent DataLoader: yields the current epoch's jobs."""

    def __init__(self) -> None:
        self.jobs: Iterator[list[Example]] = iter(())

    def __iter__(self) -> Iterator[list[Example]]:
        return self.jobs


class Batches:
    """Makes each epoch's batches.

    The batches are composed in one process (seeded shard order, shuffle buffer of encoded examples,
    grouping), so they are the same for any number of workers. Two layouts:

    - decode in workers (the CPU's default): composed in a background thread here; ``workers``
      processes (persistent across epochs) decode and augment them, into shared buffers they reuse
      (``seed.workers.SharedSlots``); with none, the thread does.
    - compose in a worker (``compose_in_worker``, CUDA's default when ``workers`` > 0): one worker
      process per epoch reads the shards and composes the batches, still encoded; a background
      thread here decodes (nvJPEG on CUDA) and augments them on ``device``. Reading shards, the
      cached rows and the shuffle buffer are then off this process's interpreter lock, which the
      training step's kernel launches need. It runs on any device (the tests use it on the CPU).

    ``depth`` batches are prepared ahead. ``fused_augment``: see ``apply_batch`` (on CUDA only: workers augment on
    the CPU).
    """

    def __init__(self, recipe: Recipe, resolution: int, *, device: torch.device, workers: int, depth: int,
                 compose_in_worker: bool | None = None, fused_augment: bool = False):
        if compose_in_worker is None:
            compose_in_worker = device.type == "cuda" and workers > 0
        self.compose_in_worker = compose_in_worker
        workers = 0 if compose_in_worker or device.type != "cpu" else workers
        self.recipe, self.resolution, self.device, self.workers, self.depth = recipe, resolution, device, workers, depth
        self.fused_augment = fused_augment
        self._jobs = _Jobs()
        self._epoch: Iterator[Any] | None = None  # the epoch's prefetching iterator: closed by ``close``
        self._collate = _CollateJob(recipe, resolution)
        self._loader = None if workers == 0 else torch.utils.data.DataLoader(
            self._collate, sampler=self._jobs, batch_size=None, num_workers=workers,
            collate_fn=as_is, prefetch_factor=max(1, depth), persistent_workers=True)

    def epoch(self, urls: Sequence[str], order: Sequence[int], source: Source, epoch: int, *, batch_size: int,
              steps: int, seed: int, shuffle_buffer: int, skip: int = 0) -> Iterator[Batch]:
        """The epoch's ``steps`` batches less its first ``skip`` (``_jobs``)."""
        if self.compose_in_worker:
            compose = functools.partial(_composed, urls, source, epoch, batch_size=batch_size, steps=steps, seed=seed,
                                        shuffle_buffer=shuffle_buffer, skip=skip,
                                        slots=SharedSlots.for_workers(1, self.depth))
            decoder = Decoder(self.device)
            composed = shard_workers(order, compose, workers=1, depth=self.depth)
            self._epoch = prefetch((collate(j.examples, self.recipe, self.resolution, decoder, self.device,
                                            fused_augment=self.fused_augment) for j in composed), self.depth)
            return self._epoch
        jobs = _jobs(urls, order, source, epoch, batch_size=batch_size, steps=steps, seed=seed,
                     shuffle_buffer=shuffle_buffer, skip=skip)
        if self._loader is None:
            decoder = Decoder(self.device)
            self._epoch = prefetch((collate(j, self.recipe, self.resolution, decoder, self.device,
                                            fused_augment=self.fused_augment) for j in jobs), self.depth)
            return self._epoch
        self._jobs.jobs = self._epoch = prefetch(jobs, self.depth)  # reading shards overlaps the training step
        if self._collate.slots is None:  # before the (persistent) workers start
            self._collate.slots = SharedSlots.for_workers(self.workers, self.depth)
        return reraise(iter(self._loader))

    def close(self) -> None:
        """Stop the worker processes now (they are persistent across epochs) and free their shared buffers; an
        epoch left part-way (a failed step) stops too: its thread, its composing worker and shuffle buffer go
        now, not when the last reference to it does (an exception kept by a caller holds one)."""
        if self._epoch is not None:
            close = getattr(self._epoch, "close", None)
            if close is not None:
                close()
            self._epoch, self._jobs.jobs = None, iter(())
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # torch's own shutdown; the public way is to drop every reference
        self._collate.slots = None
