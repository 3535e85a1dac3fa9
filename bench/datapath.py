"""The CPU data path, side by side in one run: views/s of decode + augment, the stages against their compute.

    python bench/datapath.py [--scratch DIR] [--n 2048] [--workers 1 2] [--sections abcd] [--quick]

Everything runs on the CPU, in this process, with torch's default intra-op threads; RSS figures come
from fresh child processes (``bench.common.child``). Teachers and students are random-init (the speed
of a forward does not depend on the weights); images are real Fashion-MNIST.

  a  The data path alone at 224 px (decode + draw view parameters + augment, no model), views/s, per
     worker count W: the project's ``seed.data.Batches`` (batches composed in this process, decoded
     and augmented by W DataLoader processes; W = 0: one background thread) over ``FreshViews`` on
     ImageNet-shaped JPEG shards (``bench.common.jpeg_shards``: ``--n`` Fashion-MNIST images upscaled
     to 333-640 px sides, q90), against the pipeline a user would write: torchvision v2's MoCo-v2
     transform applied per image to PIL-decoded uint8 tensors, in a torch DataLoader with the same W
     workers (an IterableDataset splitting the shards by worker), batch 256. Each figure is one pass
     over the images, timed from the first request (worker start-up included, as a user sees it); in
     brackets, the same pass after its first round of W batches (``PassClock``: start-up, first
     decodes and the shuffle buffer's fill left out, the rate a long epoch settles at).
  b  The teacher stage (``pipeline.teacher.run``) against the pure teacher forward (random batch,
     same size, threads and resolution): ``resnet10t`` at 32 px on Fashion-MNIST (V = 4, batch 256)
     and ``resnet50`` at 224 px on JPEG shards (V = 2, batch 64, few images), in the ``--layouts`` asked for:
     ``thread`` (``cache.workers=0``), ``inline`` (the same, with ``cache.prefetch=0``: the data path runs
     between forwards, in the forward's thread), ``worker`` (``cache.workers=1``), ``auto`` (the defaults) and
     ``procs`` (``seed teacher --procs`` with one process per core, started as subprocesses).
  c  The student loop (``pipeline.student.run``) with a bare objective (the same loop and data path, a
     loss that needs nothing from the cache) and with cached SEED, ``train.loader.workers`` 0 and 1 (the
     read-ahead automatic: with 0 workers on a CPU the step's threads fill, the data path runs inline),
     against the in-memory bare step (forward + backward + SGD on a fixed batch): at 32 px on b's
     ``resnet10t`` cache and at 224 px on b's ``resnet50`` cache. ms/step of the last epoch.
  d  Peak RSS of the student stage (fresh process, ``train.loader.workers=0`` so that everything is
     in that one process) at 32 px for N and 2N Fashion-MNIST images, and at 224 px on the N JPEG
     images of a: the shuffle buffer holds encoded bytes, so RSS should not grow with N or source size.
     The caches of d come from a cheap teacher (``mobilenetv3_small_050``); the student stage never
     loads it and only its output width D = 128 matters here. Reference rows: a fresh process doing
     only in-memory bare steps of the same student and batch at each resolution (no data path), so
     stage minus reference is what the data path and the cache add.

Sizes: the defaults are chosen for 10 to 15 minutes on a quiet 2-core CPU (under 25 when the machine
is shared; estimated from --quick rates, not measured end to end): a 2,048 images x 6 passes
(about 3 min); b 6,000 images x 4 views twice and 192 images x 2 views of resnet50 twice, the
slowest part at 3 to 10 views/s (about 3 to 5 min); c 19 steps of batch 256 at 32 px and 2 epochs of
6 steps of batch 32 at 224 px, four loops each (about 2 min); d five fresh processes plus three small
caches (about 3 min). Peak RSS is the child's own high-water mark (``bench.common.peak_rss_mb``).
With two intra-op threads on a machine where another process keeps a core busy, small per-image ops
slow down many times over (thread oversubscription): run it when the machine is quiet.
``--quick`` runs every section at tiny sizes (one to three minutes) to test the script itself; its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench.common import child, jpeg_shards, machine, peak_rss_mb, shards, storage, teacher_checkpoint  # noqa: E402
from bench.student_step import Bare, timed  # noqa: E402
from bench.teacher_stage import pure_forward  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from pipeline import student as student_stage  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed.augment import apply_batch  # noqa: E402
from seed.views import JITTER_MODES, Recipe, draw_params  # noqa: E402
from seed.config import RunConfig, load_config  # noqa: E402
from seed.data import Batches, FreshViews  # noqa: E402
from seed import cache  # noqa: E402
from seed.devices import cpu_cores, data_workers, read_ahead  # noqa: E402
from seed.models import mlp_encoder  # noqa: E402
from seed.objectives import CachedSeed, ObjectiveFactory  # noqa: E402
from seed.shards import decode_image, iter_shard  # noqa: E402

CPU = torch.device("cpu")
RSS_TEACHER = "mobilenetv3_small_050"


@dataclasses.dataclass(frozen=True)
class Sizes:
    n: int = 2048                  # a: JPEG images (one pass each); d: N
    batch: int = 256               # a: batch
    shuffle: int = 256             # a, c: train.loader.shuffle_buffer
    fm_images: int = 6000          # b, c: Fashion-MNIST images for resnet10t @ 32 (shards of 1000: even shares for 2 or 3 procs)
    fm_views: int = 4
    fm_batch: int = 256
    r10t_pure_batches: int = 10
    r50_images: int = 192          # b, c: JPEG images for resnet50 @ 224
    r50_per_shard: int = 64
    r50_views: int = 2
    r50_batch: int = 64
    r50_pure_batches: int = 2      # after one warm-up batch
    bank_k: int = 4096             # c: bank.size (at most half the images)
    topk: int = 32
    student: str = "mobilenetv3_small_050"
    student_batch_32: int = 256
    student_batch_224: int = 32
    epochs_32: int = 1
    epochs_224: int = 2
    bare_steps: int = 5            # c: in-memory steps timed (after one warm-up)
    rss_batch: int = 64            # d
    rss_shuffle: int = 1024        # d: smaller than N, so the buffer is full
    rss_views: int = 1


QUICK = Sizes(n=128, batch=32, shuffle=64, fm_images=600, fm_views=2, fm_batch=64, r10t_pure_batches=2,
              r50_images=8, r50_per_shard=4, r50_views=2, r50_batch=8, r50_pure_batches=1, bank_k=256, topk=16,
              student_batch_32=64, student_batch_224=4, epochs_32=1, epochs_224=2, bare_steps=1, rss_batch=16,
              rss_shuffle=64)


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one section; a failure prints its traceback and the run goes on with the next section."""
    t = time.perf_counter()
    print(f"\n## {name}\n", flush=True)
    try:
        fn()
    except Exception:  # noqa: BLE001
        print("\nsection failed:\n", flush=True)
        traceback.print_exc(file=sys.stdout)
    print(f"\n({name.split()[0]} took {time.perf_counter() - t:.0f} s)", flush=True)


def urls_of(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob("train-*.tar"))


# ---------------------------------------------------------------------------------------------
# a: the data path alone


@dataclasses.dataclass(frozen=True)
class Rate:
    """Views/s of one pass: over the whole pass, and after its first round (one batch from each worker)."""
    whole: float
    steady: float


class PassClock:
    """Times one pass from the first request, and again from the end of its first round.

    W workers fill their first batches side by side, so batches arrive in rounds of W: timing from the
    first batch alone would count the rest of the first round as free. ``steady`` counts the views after
    batch max(W, 1) over the time after it: start-up, first decodes and the shuffle buffer's fill left out.
    """

    def __init__(self, workers: int, now: Callable[[], float] = time.perf_counter) -> None:
        self.round, self.now = max(workers, 1), now
        self.start = now()
        self.arrivals: list[tuple[float, int]] = []                       # (time, views so far)

    def batch(self, views: int) -> None:
        total = views + (self.arrivals[-1][1] if self.arrivals else 0)
        self.arrivals.append((self.now(), total))

    def rate(self) -> Rate:
        if len(self.arrivals) <= self.round:
            raise ValueError(f"a pass of {len(self.arrivals)} batches from {self.round} workers has no second round: "
                             "make it longer (--n)")
        (t0, v0), (t1, v1) = self.arrivals[self.round - 1], self.arrivals[-1]
        return Rate(v1 / (t1 - self.start), (v1 - v0) / (t1 - t0))


def project_views_per_s(urls: list[str], workers: int, S: Sizes, recipe: Recipe) -> Rate:
    """One pass of seed.data.Batches over FreshViews at 224 px, batches iterated and dropped."""
    maker = Batches(recipe, 224, device=CPU, workers=workers, depth=2)
    clock = PassClock(workers)
    for batch in maker.epoch(urls, list(range(len(urls))), FreshViews(recipe, seed=0), 0, batch_size=S.batch,
                             steps=S.n // S.batch, seed=0, shuffle_buffer=S.shuffle):
        clock.batch(batch.x.shape[0])
    rate = clock.rate()
    del maker                                                                 # stops the persistent workers
    gc.collect()
    return rate


def moco_v2_torchvision() -> v2.Compose:
    """MoCo-v2's augmentation as a user writes it with torchvision v2 (no normalisation, as seed's path)."""
    return v2.Compose([
        v2.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
    ])


class TorchvisionShards(torch.utils.data.IterableDataset):
    """Worker w of W reads shards w, w + W, ...; each image PIL-decoded to uint8 CHW, then transformed."""

    def __init__(self, urls: list[str]):
        self.urls, self.transform = urls, moco_v2_torchvision()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        mine = self.urls if info is None else self.urls[info.id::info.num_workers]
        for url in mine:
            for sample in iter_shard(url):
                yield self.transform(decode_image(sample)), sample.label


def torchvision_views_per_s(urls: list[str], workers: int, S: Sizes) -> Rate:
    loader = torch.utils.data.DataLoader(TorchvisionShards(urls), batch_size=S.batch, num_workers=workers)
    clock = PassClock(workers)
    for x, _ in loader:
        clock.batch(x.shape[0])
    rate = clock.rate()
    del loader
    gc.collect()
    return rate


def sec_a(root: Path, S: Sizes, worker_counts: list[int], modes: list[str], rounds: int) -> Path:
    jdir = jpeg_shards(root, S.n)
    urls = urls_of(jdir)
    gen = json.loads((jdir / "_info.json").read_text())["generation"]
    print(f"{gen['images']} images in {gen['shards']} shards of {gen['per_shard']}, mean {gen['mean_pixels']:.0f} pixels, "
          f"{gen['mean_jpeg_bytes']:.0f} B per JPEG (made in {gen['generation_s']} s); 224 px views, batch {S.batch}, "
          f"shuffle buffer {S.shuffle}; {torch.get_num_threads()} torch threads in this process, 1 in each worker\n")
    # Warm-up in this process (first-call costs of both pipelines); forked workers inherit it.
    sample = next(iter_shard(urls[0]))
    image = decode_image(sample)
    recipe = Recipe()
    row = torch.from_numpy(draw_params(recipe, seed=0, key=sample.key, view=0, height=image.shape[1],
                                       width=image.shape[2])[None])
    apply_batch([image], row, recipe, 224)
    moco_v2_torchvision()(image)

    counts = sorted({0, *worker_counts})
    runs: dict[tuple[str, int], list[Rate]] = {}                             # (pipeline, W): one Rate per round
    cpu: dict[tuple[str, int], list[tuple[float, float]]] = {}                # and CPU us per view: here, workers
    views = S.n // S.batch * S.batch

    def measured(key: tuple[str, int], run: Callable[[], Rate]) -> None:
        here, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        runs.setdefault(key, []).append(run())                                # (its workers have exited and been
        spent = [b.ru_utime - a.ru_utime + b.ru_stime - a.ru_stime for a, b in (   # waited for when it returns)
            (here, resource.getrusage(resource.RUSAGE_SELF)), (kids, resource.getrusage(resource.RUSAGE_CHILDREN)))]
        cpu.setdefault(key, []).append((spent[0] / views * 1e6, spent[1] / views * 1e6))

    for _ in range(rounds):                                                   # every pipeline once per round
        for w in counts:
            for m in modes:
                measured((m, w), lambda: project_views_per_s(urls, w, S, Recipe(jitter_mode=m)))
            measured(("torchvision", w), lambda: torchvision_views_per_s(urls, w, S))

    def med(key: tuple[str, int]) -> Rate:
        return Rate(statistics.median(r.whole for r in runs[key]), statistics.median(r.steady for r in runs[key]))

    project = {m: {w: med((m, w)) for w in counts} for m in modes}
    tv = {w: med(("torchvision", w)) for w in counts}
    print("views/s over the whole pass (start-up included); in brackets: after the first round of W batches"
          + (f"; medians of {rounds} rounds" if rounds > 1 else "") + "\n")
    print(f"| W | {' | '.join(f'seed Batches views/s, jitter {m}' for m in modes)} | torchvision v2 per-image views/s | "
          f"{' | '.join(f'seed ({m}) / torchvision' for m in modes)} |")
    print("|---|" + "---|" * (2 * len(modes) + 1))
    for w in counts:
        what = " (seed: one background thread; torchvision: in the main process)" if w == 0 else ""
        t = tv[w]
        rates = " | ".join(f"{project[m][w].whole:.1f} ({project[m][w].steady:.1f})" for m in modes)
        ratios = " | ".join(f"{project[m][w].whole / t.whole:.2f} ({project[m][w].steady / t.steady:.2f})" for m in modes)
        print(f"| {w}{what} | {rates} | {t.whole:.1f} ({t.steady:.1f}) | {ratios} |")
    print("\nCPU time per view, us (user + system; medians): this process / its workers together\n")
    print(f"| W | {' | '.join(f'seed, jitter {m}' for m in modes)} | torchvision |\n|---|" + "---|" * (len(modes) + 1))
    for w in counts:
        cells = [f"{statistics.median(c[0] for c in cpu[(m, w)]):.0f} / {statistics.median(c[1] for c in cpu[(m, w)]):.0f}"
                 for m in [*modes, "torchvision"]]
        print(f"| {w} | {' | '.join(cells)} |")
    if 1 in counts and 2 in counts:
        print()
        for m in [*modes, "torchvision"]:
            ratios = [(two.whole / one.whole, two.steady / one.steady) for one, two in zip(runs[(m, 1)], runs[(m, 2)])]
            each = ", ".join(f"{a:.2f}x ({b:.2f}x)" for a, b in ratios)
            what = f"seed with jitter {m}" if m != "torchvision" else m
            print(f"scaling W = 2 over W = 1, whole pass (after the first round), {what}: "
                  f"{each}{' in the rounds' if rounds > 1 else ''}")
    return jdir


# ---------------------------------------------------------------------------------------------
# b: the teacher stage against the pure forward; c: the student loop against the bare step


@dataclasses.dataclass(frozen=True)
class Setup:
    """One teacher + data configuration of b, reused by c: its config overrides and sizes."""

    label: str
    arch: str
    resolution: int
    views: int
    batch: int
    images: int
    overrides: tuple[str, ...]

    def config(self, *extra: str) -> RunConfig:
        return load_config(None, [*self.overrides, *extra])


def make_setup(root: Path, label: str, data_train: str, arch: str, resolution: int, views: int, batch: int,
               images: int, S: Sizes, student_batch: int, epochs: int) -> Setup:
    k = max(1, min(S.bank_k, images // 2))
    return Setup(label, arch, resolution, views, batch, images, (
        f"data.train={data_train}", f"teacher.arch={arch}", f"teacher.checkpoint={teacher_checkpoint(root, arch)}",
        f"cache.name=datapath-{label}", f"cache.views={views}", f"cache.resolution={resolution}",
        f"cache.batch_size={batch}", "cache.device=cpu", f"bank.size={k}", f"bank.topk={min(S.topk, k)}",
        f"train.students=[{{arch: {S.student}}}]", f"train.optim.batch_size={student_batch}",
        f"train.optim.epochs={epochs}", f"train.loader.shuffle_buffer={S.shuffle}", "train.device=cpu"))


def data_path_us(cfg: RunConfig, root: Path, batch: int) -> float:
    """The stage's data path alone on one thread (read, decode, draw, augment; no forward), us per view."""
    plan = teacher_stage.make_plan(cfg, storage(root), check_cache=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t, views = time.perf_counter(), 0
        for item in teacher_stage._shard_items(cfg, plan, list(range(len(plan.urls))), batch, CPU):
            views += item.x.shape[0] if isinstance(item, teacher_stage._Views) else 0
        return (time.perf_counter() - t) / views * 1e6
    finally:
        torch.set_num_threads(threads)


# b's layouts of the teacher stage's data path: (cache.workers, cache.prefetch), the name printed; "procs" is
# `seed teacher --procs <cores>` (pipeline.teacher.run_processes) with the automatic settings in each process
LAYOUTS = {"auto": (-1, -1), "thread": (0, 2), "inline": (0, 0), "worker": (1, 2), "procs": (-1, -1)}


def describe_auto() -> str:
    """What the automatic settings choose for the teacher stage on this CPU, with this process's threads."""
    threads = torch.get_num_threads()
    workers = data_workers(-1, CPU, model_threads=threads)
    depth = read_ahead(-1, CPU, workers, model_threads=threads)
    return (f"{workers} workers" if workers else "no workers") + (f", {depth} batches ahead" if depth else ", inline")


def sec_b(root: Path, setups: list[Setup], pure_batches: dict[str, int], modes: list[str], layouts: list[str],
          rounds: int) -> None:
    passes = [{(s.label, m): data_path_us(s.config(f"cache.recipe.jitter_mode={m}"), root, s.batch) for s in setups
               for m in modes} for _ in range(3)]                           # modes alternating; the first warms up
    alone = {k: min(r[k] for r in passes) for k in passes[0]}
    print("The stage's data path alone, one thread (`_shard_items`: read, decode, draw, augment), us per view, "
          "least of 3 passes: "
          + "; ".join(f"{label} {mode} {us:.1f}" for (label, mode), us in alone.items()) + "\n")
    print("Layouts: auto = the defaults (cache.workers and cache.prefetch -1: seed.devices.data_workers and read_ahead "
          f"choose; here {describe_auto()}), thread = cache.workers 0, cache.prefetch 2 (one background thread reads, "
          "decodes and augments), inline = the same work done between forwards in the forward's own thread "
          f"(cache.prefetch 0), worker = cache.workers 1, procs = `seed teacher --procs {cpu_cores()}` (one process "
          "per core, each pinned to it, one forward thread each: the cache's cpu_threads differs, so its bits do). "
          "Steady: the views over the time from the first shard's start to the last one's end (process and teacher "
          "start-up, cache layout and completion left out)"
          + (f"; medians of {rounds} rounds, every row once per round" if rounds > 1 else "") + "\n")
    print("| teacher | px | images | V | batch | layout | jitter | stage views/s | pure forward views/s | stage / pure |"
          " steady / pure |" + (" stage / pure, each round |" if rounds > 1 else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if rounds > 1 else ""))
    for s in setups:
        rates: dict[tuple[str, str], list[float]] = {}
        steady: dict[tuple[str, str], list[float]] = {}
        pures: list[float] = []
        for _ in range(rounds):
            for layout in layouts:
                workers, depth = LAYOUTS[layout]
                for mode in modes:  # one cache per mode; c trains on the sequential one
                    name = f"cache.name=datapath-{s.label}" + ("" if mode == "sequential" else f"-{mode}")
                    cfg = s.config(f"cache.workers={workers}", f"cache.prefetch={depth}", f"cache.recipe.jitter_mode={mode}",
                                   name)
                    t = time.perf_counter()
                    result = (teacher_stage.run_processes(cfg, storage(root), cpu_cores(), overwrite=True, progress=False)
                              if layout == "procs" else teacher_stage.run(cfg, storage(root), overwrite=True, progress=False))
                    seconds = time.perf_counter() - t
                    assert result.totals is not None, f"{result.cache} not complete"
                    rates.setdefault((layout, mode), []).append(result.totals["teacher_forwards"] / seconds)
                    group = cache.open_group(result.cache, "r")
                    records = [cache.shard_record(group, i) or {} for i in range(result.shards)]
                    span = max(r["finished_at"] for r in records) - min(r["finished_at"] - r["seconds"] for r in records)
                    steady.setdefault((layout, mode), []).append(result.totals["teacher_forwards"] / span)
            pures.append(pure_forward(s.config(), s.batch, s.resolution, pure_batches[s.label]))
        pure = statistics.median(pures)
        for (layout, mode), each in rates.items():
            rate = statistics.median(each)
            ratios = ", ".join(f"{r / p:.2f}" for r, p in zip(each, pures))
            print(f"| {s.arch} | {s.resolution} | {s.images} | {s.views} | {s.batch} | {layout} | {mode} | "
                  f"{rate:.1f} | {pure:.1f} | {rate / pure:.2f} | {statistics.median(steady[layout, mode]) / pure:.2f} |"
                  + (f" {ratios} |" if rounds > 1 else ""), flush=True)
        if "sequential" in modes:
            bank_stage.run(s.config(), storage(root), progress=False)         # for c


def bare_step_ms(arch: str, batch: int, resolution: int, steps: int) -> float:
    """The in-memory bare step: forward + backward + SGD on a fixed batch, Bare's loss."""
    torch.manual_seed(0)
    student = mlp_encoder(arch, 128)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(batch, 3, resolution, resolution)

    def step() -> None:
        loss = F.normalize(student(x).float(), dim=1).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, steps)


def sec_c(root: Path, setups: list[Setup], S: Sizes) -> None:
    print(f"student {S.student}; ms per step of the last epoch (in-memory: {S.bare_steps} steps after one warm-up)\n")
    print("| px | cache | batch | steps/epoch | train.loader.workers | in-memory bare step ms | loop, bare objective ms "
          "| loop, cached SEED ms | cached loop / bare loop | cached loop / bare step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in setups:
        cfg0 = s.config()
        bare = bare_step_ms(S.student, cfg0.train.optim.batch_size, s.resolution, S.bare_steps)
        for workers in (0, 1):
            ms: dict[str, float] = {}
            steps = 0
            objective: ObjectiveFactory
            for name, objective in (("bare", Bare), ("cached", CachedSeed)):
                cfg = s.config(f"train.loader.workers={workers}", f"train.run=datapath-{s.label}-{name}-w{workers}")
                m = student_stage.run(cfg, storage(root), progress=False, objective=objective).metrics[-1]
                ms[name], steps = m["seconds"] / m["steps"] * 1000, m["steps"]
            print(f"| {s.resolution} | {s.arch}, {s.images} images x {s.views} | {cfg0.train.optim.batch_size} | {steps} "
                  f"| {workers} | {bare:.0f} | {ms['bare']:.0f} | {ms['cached']:.0f} | {ms['cached'] / ms['bare']:.2f} "
                  f"| {ms['cached'] / bare:.2f} |", flush=True)


# ---------------------------------------------------------------------------------------------
# d: peak RSS of the student stage


def rss_overrides(root: Path, label: str, data_train: str, resolution: int, images: int, S: Sizes) -> list[str]:
    k = max(1, min(S.bank_k, images // 2))
    return [f"data.train={data_train}", f"teacher.arch={RSS_TEACHER}",
            f"teacher.checkpoint={teacher_checkpoint(root, RSS_TEACHER)}", f"cache.name=datapath-rss-{label}",
            f"cache.views={S.rss_views}", f"cache.resolution={resolution}", "cache.device=cpu",
            f"bank.size={k}", f"bank.topk={min(S.topk, k)}", f"train.students=[{{arch: {S.student}}}]",
            f"train.optim.batch_size={S.rss_batch}", "train.optim.epochs=1",
            f"train.loader.shuffle_buffer={S.rss_shuffle}", "train.loader.workers=0", "train.device=cpu",
            f"train.run=datapath-rss-{label}"]


def rss_child(root: Path, overrides: list[str]) -> None:
    """In a fresh process: the student stage alone (the cache and bank exist), then its peak RSS."""
    if overrides[0] == "bare":                                                # bare STUDENT PX BATCH: no data path
        arch, px, batch = overrides[1], int(overrides[2]), int(overrides[3])
        ms = bare_step_ms(arch, batch, px, 2)
        print(f"{peak_rss_mb():.0f} {ms:.0f}")
        return
    m = student_stage.run(load_config(None, overrides), storage(root), progress=False).metrics[-1]
    print(f"{peak_rss_mb():.0f} {m['seconds'] / m['steps'] * 1000:.0f}")


def run_child(root: Path, overrides: list[str]) -> tuple[str, str]:
    try:
        rss, ms = child(__file__, "--rss-child", str(root), *overrides).split()
    except subprocess.CalledProcessError as exc:
        print(f"child failed:\n{exc.stderr[-3000:]}", flush=True)
        raise
    return rss, ms


def sec_d(root: Path, jdir: Path, S: Sizes) -> None:
    cases = []
    for n in (S.n, 2 * S.n):
        fm = shards(root, n)
        cases.append(("Fashion-MNIST PNG, 28 px", n, 32, rss_overrides(root, f"32-{n}", f"{fm.name}/train/train-*.tar",
                                                                      32, n, S)))
    cases.append(("JPEG, 333-640 px sides", S.n, 224, rss_overrides(root, f"224-{S.n}", f"{jdir.name}/train-*.tar",
                                                                    224, S.n, S)))
    print(f"student {S.student}, batch {S.rss_batch}, shuffle buffer {S.rss_shuffle} encoded examples, one epoch, "
          f"train.loader.workers=0 (one process); caches by a random {RSS_TEACHER}, V = {S.rss_views}\n")
    print("| shards | images N | view px | peak RSS (MB) | ms/step |")
    print("|---|---|---|---|---|")
    for px in (32, 224):
        rss, ms = run_child(root, ["bare", S.student, str(px), str(S.rss_batch)])
        print(f"| none: in-memory bare steps on a random batch (imports, model, activations) | | {px} | {rss} | {ms} |",
              flush=True)
    for what, n, px, overrides in cases:
        cfg = load_config(None, overrides)
        teacher_stage.run(cfg, storage(root), progress=False)
        bank_stage.run(cfg, storage(root), progress=False)
        rss, ms = run_child(root, overrides)
        print(f"| {what} | {n} | {px} | {rss} | {ms} |", flush=True)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--n", type=int, default=None, help="JPEG images for a and N for d (default 2048)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers for a (0 is added)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to test the script (figures mean nothing)")
    parser.add_argument("--sections", default="abcd", help="which sections to run, e.g. a (default abcd)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="a: passes of every pipeline, b: runs of every layout, taking turns; medians are "
                             "printed (default 1)")
    parser.add_argument("--fm-images", type=int, default=None,
                        help="b, c: Fashion-MNIST images of the resnet10t setup at 32 px (default 6000)")
    parser.add_argument("--setups", nargs="+", default=["r10t-32", "r50-224"], choices=["r10t-32", "r50-224"],
                        help="b, c: which setups to run (default both)")
    parser.add_argument("--layouts", nargs="+", default=["auto", "thread", "worker"], choices=list(LAYOUTS),
                        help="b: the teacher stage's data-path layouts (default auto thread worker)")
    parser.add_argument("--jitter-mode", nargs="+", default=["sequential"], choices=JITTER_MODES,
                        help="the recipe's jitter mode(s) of seed's rows in a, and of the teacher stage in b (default sequential)")
    parser.add_argument("--rss-child", nargs="+", help=argparse.SUPPRESS)  # ROOT OVERRIDE... (internal)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), args.rss_child[1:])
        return
    S = QUICK if args.quick else Sizes()
    if args.n is not None:
        S = dataclasses.replace(S, n=args.n)
    if args.fm_images is not None:
        S = dataclasses.replace(S, fm_images=args.fm_images)
    if S.n < S.batch:
        parser.error(f"--n must be at least the batch size {S.batch}")
    root = Path(args.scratch or tempfile.mkdtemp(prefix="seed-datapath-"))
    t0 = time.perf_counter()
    print("# CPU data path\n")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"machine: {machine()}")
    print(f"scratch: {root}{'; QUICK SIZES: the figures mean nothing' if args.quick else ''}")

    unknown = sorted(set(args.sections) - set("abcd"))
    if unknown:
        parser.error(f"--sections: unknown section(s) {', '.join(unknown)} (known: a, b, c, d)")
    if "c" in args.sections and "sequential" not in args.jitter_mode:
        parser.error("section c trains on the sequential caches of b: add sequential to --jitter-mode")
    jdir: list[Path] = []
    if "a" in args.sections:
        section("a. Data path alone at 224 px (decode + view parameters + augment)",
                lambda: jdir.append(sec_a(root, S, args.workers, args.jitter_mode, args.rounds)))
    if not set(args.sections) & set("bcd"):
        print(f"\ndone in {time.perf_counter() - t0:.0f} s")
        return

    setups = []
    if "r10t-32" in args.setups:
        fm = shards(root, S.fm_images)
        setups.append(make_setup(root, "r10t-32", f"{fm.name}/train/train-*.tar", "resnet10t", 32, S.fm_views,
                                 S.fm_batch, S.fm_images, S, S.student_batch_32, S.epochs_32))
    if "r50-224" in args.setups:
        r50_dir = jpeg_shards(root, S.r50_images, per_shard=S.r50_per_shard)
        setups.append(make_setup(root, "r50-224", f"{r50_dir.name}/train-*.tar", "resnet50", 224, S.r50_views,
                                 S.r50_batch, S.r50_images, S, S.student_batch_224, S.epochs_224))
    if "b" in args.sections or "c" in args.sections:  # c trains on b's caches (made by b when absent)
        section("b. Teacher stage against the pure forward",
                lambda: sec_b(root, setups, {"r10t-32": S.r10t_pure_batches, "r50-224": S.r50_pure_batches},
                              args.jitter_mode, args.layouts, args.rounds))
    if "c" in args.sections:
        section("c. Student loop against the bare step", lambda: sec_c(root, setups, S))
    if "d" in args.sections:
        section("d. Peak RSS of the student stage (fresh processes)",
                lambda: sec_d(root, jdir[0] if jdir else jpeg_shards(root, S.n), S))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
