"""The SEED paper's comparison on full Fashion-MNIST, noise-aware and resumable over several sessions.

    python bench/paper_table.py                       # the whole table (hours on 2 CPU cores; resumable)
    python bench/paper_table.py --quick --scratch /tmp/pt   # a few minutes: 2,000 images, 1 epoch, 2 seeds
    python bench/paper_table.py --render              # re-render docs/results.md and the PNG from the row files

Arms (every student is the same architecture trained for the same number of epochs):
  references   raw pixels; the randomly initialised student (normalised like the students);
  teachers     MoCo-v2 ``resnet10t`` (Shuffle-BN) and a supervised ``resnet10t`` (cross-entropy), one run each;
  students     MoCo-v2 alone (MoCo's recipe: lr 0.03 x batch/256, Shuffle-BN); online SEED; cached SEED
               (default bank, ``train.view=random``) at V = 1, 2, 4, 8; at V = 4 rotating banks
               (``bank.rotations``), a larger tau_T (``--tau-t``, 0.01) and the FIFO queue of cached
               embeddings (``train.bank=queue``); cached SEED (V = 4) from the supervised teacher;
  amortisation two more student architectures from the V = 4 cache and online, seed 0 only.
Each student arm runs every seed of ``--seeds``: seed s sets ``train.seed = bank.seed = s`` (teachers and
caches are shared by all seeds). Columns: weighted kNN top-1 (k = 20) and linear-probe top-1 on the test
split as mean +- SD over seeds, wall times, teacher forwards; targets are decided by the rule in ``verdict``.

Every stage goes through the pipeline's own functions (``pipeline.pretrain``, ``.teacher``, ``.bank``,
``.student``). Each finished (arm, seed) is saved as ``<rows>/<settings>/<arm>-s<seed>.json`` (``--rows``,
default ``docs/results/rows``, committed, so the table can be completed over several sessions); a re-run
reads finished rows back and resumes unfinished stages (teacher shards, training epochs) from ``--scratch``
(shards, caches, checkpoints; default ``.bench/paper-table``, git-ignored). Every invocation, ``--arms`` ones
included, re-renders ``docs/results.md`` and ``docs/results-accuracy-vs-views.png`` from all the row files of its
settings; until every planned row exists, the page says which are missing (``--quick`` keeps rows and output
in the scratch directory). The page's command is the table's, not the invocation's: its settings, without
paths or ``--arms``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine, shards, storage  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from pipeline import pretrain as pretrain_stage  # noqa: E402
from pipeline import student as student_stage  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from pipeline.evaluate import random_student  # noqa: E402
from seed.augment import apply_batch, blur_kernel_size  # noqa: E402
from seed.checkpoint import load_student  # noqa: E402
from seed import cache as cache_mod  # noqa: E402
from seed.config import RunConfig, load_config  # noqa: E402
from seed.evaluate import extract, images, pixels, score  # noqa: E402
from seed.report import save_figure  # noqa: E402
from seed.shards import decode_image, expand_urls, iter_shard  # noqa: E402
from seed.teachers import load_teacher  # noqa: E402
from seed.views import COL, Recipe, draw_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDENT = "mobilenetv3_small_050"
# One linear probe for every row, so that their scores compare: full-batch L-BFGS fits every row here (at
# most 60,000 x 3,072 floats, the raw pixels; ``probe_method`` alone would give that row Adam)
PROBE = "lbfgs"
TEACHER = "resnet10t"
AMORTISE = ("resnet10t", "regnetx_002")  # with STUDENT: three students from one cache (all train at 32 px;
# lcnet_050 does not: its pooled features are ~1e-10 at init and its kNN stays at chance)
AT_V = 4  # the cache of the bank comparisons, the supervised row and the amortisation rows
SINGLE = ("raw-pixels", "teacher-moco", "teacher-supervised")  # one run by design (deterministic or shared)
TAU_T = 1e-4  # SEED's teacher temperature, every arm's but the one that measures a larger one
SIGMAS = 2.0  # the verdict rule's width: met / missed beyond 2 standard errors


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def settings_key(a: argparse.Namespace) -> str:
    """The directory of the rows measured under these settings: a changed setting never reads back other rows."""
    return (f"n{a.limit}-e{a.epochs}-t{a.teacher_epochs}-s{a.supervised_epochs}-k{a.bank}-top{a.topk}"
            f"-bn{a.shuffle_bn}")


@dataclasses.dataclass(frozen=True)
class Job:
    """What an arm measures: ``kind`` is ``pixels``, ``random`` (the references), ``teacher``, ``moco-only`` or
    ``seed`` (a SEED student; the other fields are its settings)."""

    kind: str
    teacher: str = "moco"
    mode: str = ""
    views: int = 0
    bank: str = "fixed"
    rotations: int = 1
    arch: str = STUDENT
    tau_t: float = TAU_T


class Planned(NamedTuple):
    key: str
    seeds: tuple[int, ...]
    job: Job


def plan(views: list[int], rotations: int, tau_t: float, seeds: list[int]) -> list[Planned]:
    """Every arm of the table in running order, with the seeds it runs and what it measures: what a complete
    table holds."""
    every, first = tuple(seeds), (0,)  # one-run arms are seed 0's, whatever --seeds lists
    cached = functools.partial(Job, "seed", mode="cached", views=AT_V)
    arms = [Planned("raw-pixels", first, Job("pixels")), Planned("random", every, Job("random")),
            Planned("teacher-moco", first, Job("teacher")),
            Planned("teacher-supervised", first, Job("teacher", teacher="supervised")),
            Planned("moco-only", every, Job("moco-only")), Planned("online", every, Job("seed", mode="online")),
            *(Planned(f"cached-v{v}", every, cached(views=v)) for v in views),
            Planned(f"cached-v{AT_V}-rot{rotations}", every, cached(rotations=rotations)),
            Planned(f"cached-v{AT_V}-tau{tau_t:g}", every, cached(tau_t=tau_t)),
            Planned(f"cached-v{AT_V}-queue", every, cached(bank="queue")),
            Planned(f"supervised-cached-v{AT_V}", every, cached(teacher="supervised"))]
    for arch in AMORTISE:
        arms += [Planned(f"amort-cached-{arch}", first, cached(arch=arch)),
                 Planned(f"amort-online-{arch}", first, Job("seed", mode="online", arch=arch))]
    return arms


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(args.scratch).resolve()
        self.key = settings_key(args)
        self.rows_dir = Path(args.rows).resolve() / self.key
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        data = shards(self.root, args.limit, per_shard=args.per_shard)
        self.storage = storage(self.root)
        self.data = data.name
        self._eval: tuple[Any, ...] | None = None

    # -- configuration ----------------------------------------------------------------------------
    def config(self, *overrides: str) -> RunConfig:
        a = self.args
        return load_config(None, [f"data.train={self.data}/train/train-*.tar", f"data.test={self.data}/test/test-*.tar",
                                  "cache.resolution=32", "cache.recipe.blur_p=0", "cache.seed=0", f"bank.size={a.bank}",
                                  f"bank.topk={a.topk}", f"bank.tau_t={TAU_T}", f"train.students=[{{arch: {STUDENT}}}]",
                                  f"train.optim.epochs={a.epochs}", "train.seed=0", f"pretrain.queue={a.bank}",
                                  *overrides])

    def pretrain_config(self, method: str, arch: str, epochs: int, seed: int = 0, *extra: str) -> RunConfig:
        shuffle = [f"pretrain.shuffle_bn={self.args.shuffle_bn}"] if method == "moco" else []
        return self.config(f"pretrain.name={self.key}-pt-{method}-{arch}-s{seed}", f"pretrain.method={method}",
                           f"pretrain.arch={arch}", f"pretrain.optim.epochs={epochs}", f"pretrain.seed={seed}",
                           *shuffle, *extra)

    def teacher_epochs(self, method: str) -> int:
        return self.args.teacher_epochs if method == "moco" else self.args.supervised_epochs

    def teacher(self, method: str) -> tuple[pretrain_stage.PretrainResult, float]:
        """The shared teacher, pre-trained now unless a finished one with the same config exists."""
        return self.pretrain(self.pretrain_config(method, TEACHER, self.teacher_epochs(method)))

    def teacher_overrides(self, method: str) -> list[str]:
        t = self.teacher(method)[0].teacher
        return [f"teacher.arch={t.arch}", f"teacher.checkpoint={t.checkpoint}", f"teacher.format={t.format}",
                f"teacher.output={t.output}"]

    # -- evaluation -------------------------------------------------------------------------------
    def eval_data(self) -> tuple[Any, ...]:
        if self._eval is None:
            cfg = self.config()
            tr = images(expand_urls(self.storage.resolve("shards", cfg.data.train)), 32)
            te = images(expand_urls(self.storage.resolve("shards", cfg.data.test)), 32)
            self._eval = (*tr, *te)
        return self._eval

    def score(self, encode: Any) -> dict[str, Any]:
        """Scores of an encoder's features (an image batch -> feature batch callable) and their seconds."""
        t0 = time.perf_counter()
        train_x, train_y, test_x, test_y = self.eval_data()
        device = torch.device("cpu")
        tr, te = extract(encode, train_x, device), extract(encode, test_x, device)
        return {**score(tr, train_y, te, test_y, method=PROBE).as_dict(), "eval_s": time.perf_counter() - t0}

    # -- rows -------------------------------------------------------------------------------------
    def row(self, arm: Planned, seed: int) -> dict[str, Any]:
        """The saved row of (``arm``, ``seed``), or measure it now and save it."""
        path = self.rows_dir / f"{arm.key}-s{seed}.json"
        if path.exists():
            return json.loads(path.read_text())
        log(f"row {arm.key} seed {seed}: start")
        t0 = time.perf_counter()
        row = {"arm": arm.key, "seed": seed, **self.measure(arm, seed), "machine": machine(),
               "invocation_s": round(time.perf_counter() - t0, 1)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1))
        tmp.replace(path)  # a row file is complete or absent
        log(f"row {arm.key} seed {seed}: kNN {row['knn']:.2f}  linear {row['linear']:.2f}  "
            f"{row['invocation_s'] / 60:.1f} min")
        return row

    def pixels_row(self, seed: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        train_x, train_y, test_x, test_y = self.eval_data()
        out = score(pixels(train_x), train_y, pixels(test_x), test_y, center=True, method=PROBE).as_dict()
        return {"name": "raw pixels (32 px, centred)", "group": "reference", **out, "eval_s": time.perf_counter() - t0}

    def random_row(self, seed: int) -> dict[str, Any]:
        model, _ = random_student(STUDENT, False, seed)
        return {"name": f"{STUDENT} random init", "group": "reference", **self.score(model.features)}

    def pretrain(self, cfg: RunConfig) -> tuple[pretrain_stage.PretrainResult, float]:
        p = cfg.pretrain
        t0 = time.perf_counter()
        out = pretrain_stage.run(cfg, self.storage, resume=True, progress=False,
                                 on_epoch=lambda e, r: log(f"  pretrain {p.method} {p.arch} seed {p.seed} epoch {e + 1}: "
                                                           f"{r['images_per_s']} img/s"))
        seconds = sum(m["seconds"] for m in out.metrics) if out.metrics else time.perf_counter() - t0
        return out, seconds

    def teacher_row(self, method: str) -> dict[str, Any]:
        epochs = self.teacher_epochs(method)
        out, seconds = self.teacher(method)
        teacher, report = load_teacher(out.teacher)
        return {"name": f"{'MoCo-v2' if method == 'moco' else 'supervised'} teacher {TEACHER}", "group": "teacher",
                "method": method, "epochs": epochs, "train_s": seconds, "teacher_forwards": 0,
                "teacher_sha256": report.sha256, **self.score(teacher.features)}

    def moco_only_row(self, seed: int) -> dict[str, Any]:
        """MoCo-v2 alone, with MoCo's recipe: lr 0.03 x batch/256, Shuffle-BN, the students' epochs."""
        e = self.args.epochs
        out, seconds = self.pretrain(self.pretrain_config("moco", STUDENT, e, seed, "pretrain.optim.base_lr=0.03"))
        model, _ = load_teacher(out.teacher)
        return {"name": f"{STUDENT} by MoCo-v2 alone", "group": "student", "teacher": "none", "mode": "moco",
                "arch": STUDENT, "epochs": e, "train_s": seconds, "teacher_forwards": 0, **self.score(model.features)}

    def seed_row(self, arm: str, seed: int, job: Job) -> dict[str, Any]:
        e = self.args.epochs
        over = [*self.teacher_overrides(job.teacher), f"train.mode={job.mode}", f"train.run={self.key}-{arm}-s{seed}",
                f"train.seed={seed}", f"bank.seed={seed}", f"train.students=[{{arch: {job.arch}}}]", f"bank.tau_t={job.tau_t}"]
        bank_s = pass_s = 0.0
        if job.mode == "cached":
            over += [f"cache.name={self.key}-{job.teacher}-v{job.views}", f"cache.views={job.views}", "train.view=random"]
            over += ["train.bank=queue"] if job.bank == "queue" else []
            over += [f"bank.rotations={job.rotations}"] if job.rotations > 1 else []
            cfg = self.config(*over)
            teacher_stage.run(cfg, self.storage, progress=False)
            if job.bank != "queue":  # the queue is filled from the cache while training: no bank stage
                bank_s = float(bank_stage.run(cfg, self.storage, progress=False).summary.get("seconds", 0.0))
            group = cache_mod.open_complete(self.storage.cache_url(cfg.cache.name))
            totals = group.attrs["totals"]  # the cache's own records: survive interruptions and reuse
            pass_s, forwards = float(totals["stage_seconds"]), int(totals["teacher_forwards"])
            log(f"  cache {cfg.cache.name}: {forwards:,} teacher forwards, {pass_s / 60:.1f} min; "
                f"bank {bank_s / 60:.1f} min")
        else:
            cfg = self.config(*over)
        t0 = time.perf_counter()
        out = student_stage.run(cfg, self.storage, resume=True, progress=False,
                                on_epoch=lambda ep, r: log(f"  {arm} seed {seed} epoch {ep + 1}: {r['images_per_s']} img/s, "
                                                           f"loss {next(iter(r['loss'].values())):.4f}"))
        train_s = sum(m["seconds"] for m in out.metrics) or time.perf_counter() - t0
        if job.mode == "online":
            forwards = out.teacher_forwards
        model, _ = load_student(next(iter(out.students.values())))
        _, report = load_teacher(cfg.teacher)
        what = {"fixed": "", "queue": ", queue of cached embeddings"}.get(job.bank, "")
        what += f", {job.rotations} rotating banks" if job.rotations > 1 else ""
        what += f", tau_T = {job.tau_t:g}" if job.tau_t != TAU_T else ""
        label = f"{job.mode} SEED" + (f", V = {job.views}{what}" if job.mode == "cached" else "")
        source = "MoCo-v2" if job.teacher == "moco" else "supervised"
        return {"name": f"{job.arch} by {label} from the {source} teacher", "group": "student", "teacher": job.teacher,
                "mode": job.mode, "views": job.views, "bank": job.bank, "rotations": job.rotations, "tau_t": job.tau_t,
                "arch": job.arch, "epochs": e,
                "train_s": train_s, "bank_s": bank_s, "teacher_pass_s": pass_s, "teacher_forwards": forwards,
                "teacher_sha256": report.sha256, **self.score(model.features)}

    def recipe(self) -> dict[str, Any]:
        """The recipe's measured effect at 32 px (``_recipe.json``, made once per settings)."""
        path = self.rows_dir / "_recipe.json"
        if not path.exists():
            cfg = self.config()
            out = measure_recipe(expand_urls(self.storage.resolve("shards", cfg.data.train)), Recipe())  # MoCo-v2's
            path.write_text(json.dumps(out, indent=1))
        return json.loads(path.read_text())

    # -- the table --------------------------------------------------------------------------------
    def arms(self) -> list[Planned]:
        a = self.args
        arms = plan(a.views, a.rotations, a.tau_t, a.seeds)
        if a.arms:
            unknown = sorted(set(a.arms) - {arm.key for arm in arms})
            if unknown:
                raise SystemExit(f"paper_table: unknown arms {unknown} (known: {', '.join(arm.key for arm in arms)})")
            arms = [arm for arm in arms if arm.key in a.arms]
        return arms

    def measure(self, arm: Planned, seed: int) -> dict[str, Any]:
        """One (arm, seed) row, measured."""
        job = arm.job
        if job.kind == "pixels":
            return self.pixels_row(seed)
        if job.kind == "random":
            return self.random_row(seed)
        if job.kind == "teacher":
            return self.teacher_row(job.teacher)
        if job.kind == "moco-only":
            return self.moco_only_row(seed)
        return self.seed_row(arm.key, seed, job)

    def settings(self) -> dict[str, Any]:
        a = self.args
        return {"key": self.key, "limit": a.limit, "n_test": min(a.limit, 10_000), "per_shard": a.per_shard,
                "epochs": a.epochs, "teacher_epochs": a.teacher_epochs,
                "teacher_lr": self.config().pretrain.optim.base_lr, "supervised_epochs": a.supervised_epochs,
                "bank": a.bank, "topk": a.topk, "tau_t_large": a.tau_t, "shuffle_bn": a.shuffle_bn, "seeds": list(a.seeds),
                "views": list(a.views), "rotations": a.rotations, "student": STUDENT, "teacher": TEACHER,
                "amortise": [STUDENT, *AMORTISE], "at_v": AT_V, "command": command_line(a),
                "plan": [[arm.key, list(arm.seeds)] for arm in plan(a.views, a.rotations, a.tau_t, a.seeds)
                         if not a.quick or arm.key in QUICK_ARMS]}


def measure_recipe(urls: list[str], recipe: Recipe, n: int = 1024, n_large: int = 128) -> dict[str, Any]:
    """What MoCo-v2's recipe does to grey 28 px images viewed at 32 px: the blur's size and its measured
    effect (one view of each of the first ``n`` images, blur on against off; also at 224 px, MoCo's own size,
    on ``n_large`` of them), and the change from the colour operations that cannot act on grey images."""
    imgs, keys = [], []
    for url in urls:
        for s in iter_shard(url):
            imgs.append(decode_image(s))
            keys.append(s.key)
            if len(imgs) == n:
                break
        if len(imgs) == n:
            break
    h, w = imgs[0].shape[-2:]
    grey = all(bool((x[0] == x[1]).all() and (x[1] == x[2]).all()) for x in imgs)
    rows = torch.from_numpy(np.stack([draw_params(recipe, seed=0, key=k, view=0, height=h, width=w) for k in keys]))
    no_blur = rows.clone()
    no_blur[:, COL["blur_sigma"]] = 0.0
    colourless = rows.clone()
    colourless[:, COL["saturation"]], colourless[:, COL["hue"]], colourless[:, COL["grayscale"]] = 1.0, 0.0, 0.0
    blurred = rows[:, COL["blur_sigma"]] > 0

    def change(a: torch.Tensor, b: torch.Tensor, size: int, m: int) -> torch.Tensor:
        """|view(a) - view(b)| in grey levels (0-255), per view: [m, 3, size, size]."""
        return (apply_batch(imgs[:m], a[:m], recipe, size) - apply_batch(imgs[:m], b[:m], recipe, size)).abs() * 255

    out: dict[str, Any] = {"images": n, "images_224": n_large, "source_px": [int(h), int(w)], "grey": grey,
                           "blur_p": recipe.blur_p, "blurred_fraction": float(blurred.float().mean())}
    for size, m in ((32, n), (224, n_large)):
        d = change(rows, no_blur, size, m)
        sigma = [s * size / recipe.blur_reference_size for s in recipe.blur_sigma]
        tap = math.exp(-0.5 / sigma[1] ** 2)  # a neighbour's weight against the centre's at the largest sigma
        out[f"blur_{size}"] = {"sigma_px": sigma, "kernel": blur_kernel_size(recipe, (size, size)),
                               "neighbour_weight": tap / (1 + 2 * tap),
                               "mean_abs_all": float(d.mean()), "mean_abs_blurred": float(d[blurred[:m]].mean()),
                               "max_abs": float(d.max())}
    d = change(rows, colourless, 32, n)
    out["colour_on_grey"] = {"mean_abs": float(d.mean()), "max_abs": float(d.max())}
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that measures this table: the settings that differ from the defaults, without the
    options that only choose where files go or which rows this invocation runs."""
    if args.quick:
        return "python bench/paper_table.py --quick"
    defaults = vars(parse([]))
    shown = []
    for name in SETTINGS_OPTIONS:
        value = getattr(args, name)
        if value != defaults[name]:
            flag = "--" + name.replace("_", "-")
            shown += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return "python " + " ".join(shlex.quote(a) for a in ["bench/paper_table.py", *shown])


# The arms of a --quick run.
QUICK_ARMS = ("raw-pixels", "random", "teacher-moco", "teacher-supervised", "moco-only", "online", "cached-v1",
              "cached-v4", "cached-v4-rot2", "cached-v4-tau0.01", "cached-v4-queue", "supervised-cached-v4",
              *(f"amort-{mode}-{arch}" for arch in AMORTISE for mode in ("cached", "online")))
# The options that decide what the table measures (the others choose paths and which rows run now).
SETTINGS_OPTIONS = ("limit", "per_shard", "epochs", "teacher_epochs", "supervised_epochs", "views", "seeds", "bank",
                    "topk", "rotations", "tau_t", "shuffle_bn")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default=str(REPO / ".bench" / "paper-table"), help="shards, caches, runs (git-ignored)")
    p.add_argument("--rows", default=None, help="row files, one per (arm, seed), under <rows>/<settings>/ "
                                                "(default docs/results/rows; --quick: <scratch>/rows)")
    p.add_argument("--out", default=None, help="the results page (default docs/results.md; --quick: <scratch>/results.md)")
    p.add_argument("--render", action="store_true", help="only re-render the page and the PNG from the row files")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2,000 images, 1 epoch, K = 256, seeds 0 1, V = 1 4, a subset of the arms")
    p.add_argument("--limit", type=int, default=60000, help="first N images of each split (60,000: all of train, all 10,000 of test)")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=8, help="epochs of every student (>= the largest V)")
    p.add_argument("--teacher-epochs", type=int, default=10, help="MoCo-v2 teacher epochs")
    p.add_argument("--supervised-epochs", type=int, default=2, help="supervised teacher epochs")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="train.seed = bank.seed = s for each s (the whole list: finished rows are read back)")
    p.add_argument("--bank", type=int, default=4096, help="bank size K (online and queue modes: queue length)")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--rotations", type=int, default=4, help="R of the rotating-banks arm (bank.rotations)")
    p.add_argument("--tau-t", type=float, default=0.01,
                   help="tau_T of the arm that measures a larger teacher temperature (the top-k keeps 0.99 of its mass)")
    p.add_argument("--shuffle-bn", type=int, default=4, help="MoCo Shuffle-BN sub-batches (pretrain.shuffle_bn)")
    p.add_argument("--arms", nargs="+", default=None, help="only these arms (default: all; --quick: a subset)")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.per_shard, args.epochs, args.teacher_epochs, args.supervised_epochs = 2000, 500, 1, 1, 1
        args.views, args.seeds, args.bank, args.topk, args.rotations = [1, 4], [0, 1], 256, 32, 2
        args.arms = args.arms or list(QUICK_ARMS)
    quick_dir = Path(args.scratch)
    args.rows = args.rows or str(quick_dir / "rows" if args.quick else REPO / "docs" / "results" / "rows")
    args.out = args.out or str(quick_dir / "results.md" if args.quick else REPO / "docs" / "results.md")
    return args


def main() -> None:
    args = parse()
    rows_dir = Path(args.rows).resolve() / settings_key(args)
    if args.render:
        render(rows_dir, Path(args.out))
        return
    start = time.perf_counter()
    b = Bench(args)
    log(f"paper table: {machine()}; scratch {b.root}; rows {b.rows_dir}")
    (b.rows_dir / "_settings.json").write_text(json.dumps(b.settings(), indent=1))
    b.recipe()
    failed = []
    arms = b.arms()
    for seed in sorted({s for arm in arms for s in arm.seeds}):  # every arm's first seed before any arm's second
        for arm in arms:
            if seed not in arm.seeds:
                continue
            try:
                b.row(arm, seed)
            except Exception:  # one broken arm must not stop hours of the others; reported at the end
                log(f"row {arm.key} seed {seed}: FAILED\n{traceback.format_exc()}")
                failed.append(f"{arm.key} seed {seed}")
    render(b.rows_dir, Path(args.out))
    log(f"this invocation: {(time.perf_counter() - start) / 60:.1f} min")
    if failed:
        raise SystemExit(f"paper_table: {len(failed)} rows failed (see above): {', '.join(failed)}")


# -- statistics ------------------------------------------------------------------------------------
def mean_sd(xs: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (n - 1; None for one value) and n."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None), n


def verdict(a: list[float], b: list[float], margin: float = 0.0, rule: str = "above") -> dict[str, Any]:
    """Arm A against arm B: d = mean(A) - mean(B), se = sqrt(sA^2/nA + sB^2/nB) (an arm of one run adds 0).

    ``above`` (A exceeds B by more than ``margin``): met when d - margin > 2 se, missed when d - margin < -2 se,
    else inconclusive. ``not-worse`` (A is not below B by more than ``margin``): missed when d + margin < -2 se,
    else met; there is no inconclusive outcome, so d and se say how close it was.
    """
    (ma, sa, na), (mb, sb, nb) = mean_sd(a), mean_sd(b)
    d = ma - mb
    se = math.sqrt((sa or 0.0) ** 2 / na + (sb or 0.0) ** 2 / nb)
    if rule == "above":
        z = d - margin
        out = "met" if z > SIGMAS * se else "missed" if z < -SIGMAS * se else "inconclusive"
    elif rule == "not-worse":
        out = "missed" if d + margin < -SIGMAS * se else "met"
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return {"d": d, "se": se, "verdict": out}


def load_rows(rows_dir: Path) -> list[dict[str, Any]]:
    """Every row file of a settings directory (``_*.json`` are not rows)."""
    return [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json")) if not p.name.startswith("_")]


def arm_order(arm: str) -> tuple[int, int, str]:
    """The table's order: references, teachers, MoCo alone, online, the V curve, the other banks, the rest."""
    fixed = ("raw-pixels", "random", "teacher-moco", "teacher-supervised", "moco-only", "online")
    if arm in fixed:
        return fixed.index(arm), 0, arm
    m = re.fullmatch(r"cached-v(\d+)(.*)", arm)
    if m:
        return (6 if not m.group(2) else 7), int(m.group(1)), m.group(2)
    return (8 if arm.startswith("supervised-") else 9), 0, arm


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm (in ``arm_order``): the lowest seed's row's descriptive fields, ``n``, ``seeds``, mean/SD of
    kNN and linear (``knn``, ``knn_sd``, ``knn_all`` in seed order, ...) and the mean of the time columns."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (arm_order(r["arm"]), r["seed"])):
        by.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, rs in by.items():
        s = {**rs[0], "n": len(rs), "seeds": [r["seed"] for r in rs]}
        for metric in ("knn", "linear"):
            values = [float(r[metric]) for r in rs]
            s[metric], s[f"{metric}_sd"], _ = mean_sd(values)
            s[f"{metric}_all"] = values
        for col in ("train_s", "bank_s", "eval_s"):
            if any(col in r for r in rs):
                s[col] = sum(float(r.get(col, 0.0)) for r in rs) / len(rs)
        s["teacher_sha256_all"] = sorted({r["teacher_sha256"] for r in rs if r.get("teacher_sha256")})
        out[arm] = s
    return out


def pm(s: dict[str, Any], metric: str) -> str:
    sd = s[f"{metric}_sd"]
    return f"{s[metric]:.2f} ± {sd:.2f} ({s['n']})" if sd is not None else f"{s[metric]:.2f} ({s['n']})"


def seed_arms(stats: dict[str, dict[str, Any]]) -> list[str]:
    return [k for k, s in stats.items() if s.get("group") == "student" and s.get("mode") in ("online", "cached")
            and not k.startswith("amort-")]


def targets(stats: dict[str, dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target (and each comparison made by the same rule without a target) with its verdict."""
    expected = len(settings.get("seeds", [])) or 1
    out = []

    def compare(what: str, a: str, b: str, margin: float, rule: str, target: bool = True) -> None:
        if a not in stats or b not in stats:
            return
        sa, sb = stats[a], stats[b]
        v = verdict(sa["knn_all"], sb["knn_all"], margin, rule)
        short = [k for k in (a, b) if k not in SINGLE and stats[k]["n"] < min(expected, 2)]
        if short:
            v["verdict"] = f"pending ({', '.join(short)}: n = 1)"
        single = [k for k in (a, b) if stats[k]["n"] == 1 and k in SINGLE]
        note = f"; {' and '.join(single)}: a single run, no spread, so se is only the other arm's" if single else ""
        if len(single) == 2:
            note = "; both single runs: se = 0 and the rule is the sign of d - margin"
        few = [f"{k}: n = {stats[k]['n']}" for k in (a, b) if k not in SINGLE and 1 < stats[k]["n"] < expected]
        note += f"; fewer seeds than the {expected} planned ({', '.join(few)})" if few else ""
        out.append({"what": what, "a": a, "b": b, "margin": margin, "rule": rule, "target": target, **v,
                    "detail": f"{pm(sa, 'knn')} vs {pm(sb, 'knn')}: d = {v['d']:+.2f}, se = {v['se']:.2f}{note}"})

    for k in seed_arms(stats):
        compare(f"{stats[k]['name']} >= MoCo-v2 alone + 10 kNN points", k, "moco-only", 10.0, "above")
    for k in seed_arms(stats):
        s = stats[k]
        if s["mode"] == "cached" and s.get("teacher") == "moco" and s.get("views", 0) >= AT_V:
            default = s.get("bank", "fixed") == "fixed" and s.get("rotations", 1) == 1 and s.get("tau_t", TAU_T) == TAU_T
            compare(f"{s['name']} not worse than online SEED", k, "online", 0.0, "not-worse", target=default)
    compare(f"MoCo-v2 teacher {TEACHER} above raw pixels", "teacher-moco", "raw-pixels", 0.0, "above")
    return out


# -- output ----------------------------------------------------------------------------------------
def plot(stats: dict[str, dict[str, Any]], settings: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    cached = sorted((s for k, s in stats.items() if k.startswith("cached-v") and k[len("cached-v"):].isdigit()),
                    key=lambda s: s["views"])
    vs = [s["views"] for s in cached]
    for ax, metric, title in ((axes[0], "knn", "weighted kNN (k = 20)"), (axes[1], "linear", "linear probe")):
        def err(s: dict[str, Any], metric: str = metric) -> float:
            return s[f"{metric}_sd"] or 0.0
        ax.errorbar(vs, [s[metric] for s in cached], yerr=[err(s) for s in cached], fmt="o-", color="C0", capsize=4,
                    label="cached SEED, default bank (MoCo-v2 teacher)")
        for k, dx, fmt, color, label in ((f"cached-v{AT_V}-rot{settings.get('rotations', 0)}", 1.08, "^", "C4",
                                          f"cached SEED V = {AT_V}, rotating banks"),
                                         (f"cached-v{AT_V}-queue", 0.92, "v", "C5", f"cached SEED V = {AT_V}, queue"),
                                         (f"supervised-cached-v{AT_V}", 1.16, "s", "C3",
                                          f"cached SEED V = {AT_V} (supervised teacher)")):
            if k in stats:
                ax.errorbar([AT_V * dx], [stats[k][metric]], yerr=[err(stats[k])], fmt=fmt, color=color, capsize=4,
                            label=label)
        for k, style, color, label in (("online", "--", "C0", "online SEED (MoCo-v2 teacher), ± SD"),
                                       ("moco-only", "-", "C1", "student by MoCo-v2 alone, ± SD"),
                                       ("random", "-", "black", "random student, ± SD"),
                                       ("teacher-moco", ":", "C2", "MoCo-v2 teacher"),
                                       ("teacher-supervised", ":", "C3", "supervised teacher"),
                                       ("raw-pixels", "-.", "grey", "raw pixels")):
            if k in stats:
                m = stats[k][metric]
                ax.axhline(m, linestyle=style, color=color, alpha=0.7, label=label)
                if stats[k][f"{metric}_sd"]:
                    ax.axhspan(m - err(stats[k]), m + err(stats[k]), color=color, alpha=0.1)
        if vs:  # a log axis needs points (a partial table may have only the reference lines)
            ax.set_xscale("log", base=2)
            ax.set_xticks(vs, [str(v) for v in vs])
        ax.set_xlabel("views per image in the cache (V)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on the test split (%), mean ± SD")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"Fashion-MNIST, {settings.get('student', STUDENT)} students, {settings.get('epochs')} epochs, "
                 f"seeds {settings.get('seeds')}")
    save_figure(fig, str(path))
    plt.close(fig)


def minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f}" if seconds else ""


def table_text(stats: dict[str, dict[str, Any]]) -> str:
    from seed.report import markdown_table

    rows = []
    for k, s in stats.items():
        if k.startswith("amort-"):
            continue
        once = (s.get("teacher_pass_s") or 0.0) + (s.get("bank_s") or 0.0)
        forwards = s.get("teacher_forwards")
        rows.append({"name": s["name"], "arm": f"`{k}`", "knn": pm(s, "knn"), "linear": pm(s, "linear"),
                     "epochs": s.get("epochs", ""), "train": minutes(s.get("train_s")),
                     "once": (f"{minutes(s.get('teacher_pass_s'))} + {minutes(s.get('bank_s')) or '0'}" if once else ""),
                     "forwards": (f"{forwards:,}" + (" (once per cache)" if s.get("mode") == "cached" else ""))
                     if s.get("group") == "student" else ""})
    return markdown_table(rows, [("name", "row"), ("arm", "arm"), ("knn", "kNN top-1 (%), mean ± SD (n)"),
                                 ("linear", "linear top-1 (%), mean ± SD (n)"), ("epochs", "epochs"),
                                 ("train", "training (min, per seed)"),
                                 ("once", "teacher pass + bank (min)"), ("forwards", "teacher forwards")])


def pending(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The planned (arm, seed) rows that have no row file yet."""
    have = {(r["arm"], r["seed"]) for r in rows}
    planned = settings.get("plan")  # written by every measuring invocation
    if not planned:
        return "The settings file lists no plan, so the rows still to measure are not known."
    missing = [(k, [s for s in seeds if (k, s) not in have]) for k, seeds in planned]
    missing = [(k, seeds) for k, seeds in missing if seeds]
    if not missing:
        return "Every planned row is measured."
    n = sum(len(seeds) for _, seeds in missing)
    return (f"**The table is incomplete**: {n} planned rows have no row file yet, so the targets below that need "
            "them are pending or absent. Not measured yet: "
            + "; ".join(f"`{k}` (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})" for k, seeds in missing)
            + ".")


def amortisation(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """Three students from one V = 4 cache against three online runs, seed 0's rows: teacher forwards and wall
    time in total."""
    from seed.report import markdown_table

    seed = 0
    by = {r["arm"]: r for r in rows if r["seed"] == seed}
    archs = settings.get("amortise", [STUDENT, *AMORTISE])
    pairs = [(arch, by.get(f"cached-v{AT_V}" if arch == STUDENT else f"amort-cached-{arch}"),
              by.get("online" if arch == STUDENT else f"amort-online-{arch}")) for arch in archs]
    done = [(arch, c, o) for arch, c, o in pairs if c and o]
    if not done:
        return "No amortisation rows measured yet."
    table = [{"arch": f"`{arch}`", "cached": f"{c['knn']:.2f}", "online": f"{o['knn']:.2f}",
              "cached_train": minutes(c["train_s"]), "online_train": minutes(o["train_s"]),
              "online_fw": f"{o['teacher_forwards']:,}"} for arch, c, o in done]
    c0 = done[0][1]
    pass_s, bank_s, cache_fw = float(c0.get("teacher_pass_s") or 0.0), float(c0.get("bank_s") or 0.0), c0["teacher_forwards"]
    cached_total = pass_s + bank_s + sum(c["train_s"] for _, c, _ in done)
    online_total = sum(o["train_s"] for _, _, o in done)
    online_fw = sum(o["teacher_forwards"] for _, _, o in done)
    table.append({"arch": f"**total, {len(done)} students**", "cached": f"{cache_fw:,} forwards, once",
                  "cached_train": f"**{minutes(cached_total)}** (teacher pass {minutes(pass_s)} + bank "
                                  f"{minutes(bank_s) or '0'}, once)",
                  "online_train": f"**{minutes(online_total)}**", "online_fw": f"**{online_fw:,}**", "online": ""})
    text = markdown_table(table, [("arch", "student"), ("cached", f"cached V = {AT_V}: kNN (%)"),
                                  ("online", "online: kNN (%)"), ("cached_train", "cached: wall (min)"),
                                  ("online_train", "online: wall (min)"), ("online_fw", "online: teacher forwards")])
    missing = [arch for arch, c, o in pairs if not (c and o)]
    return text + (f"\n\nNot measured yet: {', '.join(missing)}." if missing else "") + (
        f"\n\nSeed {seed}, one run each. The cache spends V x N = {cache_fw:,} teacher forwards once for all "
        f"{len(done)} students; online SEED spends N per student per epoch, {online_fw:,} for these {len(done)} runs "
        f"of {settings.get('epochs')} epochs. Wall: the cached column adds the teacher pass and the bank once to "
        "the students' training; each online run's training includes its teacher forwards.")


def recipe_text(r: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    if not r:
        return "Not measured yet (the first run writes `_recipe.json` beside the rows)."
    b32, b224, grey = r["blur_32"], r["blur_224"], r["colour_on_grey"]
    lo, hi = b32["sigma_px"]
    return f"""Fashion-MNIST images are grey {r['source_px'][0]} x {r['source_px'][1]} px (stored as RGB with three equal
channels: {'checked on' if r['grey'] else 'NOT true for'} the {r['images']:,} images measured), and every view is a
RandomResizedCrop of scale (0.2, 1) of that image resized to 32 px, so a crop of 12.5 to 28 source pixels fills
the 32 px view. What each operation of MoCo-v2's recipe (`seed.views.Recipe`) does there:

- **Gaussian blur** (p = {r['blur_p']}; {r['blurred_fraction']:.0%} of the measured views): sigma is drawn from
  [0.1, 2.0] px of a 224 px view and scaled by 32/224, so it is {lo:.3f} to **{hi:.2f} px**;
  `seed.augment.blur_kernel_size` gives a **{b32['kernel']}-tap** kernel, whose neighbour taps weigh at most
  {b32['neighbour_weight']:.4f} (at the largest sigma). Measured on the first {r['images']:,} training images, one
  view each, `seed.augment.apply_batch` with the drawn blur against the same views with blur off: mean absolute
  change **{b32['mean_abs_all']:.3f} grey levels** (of 255) over all views, {b32['mean_abs_blurred']:.3f} over the
  blurred ones, {b32['max_abs']:.2f} at most. The blur is nearly a no-op at 32 px. For scale, the same views at
  224 px (sigma {b224['sigma_px'][0]:.1f} to {b224['sigma_px'][1]:.1f} px, {b224['kernel']}-tap kernel; first
  {r['images_224']} images) change by {b224['mean_abs_all']:.3f} grey levels on average,
  {b224['mean_abs_blurred']:.3f} over the blurred views: there too it does little, because a 28 px image
  upscaled 8 times is already smooth at the scale of sigma. So every view in this table is drawn with the blur
  off (`cache.recipe.blur_p=0`, as in the demo).
- **Saturation, hue and grayscale** are no-ops on grey images: saturation blends with the image's own grey
  version, hue rotates a colour that has none, grayscale replaces the image by its luma (weights summing to
  0.9999). Measured the same way (these three drawn as in the recipe against neutral values): mean absolute
  change {grey['mean_abs']:.4f}, at most {grey['max_abs']:.4f} grey levels.
- What remains: the crop (scale and aspect ratio), the flip, and brightness and contrast (p 0.8, factors in
  [0.6, 1.4]).
"""


def render(rows_dir: Path, out: Path) -> None:
    """docs/results.md and its PNG from the row files of ``rows_dir`` alone (plus its ``_settings.json`` and
    ``_recipe.json``); hand-written notes below the NOTES marker of an existing page are kept."""
    settings_path, recipe_path = rows_dir / "_settings.json", rows_dir / "_recipe.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    rows = load_rows(rows_dir)
    if not rows:
        raise SystemExit(f"paper_table: no row files in {rows_dir}")
    stats = aggregate(rows)
    png = out.with_name("results-accuracy-vs-views.png")
    plot(stats, settings, png)
    checks = targets(stats, settings)

    def line(t: dict[str, Any]) -> str:
        v = t["verdict"]
        shown = f"**{v}**" if v != "met" else v
        return f"- {shown}: {t['what']}: {t['detail']}" if t["target"] else f"- ({v}; no target) {t['what']}: {t['detail']}"
    machines = sorted({r.get("machine", "").rsplit(",", 1)[0] for r in rows if r.get("machine")})
    shas = sorted({sha for s in stats.values() if s.get("teacher") == "moco" for sha in s["teacher_sha256_all"]})
    warn = (f"\n\n**Warning**: the MoCo-v2-teacher rows come from {len(shas)} different teacher checkpoints "
            f"({', '.join(x[:12] for x in shas)}); rows measured against another teacher are not comparable."
            if len(shas) > 1 else "")
    e, views = settings.get("epochs", rows[0].get("epochs")), settings.get("views", [])
    few = [v for v in views if e is not None and v > e]
    view_note = (f" With {e} epochs, V = {', '.join(map(str, few))} exceed the epochs: a student then sees at most "
                 f"{e} of each image's V views, so those points measure the view draw, not V." if few else "")
    total = sum(float(r.get("invocation_s", 0.0)) for r in rows)
    text = RESULTS.format(
        cmd=settings.get("command", "python bench/paper_table.py"), machines="; ".join(machines) or "unknown",
        minutes=total / 60, rows=len(rows),
        rows_dir=rows_dir.relative_to(REPO) if rows_dir.resolve().is_relative_to(REPO) else rows_dir,
        limit=settings.get("limit", 0), n_test=settings.get("n_test", 0), epochs=e,
        teacher_epochs=settings.get("teacher_epochs"), teacher_lr=settings.get("teacher_lr", 0.06), sup_epochs=settings.get("supervised_epochs"),
        bank=settings.get("bank"), topk=settings.get("topk"), shuffle_bn=settings.get("shuffle_bn"),
        seeds=", ".join(map(str, settings.get("seeds", []))), rotations=settings.get("rotations"),
        tau_large=f"{settings.get('tau_t_large', 0.01):g}", view_note=view_note, warn=warn, table=table_text(stats), png=png.name, sigmas=f"{SIGMAS:g}",
        checks="\n".join(line(t) for t in checks), amortisation=amortisation(rows, settings),
        pending=pending(rows, settings),
        recipe=recipe_text(json.loads(recipe_path.read_text()) if recipe_path.exists() else None, settings))
    if out.exists() and NOTES in out.read_text():  # hand-written analysis below the marker survives a re-run
        text += "\n" + NOTES + out.read_text().split(NOTES, 1)[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out} and {png} from {len(rows)} rows in {rows_dir}")


NOTES = "<!-- notes: everything below this line is kept when bench/paper_table.py rewrites the file -->"
RESULTS = """# Results: the SEED comparison on Fashion-MNIST

Command (from the repository root; resumable: one row file per arm and seed under
`{rows_dir}/`; `--render` re-renders this page from them without running anything):

    {cmd}

Machines: {machines}. The {rows} rows took {minutes:.1f} min in all (training, the teacher pass and bank the first
time a cache is used, feature extraction and probes), over however many invocations.{warn}

Set-up: Fashion-MNIST at 32 px, {limit:,} training and {n_test:,} test images. Every student is a timm
`{student}` with SEED's head, trained {epochs} epochs (SGD, lr 0.03 x batch/256, batch 256, warm-up 0.2
epoch then cosine). Seeds {seeds}: seed s sets `train.seed` (initialisation, batch order, which cached view
an epoch replays, queue) and `bank.seed` (bank sampling) to s; the teachers, the shards and the V cached views
(`cache.seed` = 0) are shared by all seeds. Teachers are timm `{teacher}`, one run each: MoCo-v2
({teacher_epochs} epochs, lr {teacher_lr:g} x batch/256, 128-d MLP head, queue K, Shuffle-BN over {shuffle_bn} BN
sub-batches) and supervised cross-entropy ({sup_epochs} epochs; its 512-d pooled features are the embedding).
MoCo-v2 alone trains the student with MoCo's recipe (lr 0.03 x batch/256, the same warm-up and cosine,
Shuffle-BN over {shuffle_bn} sub-batches, queue K) for the students' {epochs} epochs. SEED: bank K = {bank},
tau_S = 0.2, tau_T = 1e-4 (one arm: {tau_large}; at 1e-4 the target is one-hot on the view's own embedding, so the
loss is InfoNCE against the teacher's embedding of that view), top-{topk} cached targets; online SEED keeps a FIFO queue of K teacher embeddings
as in the official code and draws a fresh view of every image every epoch; cached SEED replays a random one
of the V stored views per image and epoch (`train.view=random`), against the default bank (one bank of K),
{rotations} rotating banks (`bank.rotations`, bank epoch mod R) or a FIFO queue of the cached embeddings of
the views trained on (`train.bank=queue`).{view_note} Accuracy: frozen pooled backbone features of the whole
test image, weighted kNN (k = 20, T = 0.07, cosine) and a logistic-regression probe, as mean ± SD over seeds
(n runs). Training time is per seed; a cache's teacher pass is paid once for every seed and arm that uses
it, its bank once per seed. Teacher forwards: online SEED spends N x epochs per run, a cache V x N once.

{table}

{pending}

![accuracy against V]({png})

## Targets

Rule: for arm A against arm B, d = mean(A) - mean(B) and se = sqrt(sA^2/nA + sB^2/nB) over the seeds' kNN
(sample SDs; an arm of one run contributes 0). A target "A at least `margin` above B" is **met** when
d - margin > {sigmas} se, **missed** when d - margin < -{sigmas} se, and **inconclusive** otherwise. "A not worse
than B" (margin 0) is **missed** only when d < -{sigmas} se and met otherwise, so d and se show how close it came.
Targets: every SEED student at least 10 kNN points above MoCo-v2 alone; cached SEED with the default bank at
V >= 4 not worse than online SEED; the MoCo-v2 teacher above raw pixels (one run each: se = 0, the rule is
the sign of d). Comparisons marked "no target" use the same rule for the other banks. "pending" marks a
comparison whose arm has fewer than 2 seeds so far.

{checks}

## Amortisation: three students from one cache against three online runs

{amortisation}

## The recipe at 32 px

{recipe}
""".replace("{student}", STUDENT).replace("{teacher}", TEACHER)


if __name__ == "__main__":
    main()
