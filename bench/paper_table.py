"""The SEED paper's comparison on full Fashion-MNIST: teachers, students, cached against online.

    python bench/paper_table.py [--scratch .bench/paper-table] [--epochs 2] [--views 1 2 4 8]

Rows (every student is the same architecture trained for the same number of epochs):
  teachers     MoCo-v2 ``resnet10t`` and a supervised ``resnet10t`` (cross-entropy on the labels);
  students     MoCo-v2 alone; online SEED (teacher run on every batch, FIFO queue); cached SEED
               with V views per image (teacher run once, V x N forwards) for each V; online and
               cached (V = 4) SEED from the supervised teacher;
  references   raw pixels and a randomly initialised student.
Columns: weighted kNN top-1 (k = 20) and linear-probe top-1 on the 10,000 test images, wall
time (training; for cached rows also the teacher pass that built their cache), teacher forwards.

Every stage goes through the pipeline's own functions (``pipeline.pretrain``, ``.teacher``,
``.bank``, ``.student``) with fixed seeds. Each finished row is saved under
``<scratch>/rows/<settings>/<row>.json``; re-running the command skips finished rows and resumes
unfinished stages (teacher shards, training epochs), so it can run in the background and
survive interruption. Writes ``docs/results.md`` and ``docs/results-accuracy-vs-views.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine, shards, storage  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from pipeline import pretrain as pretrain_stage  # noqa: E402
from pipeline import student as student_stage  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from pipeline.evaluate import random_student  # noqa: E402
from seed.checkpoint import load_student  # noqa: E402
from seed import cache as cache_mod  # noqa: E402
from seed.config import RunConfig, load_config  # noqa: E402
from seed.evaluate import extract, images, pixels, score  # noqa: E402
from seed.report import save_figure  # noqa: E402
from seed.shards import expand_urls  # noqa: E402
from seed.teachers import load_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDENT = "mobilenetv3_small_050"
TEACHER = "resnet10t"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(args.scratch).resolve()
        # finished rows, per setting: changing a setting never reads back rows measured under another
        self.rows_dir = self.root / "rows" / (f"n{args.limit}-e{args.epochs}-t{args.teacher_epochs}-s{args.supervised_epochs}"
                                              f"-k{args.bank}-top{args.topk}")
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        data = shards(self.root, args.limit, per_shard=args.per_shard)
        self.storage = storage(self.root)
        self.data = data.name
        self._eval: tuple[Any, ...] | None = None

    # -- configuration ----------------------------------------------------------------------------
    def config(self, *overrides: str) -> RunConfig:
        a = self.args
        return load_config(None, [f"data.train={self.data}/train/train-*.tar", f"data.test={self.data}/test/test-*.tar",
                                  "cache.resolution=32", "cache.seed=0", f"bank.size={a.bank}", f"bank.topk={a.topk}",
                                  "bank.tau_t=0.0001", f"train.students=[{{arch: {STUDENT}}}]",
                                  f"train.optim.epochs={a.epochs}", "train.seed=0", *overrides])

    def pretrain_config(self, method: str, arch: str, epochs: int) -> RunConfig:
        return self.config(f"pretrain.name=pt-{method}-{arch}-e{epochs}", f"pretrain.method={method}",
                           f"pretrain.arch={arch}", f"pretrain.optim.epochs={epochs}", "pretrain.seed=0")

    def teacher_epochs(self, method: str) -> int:
        return self.args.teacher_epochs if method == "moco" else self.args.supervised_epochs

    def teacher_overrides(self, method: str) -> list[str]:
        cfg = self.pretrain_config(method, TEACHER, self.teacher_epochs(method))
        t = pretrain_stage.teacher_config(cfg, self.storage.pretrained_teacher(cfg.pretrain.name))
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

    def score(self, encode: Any) -> dict[str, float]:
        """Scores of an encoder's features (an image batch -> feature batch callable)."""
        train_x, train_y, test_x, test_y = self.eval_data()
        device = torch.device("cpu")
        tr, te = extract(encode, train_x, device), extract(encode, test_x, device)
        return score(tr, train_y, te, test_y).as_dict()

    def score_pixels(self) -> dict[str, float]:
        train_x, train_y, test_x, test_y = self.eval_data()
        return score(pixels(train_x), train_y, pixels(test_x), test_y, center=True).as_dict()

    # -- rows -------------------------------------------------------------------------------------
    def row(self, key: str, make: Any) -> dict[str, Any]:
        """The saved row ``key``, or make it now and save it."""
        path = self.rows_dir / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        log(f"row {key}: start")
        row = {"key": key, **make()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1))
        tmp.replace(path)  # a row file is complete or absent
        log(f"row {key}: kNN {row['knn']:.2f}  linear {row['linear']:.2f}  wall {row.get('wall_s', 0) / 60:.1f} min")
        return row

    def pretrain(self, method: str, arch: str, epochs: int) -> tuple[RunConfig, pretrain_stage.PretrainResult, float]:
        cfg = self.pretrain_config(method, arch, epochs)
        t0 = time.perf_counter()
        out = pretrain_stage.run(cfg, self.storage, resume=True, progress=False,
                                 on_epoch=lambda e, r: log(f"  pretrain {method} {arch} epoch {e + 1}: {r['images_per_s']} img/s"))
        seconds = sum(m["seconds"] for m in out.metrics) if out.metrics else time.perf_counter() - t0
        return cfg, out, seconds

    def teacher_row(self, method: str) -> dict[str, Any]:
        epochs = self.teacher_epochs(method)

        def make() -> dict[str, Any]:
            cfg, out, seconds = self.pretrain(method, TEACHER, epochs)
            teacher, _ = load_teacher(out.teacher)
            return {"name": f"{'MoCo-v2' if method == 'moco' else 'supervised'} teacher {TEACHER}", "group": "teacher",
                    "epochs": epochs, "wall_s": seconds, "teacher_forwards": 0,
                    **self.score(teacher.features)}
        return self.row(f"teacher-{method}", make)

    def moco_student_row(self) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            cfg, out, seconds = self.pretrain("moco", STUDENT, self.args.epochs)
            model, _ = load_teacher(out.teacher)
            return {"name": f"{STUDENT} by MoCo-v2 alone", "group": "student", "teacher": "none", "epochs": self.args.epochs,
                    "wall_s": seconds, "teacher_forwards": 0, **self.score(model.features)}
        return self.row("student-moco-only", make)

    def seed_row(self, teacher: str, mode: str, views: int = 0, repeat: bool = False, student_seed: int = 0) -> dict[str, Any]:
        """``repeat``: train the same row again (same seeds, its cache reused); ``student_seed``: another
        initialisation, batch order and queue/bank sampling (``train.seed``) for the run-to-run spread."""
        e = self.args.epochs
        name = (f"seed-{teacher}-{mode}" + (f"-v{views}" if mode == "cached" else "") + ("-repeat" if repeat else "")
                + (f"-seed{student_seed}" if student_seed else ""))

        def make() -> dict[str, Any]:
            over = [*self.teacher_overrides(teacher), f"train.mode={mode}", f"train.run={name}-e{e}",
                    f"train.seed={student_seed}"]
            cache_s = 0.0
            if mode == "cached":
                over += [f"cache.name=fm-{teacher}-v{views}", f"cache.views={views}", "train.view=cycle"]
                cfg = self.config(*over)
                teacher_stage.run(cfg, self.storage, progress=False)
                bank_stage.run(cfg, self.storage, progress=False)
                group = cache_mod.open_complete(self.storage.cache_url(cfg.cache.name))
                # the cache's own records: survives interruptions and reuse by a later row
                totals = group.attrs["totals"]
                cache_s = float(totals["stage_seconds"]) + float(group["bank"].attrs["seconds"])
                forwards = int(totals["teacher_forwards"])
                if repeat:  # the cache already exists: this row spends neither teacher time nor forwards
                    cache_s, forwards = 0.0, 0
                log(f"  cache fm-{teacher}-v{views}: {forwards} teacher forwards, {cache_s / 60:.1f} min")
            else:
                cfg = self.config(*over)
            t0 = time.perf_counter()
            out = student_stage.run(cfg, self.storage, resume=True, progress=False,
                                    on_epoch=lambda ep, r: log(f"  {name} epoch {ep + 1}: {r['images_per_s']} img/s, "
                                                               f"loss {next(iter(r['loss'].values())):.4f}"))
            train_s = sum(m["seconds"] for m in out.metrics) or time.perf_counter() - t0
            if mode == "online":
                forwards = out.teacher_forwards
            model, _ = load_student(next(iter(out.students.values())))
            label = f"{mode} SEED" + (f", V = {views}" if mode == "cached" else "")
            source = "MoCo-v2" if teacher == "moco" else "supervised"
            return {"name": f"{STUDENT} by {label} from the {source} teacher" + (" (second run)" if repeat else "")
                    + (f" (train.seed={student_seed})" if student_seed else ""),
                    "group": "student",
                    "teacher": teacher, "mode": mode, "views": views, "epochs": e, "wall_s": train_s + cache_s,
                    "train_s": train_s, "cache_s": cache_s, "teacher_forwards": forwards, **self.score(model.features)}
        return self.row(name, make)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default=str(REPO / ".bench" / "paper-table"), help="shards, caches, runs and finished rows")
    p.add_argument("--limit", type=int, default=60000, help="first N images of each split (60,000: all of train, all 10,000 of test)")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2, help="epochs of every student")
    p.add_argument("--teacher-epochs", type=int, default=3, help="MoCo-v2 teacher epochs")
    p.add_argument("--supervised-epochs", type=int, default=2, help="supervised teacher epochs")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--bank", type=int, default=4096, help="bank size K (online: queue length)")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    return p.parse_args()


def main() -> None:
    args = parse()
    start = time.perf_counter()
    b = Bench(args)
    log(f"paper table: {machine()}; scratch {b.root}")
    rows: list[dict[str, Any]] = []
    rows.append(b.row("raw-pixels", lambda: {"name": "raw pixels (32 px, centred)", "group": "reference",
                                             "wall_s": 0.0, "teacher_forwards": 0, **b.score_pixels()}))

    def random_row() -> dict[str, Any]:
        model, _ = random_student(STUDENT, False, 0)
        return {"name": f"{STUDENT} random init", "group": "reference", "wall_s": 0.0, "teacher_forwards": 0,
                **b.score(model.features)}
    rows.append(b.row("student-random", random_row))
    rows.append(b.teacher_row("moco"))
    rows.append(b.teacher_row("supervised"))
    rows.append(b.moco_student_row())
    rows.append(b.seed_row("moco", "online"))
    for v in args.views:
        rows.append(b.seed_row("moco", "cached", v))
    rows.append(b.seed_row("supervised", "online"))
    rows.append(b.seed_row("supervised", "cached", 4))
    cheapest = min((r for r in rows if r.get("mode") == "cached"), key=lambda r: r["wall_s"])
    rows.append(b.seed_row(cheapest["teacher"], "cached", cheapest["views"], repeat=True))
    rows.append(b.seed_row("moco", "online", student_seed=1))
    write_results(args, rows, sum(r["wall_s"] for r in rows if not r["key"].endswith("-repeat")))
    log(f"this invocation: {(time.perf_counter() - start) / 60:.1f} min")


# -- output ----------------------------------------------------------------------------------------
def targets(rows: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """(target, met?, the numbers) for each target of the issue; ``None`` marks a note, not a target."""
    by = {r["key"]: r for r in rows}
    out = []
    base = by["student-moco-only"]["knn"]
    seeds = [r for r in rows if r["key"].startswith("seed-") and not r["key"].endswith("-repeat")]
    worst = min(seeds, key=lambda r: r["knn"])
    out.append(("every SEED student >= 10 kNN points above the MoCo-v2-only student",
                worst["knn"] - base >= 10, f"smallest gain {worst['knn'] - base:+.2f} ({worst['name']}: {worst['knn']:.2f} vs {base:.2f})"))
    for teacher in ("moco", "supervised"):
        online, source = by.get(f"seed-{teacher}-online"), "MoCo-v2" if teacher == "moco" else "supervised"
        for r in seeds:
            if r["teacher"] == teacher and r.get("mode") == "cached" and r["views"] >= 4 and online:
                gap = r["knn"] - online["knn"]
                out.append((f"cached V = {r['views']} at most 0.5 kNN points below online SEED ({source} teacher)",
                            gap >= -0.5, f"{r['knn']:.2f} vs {online['knn']:.2f} ({gap:+.2f})"))
                out.append((f"cached V = {r['views']} spends fewer teacher forwards than online SEED ({source} teacher)",
                            r["teacher_forwards"] < online["teacher_forwards"],
                            f"{r['teacher_forwards']:,} vs {online['teacher_forwards']:,}; a V-view cache costs V x N once, "
                            f"online SEED N per student-epoch, so the cache is cheaper once students x epochs > V "
                            f"(this table: 1 student x {r['epochs']} epochs per cache)"))
    raw = by["raw-pixels"]["knn"]
    for r in seeds:
        if r["teacher"] == "supervised":
            out.append((f"{r['name']} above raw pixels", r["knn"] > raw, f"{r['knn']:.2f} vs {raw:.2f}"))
    if "seed-moco-online-seed1" in by:
        a, b = by["seed-moco-online"], by["seed-moco-online-seed1"]
        out.append(("run-to-run spread, for scale: online SEED from the MoCo-v2 teacher, train.seed 0 and 1", None,
                    f"kNN {a['knn']:.2f} and {b['knn']:.2f}, linear {a['linear']:.2f} and {b['linear']:.2f}"))
    rep = next(r for r in rows if r["key"].endswith("-repeat"))
    first = by[rep["key"].removesuffix("-repeat")]
    out.append(("second run of the cheapest row within 0.3 kNN points", abs(rep["knn"] - first["knn"]) <= 0.3,
                f"{first['name']}: {first['knn']:.2f} then {rep['knn']:.2f} (linear {first['linear']:.2f} then {rep['linear']:.2f})"))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["key"]: r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, metric, title in ((axes[0], "knn", "weighted kNN (k = 20)"), (axes[1], "linear", "linear probe")):
        cached = sorted((r for r in rows if r.get("mode") == "cached" and r["teacher"] == "moco"
                         and not r["key"].endswith("-repeat")), key=lambda r: r["views"])
        vs = [r["views"] for r in cached]
        ax.plot(vs, [r[metric] for r in cached], "o-", color="C0", label="cached SEED (MoCo-v2 teacher)")
        sup = by.get("seed-supervised-cached-v4")
        if sup:
            ax.plot([4], [sup[metric]], "s", color="C3", label="cached SEED V = 4 (supervised teacher)")
        for key, style, color, label in (("seed-moco-online", "--", "C0", "online SEED (MoCo-v2 teacher)"),
                                         ("seed-supervised-online", "--", "C3", "online SEED (supervised teacher)"),
                                         ("teacher-moco", ":", "C2", "MoCo-v2 teacher"),
                                         ("teacher-supervised", ":", "C3", "supervised teacher"),
                                         ("raw-pixels", "-.", "grey", "raw pixels"),
                                         ("student-moco-only", "-", "C1", "student by MoCo-v2 alone"),
                                         ("student-random", "-", "black", "random student")):
            if key in by:
                ax.axhline(by[key][metric], linestyle=style, color=color, alpha=0.7, label=label)
        other = by.get("seed-moco-online-seed1")
        if other and "seed-moco-online" in by:
            lo, hi = sorted((by["seed-moco-online"][metric], other[metric]))
            ax.axhspan(lo, hi, color="C0", alpha=0.12, label="online SEED, train.seed 0 and 1")
        ax.set_xscale("log", base=2)
        ax.set_xticks(vs, [str(v) for v in vs])
        ax.set_xlabel("views per image in the cache (V)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy on the test split (%)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"Fashion-MNIST, {STUDENT} students, {rows[-1]['epochs']} epochs")
    save_figure(fig, str(path))
    plt.close(fig)


def write_results(args: argparse.Namespace, rows: list[dict[str, Any]], seconds: float) -> None:
    from seed.report import markdown_table

    out = Path(args.out)
    png = out.with_name("results-accuracy-vs-views.png")
    plot(rows, png)
    table_rows = [{"name": r["name"], "knn": f"{r['knn']:.2f}", "linear": f"{r['linear']:.2f}",
                   "wall": (f"{r['wall_s'] / 60:.1f}" if r["wall_s"] else "") +
                           (f" ({r['cache_s'] / 60:.1f} teacher pass)" if r.get("cache_s") else ""),
                   "forwards": f"{r['teacher_forwards']:,}" if r.get("group") == "student" else "",
                   "epochs": r.get("epochs", "")} for r in rows]
    table = markdown_table(table_rows, [("name", "row"), ("knn", "kNN top-1 (%)"), ("linear", "linear top-1 (%)"),
                                        ("epochs", "epochs"), ("wall", "wall (min)"), ("forwards", "teacher forwards")])
    verdict = {True: "met", False: "**missed**", None: "note"}
    checks = "\n".join(f"- {verdict[ok]}: {what}: {detail}" for what, ok, detail in targets(rows))
    script = Path(sys.argv[0]).resolve()
    script_arg = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    cmd = "python " + " ".join(shlex.quote(a) for a in [script_arg, *sys.argv[1:]])
    text = RESULTS.format(cmd=cmd, machine=machine(), minutes=seconds / 60, table=table, checks=checks, png=png.name,
                          epochs=args.epochs, teacher_epochs=args.teacher_epochs, sup_epochs=args.supervised_epochs,
                          bank=args.bank, topk=args.topk, limit=args.limit)
    if out.exists() and NOTES in out.read_text():  # hand-written analysis below the marker survives a re-run
        text += "\n" + NOTES + out.read_text().split(NOTES, 1)[1]
    out.write_text(text)
    print(table)
    print(checks)
    log(f"wrote {out} and {png}")


NOTES = "<!-- notes: everything below this line is kept when bench/paper_table.py rewrites the file -->"
RESULTS = """# Results: the SEED comparison on Fashion-MNIST

Command (from the repository root; resumable: finished rows are kept under `.bench/paper-table/rows`):

    {cmd}

Machine: {machine}. The rows' wall times add up to {minutes:.1f} min (plus feature extraction and
probes for each row); rows finished by an earlier, interrupted invocation are read back, not re-measured.

Set-up: Fashion-MNIST at 32 px, {limit:,} training and 10,000 test images. Every student is a timm
`{student}` with SEED's head, trained {epochs} epochs (SGD, lr 0.03 x batch/256, batch 256,
warm-up 0.2 epoch then cosine, seed 0). Teachers are timm `{teacher}`: MoCo-v2 ({teacher_epochs}
epochs, 128-d MLP head, queue 4096) and supervised cross-entropy ({sup_epochs} epochs; its 512-d
pooled features are the embedding). SEED: bank K = {bank}, tau_S = 0.2, tau_T = 1e-4, top-{topk} cached
targets; online SEED keeps a FIFO queue of K teacher embeddings as in the official code and draws a
fresh MoCo-v2 view of every image every epoch; cached SEED reads V stored views per image and
replays view (epoch + row) mod V (`train.view=cycle`). Accuracy: frozen pooled backbone features of the
whole test image, weighted kNN (k = 20, T = 0.07, cosine) and an L-BFGS logistic-regression probe.
Wall time is training time; for cached rows the teacher pass that built their cache (teacher
forwards + bank + top-k targets) is added and shown in brackets. Teacher forwards: online SEED
spends N x epochs, a cache N x V, once, however many students and epochs use it. Teacher
pre-training time is the teacher rows' wall time.

{table}

![accuracy against V](results-accuracy-vs-views.png)

## Targets

{checks}
""".replace("{student}", STUDENT).replace("{teacher}", TEACHER)


if __name__ == "__main__":
    main()
