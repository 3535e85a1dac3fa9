"""Worker processes that each own whole input shards: the DataLoader plumbing the stages share.

Worker w of W runs ``make(shards[w::W])``, so a shard is read by one process from start to end and
what it yields is what one process would make (the teacher stage's cache rows, the evaluation's
features). A ``SeedError`` raised in a worker is handed over as an item and raised again here:
torch's DataLoader would otherwise wrap it in a traceback of its own, burying the one-line message
a user needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from seed.errors import SeedError

T = TypeVar("T")


class ShardSplit(torch.utils.data.IterableDataset):
    """Worker w of W yields ``make(shards[w::W])``; in the main process (no workers), ``make(shards)``.

    ``make`` must be picklable where workers are spawned rather than forked: a module-level function
    or a ``functools.partial`` of one.
    """

    def __init__(self, shards: Sequence[int], make: Callable[[Sequence[int]], Iterable[Any]]):
        self.shards, self.make = list(shards), make

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        try:
            yield from self.make(mine)
        except SeedError as exc:
            yield exc


def as_is(item: Any) -> Any:
    """The DataLoader's ``collate_fn`` when each item is already a batch (``batch_size=None``)."""
    return item


def reraise(items: Iterable[T | SeedError]) -> Iterator[T]:
    """``items``, raising a ``SeedError`` a worker handed over in its place."""
    for item in items:
        if isinstance(item, SeedError):
            raise item
        yield item


def shard_workers(shards: Sequence[int], make: Callable[[Sequence[int]], Iterable[T]], *, workers: int,
                  depth: int) -> Iterator[T]:
    """What ``make`` yields for every shard, from ``workers`` processes, each ``depth`` items ahead.

    Items of different workers interleave; each shard's items keep their order.
    """
    loader = torch.utils.data.DataLoader(ShardSplit(shards, make), batch_size=None, num_workers=workers,
                                         collate_fn=as_is, prefetch_factor=max(1, depth))
    return reraise(loader)
