"""Can the demo's teacher beat raw pixels within the demo's time? Pre-training variants on the demo's data.

    python bench/demo_teacher.py                          # every variant below; resumable
    python bench/demo_teacher.py --only base bn4          # some of them
    python bench/demo_teacher.py --render                 # the table and PNG from the saved rows

Each variant pre-trains the demo's MoCo-v2 teacher (``configs/demo.yaml``: ``resnet10t``, 20,000
Fashion-MNIST images at 32 px) with a few settings changed, through ``pipeline.pretrain.run``, then
scores its features as the demo's report does (weighted kNN, k = 20, and the linear probe; train
on the 20,000 images, test on all 10,000), beside raw pixels scored the same way. Each finished
variant is a JSON row in ``docs/results/demo-teacher/`` (committed: the sweep resumes from them);
pre-training runs resume from their epoch checkpoints in ``--scratch``. Rows record the pre-training
seconds, so a variant can be judged against the demo's 15-minute budget as well as against pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine, shards, storage  # noqa: E402
from pipeline import pretrain as pretrain_stage  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.evaluate import extract, images, pixels, score  # noqa: E402
from seed.report import save_figure  # noqa: E402
from seed.shards import expand_urls  # noqa: E402
from seed.teachers import load_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "docs" / "results" / "demo-teacher"
# name -> overrides on configs/demo.yaml; "base" is the demo as shipped
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "bn4": ["pretrain.shuffle_bn=4"],
    "e6-bn4": ["pretrain.shuffle_bn=4", "pretrain.optim.epochs=6"],
    "e6-bn4-t0.1": ["pretrain.shuffle_bn=4", "pretrain.optim.epochs=6", "pretrain.temperature=0.1"],
    "e10-bn4": ["pretrain.shuffle_bn=4", "pretrain.optim.epochs=10"],
    "e6-bn4-lr0.12": ["pretrain.shuffle_bn=4", "pretrain.optim.epochs=6", "pretrain.optim.base_lr=0.12"],
    "e6-bn4-crop0.4": ["pretrain.shuffle_bn=4", "pretrain.optim.epochs=6", "cache.recipe.crop_scale=[0.4,1.0]"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scratch", default=str(REPO / ".bench" / "demo-teacher"), help="shards and checkpoints")
    p.add_argument("--rows", default=str(ROWS))
    p.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="these variants (default: all)")
    p.add_argument("--limit", type=int, default=0, help="train images (0: the demo's 20,000); for a quick check")
    p.add_argument("--render", action="store_true", help="only render the table and PNG from the saved rows")
    a = p.parse_args()
    rows_dir = Path(a.rows)
    rows_dir.mkdir(parents=True, exist_ok=True)
    if not a.render:
        sweep(a, rows_dir)
    render(rows_dir)


def sweep(a: argparse.Namespace, rows_dir: Path) -> None:
    root = Path(a.scratch).resolve()
    data = shards(root, 60_000).name  # all of Fashion-MNIST; the demo takes its first 20 train shards
    st = storage(root)
    train_glob = f"{data}/train/train-{{000000..{(a.limit or 20_000) // 1000 - 1:06d}}}.tar"
    base = [f"data.train={train_glob}", f"data.test={data}/test/test-{{000000..000009}}.tar"]
    demo = str(REPO / "configs" / "demo.yaml")
    cfg = load_config(demo, base)
    train_x, train_y = images(expand_urls(st.resolve("shards", cfg.data.train)), cfg.cache.resolution)
    test_x, test_y = images(expand_urls(st.resolve("shards", cfg.data.test)), cfg.cache.resolution)
    device = torch.device("cpu")

    def save(name: str, row: dict) -> None:
        path = rows_dir / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**row, "machine": machine()}, indent=1))
        tmp.replace(path)  # complete or absent
        log(f"{name}: kNN {row['knn']:.2f}  linear {row['linear']:.2f}")

    if not (rows_dir / "raw-pixels.json").exists():
        s = score(pixels(train_x), train_y, pixels(test_x), test_y, center=True).as_dict()
        save("raw-pixels", {"name": "raw pixels (32 px, centred)", **s})
    for name in a.only or VARIANTS:
        if (rows_dir / f"{name}.json").exists():
            continue
        overrides = [*base, f"pretrain.name=demo-teacher-{name}", *VARIANTS[name]]
        cfg = load_config(demo, overrides)
        log(f"{name}: pre-training ({' '.join(VARIANTS[name]) or 'the demo as shipped'})")
        out = pretrain_stage.run(cfg, st, resume=True, progress=False,
                                 on_epoch=lambda e, r: log(f"  epoch {e + 1}: {r['seconds']:.0f} s, "
                                                           f"{r['images_per_s']} img/s, loss {r['loss']['moco']:.4f}"))
        teacher, _ = load_teacher(out.teacher)
        t0 = time.perf_counter()
        s = score(extract(teacher.features, train_x, device), train_y, extract(teacher.features, test_x, device),
                  test_y).as_dict()
        save(name, {"name": name, "overrides": VARIANTS[name], "epochs": cfg.pretrain.optim.epochs,
                    "pretrain_s": round(sum(m["seconds"] for m in out.metrics), 1),
                    "final_loss": out.metrics[-1]["loss"]["moco"], **s, "eval_s": round(time.perf_counter() - t0, 1)})


def render(rows_dir: Path) -> None:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))}
    if not rows:
        return
    pix = rows.get("raw-pixels")
    lines = ["| variant | changes to configs/demo.yaml | epochs | pre-training s | kNN % | linear % | kNN vs pixels |",
             "|---|---|---|---|---|---|---|"]
    for name in [n for n in VARIANTS if n in rows]:
        r = rows[name]
        vs = f"{r['knn'] - pix['knn']:+.1f}" if pix else ""
        lines.append(f"| {name} | {' '.join(r['overrides']) or '(none)'} | {r['epochs']} | {r['pretrain_s']:.0f} | "
                     f"{r['knn']:.1f} | {r['linear']:.1f} | {vs} |")
    if pix:
        lines.append(f"| raw pixels | | | | {pix['knn']:.1f} | {pix['linear']:.1f} | |")
    print("\n".join(lines))
    (rows_dir / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib.pyplot as plt

    names = [n for n in VARIANTS if n in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    # epochs, not seconds, on the axis: a variant's seconds depend on what else the machine ran meanwhile
    ax.scatter([rows[n]["epochs"] for n in names], [rows[n]["knn"] for n in names])
    for i, n in enumerate(sorted(names, key=lambda n: (rows[n]["epochs"], rows[n]["knn"]))):
        left = i % 2 == 1  # neighbours at the same epochs label on alternate sides
        ax.annotate(n, (rows[n]["epochs"], rows[n]["knn"]), fontsize=8, xytext=(-4 if left else 4, 2),
                    textcoords="offset points", ha="right" if left else "left")
    epochs = [rows[n]["epochs"] for n in names]
    ax.set_xlim(min(epochs) - 1.5, max(epochs) + 1.5)
    if pix:
        ax.axhline(pix["knn"], color="grey", ls="--", label="raw pixels")
        ax.legend(loc="lower right")
    ax.set_xlabel("pre-training epochs of 20,000 images (about 42 s each on 2 CPU cores)")
    ax.set_ylabel("teacher kNN top-1 (%)")
    ax.set_title("The demo's MoCo-v2 teacher against raw pixels")
    save_figure(fig, str(rows_dir / "demo-teacher.png"))


if __name__ == "__main__":
    main()
