"""The ``train.loader`` data-path layouts on this machine, side by side, in the two stages that read them.

    python bench/train_layouts.py [-c configs/demo.yaml] [--storage storage.yaml] [--set KEY=VALUE ...]
                                  [--rounds 3] [--stage student | evaluate] [--layouts auto thread inline worker]

On an existing cache and bank (after ``make demo``: the demo's), once per layout and round, the layouts
taking turns; prints the seconds of each run and the median per layout. Stages:

- ``student``: ``pipeline.student.run``, one epoch of the config's students; checkpoints go to a temporary
  runs root.
- ``evaluate``: ``pipeline.evaluate.run``, the whole evaluation (the teacher, every student of the run and
  their random inits over both splits, then kNN and the probe), on a copy of the run's checkpoints in a
  temporary runs root; its reports go to a temporary reports root. After ``make demo`` give the demo's
  teacher: ``--set teacher.checkpoint=data/runs/demo-teacher-moco/teacher.pth``.

Layouts (``train.loader``):

- ``auto``: the defaults (workers and prefetch -1: ``seed.devices.data_workers`` and ``read_ahead``);
- ``thread``: no workers, one background thread composes, decodes and augments, 2 batches ahead;
- ``inline``: the same work between training steps (or forwards), in the model's own thread (prefetch 0);
- ``worker``: one worker process decodes and augments, 2 batches ahead.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from pipeline import evaluate, student  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.storage import load_storage  # noqa: E402

LAYOUTS = {"auto": (-1, -1), "thread": (0, 2), "inline": (0, 0), "worker": (1, 2)}  # (workers, prefetch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("--storage", default=None, help="storage.yaml (default: ./storage.yaml)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stage", choices=("student", "evaluate"), default="student")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as the seed commands take them")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in args.layouts}
    features: dict[str, list[float]] = {name: [] for name in args.layouts}  # evaluate: reading both splits' features
    print(f"command: python {' '.join(sys.argv)}\nmachine: {machine()}\n")
    with tempfile.TemporaryDirectory(prefix="seed-train-layouts-") as tmp:
        given = load_storage(args.storage)
        storage = dataclasses.replace(given, runs=f"{tmp}/runs", reports=f"{tmp}/reports")
        if args.stage == "evaluate":  # the run's checkpoints, so its students are evaluated; nothing written beside them
            run = load_config(args.config, args.overrides).train.run
            shutil.copytree(given.run_dir(run), storage.run_dir(run))
        for r in range(args.rounds):
            for name in args.layouts:
                workers, prefetch = LAYOUTS[name]
                layout = [*args.overrides, f"train.loader.workers={workers}", f"train.loader.prefetch={prefetch}"]
                t = time.perf_counter()
                if args.stage == "student":
                    student.run(load_config(args.config, ["train.optim.epochs=1", f"train.run=layouts-{name}-{r}",
                                                          *layout]), storage, progress=False)
                else:
                    result = evaluate.run(load_config(args.config, layout), storage, progress=False)
                    features[name].append(result.feature_seconds)
                seconds[name].append(time.perf_counter() - t)
                print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)
    if args.stage == "student":
        print("\n| layout | one epoch, median s | each round, s |\n|---|---|---|")
        for name, each in seconds.items():
            print(f"| {name} | {statistics.median(each):.1f} | {', '.join(f'{s:.1f}' for s in each)} |")
        return
    print("\n| layout | evaluation, median s | each round, s | reading features, median s | each round, s |\n"
          "|---|---|---|---|---|")
    for name, each in seconds.items():
        print(f"| {name} | {statistics.median(each):.1f} | {', '.join(f'{s:.1f}' for s in each)} "
              f"| {statistics.median(features[name]):.1f} | {', '.join(f'{s:.1f}' for s in features[name])} |")


if __name__ == "__main__":
    main()
