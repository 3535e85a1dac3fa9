"""The training data path: stream shards, pick a view per image, replay it, batch it.

One pass over the data per epoch: shards in a seeded order (split by rank for DDP), samples
through a seeded shuffle buffer, then batches augmented in one call. What a sample carries
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
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from seed import cache
from seed.augment import Recipe, apply_batch, draw_params
from seed.prefetch import prefetch
from seed.shards import Sample, decode_image, iter_shard

if TYPE_CHECKING:
    import zarr

    from seed.bank_store import Bank


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
    image: torch.Tensor
    params: np.ndarray             # [n_views, P]
    row: int
    label: int
    extra: dict[str, np.ndarray]


def rng_for(seed: int, *words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


MakeExample = Callable[[int, Sample], "Example | None"]


class Source(Protocol):
    """What a training example carries besides its image, per input shard and epoch."""

    def load(self, shard: int, epoch: int) -> MakeExample:
        """A function of (index in the shard, sample) -> the example, or None to skip the sample."""
        ...


class CachedSource:
    """Per input shard, the cached rows: which view to use and its replay/teacher data.

    ``view``: ``cycle`` uses view ``(epoch + row) mod V``; ``random`` draws one from (seed, epoch, row).
    """

    def __init__(self, group: zarr.Group, bank: Bank | None, *, view: str, seed: int, dense: bool):
        self.group, self.bank, self.view, self.seed, self.dense = group, bank, view, seed, dense
        self.capacity = int(cache.attributes(group)["capacity"])
        self.V = int(cache.attributes(group)["V"])

    def valid_counts(self) -> np.ndarray:
        valid = cache.read(self.group, "valid")
        return valid.reshape(-1, self.capacity).sum(axis=1)

    def load(self, shard: int, epoch: int) -> MakeExample:
        rows = slice(shard * self.capacity, (shard + 1) * self.capacity)
        valid = cache.read(self.group, "valid", rows)
        augment = cache.read(self.group, "augment", rows)                    # cap x V x P
        emb = cache.read(self.group, "embeddings", rows)                     # cap x V x D
        targets = {} if self.dense or self.bank is None else self.bank.targets(rows)
        base = shard * self.capacity
        if self.view == "cycle":
            views = (epoch + base + np.arange(self.capacity)) % self.V
        else:
            views = rng_for(self.seed, epoch, shard).integers(0, self.V, size=self.capacity)

        def make(index: int, sample: Sample) -> Example | None:
            if not valid[index]:
                return None  # skipped at the teacher stage (undecodable)
            v = views[index]
            extra = {"z_t": emb[index, v].astype(np.float32)}
            extra.update({name: arr[index, v] for name, arr in targets.items()})
            return Example(decode_image(sample), augment[index, v][None], base + index, sample.label, extra)

        return make


class FreshViews:
    """``n_views`` new views per image and epoch, drawn from (seed, key, epoch * n_views + i)."""

    def __init__(self, recipe: Recipe, *, seed: int, n_views: int = 1):
        self.recipe, self.seed, self.n_views = recipe, seed, n_views

    def load(self, shard: int, epoch: int) -> MakeExample:
        def make(index: int, sample: Sample) -> Example | None:
            try:
                image = decode_image(sample)
            except ValueError:
                return None
            h, w = image.shape[-2:]
            params = np.stack([draw_params(self.recipe, seed=self.seed, key=sample.key, view=epoch * self.n_views + i,
                                           height=h, width=w) for i in range(self.n_views)])
            return Example(image, params, -1, sample.label, {})

        return make


def rank_shards(n_shards: int, rank: int = 0, world: int = 1) -> list[int]:
    """The shards of one DDP rank: a fixed subset, so every epoch gives a rank the same number of examples."""
    return list(range(rank, n_shards, world))


def shard_order(n_shards: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's shards in a seeded per-epoch order."""
    mine = rank_shards(n_shards, rank, world)
    return [mine[i] for i in rng_for(seed, epoch, 10**6 + rank).permutation(len(mine))]


def examples(urls: Sequence[str], order: Sequence[int], source: Source, epoch: int, *, seed: int,
             shuffle_buffer: int) -> Iterator[Example]:
    """Examples of the given shards through a seeded shuffle buffer."""
    rng = rng_for(seed, epoch, 2 * 10**6)
    buffer: list[Example] = []
    for shard in order:
        make = source.load(shard, epoch)
        for sample in iter_shard(urls[shard]):
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


def collate(items: list[Example], recipe: Recipe, resolution: int, device: torch.device | None = None) -> Batch:
    """Augment the batch in one call; views are laid out view-major (all first views, then second ...)."""
    n_views = items[0].params.shape[0]
    images = [it.image for v in range(n_views) for it in items]
    params = torch.from_numpy(np.concatenate([np.stack([it.params[v] for it in items]) for v in range(n_views)]))
    x = apply_batch(images, params if device is None else params.to(device), recipe, resolution)
    extra = {name: torch.from_numpy(np.stack([it.extra[name] for it in items])) for name in items[0].extra}
    return Batch(x, torch.tensor([it.row for it in items]), torch.tensor([it.label for it in items]), extra, n_views)


def batches(urls: Sequence[str], order: Sequence[int], source: Source, epoch: int, *, recipe: Recipe, resolution: int,
            batch_size: int, steps: int, seed: int, shuffle_buffer: int, depth: int = 2) -> Iterator[Batch]:
    """Exactly ``steps`` full batches (DDP ranks must agree on the count), prepared ``depth`` ahead."""
    def produce() -> Iterator[Batch]:
        items: list[Example] = []
        made = 0
        for ex in examples(urls, order, source, epoch, seed=seed, shuffle_buffer=shuffle_buffer):
            items.append(ex)
            if len(items) == batch_size:
                yield collate(items, recipe, resolution)
                items = []
                made += 1
                if made == steps:
                    return

    return prefetch(produce(), depth)
