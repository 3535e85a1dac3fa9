"""The evaluation's memory and time as N grows: feature rows held in memory (a tree before the change) against
rows on local disk, scored in blocks (this tree), side by side.

    python bench/eval_memory.py [--root /tmp/seed-eval] [--n 36000 60000] [--widths 4096 4096 4096]
                                [--before .before] [--rows docs/results/eval-memory]

``--before`` is a tree of an earlier commit (``git archive 7785218 | (mkdir -p .before && tar -x -C .before)``).
Each run is a fresh interpreter importing ``seed`` from its tree: the evaluation's own path
(``seed.evaluate.extract_all`` over the first N real Fashion-MNIST training images and 5,000 test
images at 32 px, then ``score`` per encoder, as ``pipeline.evaluate`` does). The encoders are fixed random
projections of the pixels (ReLU(x W), one seed each) as wide as ``--widths``: the evaluation's cost does
not depend on what the features mean, and 4,096-d rows put 36,000 images past the full-batch probe's
threshold, so the Adam probe and the blocked kNN index run as they would at ImageNet's size. The trees take
turns at each N. Each finished run is saved as a small JSON file under ``--rows`` and not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = 5_000  # test images (the queries): the first five test shards


def probe(tree: str, root: str, n: int, widths: list[int]) -> dict:
    """One run, in this (fresh) interpreter, with ``seed`` imported from ``tree``."""
    sys.path.insert(0, tree)
    import numpy as np
    import torch

    from seed.evaluate import extract_all, score
    from seed.shards import expand_urls

    def hwm_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    device = torch.device("cpu")
    encoders = {}
    for i, d in enumerate(widths):
        w = torch.randn(3 * 32 * 32, d, generator=torch.Generator().manual_seed(i)) / (3 * 32 * 32) ** 0.5
        encoders[f"proj{i}"] = (lambda x, w=w: torch.relu(x.flatten(1) @ w))
    train = expand_urls(f"{root}/train/train-{{000000..{n // 1000 - 1:06d}}}.tar")
    test = expand_urls(f"{root}/test/test-{{000000..{TEST // 1000 - 1:06d}}}.tar")
    start = hwm_mb()
    t0 = time.perf_counter()
    tr = extract_all(encoders, train, 32, device)
    te = extract_all(encoders, test, 32, device)
    extract_s = time.perf_counter() - t0
    after_extract = hwm_mb()
    rows = []
    for name in encoders:
        t = time.perf_counter()
        s = score(tr.features.pop(name), tr.labels, te.features.pop(name), te.labels)
        rows.append({"encoder": name, **s.as_dict(), "seconds": round(time.perf_counter() - t, 1)})
    assert tr.n == n and te.n == TEST, (tr.n, te.n)
    return {"n": n, "widths": widths, "extract_s": round(extract_s, 1), "score_s": round(sum(r["seconds"] for r in rows), 1),
            "start_mb": round(start), "peak_after_extract_mb": round(after_extract), "peak_mb": round(hwm_mb()),
            "scores": rows, "features_gb": round((n + TEST) * sum(widths) * 4 / 1e9, 2),
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/seed-eval", help="scratch directory for the shards (made once)")
    ap.add_argument("--n", type=int, nargs="+", default=[36_000, 60_000], help="training images (multiples of 1,000)")
    ap.add_argument("--widths", type=int, nargs="+", default=[4096, 4096, 4096], help="feature width of each encoder")
    ap.add_argument("--before", default=None, help="a tree of the commit before the change, run beside this one")
    ap.add_argument("--rows", default=str(ROOT / "docs/results/eval-memory"), help="where each finished run is saved")
    ap.add_argument("--plot", default=str(ROOT / "docs/eval-memory.png"), help="peak RSS against N, from the rows")
    ap.add_argument("--probe", nargs=3, metavar=("TREE", "SHARDS", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], args.probe[1], int(args.probe[2]), args.widths)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.common import machine, shards

    data = shards(Path(args.root), 60_000)  # the first 60,000 train images in shards of 1,000, and the test split
    trees = ([("before", str(Path(args.before).resolve()))] if args.before else []) + [("after", str(ROOT))]
    out = Path(args.rows)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# {machine()}; features on disk in {os.environ.get('TMPDIR', '/tmp')}")
    print("| tree | N | widths | features, GB | peak RSS, MB (after extraction / whole run) | extract, s | score, s | "
          "kNN / 1-NN / linear (probe), per encoder |")
    print("|---|---|---|---|---|---|---|---|")
    done: list[dict] = []
    for n in args.n:
        for side, tree in trees:
            row_file = out / f"{side}-n{n}-w{'-'.join(map(str, args.widths))}.json"
            if row_file.exists():
                row = json.loads(row_file.read_text())
            else:
                run = subprocess.run([sys.executable, __file__, "--probe", tree, str(data), str(n),
                                      "--widths", *map(str, args.widths)], capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"{side} at N = {n} failed:\n{run.stderr[-3000:]}")
                row = {"tree": side, "machine": machine(), **json.loads(run.stdout.strip().splitlines()[-1])}
                row_file.write_text(json.dumps(row, indent=1) + "\n")
            scores = "; ".join(f"{s['knn']:.2f} / {s['nn1']:.2f} / {s['linear']:.2f} ({s['probe']})" for s in row["scores"])
            print(f"| {side} | {n:,} | {'+'.join(map(str, row['widths']))} | {row['features_gb']} | "
                  f"{row['peak_after_extract_mb']:,} / {row['peak_mb']:,} | {row['extract_s']} | {row['score_s']} | "
                  f"{scores} |", flush=True)
            done.append(row)
    plot(done, args.plot)


def plot(rows: list[dict], png: str) -> None:
    """Peak RSS of the whole run and of the extraction against N, one line per tree."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for side, colour in (("before", "tab:red"), ("after", "tab:blue")):
        mine = sorted((r for r in rows if r["tree"] == side), key=lambda r: r["n"])
        if not mine:
            continue
        n = [r["n"] for r in mine]
        label = "rows in memory (before)" if side == "before" else "rows on disk (after)"
        ax.plot(n, [r["peak_mb"] / 1024 for r in mine], "o-", color=colour, label=f"{label}: whole run")
        ax.plot(n, [r["peak_after_extract_mb"] / 1024 for r in mine], "s--", color=colour, alpha=0.6,
                label=f"{label}: extraction")
    sizes = sorted({(r["n"], r["features_gb"]) for r in rows})
    ax.plot([n for n, _ in sizes], [gb * 1e9 / 2**30 for _, gb in sizes], ":", color="grey",
            label="the feature rows themselves")
    ax.set_xlabel("training images N (+ 5,000 test), three 4,096-d encoders")
    ax.set_ylabel("peak RSS, GiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Evaluation's peak memory (bench/eval_memory.py)", fontsize=9)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
