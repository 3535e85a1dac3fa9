"""Evaluation stage: kNN and linear probe of teacher, students and baselines, and the run report.

Recipe: load every encoder (teacher, students, their random inits) -> one streaming pass over
each split at the cache's resolution feeds them all the same batches and keeps only their pooled
features, on local disk (``TMPDIR``), and a bounded raw-pixel subsample (``seed.evaluate.extract_all``)
-> score each encoder, giving its features' disk space back once it is scored -> write ``report.md``
+ PNGs next to the run's checkpoints.
``include_teacher=False`` (the student-only re-run) never loads the teacher: it reuses the
teacher's scores saved by an earlier evaluation of the same cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from seed import cache, checkpoint, launcher
from seed.config import RunConfig, write_run_files
from seed.errors import SeedError
from seed.devices import cpu_cores, data_workers, read_ahead, resolve_device
from seed.evaluate import (Encode, Extracted, Part, PixelSample, extract_all, extract_part, gather_parts, probe_method,
                           probe_name, score)
from seed.features import Rows, feature_file
from seed.models import Encoder, create_backbone, freeze
from seed.report import OnProgress, Progress, write_report
from seed.shards import class_names, expand_urls, shard_lengths
from seed.storage import Storage, read_json, write_text
from seed.teachers import LoadReport, TeacherLoader, load_teacher

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """One row per encoder (name, kind, kNN, 1-NN, linear, notes), the report's URL, the compute table, and the
    stage's seconds: in all, and of them reading both splits' features (the rest loads encoders and scores)."""

    report: str
    results: list[dict[str, Any]]
    seconds: float
    compute: dict[str, Any]
    feature_seconds: float = 0.0


def random_student(arch: str, small_input: bool, seed: int) -> tuple[Encoder, str]:
    """A randomly initialised student behind the same mean/std normalisation as every trained encoder (a
    fair baseline: without it the random row also loses what normalisation alone is worth); ResNets
    without timm's zero-initialised last BN (degenerate features)."""
    torch.manual_seed(seed)
    try:
        backbone = create_backbone(arch, small_input=small_input, zero_init_last=False)
        note = "random init, timm default except zero_init_last=False; normalised as the students"
    except TypeError:
        backbone = create_backbone(arch, small_input=small_input)
        note = "random init, timm default; normalised as the students"
    return freeze(Encoder.for_backbone(backbone)), note


def run(cfg: RunConfig, storage: Storage, *, include_teacher: bool = True, progress: bool = True,
        load: TeacherLoader = load_teacher, on_progress: OnProgress | None = None, procs: int = 1) -> EvaluationResult:
    """Score raw pixels, the teacher (or its saved scores), each student and its random init; write the report.

    ``progress``: bars over each split's images and each encoder's scoring; ``on_progress``: told the same,
    (what, done, total, unit) after each step (``seed.report.Progress``). ``procs``: processes that extract the
    features (0 = one per visible GPU; ``seed.launcher.process_devices`` of ``train.device``), each loading every
    encoder (the teacher through ``load_teacher``, not ``load``); the scores are computed here, as with one."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    url = storage.cache_url(cfg.cache.name)
    group = cache.open_complete(url)
    attrs = cache.attributes(group)
    res = int(attrs["fingerprint_fields"]["resolution"])
    dim = int(attrs["D"])
    missing = [s.label for s in cfg.train.students if not checkpoint.exists(storage.student_checkpoint(cfg.train.run, s.label))]
    if missing:  # before any encoder loads or any image is read: a report without them would look complete
        raise SeedError(f"run {cfg.train.run}: no checkpoint of student(s) {', '.join(missing)} under "
                        f"{storage.run_dir(cfg.train.run)}; train them first (seed student with the same config), or "
                        "name the run they were trained in (train.run)")
    train_urls = expand_urls(storage.resolve("shards", cfg.data.train))
    test_urls = expand_urls(storage.resolve("shards", cfg.data.test))
    _check_splits(train_urls, test_urls)
    devices = launcher.process_devices(cfg.train.device, procs, "train.device") if procs != 1 else [str(device)]
    # every encoder first, so one pass over each split feeds them all: (name, kind, note) by feature key; loaded
    # here only for their rows when processes of their own extract the features
    here = len(devices) == 1
    encoders, rows, metrics = _encoders(cfg, storage, attrs, url, include_teacher, load,
                                        device if here else torch.device("cpu"))
    if not here:
        encoders = {}
    sample = PixelSample()  # fixed seed: the same subsample for every run of the protocol
    t_features = time.perf_counter()
    with contextlib.ExitStack() as held:  # the feature files give their disk space back however this ends
        if here:
            workers, depth = _loader(cfg, device)
            train, test = (held.enter_context(extract_all(
                encoders, urls, res, device, workers=workers, depth=depth, pixels=sample, progress=progress, desc=desc,
                damaged=cfg.data.damaged, on_progress=on_progress, fused_augment=cfg.train.loader.fused_augment))
                for urls, desc in ((train_urls, "train features"), (test_urls, "test features")))
        else:
            train, test = _extract_in_processes(cfg, storage, devices, list(rows), include_teacher,
                                                {"train features": train_urls, "test features": test_urls}, res,
                                                sample, progress, on_progress, held)
        feature_seconds = time.perf_counter() - t_features
        del encoders

        results: list[dict[str, Any]] = []
        assert train.pixels is not None and train.pixel_labels is not None
        assert test.pixels is not None and test.pixel_labels is not None
        # one probe for every row, so that their linear scores compare: L-BFGS unless the largest would not fit
        classes = int(train.labels.max()) + 1 if train.n else 1
        shapes = [train.pixels.shape] + [train.features[key].shape for key in rows]
        method = "sgd" if any(probe_method(n, d, classes) == "sgd" for n, d in shapes) else "lbfgs"
        protocol = {"test_shards": _digest(test_urls), "n_test": test.n, "probe": probe_name(method), "resolution": res}

        def add(name: str, kind: str, tr: Rows, tr_y: np.ndarray, te: Rows, te_y: np.ndarray, note: str,
                center: bool = False) -> None:
            results.append({"name": name, "kind": kind, "init": note, "dim": int(tr.shape[1]),
                            **score(tr, tr_y, te, te_y, center=center, device=device, progress=progress,
                                    name=name, on_progress=on_progress, method=method).as_dict()})

        add("raw pixels", "baseline", train.pixels, train.pixel_labels, test.pixels, test.pixel_labels,
            f"centred, {train.pixel_resolution} px, {len(train.pixels)} of {train.n} train and "
            f"{len(test.pixels)} of {test.n} test images", center=True)
        teacher_file = storage.teacher_scores(cfg.cache.name)
        if not include_teacher:
            saved = read_json(teacher_file)
            if saved and saved.get("cache_fingerprint") == attrs["fingerprint"] and saved.get("protocol") == protocol:
                results.append({k: v for k, v in saved.items() if k not in ("cache_fingerprint", "protocol")}
                               | {"init": "scores from the full run"})
            else:
                why = ("none saved" if not saved else "saved for another cache of that name"
                       if saved.get("cache_fingerprint") != attrs["fingerprint"] else
                       "saved for another test split, resolution or linear probe")
                log.warning("%s: no teacher scores saved for cache %s (%s); the report has no teacher row: evaluate "
                            "once with the teacher (seed evaluate without --no-teacher)", teacher_file, cfg.cache.name,
                            why)
        for key, (name, kind, note) in rows.items():
            # an encoder's feature files give their disk space back once it is scored
            tr, te = train.features[key], test.features[key]
            add(name, kind, tr, train.labels, te, test.labels, note)
            tr.close()
            te.close()
            if key == "teacher":
                write_text(teacher_file, json.dumps({"cache_fingerprint": attrs["fingerprint"], "protocol": protocol,
                                                     **results[-1]}, indent=1))
    out = storage.run_dir(cfg.train.run)
    totals = attrs.get("totals", {})
    n_valid = totals.get("valid", 0)
    epochs_students = cfg.train.optim.epochs * len(cfg.train.students)
    compute = {"teacher forwards (cache, once)": totals.get("teacher_forwards"),
               "online SEED would need": n_valid * epochs_students,
               "student epochs x students": epochs_students,
               "teacher seconds (cache)": totals.get("teacher_seconds")}
    cache_row = {"N valid": n_valid, "V": attrs["V"], "D": dim, "resolution": res,
                 "teacher": attrs["teacher"]["arch"], "fingerprint": attrs["fingerprint"][:12]}
    report = write_report(out, title=f"seed run {cfg.train.run}", results=results, cache=cache_row, metrics=metrics,
                          compute=compute)
    return EvaluationResult(report, results, round(time.perf_counter() - t0, 1), compute, round(feature_seconds, 1))


def _encoders(cfg: RunConfig, storage: Storage, attrs: dict[str, Any], url: str, include_teacher: bool,
              load: TeacherLoader, device: torch.device) -> tuple[dict[str, Encode], dict[str, tuple[str, str, str]],
                                                                  list[dict[str, Any]]]:
    """Every encoder the report scores, on ``device``, by feature key (``teacher``, ``student i``, ``random i``);
    their rows' (name, kind, note) by the same keys; the last student's training metrics."""
    encoders: dict[str, Encode] = {}
    rows: dict[str, tuple[str, str, str]] = {}
    if include_teacher:
        teacher, loaded = load(cfg.teacher)
        _check_teacher(cfg, loaded, attrs, url)
        encoders["teacher"] = teacher.to(device).features
        rows["teacher"] = (f"teacher {cfg.teacher.arch}", "teacher", "pooled backbone features")
    metrics: list[dict[str, Any]] = []
    for i, s in enumerate(cfg.train.students):
        path = storage.student_checkpoint(cfg.train.run, s.label)
        model, state = checkpoint.load_student(path)
        metrics = state.get("metrics", metrics)
        encoders[f"student {i}"] = model.to(device).features
        rows[f"student {i}"] = (f"{s.label} ({state.get('mode', 'cached')} SEED)", "student",
                                _student_note(path, state, cfg, attrs))
        backbone, note = random_student(s.arch, s.small_input, cfg.train.seed + i)
        encoders[f"random {i}"] = backbone.to(device).features
        rows[f"random {i}"] = (f"{s.label} random", "baseline", note)
    return encoders, rows, metrics


def _loader(cfg: RunConfig, device: torch.device) -> tuple[int, int]:
    """Data workers and read-ahead: ``train.loader``'s; on the CPU the encoders' threads take their cores first
    (``seed.devices.read_ahead``)."""
    threads = torch.get_num_threads() if device.type == "cpu" else None
    workers = data_workers(cfg.train.loader.workers, device, model_threads=threads)
    return workers, read_ahead(cfg.train.loader.prefetch, device, workers, model_threads=threads)


PART_PROGRESS = "seed-features "  # a line of an evaluation process: the samples of a split it has read so far


def _extract_in_processes(cfg: RunConfig, storage: Storage, devices: list[str], keys: list[str], include_teacher: bool,
                          splits: dict[str, list[str]], resolution: int, sample: PixelSample, progress: bool,
                          on_progress: OnProgress | None, held: contextlib.ExitStack) -> list[Extracted]:
    """Each split's features extracted by one process per device (``devices``), each over every n-th shard: the
    processes (``seed evaluate --part``, pinned to their share of the cores as ``seed teacher --procs``'s) load every
    encoder and write each encoder's rows into one unnamed file per split that they inherit from this process, at
    the rows the split's sample counts (counted once per storage where no ``_info.json`` says them) give them.
    Their files are entered into ``held`` (closed with it). A failed process stops the others; nothing is scored."""
    directory = tempfile.gettempdir()
    lengths = {desc: shard_lengths(urls, record=storage.shard_lengths_record(), damaged=cfg.data.damaged)
               for desc, urls in splits.items()}
    files = {desc: {key: held.enter_context(feature_file(directory)) for key in keys} for desc in splits}
    n = len(devices)
    shares = launcher.process_cores(n)
    # a process whose every-n-th shards are none in both splits is not started
    mine = [{desc: list(range(len(urls)))[i::n] for desc, urls in splits.items()} for i in range(n)]  # every n-th
    busy = [i for i in range(n) if any(mine[i].values())]
    with tempfile.TemporaryDirectory(prefix="seed-evaluate-") as tmp, launcher.Children(tmp, PART_PROGRESS) as children:
        config, roots = write_run_files(cfg, storage, tmp)
        for i in busy:
            spec = {"device": devices[i], "include_teacher": include_teacher, "directory": directory,
                    "splits": [{"desc": desc, "urls": urls, "lengths": lengths[desc],
                                "shards": mine[i][desc], "out": f"{tmp}/part-{i}-{j}.npz",
                                "files": {key: f.fileno() for key, f in files[desc].items()}}
                               for j, (desc, urls) in enumerate(splits.items())]}
            with open(f"{tmp}/part-{i}.json", "w") as f:
                json.dump(spec, f)
            env = dict(os.environ)
            if devices[i] == "cpu" and "OMP_NUM_THREADS" not in env:  # its forwards' threads: its share of the cores
                env["OMP_NUM_THREADS"] = str(len(shares[i]) if shares is not None else max(1, cpu_cores() // n))
            children.start([sys.executable, "-m", "pipeline.cli", "evaluate", "-c", config, "--storage", roots,
                            "--part", f"{tmp}/part-{i}.json"], cores=shares[i] if shares is not None else None,
                           env=env, pass_fds=[f.fileno() for by_key in files.values() for f in by_key.values()])
        bars = {desc: Progress(f"{desc} ({len(keys)} encoders, {len(busy)} processes)", sum(lengths[desc]), "images",
                               show=progress, report=on_progress, smoothing=0.1) for desc in splits}
        told: dict[tuple[int, str], int] = {}
        said: set[str] = set()  # a warning every process gives (a tmpfs, say) said once
        try:  # the bars close before an error is printed, never after it
            while True:
                finished, failed = children.poll()
                for c, i in enumerate(busy):
                    for line in children.new_lines(c):
                        if line.startswith(PART_PROGRESS):
                            desc, done = json.loads(line[len(PART_PROGRESS):])
                            bars[desc].update(done - told.get((i, desc), 0))
                            told[i, desc] = done
                        elif line.strip() and line not in said:  # its warnings (it logs nothing below), as they come
                            said.add(line)
                            log.warning("evaluation process on %s: %s", devices[i], line)
                if finished:
                    break
                time.sleep(0.2)
        finally:
            for bar in bars.values():
                bar.close()
        if failed is not None:
            raise children.error(failed, f"evaluation process on {devices[busy[failed]]}", "nothing was scored")
        # one process's parts at a time: their pixel keepers, up to max_images rows each, are merged as they load
        return [gather_parts((Part.load(f"{tmp}/part-{i}-{j}.npz") for i in busy), files[desc], resolution, sample)
                for j, desc in enumerate(splits)]


def run_part(cfg: RunConfig, storage: Storage, spec_file: str) -> None:
    """One process of ``_extract_in_processes``: its shards of each split through every encoder on its device, rows
    into the files it inherited, the rest (``seed.evaluate.Part``) to the file its spec names."""
    with open(spec_file) as f:
        spec = json.load(f)
    device = resolve_device(spec["device"])
    if device.type == "cuda":  # its GPU as the current device: what a library allocates or launches unasked lands there
        torch.cuda.set_device(device)
    url = storage.cache_url(cfg.cache.name)
    attrs = cache.attributes(cache.open_complete(url))
    res = int(attrs["fingerprint_fields"]["resolution"])
    encoders, _, _ = _encoders(cfg, storage, attrs, url, spec["include_teacher"], load_teacher, device)
    workers, depth = _loader(cfg, device)
    for split in spec["splits"]:
        def told(what: str, done: int, total: int | None, unit: str, desc: str = split["desc"]) -> None:
            print(PART_PROGRESS + json.dumps([desc, done]), flush=True)

        part = extract_part(encoders, split["urls"], split["shards"], split["lengths"], split["files"], res, device,
                            workers=workers, depth=depth, pixels=PixelSample(), desc=split["desc"],
                            damaged=cfg.data.damaged, directory=spec["directory"], on_progress=told,
                            fused_augment=cfg.train.loader.fused_augment)
        part.save(split["out"])


def _check_splits(train: list[str], test: list[str]) -> None:
    """Before any image is read: the splits share no shard (a test image would be its own nearest neighbour),
    and where ``seed shards imagefolder`` recorded both splits' class names, they number the classes alike
    (each split numbers its own folders: a class missing from one shifts every label after it)."""
    shared = sorted(set(train) & set(test))
    if shared:
        raise SeedError(f"data.train and data.test share {len(shared)} shard(s) ({', '.join(shared[:3])}"
                        f"{', ...' if len(shared) > 3 else ''}): a test image would be its own nearest neighbour; "
                        "evaluate on a held-out split")
    a, b = class_names(train), class_names(test)
    if a is not None and b is not None and a != b:
        differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise SeedError(f"data.train and data.test number their classes differently: label {differ} is "
                        f"{a[differ] if differ < len(a) else 'missing'!r} in the train split and "
                        f"{b[differ] if differ < len(b) else 'missing'!r} in the test split ({len(a)} and {len(b)} "
                        "classes, from their _info.json); make both splits from trees with the same class folders")


def _check_teacher(cfg: RunConfig, report: LoadReport, attrs: dict[str, Any], url: str) -> None:
    """The teacher scored is the one the cache was made with (the report's cache table describes it, and its
    scores are saved for the cache's later student-only reports)."""
    made = attrs["fingerprint_fields"]["teacher"]
    if (cfg.teacher.arch, report.sha256) != (made.get("arch"), made.get("checkpoint_sha256")):
        raise SeedError(f"teacher.checkpoint {cfg.teacher.checkpoint or '(none)'} ({cfg.teacher.arch}, sha256 "
                        f"{report.sha256[:12]}) is not the teacher cache {url} was made with ({made.get('arch')}, "
                        f"sha256 {str(made.get('checkpoint_sha256'))[:12]}); name that teacher, or the cache made with "
                        "this one (cache.name)")


def _student_note(path: str, state: dict[str, Any], cfg: RunConfig, attrs: dict[str, Any]) -> str:
    """A student's row note: its epochs, and "unfinished" (with a warning) when it stopped before
    ``train.optim.epochs``. A student trained against another cache of this name is refused: the report
    describes this one."""
    made_from = state.get("cache_fingerprint")
    if made_from is not None and made_from != attrs["fingerprint"]:
        raise SeedError(f"{path}: trained against another cache (fingerprint {str(made_from)[:12]}) than "
                        f"{cfg.cache.name} ({attrs['fingerprint'][:12]}); train it again, or name its cache")
    epochs, planned = int(state["epoch"]), cfg.train.optim.epochs
    if epochs < planned:
        steps = int(state.get("step", 0))  # a checkpoint written inside the next epoch
        done = f"{epochs} of {planned} epochs" + (f" and {steps:,} steps" if steps else "")
        log.warning("%s: stopped after %s; its row says so (seed student --resume finishes it)", path, done)
        return f"{done} (unfinished)"
    return f"{epochs} epochs"


def _digest(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
