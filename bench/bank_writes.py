"""The bank stage at ImageNet widths with its targets written behind the computation and before it.

    python bench/bank_writes.py [--scratch DIR] [--shards 56] [--capacity 1280] [--views 2] [--dim 2048]
                                [--bank 65536] [--topk 4096] [--rounds 2]

A complete teacher cache of random unit embeddings (``bench.student_reads.build_cache``: what is timed is
the targets' computation and their writes, not their values), made once per scratch directory. Then the
bank stage (``pipeline.bank.run``, index ``torch`` on ``cache.device``: CUDA when present) in fresh
processes, writes behind and before taking turns, ``--rounds`` times each: the stage's seconds, the
targets' computation, the writes' own seconds and the computation's wait for them (the smaller of the builds). The defaults, for a GPU,
are ImageNet's shapes but V = 2 (1,280 rows a shard, D = 2,048, K = 65,536 distinct images, so 56 shards;
top-k 4,096: 62 MiB of targets a shard, a quarter of ImageNet's at V = 8, with the same computation per view).
On this machine's CPU use small ones (``--shards 4 --capacity 1100 --views 2 --dim 128 --bank 4096 --topk 256``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zarr  # noqa: E402

from bench.common import child, machine, peak_rss_mb, storage  # noqa: E402
from bench.student_reads import build_cache  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from seed.config import load_config  # noqa: E402


def side_by_side(build: Callable[[bool], dict[str, Any]], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """``build(behind)`` (a bank build's figures) ``rounds`` times with the writes behind and before, taking turns."""
    runs: dict[str, list[dict[str, Any]]] = {"behind": [], "before": []}
    for _ in range(rounds):
        for mode in runs:
            runs[mode].append(build(mode == "behind"))
    return runs


def table_rows(runs: dict[str, list[dict[str, Any]]], lead: str = "") -> list[str]:
    """Markdown rows of ``side_by_side``'s builds (each stage's seconds; the other columns the smaller of the
    builds, peak RSS the larger), then behind / before of their best stage times; ``lead``: cells before them."""
    rows = []
    for mode, rs in runs.items():
        each = " / ".join(f"{r['stage_s']:.1f}" for r in rs)
        rows.append(f"| {lead}{mode} the next block | {each} | {min(r['targets_s'] for r in rs):.1f} "
                    f"| {min(r['write_s'] for r in rs):.1f} | {min(r['write_wait_s'] for r in rs):.1f} "
                    f"| {max(r['rss'] for r in rs):.0f} |")
    ratio = min(r["stage_s"] for r in runs["behind"]) / min(r["stage_s"] for r in runs["before"])
    return [*rows, f"| {lead}behind / before | {ratio:.2f} | | | | |"]


TABLE_HEAD = "| writes | stage s (each) | targets s | writes s | waited for writes s | peak RSS (MB) |"


def run_child(root: Path, name: str, K: int, k: int, behind: bool) -> None:
    """One bank build in this (fresh) process; its figures as one JSON line."""
    cfg = load_config(None, [f"cache.name={name}", f"bank.size={K}", f"bank.topk={k}", "bank.index=torch",
                             "bank.tau_t=0.05"])
    st = storage(root)
    group = zarr.open_group(st.cache_url(name), mode="r+")
    if "bank" in group:                                                      # measure a build, never a skip
        del group["bank"]
    t = time.perf_counter()
    s = bank_stage.run(cfg, st, progress=False, write_behind=behind).summary
    print(json.dumps({"stage_s": round(time.perf_counter() - t, 2), "targets_s": s["targets_seconds"],
                      "write_s": s["write_seconds"], "write_wait_s": s["write_wait_seconds"], "device": s["device"],
                      "views": s["views"], "rss": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--shards", type=int, default=56)
    parser.add_argument("--capacity", type=int, default=1280)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--bank", type=int, default=65536)
    parser.add_argument("--topk", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=5, metavar=("ROOT", "NAME", "K", "TOPK", "BEHIND"))
    a = parser.parse_args()
    if a.child:
        run_child(Path(a.child[0]), a.child[1], int(a.child[2]), int(a.child[3]), a.child[4] == "1")
        return
    root = Path(a.scratch or tempfile.mkdtemp(prefix="seed-bank-writes-")).absolute()
    name = f"bank-writes-{a.shards}x{a.capacity}-v{a.views}-d{a.dim}"
    url = storage(root).cache_url(name)
    if not Path(url).exists() or zarr.open_group(url, mode="r").attrs.get("status") != "complete":
        t = time.perf_counter()
        build_cache(url, a.shards, a.capacity, a.views, a.dim)
        print(f"cache made in {time.perf_counter() - t:.0f} s", flush=True)
    block_mb = a.capacity * a.views * a.topk * 6 / 2**20
    print(f"machine: {machine()}; {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print(f"cache: {a.shards} shards x {a.capacity} rows, V = {a.views}, D = {a.dim}; bank K = {a.bank}, top-k "
          f"{a.topk} ({block_mb:.0f} MiB of targets a shard, raw), index torch; {a.rounds} builds of each\n")
    runs = side_by_side(lambda behind: json.loads(child(__file__, "--child", str(root), name, str(a.bank), str(a.topk),
                                                        "1" if behind else "0")), a.rounds)
    print(f"device: {runs['behind'][0]['device']}, {runs['behind'][0]['views']} views; cache {url}\n")
    print("\n".join([TABLE_HEAD, "|---|---|---|---|---|---|", *table_rows(runs)]))


if __name__ == "__main__":
    main()
