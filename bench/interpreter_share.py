"""How much a data thread slows a launch-bound forward in the same process: the GPU stages' host side, on the CPU.

    python bench/interpreter_share.py [--scratch DIR] [--rounds 3]

On a GPU the teacher's forward is a few hundred kernel launches from Python, each a few microseconds
of host work, while a data thread of the same process reads shards, draws views and queues the
augmentation. This script stands a CPU forward whose operations are as small as launches (ResNet-50 on
one 16 x 16 image, one thread) in for the GPU forward, and times it alone and with each data layout of
the stages running beside it, on real Fashion-MNIST shards (the demo's 32 px teacher recipe):

- teacher stage, no workers: this process's thread reads, decodes, draws and augments;
- teacher stage, 1 worker: a worker process does all of it, this process only receives the batches;
- training batches composed here (``seed.data.Batches``): the thread reads the shards and the cached
  rows, fills the shuffle buffer, decodes and augments;
- training batches composed in a worker (``compose_in_worker``, CUDA's layout): the thread only
  decodes and augments.

Each round runs every layout once, in turn; the table gives each layout's median over rounds of the
forward's ms against the median alone. The switch interval row repeats the first layout with the
interpreter's thread switch interval at 0.2 ms (5 ms by default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402

from bench.common import machine, shards, storage, teacher_checkpoint  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed import bank_store  # noqa: E402
from seed.config import RunConfig, load_config  # noqa: E402
from seed.data import Batches, CachedSource, shard_order  # noqa: E402
from seed.shards import expand_urls  # noqa: E402


def consumer(forwards: int) -> Callable[[], float]:
    """ms per forward of a model whose operations cost about what a CUDA launch does on the host."""
    model = timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    x = torch.rand(1, 3, 16, 16)

    def run() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(forwards):
                model(x)
            return (time.perf_counter() - t) / forwards * 1e3

    run()
    return run


def beside(make: Callable[[], Iterable[object]], measure: Callable[[], float], switch_interval: float | None = None) -> float:
    """``measure()`` while a thread keeps drawing items from ``make()`` (restarted when it runs out)."""
    stop = threading.Event()
    started = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            for _ in make():
                started.set()
                if stop.is_set():
                    return

    default = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    thread = threading.Thread(target=produce, daemon=True, name="data")
    thread.start()
    try:
        started.wait(120)
        time.sleep(0.2)
        return measure()
    finally:
        stop.set()
        thread.join(60)
        sys.setswitchinterval(default)


def setup(root: Path) -> tuple[RunConfig, list[str]]:
    data = shards(root, 2000, per_shard=250)
    cfg = load_config(None, [f"data.train={data.name}/train/train-*.tar", "teacher.arch=resnet10t",
                             f"teacher.checkpoint={teacher_checkpoint(root, 'resnet10t')}", "cache.views=2",
                             "cache.resolution=32", "cache.batch_size=256", "cache.device=cpu", "cache.workers=0",
                             "cache.name=share", "bank.size=512", "bank.topk=16"])
    st = storage(root)
    teacher_stage.run(cfg, st, overwrite=True, progress=False)
    bank_stage.run(cfg, st, progress=False)
    return cfg, expand_urls(st.resolve("shards", cfg.data.train))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.scratch or tempfile.mkdtemp(prefix="seed-share-"))
    cfg, urls = setup(root)
    st = storage(root)
    plan = teacher_stage.make_plan(cfg, st)
    group, banks = bank_store.open_banks(st.cache_url(cfg.cache.name), cfg.bank)
    source = CachedSource(group, banks, view="cycle", seed=0, dense=False)
    cpu = torch.device("cpu")
    here = Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=0, depth=2)
    composing = Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=1, depth=2, compose_in_worker=True)
    shard_ids = list(range(len(plan.urls)))

    def stage(workers: int) -> Callable[[], Iterable[object]]:
        return lambda: teacher_stage._stream(cfg, plan, shard_ids, 256, cpu, workers)

    def training(maker: Batches) -> Callable[[], Iterable[object]]:
        return lambda: maker.epoch(urls, shard_order(len(urls), 0, 0), source, 0, batch_size=256, steps=7, seed=0,
                                   shuffle_buffer=512)

    layouts: dict[str, Callable[[Callable[[], float]], float]] = {
        "teacher stage, no workers (this process reads, decodes, draws, augments)": lambda m: beside(stage(0), m),
        "same, switch interval 0.2 ms": lambda m: beside(stage(0), m, 0.0002),
        "teacher stage, 1 worker (this process receives the batches)": lambda m: beside(stage(1), m),
        "training batches composed here (read, shuffle, decode, augment)": lambda m: beside(training(here), m),
        "training batches composed in a worker (decode, augment here)": lambda m: beside(training(composing), m),
    }
    measure = consumer(args.forwards)
    alone: list[float] = []
    with_data: dict[str, list[float]] = {k: [] for k in layouts}
    try:
        for r in range(args.rounds):
            alone.append(measure())
            for name, run in layouts.items():
                with_data[name].append(run(measure))
            print(f"round {r + 1}/{args.rounds}: alone {alone[-1]:.2f} ms, "
                  + ", ".join(f"{v[-1]:.2f}" for v in with_data.values()), flush=True)
    finally:
        here.close()
        composing.close()
    base = statistics.median(alone)
    print(f"\nmachine: {machine()}; consumer: ResNet-50 forward on 1 x 3 x 16 x 16, 1 thread, {args.forwards} forwards "
          f"per measurement, median of {args.rounds} rounds\n")
    print("| beside the forward | ms per forward | / alone |\n|---|---|---|")
    print(f"| nothing | {base:.2f} | 1.00 |")
    for name, values in with_data.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.2f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
