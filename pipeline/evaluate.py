"""Evaluation stage: kNN and linear probe of teacher, students and baselines, and the run report.

Recipe: decode the train and test splits once at the cache's resolution -> extract each
encoder's pooled features once -> score them -> write ``report.md`` + PNGs next to the run's
checkpoints. ``include_teacher=False`` (the student-only re-run) never loads the teacher: it
reuses the teacher's scores saved by an earlier evaluation of the same cache.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from seed import cache
from seed import checkpoint
from seed.config import RunConfig
from seed.devices import resolve_device
from seed.evaluate import extract, images, pixels, score
from seed.models import create_backbone, freeze
from seed.report import write_report
from seed.shards import expand_urls
from seed.storage import Storage, read_json, write_text
from seed.teachers import TeacherLoader, load_teacher


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """One row per encoder (name, kind, kNN, 1-NN, linear, notes), the report's URL and the compute table."""

    report: str
    results: list[dict[str, Any]]
    seconds: float
    compute: dict[str, Any]


def random_student(arch: str, small_input: bool, seed: int) -> tuple[torch.nn.Module, str]:
    """A randomly initialised student; ResNets without timm's zero-initialised last BN (degenerate features)."""
    torch.manual_seed(seed)
    try:
        backbone = create_backbone(arch, small_input=small_input, zero_init_last=False)
        note = "random init, timm default except zero_init_last=False"
    except TypeError:
        backbone = create_backbone(arch, small_input=small_input)
        note = "random init, timm default"
    return freeze(backbone), note


def run(cfg: RunConfig, storage: Storage, *, include_teacher: bool = True, progress: bool = True,
        load: TeacherLoader = load_teacher) -> EvaluationResult:
    """Score raw pixels, the teacher (or its saved scores), each student and its random init; write the report."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    url = storage.cache_url(cfg.cache.name)
    group = cache.open_complete(url)
    res = int(cache.attributes(group)["fingerprint_fields"]["resolution"])
    dim = int(cache.attributes(group)["D"])
    train_x, train_y = images(expand_urls(storage.resolve("shards", cfg.data.train)), res)
    test_x, test_y = images(expand_urls(storage.resolve("shards", cfg.data.test)), res)
    results: list[dict[str, Any]] = []

    def add(name: str, kind: str, fn: Callable[[torch.Tensor], torch.Tensor] | tuple[np.ndarray, np.ndarray],
            note: str = "", center: bool = False) -> None:
        tr = fn[0] if isinstance(fn, tuple) else extract(fn, train_x, device)
        te = fn[1] if isinstance(fn, tuple) else extract(fn, test_x, device)
        results.append({"name": name, "kind": kind, "init": note, "dim": int(tr.shape[1]),
                        **score(tr, train_y, te, test_y, center=center).as_dict()})

    add("raw pixels", "baseline", (pixels(train_x), pixels(test_x)), f"centred, {res} px", center=True)
    teacher_file = storage.teacher_scores(cfg.cache.name)
    if include_teacher:
        teacher, _ = load(cfg.teacher)
        add(f"teacher {cfg.teacher.arch}", "teacher", teacher.to(device).features, "pooled backbone features")
        write_text(teacher_file, json.dumps({"cache_fingerprint": cache.attributes(group)["fingerprint"], **results[-1]}, indent=1))
    else:
        saved = read_json(teacher_file)
        if saved and saved.get("cache_fingerprint") == cache.attributes(group)["fingerprint"]:
            results.append({k: v for k, v in saved.items() if k != "cache_fingerprint"} | {"init": "scores from the full run"})
    out = storage.run_dir(cfg.train.run)
    metrics: list[dict[str, Any]] = []
    for i, s in enumerate(cfg.train.students):
        ckpt_url = storage.student_checkpoint(cfg.train.run, s.label)
        if checkpoint.exists(ckpt_url):
            model, state = checkpoint.load_student(ckpt_url)
            metrics = state.get("metrics", metrics)
            add(f"{s.label} ({state.get('mode', 'cached')} SEED)", "student", model.to(device).features,
                f"{state['epoch']} epochs")
        backbone, note = random_student(s.arch, s.small_input, cfg.train.seed + i)
        add(f"{s.label} random", "baseline", backbone.to(device), note)
    totals = cache.attributes(group).get("totals", {})
    n_valid = totals.get("valid", 0)
    epochs_students = cfg.train.optim.epochs * len(cfg.train.students)
    compute = {"teacher forwards (cache, once)": totals.get("teacher_forwards"),
               "online SEED would need": n_valid * epochs_students,
               "student epochs x students": epochs_students,
               "teacher seconds (cache)": totals.get("teacher_seconds")}
    cache_row = {"N valid": n_valid, "V": cache.attributes(group)["V"], "D": dim, "resolution": res,
                 "teacher": cache.attributes(group)["teacher"]["arch"], "fingerprint": cache.attributes(group)["fingerprint"][:12]}
    report = write_report(out, title=f"seed run {cfg.train.run}", results=results, cache=cache_row, metrics=metrics,
                          compute=compute)
    return EvaluationResult(report, results, round(time.perf_counter() - t0, 1), compute)
