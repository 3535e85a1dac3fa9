"""Teacher stage on a GPU against its worker count, on more shards than gpu_check uses.

    python3 bench/gpu_workers.py [--copies 4] [--workers 0 4 8 15] [--smoke]
    python3 bench/gpu_workers.py --workers 0 4 --sample --switch-interval 0.005 0.0005
    python3 bench/gpu_workers.py --workers 0 4 --sample --variant cache.cuda_graph=false --variant cache.cuda_graph=true
    python3 bench/gpu_workers.py --workers 4 0 --switch-interval 0.005 0.0005 --per-shard 1024 --rounds 3
    python3 bench/gpu_workers.py --workers 4 --procs 2 4 --per-shard 1024 --rounds 3

ImageNet-shaped JPEG shards (``bench.common.jpeg_shards`` from ``.whl/fmnist-2048.npz``, 8 shards
of 256), each copied ``--copies`` times under other names (the stage sees 8 x copies shards), then
``pipeline.teacher.run`` (random-init ``resnet50`` at 224 px, V = 2, batch 256) once per worker
count: 0 = one background thread reads, decodes (nvJPEG) and augments (GPU); W > 0 = W processes
read shards and draw views, and the GPU decodes and augments. Prints views/s over the whole run
(teacher load and cache creation included), the share of the stage's time it waited for its input
(the cache totals' ``input_wait_seconds``), and the pure bf16 forward (first, so that a run cut short by a
time limit has it). "steady" counts from the first shard's first batch asked for to the last shard's end,
leaving out start-up: the teacher's load and the cache's creation, and for ``--procs`` the processes' own.

``--sample``: where the process's threads are during each run (``bench.common.ThreadSampler``: the
stage's main thread, its data thread) and, on CUDA, the share of the run in which the GPU computed
(``torch.profiler``, kernels of all streams merged). ``--switch-interval``: one run per interpreter
switch interval (``sys.setswitchinterval``; 5 ms by default), to see whether the threads' turns at
the interpreter lock set the pace. The sampler itself waits for that lock, so it takes fewer samples
than its 2 ms interval asks for when the other threads hold it. ``--variant``: one run per given set of
config overrides (comma-separated), e.g. the teacher forward eager against a CUDA graph; runs of all
variants alternate within each worker count. ``--procs``: also the stage as ``seed teacher --procs N``
(``pipeline.teacher.run_processes``) with N processes sharing the one GPU, each with its own data thread and
interpreter lock (and its automatic workers on its share of the cores); one run per N and round, after the
in-process runs, at the default switch interval.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    ThreadSampler, gpu_busy_fraction, jpeg_shards, machine, storage, teacher_checkpoint,
)
from bench.teacher_stage import pure_forward  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed import cache  # noqa: E402
from seed.config import RunConfig, load_config  # noqa: E402
from seed.report import input_wait_share  # noqa: E402
from seed.teachers import load_teacher  # noqa: E402


def pure_rate(cfg: RunConfig, device: str) -> float:
    """Views/s of the teacher's bare forward at batch 256, 224 px (bf16, channels_last on CUDA)."""
    if device != "cuda":
        return pure_forward(cfg, 256, 224, 1)
    teacher, _ = load_teacher(cfg.teacher)
    teacher = teacher.to("cuda").to(memory_format=torch.channels_last)
    x = torch.rand(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)

    def fwd() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            teacher(x).float()

    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        fwd()
    torch.cuda.synchronize()
    return 2560 / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8, 15])
    parser.add_argument("--smoke", action="store_true", help="64 images, the CPU")
    parser.add_argument("--data", default=str(ROOT / ".whl" / "fmnist-2048.npz"))
    parser.add_argument("--sample", action="store_true",
                        help="also sample where this process's threads are, and (CUDA) how busy the GPU is")
    parser.add_argument("--switch-interval", type=float, nargs="+", default=[sys.getswitchinterval()],
                        help="the interpreter's thread switch interval(s) in s, one stage run each (default: as is)")
    parser.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="config overrides of one run per worker count and interval (repeat for several; default: none)")
    parser.add_argument("--per-shard", type=int, default=256,
                        help="images per shard (of the 2,048; ImageNet's webdataset shards hold about 1,000)")
    parser.add_argument("--procs", type=int, nargs="*", default=[],
                        help="also run the stage in N processes sharing the GPU (seed teacher --procs N), per N")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole grid this many times, in the same alternating order, and add medians")
    args = parser.parse_args()
    if any(n < 1 for n in args.procs):
        parser.error("--procs takes process counts from 1")
    variants = [[kv for kv in v.split(",") if kv] for v in (args.variant or [""])]
    default_interval = sys.getswitchinterval()
    root = Path(tempfile.mkdtemp(prefix="seed-gpu-workers-"))
    n, per_shard = (64, 32) if args.smoke else (2048, args.per_shard)
    src = jpeg_shards(root, n, per_shard, source=args.data if Path(args.data).exists() else None)
    data = root / "many"
    data.mkdir()
    shards = sorted(src.glob("train-*.tar"))
    for c in range(args.copies):
        for s in shards:
            shutil.copy(s, data / f"train-{c * len(shards) + int(s.stem.split('-')[1]):06d}.tar")
    count = args.copies * len(shards)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    print(f"machine: {machine()}, {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
          f"{count} shards of {per_shard} images, V = 2, resnet50 at 224 px, batch 256", flush=True)

    def config(w: int, procs: int, variant: list[str]) -> RunConfig:
        return load_config(None, [f"data.train=many/train-{{000000..{count - 1:06d}}}.tar", "teacher.arch=resnet50",
                                  f"teacher.checkpoint={teacher_checkpoint(root, 'resnet50')}", "cache.views=2",
                                  "cache.resolution=224", "cache.batch_size=256",
                                  f"cache.device={'cuda' if procs and device == 'cuda' else device}",
                                  f"cache.workers={w}", f"cache.name=w{w}-p{procs}", *variant])

    # the pure forward first: a run cut short by its time limit still has it
    print(f"\npure {'bf16 ' if device == 'cuda' else ''}forward: {pure_rate(config(0, 0, []), device):.0f} views/s", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()                                              # (the teacher above is gone)
    print("\n| workers | switch interval, ms | variant | views | seconds | views/s | steady views/s | GPU busy "
          "| forward waited for input | teacher forward |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    profiles: list[str] = []
    rates: dict[tuple[str, float, str], list[tuple[float, float]]] = {}
    # (workers, switch interval, variant, processes); processes 0: the stage in this process
    grid = [(w, i, v, 0) for w in args.workers for i in args.switch_interval for v in variants]
    grid += [(-1, default_interval, v, n) for n in args.procs for v in variants]
    for w, interval, variant, procs in (run for _ in range(args.rounds) for run in grid):
        cfg = config(w, procs, variant)
        sys.setswitchinterval(interval)
        with contextlib.ExitStack() as stack:
            sampler = stack.enter_context(ThreadSampler()) if args.sample and not procs else None
            prof = (stack.enter_context(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]))
                    if args.sample and device == "cuda" and not procs else None)
            t = time.perf_counter()
            result = (teacher_stage.run_processes(cfg, storage(root), procs, overwrite=True, progress=False) if procs
                      else teacher_stage.run(cfg, storage(root), overwrite=True, progress=False))
            seconds = time.perf_counter() - t
        sys.setswitchinterval(default_interval)
        views = result.totals["teacher_forwards"] if result.totals else 0
        busy = f"{100 * gpu_busy_fraction(prof, seconds * 1e6):.0f} %" if prof is not None else "-"
        label = ", ".join(variant) or "-"
        group = cache.open_group(result.cache)
        records = [cache.shard_record(group, i) or {} for i in cache.done_shards(group)]
        modes = sorted({str(r.get("forward", "?")) for r in records})
        # from the first shard's first batch asked for (teacher loaded, graph captured) to the last shard's end:
        # leaves out the processes' start-up, which a whole --procs run pays once more per process
        start = min(r["finished_at"] - r["seconds"] - r.get("first_batch_wait_seconds", 0.0) for r in records)
        steady = views / max(1e-9, max(r["finished_at"] for r in records) - start)
        shares = input_wait_share(result.totals or {})
        waited = "-" if shares is None else f"{100 * shares[0] / shares[1]:.0f} %"
        layout = f"{procs} processes, auto" if procs else str(w)
        print(f"| {layout} | {1e3 * interval:g} | {label} | {views} | {seconds:.2f} | {views / seconds:.0f} | {steady:.0f} "
              f"| {busy} | {waited} | {', '.join(modes)} |", flush=True)
        rates.setdefault((layout, interval, label), []).append((views / seconds, steady))
        if sampler is not None:
            profiles.append(f"\nworkers {layout}, switch interval {1e3 * interval:g} ms, {label}: {sampler.samples} samples\n\n"
                            + sampler.table(15))
    print("\n".join(profiles), flush=True)
    if args.rounds > 1:
        print(f"\n| workers | switch interval, ms | variant | views/s, median of {args.rounds} (range) "
              "| steady views/s, median (range) |\n|---|---|---|---|---|")
        for (layout, interval, label), r in rates.items():
            whole, steady_ = [a for a, _ in r], [b for _, b in r]
            print(f"| {layout} | {1e3 * interval:g} | {label} | {statistics.median(whole):.0f} ({min(whole):.0f}-{max(whole):.0f}) "
                  f"| {statistics.median(steady_):.0f} ({min(steady_):.0f}-{max(steady_):.0f}) |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
