"""`seed inspect` on a small real Zarr cache written here: byte counts against the files on disk, the
plot statistics against brute-force references, the plots themselves."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from seed import bank_store, cache
from seed.config import BankConfig, to_dict
from seed.inspect import (byte_counts, describe, format_text, nearest_other, plots, sample_rows, stored_bytes,
                          topk_profile)
from seed.views import P, Recipe

CAP, SHARDS, V, D, K, TOPK, TAU = 40, 3, 2, 16, 24, 6, 0.05


def _unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _targets(z: np.ndarray, row: int, bank: np.ndarray, bank_rows: np.ndarray, tau: float) -> tuple[list[int], list[float], float]:
    """Top-k of p_T over D+ = [z ; bank] (own image's entries excluded) as a plain loop: columns, log p, mass."""
    logits = {0: float(z @ z) / tau}
    for j in range(len(bank)):
        if bank_rows[j] != row:
            logits[j + 1] = float(z @ bank[j]) / tau
    top = max(logits.values())
    lse = top + math.log(sum(math.exp(v - top) for v in logits.values()))
    best = sorted(logits.items(), key=lambda kv: -kv[1])[:TOPK]
    return [c for c, _ in best], [v - lse for _, v in best], sum(math.exp(v - lse) for _, v in best)


def make_cache(url: str, with_bank: bool = True) -> str:
    """3 shards of capacity 40: shard 1 holds 25 samples (15 padding rows) and one skipped sample; keys of
    different lengths, one not ASCII; random unit embeddings in float16; a bank of K entries with exact targets."""
    rng = np.random.default_rng(0)
    fields = {"recipe": to_dict(Recipe()), "resolution": 32, "seed": 0, "views": V}
    group = cache.create(url, fields=fields, capacity=CAP, n_shards=SHARDS, views=V, dim=D,
                         attrs={"shard_urls": [f"s-{i}.tar" for i in range(SHARDS)], "teacher": {"arch": "none"}})
    for s in range(SHARDS):
        n = 25 if s == 1 else CAP
        valid = np.zeros(CAP, bool)
        valid[:n] = True
        if s == 1:
            valid[3] = False                                               # skipped: keeps its key, no data
        emb = np.full((CAP, V, D), np.nan, np.float16)
        emb[valid] = _unit(int(valid.sum()) * V, D, rng).reshape(-1, V, D).astype(np.float16)
        aug = np.full((CAP, V, P), np.nan, np.float32)
        aug[valid] = rng.random((int(valid.sum()), V, P), dtype=np.float32)
        keys = np.array([f"s{s}-é{i}" if i % 7 == 0 else f"img-{s * CAP + i:06d}" if i < n else "" for i in range(CAP)],
                        dtype=object)
        labels = np.where(np.arange(CAP) < n, rng.integers(0, 4, CAP), -1).astype(np.int32)
        sizes = np.where(valid[:, None], 28, 0).astype(np.int32) * np.ones((CAP, 2), np.int32)
        record = {"samples": n, "valid": int(valid.sum()), "skipped": [{"key": str(keys[3]), "reason": "test"}] if s == 1 else [],
                  "teacher_forwards": int(valid.sum()) * V, "teacher_seconds": 0.1, "seconds": 0.2,
                  "input_wait_seconds": 0.07, "first_batch_wait_seconds": 0.03}
        cache.write_shard(group, s, {"embeddings": emb, "augment": aug, "keys": keys, "labels": labels, "valid": valid,
                                     "sizes": sizes}, record)
    cache.finalize(group, url)
    if with_bank:
        emb = group["embeddings"][:].astype(np.float32)
        valid_rows = np.flatnonzero(group["valid"][:])
        ids = np.stack([rng.choice(valid_rows, K, replace=False), rng.integers(0, V, K)], axis=1)
        vectors = emb[ids[:, 0], ids[:, 1]]
        b = BankConfig(size=K, topk=TOPK, tau_t=TAU)
        node = bank_store.create(group, b, ids, vectors, np.arange(300, dtype=np.uint8))
        N = SHARDS * CAP
        cols, logp, mass = np.full((N, V, TOPK), -1, np.int32), np.full((N, V, TOPK), np.nan), np.full((N, V), np.nan)
        for r in valid_rows:
            for v in range(V):
                c, lp, m = _targets(emb[r, v], r, vectors.astype(np.float16).astype(np.float32), ids[:, 0], TAU)
                cols[r, v], logp[r, v], mass[r, v] = c, lp, m
        for s in range(SHARDS):
            rows = slice(s * CAP, (s + 1) * CAP)
            bank_store.write_targets(node, rows, cols[rows], logp[rows], mass[rows].astype(np.float32))
        bank_store.complete(node, {"K": K, "topk": TOPK, "tau_t": TAU, "index": "flat"})
    return url


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_cache(str(tmp_path_factory.mktemp("inspect") / "c.zarr"))


def _walk(url: str) -> dict[str, int]:
    """Bytes on disk under each top-level entry of the cache and each entry of ``bank/``, by os.walk."""
    out: dict[str, int] = {}
    for dirpath, _, files in os.walk(url):
        rel = Path(dirpath).relative_to(url).parts
        for f in files:
            parts = (*rel, f)
            node = "/".join(parts[:2]) if parts[0] == "bank" else parts[0]
            out[node] = out.get(node, 0) + os.path.getsize(os.path.join(dirpath, f))
    return out


def test_bytes_split_cache_and_bank_and_match_the_files(small: str) -> None:
    g = zarr.open_group(small, mode="r")
    on_disk = _walk(small)
    valid_views = int(g["valid"][:].sum()) * V
    b = byte_counts(g, small, valid_views)
    assert stored_bytes(small) == on_disk
    assert b["on_disk"] == sum(on_disk.values()) and b["views"] == valid_views == (CAP * 2 + 24) * V
    cache_files = sum(v for k, v in on_disk.items() if not k.startswith("bank/"))
    bank_files = sum(v for k, v in on_disk.items() if k.startswith("bank/"))
    assert b["cache"]["stored"] == cache_files and b["bank"]["stored"] == bank_files
    assert b["cache"]["stored"] + b["bank"]["stored"] == b["on_disk"]
    for name in cache.ARRAYS:
        assert b["cache"]["arrays"][name]["stored"] == on_disk[name], name
    for name in ("ids", "vectors", "faiss_index", "indices", "logp", "mass"):
        assert b["bank"]["arrays"][name]["stored"] == on_disk[f"bank/{name}"], name
    # raw: shape x item size, keys as their UTF-8 text ("é" is two bytes)
    N = SHARDS * CAP
    keys_raw = sum(len(k.encode("utf-8")) for k in g["keys"][:].tolist())
    cache_raw = N * V * D * 2 + N * V * P * 4 + N * 4 + N * 1 + N * 2 * 4 + keys_raw
    bank_raw = K * 2 * 4 + K * D * 2 + 300 + N * V * TOPK * 4 + N * V * TOPK * 2 + N * V * 4
    assert b["cache"]["arrays"]["keys"]["raw"] == keys_raw > len("".join(g["keys"][:].tolist()))
    assert b["cache"]["raw"] == cache_raw and b["bank"]["raw"] == bank_raw
    assert b["cache"]["stored_per_view"] == pytest.approx(cache_files / valid_views)
    assert b["bank"]["raw_per_view"] == pytest.approx(bank_raw / valid_views)
    assert b["per_view"] == b["cache"]["stored_per_view"] and b["raw_per_view"] == 2 * D + 4 * P
    assert b["cache"]["metadata"] == on_disk["zarr.json"] + on_disk["progress"]


def test_describe_and_text_report_cache_and_bank_bytes_apart(small: str) -> None:
    info = describe(small, sample=50)
    text = format_text(info)
    b = info["bytes"]
    assert f"{b['cache']['stored_per_view']:.1f} B stored per view" in text
    assert f"bank bytes   {b['bank']['stored_per_view']:.1f} B stored per view" in text
    assert info["rows"]["valid"] == 104 and info["skipped"]["count"] == 1 and info["sampled_views"] == 50
    mix = info["labels"]                                                     # 4 labels drawn at random per row
    assert mix["labels"] == 4 and not mix["sorted_by_class"] and f"{mix['median_shard']:.0%} of the median shard: shards mixed" in text
    one_class = format_text({**info, "labels": {**mix, "median_shard": 1.0, "sorted_by_class": True}})
    assert "100% of the median shard: shards LOOK SORTED BY CLASS" in one_class
    # the teacher's wait for its input: 3 shards of 0.2 s with 0.07 s of waiting, and 0.03 s before each one
    tot = info["totals"]
    assert (tot["input_wait_seconds"], tot["first_batch_wait_seconds"], tot["stage_seconds"]) == (0.3, 0.09, 0.6)
    assert ("forwards in 0.3 s; waited for its input 0.3 s of 0.7 s (43%: the data path set the pace, "
            "not the teacher)") in text
    fed = format_text({**info, "totals": {**tot, "input_wait_seconds": 0.069}})
    assert "waited for its input 0.1 s of 0.7 s (10%)" in fed
    assert f"not the teacher); its rows written in {tot['write_seconds']:.1f} s\n" in text
    older = format_text({**info, "totals": {**tot, "input_wait_seconds": None, "first_batch_wait_seconds": None,
                                            "write_seconds": None}})
    assert "forwards in 0.3 s\n" in older and "waited" not in older  # records made before the figures
    assert info["views_per_chunk"] == {"embeddings": 1, "bank/indices": 1, "bank/logp": 1}
    assert "chunks       one view deep: a student epoch reads only the view of each row block it uses" in text
    whole = format_text({**info, "views_per_chunk": {"embeddings": V, "bank/indices": V, "bank/logp": 1}})
    assert (f"chunks       embeddings, bank/indices hold {V} views a chunk (made before each view had chunks of its "
            f"own): a student epoch reads up to {V} times the bytes") in whole


def test_bytes_without_a_bank(tmp_path: Path) -> None:
    url = make_cache(str(tmp_path / "c.zarr"), with_bank=False)
    b = describe(url)["bytes"]
    assert "bank" not in b and b["cache"]["stored"] == b["on_disk"] == sum(_walk(url).values())
    assert "no bank" in format_text(describe(url))


def test_sample_rows_are_valid_distinct_and_within_few_blocks(small: str) -> None:
    g = zarr.open_group(small, mode="r")
    rows, views = sample_rows(g, 30, seed=3, blocks=2)
    valid = g["valid"][:]
    assert len(rows) == 30 and len(set(rows.tolist())) == 30 and valid[rows].all()
    assert len(set((rows // CAP).tolist())) <= 2 and ((views >= 0) & (views < V)).all()
    again, _ = sample_rows(g, 30, seed=3, blocks=2)
    assert np.array_equal(rows, again)
    everything, _ = sample_rows(g, 10_000, blocks=SHARDS)
    assert np.array_equal(everything, np.flatnonzero(valid))


def test_nearest_other_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(1)
    z, bank = _unit(37, 8, rng).astype(np.float32), _unit(29, 8, rng).astype(np.float32)
    rows, bank_rows = rng.integers(0, 20, 37), rng.integers(0, 20, 29)
    best, where = nearest_other(z, rows, bank, bank_rows, block=5)
    for i in range(37):
        others = [(float(z[i] @ bank[j]), j) for j in range(29) if bank_rows[j] != rows[i]]
        s, j = max(others)
        assert best[i] == pytest.approx(s, abs=1e-6) and where[i] == j
    lone, at = nearest_other(z[:1], np.array([0]), bank[:1], np.array([0]))   # the only entry is its own image
    assert lone[0] == -np.inf and at[0] == -1


@pytest.mark.parametrize("tau", [1e-4, 0.05, 0.5])
def test_topk_profile_against_the_full_distribution(tau: float) -> None:
    """Mass after rank r and mean p_T at r, from the stored float16 top-k, equal those of the full softmax."""
    rng = np.random.default_rng(2)
    n, width, k = 50, 200, 10
    sims = np.clip(rng.normal(0.5, 0.2, (n, width)), -1, 0.999)
    sims[:, 0] = 1.0
    logits = sims / tau
    logp_full = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logp_full, axis=1)[:, :k]
    top = np.take_along_axis(logp_full, order, axis=1)
    stored = top.astype(np.float16)
    mass = np.exp(top).sum(axis=1).astype(np.float32)
    prof = topk_profile(np.concatenate([stored, np.full((3, k), np.nan, np.float16)]),    # 3 views without targets
                        np.concatenate([mass, np.full(3, np.nan, np.float32)]))
    p_sorted = np.exp(-np.sort(-logp_full, axis=1))
    after = 1 - np.cumsum(p_sorted, axis=1)[:, :k]
    assert prof["views"] == n and prof["rank"].tolist() == list(range(1, k + 1))
    assert np.allclose(prof["mean"], p_sorted[:, :k].mean(axis=0), rtol=2e-2, atol=1e-7)
    assert np.allclose(prof["beyond"], np.maximum(after, 0).mean(axis=0), rtol=2e-2, atol=1e-7)
    assert prof["captured"] == pytest.approx(float(mass.mean()), abs=1e-6)
    assert np.allclose(prof["logp_p50"], np.median(top, axis=0), rtol=2e-3, atol=2e-3)


def test_plots_write_the_informative_pngs(small: str, tmp_path: Path) -> None:
    written = plots(small, str(tmp_path / "plots"), sample=200)
    assert sorted(Path(p).name for p in written) == ["margin.png", "neighbour_similarity.png", "pca.png", "topk_mass.png"]
    for p in written:
        with Image.open(p) as im:
            im.verify()
    bare = make_cache(str(tmp_path / "bare.zarr"), with_bank=False)
    assert sorted(Path(p).name for p in plots(bare, str(tmp_path / "bare-plots"))) == ["neighbour_similarity.png", "pca.png"]
    # the same folder as a cache with a bank: its bank plots would look like this cache's; they are removed
    again = plots(bare, str(tmp_path / "plots"))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(Path(p).name for p in again)


def test_a_damaged_zarr_json_or_keys_chunk_is_one_line_and_a_damaged_neighbour_does_not_hide_the_others(
        small: str, tmp_path: Path) -> None:
    """A cache copied short (its zarr.json cut) or with a flipped byte in its keys: ``seed inspect`` says which
    file in one line (before: a JSONDecodeError or checksum traceback); and the list of caches ``require_cache``
    gives when the asked-for one is missing still names the others."""
    import shutil

    from seed.config import load_config, require_cache
    from seed.errors import SeedError
    from seed.storage import Storage

    caches = tmp_path / "caches"
    cut, flipped = caches / "cut.zarr", caches / "flipped.zarr"
    shutil.copytree(small, cut)
    shutil.copytree(small, flipped)
    text = (cut / "zarr.json").read_text()
    (cut / "zarr.json").write_text(text[: len(text) // 2])
    with pytest.raises(SeedError, match=r"cut\.zarr: its zarr\.json cannot be read as Zarr metadata .*damaged"):
        describe(str(cut))
    chunk = next(p for p in sorted((flipped / "keys" / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(SeedError, match=r"keys: a chunk of rows .* does not match its checksum"):
        describe(str(flipped))
    storage = Storage(shards=str(tmp_path), caches=str(caches), runs=str(tmp_path), reports=str(tmp_path))
    with pytest.raises(SeedError, match=r"no cache at .*absent\.zarr.*cut\.zarr \(its zarr\.json is damaged\).*flipped\.zarr \(complete"):
        require_cache(load_config(None, ["cache.name=absent"]), storage)
