"""Evaluation, reports and cache pictures."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.bank as bank_stage
import pipeline.evaluate as evaluate_stage
import pipeline.student as student_stage
import pipeline.teacher as teacher_stage
from seed import checkpoint
from seed.decode import Decoder
from seed.errors import SeedError
from seed.evaluate import (PixelSample, _decode, _shard_chunks, _worker_chunks, extract, extract_all, images,
                           knn_predict, linear_probe, score)
from seed.inspect import neighbours, plots
from seed.shards import expand_urls
from seed.workers import SharedSlots, shard_workers
from tests.conftest import make_storage, small_config, tiny_encoder

CPU = torch.device("cpu")


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


def _split(root: Path, split: str, n_shards: int) -> list[str]:
    return expand_urls(str(root / f"fm/{split}/{split}-{{000000..{n_shards - 1:06d}}}.tar"))


def test_probes_on_fashion_mnist_pixels(shards_root: Path) -> None:
    """5,000 training and 2,000 test images as 14 px pixels: both probes well above chance, SGD near L-BFGS."""
    spec = PixelSample(max_images=10_000, resolution=14)
    train = extract_all({}, _split(shards_root, "train", 50), 28, CPU, pixels=spec, workers=2)
    test = extract_all({}, _split(shards_root, "test", 20), 28, CPU, pixels=spec)
    assert train.pixels is not None and train.pixel_labels is not None and test.pixels is not None
    assert train.pixels.shape == (5000, 3 * 14 * 14) and set(train.labels) == set(range(10))
    assert np.array_equal(train.pixel_labels, train.labels)  # under the cap: every image, in shard order
    lbfgs = (linear_probe(train.pixels, train.labels, test.pixels, method="lbfgs") == test.labels).mean()
    sgd = (linear_probe(train.pixels, train.labels, test.pixels, method="sgd") == test.labels).mean()
    assert lbfgs > 0.75, lbfgs  # chance is 0.1
    # the streaming probe reaches the full-batch one within 2 points (measured: 83.3 against 81.6 %)
    assert sgd > lbfgs - 0.02, (sgd, lbfgs)
    scores = score(train.pixels[:1000], train.labels[:1000], test.pixels, test.labels, center=True)
    assert scores.knn > 60 and scores.nn1 > 60 and scores.probe == "full-batch L-BFGS"


def test_streamed_features_with_workers_equal_in_memory_ones(shards_root: Path) -> None:
    """Two worker processes, shards interleaved between them: the same rows, in shard order, to the bit."""
    urls = _split(shards_root, "train", 5)
    encoder = tiny_encoder()
    batches, labels = images(urls, 32)  # the in-memory path: every image held
    expected = extract(encoder.features, batches, CPU)
    streamed = extract_all({"teacher": encoder.features, "head": encoder}, urls, 32, CPU, workers=2, batch_size=64)
    assert np.array_equal(streamed.labels, labels) and streamed.n == 500
    assert np.array_equal(streamed.features["teacher"], expected)
    assert np.allclose(streamed.features["head"], extract(encoder, batches, CPU), atol=1e-6)


def test_the_gpu_layouts_encoded_chunks_cross_in_shared_buffers_and_decode_the_same(shards_root: Path) -> None:
    """The evaluation's CUDA layout on the CPU: 2 workers only read, each batch's bytes cross in the worker's reused
    shared buffers, and this process decodes: the same images and keys as the workers decoding themselves."""
    urls = _split(shards_root, "train", 3)
    slots = SharedSlots.for_workers(2, 2)
    made = shard_workers(range(len(urls)), functools.partial(_worker_chunks, urls, 32, 64, False, "stop", slots),
                         workers=2, depth=2)
    decoded = {}
    for c in made:
        assert c.x is None and c.packed is not None
        d = _decode(c.shard, c.packed.unpack(), Decoder(CPU), 32)
        decoded[d.shard, int(d.index[0])] = d
    direct = {(c.shard, int(c.index[0])): c for c in _shard_chunks(urls, range(len(urls)), 32, 64, Decoder(CPU))}
    assert decoded.keys() == direct.keys() and len(direct) == 3 * 2
    for key, c in direct.items():
        assert c.x is not None and decoded[key].x is not None and torch.equal(decoded[key].x, c.x), key
        assert decoded[key].keys == c.keys and np.array_equal(decoded[key].labels, c.labels), key
    assert sum(b is not None for b in slots.buffers) >= 2                   # both workers' bytes came in buffers


MEMORY_PROBE = """
import json, sys
import faiss, torch
torch.set_num_threads(1)
faiss.omp_set_num_threads(1)  # one thread each: per-thread buffers and their timing are not part of what is measured
from seed.evaluate import PixelSample, extract, extract_all, images, knn_predict, linear_probe, score
root, n_shards, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
train = [f"{root}/fm/train/train-{i:06d}.tar" for i in range(n_shards)]
test = [f"{root}/fm/test/test-{i:06d}.tar" for i in range(2)]
torch.manual_seed(0)
encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
device = torch.device("cpu")
wide = lambda x: x.flatten(1)  # 3 x 64 x 64 features: 48 KiB an image, as large as the image itself
if mode == "streamed":
    spec = PixelSample(max_images=200)
    tr = extract_all({"conv": encoder, "wide": wide}, train, 64, device, pixels=spec)
    te = extract_all({"conv": encoder, "wide": wide}, test, 64, device, pixels=spec)
    tr_x, tr_y, te_x, te_y = tr.features["conv"], tr.labels, te.features["conv"], te.labels
    tr_w, te_w = tr.features["wide"], te.features["wide"]
else:  # the in-memory path, for comparison: images and features held
    (xb, tr_y), (xt, te_y) = images(train, 64), images(test, 64)
    tr_x, te_x = extract(encoder, xb, device), extract(encoder, xt, device)
    tr_w, te_w = extract(wide, xb, device), extract(wide, xt, device)
s = score(tr_x, tr_y, te_x, te_y)
# the wide rows scored as a large set is: training rows indexed in blocks, the mini-batch probe
weighted, _ = knn_predict(tr_w, tr_y, te_w, block=256)
probe = linear_probe(tr_w, tr_y, te_w, method="sgd")
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"n": len(tr_y), "hwm_kib": hwm, "knn": s.knn, "wide_knn": float((weighted == te_y).mean() * 100),
                  "wide_linear": float((probe == te_y).mean() * 100)}))
"""


def test_evaluation_memory_does_not_grow_with_n(shards_root: Path) -> None:
    """Peak RSS of a child process evaluating N and 2N images at 64 px: flat, where holding the images
    (3 x 64 x 64 float32 = 48 KiB each, as the in-memory path did) would add N x 48 KiB, and so would
    holding the features of an encoder as wide as the image (they are on disk, and scored in blocks)."""
    def run(n_shards: int, mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(shards_root), str(n_shards), mode],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
        return json.loads(out.stdout.strip().splitlines()[-1])

    # one run each: the allocator's noise between runs was 5 MiB (50 MiB before the probe's batches were
    # standardised in place), against the 14 MiB the growth may reach
    n = 1500
    one, two = run(n // 100, "streamed"), run(2 * n // 100, "streamed")
    assert (one["n"], two["n"]) == (n, 2 * n) and one["knn"] > 30 and two["knn"] > 30
    assert min(one["wide_knn"], two["wide_knn"], one["wide_linear"], two["wide_linear"]) > 50, (one, two)  # pixels
    images_mib = n * 3 * 64 * 64 * 4 / 2**20  # what N more images (or wide feature rows) in memory would take: 70 MiB
    growth_mib = (two["hwm_kib"] - one["hwm_kib"]) / 1024
    assert growth_mib < 0.2 * images_mib, (growth_mib, images_mib, one, two)
    # the measurement can see such growth: the in-memory path, at 2N, peaks that much higher (images and wide rows)
    held = run(2 * n // 100, "in-memory")
    assert (held["hwm_kib"] - two["hwm_kib"]) / 1024 > 3 * images_mib, (held, two)
    assert (held["knn"], held["wide_knn"], held["wide_linear"]) == (two["knn"], two["wide_knn"], two["wide_linear"])


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
    assert "| full-batch L-BFGS |" in text and "centred, 32 px, 300 of 300 train and 200 of 200 test images" in text
    assert all(r["probe"] == "full-batch L-BFGS" for r in summary.results)
    for png in ("accuracy.png", "loss.png"):
        Image.open(out / png).verify()
    # the features extracted by two processes (`seed evaluate --procs 2`; one per GPU on CUDA), each over every
    # other shard of both splits, written into files this process shares with them: the same report
    two = evaluate_stage.run(cfg, storage, progress=False, procs=2)
    assert two.results == summary.results
    # the student-only re-run never loads the teacher, and reuses its saved scores

    def forbidden(*_: object) -> None:
        raise AssertionError("teacher loaded")

    again = evaluate_stage.run(cfg, storage, include_teacher=False, progress=False, load=forbidden)  # type: ignore[arg-type]
    teacher_rows = [r for r in again.results if r["kind"] == "teacher"]
    assert len(teacher_rows) == 1 and teacher_rows[0]["knn"] == summary.results[1]["knn"]


def test_a_failed_evaluation_process_stops_the_stage_with_its_error_and_scores_nothing(trained, tmp_path: Path) -> None:
    """``--procs 2`` where the test split's second shard holds a sample without a label: the process that meets it
    stops with the user's mistake, the stage raises it as one (a ``SeedError``, not a crash) quoting that
    process's last lines without its progress reports, and no report is written."""
    import dataclasses
    import io
    import tarfile

    from seed.shards import iter_shard

    cfg, storage = trained
    first = str(Path(storage.shards) / "fm" / "test" / "test-000000.tar")
    unlabelled = tmp_path / "unlabelled.tar"
    with tarfile.open(unlabelled, "w") as tar:
        for i, sample in enumerate(list(iter_shard(first))[:3]):
            for name, data in ((f"u{i}.png", sample.image or b""), (f"u{i}.cls", str(sample.label).encode())):
                if name != "u2.cls":                                                # the last has no label
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    report = Path(storage.run_dir(cfg.train.run)) / "report.md"
    report.unlink(missing_ok=True)
    broken = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test=f"{first}::{unlabelled}"))
    with pytest.raises(SeedError) as raised:
        evaluate_stage.run(broken, storage, progress=False, procs=2)
    message = str(raised.value)
    assert message.startswith("evaluation process on cpu failed with exit code 2; nothing was scored; last lines:")
    assert f"{unlabelled}: sample 'u2' has no label" in message and "seed-features" not in message
    assert not report.exists()


def test_evaluation_refuses_a_run_without_its_students_and_says_when_no_teacher_scores_are_saved(
        trained, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run name with no trained students (a typo in train.run) is refused before any image is read, naming the
    students and the run's directory, rather than a report of baselines alone that looks complete; a student-only
    re-run with no saved teacher scores says the report has no teacher row."""
    import dataclasses

    cfg, storage = trained

    def forbidden(*_: object) -> None:
        raise AssertionError("teacher loaded")

    typo = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run="tinyy"))
    with pytest.raises(SeedError, match=r"run tinyy: no checkpoint of student\(s\) mobilenetv3_small_050 under .*tinyy"):
        evaluate_stage.run(typo, storage, progress=False, load=forbidden)  # type: ignore[arg-type]
    assert not (Path(storage.run_dir("tinyy")) / "report.md").exists()
    elsewhere = dataclasses.replace(storage, reports=str(tmp_path / "reports"))   # no teacher scores saved there
    with caplog.at_level("WARNING", logger="pipeline.evaluate"):
        result = evaluate_stage.run(cfg, elsewhere, include_teacher=False, progress=False, load=forbidden)  # type: ignore[arg-type]
    assert "no teacher scores saved for cache" in caplog.text and "the report has no teacher row" in caplog.text
    assert [r["kind"] for r in result.results] == ["baseline", "student", "baseline"]


def test_evaluation_refuses_what_the_report_would_misdescribe_and_marks_unfinished_students(
        trained, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before any image is read: a test split sharing shards with the training split, a teacher other than the
    cache's, a student trained against another cache of the name. An unfinished student is scored with its row
    saying so; saved teacher scores are reused only for the same test split (and probe, and resolution)."""
    import dataclasses
    import shutil

    cfg, storage = trained

    def forbidden(*_: object) -> None:
        raise AssertionError("teacher loaded")

    shared = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test=cfg.data.train))
    with pytest.raises(SeedError, match=r"data.train and data.test share 3 shard\(s\)"):
        evaluate_stage.run(shared, storage, progress=False, load=forbidden)  # type: ignore[arg-type]
    other = tmp_path / "other-teacher.pth"
    state = torch.load(cfg.teacher.checkpoint, weights_only=False)
    torch.save({**state, "note": "the same weights, another file"}, other)
    with pytest.raises(SeedError, match=r"other-teacher.pth \(resnet10t, sha256 [0-9a-f]{12}\) is not the teacher cache"):
        evaluate_stage.run(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, checkpoint=str(other))),
                           storage, progress=False)
    shutil.copytree(storage.run_dir(cfg.train.run), storage.run_dir("moved"))
    path = storage.student_checkpoint("moved", "mobilenetv3_small_050")
    moved = checkpoint.load(path)
    checkpoint.save({**moved, "cache_fingerprint": "f" * 64}, path)
    with pytest.raises(SeedError, match=r"checkpoint.pt: trained against another cache \(fingerprint ffffffffffff\)"):
        evaluate_stage.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run="moved")), storage,
                           include_teacher=False, progress=False, load=forbidden)  # type: ignore[arg-type]
    evaluate_stage.run(cfg, storage, progress=False)                              # the teacher's scores saved
    planned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optim=dataclasses.replace(cfg.train.optim, epochs=2)),
                                  data=dataclasses.replace(cfg.data, test="fm/test/test-000000.tar"))
    with caplog.at_level("WARNING", logger="pipeline.evaluate"):
        result = evaluate_stage.run(planned, storage, include_teacher=False, progress=False, load=forbidden)  # type: ignore[arg-type]
    assert [r["init"] for r in result.results if r["kind"] == "student"] == ["1 of 2 epochs (unfinished)"]
    assert "stopped after 1 of 2 epochs" in caplog.text
    assert "saved for another test split, resolution or linear probe" in caplog.text
    assert [r["kind"] for r in result.results] == ["baseline", "student", "baseline"]


def test_inspect_neighbours_and_plots(trained, tmp_path: Path) -> None:
    cfg, storage = trained
    url = storage.cache_url(cfg.cache.name)
    result = neighbours(url, "fmnist-train-000123", str(tmp_path / "nb.png"), k=5)
    assert len(result["neighbours"]) == 5 and all(n["row"] != 123 for n in result["neighbours"])
    sims = [n["similarity"] for n in result["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    Image.open(tmp_path / "nb.png").verify()
    written = plots(url, str(tmp_path / "plots"))
    assert sorted(Path(p).name for p in written) == ["margin.png", "neighbour_similarity.png", "pca.png", "topk_mass.png"]
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
