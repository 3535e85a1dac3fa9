"""Background threads that overlap I/O with compute: reading ahead (``prefetch``) and writing behind
(``WriteBehind``).

Decoding (PIL) and tensor augmentation release the GIL for most of their time, so one producer
thread overlaps them with the model's forward or backward pass. Exceptions in the producer are
re-raised in the consumer; stopping early (break, error) stops the producer too. Zarr's chunk
compression (in threads of its own) and file writes release it too, so a shard's rows are written
while the next shard is computed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order, produced up to ``depth`` ahead in a daemon thread (``depth=0``: inline)."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="seed-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class WriteBehind:
    """Writes run one at a time, in order, in a background thread while the caller computes the next one.

    ``submit(write, then)`` first waits for the write before it (so at most one runs while the caller
    prepares the next: one more block of rows in memory), re-raising its error, and calls that write's
    ``then`` here, in the caller's thread; then it starts ``write``. ``close`` (or leaving the ``with``
    block) waits for the last one the same way. A write is a whole unit (a shard's rows, then its
    completion record), so one cut short by an error in the caller is finished first: what is on disk
    is what a synchronous loop would have left, and only completed writes are recorded. ``enabled=False``
    writes inline in ``submit`` (for measuring one against the other).
    """

    def __init__(self, name: str = "seed-write", *, enabled: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if enabled else None
        self._pending: tuple[Future[Any], Callable[[], Any] | None] | None = None
        self.wait_s = 0.0  # seconds the caller waited for writes (inline: all of them; behind: what they did not hide)

    def submit(self, write: Callable[[], Any], then: Callable[[], Any] | None = None) -> None:
        self._finish_pending()
        if self._pool is None:
            t0 = time.perf_counter()
            write()
            self.wait_s += time.perf_counter() - t0
            if then is not None:
                then()
            return
        self._pending = (self._pool.submit(write), then)

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        future, then = self._pending
        t0 = time.perf_counter()
        try:
            future.result()  # its error, if any, raised here
        finally:
            self.wait_s += time.perf_counter() - t0
            if future.done():  # (not when the wait itself was interrupted: close waits again, and reports it)
                self._pending = None
        if then is not None:
            then()

    def close(self) -> None:
        """Wait for the last write (raising its error) and stop the thread."""
        try:
            self._finish_pending()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if kind is None:
            self.close()
            return
        try:  # the caller's error stands; a write in flight is finished (and reported), a failure there only logged
            self.close()
        except Exception as write_error:  # noqa: BLE001
            log.error("finishing the write in flight when %s was raised failed too: %s", kind.__name__, write_error)
