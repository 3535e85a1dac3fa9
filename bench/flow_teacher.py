"""The teacher stage as the Prefect flow runs it, against ``seed teacher`` in one process, side by side.

    python bench/flow_teacher.py [-c configs/demo.yaml] [--storage storage.yaml] [--set KEY=VALUE ...]
                                 [--rounds 3] [--layouts flow stage]

After ``make demo`` give the demo's teacher: ``--set teacher.checkpoint=data/runs/demo-teacher-moco/teacher.pth``.
Each round makes a new cache per layout (in a temporary caches root; shards and teacher as configured),
the layouts taking turns, and prints each run's views/s over the whole stage, the views/s of the teacher's
forward calls within it (``teacher_seconds`` of the shard records: not a pure forward, which would run alone)
and the share of the stage's time those calls took. Layouts:

- ``flow``: the ``seed`` flow with ``stages=["teacher"]`` on a local Prefect test server (started once);
- ``stage``: ``pipeline.teacher.run`` in this process (what ``seed teacher`` runs), automatic workers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed import cache  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.storage import load_storage  # noqa: E402

LAYOUTS = ("flow", "stage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("--storage", default=None, help="storage.yaml (default: ./storage.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    args = parser.parse_args()
    print(f"command: python {' '.join(sys.argv)}\nmachine: {machine()}\n", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in args.layouts}
    ratios: dict[str, list[float]] = {name: [] for name in args.layouts}
    with tempfile.TemporaryDirectory(prefix="seed-flow-teacher-") as tmp:
        given = load_storage(args.storage)
        storage = dataclasses.replace(given, caches=f"{tmp}/caches")
        storage_file = Path(tmp) / "storage.yaml"  # the flow reads its storage from a file
        storage_file.write_text(yaml.safe_dump({"shards": given.shards, "caches": storage.caches, "runs": given.runs,
                                                "reports": given.reports}))
        with _server() if "flow" in args.layouts else contextlib.nullcontext():
            for r in range(args.rounds):
                for name in args.layouts:
                    overrides = [*args.overrides, f"cache.name=bench-{name}-{r}"]
                    t = time.perf_counter()
                    if name == "flow":
                        from flows.seed_flow import seed

                        seed(config=str(Path(args.config).resolve()), overrides=overrides, storage=str(storage_file),
                             stages=["teacher"])
                    else:
                        teacher_stage.run(load_config(args.config, overrides), storage, progress=False)
                    wall = time.perf_counter() - t
                    totals = cache.attributes(cache.open_group(storage.cache_url(f"bench-{name}-{r}"), "r"))["totals"]
                    views, forward_s = totals["teacher_forwards"], totals["teacher_seconds"]
                    rates[name].append(views / wall)
                    ratios[name].append(forward_s / wall)
                    print(f"round {r + 1}: {name} {views} views in {wall:.1f} s = {views / wall:,.0f} views/s; "
                          f"in its forward calls {views / forward_s:,.0f} views/s, {forward_s / wall:.2f} of the time",
                          flush=True)
    print("\n| layout | views/s, median (each round) | share of the time in forward calls, median (each round) |\n"
          "|---|---|---|")
    for name in args.layouts:
        print(f"| {name} | {statistics.median(rates[name]):,.0f} ({', '.join(f'{x:,.0f}' for x in rates[name])}) "
              f"| {statistics.median(ratios[name]):.2f} ({', '.join(f'{x:.2f}' for x in ratios[name])}) |")


def _server():  # type: ignore[no-untyped-def]
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(server_startup_timeout=240)


if __name__ == "__main__":
    main()
