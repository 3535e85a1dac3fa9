"""Evaluation stage: kNN and linear probe of teacher, students and baselines, and the run report.

Recipe: decode the train and test splits once at the cache's resolution -> extract each
encoder's pooled features once -> score them -> write ``report.md`` + PNGs next to the run's
checkpoints. ``include_teacher=False`` (the student-only re-run) never loads the teacher: it
reuses the teacher's scores saved by an earlier evaluation of the same cache.
"""

from __future__ import annotations

import json
import time
from typing import Any

import fsspec
import torch

from pipeline.student import run_dir
from pipeline.teacher import cache_url, resolve_device
from seed import cache as cache_mod
from seed import checkpoint
from seed.config import RunConfig
from seed.evaluate import extract, images, pixels, score
from seed.models import create_backbone, freeze, student_encoder
from seed.report import write_report
from seed.shards import expand_urls
from seed.storage import Storage, join
from seed.teachers import load_teacher


def _teacher_scores_url(cfg: RunConfig, storage: Storage) -> str:
    return storage.resolve("reports", f"{cfg.cache.name}-teacher-eval.json")


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


def load_student(url: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The frozen student encoder saved at ``url`` by the student stage, and the checkpoint's contents."""
    state = checkpoint.load(url)
    model = student_encoder(state["arch"], int(state["dim"]), small_input=bool(state.get("small_input", False)))
    model.load_state_dict(state["model"])
    return freeze(model), state


def run(cfg: RunConfig, storage: Storage, *, include_teacher: bool = True, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    url = cache_url(cfg, storage)
    group = cache_mod.open_complete(url)
    res = int(group.attrs["fingerprint_fields"]["resolution"])
    dim = int(group.attrs["D"])
    train_x, train_y = images(expand_urls(storage.resolve("shards", cfg.data.train)), res)
    test_x, test_y = images(expand_urls(storage.resolve("shards", cfg.data.test)), res)
    results: list[dict[str, Any]] = []

    def add(name: str, kind: str, fn: Any, note: str = "", center: bool = False) -> None:
        tr = extract(fn, train_x, device) if callable(fn) else fn[0]
        te = extract(fn, test_x, device) if callable(fn) else fn[1]
        results.append({"name": name, "kind": kind, "init": note, "dim": int(tr.shape[1]),
                        **score(tr, train_y, te, test_y, center=center).as_dict()})

    add("raw pixels", "baseline", (pixels(train_x), pixels(test_x)), f"centred, {res} px", center=True)
    teacher_file = _teacher_scores_url(cfg, storage)
    if include_teacher:
        teacher, _ = load_teacher(cfg.teacher)
        add(f"teacher {cfg.teacher.arch}", "teacher", teacher.to(device).features, "pooled backbone features")
        _write_json(teacher_file, {"cache_fingerprint": group.attrs["fingerprint"], **results[-1]})
    else:
        saved = _read_json(teacher_file)
        if saved and saved.get("cache_fingerprint") == group.attrs["fingerprint"]:
            results.append({k: v for k, v in saved.items() if k != "cache_fingerprint"} | {"init": "scores from the full run"})
    out = run_dir(cfg, storage)
    metrics: list[dict[str, Any]] = []
    for i, s in enumerate(cfg.train.students):
        ckpt_url = join(out, s.label, "checkpoint.pt")
        if checkpoint.exists(ckpt_url):
            model, state = load_student(ckpt_url)
            metrics = state.get("metrics", metrics)
            add(f"{s.label} ({state.get('mode', 'cached')} SEED)", "student", model.to(device).features,
                f"{state['epoch']} epochs")
        backbone, note = random_student(s.arch, s.small_input, cfg.train.seed + i)
        add(f"{s.label} random", "baseline", backbone.to(device), note)
    totals = group.attrs.get("totals", {})
    n_valid = totals.get("valid", 0)
    epochs_students = cfg.train.epochs * len(cfg.train.students)
    compute = {"teacher forwards (cache, once)": totals.get("teacher_forwards"),
               "online SEED would need": n_valid * epochs_students,
               "student epochs x students": epochs_students,
               "teacher seconds (cache)": totals.get("teacher_seconds")}
    cache_row = {"N valid": n_valid, "V": group.attrs["V"], "D": dim, "resolution": res,
                 "teacher": group.attrs["teacher"]["arch"], "fingerprint": group.attrs["fingerprint"][:12]}
    report = write_report(out, title=f"seed run {cfg.train.run}", results=results, cache=cache_row, metrics=metrics,
                          compute=compute)
    return {"report": report, "results": results, "seconds": round(time.perf_counter() - t0, 1), "compute": compute}


def _write_json(url: str, obj: Any) -> None:
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _read_json(url: str) -> Any:
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
