"""Worker processes that each own whole input shards: the DataLoader plumbing the stages share.

Worker w of W runs ``make(shards[w::W])``, so a shard is read by one process from start to end and
what it yields is what one process would make (the teacher stage's cache rows, the evaluation's
features). A ``SeedError`` raised in a worker is handed over as an item and raised again here:
torch's DataLoader would otherwise wrap it in a traceback of its own, burying the one-line message
a user needs. What a worker sends in bulk (float batches; a batch's encoded images, packed into one
tensor by ``PackedSamples``) it writes into shared-memory buffers it reuses (``SharedSlots``).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from seed.errors import SeedError
from seed.shards import Sample

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


def shared_bytes(n: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``n`` bytes in shared memory, made there directly as torch's own collate
    does (``share_memory_`` would copy it there, taking every page at once)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))


def _use_count(t: torch.Tensor) -> int:
    """How many references this process holds to ``t``'s storage (every tensor viewing it counts)."""
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


@dataclasses.dataclass(frozen=True, eq=False)
class SlotRef:
    """A tensor a worker wrote into buffer ``index`` of the ``SharedSlots`` named ``token``, from its first byte.

    Unpickled, it is that tensor again: a view of the buffer in the receiving process. ``buffer``: the buffer
    itself, sent with the first tensor written into it (and again when the worker made it anew, larger).
    """

    token: str
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    buffer: torch.Tensor | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return _open_slot, (self.token, self.index, self.shape, self.dtype, self.buffer)


_OPEN: weakref.WeakValueDictionary[str, SharedSlots] = weakref.WeakValueDictionary()  # this process's, by token


def _open_slot(token: str, index: int, shape: tuple[int, ...], dtype: torch.dtype,
               buffer: torch.Tensor | None) -> torch.Tensor:
    slots = _OPEN.get(token)
    if slots is None:
        raise SeedError(f"a worker sent a batch in shared buffers ({token}) that this process no longer has")
    return slots._open(index, shape, dtype, buffer)


class SharedSlots:
    """Shared-memory buffers that DataLoader workers write their tensors into, sent to this process by index.

    A tensor a worker returns the usual way costs both processes: the worker makes it in fresh memory
    and copies it into a new shared-memory segment, and this process maps that segment and faults in
    every 4 KB page it reads. For a batch of 256 float views at 224 px (154 MB) that is some tens of
    milliseconds on each side, per batch. These buffers are made once and reused:

    - a worker takes a free buffer of its own (``empty``), writes into it and sends ``ref`` of the
      tensor in its place (``send`` does it for a dataclass's fields): a few numbers, and the buffer
      itself the first time;
    - unpickled here, the reference is the tensor again, a view of the buffer; the buffer goes back to
      its worker once no tensor here shares its storage any more, so a batch the consumer still holds,
      or any view of it, is never overwritten.

    A worker makes a buffer when it first needs one, of at least ``nbytes`` (torch reserves a shared-memory
    segment's pages when it makes it), and makes it anew, a quarter larger than asked, when a free one is
    too small. With none free, ``empty`` makes an ordinary tensor, sent as before: the buffers save
    copies and never change what is received. Each worker has buffers of its own, so taking one needs
    no lock: a flag is set only by the worker (on a free buffer of its own) and cleared only here (on a
    buffer received and let go of). Make one in the receiving process, before the workers start
    (``for_workers``), and keep it while they run.
    """

    @classmethod
    def for_workers(cls, workers: int, depth: int, nbytes: int = 0) -> SharedSlots:
        """Buffers for ``workers`` each ``depth`` items ahead, and a consumer that holds one item at a time: a
        worker's items in flight, and the consumer's three (the one it holds, the one before, which its loop
        variable lets go of only when the next arrives, and the one being received)."""
        return cls(workers, max(1, depth) + 3, nbytes)

    def __init__(self, workers: int, per_worker: int, nbytes: int = 0):
        if not hasattr(torch._C, "_storage_Use_Count"):
            per_worker = 0  # this process could not tell when a buffer is free: every tensor is sent as before
        self.nbytes, self.per_worker = nbytes, per_worker
        self.token = uuid.uuid4().hex
        self.buffers: list[torch.Tensor | None] = [None] * (workers * per_worker)  # worker w's: w * per_worker ...
        self.taken = torch.zeros(len(self.buffers), dtype=torch.uint8).share_memory_()  # set by empty, cleared here
        self._unsent: set[int] = set()             # worker side: buffers made there and not yet sent
        self._unused: dict[int, int] = {}          # this process's references to a buffer when nothing views it
        self._held: list[int] = []                 # received, not yet freed
        _OPEN[self.token] = self

    def empty(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Worker side: an uninitialised contiguous tensor in a free buffer of this worker's (or, with none free,
        an ordinary one). Outside a worker, the first worker's buffers are used."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > 0:
            info = torch.utils.data.get_worker_info()
            first = (0 if info is None else info.id) * self.per_worker
            taken = self.taken.numpy()
            for i in range(first, min(first + self.per_worker, len(self.buffers))):
                if taken[i] == 0:
                    taken[i] = 1
                    buffer = self.buffers[i]
                    if buffer is None or buffer.numel() < nbytes:  # the first time exactly, then with room to grow
                        room = 0 if buffer is None else nbytes // 4
                        buffer = self.buffers[i] = shared_bytes(max(self.nbytes, nbytes + room))
                        self._unsent.add(i)
                    return buffer[:nbytes].view(dtype).view(shape)
        return torch.empty(shape, dtype=dtype)

    def ref(self, t: torch.Tensor) -> SlotRef | torch.Tensor:
        """Worker side: what to send for ``t``: its ``SlotRef`` when ``empty`` made it in a buffer, else ``t``."""
        ptr = t.untyped_storage().data_ptr()
        i = next((i for i, b in enumerate(self.buffers) if b is not None and b.data_ptr() == ptr), None)
        if i is None or t.storage_offset() != 0 or not t.is_contiguous():
            return t
        first = i in self._unsent
        self._unsent.discard(i)
        return SlotRef(self.token, i, tuple(t.shape), t.dtype, self.buffers[i] if first else None)

    def send(self, item: T) -> T:
        """Worker side: ``item`` (a dataclass) with each of its tensors that ``empty`` made replaced by its ``SlotRef``."""
        sent = {f.name: self.ref(v) for f in dataclasses.fields(item)  # type: ignore[arg-type]
                if isinstance(v := getattr(item, f.name), torch.Tensor)}
        refs = {k: v for k, v in sent.items() if isinstance(v, SlotRef)}
        return dataclasses.replace(item, **refs) if refs else item  # type: ignore[type-var]

    def _open(self, index: int, shape: tuple[int, ...], dtype: torch.dtype, buffer: torch.Tensor | None) -> torch.Tensor:
        self.reclaim()
        if buffer is not None:     # a buffer's first batch (or a larger buffer in its place): keep it
            self.buffers[index] = buffer
            self._unused[index] = _use_count(buffer)
        kept = self.buffers[index]
        assert kept is not None, f"buffer {index} was never received"
        self._held.append(index)
        return kept[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def reclaim(self) -> None:
        """Free, for the workers, every received buffer that no tensor in this process views any more."""
        done = [i for i in self._held if _use_count(self.buffers[i]) == self._unused[i]]  # type: ignore[arg-type]
        if done:
            self.taken.numpy()[done] = 0
            self._held = [i for i in self._held if i not in done]


@dataclasses.dataclass
class PackedSamples:
    """Samples whose image bytes travel as one uint8 tensor: a DataLoader worker hands a tensor over through
    shared memory, where a batch of ``bytes`` is pickled through a pipe and unpickled by the receiving
    thread (128 ImageNet-sized JPEGs: about 14 ms of the receiving thread, 6-7 ms as a new shared tensor,
    1.3-1.8 ms in a reused buffer; ``bench/handover.py``).

    ``pack`` keeps everything but the bytes in ``samples``; ``unpack`` gives the samples back, each
    image a view of ``data`` (no copy). ``sizes[i]`` is -1 for a sample without an image. Packed with a
    worker's ``slots``, the bytes go into one of its reused buffers and cross as its ``SlotRef``.
    """

    samples: list[Sample]
    data: torch.Tensor
    sizes: np.ndarray
    slots: SharedSlots | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def pack(cls, samples: Sequence[Sample], slots: SharedSlots | None = None) -> PackedSamples:
        sizes = np.array([-1 if s.image is None else len(s.image) for s in samples], dtype=np.int64)
        n = int(sizes.clip(min=0).sum())
        # in a worker, filled in shared memory: handing it over then copies nothing
        data = (slots.empty(n, dtype=torch.uint8) if slots is not None else
                shared_bytes(n) if torch.utils.data.get_worker_info() is not None else torch.empty(n, dtype=torch.uint8))
        buf, at = data.numpy(), 0
        for s, n in zip(samples, sizes):
            if n > 0:
                buf[at:at + n] = np.frombuffer(s.image, dtype=np.uint8)  # type: ignore[arg-type]
                at += n
        return cls([dataclasses.replace(s, image=None) for s in samples], data, sizes, slots)

    def __getstate__(self) -> dict[str, Any]:
        data = self.data if self.slots is None else self.slots.ref(self.data)
        return {"samples": self.samples, "data": data, "sizes": self.sizes, "slots": None}

    def unpack(self) -> list[Sample]:
        view, at, out = self.data.numpy().data, 0, []                        # a memoryview of the tensor
        for s, n in zip(self.samples, self.sizes.tolist()):
            out.append(s if n < 0 else dataclasses.replace(s, image=view[at:at + n]))
            at += max(n, 0)
        return out
