"""Reading shards: the tar reader of seed against tarfile's stream reader, per sample, in one process.

    python bench/shard_read.py [--scratch DIR] [--n 4096] [--rounds 5]
    python bench/shard_read.py --describe [--scratch DIR] [--n 4096] [--rounds 3]

ImageNet-shaped shards (``bench.common.jpeg_shards``: ``KEY.jpg`` + ``KEY.cls``, 256 samples per shard,
made once under ``--scratch``), and the same samples written again by webdataset's ``TarWriter`` (a pax
header before every member), read from the page cache: ``seed.shards._tarfile_members`` (tarfile in
stream mode, how every shard was read before; still how compressed ones are), ``_tar_members`` (the
plain-tar header loop for uncompressed shards), ``iter_shard`` (members grouped into samples, labels
parsed) and ``count_samples`` (the same, seeking over the images' data). Medians of ``--rounds`` passes, the
readers alternating; microseconds per sample, and the bytes a pass had from read calls (``/proc/self/io``).
``--describe``: ``seed shards describe`` of webdataset's copies (no ``_info.json``) with 1 and 8 threads,
against the scan a stage makes without it (``count_samples``), the same rounds taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import jpeg_shards, machine, rchar  # noqa: E402
from seed.shards import _tar_members, _tarfile_members, count_samples, iter_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default=None, help="where the shards are made (default: a new temporary directory)")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--describe", action="store_true", help="seed shards describe with 1 and 8 threads")
    args = parser.parse_args()
    root = Path(args.scratch or tempfile.mkdtemp(prefix="seed-shard-read-"))
    ours = sorted(str(p) for p in jpeg_shards(root, args.n).glob("train-*.tar"))
    theirs = rewritten(ours, root / f"webdataset-{args.n}")
    if args.describe:
        describe(theirs, args.rounds)
        return

    def members(reader, urls):
        def run() -> int:
            count = 0
            for url in urls:
                with open(url, "rb") as f:
                    count += sum(1 for _ in reader(f, url))
            return count // 2                                                 # two members per sample
        return run

    readers = {}
    for label, urls in (("seed's writer", ours), ("webdataset's writer", theirs)):
        readers[(label, "tarfile stream (before; compressed shards)")] = members(_tarfile_members, urls)
        readers[(label, "seed's plain-tar reader (_tar_members)")] = members(_tar_members, urls)
        readers[(label, "iter_shard (samples, labels)")] = lambda urls=urls: sum(1 for u in urls for _ in iter_shard(u))
        readers[(label, "count_samples (seeks over the images)")] = lambda urls=urls: sum(count_samples(u) for u in urls)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in readers}
    read: dict[tuple[str, str], int] = {}
    counts = {}
    for key, fn in readers.items():                                           # warm-up: the page cache
        before = rchar()
        counts[key] = fn()
        read[key] = rchar() - before
    assert len(set(counts.values())) == 1, counts
    for _ in range(args.rounds):
        for key, fn in readers.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    n = next(iter(counts.values()))
    print(f"machine: {machine()}; {n} samples in {len(ours)} shards under {root}, median of {args.rounds} rounds\n")
    print("| shards written by | reader | us per sample | MB read per pass |\n|---|---|---|---|")
    for (label, name), ts in times.items():
        print(f"| {label} | {name} | {statistics.median(ts) / n * 1e6:.1f} | {read[(label, name)] / 1e6:.1f} |")


def describe(urls: list[str], rounds: int) -> None:
    """``describe_shards`` with 1 and 8 threads against ``count_samples`` over the same shards, taking turns."""
    from seed.shards import INFO_FILE, describe_shards

    directory = str(Path(urls[0]).parent)
    runs = {"count_samples (a stage's scan, one process)": lambda: sum(count_samples(u) for u in urls),
            **{f"seed shards describe --threads {t}": lambda t=t: describe_shards(directory, threads=t, overwrite=True)
               for t in (1, 8)}}
    for fn in runs.values():                                                    # warm-up: the page cache
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    (Path(directory) / INFO_FILE).unlink()
    n = sum(count_samples(u) for u in urls)
    print(f"machine: {machine()}; {n} samples in {len(urls)} shards (webdataset's writer) under {directory}, "
          f"median of {rounds} rounds\n")
    print("| what | seconds (each round) | us per sample |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {' / '.join(f'{t:.2f}' for t in ts)} | {statistics.median(ts) / n * 1e6:.0f} |")


def rewritten(urls: list[str], out: Path) -> list[str]:
    """The samples of ``urls`` written again by webdataset's ``TarWriter`` under ``out`` (once)."""
    import webdataset

    paths = [out / Path(u).name for u in urls]
    if not all(p.exists() for p in paths):
        out.mkdir(parents=True, exist_ok=True)
        for url, path in zip(urls, paths):
            with webdataset.TarWriter(str(path)) as writer:
                for s in iter_shard(url):
                    writer.write({"__key__": s.key, "jpg": s.image, "cls": str(s.label).encode()})
    return [str(p) for p in paths]


if __name__ == "__main__":
    main()
