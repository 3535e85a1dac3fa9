"""The student stage's data-path layouts on this machine, side by side: one epoch of a config's students each.

    python bench/train_layouts.py [-c configs/demo.yaml] [--storage storage.yaml] [--rounds 3]
                                  [--layouts auto thread inline worker]

Runs ``pipeline.student.run`` on an existing cache and bank (after ``make demo``: the demo's), one epoch,
once per layout and round, the layouts taking turns, and prints the seconds of each run and the median
per layout. Checkpoints go to a temporary runs root. Layouts (``train.loader``):

- ``auto``: the defaults (workers and prefetch -1: ``seed.devices.data_workers`` and ``read_ahead``);
- ``thread``: no workers, one background thread composes, decodes and augments, 2 batches ahead;
- ``inline``: the same work between training steps, in the step's own thread (prefetch 0);
- ``worker``: one worker process decodes and augments, 2 batches ahead.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from pipeline import student  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.storage import load_storage  # noqa: E402

LAYOUTS = {"auto": (-1, -1), "thread": (0, 2), "inline": (0, 0), "worker": (1, 2)}  # (workers, prefetch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("--storage", default=None, help="storage.yaml (default: ./storage.yaml)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in args.layouts}
    print(f"command: python {' '.join(sys.argv)}\nmachine: {machine()}\n")
    with tempfile.TemporaryDirectory(prefix="seed-train-layouts-") as runs:
        storage = dataclasses.replace(load_storage(args.storage), runs=runs)
        for r in range(args.rounds):
            for name in args.layouts:
                workers, prefetch = LAYOUTS[name]
                cfg = load_config(args.config, ["train.optim.epochs=1", f"train.run=layouts-{name}-{r}",
                                                f"train.loader.workers={workers}", f"train.loader.prefetch={prefetch}"])
                t = time.perf_counter()
                student.run(cfg, storage, progress=False)
                seconds[name].append(time.perf_counter() - t)
                print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)
    print("\n| layout | one epoch, median s | each round, s |\n|---|---|---|")
    for name, each in seconds.items():
        print(f"| {name} | {statistics.median(each):.1f} | {', '.join(f'{s:.1f}' for s in each)} |")


if __name__ == "__main__":
    main()
