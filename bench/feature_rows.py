"""The mini-batch probe's reads of feature rows on disk: random rows, a batch at a time.

Writes ``--n`` random float32 rows of width ``--dim`` to an unnamed file (``seed.features.FeatureWriter``, as
the evaluation does), then reads one probe epoch's batches (a seeded permutation cut into ``--batch`` rows, each
batch sorted, as ``seed.evaluate._sgd_probe`` does) four ways, in turns for ``--rounds`` rounds:

- ``pread``: a call of ``seed.features._pread_into`` per run of consecutive rows (how ``FeatureFile`` read
  them before 2026-11-29);
- ``FeatureFile``: ``rows[idx]`` as it reads now (the same reads, ``os.preadv`` in a loop that does nothing
  else);
- ``mapped``: the rows gathered by numpy from a read-only mapping of the file made for each batch (tried, not
  kept: the kernel maps the page cache around each row it faults in, all of it resident in this process
  until the mapping goes);
- ``memory``: the rows as one array (what the probe reads when the rows are held in memory).

Seconds per epoch, and for ``mapped`` the resident memory at its largest within a batch (``VmRSS`` read
before the mapping goes), less before. The file is read once first, so every way reads from the page cache
(a disk would add its own latency to every way but the last).

    .venv/bin/python bench/feature_rows.py --n 200000 --dim 512
    .venv/bin/python bench/feature_rows.py --n 50000 --dim 2048

``--probe E``: instead, the whole mini-batch probe (``seed.evaluate._sgd_probe``, ``E`` epochs, 10 classes, on the
CPU) reading each batch from the file against its rows held standardised on the device (``resident``, CUDA's
default when they fit), taking turns; on the CPU the device is this memory, so this measures what the file's
reads cost the probe, not a GPU's gather.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from seed.features import FeatureFile, FeatureWriter, _pread_into  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def pread_runs(rows: FeatureFile, idx: np.ndarray) -> np.ndarray:
    """The rows ``idx`` read one ``_pread_into`` call per run of consecutive rows (``FeatureFile`` before 2026-11-29)."""
    d = rows.shape[1]
    out = np.empty((len(idx), d), np.float32)
    breaks = (np.flatnonzero(np.diff(idx) != 1) + 1).tolist() if len(idx) else []
    for a, b in zip([0, *breaks], [*breaks, len(idx)]):
        _pread_into(rows.file.fileno(), out[a:b], int(idx[a]) * d * 4)
    return out


def mapped(rows: FeatureFile, idx: np.ndarray, peaks: list[float]) -> np.ndarray:
    """The rows ``idx`` gathered from a mapping of the file made for this batch; the resident memory while it is
    mapped goes to ``peaks``."""
    n, d = rows.shape
    mapping = mmap.mmap(rows.file.fileno(), n * d * 4, prot=mmap.PROT_READ)
    try:
        out = np.frombuffer(mapping, np.float32, count=n * d).reshape(n, d)[idx]
        peaks.append(rss_mb())
        return out
    finally:
        mapping.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scratch", default=tempfile.gettempdir(), help="directory of the unnamed feature file")
    p.add_argument("--probe", type=int, default=0, metavar="E", help="time the probe, E epochs, both ways")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    writer = FeatureWriter(args.scratch)
    for start in range(0, args.n, 10_000):
        writer.append(rng.standard_normal((min(10_000, args.n - start), args.dim), dtype=np.float32))
    rows = writer.finish([args.n], [0])
    if args.probe:
        probe(rows, rng, args)
        return
    perm = rng.permutation(args.n)
    batches = [np.sort(perm[i:i + args.batch]) for i in range(0, args.n, args.batch)]
    print(f"{machine()}; {args.n:,} rows x {args.dim} float32 ({rows.nbytes / 2**20:.0f} MiB), batches of {args.batch}, "
          f"{len(batches)} a epoch; {args.rounds} rounds", flush=True)
    for idx in batches[:len(batches) // 4]:
        assert np.array_equal(rows[idx], pread_runs(rows, idx))
    np.asarray(rows)  # into the page cache
    held: np.ndarray | None = None
    peaks: list[float] = []
    ways = {"pread": lambda idx: pread_runs(rows, idx), "FeatureFile": lambda idx: rows[idx],
            "mapped": lambda idx: mapped(rows, idx, peaks), "memory": lambda idx: held[idx]}  # type: ignore[index]
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    before = rss_mb()
    for _ in range(args.rounds):
        for name, read in ways.items():
            if name == "memory":
                held = np.asarray(rows)
            t = time.perf_counter()
            for idx in batches:
                read(idx)
            seconds[name].append(time.perf_counter() - t)
            held = None
    base = statistics.median(seconds["pread"])
    print(f"{'way':12s} {'s/epoch (median)':>17s} {'range':>15s} {'us/row':>7s} {'x pread':>8s}")
    for name, times in seconds.items():
        m = statistics.median(times)
        print(f"{name:12s} {m:17.3f} {min(times):7.3f}-{max(times):.3f} {1e6 * m / args.n:7.2f} {base / m:8.2f}")
    batch_mb = args.batch * args.dim * 4 / 2**20
    print(f"mapped: resident memory up to {max(peaks) - before:.0f} MB over the {before:.0f} MB before, within a "
          f"batch of {batch_mb:.0f} MB of rows (the file: {rows.nbytes / 2**20:.0f} MiB)")


def probe(rows: FeatureFile, rng: np.random.Generator, args: argparse.Namespace) -> None:
    import torch

    from seed.evaluate import _sgd_probe

    labels = rng.integers(0, 10, args.n)
    test = rng.standard_normal((1000, args.dim), dtype=np.float32)
    np.asarray(rows)  # into the page cache
    print(f"{machine()}; {args.n:,} rows x {args.dim} float32 ({rows.nbytes / 2**20:.0f} MiB), batches of "
          f"{args.batch}, {args.probe} epochs, 10 classes; {args.rounds} rounds", flush=True)
    seconds: dict[str, list[float]] = {"file": [], "resident": []}
    preds = {}
    for _ in range(args.rounds):
        for name in seconds:
            t = time.perf_counter()
            preds[name] = _sgd_probe(rows, labels, test, seed=0, weight_decay=1e-4, device=torch.device("cpu"),
                                     epochs=args.probe, batch_size=args.batch, resident=name == "resident")
            seconds[name].append(time.perf_counter() - t)
    base = statistics.median(seconds["file"])
    for name, times in seconds.items():
        m = statistics.median(times)
        print(f"{name:9s} {m:8.2f} s (median; {min(times):.2f}-{max(times):.2f}), {m / args.probe:.3f} s an epoch, "
              f"{base / m:.2f}x the file's")
    print(f"predictions equal: {bool(np.array_equal(preds['file'], preds['resident']))}")


if __name__ == "__main__":
    main()
