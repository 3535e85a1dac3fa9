"""The bank stage on a real cache: targets equal the hand-written reference, own images excluded, rebuilds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline.teacher as teacher_stage
from pipeline import bank as bank_stage
from seed import bank as B
from seed import bank_store
from seed.errors import SeedError
from seed.inspect import verify
from tests.conftest import make_storage, small_config
from tests.unit.test_bank import reference_targets


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory, shards_root: Path, moco_checkpoint: Path):
    root = tmp_path_factory.mktemp("bankcache")
    cfg = small_config(moco_checkpoint, "bank.size=128", "bank.topk=8", "bank.tau_t=0.05", "bank.batch_size=100")
    storage = make_storage(root, shards_root)
    teacher_stage.run(cfg, storage, progress=False)
    return cfg, storage


def test_stage_targets_match_reference_and_exclude_own(teacher_cache) -> None:
    cfg, storage = teacher_cache
    summary = bank_stage.run(cfg, storage, progress=False)
    g = zarr.open_group(summary.cache, mode="r")
    bank = g["bank"]
    ids = bank["ids"][:]
    assert ids.shape == (128, 2) and len(set(ids[:, 0])) == 128 and g["valid"][:][ids[:, 0]].all()
    emb = g["embeddings"][:].astype(np.float32)
    assert np.array_equal(bank["vectors"][:], g["embeddings"][:][ids[:, 0], ids[:, 1]])
    rng = np.random.default_rng(0)
    rows = np.concatenate([ids[:5, 0], rng.choice(300, 15, replace=False)])     # bank members and others
    views = rng.integers(0, 2, size=len(rows))
    ref = reference_targets(emb[rows, views], rows, bank["vectors"][:].astype(np.float32), ids[:, 0], 0.05)
    cols, logp = bank["indices"][:][rows, views], bank["logp"][:][rows, views].astype(np.float32)
    for i in range(len(rows)):
        expected = sorted(ref[i].items(), key=lambda kv: -kv[1])[:8]
        assert cols[i].tolist() == [c for c, _ in expected]
        assert np.allclose(logp[i], np.array([v for _, v in expected], dtype=np.float16).astype(np.float32), atol=2e-3, rtol=2e-3)
    all_cols = bank["indices"][:]
    for pos, (row, _) in enumerate(ids):                                     # own-image exclusion, everywhere
        assert not (all_cols[row] == pos + 1).any()
    fid = bank.attrs["fidelity"]
    assert 0 < fid["mass"]["min"] <= fid["mass"]["mean"] <= 1
    # Gibbs: KL(dense || sparse) >= 0 when the sparse target is a distribution (not clamped: float16
    # log-probabilities allow a hair below 0); > 0 because top-8 of 129 columns miss mass at tau_T = 0.05
    assert fid["kl"]["min"] > -1e-4 and fid["kl"]["mean"] > 1e-6
    assert abs(fid["stored_minus_true_mass"]["mean"]) < 1e-3
    # the fidelity's sample, copied shard by shard as the targets were made, is what the store holds: measured
    # again from the stored arrays, the fidelity is the same to the bit
    sample = bank_stage.FidelitySample.draw(g["valid"][:], 2, emb.shape[2], cfg.bank)
    sample.take(0, g["embeddings"][:], all_cols, bank["logp"][:], bank["mass"][:])
    index = B.BankIndex(bank["vectors"][:].astype(np.float32), "flat")
    assert bank_stage.measure_fidelity(bank, index, cfg.bank, sample) == fid
    assert bank.attrs["status"] == "complete"
    checked = verify(summary.cache)  # every chunk of cache and bank reads back; records match the data
    assert checked["problems"] == [] and checked["chunks"] > 10 and checked["shards"] == 3


def test_rebuild_touches_only_the_bank(teacher_cache) -> None:
    cfg, storage = teacher_cache
    bank_stage.run(cfg, storage, progress=False)
    url = storage.cache_url(cfg.cache.name)
    before = zarr.open_group(url, mode="r")["embeddings"][:].tobytes()
    forwards = zarr.open_group(url, mode="r").attrs["totals"]["teacher_forwards"]

    Path(cfg.teacher.checkpoint).rename(moved := Path(str(cfg.teacher.checkpoint) + ".away"))
    try:  # the teacher's file is gone: the bank stage never needs it
        assert bank_stage.run(cfg, storage, progress=False).skipped is True
        # what the flat index and its exact normaliser never read leaves the bank current (a rebuild would give
        # the same bytes); the same settings on an index that reads them do not
        sets = ("bank.size=128", "bank.topk=8", "bank.tau_t=0.05")
        for unread in ("bank.nprobe=3", "bank.ivf_lists=5", "bank.hnsw_m=8", "bank.ef_search=9", "bank.tail_samples=7",
                       "bank.normaliser=exact"):
            same = small_config(cfg.teacher.checkpoint, *sets, unread)
            assert bank_stage.run(same, storage, progress=False).skipped is True, unread
            bank_store.open_bank(url, same.bank)
        assert not bank_store.current(g0 := zarr.open_group(url, mode="r"), small_config(
            cfg.teacher.checkpoint, *sets, "bank.normaliser=sampled").bank)[0]
        assert not bank_store.current(g0, small_config(cfg.teacher.checkpoint, *sets, "bank.index=ivf").bank)[0]
        other = small_config(cfg.teacher.checkpoint, "bank.size=64", "bank.topk=4", "bank.tau_t=0.05")
        summary = bank_stage.run(other, storage, progress=False)
    finally:
        moved.rename(cfg.teacher.checkpoint)
    g = zarr.open_group(url, mode="r")
    assert summary.skipped is False and g["bank"]["ids"].shape == (64, 2) and g["bank"]["indices"].shape[-1] == 4
    assert g["embeddings"][:].tobytes() == before and g.attrs["totals"]["teacher_forwards"] == forwards
    with pytest.raises(SeedError, match="bank was built with other parameters: size"):
        bank_store.open_bank(url, cfg.bank)
    bank_store.open_bank(url, other.bank)


def test_bank_larger_than_cache_and_incomplete_cache_are_refused(teacher_cache, tmp_path: Path, shards_root: Path,
                                                                 moco_checkpoint: Path) -> None:
    cfg, storage = teacher_cache
    bank_stage.run(cfg, storage, progress=False)
    with pytest.raises(SeedError, match="bank.size=5000 is larger than the 300 valid images"):
        bank_stage.run(small_config(moco_checkpoint, "bank.size=5000"), storage, progress=False)
    # refused before anything is removed: the bank in place stays complete and current
    assert bank_stage.run(cfg, storage, progress=False).skipped is True
    storage2 = make_storage(tmp_path, shards_root)
    teacher_stage.run(cfg, storage2, shards=[0], progress=False)                # 1 of 3 shards
    with pytest.raises(SeedError, match=r"incomplete \(1 of 3 shards done\)"):
        bank_stage.run(cfg, storage2, progress=False)
    with pytest.raises(SeedError, match="no cache at"):
        bank_stage.run(small_config(moco_checkpoint, "cache.name=absent"), storage2, progress=False)


def test_sampled_normaliser_targets_do_not_depend_on_the_batch_size(teacher_cache) -> None:
    """The batch size is not a bank field (it only sets how much is searched at once): the sampled normaliser's
    tail sample is drawn per shard and rotation, so the stored targets are the same at any batch size."""
    cfg, storage = teacher_cache
    url = storage.cache_url(cfg.cache.name)
    stored = []
    for batch_size in (100, 37):
        bank_store.remove(zarr.open_group(url, mode="r+"))
        summary = bank_stage.run(small_config(cfg.teacher.checkpoint, "bank.size=128", "bank.topk=8", "bank.tau_t=0.05",
                                              "bank.index=hnsw", "bank.tail_samples=8", f"bank.batch_size={batch_size}"),
                                 storage, progress=False).summary
        bank = zarr.open_group(url, mode="r")["bank"]
        stored.append((bank["indices"][:], bank["logp"][:], bank["mass"][:], summary["normaliser"]))
    (i1, l1, m1, n1), (i2, l2, m2, n2) = stored
    assert n1 == n2 == "sampled" and np.array_equal(i1, i2)
    assert np.array_equal(l1, l2, equal_nan=True) and np.array_equal(m1, m2, equal_nan=True)


def test_torch_index_stage_equals_flat(teacher_cache) -> None:
    """``bank.index=torch`` (the GPU path; here on the CPU) stores the targets and fidelity of ``flat``."""
    cfg, storage = teacher_cache
    url = storage.cache_url(cfg.cache.name)
    stored = {}
    for kind in ("flat", "torch"):
        other = small_config(cfg.teacher.checkpoint, "bank.size=128", "bank.topk=8", "bank.tau_t=0.05",
                             "bank.batch_size=100", f"bank.index={kind}")
        summary = bank_stage.run(other, storage, progress=False).summary
        bank = zarr.open_group(url, mode="r")["bank"]
        stored[kind] = (bank["ids"][:], bank["indices"][:], bank["logp"][:].astype(np.float32), bank["mass"][:], summary)
    (fi, fc, fl, fm, fs), (ti, tc, tl, tm, ts) = stored["flat"], stored["torch"]
    assert ts["index"] == "torch" and ts["normaliser"] == "exact" and "faiss_index" not in zarr.open_group(url, mode="r")["bank"]
    assert np.array_equal(fi, ti) and np.array_equal(fc, tc)
    finite = np.isfinite(fl)
    assert np.array_equal(finite, np.isfinite(tl)) and np.allclose(fl[finite], tl[finite], atol=2e-3, rtol=2e-3)
    assert np.allclose(fm, tm, atol=1e-5, equal_nan=True)
    for key in ("mass", "kl"):
        assert ts["fidelity"][key]["mean"] == pytest.approx(fs["fidelity"][key]["mean"], rel=1e-3, abs=1e-6)


def test_rotating_banks_are_disjoint_each_with_its_own_targets_and_students_use_epoch_mod_r(teacher_cache) -> None:
    """bank.rotations = 2: two disjoint banks in ``bank`` and ``bank-1``, each rotation's targets equal the
    reference over its own bank; a student's examples of epoch e carry rotation e mod 2 and their targets;
    going back to one bank removes the second rotation."""
    from seed.data import CachedSource

    cfg, storage = teacher_cache
    rot = small_config(cfg.teacher.checkpoint, "bank.size=64", "bank.topk=8", "bank.tau_t=0.05", "bank.rotations=2")
    summary = bank_stage.run(rot, storage, progress=False)
    assert summary.summary["rotations"] == 2 and bank_stage.run(rot, storage, progress=False).skipped
    g = zarr.open_group(summary.cache, mode="r")
    ids = [g["bank"]["ids"][:], g["bank-1"]["ids"][:]]
    assert all(i.shape == (64, 2) for i in ids) and not set(ids[0][:, 0]) & set(ids[1][:, 0])
    emb = g["embeddings"][:].astype(np.float32)
    rows = np.array([3, 50, 120, 201, 299])
    for r, name in enumerate(["bank", "bank-1"]):
        vectors = g[name]["vectors"][:].astype(np.float32)
        ref = reference_targets(emb[rows, 0], rows, vectors, ids[r][:, 0], 0.05)
        cols = g[name]["indices"][:][rows, 0]
        for i in range(len(rows)):
            assert cols[i].tolist() == [c for c, _ in sorted(ref[i].items(), key=lambda kv: -kv[1])[:8]]
        assert g[name].attrs["status"] == "complete" and g[name].attrs["rotation"] == r
    group, banks = bank_store.open_banks(summary.cache, rot.bank)
    source = CachedSource(group, banks, view="cycle", seed=0, dense=False)
    for epoch in range(3):
        make = source.load(0, epoch)
        from seed.shards import iter_shard
        ex = make(0, next(iter_shard(storage.resolve("shards", "fm/train/train-000000.tar"))))
        assert ex is not None and int(ex.extra["rotation"]) == epoch % 2
        v = (epoch + 0) % 2                                           # cycle: view (epoch + shard) mod V
        assert np.array_equal(ex.extra["cols"], g[["bank", "bank-1"][epoch % 2]]["indices"][0, v])
    from seed.inspect import describe

    on_disk = sum(f.stat().st_size for n in ("bank", "bank-1") for f in (Path(summary.cache) / n).rglob("*") if f.is_file())
    counted = describe(summary.cache)["bytes"]["bank"]
    assert counted["rotations"] == 2 and counted["stored"] == on_disk
    # verify reads every rotation: a damaged chunk of the second one's targets is named
    assert verify(summary.cache)["problems"] == []
    chunk = Path(summary.cache) / "bank-1" / "logp" / "c" / "1" / "0" / "0"  # rows 100-199
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify(summary.cache)["problems"]
    assert len(problems) == 1 and problems[0].startswith("bank-1/logp: chunk 1 (rows 100-199, views 0) is damaged"), problems
    one = small_config(cfg.teacher.checkpoint, "bank.size=64", "bank.topk=8", "bank.tau_t=0.05")
    bank_stage.run(one, storage, progress=False)
    assert "bank-1" not in zarr.open_group(summary.cache, mode="r")
    with pytest.raises(SeedError, match="bank.size=200 x bank.rotations=2 is larger than the 300 valid images"):
        bank_stage.run(small_config(cfg.teacher.checkpoint, "bank.size=200", "bank.rotations=2"), storage, progress=False)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_build_cut_short_resumes_from_its_recorded_blocks_to_the_uninterrupted_bank(teacher_cache, kind: str,
                                                                                      caplog) -> None:
    """A bank whose build stopped after its first shard's block (status ``building``, later blocks unrecorded and
    half-written) resumes: the recorded block is kept as stored, the others are made again to the uninterrupted
    build's bytes. Other parameters or other entries rebuild it instead."""
    cfg, storage = teacher_cache
    cfg = small_config(cfg.teacher.checkpoint, "bank.size=128", "bank.topk=8", "bank.tau_t=0.05",
                       "bank.batch_size=100", f"bank.index={kind}", "bank.tail_samples=16")
    url = storage.cache_url(cfg.cache.name)
    bank_store.remove(zarr.open_group(url, mode="r+"))
    bank_stage.run(cfg, storage, progress=False)
    g = zarr.open_group(url, mode="r+")
    node = g["bank"]
    names = ("indices", "logp", "mass")
    reference = {k: node[k][:] for k in names}
    cap = int(g.attrs["capacity"])
    assert sorted(bank_store.done_blocks(node)) == [0, 1, 2]

    # the cut: block 0 recorded (its mass marked, to see that it is not made again), block 1 half-written and its
    # record left empty (a host crash before the file reached the disk), block 2 not written
    node.update_attributes({"status": "building"})
    del node["progress/000002"]
    (Path(url) / "bank" / "progress" / "000001" / "zarr.json").write_text("")
    node["mass"][:cap] = np.where(np.isfinite(reference["mass"][:cap]), 0.5, np.nan)
    node["indices"][cap: 2 * cap] = 0
    node["logp"][2 * cap:] = np.nan
    assert bank_store.resumable(g, cfg.bank, B.sample_banks(np.flatnonzero(g["valid"][:]), 2, 128, 0, 1))
    other = small_config(cfg.teacher.checkpoint, "bank.size=128", "bank.topk=8", "bank.tau_t=0.05", "bank.seed=1",
                         f"bank.index={kind}")
    assert not bank_store.resumable(g, other.bank, B.sample_banks(np.flatnonzero(g["valid"][:]), 2, 128, 1, 1))

    with caplog.at_level("INFO", logger="pipeline.bank"):
        result = bank_stage.run(cfg, storage, progress=False)
    assert result.skipped is False and "resuming the bank" in caplog.text
    node = zarr.open_group(url, mode="r")["bank"]
    assert node.attrs["status"] == "complete" and sorted(bank_store.done_blocks(node)) == [0, 1, 2]
    mass = node["mass"][:]
    assert np.array_equal(mass[:cap], np.where(np.isfinite(reference["mass"][:cap]), 0.5, np.nan), equal_nan=True)
    for k in names:  # the blocks made again: the uninterrupted build's bytes
        assert np.array_equal(node[k][cap:], reference[k][cap:], equal_nan=True), k
    # the fidelity's sampled views of the kept block were read back from the store (its marked mass shows)
    sample = bank_stage.FidelitySample.draw(g["valid"][:], 2, g["embeddings"].shape[2], cfg.bank)
    sample.take(0, g["embeddings"][:], node["indices"][:], node["logp"][:], mass)
    assert (sample.mass[sample.rows < cap] == 0.5).all() and (sample.rows < cap).any()
    index = B.BankIndex(node["vectors"][:].astype(np.float32), kind,
                        serialized=node["faiss_index"][:], ef_search=cfg.bank.ef_search)
    assert bank_stage.measure_fidelity(node, index, cfg.bank, sample) == node.attrs["fidelity"]

    # a cut build of other parameters is not resumed: rebuilt from nothing, every block made
    zarr.open_group(url, mode="r+")["bank"].update_attributes({"status": "building"})
    bank_stage.run(other, storage, progress=False)
    node = zarr.open_group(url, mode="r")["bank"]
    assert node.attrs["fields"]["seed"] == 1 and not (node["mass"][:cap] == 0.5).any()


def test_a_student_epoch_reads_one_view_of_each_row_block(teacher_cache, tmp_path: Path) -> None:
    """A row block's epoch uses one view of all its rows (``cycle``: (epoch + shard) mod V; ``random``: one drawn
    per block) and reads only that view's chunks of the embeddings and targets: with the other view's chunks
    damaged in a copy, the block's examples are those of the original; the epoch that uses it fails on its
    checksum."""
    import shutil

    from seed.data import CachedSource
    from seed.shards import iter_shard

    cfg, storage = teacher_cache
    bank_stage.run(cfg, storage, progress=False)
    url = storage.cache_url(cfg.cache.name)
    g = zarr.open_group(url, mode="r")
    assert g["embeddings"].chunks == (100, 1, 32) and g["bank"]["logp"].chunks == (100, 1, 8)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(url, copy)
    shard, samples = 1, list(iter_shard(storage.resolve("shards", "fm/train/train-000001.tar")))
    for array in ("embeddings", "bank/indices", "bank/logp"):
        chunk = copy / array / "c" / str(shard) / "0" / "0"                     # view 0 of rows 100-199
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))

    def examples(at: str, epoch: int, view: str = "cycle") -> list:
        group, banks = bank_store.open_banks(at, cfg.bank)
        make = CachedSource(group, banks, view=view, seed=0, dense=False).load(shard, epoch)
        return [make(i, sample) for i, sample in enumerate(samples)]

    emb, cols = g["embeddings"][100:200], g["bank"]["indices"][100:200]
    got, want = examples(str(copy), 0), examples(url, 0)                      # cycle: view (0 + 1) mod 2 = 1
    assert len(got) == 100 and all(e is not None for e in got)
    for i, (a, b) in enumerate(zip(got, want)):
        assert np.array_equal(a.extra["z_t"], emb[i, 1].astype(np.float32)) and np.array_equal(a.extra["cols"], cols[i, 1])
        assert all(np.array_equal(a.extra[k], b.extra[k]) for k in ("z_t", "cols", "logp")) and np.array_equal(a.params, b.params)
    with pytest.raises(SeedError, match="does not match its checksum"):
        examples(str(copy), 1)                                               # view (1 + 1) mod 2 = 0: damaged
    for epoch in range(4):                                                   # random: one view for the whole block
        picked = {int(np.flatnonzero((emb[i].astype(np.float32) == e.extra["z_t"]).all(axis=1))[0])
                  for i, e in enumerate(examples(url, epoch, "random"))}
        assert len(picked) == 1


def _all_views_in_a_chunk(group: zarr.Group, name: str) -> None:
    """Rewrite ``group[name]`` as caches and banks were made before each view had chunks of its own."""
    old = group[name]
    data = old[...]
    kept = {"chunks": (old.chunks[0], *old.shape[1:]), "compressors": old.compressors, "fill_value": old.fill_value,
            "dimension_names": old.metadata.dimension_names, "attributes": dict(old.attrs)}
    del group[name]
    group.create_array(name, data=data, **kept)


def test_a_cache_made_before_views_had_chunks_of_their_own_trains_the_same_and_is_named(
        teacher_cache, shards_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cache and bank whose chunks hold all views of a row (as made before) train a student to the same losses and
    weights as the same data chunked one view deep; the stage says that such a cache reads V times the bytes."""
    import logging
    import shutil

    import torch

    import pipeline.student as student_stage
    from seed import checkpoint
    from tests.conftest import make_storage

    cfg, storage = teacher_cache
    bank_stage.run(cfg, storage, progress=False)
    old = make_storage(tmp_path, shards_root)
    shutil.copytree(storage.cache_url(cfg.cache.name), old.cache_url(cfg.cache.name))
    g = zarr.open_group(old.cache_url(cfg.cache.name), mode="r+")
    for group, name in ((g, "embeddings"), (g["bank"], "indices"), (g["bank"], "logp")):
        _all_views_in_a_chunk(group, name)
    assert g["embeddings"].chunks == (100, 2, 32) and g["bank"]["logp"].chunks == (100, 2, 8)
    student = small_config(Path(cfg.teacher.checkpoint), "bank.size=128", "bank.topk=8", "bank.tau_t=0.05",
                           "bank.batch_size=100", "train.optim.epochs=2", "train.optim.batch_size=50",
                           "train.loader.shuffle_buffer=200", "train.device=cpu")
    with caplog.at_level(logging.WARNING, logger="pipeline.student"):
        before = student_stage.run(student, old, progress=False)
    assert ("embeddings, bank/indices, bank/logp keep 2 views of a row in one chunk" in caplog.text
            and "each epoch reads up to 2 times the bytes of the view it uses" in caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.student"):
        now = student_stage.run(student, storage, progress=False)
    assert "views of a row in one chunk" not in caplog.text
    assert [m["loss"] for m in before.metrics] == [m["loss"] for m in now.metrics]
    a, b = (checkpoint.load(str(r.students["mobilenetv3_small_050"]))["model"] for r in (before, now))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_verify_names_lost_target_chunks_and_a_damaged_index(teacher_cache, tmp_path: Path) -> None:
    """``seed inspect --verify`` on a bank copied short: a lost ``logp`` chunk (it would read as NaN targets for a
    whole shard) and a flipped byte in the stored FAISS index are both named."""
    import shutil

    cfg, storage = teacher_cache
    bank_stage.run(cfg, storage, progress=False)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(storage.cache_url(cfg.cache.name), copy)
    assert verify(str(copy))["problems"] == []
    (copy / "bank" / "logp" / "c" / "1" / "0" / "0").unlink()
    index = next(p for p in (copy / "bank" / "faiss_index" / "c").rglob("*") if p.is_file())
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x10
    index.write_bytes(bytes(data))
    problems = verify(str(copy))["problems"]
    assert any("bank/logp: chunk 1 (rows 100-199, views 0) is missing" in p for p in problems), problems
    assert any("bank/indices, logp: shard 1 has" in p and "without a first target" in p for p in problems), problems
    assert any(p.startswith("bank/faiss_index: chunk 0") and "is damaged" in p for p in problems), problems
