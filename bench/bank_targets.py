"""Bank-targets throughput: FAISS indices against a plain torch matmul + top-k, on the same cache.

    python bench/bank_targets.py [--scratch DIR] [--n 20000]                     # K = 4096
    python bench/bank_targets.py --k65536 [--scratch DIR] [--views 3] [--indices torch,flat,ivf,hnsw]
    python bench/bank_targets.py --quick [--scratch DIR]                         # K = 65,536, V = 1 (GPU check)
    python bench/bank_targets.py --writes [--scratch DIR] [--topk 1024,4096] [--threads 1]  # writes behind or not

K = 4096: one teacher cache of the first N train (and N test) images, V = 2. K = 65,536 (SEED's bank
size): one cache of all 70,000 Fashion-MNIST images (train + test; the bank needs 65,536 distinct
valid images) with V views, 210,000 views at V = 3. Teachers are random resnet10t; the cache is made
once per scratch directory and resumed shard by shard if cut short. Then the bank stage runs with
each index in a fresh process (so each peak RSS is its own; its old bank is deleted first so every
run measures a build) and prints views/s of the targets pass, the fidelity it stored and peak RSS.
The bank stage runs on ``cache.device`` (auto: CUDA when present), so on a GPU machine ``torch``
is the CUDA path. ``--quick`` (about a minute on one H100): K = 65,536, V = 1 (70,000 views),
indices torch and flat. An index that needs FAISS is skipped where FAISS is not installed.
``--writes``: the K = 4096 cache, index ``torch``, for each top-k the stage with each block of targets
written behind the next block's computation (``write_behind``, the default) and written before it,
alternating, twice each; it prints the stage's seconds, the writes' seconds and the computation's wait
for them. ``--threads``: torch's threads for the computation (0: torch's default, every core). With the
cores all computing, a write behind takes them from the computation; one thread leaves a core free, as a
GPU's computation leaves the host's cores (the case writing behind is for).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zarr  # noqa: E402

from bench.bank_writes import TABLE_HEAD, side_by_side, table_rows  # noqa: E402
from bench.common import child, fashion_mnist_all, machine, peak_rss_mb, shards, storage, teacher_checkpoint  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed.config import RunConfig, load_config  # noqa: E402

SMALL = ["bank.size=4096", "bank.topk=32", "bank.tau_t=0.05"]
LARGE = ["bank.size=65536", "bank.topk=32", "bank.tau_t=0.05"]


def config(root: Path, n: int, views: int, *extra: str) -> RunConfig:
    """``n`` > 0: the first ``n`` train images (K = 4096 runs); ``n`` = 0: all 70,000 images."""
    train = f"{shards(root, n).name}/train/train-*.tar" if n else fashion_mnist_all(root)
    name = f"bank-bench-{n}" if n else f"bank-bench-all-v{views}"
    return load_config(None, [f"data.train={train}", f"teacher.checkpoint={teacher_checkpoint(root, 'resnet10t')}",
                              f"cache.views={views}", f"cache.name={name}", *extra])


def run_child(root: Path, n: int, views: int, index: str, topk: int = 32, write_behind: bool = True,
              threads: int = 0) -> None:
    """One bank build in this (fresh) process; prints its figures as one JSON line."""
    if threads:
        torch.set_num_threads(threads)
    cfg = config(root, n, views, *(SMALL if n else LARGE), f"bank.index={index}", f"bank.topk={topk}")
    st = storage(root)
    group = zarr.open_group(st.cache_url(cfg.cache.name), mode="r+")
    if "bank" in group:                                                      # measure a build, never a skip
        del group["bank"]
    t = time.perf_counter()
    s = bank_stage.run(cfg, st, progress=False, write_behind=write_behind).summary
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"views_per_s": s["views_per_s"], "views": s["views"], "targets_s": s["targets_seconds"],
                      "write_s": s["write_seconds"], "write_wait_s": s["write_wait_seconds"],
                      "stage_s": round(time.perf_counter() - t, 1), "device": s["device"], "faiss_gpu": s["faiss_gpu"],
                      "mass": s["fidelity"]["mass"]["mean"], "kl": s["fidelity"]["kl"]["mean"],
                      "recall": s["fidelity"].get("recall_at_k"), "rss": peak_rss_mb(), "gpu_mb": gpu_mb}))


def writes(root: Path, n: int, topks: list[int], threads: int) -> None:
    """The targets pass with its writes behind the computation and before it, side by side (fresh processes,
    alternating)."""
    print(f"machine: {machine()}", flush=True)
    teacher_stage.run(config(root, n, 2), storage(root), progress=False)
    print(f"\ncache: N={n} images x V=2 views; bank K=4096, index torch, tau_T=0.05; two builds of each; torch "
          f"threads {threads or torch.get_num_threads()}\n")
    print("| top-k " + TABLE_HEAD + "\n|---|---|---|---|---|---|---|", flush=True)
    for topk in topks:
        runs = side_by_side(lambda behind: json.loads(child(__file__, "--child", str(root), str(n), "2", "torch",
                                                            str(topk), "1" if behind else "0", str(threads))), 2)
        print("\n".join(table_rows(runs, lead=f"{topk} | ")), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--n", type=int, default=20000, help="K = 4096: images of the cache")
    parser.add_argument("--k65536", action="store_true", help="K = 65,536 over all 70,000 images")
    parser.add_argument("--views", type=int, default=3, help="K = 65,536: views per image")
    parser.add_argument("--indices", default="torch,flat,ivf,hnsw")
    parser.add_argument("--quick", action="store_true", help="K = 65,536, V = 1, torch and flat only")
    parser.add_argument("--writes", action="store_true", help="K = 4096, index torch: targets written behind or not")
    parser.add_argument("--topk", default="1024,4096", help="--writes: the top-k values")
    parser.add_argument("--threads", type=int, default=0, help="--writes: torch's threads (0: its default)")
    parser.add_argument("--child", nargs=7, metavar=("ROOT", "N", "VIEWS", "INDEX", "TOPK", "WRITE_BEHIND", "THREADS"))
    args = parser.parse_args()
    if args.child:
        run_child(Path(args.child[0]), int(args.child[1]), int(args.child[2]), args.child[3], int(args.child[4]),
                  args.child[5] == "1", int(args.child[6]))
        return
    if args.writes:
        writes(Path(args.scratch or tempfile.mkdtemp(prefix="seed-bench-")).absolute(), args.n,
               [int(k) for k in args.topk.split(",")], args.threads)
        return
    large = args.k65536 or args.quick
    n = 0 if large else args.n
    views = (1 if args.quick else args.views) if large else 2
    indices = ["torch", "flat"] if args.quick else args.indices.split(",")
    root = Path(args.scratch or tempfile.mkdtemp(prefix="seed-bench-")).absolute()
    print(f"machine: {machine()}", flush=True)
    t = time.perf_counter()
    teacher = teacher_stage.run(config(root, n, views), storage(root), progress=False)
    images = 70_000 if large else args.n
    print(f"teacher cache: {len(teacher.embedded)} shards embedded now, {len(teacher.skipped_done)} found done, "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    K = 65_536 if large else 4096
    print(f"\ncache: N={images} images x V={views} views; bank K={K}, top-k 32, tau_T=0.05\n")
    print("| index | normaliser | device | targets views/s | targets s | stage s | captured mass (mean) "
          "| KL(dense||sparse) | recall@k | peak RSS (MB) | peak GPU (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for index in indices:
        norm = "exact" if index in ("torch", "flat") else "sampled tail"
        if index != "torch" and importlib.util.find_spec("faiss") is None:
            print(f"| {index} | {norm} | FAISS not installed: skipped |||||||||", flush=True)
            continue
        try:
            r = json.loads(child(__file__, "--child", str(root), str(n), str(views), index, "32", "1", "0"))
        except subprocess.CalledProcessError as exc:
            print(f"| {index} | {norm} | failed: {exc.stderr.strip().splitlines()[-1:]} |||||||||", flush=True)
            continue
        recall = "" if r["recall"] is None else f"{r['recall']:.3f}"
        gpu = "" if r["gpu_mb"] is None else f"{r['gpu_mb']:.0f}"
        device = r["device"] + (" (FAISS GPU)" if r["faiss_gpu"] else "")
        print(f"| {index} | {norm} | {device} | {r['views_per_s']:.0f} | {r['targets_s']:.1f} | {r['stage_s']:.1f} "
              f"| {r['mass']:.4f} | {r['kl']:.2e} | {recall} | {r['rss']:.0f} | {gpu} |", flush=True)


if __name__ == "__main__":
    main()
