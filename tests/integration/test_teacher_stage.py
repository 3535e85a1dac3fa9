"""The teacher stage on real Fashion-MNIST shards: replay fidelity, resume, concurrency, refusal."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr

from pipeline import teacher as stage
from seed import bank_store, cache
from seed.augment import apply_batch
from seed.decode import Decoder
from seed.data import CachedSource, examples
from seed.config import load_config
from seed.errors import SeedError
from seed.inspect import _replay, describe, format_text, sample_views
from seed.shards import decode_image, iter_shard
from seed.storage import Storage
from seed.teachers import load_teacher
from seed.views import COL, Recipe
from seed.workers import SharedSlots, shard_workers
from tests.conftest import make_storage, small_config
from tests.integration.fulldisk import FullDisk

SIX = "fm/train/train-{000000..000005}.tar"


def _arrays(url: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(url, mode="r")
    return {name: g[name][:] for name in cache.ARRAYS}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in cache.ARRAYS:
        if a[name].dtype.kind == "f":
            assert a[name].tobytes() == b[name].tobytes(), name  # bytes: NaN padding included
        else:
            assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, shards_root: Path, moco_checkpoint: Path):
    """One uninterrupted run over 6 real shards (600 images, 2 views) - the reference."""
    root = tmp_path_factory.mktemp("clean")
    cfg = small_config(moco_checkpoint, shards=SIX)
    storage = make_storage(root, shards_root)
    summary = stage.run(cfg, storage, progress=False)
    return cfg, storage, summary.cache


def test_cache_contract(clean) -> None:
    cfg, _, url = clean
    g = zarr.open_group(url, mode="r")
    a = g.attrs
    assert a["format"] == cache.FORMAT and a["status"] == "complete" and a["N"] == 600 and a["V"] == 2 and a["D"] == 32
    assert g["embeddings"].dtype == np.float16 and g["embeddings"].shape == (600, 2, 32)
    assert g["augment"].shape == (600, 2, a["P"]) and len(a["augment_columns"]) == a["P"]
    # one chunk row-block per input shard, and one view deep (what a student epoch reads of a block)
    assert g["embeddings"].chunks == (a["capacity"], 1, 32) and a["capacity"] == 100
    assert a["preprocessing"]["input_size"] == [3, 32, 32] and len(a["preprocessing"]["mean"]) == 3
    assert a["totals"]["teacher_forwards"] == 1200 and a["totals"]["valid"] == 600
    emb = g["embeddings"][:].astype(np.float32)
    assert np.allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=2e-3)
    keys = g["keys"][:]
    assert keys[0] == "fmnist-train-000000" and keys[599] == "fmnist-train-000599"
    labels = [s.label for s in iter_shard(a["shard_urls"][1])]
    assert g["labels"][100:200].tolist() == labels


def test_replayed_view_reproduces_cached_embedding(clean) -> None:
    cfg, _, url = clean
    g = zarr.open_group(url, mode="r")
    teacher, _ = load_teacher(cfg.teacher)
    rng = np.random.default_rng(0)
    rows = rng.choice(600, size=24, replace=False)
    views = rng.integers(0, 2, size=24)
    urls = g.attrs["shard_urls"]
    images = []
    for r in rows:
        sample = next(s for s in iter_shard(urls[r // 100]) if s.index == r % 100)
        assert sample.key == g["keys"][r]
        images.append(decode_image(sample))
    params = torch.from_numpy(g["augment"][:][rows, views])
    replayed = stage.embed(teacher, apply_batch(images, params, cfg.cache.recipe, cfg.cache.resolution), torch.device("cpu"))
    cached = torch.from_numpy(g["embeddings"][:][rows, views].astype(np.float32))
    assert torch.allclose(replayed, cached, atol=2e-3), (replayed - cached).abs().max()
    # and a different view of the same image is a different embedding
    other = torch.from_numpy(g["embeddings"][:][rows, 1 - views].astype(np.float32))
    assert (replayed - other).abs().max() > 1e-2


def _cli(storage_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "teacher", "--storage", str(storage_file), *args]


def _storage_file(root: Path, shards_root: Path) -> Path:
    path = root / "storage.yaml"
    path.write_text(f"shards: {shards_root}\ncaches: {root / 'caches'}\nruns: {root / 'runs'}\nreports: {root / 'reports'}\n")
    return path


def _sets(checkpoint: Path) -> list[str]:
    out = []
    for s in (f"data.train={SIX}", f"teacher.checkpoint={checkpoint}", "cache.views=2", "cache.batch_size=64",
              "cache.cpu_threads=2", "cache.name=test"):
        out += ["--set", s]
    return out


def test_killed_run_resumes_to_identical_cache(clean, tmp_path: Path, shards_root: Path, moco_checkpoint: Path) -> None:
    _, _, clean_url = clean
    storage_file = _storage_file(tmp_path, shards_root)
    url = str(tmp_path / "caches" / "test.zarr")
    output = tmp_path / "killed-run.log"
    with open(output, "w") as log:
        proc = subprocess.Popen(_cli(storage_file, *_sets(moco_checkpoint), "--set", "cache.batch_size=16"),
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (Path(url) / "progress" / "000000" / "zarr.json").exists():  # first shard done: kill mid-stage
        assert proc.poll() is None and time.monotonic() < deadline, (
            f"teacher run ended (exit {proc.poll()}) or took over 120 s before it could be killed; its output:\n"
            + output.read_text()[-3000:])
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    g = zarr.open_group(url, mode="r")
    done = cache.done_shards(g)
    assert g.attrs["status"] == "incomplete" and 1 <= len(done) < 6, (g.attrs["status"], done, output.read_text()[-3000:])
    with pytest.raises(SeedError, match="incomplete"):
        cache.open_complete(url)
    rerun = subprocess.run(_cli(storage_file, *_sets(moco_checkpoint)), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    _assert_same(_arrays(url), _arrays(clean_url))
    assert zarr.open_group(url, mode="r").attrs["totals"]["valid"] == 600


def test_crash_between_chunk_writes_resumes_to_identical_cache(clean, tmp_path: Path, shards_root: Path) -> None:
    cfg, _, clean_url = clean
    storage = make_storage(tmp_path, shards_root)
    forwards = {"n": 0}

    def crashing(teacher_cfg):  # the teacher dies in shard 2, after shards 0 and 1 (4 batches of 64 each)
        encoder, report = load_teacher(teacher_cfg)

        def count(*_: object) -> None:
            forwards["n"] += 1
            if forwards["n"] > 8:
                raise RuntimeError("simulated crash")
        encoder.register_forward_pre_hook(count)
        return encoder, report

    with pytest.raises(RuntimeError, match="simulated crash"):
        stage.run(cfg, storage, progress=False, load=crashing)
    g = zarr.open_group(storage.cache_url(cfg.cache.name), mode="r+")
    assert cache.done_shards(g) == [0, 1]
    g["embeddings"][200:300] = g["embeddings"][0:100]   # a writer that died between its chunk writes:
    g["augment"][200:300] = g["augment"][0:100]         # half of shard 2's arrays, no completion record
    summary = stage.run(cfg, storage, progress=False)
    assert summary.skipped_done == (0, 1) and summary.embedded == (2, 3, 4, 5)
    _assert_same(_arrays(summary.cache), _arrays(clean_url))


def test_a_teacher_loaded_in_training_mode_writes_the_eval_caches_bytes(clean, tmp_path: Path, shards_root: Path) -> None:
    """Whoever loads the teacher, the stage runs it in eval mode: a training-mode BatchNorm would normalise each
    batch by its own statistics (a view's embedding would depend on its batch-mates)."""
    cfg, _, clean_url = clean
    storage = make_storage(tmp_path, shards_root)

    def in_training_mode(teacher_cfg):
        encoder, report = load_teacher(teacher_cfg)
        return encoder.train(), report

    summary = stage.run(cfg, storage, progress=False, load=in_training_mode)
    _assert_same(_arrays(summary.cache), _arrays(clean_url))


def test_a_teacher_giving_non_finite_embeddings_stops_the_stage_naming_the_shard(clean, tmp_path: Path,
                                                                                shards_root: Path) -> None:
    """Weights with a NaN (a diverged pre-training, a damaged file that still loads) would be stored as valid
    embeddings; the stage stops at the first such batch, naming its shard, and writes no record for it."""
    cfg, _, _ = clean
    storage = make_storage(tmp_path, shards_root)

    def diverged(teacher_cfg):
        encoder, report = load_teacher(teacher_cfg)
        with torch.no_grad():
            next(encoder.parameters()).fill_(float("nan"))
        return encoder, report

    with pytest.raises(SeedError, match=r"train-000000\.tar: the teacher gave non-finite embeddings for \d+ of \d+ "
                                        r"views .*nothing of this shard is written"):
        stage.run(cfg, storage, progress=False, load=diverged)
    assert cache.done_shards(zarr.open_group(storage.cache_url(cfg.cache.name), mode="r")) == []


def test_overwrite_with_shards_is_refused_before_anything_is_touched(clean) -> None:
    """Each --shards worker with --overwrite would delete the cache the other workers are writing."""
    cfg, storage, url = clean
    before = _arrays(url)
    with pytest.raises(SeedError, match="--overwrite does not combine with --shards"):
        stage.run(cfg, storage, overwrite=True, shards=[0], progress=False)
    _assert_same(_arrays(url), before)
    assert zarr.open_group(url, mode="r").attrs["status"] == "complete"


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_processes_write_the_same_cache(clean, tmp_path: Path, shards_root: Path, workers: int) -> None:
    """The reference ran with one worker process; 0 (a thread) and 2 processes, each owning whole
    shards, give the same bytes."""
    cfg, _, clean_url = clean
    storage = make_storage(tmp_path, shards_root)
    summary = stage.run(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, workers=workers)), storage,
                        progress=False)
    records = [cache.shard_record(zarr.open_group(summary.cache, mode="r"), s) for s in range(6)]
    assert [r["workers"] for r in records if r] == [workers] * 6
    _assert_same(_arrays(summary.cache), _arrays(clean_url))
    # how long the forward waited for its input: within each shard's time, beside the forward's
    for r in records:
        assert 0 <= r["input_wait_seconds"] and r["input_wait_seconds"] + r["teacher_seconds"] <= r["seconds"]
        if r["read_ahead"] == 0:  # batches made inline, between forwards: the wait is the whole data path
            assert r["input_wait_seconds"] > 0.5 * (r["seconds"] - r["teacher_seconds"]), r
    assert summary.totals is not None
    assert 0 <= min(r["first_batch_wait_seconds"] for r in records)
    assert summary.totals["input_wait_seconds"] == pytest.approx(
        sum(r["input_wait_seconds"] + r["first_batch_wait_seconds"] for r in records), abs=1e-3)


def test_affine_jitter_cache_replays_through_its_recorded_recipe(clean, tmp_path: Path, shards_root: Path,
                                                                 moco_checkpoint: Path) -> None:
    """A cache made with ``jitter_mode: affine`` records it; views replayed through the recorded recipe (as the
    student stage and ``seed inspect`` read it) re-embed to the cached embeddings, and the sequential cache
    of the same data refuses the affine config, naming the field."""
    cfg, storage, _ = clean
    with pytest.raises(SeedError, match=r"recipe\.jitter_mode"):
        stage.run(small_config(moco_checkpoint, "cache.recipe.jitter_mode=affine", shards=SIX), storage, progress=False)
    affine = small_config(moco_checkpoint, "cache.recipe.jitter_mode=affine", "cache.workers=2",
                          shards="fm/train/train-{000000..000001}.tar")
    url = stage.run(affine, make_storage(tmp_path, shards_root), progress=False).cache
    g = zarr.open_group(url, mode="r")
    assert g.attrs["fingerprint_fields"]["recipe"]["jitter_mode"] == "affine"
    rows = np.arange(0, 200, 5)
    views = rows % 2
    params = g["augment"][:][rows, views]
    assert (params[:, COL["jitter"]] > 0.5).sum() >= 20
    replayed = _replay(g, rows, views)
    teacher, _ = load_teacher(affine.teacher)
    cached = torch.from_numpy(g["embeddings"][:][rows, views].astype(np.float32))
    assert torch.allclose(stage.embed(teacher, replayed, torch.device("cpu")), cached, atol=2e-3)
    # the same rows through the sequential recipe are other pixels (clamps in other places)
    images = [decode_image(next(s for s in iter_shard(g.attrs["shard_urls"][r // 100]) if s.index == r % 100))
              for r in rows]
    sequential = apply_batch(images, torch.from_numpy(params), Recipe(), affine.cache.resolution)
    assert (sequential - replayed).abs().max() > 1e-3


def test_two_writers_equal_one(clean, tmp_path: Path, shards_root: Path, moco_checkpoint: Path) -> None:
    cfg, _, clean_url = clean
    storage_file = _storage_file(tmp_path, shards_root)
    stage.prepare(cfg, make_storage(tmp_path, shards_root), *load_teacher(cfg.teacher))  # the coordinator lays out the cache
    procs = [subprocess.Popen(_cli(storage_file, *_sets(moco_checkpoint), "--shards", part), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for part in ("0,2,4", "1,3,5")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    url = str(tmp_path / "caches" / "test.zarr")
    g = zarr.open_group(url, mode="r")
    assert len(cache.done_shards(g)) == 6
    assert g.attrs["status"] == "incomplete"  # workers never write the root attributes
    subprocess.run(_cli(storage_file, *_sets(moco_checkpoint)), check=True, capture_output=True)  # the coordinator
    _assert_same(_arrays(url), _arrays(clean_url))


def test_two_processes_from_one_command_equal_one(clean, tmp_path: Path, shards_root: Path, moco_checkpoint: Path) -> None:
    """`seed teacher --procs 2`: this process lays out the cache, two processes (the CPU here; cuda:0 and
    cuda:1 on a GPU node) embed every other shard, and the cache completes with the same bytes."""
    _, _, clean_url = clean
    storage_file = _storage_file(tmp_path, shards_root)
    out = subprocess.run(_cli(storage_file, *_sets(moco_checkpoint), "--procs", "2", "--quiet"), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "embedded 6 shards" in out.stdout and "complete" in out.stdout
    url = str(tmp_path / "caches" / "test.zarr")
    g = zarr.open_group(url, mode="r")
    assert g.attrs["status"] == "complete"
    assert all(cache.shard_record(g, s)["device"] == "cpu" for s in range(6))
    _assert_same(_arrays(url), _arrays(clean_url))
    cores = len(os.sched_getaffinity(0))
    if cores >= 2:  # each process pinned to half the cores; its two forward threads leave the workers what is left
        records = [cache.shard_record(g, s) for s in range(6)]
        assert {r["cores"] for r in records} <= {cores // 2, cores - cores // 2}
        assert all(r["workers"] == min(8, max(0, r["cores"] - 2)) for r in records)
        assert all(r["read_ahead"] == 0 for r in records if r["cores"] <= 2)
        # without cache.cpu_threads, a new cache's forwards take one thread per core of a process's share
        pairs = list(zip(_sets(moco_checkpoint)[::2], _sets(moco_checkpoint)[1::2]))
        sets = [x for flag, value in pairs if value not in ("cache.cpu_threads=2", "cache.name=test") for x in (flag, value)]
        one = subprocess.run(_cli(storage_file, *sets, "--set", "cache.name=one-thread", "--procs", "2", "--quiet"),
                             capture_output=True, text=True, timeout=600)
        assert one.returncode == 0, one.stderr[-3000:]
        assert zarr.open_group(str(tmp_path / "caches" / "one-thread.zarr"), mode="r").attrs["cpu_threads"] == cores // 2
    refused = subprocess.run(_cli(storage_file, *_sets(moco_checkpoint), "--procs", "2", "--shards", "0"),
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "does not combine with --shards" in refused.stderr


def _started_by(pid: int) -> dict[int, list[str]]:
    """The live processes started with ``seed.lifetime.child_env`` by ``pid``, and their command lines."""
    out: dict[int, list[str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if f"SEED_PARENT_PID={pid}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                out[int(entry.name)] = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
    return out


def _two_teacher_processes(launcher: int) -> tuple[dict[int, list[str]], Path]:
    """Wait for the two ``seed teacher --shards`` processes ``launcher`` starts: their command lines, and the
    directory holding their run files and logs."""
    deadline = time.monotonic() + 120
    children: dict[int, list[str]] = {}
    while time.monotonic() < deadline and len(children) < 2:
        children = {p: c for p, c in _started_by(launcher).items() if "teacher" in c}
        time.sleep(0.05)
    assert len(children) == 2, children
    command = next(iter(children.values()))
    return children, Path(command[command.index("-c") + 1]).parent


def test_teacher_processes_end_when_their_launcher_is_killed(clean, tmp_path: Path, shards_root: Path,
                                                             moco_checkpoint: Path) -> None:
    """`seed teacher --procs 2` killed outright (SIGKILL: none of its clean-up runs): its two processes end on
    their own within seconds (seed.lifetime) instead of running on, and the re-run completes the clean cache."""
    _, _, clean_url = clean
    storage_file = _storage_file(tmp_path, shards_root)
    launcher = subprocess.Popen(_cli(storage_file, *_sets(moco_checkpoint), "--procs", "2", "--quiet"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children, run_dir = _two_teacher_processes(launcher.pid)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _started_by(launcher.pid):
        time.sleep(0.2)
    assert not _started_by(launcher.pid)       # the two processes and any data worker they had started
    try:  # each said why it stopped, in its log (the launcher never got to remove its directory)
        for log in sorted(run_dir.glob("process-*.log")):
            assert f"the process that started this one (pid {launcher.pid}) has ended; stopping" in log.read_text()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rerun = subprocess.run(_cli(storage_file, *_sets(moco_checkpoint), "--procs", "2", "--quiet"), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same(_arrays(str(tmp_path / "caches" / "test.zarr")), _arrays(clean_url))


def test_a_terminated_launcher_stops_its_processes_and_cleans_up(tmp_path: Path, shards_root: Path,
                                                                moco_checkpoint: Path) -> None:
    """SIGTERM (a scheduler stopping the job) runs the clean-up Ctrl-C does: one line, exit 143, the processes it
    started stopped and its temporary directory removed."""
    storage_file = _storage_file(tmp_path, shards_root)
    launcher = subprocess.Popen(_cli(storage_file, *_sets(moco_checkpoint), "--procs", "2", "--quiet"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children, run_dir = _two_teacher_processes(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 143, err
    assert err.strip().splitlines()[-1] == "seed: terminated; completed shards are kept, re-run to resume", err
    assert "Traceback" not in err and not run_dir.exists()
    assert not {p for p in children if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}  # stopped, not left


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_disk_full_part_way_leaves_no_record_and_the_rerun_repairs_it(clean, tmp_path: Path, shards_root: Path) -> None:
    cfg, _, clean_url = clean
    fsspec.register_implementation("fulldisk", FullDisk, clobber=True)
    storage = Storage(shards=str(shards_root), caches=f"fulldisk://{tmp_path}/caches", runs=str(tmp_path / "runs"),
                      reports=str(tmp_path / "reports"))
    full = sum(f.stat().st_size for f in Path(clean_url).rglob("*") if f.is_file())
    FullDisk.budget = full // 2                                               # the disk fills half-way through
    try:
        with pytest.raises(OSError, match="No space left on device"):
            stage.run(cfg, storage, progress=False)
    finally:
        FullDisk.budget = 1 << 40
    url = str(tmp_path / "caches" / "test.zarr")
    g = zarr.open_group(url, mode="r")
    done = cache.done_shards(g)
    assert g.attrs["status"] == "incomplete" and 1 <= len(done) < 6
    # every shard with a record reads back whole; the one cut by the full disk has none
    assert all(g["valid"][s * 100:(s + 1) * 100].sum() == cache.shard_record(g, s)["valid"] for s in done)
    stage.run(cfg, storage, progress=False)                                    # space again: the re-run repairs it
    _assert_same(_arrays(url), _arrays(clean_url))
    assert zarr.open_group(url, mode="r").attrs["status"] == "complete"


def test_other_config_is_refused_with_fields_named(clean, tmp_path: Path, moco_checkpoint: Path) -> None:
    cfg, storage, url = clean
    with pytest.raises(SeedError, match=r"views: cache has 2, config wants 3"):
        stage.run(small_config(moco_checkpoint, "cache.views=3", shards=SIX), storage, progress=False)
    other = tmp_path / "other.pth"
    ckpt = torch.load(moco_checkpoint, weights_only=True)
    ckpt["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, other)
    with pytest.raises(SeedError, match=r"teacher\.checkpoint_sha256"):
        stage.run(small_config(other, shards=SIX), storage, progress=False)
    assert zarr.open_group(url, mode="r").attrs["status"] == "complete"  # untouched
    # the same config is a no-op: every shard is already done
    assert stage.run(cfg, storage, progress=False).embedded == ()
    def never(_):  # type: ignore[no-untyped-def]  # refused before the teacher is loaded or a shard counted
        raise AssertionError("the teacher was loaded")

    with pytest.raises(SeedError, match=r"--shards: repeated: \[1\]"):
        stage.run(cfg, storage, shards=[1, 1], progress=False, load=never)
    with pytest.raises(SeedError, match=r"--shards: indices out of range 0\.\.5: \[6\]"):
        stage.run(cfg, storage, shards=[6], progress=False, load=never)


def test_a_cache_begun_on_another_kind_of_device_is_named(clean, tmp_path: Path, shards_root: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A cache begun on a GPU (nvJPEG, bfloat16) and continued on the CPU would mix both in its rows: said."""
    cfg, _, url = clean
    other = make_storage(tmp_path, shards_root)
    copy = other.cache_url(cfg.cache.name)
    shutil.copytree(url, copy)
    group = zarr.open_group(copy, mode="r+")
    group.attrs["preprocessing"] = {**group.attrs["preprocessing"], "decode": "nvjpeg"}  # as if begun on CUDA
    with caplog.at_level("WARNING", logger="pipeline.teacher"):
        stage.run(cfg, other, progress=False)
    assert "was begun decoding with nvjpeg; this run decodes with pil on cpu" in caplog.text


def test_overwrite_replaces_a_foreign_cache(tmp_path: Path, shards_root: Path, moco_checkpoint: Path) -> None:
    storage = make_storage(tmp_path, shards_root)
    stage.run(small_config(moco_checkpoint, "cache.views=1", shards="fm/train/train-000000.tar"), storage, progress=False)
    cfg = small_config(moco_checkpoint, shards="fm/train/train-000000.tar")
    with pytest.raises(SeedError, match="--overwrite"):
        stage.run(cfg, storage, progress=False)
    summary = stage.run(cfg, storage, overwrite=True, progress=False)
    assert zarr.open_group(summary.cache, mode="r").attrs["V"] == 2


def test_undecodable_images_are_skipped_named_and_do_not_shift_rows(tmp_path: Path, shards_root: Path,
                                                                    moco_checkpoint: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Two images that do not decode are skipped, named, and said at the end; shards none of whose images decode
    leave the cache incomplete, in one line, rather than complete and empty."""
    shutil.copy(shards_root / "fm" / "train" / "train-000000.tar", tmp_path / "a-000.tar")
    with tarfile.open(shards_root / "fm" / "train" / "train-000001.tar") as src, tarfile.open(tmp_path / "a-001.tar", "w") as dst, \
            tarfile.open(tmp_path / "b-000.tar", "w") as bad:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".png") and member.name < "fmnist-train-000110":
                member.size = 40  # a truncated PNG
                bad.addfile(member, __import__("io").BytesIO(data[:40]))
            elif member.name < "fmnist-train-000110":
                bad.addfile(member, __import__("io").BytesIO(data))
            if member.name in ("fmnist-train-000105.png", "fmnist-train-000150.png"):
                data = data[:40]
            member.size = len(data)
            dst.addfile(member, __import__("io").BytesIO(data))
    storage = make_storage(tmp_path, tmp_path)
    with caplog.at_level("WARNING", logger="seed.cache"):
        summary = stage.run(small_config(moco_checkpoint, shards="a-{000..001}.tar"), storage, progress=False)
    assert "2 of 200 samples skipped, their images unreadable (first: 'fmnist-train-000105' in " in caplog.text
    with pytest.raises(SeedError, match=r"none of the 10 samples has an image that reads \(first: 'fmnist-train-000100'"):
        stage.run(small_config(moco_checkpoint, "cache.name=unreadable", shards="b-000.tar"), storage, progress=False)
    assert zarr.open_group(str(tmp_path / "caches" / "unreadable.zarr"), mode="r").attrs["status"] == "incomplete"
    g = zarr.open_group(summary.cache, mode="r")
    skipped = cache.skipped_samples(g)
    assert [s["key"] for s in skipped] == ["fmnist-train-000105", "fmnist-train-000150"]
    assert all("does not decode" in s["reason"] for s in skipped)
    valid = g["valid"][:]
    assert valid.sum() == 198 and not valid[105] and not valid[150] and valid[106]
    assert g["keys"][105] == "fmnist-train-000105" and g["keys"][151] == "fmnist-train-000151"
    assert np.isnan(g["embeddings"][105].astype(np.float32)).all() and not np.isnan(g["embeddings"][151].astype(np.float32)).any()
    assert g.attrs["totals"]["skipped"] == 2
    assert describe(summary.cache)["skipped"]["count"] == 2


def test_a_shard_cut_short_stops_the_stage_naming_it(tmp_path: Path, shards_root: Path, moco_checkpoint: Path) -> None:
    """A copy that failed part-way: its _info.json still says 100 samples, so only reading finds the damage.
    The stage stops with one line naming the shard and never marks the cache complete."""
    data = tmp_path / "shards" / "fm" / "train"
    data.mkdir(parents=True)
    for i in range(3):
        shutil.copy(shards_root / "fm" / "train" / f"train-{i:06d}.tar", data)
    info = json.loads((shards_root / "fm" / "train" / "_info.json").read_text())
    (data / "_info.json").write_text(json.dumps(info))
    cut = data / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 300])
    storage_file = _storage_file(tmp_path, tmp_path / "shards")
    sets = [x for s in ("data.train=fm/train/train-{000000..000002}.tar", f"teacher.checkpoint={moco_checkpoint}",
                        "cache.views=2", "cache.name=cut", "cache.recipe.blur_p=0")  # no blur warning at 32 px
            for x in ("--set", s)]
    out = subprocess.run(_cli(storage_file, *sets, "--quiet"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()
    assert len(message) == 1 and "Traceback" not in out.stderr
    assert message[0].startswith(f"seed: error: {cut}: damaged tar shard") and "copy the shard again" in message[0]
    g = zarr.open_group(str(tmp_path / "caches" / "cut.zarr"), mode="r")
    assert g.attrs["status"] == "incomplete" and 1 not in cache.done_shards(g)

    # As the message offers: keep what precedes the damage. The cache completes with the shard recorded as
    # damaged: what was read, what the shard should have held, what was lost, the last key read.
    out = subprocess.run(_cli(storage_file, *sets, "--set", "data.damaged=keep", "--quiet"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    g = zarr.open_group(str(tmp_path / "caches" / "cut.zarr"), mode="r")
    whole = [s.key for s in iter_shard(str(shards_root / "fm" / "train" / "train-000001.tar"))]
    damaged = cache.damaged_shards(g)
    assert list(damaged) == [1] and g.attrs["totals"]["damaged_shards"] == [1]
    read = damaged[1]["read"]
    assert 0 < read < 100 and damaged[1]["expected"] == 100 and damaged[1]["lost"] == 100 - read
    assert damaged[1]["last_key"] == whole[read - 1] and str(cut) in damaged[1]["error"]
    valid = cache.read(g, "valid").reshape(3, -1)
    assert valid[0].all() and valid[2].all() and valid[1, :read].all() and not valid[1, read:].any()
    assert list(cache.read(g, "keys").reshape(3, -1)[1, :read]) == whole[:read]
    assert g.attrs["totals"]["valid"] == 200 + read
    info = describe(str(tmp_path / "caches" / "cut.zarr"))
    assert info["damaged_shards"] == {"1": damaged[1]}
    assert f"shard 1: read {read} of 100 samples, lost {100 - read}" in format_text(info)

    # A student reads the damaged shard up to the recorded damage: one example per valid row, no error ...
    source = CachedSource(g, None, view="cycle", seed=0, dense=True)
    urls = [str(data / f"train-{i:06d}.tar") for i in range(3)]
    rows = sorted(int(ex.row) for ex in examples(urls, [0, 1, 2], source, 0, seed=0, shuffle_buffer=16))
    assert rows == sorted(np.flatnonzero(cache.read(g, "valid")).tolist())
    # ... but damage elsewhere in it means the shard changed since the cache was made
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(SeedError, match="the shard changed since the cache was made"):
        list(examples(urls, [1], source, 0, seed=0, shuffle_buffer=16))

    # A bank made from these rows, then the teacher run again: the shard, still damaged, stays done as recorded
    bank_sets = [*sets, "--set", "bank.size=64", "--set", "bank.topk=8"]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "bank", "--storage", str(storage_file), *bank_sets],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    b = load_config(None, bank_sets[1::2]).bank
    assert bank_store.current(g, b) == (True, "")
    revision = g.attrs["revision"]
    out = subprocess.run(_cli(storage_file, *sets, "--quiet"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    g = zarr.open_group(str(tmp_path / "caches" / "cut.zarr"), mode="r")
    assert list(cache.damaged_shards(g)) == [1] and g.attrs["revision"] == revision and "reopened" not in g.attrs

    # The shard copied again whole: the next run (data.damaged at its default) finds that it reads whole and embeds
    # it again. The cache then equals one made from the whole shards, and the bank made from the damaged rows is
    # no longer current: the cache's revision changed.
    shutil.copy(shards_root / "fm" / "train" / "train-000001.tar", cut)
    out = subprocess.run(_cli(storage_file, *sets), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{cut}: recorded as damaged ({read} of 100 samples read), it now reads whole" in out.stderr
    g = zarr.open_group(str(tmp_path / "caches" / "cut.zarr"), mode="r")
    assert g.attrs["status"] == "complete" and cache.damaged_shards(g) == {} and g.attrs["totals"]["valid"] == 300
    assert [(r["shard"], r["damaged"]["read"]) for r in g.attrs["reopened"]] == [(1, read)]
    assert g.attrs["revision"] != revision
    text = format_text(describe(str(tmp_path / "caches" / "cut.zarr")))
    assert "damaged      0 shards" in text and "reopened     1 shards embedded again" in text
    assert "shard 1 at " in text and "repaired: the shard recorded as damaged reads whole" in text
    (tmp_path / "whole").mkdir()
    reference = _storage_file(tmp_path / "whole", shards_root)
    out = subprocess.run(_cli(reference, *sets, "--set", "cache.name=whole", "--quiet"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    whole_cache = zarr.open_group(str(tmp_path / "whole" / "caches" / "whole.zarr"), mode="r")
    for name in cache.ARRAYS:
        x, y = cache.read(g, name), cache.read(whole_cache, name)
        assert (x.tobytes() == y.tobytes()) if x.dtype.kind == "f" else np.array_equal(x, y), name
    current, why = bank_store.current(g, b)
    assert not current and "cache_revision" in why


def test_hostile_samples_are_skipped_or_converted_by_rule_and_never_shift_rows(tmp_path: Path, moco_checkpoint: Path) -> None:
    import io

    from PIL import Image

    from tests.unit.test_shards import _png_header

    def encoded(im: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()

    rgb = encoded(Image.new("RGB", (40, 36), (90, 120, 150)), "PNG")
    members = [("ok-0.png", rgb), ("bomb.png", _png_header(12_000, 12_000)), ("empty.jpg", b""),
               ("cmyk.jpg", encoded(Image.new("CMYK", (40, 36), (10, 200, 30, 0)), "JPEG")),
               ("deep.png", encoded(Image.fromarray(np.full((36, 40), 50_000, np.uint16)), "PNG")),
               ("dotted.name.png", rgb), ("ünï çødé.png", rgb), ("ok-1.png", rgb)]
    with tarfile.open(tmp_path / "hostile-000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage = make_storage(tmp_path, tmp_path)
    summary = stage.run(small_config(moco_checkpoint, shards="hostile-000.tar"), storage, progress=False)
    g = zarr.open_group(summary.cache, mode="r")
    assert g["keys"][:8].tolist() == ["ok-0", "bomb", "empty", "cmyk", "deep", "dotted", "ünï çødé", "ok-1"]
    assert g["valid"][:8].tolist() == [True, False, False, True, True, False, True, True]
    reasons = {s["key"]: s["reason"] for s in cache.skipped_samples(g)}
    assert set(reasons) == {"bomb", "empty", "dotted"}
    assert "over the limit" in reasons["bomb"] and "empty jpg member" in reasons["empty"] and "no image member" in reasons["dotted"]
    assert g["sizes"][4].tolist() == [36, 40] and g.attrs["status"] == "complete"


def test_empty_shard_is_refused(tmp_path: Path, moco_checkpoint: Path) -> None:
    tarfile.open(tmp_path / "e-000.tar", "w").close()
    with pytest.raises(SeedError, match="empty shard"):
        stage.run(small_config(moco_checkpoint, shards="e-000.tar"), make_storage(tmp_path, tmp_path), progress=False)


def test_inspect_json(clean) -> None:
    _, _, url = clean
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", url, "--json"], capture_output=True, text=True, check=True)
    info = json.loads(result.stdout)
    assert info["status"] == "complete" and (info["N"], info["V"], info["D"]) == (600, 2, 32)
    assert info["shards"] == {"done": 6, "total": 6} and info["skipped"]["count"] == 0
    assert abs(info["embedding_norms"]["mean"] - 1) < 1e-3
    emb, _ = sample_views(zarr.open_group(url, mode="r"), 512)  # the same sample, similarities by hand
    off = (emb.astype(np.float64) @ emb.T.astype(np.float64))[~np.eye(len(emb), dtype=bool)]
    assert info["pairwise_similarity"]["mean"] == pytest.approx(off.mean(), abs=1e-4)
    assert info["pairwise_similarity"]["max"] == pytest.approx(off.max(), abs=1e-4) and off.max() < 0.9999
    assert info["bytes"]["raw_per_view"] == 2 * 32 + 4 * info["P"] and info["bytes"]["on_disk"] > 0
    text = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", url], capture_output=True, text=True, check=True).stdout
    assert "6/6 done" in text and "resnet10t" in text
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", url + "-nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no cache at" in bad.stderr


def test_checksums_catch_a_damaged_copy_and_verify_names_it(clean, tmp_path: Path) -> None:
    """Every chunk carries a CRC32C: a flipped byte or a cut chunk fails on read naming the array, and
    `seed inspect --verify` lists each damaged chunk and each record the data no longer matches."""
    _, _, url = clean
    copy = tmp_path / "copy.zarr"
    shutil.copytree(url, copy)
    verify = lambda: subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(copy), "--verify"],  # noqa: E731
                                    capture_output=True, text=True)
    ok = verify()
    assert ok.returncode == 0 and "no problem" in ok.stdout, ok.stdout + ok.stderr
    flipped = copy / "embeddings" / "c" / "2" / "0" / "0"                      # rows 200-299 (capacity 100)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    cut = copy / "augment" / "c" / "4" / "0" / "0"
    cut.write_bytes(cut.read_bytes()[:-100])
    g = zarr.open_group(str(copy), mode="r")
    with pytest.raises(SeedError, match=r"a chunk of rows .* does not match its checksum: the cache was damaged"):
        cache.read(g, "embeddings", slice(200, 300))
    np.testing.assert_array_equal(cache.read(g, "embeddings", slice(0, 200)), zarr.open_group(url, mode="r")["embeddings"][:200])
    g = zarr.open_group(str(copy), mode="r+")
    g["valid"][5] = False                                                      # data that no longer matches shard 0's record
    # chunks lost from a copy: zarr would read them as fill values (empty keys, zero sizes) without a word
    (copy / "sizes" / "c" / "1" / "0").unlink()
    (copy / "keys" / "c" / "3").unlink()
    (copy / "embeddings" / "c" / "5" / "1" / "0").unlink()                    # one view's chunk of a row block
    bad = verify()
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert any("embeddings: chunk 2 (rows 200-299, views 0) is damaged" in line for line in lines), lines
    assert any("augment: chunk 4 (rows 400-499) is damaged" in line for line in lines), lines
    assert any("shard 0 (train-000000.tar): its record says 100 valid rows, the data has 99" in line for line in lines), lines
    assert any("rows marked invalid hold embeddings" in line for line in lines), lines
    assert any("sizes: chunk 1 (rows 100-199) is missing" in line for line in lines), lines
    assert any("keys: chunk 3 (rows 300-399) is missing" in line for line in lines), lines
    assert any("embeddings: chunk 5 (rows 500-599, views 1) is missing" in line for line in lines), lines


def test_a_cache_of_format_1_still_opens(clean, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, url = clean
    copy = tmp_path / "old.zarr"
    shutil.copytree(url, copy)
    zarr.open_group(str(copy), mode="r+").attrs["format_version"] = 1
    with caplog.at_level("WARNING"):
        g = cache.open_complete(str(copy))
    assert "has no chunk checksums" in caplog.text and len(cache.read(g, "valid")) == 600


def _jpeg_shard(path: Path, source: Path, truncate: str | None = None) -> None:
    """Fashion-MNIST PNGs of ``source`` re-encoded as RGB JPEGs; ``truncate``: that key's JPEG loses its end."""
    import io

    from PIL import Image

    with tarfile.open(source) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            name = member.name
            if name.endswith(".png"):
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).convert("RGB").resize((40, 36)).save(buf, format="JPEG", quality=90)
                data, name = buf.getvalue(), name[:-4] + ".jpg"
                if truncate and name.startswith(truncate):
                    data = data[: len(data) // 2]  # the header reads, the pixels do not
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_gpu_worker_path_reads_and_draws_in_workers_then_decodes_here(tmp_path: Path, shards_root: Path,
                                                                       moco_checkpoint: Path) -> None:
    """The path the teacher stage takes on CUDA with workers (workers read shards and draw views from
    image headers; this process decodes and augments), run on the CPU: the same batches as the path
    that decodes first, and an image whose header reads but whose data does not is skipped and named."""
    for i in range(2):
        _jpeg_shard(tmp_path / f"j-{i:03d}.tar", shards_root / "fm" / "train" / f"train-{i:06d}.tar",
                    truncate="fmnist-train-000150" if i == 1 else None)
    cfg = small_config(moco_checkpoint, shards="j-{000..001}.tar")
    plan = stage.make_plan(cfg, make_storage(tmp_path, tmp_path))
    cpu = torch.device("cpu")
    direct = list(stage._shard_items(cfg, plan, [0, 1], 64, cpu))
    encoded = list(stage._shard_items(cfg, plan, [0, 1], 64, cpu, encoded=True))
    # each batch crosses a pickle, as from a worker (the images' bytes packed into one tensor)
    decoded = [stage._decode_views(pickle.loads(pickle.dumps(it)), Decoder(cpu), cfg, cpu)
               if isinstance(it, stage._Encoded) else it for it in encoded]
    views_a = [it for it in direct if isinstance(it, stage._Views)]
    views_b = [it for it in decoded if isinstance(it, stage._Views)]
    failed = [f for it in views_b for f in it.failed]
    assert {row for row, _ in failed} == {50} and all("does not decode" in why for _, why in failed)
    # the direct path skipped that image before drawing; everything else is the same, batch for batch
    rows_a = np.concatenate([it.rows + 1000 * it.shard for it in views_a])
    rows_b = np.concatenate([it.rows + 1000 * it.shard for it in views_b])
    assert 1050 not in rows_a and 1050 not in rows_b and sorted(rows_a) == sorted(rows_b)
    xa = torch.cat([it.x for it in views_a])
    xb = torch.cat([it.x for it in views_b])
    order_a, order_b = np.lexsort((np.concatenate([it.views for it in views_a]), rows_a)), \
        np.lexsort((np.concatenate([it.views for it in views_b]), rows_b))
    assert torch.equal(xa[order_a], xb[order_b])
    done = next(it for it in decoded if isinstance(it, stage._ShardDone) and it.shard == 1)
    emb = np.zeros((100, 2, 4), np.float16)
    stage._drop_failed(done, failed, emb)
    assert not done.meta["valid"][50] and np.isnan(emb[50]).all() and done.meta["valid"][49]
    assert [s["key"] for s in done.skipped] == ["fmnist-train-000150"]

    # the same batches from 2 worker processes, each batch's bytes crossing in the worker's reused shared buffers
    slots = SharedSlots.for_workers(2, 2)
    made = shard_workers([0, 1], functools.partial(stage._worker_items, cfg, plan, 64, True, slots), workers=2, depth=2)
    views_c = [stage._decode_views(it, Decoder(cpu), cfg, cpu) for it in made if isinstance(it, stage._Encoded)]
    rows_c = np.concatenate([it.rows + 1000 * it.shard for it in views_c])
    order_c = np.lexsort((np.concatenate([it.views for it in views_c]), rows_c))
    assert torch.equal(torch.cat([it.x for it in views_c])[order_c], xb[order_b])
    assert {row for it in views_c for row, _ in it.failed} == {50}
    assert sum(b is not None for b in slots.buffers) >= 2                   # both workers' bytes came in buffers


def _create_at_once(url: str, barrier, results, who: int) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    try:
        group = cache.create(url, fields={"a": 1}, capacity=4, n_shards=3, views=2, dim=3, attrs={"who": who}, wait_s=20)
        results.put((who, "ok", cache.attributes(group)["who"]))
    except BaseException as exc:  # noqa: BLE001 (reported to the test)
        results.put((who, f"{type(exc).__name__}: {exc}", None))


def test_processes_creating_one_cache_at_once_all_use_the_one_made(tmp_path: Path) -> None:
    """Several `seed teacher --shards` starting together on a new cache: one lays it out, the others wait for it,
    and every one works with the attributes stored (the forward's batch size and threads come from them). Before
    the creation was claimed, most such starts crashed one process (ContainsArrayError) or left two in memory."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(6):
        url = str(tmp_path / f"c{trial}.zarr")
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_create_at_once, args=(url, barrier, results, i)) for i in range(3)]
        for p in procs:
            p.start()
        out = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join()
        stored = cache.attributes(cache.open_group(url))
        assert stored["status"] == "incomplete" and [o[1:] for o in out] == [("ok", stored["who"])] * 3, (trial, out)
    assert not list(tmp_path.glob(".*.creating"))  # the claims are gone
    # a claim file left by a creator that died holds no lock: the next caller creates the cache at once
    url = str(tmp_path / "orphan.zarr")
    (tmp_path / ".orphan.zarr.creating").touch()
    group = cache.create(url, fields={"a": 1}, capacity=4, n_shards=3, views=2, dim=3, attrs={}, wait_s=1)
    assert cache.attributes(group)["status"] == "incomplete" and not (tmp_path / ".orphan.zarr.creating").exists()
