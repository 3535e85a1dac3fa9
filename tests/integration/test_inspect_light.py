"""`seed inspect` on a real cache stays light: describe, --json, --plots and --verify import neither torch
nor Prefect (a fresh interpreter each, since this process imported both long ago) and stay well under
200 MB; --neighbours may import torch to replay views, and what it shows is checked here against the
cache's arrays and the teacher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

import pipeline.bank as bank_stage
import pipeline.teacher as teacher_stage
from seed.inspect import _replay, neighbours
from seed.teachers import load_teacher
from tests.conftest import make_storage, small_config

ROOT = Path(__file__).resolve().parents[2]

# Peak RSS from VmHWM: it belongs to the new image, where ru_maxrss keeps the forking parent's peak across exec.
PROBE = """
import json, sys
from pipeline.cli import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "prefect", "torchvision", "timm", "faiss")
                                                   if m in sys.modules),
                  "max_rss_mb": int(hwm.split()[1]) / 1024}), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def banked(tmp_path_factory: pytest.TempPathFactory, shards_root: Path, moco_checkpoint: Path):
    """300 real images x 2 views, a bank of 128 entries with top-8 targets at the default tau_T = 1e-4."""
    root = tmp_path_factory.mktemp("inspect-light")
    cfg = small_config(moco_checkpoint, "bank.size=128", "bank.topk=8")
    storage = make_storage(root, shards_root)
    teacher_stage.run(cfg, storage, progress=False)
    bank_stage.run(cfg, storage, progress=False)
    return cfg, storage.cache_url(cfg.cache.name)


def _probe(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, "inspect", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stdout + done.stderr
    return {**report, "stdout": done.stdout}


@pytest.mark.parametrize("mode", [[], ["--json"], ["--plots", "PLOTS"], ["--verify"]])
def test_inspect_imports_neither_torch_nor_prefect(banked, tmp_path: Path, mode: list[str]) -> None:
    _, url = banked
    argv = [str(tmp_path / "plots") if a == "PLOTS" else a for a in mode]
    report = _probe(url, *argv)
    assert report["heavy"] == [], f"seed inspect {' '.join(mode)} imported {report['heavy']}"
    assert report["max_rss_mb"] < 200, report
    if mode == ["--json"]:
        info = json.loads(report["stdout"])
        assert info["bytes"]["cache"]["stored"] + info["bytes"]["bank"]["stored"] == info["bytes"]["on_disk"]
    if mode and mode[0] == "--plots":
        assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
            "margin.png", "neighbour_similarity.png", "pca.png", "topk_mass.png"]


def test_neighbours_may_import_torch_but_not_prefect(banked, tmp_path: Path) -> None:
    _, url = banked
    report = _probe(url, "--neighbours", "fmnist-train-000123", "--out", str(tmp_path / "nb.png"))
    assert "prefect" not in report["heavy"] and "torch" in report["heavy"]
    with Image.open(tmp_path / "nb.png") as im:
        im.verify()


def test_neighbours_are_the_nearest_bank_entries_with_their_cached_targets(banked, tmp_path: Path) -> None:
    cfg, url = banked
    g = zarr.open_group(url, mode="r")
    row, k = 123, 5
    result = neighbours(url, "fmnist-train-000123", str(tmp_path / "nb.png"), k=k)
    ids, vectors = g["bank"]["ids"][:], g["bank"]["vectors"][:].astype(np.float32)
    labels, keys = g["labels"][:], g["keys"][:]
    assert result["row"] == row and result["label"] == labels[row] and result["neighbours"] == result["views"][0]["neighbours"]
    for v, per_view in enumerate(result["views"]):
        z = g["embeddings"][row, v].astype(np.float32)
        others = [(float(z @ vectors[j]), j) for j in range(len(ids)) if ids[j, 0] != row]
        expected = sorted(others, key=lambda sj: -sj[0])[:k]
        got = per_view["neighbours"]
        assert [(n["row"], n["view"]) for n in got] == [tuple(ids[j]) for _, j in expected]
        assert [n["similarity"] for n in got] == pytest.approx([s for s, _ in expected], abs=1e-5)
        assert [n["label"] for n in got] == [labels[n["row"]] for n in got]
        assert [n["key"] for n in got] == [keys[n["row"]] for n in got]
        cols, logp = g["bank"]["indices"][row, v], g["bank"]["logp"][row, v].astype(np.float64)
        for n, (_, j) in zip(got, expected):
            hit = np.flatnonzero(cols == j + 1)
            assert n["logp"] == (pytest.approx(logp[hit[0]]) if len(hit) else None)
        assert per_view["own_logp"] == pytest.approx(logp[np.flatnonzero(cols == 0)[0]])
    # the pictures are the cached views: the teacher on the replayed views gives the cached embeddings
    shown = [(row, v) for v in range(2)] + [(n["row"], n["view"]) for n in result["views"][1]["neighbours"]]
    rows, views = np.array([r for r, _ in shown]), np.array([v for _, v in shown])
    teacher, _ = load_teacher(cfg.teacher)
    replayed = teacher_stage.embed(teacher, _replay(g, rows, views), torch.device("cpu"))
    cached = torch.from_numpy(g["embeddings"][:][rows, views].astype(np.float32))
    assert torch.allclose(replayed, cached, atol=2e-3), (replayed - cached).abs().max()
