"""Evaluation, reports and cache pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.bank as bank_stage
import pipeline.evaluate as evaluate_stage
import pipeline.student as student_stage
import pipeline.teacher as teacher_stage
from seed.errors import SeedError
from seed.evaluate import images, knn_predict, linear_probe, pixels, score
from seed.inspect import neighbours, plots
from seed.shards import expand_urls
from tests.conftest import make_storage, small_config


def test_knn_on_a_toy_set_with_known_answer() -> None:
    # three directions; training points cluster around each; queries sit nearer one of them
    centres = np.eye(3)[:, :3] * 5
    rng = np.random.default_rng(0)
    train = np.concatenate([c + rng.normal(scale=0.3, size=(20, 3)) for c in centres])
    labels = np.repeat(np.arange(3), 20)
    queries = np.array([[4.0, 1.0, 0.5], [0.2, 3.0, 0.1], [0.5, 0.4, 2.0], [1.0, 1.1, 0.9]])
    weighted, nearest = knn_predict(train, labels, queries, k=5)
    assert weighted.tolist()[:3] == [0, 1, 2] and nearest.tolist()[:3] == [0, 1, 2]
    # cosine, not Euclidean: a far point along a class direction belongs to that class
    far, _ = knn_predict(train, labels, np.array([[0.0, 500.0, 1.0]]), k=5)
    assert far.tolist() == [1]


def test_linear_probe_beats_chance_on_fashion_mnist_pixels(shards_root: Path) -> None:
    train_x, train_y = images(expand_urls(str(shards_root / "fm/train/train-{000000..000009}.tar")), 28)
    test_x, test_y = images(expand_urls(str(shards_root / "fm/test/test-{000000..000004}.tar")), 28)
    assert len(train_y) == 1000 and len(test_y) == 500 and set(train_y) == set(range(10))
    accuracy = (linear_probe(pixels(train_x), train_y, pixels(test_x)) == test_y).mean()
    assert accuracy > 0.6, accuracy  # chance is 0.1
    scores = score(pixels(train_x), train_y, pixels(test_x), test_y, center=True)
    assert scores.knn > 60 and scores.nn1 > 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shards_root: Path, moco_checkpoint: Path):
    root = tmp_path_factory.mktemp("evaluate")
    storage = make_storage(root, shards_root)
    cfg = small_config(moco_checkpoint, "bank.size=64", "bank.topk=8", "train.optim.batch_size=50", "train.optim.epochs=1",
                       "data.test=fm/test/test-{000000..000001}.tar")
    teacher_stage.run(cfg, storage, progress=False)
    bank_stage.run(cfg, storage, progress=False)
    student_stage.run(cfg, storage, progress=False)
    return cfg, storage


def test_evaluation_report(trained) -> None:
    cfg, storage = trained
    summary = evaluate_stage.run(cfg, storage, progress=False)
    kinds = [(r["name"], r["kind"]) for r in summary.results]
    assert kinds == [("raw pixels", "baseline"), ("teacher resnet10t", "teacher"),
                     ("mobilenetv3_small_050 (cached SEED)", "student"), ("mobilenetv3_small_050 random", "baseline")]
    # 300 training and 200 test images of 10 classes: chance is 10 %; pixels alone reach well above
    pixels_row = summary.results[0]
    assert pixels_row["knn"] > 50 and pixels_row["linear"] > 50, pixels_row
    for r in summary.results:
        assert min(r["knn"], r["nn1"], r["linear"]) > 20, r  # every encoder's features carry the classes
    out = Path(summary.report).parent
    text = (out / "report.md").read_text()
    assert "kNN top-1" in text and "teacher forwards" in text and "![accuracy](accuracy.png)" in text
    for png in ("accuracy.png", "loss.png"):
        Image.open(out / png).verify()
    # the student-only re-run never loads the teacher, and reuses its saved scores

    def forbidden(*_: object) -> None:
        raise AssertionError("teacher loaded")

    again = evaluate_stage.run(cfg, storage, include_teacher=False, progress=False, load=forbidden)  # type: ignore[arg-type]
    teacher_rows = [r for r in again.results if r["kind"] == "teacher"]
    assert len(teacher_rows) == 1 and teacher_rows[0]["knn"] == summary.results[1]["knn"]


def test_inspect_neighbours_and_plots(trained, tmp_path: Path) -> None:
    cfg, storage = trained
    url = storage.cache_url(cfg.cache.name)
    result = neighbours(url, "fmnist-train-000123", str(tmp_path / "nb.png"), k=5)
    assert len(result["neighbours"]) == 5 and all(n["row"] != 123 for n in result["neighbours"])
    sims = [n["similarity"] for n in result["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    Image.open(tmp_path / "nb.png").verify()
    written = plots(url, str(tmp_path / "plots"))
    assert sorted(Path(p).name for p in written) == ["captured_mass.png", "pca.png", "similarity.png", "target_entropy.png"]
    for p in written:
        Image.open(p).verify()
    with pytest.raises(SeedError, match="no sample with key 'nope'"):
        neighbours(url, "nope", str(tmp_path / "x.png"))
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", url, "--neighbours", "nope", "--out", str(tmp_path / "y.png")],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "no sample with key" in cli.stderr and not (tmp_path / "y.png").exists()


def test_inspect_refuses_an_incomplete_cache(trained, tmp_path: Path, shards_root: Path) -> None:
    cfg, _ = trained
    storage = make_storage(tmp_path, shards_root)
    teacher_stage.run(cfg, storage, shards=[1], progress=False)
    url = storage.cache_url(cfg.cache.name)
    with pytest.raises(SeedError, match="incomplete"):
        plots(url, str(tmp_path / "plots"))
    with pytest.raises(SeedError, match="incomplete"):
        neighbours(url, "fmnist-train-000123", str(tmp_path / "nb.png"))
    assert not (tmp_path / "plots").exists()
    info = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", url, "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["status"] == "incomplete" and info["shards"] == {"done": 1, "total": 3}
