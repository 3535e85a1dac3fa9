"""Fault injection: every stage SIGKILLed at seeded points, then re-run, ends where an uninterrupted run does.

A reference run makes each stage's output once through the CLI (shards -> pretrain -> teacher ->
bank -> student -> evaluate, on real Fashion-MNIST, tiny sizes). For each stage and its kill
point (drawn with a fixed seed as a fraction of the reference stage's work, after the seconds
its imports take, so a failure reproduces), a fresh root gets the earlier stages' outputs, the stage is started and SIGKILLed at
that point (a run that ends before it, the reference having been timed under load, gives the next try its own time), then run again as a user would (``--resume`` where the stage has one); its output must
equal the reference's: the same bytes for the cache, bank and shards, the same weights for
training, the same scores for evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from seed import checkpoint
from seed.shards import iter_shard

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "data": {"train": "fm/train/train-{000000..000002}.tar", "test": "fm/test/test-000000.tar"},
    "teacher": {"arch": "resnet10t"},
    "pretrain": {"name": "teacher-moco", "arch": "resnet10t", "dim": 32, "queue": 128,
                 "optim": {"epochs": 3, "batch_size": 50}, "loader": {"shuffle_buffer": 100}},
    "cache": {"name": "faults", "views": 2, "batch_size": 64, "cpu_threads": 2, "workers": 1},
    "bank": {"size": 64, "topk": 8},
    "train": {"run": "faults", "optim": {"epochs": 3, "batch_size": 50}, "loader": {"shuffle_buffer": 100},
              "students": [{"arch": "mobilenetv3_small_050"}]},
}
STAGES = ["shards", "pretrain", "teacher", "bank", "student", "evaluate"]
SEED = 20261126


def _root(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "storage.yaml").write_text(f"shards: {path}/shards\ncaches: {path}/caches\nruns: {path}/runs\n"
                                       f"reports: {path}/reports\n")
    config = json.loads(json.dumps(CONFIG))
    config["teacher"] |= {"checkpoint": str(path / "runs" / "teacher-moco" / "teacher.pth"), "format": "moco",
                          "output": "head"}
    (path / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    return path


def _command(root: Path, stage: str, again: bool) -> list[str]:
    base = [sys.executable, "-m", "pipeline.cli"]
    if stage == "shards":
        # a killed conversion leaves either nothing or the whole output (published by one rename), which
        # the re-run is told to replace, as its message asks
        return base + ["shards", "fashion-mnist", "--out", str(root / "shards" / "fm"), "--per-shard", "100",
                       "--limit", "5000", "--storage", str(root / "storage.yaml"), *(["--overwrite"] if again else [])]
    resume = ["--resume"] if again and stage in ("pretrain", "student") else []
    return base + [stage, "-c", str(root / "run.yaml"), "--storage", str(root / "storage.yaml"), *resume]


def _run(root: Path, stage: str, again: bool = False) -> str:
    out = subprocess.run(_command(root, stage, again), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, f"{stage}: {out.stderr[-3000:]}"
    return out.stdout


def _outputs(root: Path, stage: str) -> list[Path]:
    """What ``stage`` writes under ``root`` (removed from a copy to run that stage again from scratch)."""
    return {"shards": [root / "shards"], "pretrain": [root / "runs" / "teacher-moco"],
            "teacher": [root / "caches" / "faults.zarr"], "bank": [root / "caches" / "faults.zarr" / "bank"],
            "student": [root / "runs" / "faults" / "mobilenetv3_small_050"],
            "evaluate": [root / "runs" / "faults" / "report.md", root / "reports"]}[stage]


def _state(root: Path, stage: str, stdout: str) -> object:
    """The stage's output as comparable data."""
    if stage == "shards":
        return [[(s.key, s.image, s.label) for s in iter_shard(str(p))]
                for p in sorted((root / "shards" / "fm").rglob("*.tar"))]
    if stage in ("pretrain", "student"):
        path = (root / "runs" / "teacher-moco" / "teacher.pth" if stage == "pretrain"
                else root / "runs" / "faults" / "mobilenetv3_small_050" / "checkpoint.pt")
        state = checkpoint.load(str(path))
        weights = state["state_dict"] if stage == "pretrain" else state["model"]
        return {k: v.numpy().tobytes() for k, v in weights.items() if isinstance(v, torch.Tensor)}
    group = zarr.open_group(str(root / "caches" / "faults.zarr"), mode="r")

    def data(node: str) -> object:
        x = np.asarray(group[node][:])
        return x.tolist() if x.dtype.kind in "OUT" else x.tobytes()  # strings by value, numbers by their bytes

    if stage == "teacher":
        return {k: data(k) for k in ("embeddings", "augment", "keys", "labels", "valid")}
    if stage == "bank":
        return {k: data(f"bank/{k}") for k in ("ids", "vectors", "indices", "logp", "mass")}
    return [line for line in stdout.splitlines() if line.startswith("|")]  # evaluate: the score table


def _startup(stage: str) -> float:
    """Seconds a process takes to import what ``stage`` runs (torch, timm, zarr ...) before its work begins."""
    module = "seed.shards" if stage == "shards" else f"pipeline.{stage}"
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", f"import pipeline.cli, {module}"], check=True)
    return time.monotonic() - t


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[float, float]], dict[str, object]]:
    """The uninterrupted run: its root, each stage's (start-up, work) seconds and output."""
    root = _root(tmp_path_factory.mktemp("faults") / "reference")
    seconds, states = {}, {}
    for stage in STAGES:
        t = time.monotonic()
        stdout = _run(root, stage)
        total = time.monotonic() - t
        startup = min(_startup(stage), 0.8 * total)
        seconds[stage] = (startup, total - startup)
        states[stage] = _state(root, stage, stdout)
    return root, seconds, states


# one kill point a stage, drawn in 20-70 % of its work: the stages that resume part-way (pre-training and students
# by epoch and step, the teacher by shard, the bank by row block) are also cut at chosen positions by their own
# resume tests (test_train.py, test_teacher_stage.py, test_bank_stage.py); a second point each here cost about 40 s
# of a suite that must stay under 15 minutes
KILL_POINTS = [(stage, float(np.random.default_rng([SEED, STAGES.index(stage)]).uniform(0.2, 0.7, size=2).round(3)[0]))
               for stage in STAGES]


@pytest.mark.parametrize("stage,fraction", KILL_POINTS, ids=[f"{s}-at-{f:.0%}" for s, f in KILL_POINTS])
def test_killed_stage_reruns_to_the_uninterrupted_result(reference, tmp_path: Path, stage: str, fraction: float) -> None:
    ref_root, seconds, states = reference
    root = tmp_path / "root"
    shutil.copytree(ref_root, root, symlinks=True)
    _root(root)                                                                # paths in the config point here
    startup, work = seconds[stage]
    delay = startup + work * fraction                                          # into the stage's own work
    scratch = tmp_path / "tmpdir"                                              # the killed process's TMPDIR
    scratch.mkdir()
    for _ in range(4):  # the machine is shared: a run faster than the reference is timed, and the next one is
        for path in _outputs(root, stage):  # killed at the same fraction of that run's own work
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        t = time.monotonic()
        proc = subprocess.Popen(_command(root, stage, False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "2", "TMPDIR": str(scratch)})
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            break
        assert proc.returncode == 0, f"{stage} failed before its kill point (exit {proc.returncode})"
        took = time.monotonic() - t
        startup = min(startup, 0.5 * took)
        delay = startup + 0.9 * fraction * (took - startup)
    assert proc.poll() is None, f"{stage} finished before every kill point tried; the kill missed it"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if stage == "evaluate":  # the feature rows were in unnamed files: nothing is left behind
        assert list(scratch.iterdir()) == []
    stdout = _run(root, stage, again=True)
    assert _state(root, stage, stdout) == states[stage]
    if stage == "shards":  # the killed conversion's build directory is gone too
        assert sorted(p.name for p in (root / "shards").iterdir()) == ["fm"]


FULL_ROOTS = {"bank": ("caches",), "student": ("runs",), "evaluate": ("runs", "reports")}


@pytest.mark.parametrize("stage", list(FULL_ROOTS))
def test_a_disk_filling_part_way_leaves_nothing_that_looks_complete(reference, tmp_path: Path, stage: str) -> None:
    """The disk under the stage's output fills part-way through its writes (``ENOSPC`` from the storage layer,
    ``tests/integration/fulldisk.py``): one line, exit 1, no output that looks complete; the re-run with space
    ends where the uninterrupted run did. (The teacher stage's case is in test_teacher_stage.py.)"""
    ref_root, _, states = reference
    root = tmp_path / "root"
    shutil.copytree(ref_root, root, symlinks=True)
    _root(root)
    for path in _outputs(root, stage):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    files = [f for p in _outputs(ref_root, stage) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    largest = max(f.stat().st_size for f in files)
    budget = largest * 3 // 2 if stage == "student" else sum(f.stat().st_size for f in files) // 2  # student: 2nd epoch
    roots = {name: f"fulldisk://{root}/{name}" if name in FULL_ROOTS[stage] else str(root / name)
             for name in ("shards", "caches", "runs", "reports")}
    (root / "full.yaml").write_text("".join(f"{k}: {v}\n" for k, v in roots.items()))
    args = [a if a != str(root / "storage.yaml") else str(root / "full.yaml") for a in _command(root, stage, False)[3:]]
    out = subprocess.run([sys.executable, "-m", "tests.integration.fulldisk", str(budget), *args], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("seed: error:") and "No space left on device" in last and "re-run once it is fixed" in last
    assert "Traceback" not in out.stderr
    if stage == "bank":
        cut = (root / "caches" / "faults.zarr" / "bank" / "zarr.json")
        if not (cut.exists() and cut.stat().st_size == 0):  # else the disk filled as the bank's metadata was written
            bank = zarr.open_group(str(root / "caches" / "faults.zarr"), mode="r").get("bank")
            assert bank is None or bank.attrs["status"] in ("creating", "building")   # never "complete"
    elif stage == "student":
        path = root / "runs" / "faults" / "mobilenetv3_small_050" / "checkpoint.pt"
        assert not path.exists() or checkpoint.load(str(path))["epoch"] < CONFIG["train"]["optim"]["epochs"]
    else:
        assert not (root / "runs" / "faults" / "report.md").exists()
    assert not [p for p in root.rglob(".*") if p.is_file()], "a temporary file was left behind"
    stdout = _run(root, stage, again=True)
    assert _state(root, stage, stdout) == states[stage]
