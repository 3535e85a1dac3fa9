"""Feature rows on local disk: an encoder's float32 ``[n, d]`` rows in an unnamed temporary file.

The evaluation (``seed.evaluate``) writes every encoder's rows here as batches arrive and its scores read
them back by row ranges and row indices, so its memory does not grow with N. The files have no name
(``tempfile.TemporaryFile``): their space returns when they are closed, collected, or their process ends,
however it ends. They go to ``TMPDIR``'s disk, which is checked before a pass for room (when N is known) and
for being a filesystem kept in memory (a tmpfs), where the rows would take memory after all.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any, Union

import numpy as np

from seed.errors import SeedError

log = logging.getLogger(__name__)


def _pread_into(fd: int, out: np.ndarray | memoryview, offset: int) -> None:
    """Fill ``out`` (C-contiguous, or bytes) with the file's bytes from ``offset``; a short file is an error."""
    view, done = out if isinstance(out, memoryview) else out.data.cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, f"feature file ended {len(view) - done} bytes early")
        done += got


class FeatureFile:
    """An encoder's feature rows, float32 ``[n, d]``, in an unnamed temporary file on local disk.

    Read back by row ranges (``x[a:b]``) or row indices (``x[idx]``) into new arrays, through ``os.pread``,
    each run of rows that lie one after another in the file in one read: the rows live in the page cache,
    and a reader holds only what it asked for. ``np.asarray(x)`` reads them all. ``order``: the file row of
    each row (rows written in another order than they are read, as batches from several workers arrive);
    None when they are the same. The file has no name, so it takes no disk space once this object is closed
    or collected, or its process ends, however it ends.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, file: IO[bytes], n: int, d: int, order: np.ndarray | None = None):
        self.file, self.shape, self.order = file, (n, d), order

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        n, d = self.shape
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("a FeatureFile reads row ranges with step 1 only")
            if self.order is not None:
                return self._gather(self.order[start:stop])
            out = np.empty((max(0, stop - start), d), np.float32)
            if len(out):
                _pread_into(self.file.fileno(), out, start * d * 4)
            return out
        idx = np.asarray(key)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise IndexError(f"a FeatureFile takes a slice or a 1-d array of row indices, got {idx.dtype} of shape {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return self._gather(idx if self.order is None else self.order[idx])

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """The file's rows ``rows`` (int64), in that order, one read per run of consecutive file rows.

        A probe's random mini-batch is about one run per row: the loop does nothing but the reads (offsets
        and byte ranges worked out by numpy first), 1.5-1.7x faster than a call per run through
        ``_pread_into`` (bench/feature_rows.py). Gathering from a mapping of the file was 1.3-1.5x faster
        again, but the kernel maps the page cache around each row it faults in: one batch of 1,024 rows made
        the whole 391 MiB file resident in the process, so its memory would grow with N."""
        width, rows = self.shape[1] * 4, np.asarray(rows, np.int64)  # byte offsets past 2 GiB
        out = np.empty((len(rows), self.shape[1]), np.float32)
        if not len(rows):
            return out
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
        ends = np.append(starts[1:], len(rows))
        fd, view, preadv = self.file.fileno(), out.data.cast("B"), os.preadv
        for a, b, offset in zip((starts * width).tolist(), (ends * width).tolist(), (rows[starts] * width).tolist()):
            got = preadv(fd, [view[a:b]], offset)
            if got != b - a:  # a short read: the rest through the loop that tells a file cut short
                _pread_into(fd, view[a + got:b], offset + got)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a FeatureFile's rows are on disk: reading them makes a copy")
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def close(self) -> None:
        """Give the disk space back; the rows cannot be read afterwards."""
        self.file.close()


def feature_file(directory: str) -> IO[bytes]:
    """A new unnamed file in ``directory`` for feature rows (``FeatureWriter``, or ``write_rows`` by several
    processes that inherit it)."""
    with _disk_errors(directory):
        return tempfile.TemporaryFile(dir=directory)


def write_rows(fd: int, rows: np.ndarray, at: np.ndarray, directory: str) -> None:
    """Write ``rows`` (``[b, d]``, as float32) at file rows ``at`` (increasing) of the ``[n, d]`` float32 rows in file
    ``fd``, one write per run of consecutive rows: processes that share the file each write their own rows. A full
    disk is an error naming ``directory`` (the file's)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    at = np.asarray(at, np.int64)
    if not len(at):
        return
    width = rows.shape[1] * 4
    starts = np.flatnonzero(np.diff(at, prepend=at[0] - 2) != 1)
    ends = np.append(starts[1:], len(at))
    view = rows.data.cast("B")
    with _disk_errors(directory):
        for a, b, row in zip((starts * width).tolist(), (ends * width).tolist(), at[starts].tolist()):
            done = 0
            while done < b - a:
                done += os.pwrite(fd, view[a + done:b], row * width + done)


Rows = Union[np.ndarray, FeatureFile]  # what the scores read: rows held in memory, or on disk


class FeatureWriter:
    """One encoder's rows, appended as batches arrive (in any shard order) to an unnamed file in ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory
        self.file = feature_file(directory)
        self.width: int | None = None
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or (self.width is not None and rows.shape[1] != self.width):
            raise ValueError(f"feature rows must be [batch, width] with one width throughout: got {list(rows.shape)}"
                             + (f" after width {self.width}" if self.width is not None else ""))
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.width = rows.shape[1]
        with _disk_errors(self.directory):
            self.file.write(rows.data.cast("B"))
        self.n += len(rows)

    def finish(self, sizes: Sequence[int], rank: Sequence[int]) -> FeatureFile:
        """The rows, read in ``rank`` order of their blocks (``sizes``, in arrival order): the file as written, with
        the file row of each row when the blocks arrived in another order (no copy is made)."""
        with _disk_errors(self.directory):
            self.file.flush()
        order = None
        if list(rank) != sorted(rank):
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            order = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in rank])
        return FeatureFile(self.file, self.n, self.width or 0, order)


@contextlib.contextmanager
def _disk_errors(directory: str) -> Iterator[None]:
    """A full disk (``ENOSPC``, from a write or from the flush of a buffered one) as one line naming ``directory``
    and ``TMPDIR``."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SeedError(f"evaluation features: no space left in {directory} (the local disk they are written "
                            "to); point TMPDIR at a local disk with more room") from None
        raise


def check_disk(directory: str, n: int | None, widths: Sequence[int]) -> None:
    """Before the pass goes on: refuse when ``directory``'s disk cannot hold ``n`` rows of every width, and warn
    (once per directory) when it is a filesystem kept in memory, where the rows would take the memory they were
    moved out of. ``n`` None: not known, no room check."""
    need = None if n is None else n * 4 * sum(widths)
    if need is not None:
        free = shutil.disk_usage(directory).free
        if need > free:
            raise SeedError(f"evaluation features need about {need / 1e9:.1f} GB of local disk ({n} images x "
                            f"{sum(widths)} floats) and {directory} has {free / 1e9:.1f} GB free; point TMPDIR at "
                            "a local disk with more room")
    kind = memory_filesystem(directory)
    if kind and directory not in _WARNED:
        _WARNED.add(directory)
        size = "" if need is None else f" (about {need / 1e9:.1f} GB)"
        log.warning("evaluation features: %s is a %s, kept in memory, so the feature rows%s take memory there, "
                    "not disk; point TMPDIR at a directory on a local disk", directory, kind, size)


_WARNED: set[str] = set()


def memory_filesystem(directory: str, mounts: str | None = None) -> str | None:
    """``tmpfs`` or ``ramfs`` when ``directory`` lies on such a filesystem (its contents held in memory), else None.

    The filesystem is the one mounted at the longest mount point above the directory's real path, read from
    ``mounts`` (the text of ``/proc/self/mounts``, read when not given; None where there is no such file).
    """
    if mounts is None:
        try:
            with open("/proc/self/mounts") as f:
                mounts = f.read()
        except OSError:
            return None
    path = os.path.realpath(directory)
    point, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")  # the mounts file writes a space in a path as \040
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(point):
            point, kind = mount, fields[2]
    return kind if kind in ("tmpfs", "ramfs") else None
