"""Evaluation's pieces on small real data: batched kNN, the probe choice, the streamed pass and its pixel subsample."""

from __future__ import annotations

import errno
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from seed.errors import SeedError
from seed.evaluate import (LBFGS_MAX_ELEMENTS, Part, _PixelKeeper, PixelSample, extract, extract_all, extract_part, gather_parts, images,
                           knn_predict, linear_probe, probe_method, probe_name, probe_resident)
from seed.features import FeatureFile, FeatureWriter, _disk_errors, check_disk, feature_file, memory_filesystem
from seed.shards import (FASHION_MNIST_DIR, count_samples, expand_urls, fashion_mnist_to_shards, iter_shard,
                         load_fashion_mnist)

CPU = torch.device("cpu")


def _knn_in_one_search(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, *, k: int = 20, t: float = 0.07,
                       center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The protocol as it was before queries were batched: one search for every query, whole-array normalisation."""
    import faiss

    if center:
        mean = train.mean(axis=0, keepdims=True)
        train, test = train - mean, test - mean
    norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    xb, xq = np.ascontiguousarray(norm(train), dtype=np.float32), np.ascontiguousarray(norm(test), dtype=np.float32)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    sims, idx = index.search(xq, k)
    votes = np.zeros((len(xq), int(train_labels.max()) + 1))
    np.add.at(votes, (np.arange(len(xq))[:, None], train_labels[idx]), np.exp(sims / t))
    return votes.argmax(axis=1), train_labels[idx[:, 0]]


@pytest.fixture(scope="module")
def fm_pixels() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2,000 training and 500 test images of real Fashion-MNIST as flat float32 pixels."""
    try:
        x, y = load_fashion_mnist(FASHION_MNIST_DIR, "train", limit=2500)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Fashion-MNIST not readable: {exc}")
    flat = x.reshape(len(x), -1).astype(np.float32) / 255
    return flat[:2000], y[:2000].astype(np.int64), flat[2000:], y[2000:].astype(np.int64)


@pytest.mark.parametrize("center", [False, True])
def test_batched_knn_equals_one_search(fm_pixels, center: bool) -> None:
    train, train_y, test, test_y = fm_pixels
    reference = _knn_in_one_search(train, train_y, test, center=center)
    # train rows added and queries searched `batch` at a time, in indexes of `block` training rows merged per query
    for batch, block in ((64, None), (333, None), (100_000, None), (64, 300), (333, 700), (500, 1999)):
        weighted, nearest = knn_predict(train, train_y, test, center=center, batch_size=batch, block=block)
        assert np.array_equal(weighted, reference[0]) and np.array_equal(nearest, reference[1]), (batch, block)
    assert (reference[0] == test_y).mean() > 0.7  # pixels of Fashion-MNIST: well above the 10 % of chance


def test_knn_with_fewer_training_rows_than_k_counts_each_once(fm_pixels) -> None:
    """k is capped at the training rows: FAISS's padding (-1 ids, similarity -3.4e38) never reaches the vote,
    where exp(-3.4e38 / t) overflowed with a warning and the id -1 indexed the last label."""
    import warnings

    train, train_y, test, _ = fm_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weighted, nearest = knn_predict(train[:5], train_y[:5], test[:50], k=20)
    alone, _ = knn_predict(train[:5], train_y[:5], test[:50], k=5)
    assert np.array_equal(weighted, alone) and set(nearest) <= set(train_y[:5].tolist())


def test_feature_rows_on_disk_read_back_like_an_array(tmp_path) -> None:
    """Blocks arriving out of shard order are read in order (through the file row of each row, no copy); ranges,
    index runs and whole reads give the rows."""
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 6)).astype(np.float32) for n in (3, 5, 1, 4)]
    writer = FeatureWriter(str(tmp_path))
    for b in blocks:
        writer.append(b)
    rank = [2, 0, 3, 1]                                   # the arrival indices in shard order
    rows = writer.finish([len(b) for b in blocks], rank)
    expected = np.concatenate([blocks[i] for i in rank])
    assert isinstance(rows, FeatureFile) and rows.shape == (13, 6) and len(rows) == 13 and rows.nbytes == 13 * 6 * 4
    assert list(tmp_path.iterdir()) == []                 # unnamed files: nothing to clean up, even after a crash
    assert np.array_equal(np.asarray(rows), expected) and np.array_equal(rows[4:9], expected[4:9])
    assert rows[12:40].shape == (1, 6) and rows[5:5].shape == (0, 6)
    for idx in ([0, 1, 2, 7, 8, 12], [9, 3, 4, 3], [], np.arange(13)):
        assert np.array_equal(rows[np.asarray(idx, dtype=np.int64)], expected[np.asarray(idx, dtype=np.int64)]), idx
    assert np.array_equal(rows[np.array([2, 0], dtype=np.uint8)], expected[[2, 0]])   # no wrap-around in small types
    with pytest.raises(IndexError, match="out of range"):
        rows[np.array([13])]
    with pytest.raises(IndexError, match="step 1"):
        rows[::2]
    with pytest.raises(ValueError, match="makes a copy"):
        np.asarray(rows, copy=False)
    with pytest.raises(ValueError, match=r"\[batch, width\] with one width throughout: got \[2, 5\] after width 6"):
        writer.append(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"got \[2, 3, 2\]"):
        FeatureWriter(str(tmp_path)).append(np.zeros((2, 3, 2), np.float32))
    in_order = FeatureWriter(str(tmp_path))              # arrived in shard order: the file as written
    in_order.append(expected)
    assert np.array_equal(np.asarray(in_order.finish([13], [0])), expected)
    rows.close()
    with pytest.raises(ValueError):
        rows[0:1]


def test_random_rows_read_like_an_array_and_a_file_cut_short_is_named(tmp_path) -> None:
    """A probe's random mini-batch (rows out of arrival order too, each its own run of the file) reads as an array
    does, any order, repeats included; a file cut short in the middle of a row is an error saying so."""
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, 7)).astype(np.float32) for n in (200, 150, 250)]
    writer = FeatureWriter(str(tmp_path))
    for b in blocks:
        writer.append(b)
    rows = writer.finish([len(b) for b in blocks], [1, 2, 0])
    expected = np.concatenate([blocks[i] for i in (1, 2, 0)])
    idx = np.sort(rng.choice(600, 300, replace=False))
    for ask in (idx, idx[::-1], np.concatenate([idx[:5], idx[:5]])):
        assert np.array_equal(rows[ask], expected[ask])
    os.ftruncate(rows.file.fileno(), 600 * 7 * 4 - 6)                   # the last file row: 22 of its 28 bytes
    last = int(np.flatnonzero(rows.order == 599)[0])
    assert np.array_equal(rows[idx[idx != last]], expected[idx[idx != last]])
    with pytest.raises(OSError, match="feature file ended 6 bytes early"):
        rows[np.array([3, last])]
    rows.close()


def test_scores_of_rows_on_disk_equal_those_of_rows_in_memory(fm_pixels, tmp_path) -> None:
    """kNN (in blocks), both probes and the centred kNN read a FeatureFile as they read an array: the same predictions."""
    train, train_y, test, _ = fm_pixels

    def on_disk(rows: np.ndarray) -> FeatureFile:
        writer = FeatureWriter(str(tmp_path))
        for part in np.array_split(rows, 7):
            writer.append(part)
        return writer.finish([len(p) for p in np.array_split(rows, 7)], list(range(7)))

    tr, te = on_disk(train), on_disk(test)
    for center, block in ((False, None), (False, 300), (True, 700)):
        assert all(np.array_equal(a, b) for a, b in zip(knn_predict(tr, train_y, te, center=center, block=block),
                                                         knn_predict(train, train_y, test, center=center, block=block)))
    few = on_disk(train[:500])
    for method in ("lbfgs", "sgd"):
        assert np.array_equal(linear_probe(few, train_y[:500], te, method=method),
                              linear_probe(train[:500], train_y[:500], test, method=method)), method
    # the mini-batch probe with its standardised rows held on the device (CUDA's default when they fit): the same
    # batches, the same arithmetic, the same predictions as reading each batch from the file
    streamed = linear_probe(few, train_y[:500], te, method="sgd", resident=False)
    assert np.array_equal(linear_probe(few, train_y[:500], te, method="sgd", resident=True), streamed)
    rows = train[:500].copy()                                          # rows in memory are copied, never changed
    assert np.array_equal(linear_probe(rows, train_y[:500], test, method="sgd", resident=True), streamed)
    assert np.array_equal(rows, train[:500])
    assert not probe_resident(10**9, 2048, CPU)                        # on the CPU the rows stay on disk


def test_progress_is_told_of_every_step_up_to_each_phase_total(small_shards: list[str], fm_pixels) -> None:
    told: list[tuple[str, int, int | None, str]] = []
    record = lambda *a: told.append(a)  # noqa: E731
    extract_all({"flat": lambda x: x.flatten(1)}, small_shards, 16, CPU, batch_size=50, desc="train features",
                on_progress=record)
    assert {t[0] for t in told} == {"train features (1 encoder)"} and told[-1][1] == 123   # samples read, decodable or not
    assert [t[1] for t in told] == sorted(t[1] for t in told) and {t[3] for t in told} == {"images"}
    train, train_y, test, _ = (a[:600] for a in fm_pixels)
    told.clear()
    knn_predict(train, train_y, test, block=250, on_progress=record, desc="kNN pixels")
    assert told == [("kNN pixels", 200, 600, "training rows"), ("kNN pixels", 400, 600, "training rows"),
                    ("kNN pixels", 600, 600, "training rows")]
    told.clear()
    linear_probe(train, train_y, test, method="sgd", on_progress=record, desc="probe")
    assert told == [("probe", e, 30, "epochs") for e in range(1, 31)]
    told.clear()
    linear_probe(train, train_y, test, method="lbfgs", on_progress=record, desc="probe", max_iter=20)
    # evaluations, at most 1.25 x max_iter + 25 (one line search), then the count they came to as the total
    assert 2 < len(told) <= 51 and told[0][2] == 50 and told[-1][1:3] == (len(told) - 1,) * 2


def test_a_full_disk_is_named_before_and_while_features_are_written(tmp_path) -> None:
    check_disk(str(tmp_path), 1000, [512, 1024])                     # 6 MB: there is room
    with pytest.raises(SeedError, match=rf"need about 8192\.0 GB .*\(1000000000 images x 2048 floats\).*{tmp_path}.*TMPDIR"):
        check_disk(str(tmp_path), 10**9, [1024, 1024])
    check_disk(str(tmp_path), None, [1024])                          # N not known: no room check
    # what opening, writing or flushing a feature file raises when the disk is full: one line, naming the directory
    with pytest.raises(SeedError, match=rf"no space left in {tmp_path}.*TMPDIR"):
        with _disk_errors(str(tmp_path)):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):                             # other errors as they are
        with _disk_errors(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_a_directory_kept_in_memory_is_told_apart_by_its_mount(tmp_path, small_shards: list[str], caplog) -> None:
    import logging

    mounts = ("/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n/dev/vdb /tmp/big\\040disk xfs rw 0 0\n"
              "tmpfs /dev/shm tmpfs rw 0 0\nnone /ram ramfs rw 0 0\n")
    assert memory_filesystem("/tmp/x", mounts) == "tmpfs" and memory_filesystem("/ram", mounts) == "ramfs"
    assert memory_filesystem("/tmp/big disk/features", mounts) is None        # the longest mount point decides
    assert memory_filesystem("/tmpfoo", mounts) is None and memory_filesystem("/work", mounts) is None
    # on this machine: /dev/shm is a tmpfs, the pytest directory is not
    assert memory_filesystem("/dev/shm") == "tmpfs" and memory_filesystem(str(tmp_path)) is None
    shm = Path("/dev/shm") / f"seed-test-{tmp_path.name}"
    shm.mkdir()
    try:
        with caplog.at_level(logging.WARNING, logger="seed.features"):
            extract_all({"flat": lambda x: x.flatten(1)}, small_shards[:1], 16, CPU, directory=str(shm))
            extract_all({"flat": lambda x: x.flatten(1)}, small_shards[:1], 16, CPU, directory=str(tmp_path))
            extract_all({"flat": lambda x: x.flatten(1)}, small_shards[:1], 16, CPU, directory=str(shm))
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and f"{shm} is a tmpfs, kept in memory" in warned[0] and "TMPDIR" in warned[0]
        assert "(about 0.0 GB)" in warned[0]                                  # the shards' _info.json gave N
    finally:
        shm.rmdir()


def test_probe_choice_is_a_threshold_on_n_times_d(fm_pixels) -> None:
    assert probe_method(60_000, 2048) == "lbfgs"           # the Fashion-MNIST demo keeps full-batch L-BFGS
    assert probe_method(1_281_167, 2048) == "sgd"          # ImageNet-1k streams
    assert probe_method(LBFGS_MAX_ELEMENTS, 1) == "lbfgs" and probe_method(LBFGS_MAX_ELEMENTS + 1, 1) == "sgd"
    assert probe_name("lbfgs") == "full-batch L-BFGS" and probe_name("sgd").startswith("mini-batch Adam")
    # the logits count too: 1,000 classes over 512-d features make n x 1,000 floats, and their gradient
    assert probe_method(200_000, 512, 10) == "lbfgs" and probe_method(200_000, 512, 1000) == "sgd"
    train, train_y, test, _ = fm_pixels
    with pytest.raises(ValueError, match="unknown probe method"):
        linear_probe(train, train_y, test, method="newton")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """120 real Fashion-MNIST images in shards of 50, and a shard whose second image does not decode."""
    root = tmp_path_factory.mktemp("fm")
    fashion_mnist_to_shards(str(root / "fm"), per_shard=50, limit=120, progress=False)
    urls = expand_urls(str(root / "fm/train/train-{000000..000002}.tar"))
    good = list(iter_shard(urls[0]))[:3]
    bad = root / "fm/train/train-000003.tar"
    with tarfile.open(bad, "w") as tar:
        for i, s in enumerate(good):
            _add(tar, f"x{i}.png", (s.image or b"") if i != 1 else b"not an image")
            _add(tar, f"x{i}.cls", str(s.label).encode())
    return [*urls, str(bad)]


def test_streamed_features_equal_in_memory_ones(small_shards: list[str]) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten()).eval()
    batches, labels = images(small_shards, 32)                          # the old path: every image in memory
    expected = extract(encoder, batches, CPU)
    out = extract_all({"conv": encoder, "twice": lambda x: 2 * encoder(x)}, small_shards, 32, CPU, batch_size=16)
    assert out.n == 122 and out.skipped == 1 and np.array_equal(out.labels, labels)
    assert np.array_equal(out.features["conv"], expected)             # same batches' pixels, the same forward
    assert np.allclose(out.features["twice"], 2 * expected)
    assert out.pixels is None


def test_features_extracted_in_parts_by_processes_equal_one_pass(small_shards: list[str], tmp_path) -> None:
    """``seed evaluate --procs``: each process writes its shards' rows into files shared by all, at their places in
    the split; read back as one, they equal one process's pass, holes (a sample that does not decode) left out."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten()).eval()
    encoders = {"conv": encoder, "flat": lambda x: x[:, :, ::4, ::4].flatten(1)}
    spec = PixelSample(max_images=40, resolution=8)                  # 40 of 122: the parts' keepers must merge
    whole = extract_all(encoders, small_shards, 32, CPU, batch_size=16, pixels=spec)
    lengths = [count_samples(u) for u in small_shards]               # 50, 50, 20, 3
    files = {name: feature_file(str(tmp_path)) for name in encoders}
    parts = []
    for i, shards in enumerate(([3, 1], [2, 0])):                    # two processes, here one after the other
        part = extract_part(encoders, small_shards, shards, lengths, {k: f.fileno() for k, f in files.items()}, 32,
                            CPU, batch_size=16, pixels=spec, directory=str(tmp_path))
        part.save(str(tmp_path / f"part-{i}.npz"))                   # handed over as a process hands it over
        parts.append(Part.load(str(tmp_path / f"part-{i}.npz")))
    assert [len(p.rows) for p in parts] == [52, 70] and [p.skipped for p in parts] == [1, 0]
    got = gather_parts(parts, files, 32, spec)
    assert (got.n, got.skipped) == (whole.n, whole.skipped) == (122, 1) and np.array_equal(got.labels, whole.labels)
    for name in encoders:
        assert got.features[name].shape == whole.features[name].shape
        assert np.array_equal(np.asarray(got.features[name]), np.asarray(whole.features[name])), name
        rows = np.array([0, 121, 120, 5, 119])                       # random rows, across the hole (after row 120)
        assert np.array_equal(got.features[name][rows], whole.features[name][rows])
    assert got.features["conv"].order is not None                    # the hole: rows read around it
    assert got.pixels is not None and whole.pixels is not None and len(got.pixels) == 40
    assert np.array_equal(got.pixels, whole.pixels) and np.array_equal(got.pixel_labels, whole.pixel_labels)
    # a key two samples share (two shards made from one source): the earlier one kept, in whatever order offered
    def kept(*entries: tuple[int, int, int]) -> list[list[int]]:
        keeper = _PixelKeeper(PixelSample(max_images=2, resolution=1), 1)
        for priority, shard, position in entries:
            keeper.merge({"priority": np.array([priority], np.uint64), "place": np.array([[shard, position]]),
                          "pixels": np.zeros((1, 3), np.float32), "label": np.array([shard])})
        return keeper.entries()["place"].tolist()
    import itertools

    for offers in itertools.permutations([(3, 0, 0), (5, 1, 4), (5, 0, 9), (9, 0, 1)]):   # the tie at the boundary
        assert sorted(kept(*offers)) == [[0, 0], [0, 9]], offers
    # a shard holding more samples than its recorded length would write over the next shard's rows: refused
    with pytest.raises(SeedError, match=r"train-000002\.tar holds more than the 19 samples counted .*describe it again"):
        extract_part(encoders, small_shards, [2], [50, 50, 19, 3], {k: f.fileno() for k, f in files.items()}, 32, CPU,
                     directory=str(tmp_path))


def test_a_pass_whose_features_cannot_fit_is_refused_at_its_first_batch(small_shards: list[str], tmp_path) -> None:
    """The shards' _info.json says how many images come: rows that would not fit the disk are refused before the
    pass goes on, and the files already written leave nothing behind."""
    import json
    import shutil

    urls = []
    for url in small_shards[:3]:
        urls.append(str(tmp_path / Path(url).name))
        shutil.copy(url, urls[-1])
    (tmp_path / "_info.json").write_text(json.dumps({"splits": {"train": {
        "filenames": [Path(u).name for u in urls], "shard_lengths": [10**12, 10**12, 10**12]}}}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    wide = lambda x: x.flatten(1)  # noqa: E731
    open_files = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SeedError, match=rf"need about .* GB of local disk \(3000000000000 images x 6144 floats\) and {scratch}"):
        extract_all({"wide": wide, "twice": lambda x: 2 * wide(x)}, urls, 32, CPU, directory=str(scratch))
    assert list(scratch.iterdir()) == []
    assert len(os.listdir("/proc/self/fd")) == open_files              # and the refused pass's files are closed


def test_pixel_subsample_is_the_lowest_key_hashes(small_shards: list[str]) -> None:
    spec = PixelSample(max_images=30, resolution=16, seed=3)
    everything = extract_all({}, small_shards, 32, CPU, pixels=PixelSample(max_images=1000, resolution=16))
    assert everything.pixels is not None and everything.pixels.shape == (122, 3 * 16 * 16)
    assert everything.pixel_resolution == 16
    some = extract_all({}, small_shards, 32, CPU, pixels=spec, batch_size=7)
    keys = [s.key for url in small_shards for s in iter_shard(url) if s.key != "x1"]   # decodable, in shard order
    chosen = sorted(sorted(range(len(keys)), key=lambda i: spec.priority(keys[i]))[:30])
    assert some.pixels is not None and some.pixel_labels is not None
    assert np.array_equal(some.pixels, everything.pixels[chosen])      # the same rows, kept in shard order
    assert np.array_equal(some.pixel_labels, everything.labels[chosen])
    larger = extract_all({}, small_shards, 64, CPU, pixels=PixelSample(max_images=1000, resolution=64))
    assert larger.pixel_resolution == 64 and larger.pixels is not None and larger.pixels.shape[1] == 3 * 64 * 64
    capped = extract_all({}, small_shards, 24, CPU, pixels=PixelSample(max_images=1000, resolution=64))
    assert capped.pixel_resolution == 24  # never above the evaluation resolution


def test_sgd_probe_is_seeded_and_learns(fm_pixels) -> None:
    train, train_y, test, test_y = (a[:500] for a in fm_pixels)
    pred = linear_probe(train, train_y, test, method="sgd")
    again = linear_probe(train, train_y, test, method="sgd")
    assert np.array_equal(pred, again)                                   # seeded
    assert (pred == test_y).mean() > 0.7, (pred == test_y).mean()


def test_torch_search_equals_faiss_flat(fm_pixels) -> None:
    """The GPU fallback (torch, used on CUDA when FAISS has no GPU support) is device-agnostic: on the CPU,
    over several added parts and scanned in blocks that do not divide them, it finds FAISS's neighbours."""
    import faiss

    from seed.evaluate import _TorchFlatIP

    train, _, test, _ = fm_pixels
    norm = lambda x: np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)  # noqa: E731
    reference = faiss.IndexFlatIP(train.shape[1])
    reference.add(norm(train))
    ref_s, ref_i = reference.search(norm(test), 20)
    index = _TorchFlatIP(CPU, block=300)
    for rows in (slice(0, 700), slice(700, 1500), slice(1500, 2000)):
        index.add(norm(train[rows]))
    sims, idx = index.search(norm(test), 20)
    assert sims.shape == idx.shape == (500, 20) and idx.dtype == np.int64
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert (idx == ref_i).mean() > 0.99  # only near-ties may order differently


def test_the_random_baseline_is_normalised_as_the_students() -> None:
    """The random-init row goes through the same mean/std normalisation as every trained encoder."""
    from pipeline.evaluate import random_student
    from seed.models import create_backbone, preprocessing

    encoder, note = random_student("resnet10t", True, 7)
    torch.manual_seed(7)
    plain = create_backbone("resnet10t", small_input=True, zero_init_last=False).eval()
    pre = preprocessing(plain)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(encoder.features(x), plain((x - mean) / std), atol=1e-5)
        assert not torch.allclose(encoder.features(x), plain(x), atol=1e-3)
    assert "normalised as the students" in note


@pytest.mark.parametrize("method", ["lbfgs", "sgd"])
def test_a_channel_constant_on_the_training_rows_does_not_blow_up_the_test_rows(fm_pixels, method: str) -> None:
    """Standardising divided a column constant on the training rows (a dead channel) by 1e-6: a test image
    where it fires at 0.01 got a feature of 10,000 and a prediction made by that column alone. Such a column is
    now divided by 1, and the probe scores as it does on the features without it."""
    train, train_y, test, test_y = fm_pixels
    train, test = train[:1000, ::4].copy(), test[:, ::4].copy()               # 196 pixels
    train_y = train_y[:1000]
    without = linear_probe(train, train_y, test, method=method, max_iter=50)
    train_d = np.concatenate([train, np.zeros((len(train), 1), np.float32)], axis=1)
    test_d = np.concatenate([test, np.full((len(test), 1), 0.01, np.float32)], axis=1)
    with_dead = linear_probe(train_d, train_y, test_d, method=method, max_iter=50)
    accuracy = lambda pred: (pred == test_y).mean()  # noqa: E731
    assert accuracy(without) > 0.6 and abs(accuracy(with_dead) - accuracy(without)) < 0.03, (accuracy(with_dead),
                                                                                            accuracy(without))


def test_a_sample_without_a_label_stops_the_pass_naming_it(tmp_path: Path, small_shards: list[str]) -> None:
    """A vote for label -1 went to the last class, and the probe failed after the whole pass: the pass stops
    at the first unlabelled sample, naming its shard and key."""
    shard = tmp_path / "unlabelled.tar"
    good = list(iter_shard(small_shards[0]))[:2]
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a.png", good[0].image or b"")
        _add(tar, "a.cls", str(good[0].label).encode())
        _add(tar, "b.png", good[1].image or b"")                              # no label
    with pytest.raises(SeedError, match=rf"{shard}: sample 'b' has no label"):
        extract_all({"flat": lambda x: x.flatten(1)}, [str(shard)], 16, CPU)


def test_splits_sharing_shards_or_numbering_classes_apart_are_refused(tmp_path: Path) -> None:
    """The evaluation's checks before any image is read: a test shard in the training split, and two splits made
    by ``seed shards imagefolder`` from trees with other class folders (each numbers its own)."""
    from PIL import Image

    from pipeline.evaluate import _check_splits
    from seed.shards import imagefolder_to_shards

    urls = [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    with pytest.raises(SeedError, match=r"share 1 shard\(s\) \(.*s-2\.tar\): a test image would be its own"):
        _check_splits(urls, urls[2:])
    for split, classes in (("train", ["cat", "dog", "emu"]), ("test", ["cat", "emu"]), ("same", ["cat", "dog", "emu"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (len(c) * 40, 0, 0)).save(buf, "PNG")
            (tmp_path / split / c / "a.png").write_bytes(buf.getvalue())
        imagefolder_to_shards(str(tmp_path / split), str(tmp_path / f"{split}-shards"), split="train" if split != "test"
                              else "test", progress=False)
    train = expand_urls(str(tmp_path / "train-shards/train/train-000000.tar"))
    test = expand_urls(str(tmp_path / "test-shards/test/test-000000.tar"))
    with pytest.raises(SeedError, match=r"number their classes differently: label 1 is 'dog' in the train split "
                                        r"and 'emu' in the test split \(3 and 2 classes"):
        _check_splits(train, test)
    _check_splits(train, expand_urls(str(tmp_path / "same-shards/train/train-000000.tar")))   # the same folders: fine
