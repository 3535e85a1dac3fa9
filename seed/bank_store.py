"""The bank store: the instance bank and cached teacher targets, a ``bank`` sub-group of the cache.

Layout (K bank entries, N cache rows, V views, k = ``bank.topk``; rows chunked like the cache, ``indices`` and
``logp`` also one view deep, as the cache's embeddings, so a student epoch reads the one view it uses):

=============  ==========  ==========  ===============================================================
array          shape       dtype       meaning
=============  ==========  ==========  ===============================================================
ids            [K, 2]      int32       (row, view) of each bank entry in the cache
vectors        [K, D]      float16     the entry's cached teacher embedding
faiss_index    [bytes]     uint8       the serialised FAISS index (absent for ``bank.index=torch``)
indices        [N, V, k]   int32       top-k columns of D+ = [own view ; bank] (0 = own view, -1 = none)
logp           [N, V, k]   float16     their log p_T under the full distribution over D+
mass           [N, V]      float32     probability mass the top-k capture
=============  ==========  ==========  ===============================================================

Attributes: ``format_version``, ``status`` (``creating`` while the arrays are laid out, ``building`` until
every row block and the fidelity measurement are written, then ``complete``), ``fingerprint`` and ``fields`` (the cache's
fingerprint and revision plus every bank parameter that changes the stored values), ``rotation`` and the build
summary. Each input shard's row block, once written, gets a record ``progress/{shard:06d}`` (its views and
seconds): a build cut short resumes from the blocks it recorded when run again with the same parameters and
the same bank entries. The bank is derived data: one built with other parameters is deleted and rebuilt, the
teacher's arrays are never touched.

Rotating banks (``bank.rotations = R`` > 1): R disjoint banks, each with its own targets, in the
sub-groups ``bank`` (rotation 0), ``bank-1``, ..., ``bank-{R-1}`` of the same layout. A student uses
rotation ``epoch mod R``, so its negatives change every epoch, still with no teacher forward.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import zarr

from seed import cache
from seed.config import BankConfig, to_dict
from seed.errors import SeedError

FORMAT_VERSION = 2  # 2: every chunk checksummed (crc32c); 1 still opens for training
READABLE_VERSIONS = (1, 2)
NAME = "bank"
# Bank parameters that do not change the stored values (how fast, and how much is measured).
_NOT_FIELDS = ("batch_size", "kl_sample")


def fields(group: zarr.Group, b: BankConfig) -> dict[str, Any]:
    """What determines the bank and its targets: the cache's fingerprint, its revision (new with each
    cache made and each time shards are embedded again: the rows, not only the configuration) and the
    bank parameters."""
    params = {k: v for k, v in to_dict(b).items() if k not in _NOT_FIELDS}
    if params.get("rotations") == 1:
        del params["rotations"]  # one bank is what every bank was before rotations: those stay current
    a = cache.attributes(group)
    # caches made before revisions have none until their rows change: their banks stay current
    revision = {"cache_revision": a["revision"]} if "revision" in a else {}
    return {"cache_fingerprint": a["fingerprint"], **revision, **params}


# Parameters an index kind never reads, and the tail sample an exact normaliser never draws
_UNREAD = {"flat": ("ivf_lists", "nprobe", "hnsw_m", "ef_search"), "torch": ("ivf_lists", "nprobe", "hnsw_m", "ef_search"),
           "ivf": ("hnsw_m", "ef_search"), "hnsw": ("ivf_lists", "nprobe")}


def _what_counts(f: dict[str, Any]) -> dict[str, Any]:
    """``fields`` less the parameters the bank's index and normaliser do not read, the normaliser resolved
    (``auto`` is ``exact`` for flat and torch): two banks whose fields agree here hold the same targets."""
    out = {k: v for k, v in f.items() if k not in _UNREAD.get(str(f.get("index")), ())}
    if out.get("normaliser") == "auto":
        out["normaliser"] = "exact" if out.get("index") in ("flat", "torch") else "sampled"
    if out.get("normaliser") == "exact":
        out.pop("tail_samples", None)
    return out


def same_targets(stored: dict[str, Any], fingerprint: str, want: dict[str, Any]) -> bool:
    """Whether a bank stored with ``fields`` ``stored`` and ``fingerprint`` holds the targets ``want`` asks for:
    the same fingerprint, or fields differing only in what its index and normaliser do not read (changing
    ``bank.nprobe`` of a flat bank, say, rebuilt it to the same bytes)."""
    return fingerprint == cache.fingerprint(want) or (bool(stored) and _what_counts(stored) == _what_counts(want))


@dataclasses.dataclass(frozen=True)
class Bank:
    """A complete bank, read-only: its entries and the cached targets of any row block."""

    group: zarr.Group

    @property
    def fingerprint(self) -> str:
        return str(cache.attributes(self.group)["fingerprint"])

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def ids(self) -> np.ndarray:
        """``[K, 2]`` int64 (row, view) of every entry."""
        return cache.read(self.group, "ids").astype(np.int64)

    def vectors(self) -> np.ndarray:
        """``[K, D]`` float32 unit vectors (stored as float16)."""
        return cache.read(self.group, "vectors").astype(np.float32)

    def targets(self, rows: slice, view: int | None = None) -> dict[str, np.ndarray]:
        """The sparse targets of a row block: ``cols`` ``[n, V, k]`` int32 and ``logp`` ``[n, V, k]`` float16; of
        its view ``view`` alone (``[n, k]``, reading only that view's chunks) when given."""
        where = rows if view is None else (rows, view)
        return {"cols": cache.read(self.group, "indices", where), "logp": cache.read(self.group, "logp", where)}

    def mass(self, rows: slice | None = None) -> np.ndarray:
        return cache.read(self.group, "mass", rows if rows is not None else slice(None))

    def log_probs(self, rows: slice) -> np.ndarray:
        return cache.read(self.group, "logp", rows)


def node_name(rotation: int) -> str:
    """The sub-group of bank rotation ``rotation``: ``bank`` for the first (the only one when R = 1)."""
    return NAME if rotation == 0 else f"{NAME}-{rotation}"


def _has(group: zarr.Group, name: str) -> bool:
    """Whether the bank node ``name`` exists; one whose metadata does not parse is an error naming it (the bank
    stage removes such a node and makes it again: ``drop_unreadable``)."""
    try:
        return name in group
    except ValueError as exc:  # an empty or cut zarr.json: a metadata write cut short where writes are not atomic
        raise SeedError(f"{group.store_path}/{name}: the bank's metadata does not parse ({str(exc).splitlines()[0]}: "
                        "a write cut short, as by a full disk?); run the bank stage again, which makes it again") from exc


def drop_unreadable(group: zarr.Group) -> list[str]:
    """Remove the bank rotations whose metadata, or their arrays', does not parse, and return their names.

    A store whose writes are not atomic (a filesystem reached through fsspec) leaves a metadata file empty or cut
    when the disk fills as it is written; the bank is derived data, so the bank stage makes such a rotation again
    rather than stopping on it. Completion records that do not parse need no removal (``cache.records`` counts
    them as not done)."""
    removed, absent, r = [], 0, 0
    while absent < 8:  # rotations are numbered from 0; a gap of a few (a removal cut short) does not end the look
        name, r = node_name(r), r + 1
        try:
            if name not in group:
                absent += 1
                continue
            absent = 0
            node = cache.subgroup(group, name)
            _ = [array in node for array in ("ids", "vectors", "faiss_index", "indices", "logp", "mass")]
        except ValueError:
            del group[name]  # deleting a directory reads no metadata
            removed.append(name)
    return removed


def rotations(group: zarr.Group) -> int:
    """How many bank rotations the cache's bank holds (from the first's fields; 1 for older banks)."""
    if not _has(group, NAME):
        return 0
    return int(cache.attributes(cache.subgroup(group, NAME)).get("fields", {}).get("rotations", 1))


def is_complete(group: zarr.Group) -> bool:
    return _has(group, NAME) and all(
        _has(group, node_name(r)) and cache.subgroup(group, node_name(r)).attrs.get("status") == "complete"
        for r in range(rotations(group)))


def open_bank(url: str, expect: BankConfig | None = None) -> tuple[zarr.Group, Bank]:
    """A complete cache and its complete bank (checked against ``expect`` when given), read-only; with
    rotating banks, the first (``open_banks`` gives them all)."""
    group, banks = open_banks(url, expect)
    return group, banks[0]


def open_banks(url: str, expect: BankConfig | None = None) -> tuple[zarr.Group, list[Bank]]:
    """A complete cache and every rotation of its complete bank (checked against ``expect`` when given)."""
    group = cache.open_complete(url)
    if not _has(group, NAME):
        raise SeedError(f"{url}: no bank yet; run the bank stage (seed bank) first")
    banks = []
    for r in range(rotations(group)):
        if not _has(group, node_name(r)):
            raise SeedError(f"{url}: bank rotation {r} is missing; run the bank stage again")
        node = cache.subgroup(group, node_name(r))
        a = cache.attributes(node)
        if a.get("format_version") not in READABLE_VERSIONS:
            raise SeedError(f"{url}: bank format version {a.get('format_version')} is not supported (this seed "
                            f"reads {', '.join(map(str, READABLE_VERSIONS))}); run the bank stage again to rebuild it")
        if a.get("status") != "complete":
            raise SeedError(f"{url}: the bank is incomplete (status {a.get('status')!r}); run the bank stage again")
        if expect is not None and not same_targets(a.get("fields", {}), a["fingerprint"], fields(group, expect)):
            diffs = cache.diff_fields(a["fields"], fields(group, expect))
            raise SeedError(f"{url}: the bank was built with other parameters: {'; '.join(diffs)}; run the bank stage")
        banks.append(Bank(node))
    return group, banks


def current(group: zarr.Group, b: BankConfig) -> tuple[bool, str]:
    """(whether a complete bank with these parameters exists, every rotation of it, why not when not)."""
    if NAME not in group:
        return False, "no bank"
    want = fields(group, b)
    for r in range(b.rotations):
        if node_name(r) not in group:
            return False, f"rotation {r} missing"
        old = cache.attributes(cache.subgroup(group, node_name(r)))
        if old.get("format_version") != FORMAT_VERSION:
            return False, f"format version {old.get('format_version')}"
        if old.get("status") != "complete":
            return False, "incomplete"
        if not same_targets(old.get("fields", {}), old.get("fingerprint", ""), want):
            return False, "; ".join(cache.diff_fields(old.get("fields", {}), want))
    return True, ""


def _rotation_nodes(group: zarr.Group) -> list[str]:
    return [name for name, _ in group.groups()
            if name == NAME or (name.startswith(f"{NAME}-") and name[len(NAME) + 1:].isdigit())]


def remove(group: zarr.Group) -> None:
    """Delete every rotation of the bank (before a rebuild: a stale rotation must not outlive its first)."""
    for name in _rotation_nodes(group):
        del group[name]


def resumable(group: zarr.Group, b: BankConfig, banks: list[np.ndarray]) -> bool:
    """Whether the bank in place is a build of these parameters cut short, to be resumed: its first rotations
    (at least the first) laid out, none complete, each with the targets ``b`` asks for and the entries of
    ``banks`` (the ``[K, 2]`` (row, view) arrays this build draws), no rotation beyond ``b.rotations``."""
    names = _rotation_nodes(group)
    if not names or len(names) > b.rotations or sorted(names) != sorted(node_name(r) for r in range(len(names))):
        return False
    want = fields(group, b)
    for r in range(len(names)):
        node = cache.subgroup(group, node_name(r))
        a = cache.attributes(node)
        if (a.get("format_version") != FORMAT_VERSION or a.get("status") != "building"
                or not all(name in node for name in ("ids", "indices", "logp", "mass"))
                or not same_targets(a.get("fields", {}), a.get("fingerprint", ""), want)):
            return False
        if not np.array_equal(cache.read(node, "ids").astype(np.int64), banks[r]):
            return False
    return True


def create(group: zarr.Group, b: BankConfig, ids: np.ndarray, vectors: np.ndarray,
           serialized_index: np.ndarray | None, rotation: int = 0) -> zarr.Group:
    """A new bank rotation in status ``building`` with its entries and empty targets (replacing any old one)."""
    if node_name(rotation) in group:
        del group[node_name(rotation)]
    f = fields(group, b)
    N, V, cap = (int(cache.attributes(group)[k]) for k in ("N", "V", "capacity"))
    K, D = vectors.shape
    bank = group.create_group(node_name(rotation), attributes={"format_version": FORMAT_VERSION, "status": "creating",
                                                               "fingerprint": cache.fingerprint(f), "fields": f,
                                                               "rotation": rotation})
    crc = cache.checksummed
    bank.create_array("ids", data=ids.astype(np.int32), chunks=(min(K, 1 << 16), 2), compressors=crc(np.int32))
    bank.create_array("vectors", data=vectors.astype(np.float16), chunks=(min(K, 1 << 16), D), compressors=crc(np.float16))
    if serialized_index is not None:
        bank.create_array("faiss_index", data=serialized_index, chunks=(len(serialized_index),),
                          compressors=crc(np.float16))  # opaque bytes: checksum only
    bank.create_array("indices", shape=(N, V, b.topk), dtype="int32", chunks=(cap, 1, b.topk), fill_value=-1,
                      compressors=crc(np.int32))
    bank.create_array("logp", shape=(N, V, b.topk), dtype="float16", chunks=(cap, 1, b.topk), fill_value=np.nan,
                      compressors=crc(np.float16))
    bank.create_array("mass", shape=(N, V), dtype="float32", chunks=(cap, V), fill_value=np.nan, compressors=crc(np.float32))
    bank.update_attributes({"status": "building"})  # laid out: from here on a build cut short resumes
    return bank


def write_targets(bank: zarr.Group, rows: slice, cols: np.ndarray, logp: np.ndarray, mass: np.ndarray,
                  shard: int | None = None, record: dict[str, Any] | None = None) -> None:
    """One input shard's row block of targets (each array's chunks of it, exactly), then, with ``shard``, its record
    (``record`` plus ``done`` and the seconds the arrays took, ``write_seconds``, which are also added to
    ``record``): a block is done only once all three arrays are written."""
    t0 = time.perf_counter()
    cache.array(bank, "indices")[rows] = cols
    cache.array(bank, "logp")[rows] = logp.astype(np.float16)
    cache.array(bank, "mass")[rows] = mass
    if shard is not None:
        record = record if record is not None else {}
        record["write_seconds"] = round(time.perf_counter() - t0, 4)
        bank.create_group(cache.progress_name(shard), overwrite=True, attributes={**record, "done": True})


def done_blocks(bank: zarr.Group) -> dict[int, dict[str, Any]]:
    """The records of the row blocks written so far, by input shard (as the cache's shards are recorded)."""
    mass = cache.array(bank, "mass")
    return cache.records(bank, count=-(-int(mass.shape[0]) // int(mass.chunks[0])))


def complete(bank: zarr.Group, summary: dict[str, Any]) -> None:
    """Mark the bank complete (last, after every target block)."""
    bank.update_attributes({**summary, "status": "complete"})
