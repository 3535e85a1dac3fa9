"""The cache's completion records: what a process killed while writing them leaves behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from seed import cache
from seed.errors import SeedError


def _cache(url: str) -> object:
    return cache.create(url, fields={"test": 1}, capacity=4, n_shards=2, views=1, dim=2, attrs={})


def _rows() -> dict[str, np.ndarray]:
    """One shard's rows of a cache made by ``_cache``."""
    return {"embeddings": np.zeros((4, 1, 2), np.float16), "augment": np.zeros((4, 1, cache.P), np.float32),
            "keys": np.array(["a", "b", "c", "d"], dtype=object), "labels": np.zeros(4, np.int32),
            "valid": np.ones(4, bool), "sizes": np.ones((4, 2), np.int32)}


def test_a_record_counts_as_soon_as_its_own_file_is_written(tmp_path: Path) -> None:
    """A shard's record is one atomic file write (zarr's local store writes a temporary file and renames it).
    A process killed right after that write, before any other, must leave the shard done: the records'
    parent group exists from the cache's creation, so no second write is needed for the record to be seen.
    (Made with the first record, the parent's metadata was written beside the child's; a kill between the
    two left a record no reader saw.)"""
    made = str(tmp_path / "made.zarr")
    group = _cache(made)
    data = _rows()
    cache.write_shard(group, 0, data, {"samples": 4})
    killed = str(tmp_path / "killed.zarr")
    _cache(killed)                                                            # a cache whose writer then died
    record = Path(cache.progress_name(0), "zarr.json")
    (Path(killed) / record).parent.mkdir(parents=True)
    shutil.copy(Path(made) / record, Path(killed) / record)                  # the record's file alone
    assert cache.done_shards(cache.open_group(killed)) == [0]
    stored = cache.shard_record(cache.open_group(killed), 0)
    assert stored is not None and stored.pop("write_seconds") >= 0 and stored == {"samples": 4, "done": True}
    assert cache.done_shards(cache.open_group(made)) == [0]


def test_a_record_left_empty_by_a_host_crash_counts_as_not_done_and_is_rewritten(tmp_path: Path, caplog) -> None:
    """A host that loses power can leave a renamed, never-flushed record empty: that shard counts as not done
    (named in a warning) instead of every later run failing to parse it; writing the shard again replaces it."""
    url = str(tmp_path / "c.zarr")
    group = _cache(url)
    for shard in (0, 1):
        cache.write_shard(group, shard, _rows(), {"samples": 4})
    (Path(url) / cache.progress_name(1) / "zarr.json").write_text("")
    group = cache.open_group(url)
    with caplog.at_level("WARNING", logger="seed.cache"):
        assert cache.done_shards(group) == [0] and cache.shard_record(group, 1) is None
    assert "the completion record of shard 1 (progress/000001) does not parse" in caplog.text
    assert cache.listed_records(url) == {0, 1}  # a listing reads no record (run_processes' progress polls it)
    assert cache.listed_records(str(tmp_path / "none.zarr")) == set()
    cache.write_shard(cache.open_group(url, "r+"), 1, _rows(), {"samples": 4})
    assert cache.done_shards(cache.open_group(url)) == [0, 1]


def test_a_cache_made_again_has_a_new_revision_which_its_bank_names(tmp_path: Path) -> None:
    """Made again with ``--overwrite`` under the same configuration, or with shards taken back to embed again,
    a cache gets a new revision: its fingerprint (the configuration) stays, the bank's fields change, so a bank
    of the old rows is not current. A cache made before revisions keeps its bank's fields until it gets one."""
    from seed import bank_store
    from seed.config import BankConfig

    url = str(tmp_path / "c.zarr")
    first = cache.attributes(_cache(url))
    again = cache.create(url, fields={"test": 1}, capacity=4, n_shards=2, views=1, dim=2, attrs={}, overwrite=True)
    second = cache.attributes(again)
    assert first["fingerprint"] == second["fingerprint"] and first["revision"] != second["revision"]
    b = BankConfig()
    assert bank_store.fields(again, b)["cache_revision"] == second["revision"]

    data = _rows()
    cache.write_shard(again, 0, data, {"samples": 4, "damaged": {"read": 4}})
    before = bank_store.fields(again, b)
    cache.reopen_shards(again, [0], "repaired")
    assert cache.done_shards(again) == [] and cache.attributes(again)["status"] == "incomplete"
    assert cache.attributes(again)["reopened"][0]["damaged"] == {"read": 4}
    assert bank_store.fields(again, b)["cache_revision"] != before["cache_revision"]

    old = cache.create(str(tmp_path / "old.zarr"), fields={"test": 1}, capacity=4, n_shards=2, views=1, dim=2, attrs={})
    del old.attrs["revision"]                                                  # as a cache made before revisions
    assert "cache_revision" not in bank_store.fields(cache.open_group(str(tmp_path / "old.zarr")), b)


def test_a_reopen_killed_before_the_records_went_is_not_written_into_the_history_twice(tmp_path: Path) -> None:
    """``reopen_shards`` writes the root's history, then removes the records: killed in between, the next run
    reopens the same record again, and the history keeps one entry for it; a later damage of the shard, a record
    of its own, gets its own entry."""
    group = _cache(str(tmp_path / "c.zarr"))
    record = {"samples": 4, "damaged": {"read": 2}, "finished_at": 1.0}
    for _ in range(2):                                                         # the records outlived the first
        cache.write_shard(group, 0, _rows(), record)
        cache.reopen_shards(group, [0], "repaired")
    cache.write_shard(group, 0, _rows(), {**record, "finished_at": 2.0})       # damaged again, later
    cache.reopen_shards(group, [0], "repaired")
    assert [(h["shard"], h["finished_at"]) for h in cache.attributes(group)["reopened"]] == [(0, 1.0), (0, 2.0)]
    assert cache.done_shards(group) == []


def test_metadata_a_killed_writer_left_half_written_is_removed_once_stale(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """zarr's local store writes ``zarr.<id>.partial`` and renames it: a kill between the two leaves the file, and
    zarr warns about it at every listing of its group. Stale ones go (with a shard directory left empty, and a data
    chunk's ``<chunk>.<id>.partial``); a live writer's fresh one stays, in a shard's directory, beside a chunk and
    in the root, where every record's write makes one for a moment."""
    import os
    import time
    import warnings

    url = str(tmp_path / "c.zarr")
    group = _cache(url)
    data = _rows()
    cache.write_shard(group, 0, data, {"samples": 4})
    root = Path(url)
    for shard in ("000001", "000002", "000003"):
        (root / "progress" / shard).mkdir()
    chunk = next(p for p in (root / "embeddings" / "c").rglob("*") if p.is_file())  # shard 0's rows
    stale = [root / "zarr.a.partial", root / "progress" / "zarr.b.partial", root / "progress" / "000001" / "zarr.c.partial",
             chunk.with_suffix(".g.partial")]
    fresh = [root / "progress" / "000000" / "zarr.d.partial", root / "zarr.e.partial", chunk.with_suffix(".h.partial")]
    stuck = root / "progress" / "zarr.f.partial"                              # stale, and cannot be unlinked
    stuck.mkdir()
    old = time.time() - 2 * cache.STALE_PARTIAL_S
    for path in [*stale, *fresh]:
        path.write_text("{")
    for path in [*stale, stuck, root / "progress" / "000002"]:               # 000002: an old empty directory,
        os.utime(path, (old, old))                                            # 000003: a writer's, just made

    def warned() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = cache.open_group(url, "r")
            assert cache.done_shards(g) == [0]
            list(g.groups())
        return [str(w.message) for w in caught]

    assert any("zarr.b.partial" in w for w in warned()) and any("000001" in w for w in warned())
    with caplog.at_level("WARNING", logger="seed.cache"):
        assert cache.remove_stale_partials(url) == 4
    assert "could not remove" in caplog.text and "progress/zarr.f.partial" in caplog.text
    assert not any(p.exists() for p in stale) and all(p.exists() for p in fresh)
    assert sorted(p.name for p in (root / "progress").iterdir()) == ["000000", "000003", "zarr.f.partial", "zarr.json"]
    for path in (fresh[1], root / "progress" / "000003", stuck):             # (their writers would finish them)
        path.rmdir() if path.is_dir() else path.unlink()
    assert warned() == []


def test_a_cache_named_by_a_file_url_is_the_cache_at_its_path(tmp_path: Path) -> None:
    """``file://`` roots in storage.yaml name local caches: a new one is laid out (before, zarr opened the URL
    through fsspec, which made no directories, and creation failed), and it is the cache at the plain path."""
    url = f"file://{tmp_path}/new/c.zarr"
    group = _cache(url)
    cache.write_shard(group, 1, _rows(), {"samples": 4})
    assert cache.exists(url) and cache.done_shards(cache.open_group(str(tmp_path / "new" / "c.zarr"))) == [1]
    assert cache.attributes(cache.open_group(url))["status"] == "incomplete"


def test_an_array_of_a_cache_named_as_the_cache_is_refused_in_one_line(tmp_path: Path) -> None:
    """``seed inspect data/caches/demo.zarr/embeddings``: the path of one of the cache's arrays, not a traceback."""
    _cache(str(tmp_path / "c.zarr"))
    with pytest.raises(SeedError, match=r"c.zarr/embeddings is an array .* not a cache: expected the cache's directory"):
        cache.open_group(str(tmp_path / "c.zarr" / "embeddings"))


def test_a_creator_killed_while_laying_out_the_cache_does_not_block_the_next_run(tmp_path: Path) -> None:
    """A teacher stage killed between the cache's first attribute and its last array leaves a cache whose status
    is ``creating`` and its ``.<name>.creating`` file. While the creator lives (its lock held: here, this test's
    descriptor), the next caller waits and then says so; once it is gone (the kernel releases its lock: here, the
    descriptor closed) the next caller lays the cache out again at once. A dead creator's cache of another
    configuration is refused, naming the field, as any other cache is."""
    import fcntl
    import os

    import zarr

    url = str(tmp_path / "c.zarr")
    half = zarr.open_group(url, mode="w-", attributes={"format": cache.FORMAT, "format_version": cache.FORMAT_VERSION,
                                                        "status": "creating", "fingerprint": cache.fingerprint({"test": 1}),
                                                        "fingerprint_fields": {"test": 1}})
    half.create_array("embeddings", shape=(8, 1, 2), dtype="float16", chunks=(4, 1, 2))  # the rest never came
    claim = tmp_path / ".c.zarr.creating"
    creator = os.open(claim, os.O_CREAT | os.O_RDWR)
    fcntl.flock(creator, fcntl.LOCK_EX)
    with pytest.raises(SeedError, match=r"c\.zarr: cache still being created by another process after 0 s .*use --overwrite"):
        cache.create(url, fields={"test": 1}, capacity=4, n_shards=2, views=1, dim=2, attrs={}, wait_s=0.3)
    os.close(creator)                                                          # the creator dies

    group = _cache(url)
    assert cache.attributes(group)["status"] == "incomplete"
    assert {name for name, _ in group.arrays()} == {"embeddings", "augment", "keys", "labels", "valid", "sizes"}
    cache.write_shard(group, 1, _rows(), {"samples": 4})                      # a usable cache
    assert cache.done_shards(cache.open_group(url)) == [1] and not claim.exists()
    assert cache.attributes(_cache(url))["revision"] == cache.attributes(group)["revision"]  # opened, not made again

    other = str(tmp_path / "o.zarr")
    zarr.open_group(other, mode="w-", attributes={"format": cache.FORMAT, "format_version": cache.FORMAT_VERSION,
                                                  "status": "creating", "fingerprint": cache.fingerprint({"test": 2}),
                                                  "fingerprint_fields": {"test": 2}})
    with pytest.raises(SeedError, match=r"different configuration.*test"):
        _cache(other)


def test_read_pairs_reads_one_view_of_given_rows_from_only_their_chunks(tmp_path: Path) -> None:
    """``read_pairs`` gives ``embeddings[rows[i], views[i]]`` in the order asked (repeats, any shard order), as numpy's
    fancy indexing does, without reading the chunks of views nobody asked for: those are damaged here."""
    url = str(tmp_path / "c.zarr")
    group = cache.create(url, fields={"test": 2}, capacity=4, n_shards=3, views=3, dim=5, attrs={})
    full = np.random.default_rng(0).standard_normal((12, 3, 5)).astype(np.float16)
    for s in range(3):
        rows = {**_rows(), "embeddings": full[4 * s:4 * (s + 1)], "augment": np.zeros((4, 3, cache.P), np.float32)}
        cache.write_shard(group, s, rows, {"samples": 4})
    rows, views = np.array([9, 1, 9, 4, 0, 11, 1]), np.array([2, 0, 0, 1, 0, 2, 0])
    np.testing.assert_array_equal(cache.read_pairs(group, "embeddings", rows, views), full[rows, views])
    assert cache.read_pairs(group, "embeddings", rows[:0], views[:0]).shape == (0, 5)
    unasked = tmp_path / "c.zarr" / "embeddings" / "c" / "2" / "1" / "0"    # rows 8-11, view 1
    data = bytearray(unasked.read_bytes())
    data[0] ^= 0xFF
    unasked.write_bytes(bytes(data))
    np.testing.assert_array_equal(cache.read_pairs(group, "embeddings", rows, views), full[rows, views])
    with pytest.raises(SeedError, match="does not match its checksum"):
        cache.read_pairs(group, "embeddings", np.array([10]), np.array([1]))


def test_a_bank_whose_metadata_was_cut_is_named_to_readers_and_removed_by_the_bank_stage(tmp_path: Path) -> None:
    """A store whose writes are not atomic leaves an empty ``zarr.json`` where the disk filled as it was written.
    Readers of the bank get one line naming it; ``drop_unreadable`` (the bank stage, first) removes the rotations
    whose own or whose arrays' metadata does not parse, and leaves the others."""
    from seed import bank_store

    url = str(tmp_path / "c.zarr")
    group = _cache(url)
    for name in ("bank", "bank-1", "bank-2"):
        node = group.create_group(name, attributes={"status": "building"})
        node.create_array("ids", shape=(2, 2), dtype="int32")
    (tmp_path / "c.zarr" / "bank" / "zarr.json").write_bytes(b"")
    (tmp_path / "c.zarr" / "bank-2" / "ids" / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_')
    with pytest.raises(SeedError, match=r"c.zarr/bank: the bank's metadata does not parse .* run the bank stage again"):
        bank_store.is_complete(cache.open_group(url, "r"))
    group = cache.open_group(url, "r+")
    assert bank_store.drop_unreadable(group) == ["bank", "bank-2"]
    assert sorted(n for n, _ in group.groups()) == ["bank-1", "progress"] and not bank_store.is_complete(group)
    assert bank_store.drop_unreadable(group) == []
    group.create_group("bank-3", attributes={"status": "building"})                # past a gap
    (tmp_path / "c.zarr" / "bank-3" / "zarr.json").write_bytes(b"")
    assert bank_store.drop_unreadable(group) == ["bank-3"]


def test_arrays_that_keep_every_view_of_a_row_in_one_chunk_are_named(tmp_path: Path) -> None:
    """A cache made now chunks its embeddings one view deep; one made before kept all V views of a row in a chunk
    (a student reads V times the bytes of its view there: the stage warns, naming the arrays). One view alone, or
    ``[rows]`` arrays, are not such arrays."""
    group = cache.create(str(tmp_path / "c.zarr"), fields={"test": 2}, capacity=4, n_shards=2, views=3, dim=5, attrs={})
    assert cache.views_in_one_chunk({n: cache.array(group, n) for n in ("embeddings", "valid")}) == []
    assert cache.views_in_one_chunk({"augment": cache.array(group, "augment")}) == ["augment"]  # a few floats a view
    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    arrays = {"embeddings": old.create_array("embeddings", shape=(8, 3, 5), chunks=(4, 3, 5), dtype="float16"),
              "bank/indices": old.create_array("indices", shape=(8, 3, 2), chunks=(4, 3, 2), dtype="int32"),
              "one view": old.create_array("one", shape=(8, 1, 5), chunks=(4, 1, 5), dtype="float16"),
              "valid": old.create_array("valid", shape=(8,), chunks=(4,), dtype="bool")}
    assert cache.views_in_one_chunk(arrays) == ["embeddings", "bank/indices"]
