"""What a student epoch reads from the cache: one view per row block (chunks one view deep) against every view.

Builds a cache and bank of ImageNet-like widths in a scratch directory (random unit embeddings and random
targets: what is timed is reading and decoding chunks, not their values), then a copy whose ``embeddings``,
``indices`` and ``logp`` are chunked as caches made before 2026-11-29 were (all V views of a row block in one
chunk). For each layout, ``seed.data.CachedSource.load`` of every shard for ``--epochs`` epochs: bytes handed
out by read calls (``/proc/self/io`` ``rchar``), seconds, and the same per epoch. Both layouts are read once
before timing, so both are in the page cache: the seconds are decompression and copies, a lower bound on
reading from a disk or an object store, where the bytes are what costs. Then the bank stage's first read, the
bank entries' vectors: ``seed.cache.read_pairs`` on the new layout against how it was read before (every view
of the entries' rows from the old layout, one then picked): bytes, seconds and the peak of memory allocated
(``tracemalloc``), each path run once untimed first.

    .venv/bin/python bench/student_reads.py --shards 4 --capacity 1000 --views 8 --dim 2048 --topk 4096
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, rchar  # noqa: E402
from seed import bank_store, cache  # noqa: E402
from seed.config import BankConfig  # noqa: E402
from seed.data import CachedSource  # noqa: E402

_OLD = ("embeddings", "bank/indices", "bank/logp")  # the arrays now chunked one view deep


def build_cache(url: str, shards: int, cap: int, V: int, D: int) -> zarr.Group:
    """A complete teacher cache of ``shards`` x ``cap`` valid rows of random unit embeddings."""
    rng = np.random.default_rng(0)
    group = cache.create(url, fields={"bench": Path(url).name}, capacity=cap, n_shards=shards, views=V, dim=D, attrs={})
    for s in range(shards):
        z = rng.standard_normal((cap, V, D), dtype=np.float32)
        z /= np.linalg.norm(z, axis=-1, keepdims=True)
        cache.write_shard(group, s, {
            "embeddings": z.astype(np.float16), "augment": rng.random((cap, V, cache.P), dtype=np.float32),
            "keys": np.array([f"img-{s * cap + i:08d}" for i in range(cap)]), "labels": np.zeros(cap, np.int32),
            "valid": np.ones(cap, bool), "sizes": np.full((cap, 2), 375, np.int32)},
            {"samples": cap, "valid": cap, "skipped": [], "teacher_forwards": cap * V, "teacher_seconds": 0.0,
             "seconds": 0.0})
    cache.finalize(group, url)
    return group


def build(url: str, shards: int, cap: int, V: int, D: int, K: int, k: int) -> None:
    """A complete cache of ``shards`` x ``cap`` valid rows and a complete bank of ``K`` entries, top-``k`` targets."""
    group = build_cache(url, shards, cap, V, D)
    rng = np.random.default_rng(1)
    b = BankConfig(size=K, topk=k)
    pick = rng.choice(shards * cap * V, K, replace=False)                 # (row, view) entries
    ids = np.stack([pick // V, pick % V], axis=1)
    bank = bank_store.create(group, b, ids, rng.standard_normal((K, D)).astype(np.float16), None)
    for s in range(shards):
        rows = slice(s * cap, (s + 1) * cap)
        cols = rng.integers(0, K + 1, size=(cap, V, k), dtype=np.int32)
        logp = -np.sort(rng.exponential(3.0, size=(cap, V, k)), axis=-1).astype(np.float16)
        bank_store.write_targets(bank, rows, cols, logp, np.full((cap, V), 0.9, np.float32), shard=s)
    bank_store.complete(bank, {})


def rechunk_as_before(url: str) -> None:
    """Chunk the per-view arrays as every view of a row block in one chunk (what older caches hold)."""
    group = zarr.open_group(url, mode="r+")
    for path in _OLD:
        parent, name = (group, path) if "/" not in path else (group[path.split("/")[0]], path.split("/")[1])
        old = parent[name]
        data, attrs = old[:], dict(old.attrs)
        cap, V = old.chunks[0], old.shape[1]
        del parent[name]
        arr = parent.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(cap, V, data.shape[2]),
                                  fill_value=old.fill_value, compressors=cache.checksummed(data.dtype))
        arr[:] = data
        arr.attrs.update(attrs)


def epochs(url: str, shards: int, n: int) -> tuple[float, float]:
    """Seconds and bytes read to load every shard's row block for ``n`` epochs."""
    group = cache.open_complete(url)
    source = CachedSource(group, [bank_store.Bank(cache.subgroup(group, bank_store.NAME))], view="random", seed=0,
                          dense=False)
    source.rows(0)  # the valid column, read once per run: not what is compared
    before, t = rchar(), time.perf_counter()
    for epoch in range(n):
        for s in range(shards):
            source.load(s, epoch)
    return time.perf_counter() - t, rchar() - before


def gather(url: str, before: bool) -> tuple[float, int, int]:
    """The bank stage's first step: the bank entries' vectors (seconds, bytes read, peak bytes allocated);
    ``before``: as it was done before 2026-11-29 (every view of the entries' rows, then one picked)."""
    group = cache.open_complete(url)
    ids = cache.read(cache.subgroup(group, bank_store.NAME), "ids").astype(np.int64)

    def read() -> np.ndarray:
        if before:
            return cache.read_rows(group, "embeddings", ids[:, 0])[np.arange(len(ids)), ids[:, 1]]
        return cache.read_pairs(group, "embeddings", ids[:, 0], ids[:, 1])

    start, t = rchar(), time.perf_counter()
    vectors = read()
    seconds, nbytes = time.perf_counter() - t, rchar() - start
    assert vectors.shape == (len(ids), int(group["embeddings"].shape[2]))
    del vectors
    tracemalloc.start()                                        # again, for memory alone: it slows Python down
    read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, nbytes, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=1000)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=4096)
    ap.add_argument("--bank", type=int, default=16384, help="bank entries (not read by the students' loads)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--scratch", default=None, help="where the caches go (default: a temporary directory)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="student-reads-", dir=a.scratch))
    try:
        new, old = str(root / "per-view.zarr"), str(root / "all-views.zarr")
        t = time.perf_counter()
        build(new, a.shards, a.capacity, a.views, a.dim, a.bank, a.topk)
        shutil.copytree(new, old)
        rechunk_as_before(old)
        print(f"# {machine()}")
        print(f"# {a.shards} shards x {a.capacity} rows, V={a.views}, D={a.dim}, top-{a.topk}, K={a.bank}; built in "
              f"{time.perf_counter() - t:.0f} s")
        for url in (new, old):
            epochs(url, a.shards, 1)                                  # both in the page cache before timing
        rows = {name: epochs(url, a.shards, a.epochs) for name, url in (("one view a chunk", new),
                                                                         ("all views a chunk", old))}
        print(f"{'layout':<20}{'MB read/epoch':>15}{'s/epoch':>10}{'ms/row block':>14}")
        for name, (s, nbytes) in rows.items():
            print(f"{name:<20}{nbytes / a.epochs / 1e6:>15.1f}{s / a.epochs:>10.2f}{1e3 * s / a.epochs / a.shards:>14.1f}")
        (s_new, b_new), (s_old, b_old) = rows.values()
        print(f"ratio (all / one): bytes {b_old / b_new:.2f}x, seconds {s_old / s_new:.2f}x")
        print(f"\nbank vectors of {a.bank} entries{'':<6}{'MB read':>10}{'s':>8}{'peak MB':>10}")
        cases = (("read_pairs, one view a chunk", new, False), ("before: every view, all views a chunk", old, True))
        for _, url, before in cases:
            gather(url, before)                                        # both warm (imports, page cache) first
        for name, url, before in cases:
            s, nbytes, peak = gather(url, before)
            print(f"{name:<38}{nbytes / 1e6:>10.1f}{s:>8.2f}{peak / 1e6:>10.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
