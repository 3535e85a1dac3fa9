"""Bank-targets throughput: FAISS indices against a plain torch matmul + top-k, on the same cache.

    python bench/bank_targets.py [--scratch DIR] [--n 20000]

Builds one teacher cache (random resnet10t, real Fashion-MNIST, V=2), then runs the bank stage
with each index in a fresh process (so each peak RSS is its own) and prints views/s of the
targets pass, the fidelity it stored, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import child, machine, peak_rss_mb, shards, storage, teacher_checkpoint  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed.config import load_config  # noqa: E402


def config(root: Path, n: int, *extra: str):
    data = shards(root, n)
    return load_config(None, [f"data.train={data.name}/train/train-*.tar", f"teacher.checkpoint={teacher_checkpoint(root, 'resnet10t')}",
                              "cache.views=2", f"cache.name=bank-bench-{n}", *extra])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "N", "INDEX"))
    args = parser.parse_args()
    common = ["bank.size=4096", "bank.topk=32", "bank.tau_t=0.05"]
    if args.child:
        root, n, index = Path(args.child[0]), int(args.child[1]), args.child[2]
        s = bank_stage.run(config(root, n, *common, f"bank.index={index}"), storage(root), progress=False).summary
        print(json.dumps({"views_per_s": s["views_per_s"], "mass": s["fidelity"]["mass"]["mean"],
                          "kl": s["fidelity"]["kl"]["mean"], "recall": s["fidelity"].get("recall_at_k"), "rss": peak_rss_mb()}))
        return
    root = Path(args.scratch or tempfile.mkdtemp(prefix="seed-bench-"))
    print(f"machine: {machine()}")
    teacher_stage.run(config(root, args.n), storage(root), progress=False)
    print(f"\ncache: N={args.n} images x V=2 views; bank K=4096, top-k 32, tau_T=0.05\n")
    print("| index | normaliser | targets views/s | captured mass (mean) | KL(dense||sparse) | recall@k | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for index in ("torch", "flat", "ivf", "hnsw"):
        r = json.loads(child(__file__, "--child", str(root), str(args.n), index))
        norm = "exact" if index in ("torch", "flat") else "sampled tail"
        recall = "" if r["recall"] is None else f"{r['recall']:.3f}"
        print(f"| {index} | {norm} | {r['views_per_s']:.0f} | {r['mass']:.4f} | {r['kl']:.2e} | {recall} | {r['rss']:.0f} |")


if __name__ == "__main__":
    main()
