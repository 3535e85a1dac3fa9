"""Run reports: Markdown tables and PNG plots written next to a run's checkpoints."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from seed.storage import join, write_bytes, write_text


# Seconds between progress-bar refreshes when stderr is not a terminal (a log file, CI, a Prefect worker):
# tqdm's default, 0.1 s, appends a carriage-return update to the log ten times a second.
LOG_REFRESH_S = 30.0


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar that refreshes every ``LOG_REFRESH_S`` seconds when stderr is not a terminal."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_REFRESH_S)
    return tqdm(iterable, **kwargs)


# Told of a stretch of work's progress after each step: (what, done, total or None, unit).
OnProgress = Callable[[str, int, "int | None", str], None]


class Progress:
    """One stretch of work's progress, shown two ways: a tqdm bar (``show``) and ``report`` called after each
    step with (what, done, total, unit), for a caller that shows it elsewhere (the flow's log and artifacts)."""

    def __init__(self, what: str, total: int | None, unit: str, *, show: bool = False,
                 report: OnProgress | None = None, **bar: Any):
        self.what, self.total, self.unit, self.report, self.done = what, total, unit, report, 0
        self.bar = progress_bar(total=total, unit=unit, desc=what, disable=not show, **bar)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        if self.report is not None:
            self.report(self.what, self.done, self.total, self.unit)

    def finish(self) -> None:
        """The work ended before its total (a bound, not a count): the total becomes what was done, so the bar
        and the last report read 100 %."""
        self.total = self.bar.total = self.done
        self.bar.refresh()
        if self.report is not None:
            self.report(self.what, self.done, self.total, self.unit)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def save_figure(fig: Any, url: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes(url, buf.getvalue())


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats get one decimal (pass text to show more, see ``loss_text``)."""
    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def loss_text(value: float) -> str:
    """A loss to 4 significant digits, trailing zeros kept (7.103, 6.580, 0.08127): one decimal would hide what an
    epoch changed."""
    return f"{value:#.4g}"


def epoch_text(stage: str, epoch: int, epochs: int, row: dict[str, Any]) -> str:
    """One finished epoch in words: ``student epoch 3/10: mobilenetv3_small_050 loss 6.672, 1,234 images/s, 62 s``."""
    losses = ", ".join(f"{name} loss {loss_text(value)}" for name, value in row["loss"].items())
    return f"{stage} epoch {epoch}/{epochs}: {losses}, {row['images_per_s']:,.0f} images/s, {row['seconds']:.0f} s"


INPUT_BOUND = 0.3
"""The share of its time waiting for input from which the teacher stage is called input-bound."""


def input_wait_share(totals: Mapping[str, Any]) -> tuple[float, float] | None:
    """(seconds the teacher stage waited for its batches, its time), from the cache totals: its time is the
    shards' seconds and the waits for their first batches, which lie outside them. None when the cache's
    records predate the figures."""
    wait, first, stage = (totals.get(k) for k in ("input_wait_seconds", "first_batch_wait_seconds", "stage_seconds"))
    if wait is None or first is None or stage is None or stage + first <= 0:
        return None
    return float(wait), float(stage + first)


def input_wait(totals: Mapping[str, Any]) -> str:
    """``"; waited for its input ..."`` (``input_wait_share`` in words; empty without the figures)."""
    shares = input_wait_share(totals)
    if shares is None:
        return ""
    wait, span = shares
    return (f"; waited for its input {wait:.1f} s of {span:.1f} s ({wait / span:.0%}"
            + (": the data path set the pace, not the teacher" if wait / span >= INPUT_BOUND else "") + ")")


def rows_written(totals: Mapping[str, Any]) -> str:
    """``"; its rows written in 1.2 s"`` (empty for a cache whose records predate the figure). One shard's rows are
    written while the next is embedded, so the figure says what the writes took, not what the stage waited."""
    seconds = totals.get("write_seconds")
    return "" if seconds is None else f"; its rows written in {float(seconds):.1f} s"


def teacher_totals_text(totals: Mapping[str, Any]) -> str:
    """A complete cache's totals in words: ``20,000 images (20,000 valid, 0 skipped), 40,000 teacher forwards
    (1,234 views/s in the forward; waited for its input ...; its rows written in ...)``."""
    seconds = float(totals.get("teacher_seconds") or 0)
    rate = f"{totals['teacher_forwards'] / seconds:,.0f}" if seconds > 0 else "-"
    return (f"{totals['samples']:,} images ({totals['valid']:,} valid, {totals['skipped']:,} skipped), "
            f"{totals['teacher_forwards']:,} teacher forwards ({rate} views/s in the forward{input_wait(totals)}"
            f"{rows_written(totals)})")


def accuracy_plot(results: Sequence[dict[str, Any]], url: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.38
    xs = range(len(names))
    ax.bar([x - width / 2 for x in xs], [r["knn"] for r in results], width, label="weighted kNN (k=20)")
    ax.bar([x + width / 2 for x in xs], [r["linear"] for r in results], width, label="linear probe")
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    low = min(min(r["knn"], r["linear"]) for r in results)
    ax.set_ylim(max(0, low - 10), 105)
    ax.set_title(title)
    ax.legend(loc="upper right", ncols=2)  # above the bars: the y range starts 10 points below the lowest
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, url)
    plt.close(fig)


def loss_plot(metrics: Sequence[dict[str, Any]], url: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in metrics[0]["loss"]:
        ax.plot([m["epoch"] for m in metrics], [m["loss"][name] for m in metrics], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("SEED loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, url)
    plt.close(fig)


def write_report(out: str, *, title: str, results: Sequence[dict[str, Any]], cache: dict[str, Any] | None,
                 metrics: Sequence[dict[str, Any]], compute: dict[str, Any]) -> str:
    """Write ``report.md`` with its plots into ``out``; returns the report's URL."""
    accuracy_plot(results, join(out, "accuracy.png"), title)
    parts = [f"# {title}", "", "## Accuracy (test split, frozen features)", "",
             markdown_table(results, [("name", "encoder"), ("kind", "kind"), ("knn", "kNN top-1 (k=20, %)"),
                                      ("nn1", "1-NN top-1 (%)"), ("linear", "linear top-1 (%)"), ("probe", "linear probe"),
                                      ("init", "notes")]),
             "", "![accuracy](accuracy.png)", ""]
    if metrics:
        loss_plot(metrics, join(out, "loss.png"))
        parts += ["## Student training", "",
                  markdown_table([{"epoch": m["epoch"], "seconds": m["seconds"], "images_per_s": m["images_per_s"],
                                   "teacher_forwards": m["teacher_forwards"],
                                   **{f"loss {k}": loss_text(v) for k, v in m["loss"].items()}} for m in metrics],
                                 [("epoch", "epoch"), ("seconds", "seconds"), ("images_per_s", "images/s"),
                                  ("teacher_forwards", "teacher forwards")]
                                 + [(f"loss {k}", f"loss {k}") for k in metrics[0]["loss"]]),
                  "", "![loss](loss.png)", ""]
    if cache:
        parts += ["## Teacher cache", "", markdown_table([cache], [(k, k) for k in cache]), ""]
    parts += ["## Teacher compute", "", markdown_table([compute], [(k, k) for k in compute]), ""]
    url = join(out, "report.md")
    write_text(url, "\n".join(parts))
    return url
