"""Teacher stage throughput against the pure teacher forward, bytes per view, and peak RSS against N.

    python bench/teacher_stage.py [--scratch DIR]

For each teacher: the stage's views/s (decode + replayable augmentation + forward + Zarr writes,
measured over the whole stage) beside the forward alone on random batches of the same size,
threads and resolution, in the same process; the ratio is the figure (target >= 0.85).
Peak RSS is measured in a fresh process per N.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import child, machine, peak_rss_mb, shards, storage, teacher_checkpoint  # noqa: E402
from pipeline import teacher as stage  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.inspect import describe  # noqa: E402
from seed.teachers import load_teacher  # noqa: E402


def run_stage(root: Path, arch: str, n: int, resolution: int, views: int, batch: int) -> dict:
    data = shards(root, n)
    cfg = load_config(None, [f"data.train={data.name}/train/train-*.tar", f"teacher.arch={arch}",
                             f"teacher.checkpoint={teacher_checkpoint(root, arch)}", f"cache.views={views}",
                             f"cache.resolution={resolution}", f"cache.batch_size={batch}",
                             f"cache.name={arch}-{n}-{resolution}"])
    start = time.perf_counter()
    result = stage.run(cfg, storage(root), overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    assert result.totals is not None
    return {"views": result.totals["teacher_forwards"], "seconds": seconds, "cfg": cfg, "cache": result.cache,
            "forward_seconds": result.totals["teacher_seconds"]}


def pure_forward(cfg, batch: int, resolution: int, batches: int) -> float:
    teacher, _ = load_teacher(cfg.teacher)
    x = torch.rand(batch, 3, resolution, resolution)
    stage.embed(teacher, x, torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(batches):
        stage.embed(teacher, x, torch.device("cpu"))
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--rss-child", nargs=2, metavar=("ROOT", "N"))
    args = parser.parse_args()
    if args.rss_child:
        run_stage(Path(args.rss_child[0]), "resnet10t", int(args.rss_child[1]), 32, 4, 256)
        print(f"{peak_rss_mb():.0f}")
        return
    root = Path(args.scratch or tempfile.mkdtemp(prefix="seed-bench-"))
    print(f"machine: {machine()}")
    print("\n| teacher | resolution | views | batch | stage views/s | pure forward views/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for arch, res, n, views, batch in (("resnet10t", 32, 5000, 4, 256), ("resnet50", 224, 96, 2, 64)):
        r = run_stage(root, arch, n, res, views, batch)
        stage_rate = r["views"] / r["seconds"]
        pure = pure_forward(r["cfg"], batch, res, max(2, min(20, r["views"] // batch)))
        print(f"| {arch} | {res} | {r['views']} | {batch} | {stage_rate:.1f} | {pure:.1f} | {stage_rate / pure:.2f} |")
        if arch == "resnet10t":
            info = describe(r["cache"])
            bytes_line = (f"bytes per view: {info['bytes']['per_view']:.1f} on disk against {info['bytes']['raw_per_view']} raw "
                          f"(2 x D={info['D']} + 4 x P={info['P']}), N={info['N']}, V={info['V']}")
    print(f"\n{bytes_line}")
    print("\n| N images (V=4) | peak RSS (MB) |")
    print("|---|---|")
    for n in (2000, 4000, 8000):
        print(f"| {n} | {child(__file__, '--rss-child', str(root), str(n))} |")


if __name__ == "__main__":
    main()
