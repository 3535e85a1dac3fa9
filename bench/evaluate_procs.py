"""The evaluation stage with its features extracted in one process and in N, side by side.

    python bench/evaluate_procs.py -c CONFIG [--storage storage.yaml] [--set k=v ...] [--procs 1 2] [--rounds 2]

Runs ``pipeline.evaluate.run`` on an existing run (a cache and trained students: ``make demo`` leaves one;
``-c configs/demo.yaml --set teacher.checkpoint=data/runs/demo-teacher-moco/teacher.pth``) in fresh processes,
the process counts taking turns, ``--rounds`` times each, and prints per run the seconds of the whole stage and
of reading both splits' features (of N processes: from their start to the last one's end, with their start-up),
and whether every run's scores equal the first's. Each run rewrites the run's report (with the same table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402


def one(args: argparse.Namespace) -> None:
    from pipeline import evaluate
    from seed.config import load_config
    from seed.storage import load_storage

    cfg = load_config(args.config, args.overrides)
    result = evaluate.run(cfg, load_storage(args.storage), progress=False, procs=args.one)
    print(json.dumps({"seconds": result.seconds, "features": result.feature_seconds,
                      "scores": [{k: r[k] for k in ("name", "knn", "nn1", "linear")} for r in result.results]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--storage")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        one(args)
        return
    common = ["-c", args.config, *(["--storage", args.storage] if args.storage else []),
              *(x for o in args.overrides for x in ("--set", o))]
    print(f"# evaluation, features in one process and in several: {machine()}")
    print("| processes | round | stage (s) | features (s) |\n|---|---|---|---|")
    first = None
    same = True
    for r in range(args.rounds):
        for n in args.procs:
            out = subprocess.run([sys.executable, __file__, *common, "--one", str(n)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"procs {n}: exit code {out.returncode}\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            first = first or row["scores"]
            same = same and row["scores"] == first
            print(f"| {n} | {r + 1} | {row['seconds']:.1f} | {row['features']:.1f} |", flush=True)
    print(f"scores equal in every run: {same}")


if __name__ == "__main__":
    main()
