"""The teacher cache: a Zarr v3 group holding V teacher views of every image.

Layout (N = shards x capacity rows; input shard ``s`` owns rows ``[s * capacity, (s + 1) * capacity)``):

=============  ==========  ============  ==========================================================
array          shape       dtype         meaning
=============  ==========  ============  ==========================================================
embeddings     [N, V, D]   float16       L2-normalised teacher output of view v of image n (NaN = none)
augment        [N, V, P]   float32       replay parameters of each view; column names in attrs
keys           [N]         string        sample key ("" for padding rows)
labels         [N]         int32         class, -1 when unknown
valid          [N]         bool          row holds a decoded image with all V views
sizes          [N, 2]      int32         decoded source (height, width)
=============  ==========  ============  ==========================================================

Every array is chunked ``capacity`` rows deep, so two input shards never share a chunk and shard
writers (threads, processes, machines) never read-modify-write each other's data. ``embeddings`` is also
chunked one view deep: a student uses one view of a row block per epoch and reads only that view's chunk
(1/V of the bytes). A shard writer
writes its chunks first and its completion record ``progress/<shard>`` (a group whose attributes
hold counts, skipped samples and timings) last; only the coordinator writes the root attributes:
when creating the cache, when marking it complete, and when it takes back the records of shards to
embed again (a damaged shard since repaired: ``reopen_shards``, which gives the cache a new
``revision``). A crash therefore leaves either a shard with a record and all its data, or a shard
without a record that the next run redoes.

The **fingerprint** hashes what determines the cached values: teacher identity (architecture,
checkpoint sha256, format, output, small-input stem), augmentation recipe, resolution, seed, V, D,
the row capacity per shard and the input shards (names and sample counts, not their location, so
moving shards to object storage keeps the cache valid). A run whose fingerprint differs is refused with the differing fields named.

Every chunk ends with a CRC32C checksum (Zarr's ``crc32c`` codec, after compression), so a chunk
flipped or cut short by a bad copy fails on read, naming the array, instead of being read as data;
``seed inspect --verify`` reads every chunk and checks the completion records against the data.
Format 1 caches (before checksums) still open, with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
import zarr.errors

from seed.views import COLUMNS, P
from seed.errors import SeedError
from seed.storage import check_protocol, filesystem, is_url, local_path

log = logging.getLogger(__name__)

FORMAT = "seed-teacher-cache"
FORMAT_VERSION = 2  # 2: every chunk checksummed (crc32c); 1 still opens, without checksums
READABLE_VERSIONS = (1, 2)
ARRAYS = ("embeddings", "augment", "keys", "labels", "valid", "sizes")


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group`` (typed: ``group[name]`` may be an array or a group)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise SeedError(f"{name} in {group.store_path} is a {type(node).__name__}, expected an array")
    return node


def subgroup(group: zarr.Group, name: str) -> zarr.Group:
    """The sub-group ``name`` of ``group`` (typed)."""
    node = group[name]
    if not isinstance(node, zarr.Group):
        raise SeedError(f"{name} in {group.store_path} is a {type(node).__name__}, expected a group")
    return node


def checksummed(dtype: Any) -> list[Any]:
    """The compressors of every cache and bank array: zstd (not for float16, which barely compresses),
    then a CRC32C checksum of the stored chunk."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return ([] if np.dtype(dtype) == np.float16 else [ZstdCodec()]) + [Crc32cCodec()]


def _damaged(exc: ValueError, arr: zarr.Array, where: str) -> SeedError | None:
    """A checksum failure as a one-line error naming the array, or None for other errors."""
    if "checksum" not in str(exc):
        return None
    return SeedError(f"{arr.store_path}: a chunk of {where} does not match its checksum: the cache was damaged "
                     "(a bad copy?); `seed inspect --verify` lists every damaged chunk")


def read(group: zarr.Group, name: str, selection: Any = slice(None)) -> np.ndarray:
    """``group[name][selection]`` as a numpy array (basic indexing: slices and integers)."""
    return read_array(array(group, name), selection)


def read_array(arr: zarr.Array, selection: Any = slice(None)) -> np.ndarray:
    """``arr[selection]`` as a numpy array; a chunk that fails its checksum is one line naming the array."""
    try:
        return np.asarray(arr[selection])
    except ValueError as exc:
        raise _damaged(exc, arr, f"rows {selection}") or exc


def read_rows(group: zarr.Group, name: str, rows: np.ndarray) -> np.ndarray:
    """The rows ``rows`` (an integer array, any order) of ``group[name]`` as a numpy array."""
    arr = array(group, name)
    try:
        return np.asarray(arr.oindex[rows])
    except ValueError as exc:
        raise _damaged(exc, arr, f"{len(rows)} rows from {int(np.min(rows)) if len(rows) else 0}") or exc


def read_pairs(group: zarr.Group, name: str, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
    """``group[name][rows[i], views[i]]`` for every i, ``[n, ...]``: per row block, only the chunks of the views asked
    for there (``embeddings`` is chunked one view deep), and no ``[n, V, ...]`` array on the way."""
    arr = array(group, name)
    rows, views = np.asarray(rows, dtype=np.int64), np.asarray(views, dtype=np.int64)
    out = np.empty((len(rows), *arr.shape[2:]), dtype=arr.dtype)
    order = np.argsort(rows, kind="stable")
    blocks = rows[order] // int(arr.chunks[0])
    for picked in np.split(order, np.flatnonzero(np.diff(blocks)) + 1) if len(order) else []:
        r, r_at = np.unique(rows[picked], return_inverse=True)
        v, v_at = np.unique(views[picked], return_inverse=True)
        try:
            block = np.asarray(arr.oindex[r, v])                              # [rows, views, ...] of one row block
        except ValueError as exc:
            raise _damaged(exc, arr, f"rows {int(r[0])}-{int(r[-1])}") or exc
        out[picked] = block[r_at, v_at]
    return out


def views_in_one_chunk(arrays: Mapping[str, zarr.Array]) -> list[str]:
    """The names of the ``[rows, V, ...]`` arrays among ``arrays`` whose chunks hold several views of a row (a cache or
    bank made before each view had chunks of its own): a reader of one view, a student epoch, reads them all."""
    return [name for name, arr in arrays.items() if arr.ndim > 1 and arr.shape[1] > 1 and int(arr.chunks[1]) > 1]


def attributes(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """A node's attributes as plain JSON data (typed ``Any`` per key, as they are user data)."""
    return dict(node.attrs)


def fingerprint(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the fingerprint fields."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def diff_fields(stored: Mapping[str, Any], wanted: Mapping[str, Any], holder: str = "cache", *,
                common: bool = False) -> list[str]:
    """Names of the fingerprint fields that differ, with both values, e.g. ``teacher.arch: cache has 'resnet18',
    config wants 'resnet50'`` (``holder``: what holds ``stored``; ``common``: only fields both have, as when
    ``stored`` was written by a version with fewer or other fields)."""
    a, b = _flatten(stored), _flatten(wanted)
    out = []
    for name in sorted(set(a) & set(b) if common else set(a) | set(b)):
        if a.get(name) != b.get(name):
            va, vb = a.get(name, "<absent>"), b.get(name, "<absent>")
            if isinstance(va, list) and isinstance(vb, list) and len(va) > 4:
                va, vb = f"{len(va)} entries", f"{len(vb)} entries" if len(va) != len(vb) else "other entries"
            out.append(f"{name}: {holder} has {va!r}, config wants {vb!r}")
    return out


Mode = Literal["r", "r+", "a", "w", "w-"]


def _store(url: str) -> str:
    """What zarr opens for ``url``: a local path as a path (zarr's local store: a ``file://`` URL would go through
    fsspec, which does not make the directories a new cache needs), anything else as its URL."""
    return url if is_url(url) else local_path(url)


def open_group(url: str, mode: Mode = "r") -> zarr.Group:
    check_protocol(url, "cache")
    try:
        return zarr.open_group(_store(url), mode=mode, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise SeedError(f"no cache at {url}") from exc
    except (zarr.errors.ContainsArrayError, zarr.errors.NodeTypeValidationError) as exc:
        raise SeedError(f"{url} is an array (one of a cache's, say), not a cache: expected the cache's directory, "
                        "the one that holds embeddings/ and progress/") from exc
    except ValueError as exc:  # metadata that is not JSON (a cut copy), or not zarr's
        raise SeedError(f"{url}: its zarr.json cannot be read as Zarr metadata ({str(exc).splitlines()[0]}); "
                        "the cache is damaged (a cut copy?)") from None


def exists(url: str) -> bool:
    try:
        zarr.open_group(_store(url), mode="r", use_consolidated=False)
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False


def create(url: str, *, fields: dict[str, Any], capacity: int, n_shards: int, views: int, dim: int,
           attrs: dict[str, Any], overwrite: bool = False, wait_s: float = 120.0) -> zarr.Group:
    """Create the cache (or open it when one with the same fingerprint exists) and return the group.

    A cache with another fingerprint is refused, naming the differing fields, unless ``overwrite``.
    Safe to call from several processes at once (several ``seed teacher --shards`` starting together):
    on a file system the one holding the creation lock (``_creation_lock``) lays out the arrays and the
    others wait for it; every one of them then works with the attributes stored (the forward's batch size
    and threads among them), not with its own. A creator killed while laying out leaves a cache whose
    status is still ``creating`` (no shard writer starts before the arrays exist, so it holds no data): on a
    file system the next caller gets the lock the dead creator's kernel released and lays it out again; on
    an object store, where nothing tells a dead creator from a slow one, callers wait ``wait_s`` and say so.
    """
    N = n_shards * capacity
    deadline = time.monotonic() + wait_s
    while True:
        status = _status(url)
        if status not in (None, "creating") and not overwrite:  # made: no lock needed (nor a writable directory)
            check_fingerprint(open_group(url, "r"), fields, url)
            return open_group(url, "r+")
        with _creation_lock(url) as lock:
            if lock != "busy":
                status = _status(url)
                if status is None or overwrite or (status == "creating" and lock == "held"):
                    if status is not None and not overwrite:  # a dead creator's: of this run, or refused
                        check_fingerprint(open_group(url, "r"), fields, url)
                    try:
                        return _lay_out(url, status is not None or overwrite, capacity, views, dim, N, attributes={
                            "format": FORMAT, "format_version": FORMAT_VERSION, "status": "creating",
                            "fingerprint": fingerprint(fields), "fingerprint_fields": fields, "capacity": capacity,
                            "n_shards": n_shards, "N": N, "V": views, "D": dim, "P": P,
                            "augment_columns": list(COLUMNS),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "revision": uuid.uuid4().hex,  # a new one whenever the rows change (``reopen_shards``)
                            **attrs,
                        })
                    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
                        pass  # an object store: made by another process meanwhile; wait for its arrays
                elif status != "creating":
                    continue  # made meanwhile: opened at the top of the loop
        if time.monotonic() > deadline:
            raise SeedError(f"{url}: cache still being created by another process after {wait_s:.0f} s (if none is "
                              "running, as when a creator on object storage crashed, use --overwrite)")
        time.sleep(0.2)


def _status(url: str) -> str | None:
    """The cache's ``status`` attribute; None when there is no cache at ``url``."""
    return attributes(open_group(url, "r")).get("status") if exists(url) else None


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[Literal["held", "busy", "none"]]:
    """Whether this process may lay out the cache at ``url``. On a file system: ``held`` while it holds an
    exclusive ``flock`` on ``.<name>.creating`` beside the cache, ``busy`` while another process does. The
    kernel releases a lock when its holder dies, so a creator killed part-way never blocks the next run. The
    file is removed once the cache's arrays exist; a lock taken on a file removed meanwhile is retried, so
    two holders never both see a cache without its arrays. An object store has no locks (``none``): every
    caller tries, and the arrays' creation tells the late ones (``ContainsGroupError``)."""
    if is_url(url):
        yield "none"
        return
    path = Path(local_path(url))
    claim = path.parent / f".{path.name}.creating"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(claim, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield "busy"
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(claim).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # removed (and perhaps made again) by a holder that finished: look again
            yield "busy"
            return
        try:
            yield "held"
        finally:
            if _status(url) not in (None, "creating"):
                claim.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def _lay_out(url: str, overwrite: bool, capacity: int, views: int, dim: int, N: int,
             attributes: dict[str, Any]) -> zarr.Group:
    """The cache's group and its empty arrays; its status ``incomplete`` once they all exist."""
    group = zarr.open_group(_store(url), mode="w" if overwrite else "w-", use_consolidated=False,
                            attributes=attributes)

    def arr(name: str, shape: tuple[int, ...], dtype: Any, fill: Any, dims: tuple[str, ...],
            chunks: tuple[int, ...] | None = None) -> None:
        group.create_array(name, shape=shape, dtype=dtype, chunks=chunks or (capacity, *shape[1:]), fill_value=fill,
                           compressors=checksummed(np.float16 if dtype == "float16" else np.uint8),
                           dimension_names=dims)

    # floats barely compress; one view a chunk: what a student epoch reads of a row block
    arr("embeddings", (N, views, dim), "float16", np.nan, ("row", "view", "dim"), chunks=(capacity, 1, dim))
    arr("augment", (N, views, P), "float32", np.nan, ("row", "view", "param"))
    arr("keys", (N,), str, "", ("row",))
    arr("labels", (N,), "int32", -1, ("row",))
    arr("valid", (N,), "bool", False, ("row",))
    arr("sizes", (N, 2), "int32", 0, ("row", "hw"))
    # The records' parent, made now: a record is then one atomic write of its zarr.json. Made with the first
    # record instead, the parent's zarr.json is written beside the child's, and a process killed between
    # the two leaves a record that no reader sees (the shard is redone, but a record that exists would look lost).
    group.create_group("progress")
    group.attrs["status"] = "incomplete"  # the arrays exist: shard writers may start
    return group


_warned: set[str] = set()


def check_format(group: zarr.Group, url: str) -> None:
    if attributes(group).get("format") != FORMAT:
        raise SeedError(f"{url} is not a seed teacher cache (format={attributes(group).get('format')!r})")
    version = attributes(group).get("format_version")
    if version not in READABLE_VERSIONS:
        raise SeedError(f"{url}: cache format version {version} is not supported (this seed reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}); rebuild it with seed teacher --overwrite")
    if version != FORMAT_VERSION and url not in _warned:
        _warned.add(url)
        log.warning("%s: cache format %s has no chunk checksums, so damage in a copy cannot be detected; "
                    "rebuild it with seed teacher --overwrite to get them", url, version)


def check_fingerprint(group: zarr.Group, fields: Mapping[str, Any], url: str) -> None:
    check_format(group, url)
    if attributes(group).get("fingerprint") != fingerprint(fields):
        diffs = diff_fields(attributes(group).get("fingerprint_fields", {}), fields)
        raise SeedError(f"{url} was made with a different configuration; refusing to mix teachers' outputs. "
                        f"Differences: {'; '.join(diffs) or 'unknown fields'}. Use --overwrite or another cache name.")


def progress_name(shard: int) -> str:
    return f"progress/{shard:06d}"


def shard_record(group: zarr.Group, shard: int) -> dict[str, Any] | None:
    """The completion record of a shard, or None when it is not done (or its record does not parse: a host that
    crashed as it was written can leave it empty; the shard is then made again, which rewrites it)."""
    try:
        node = group[progress_name(shard)]
    except KeyError:
        return None
    except ValueError as exc:
        log.warning("the completion record of shard %d (%s) does not parse (%s): the shard counts as not done",
                    shard, progress_name(shard), str(exc).splitlines()[0])
        return None
    attrs = dict(node.attrs)
    return attrs if attrs.get("done") else None


def listed_records(url: str) -> set[int]:
    """The shards with a record directory under the cache at ``url``, from one listing of ``progress/`` (no record
    read: a record may still be on its way, ``shard_record`` says). For polling a cache others are writing: a
    thousand records cost one request, not a thousand."""
    fs, path = filesystem(url)
    try:
        names = fs.ls(f"{path.rstrip('/')}/progress", detail=False)
    except FileNotFoundError:
        return set()
    last = (str(n).rstrip("/").rsplit("/", 1)[-1] for n in names)
    return {int(n) for n in last if n.isdigit()}


def records(group: zarr.Group, count: int | None = None) -> dict[int, dict[str, Any]]:
    """Every done shard's completion record under ``group``'s ``progress/``, by shard, each read once (``count``:
    how many shards there can be, the cache's ``n_shards`` by default; a bank's target blocks are recorded the
    same way). A record that does not parse counts as not done (``shard_record``)."""
    if "progress" not in group:
        return {}
    progress = subgroup(group, "progress")
    try:
        found = {int(name): attributes(node) for name, node in progress.groups()}
        return {s: found[s] for s in sorted(found) if found[s].get("done")}
    except ValueError:  # a record that does not parse: read them one by one, that one counted as not done
        n = int(attributes(group)["n_shards"]) if count is None else count
        return {s: record for s in range(n) if (record := shard_record(group, s)) is not None}


def done_shards(group: zarr.Group) -> list[int]:
    return list(records(group))


def write_shard(group: zarr.Group, shard: int, data: Mapping[str, np.ndarray], record: dict[str, Any]) -> None:
    """Write one shard's rows (each array's chunks of them, exactly), then its completion record, to which the
    seconds the rows took are added (``write_seconds``)."""
    cap = int(attributes(group)["capacity"])
    rows = slice(shard * cap, (shard + 1) * cap)
    t0 = time.perf_counter()
    for name in ARRAYS:
        array(group, name)[rows] = data[name]
    record["write_seconds"] = round(time.perf_counter() - t0, 4)
    for attempt in range(3):  # the coordinator may remove the record's empty directory as this recreates it
        try:
            group.create_group(progress_name(shard), overwrite=True, attributes={**record, "done": True})
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def finalize(group: zarr.Group, url: str) -> dict[str, Any]:
    """Mark the cache complete once every shard has its record; returns the totals written."""
    n_shards = int(attributes(group)["n_shards"])
    records = [shard_record(group, s) for s in range(n_shards)]
    missing = [s for s, r in enumerate(records) if r is None]
    if missing:
        raise SeedError(f"{url}: {len(missing)} of {n_shards} shards not done (first: {missing[:5]}); run the teacher stage again")
    done = [r for r in records if r is not None]
    totals = {
        "samples": sum(r["samples"] for r in done),
        "valid": sum(r["valid"] for r in done),
        "skipped": sum(len(r["skipped"]) for r in done),
        "teacher_forwards": sum(r["teacher_forwards"] for r in done),
        "teacher_seconds": round(sum(r["teacher_seconds"] for r in done), 3),
        "stage_seconds": round(sum(r["seconds"] for r in done), 3),
        # the stage waiting for its input: within the shards' seconds, and before each shard's first batch
        # (outside them); None when a shard was written before the records had them
        "input_wait_seconds": (round(sum(r["input_wait_seconds"] + r["first_batch_wait_seconds"] for r in done), 3)
                               if all("first_batch_wait_seconds" in r for r in done) else None),
        "first_batch_wait_seconds": (round(sum(r["first_batch_wait_seconds"] for r in done), 3)
                                     if all("first_batch_wait_seconds" in r for r in done) else None),
        # the rows' writes, each beside the next shard's work (None when a shard was written before records had it)
        "write_seconds": (round(sum(r["write_seconds"] for r in done), 3) if all("write_seconds" in r for r in done)
                          else None),
        "damaged_shards": [s for s, r in enumerate(records) if r is not None and "damaged" in r],
    }
    first = next(({**k, "url": r.get("url", "?")} for r in done for k in r["skipped"]), None)
    said = f"first: {first['key']!r} in {first.get('url', '?')}: {first['reason']}" if first is not None else \
        "the damaged shards kept none"
    if not totals["valid"]:
        if attributes(group).get("status") == "complete":  # marked so by a version that allowed it
            group.update_attributes({"status": "incomplete"})
        raise SeedError(f"{url}: none of the {totals['samples']} samples has an image that reads ({said}); the "
                        "cache stays incomplete: check data.train (its shards' members), then run the teacher stage "
                        "again with --overwrite (seed teacher)")
    if first is not None:
        log.warning("%s: %d of %d samples skipped, their images unreadable (%s); seed inspect lists them", url,
                    totals["skipped"], totals["samples"], said)
    if totals["damaged_shards"]:
        log.warning("%s: complete with %d damaged shard(s) kept by data.damaged=keep (%s): seed inspect lists what "
                    "was lost", url, len(totals["damaged_shards"]), ", ".join(map(str, totals["damaged_shards"][:10])))
    group.update_attributes({"status": "complete", "totals": totals,
                             "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return totals


def open_complete(url: str, mode: Mode = "r") -> zarr.Group:
    """Open a complete cache, refusing one that is not (naming what is missing)."""
    group = open_group(url, mode)
    check_format(group, url)
    if attributes(group).get("status") != "complete":
        n = int(attributes(group).get("n_shards", 0))
        raise SeedError(f"{url}: cache is incomplete ({len(done_shards(group))} of {n} shards done); "
                        "finish it with the teacher stage first")
    return group


def damaged_shards(group: zarr.Group, done: dict[int, dict[str, Any]] | None = None) -> dict[int, dict[str, Any]]:
    """The shards recorded as damaged (kept by ``data.damaged=keep``): what was read and what was lost
    (``done``: the done shards' records, when already read)."""
    done = records(group) if done is None else done
    return {s: r["damaged"] for s, r in done.items() if "damaged" in r}


STALE_PARTIAL_S = 60.0  # a live writer's temporary metadata file exists for milliseconds


def remove_stale_partials(url: str, older_than: float = STALE_PARTIAL_S) -> int:
    """Remove the metadata a killed writer left half-written: zarr's local store writes ``zarr.<id>.partial``
    and renames it into place, so a kill between the two leaves the temporary file, and zarr warns about it
    ("not recognized as a component of a Zarr hierarchy") whenever its group is listed; a data chunk's write
    (``<chunk>.<id>.partial``) leaves one too, not warned of but a chunk's size on disk. Every process that
    writes a shard's record makes such files for a moment in the root and ``progress`` too (zarr's check that the
    parent groups exist writes one and finds the target there), so those in the root, in ``progress`` and in the
    shard directories are removed only when older than ``older_than`` seconds, by the clock that stamps the
    cache's files (a file server's, on a network file system), with the shard directories that leaves empty (a
    record never written: the shard is redone; a worker whose record write meets its directory gone writes it
    again, ``write_shard``). A file that cannot be removed is named in a warning and left. Local caches only
    (an object store's write is one PUT). Returns the files removed.
    """
    if is_url(url):
        return 0
    root, removed, left = Path(local_path(url)), 0, []
    now, emptied = _files_clock(root), set()
    chunks = [*root.glob("*/c/**/*.partial"), *root.glob("bank*/*/c/**/*.partial")]  # not warned of, but disk
    for path in [*root.glob("zarr.*.partial"), *root.glob("progress/zarr.*.partial"),
                 *root.glob("progress/*/zarr.*.partial"), *chunks]:
        try:
            if now - path.stat().st_mtime > older_than:
                path.unlink()
                removed += 1
                emptied.add(path.parent)
        except FileNotFoundError:  # its writer's rename took it, or another run removed it
            pass
        except OSError as exc:
            left.append(f"{path.relative_to(root)} ({exc.strerror or exc})")
    for shard in root.glob("progress/[0-9]*"):  # the shards' directories
        with contextlib.suppress(OSError):  # not empty, or gone meanwhile
            if shard.is_dir() and (shard in emptied or now - shard.stat().st_mtime > older_than) \
                    and not any(shard.iterdir()):
                shard.rmdir()
    if removed:
        log.warning("%s: removed %d half-written file(s) a killed run left", url, removed)
    if left:
        log.warning("%s: could not remove half-written files a killed run left: %s; zarr warns about the metadata "
                    "ones until they are removed", url, ", ".join(left))
    return removed


def _files_clock(root: Path) -> float:
    """Now, as the file system under ``root`` stamps a new file (the local clock if it cannot be asked)."""
    try:
        # named as zarr's temporary files are, so that a kill during its moment leaves what this function removes
        with tempfile.NamedTemporaryFile(dir=root, prefix="zarr.seed-clock-", suffix=".partial") as probe:
            return os.fstat(probe.fileno()).st_mtime
    except OSError:
        return time.time()


def reopen_shards(group: zarr.Group, shards: list[int], why: str) -> None:
    """Take ``shards``' completion records back, so the teacher stage embeds them again (a damaged shard
    whose file was repaired), and give the cache a new ``revision``: a bank made from the old rows names
    the revision (``seed.bank_store.fields``), as students' checkpoints do, and is no longer current. The
    history (each shard's damage record) goes to ``reopened``. The coordinator's call only: it writes the root
    attributes.

    The root attributes first: killed before the records are gone, the next run finds the same shards
    and reopens them again, without a second history entry for the same record (its ``finished_at``).
    """
    if not shards:
        return
    history = list(attributes(group).get("reopened", []))
    seen = {(h["shard"], h.get("finished_at")) for h in history}
    for s in shards:
        record = shard_record(group, s) or {}
        if (s, record.get("finished_at")) not in seen:
            history.append({"shard": s, "why": why, "damaged": record.get("damaged"),
                            "finished_at": record.get("finished_at"),
                            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    group.update_attributes({"status": "incomplete", "revision": uuid.uuid4().hex, "reopened": history})
    for s in shards:
        with contextlib.suppress(KeyError):  # gone already
            del group[progress_name(s)]


def skipped_samples(group: zarr.Group, done: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The samples the done shards skipped (``done``: their records, when already read)."""
    done = records(group) if done is None else done
    return [{"shard": s, **item} for s, record in done.items() for item in record.get("skipped", [])]


@dataclasses.dataclass(frozen=True)
class LabelMix:
    """How the labels spread over the input shards: the share of the most common label in the median shard
    and over the whole set, the number of labels, and the mean images per shard (valid rows, known labels)."""

    median_shard: float
    overall: float
    labels: int
    per_shard: float

    @property
    def sorted_by_class(self) -> bool:
        """In the median shard one label holds over half the images and over three times its share of the set.

        Training reads shards one after another through a shuffle buffer of a few shards' images, so a batch
        then holds the classes of those few shards."""
        return self.median_shard > max(0.5, 3 * self.overall)


def label_mix(labels: np.ndarray, valid: np.ndarray) -> LabelMix | None:
    """``LabelMix`` of ``[shards, capacity]`` rows; None for fewer than three labels known (nothing to tell)."""
    known = valid & (labels >= 0)
    _, overall = np.unique(labels[known], return_counts=True)
    shares = [np.unique(row[ok], return_counts=True)[1].max() / ok.sum() for row, ok in zip(labels, known) if ok.sum() >= 10]
    if len(overall) < 3 or not shares:
        return None
    return LabelMix(float(np.median(shares)), float(overall.max() / overall.sum()), len(overall),
                    float(known.sum() / np.count_nonzero(known.any(axis=1))))


def shard_mix_note(mix: LabelMix | None, shuffle_buffer: int, setting: str = "train.loader.shuffle_buffer") -> str | None:
    """What to tell a user whose input shards look sorted by class (``LabelMix.sorted_by_class``), else
    None: training reads the shards one after another, in a seeded order, through a shuffle buffer of
    ``shuffle_buffer`` images (the config's ``setting``), so a batch can only mix the classes of the few
    shards in the buffer."""
    if mix is None or not mix.sorted_by_class:
        return None
    return (f"the input shards look sorted by class: in the median shard {mix.median_shard:.0%} of the images share "
            f"one label (over all shards, the most common label has {mix.overall:.0%}). Training reads the shards one "
            f"after another through a shuffle buffer of {shuffle_buffer} images (about "
            f"{shuffle_buffer / mix.per_shard:.1f} shards), so each batch holds the few classes of those shards. Write "
            f"the shards in random order (`seed shards imagefolder` does, by default), or raise {setting}")


def shard_label_mix(group: zarr.Group) -> LabelMix | None:
    """``label_mix`` of a cache's rows."""
    capacity = int(attributes(group)["capacity"])
    return label_mix(read(group, "labels").reshape(-1, capacity), read(group, "valid").reshape(-1, capacity))

