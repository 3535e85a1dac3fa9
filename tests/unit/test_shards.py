"""Shards: Fashion-MNIST conversion against the source files, foreign tars, URLs, and bad input."""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import os
import shutil
import struct
import sys
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from pipeline.cli import main
from seed.errors import SeedError
from seed.shards import (FASHION_MNIST_DIR, RECORD_FORMAT, DamagedShard, count_samples, damage_handler, decode_image,
                         expand_urls,
                         fashion_mnist_to_shards, headers_read, imagefolder_to_shards,
                         iter_shard, read_idx, shard_lengths)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _encoded(fmt: str, value: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (20, 12), value if mode == "L" else (value, 255 - value, value // 2)).save(buf, format=fmt)
    return buf.getvalue()


def foreign_tar(path: Path) -> Path:
    """A shard written with the plain tarfile module, the way other tools pack ImageNet."""
    with tarfile.open(path, "w") as tar:
        _add(tar, "n01440764_10026.JPEG", _encoded("JPEG", 100))
        _add(tar, "n01440764_10026.cls", b"7\n")
        _add(tar, "sub/dir/img_b.png", _encoded("PNG", 40, "L"))
        _add(tar, "sub/dir/img_b.json", json.dumps({"label": 3, "synset": "n0"}).encode())
        _add(tar, "img_c.webp", _encoded("WEBP", 200))
        _add(tar, "img_d.jpeg", _encoded("JPEG", 10))
        _add(tar, "img_d.cls", b"1")
    return path


def test_reads_shards_written_by_other_tools(tmp_path: Path) -> None:
    samples = list(iter_shard(str(foreign_tar(tmp_path / "foreign.tar"))))
    assert [s.key for s in samples] == ["n01440764_10026", "sub/dir/img_b", "img_c", "img_d"]
    assert [s.label for s in samples] == [7, 3, -1, 1]
    assert [s.ext for s in samples] == ["jpeg", "png", "webp", "jpeg"]
    assert [s.index for s in samples] == [0, 1, 2, 3]
    images = [decode_image(s) for s in samples]
    assert all(im.shape == (3, 12, 20) and im.dtype == torch.uint8 for im in images)
    assert (images[1] == 40).all()  # lossless grayscale PNG, replicated to 3 channels


def _damage(tar: bytes) -> dict[str, bytes]:
    """The ways a copy goes wrong, each applied to a good tar: cuts at every kind of place, a header
    that does not parse, data after the end."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:  # (header offset, data offset, size) of each member
        members = [(m.offset, m.offset_data, m.size) for m in t.getmembers()]
    (_, d2, n2), (h3, _, _) = members[2], members[3]
    end = members[-1][1] + members[-1][2]
    return {
        "cut inside a member's data": tar[: d2 + n2 // 2],
        "cut inside a header": tar[: h3 + 100],
        "cut exactly at a header": tar[:h3],
        "cut after the last member, before the end marker": tar[: -(-end // 512) * 512],
        "cut inside the end marker": tar[: -(-end // 512) * 512 + 512],
        "a header that does not parse": tar[:h3] + b"\x07" * 512 + tar[h3 + 512:],
        "data after the end": tar + b"trailing garbage" * 64,
    }


@pytest.mark.parametrize("how", ["cut inside a member's data", "cut inside a header", "cut exactly at a header",
                                 "cut after the last member, before the end marker", "cut inside the end marker",
                                 "a header that does not parse", "data after the end"])
def test_a_damaged_shard_is_named_never_read_short(tmp_path: Path, how: str) -> None:
    good = foreign_tar(tmp_path / "good.tar").read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(_damage(good)[how])
    with pytest.raises(DamagedShard, match=rf"{bad}: damaged tar shard.*copy the shard again, leave it out of "
                                           "data.train, or set data.damaged=keep"):
        list(iter_shard(str(bad)))
    with pytest.raises(DamagedShard, match="damaged tar shard"):  # counting reads the same way: no short count
        shard_lengths([str(bad)])

    # data.damaged=keep: the samples read whole before the damage, each equal to the good shard's, and the
    # damage reported once (the sample being read when it struck is not handed out half-read)
    whole = list(iter_shard(str(tmp_path / "good.tar")))
    seen: list[DamagedShard] = []
    kept = list(iter_shard(str(bad), damage_handler("keep", seen)))
    assert len(seen) == 1 and seen[0].url == str(bad) and 0 <= seen[0].offset <= len(good)
    assert len(kept) < len(whole)
    assert [(s.key, s.image, s.label) for s in kept] == [(s.key, s.image, s.label) for s in whole[: len(kept)]]
    assert shard_lengths([str(bad)], damaged="keep") == [len(kept)]


def test_a_complete_shard_reads_whatever_its_padding(tmp_path: Path) -> None:
    good = foreign_tar(tmp_path / "good.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(good)) as t:
        last = t.getmembers()[-1]
    end = -(-(last.offset_data + last.size) // 512) * 512
    for n, data in enumerate([good, good[: end + 1024], good + bytes(4096)]):  # record padding cut or added: zeros
        (tmp_path / f"ok-{n}.tar").write_bytes(data)
        assert [s.key for s in iter_shard(str(tmp_path / f"ok-{n}.tar"))] == ["n01440764_10026", "sub/dir/img_b", "img_c", "img_d"]


def test_brace_patterns_globs_and_fsspec_urls(tmp_path: Path) -> None:
    for i in range(3):
        foreign_tar(tmp_path / f"part-{i:03d}.tar")
    braces = expand_urls(str(tmp_path / "part-{000..002}.tar"))
    assert braces == [str(tmp_path / f"part-{i:03d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "part-*.tar")) == braces
    assert expand_urls(f"{braces[0]}::{braces[2]}") == [braces[0], braces[2]]
    assert shard_lengths(braces) == [4, 4, 4]
    # an in-memory fsspec filesystem stands in for object storage
    mem = fsspec.filesystem("memory")
    mem.pipe("/bucket/shard-000.tar", (tmp_path / "part-000.tar").read_bytes())
    urls = expand_urls("memory://bucket/shard-*.tar")
    assert urls == ["memory:///bucket/shard-000.tar"] or urls == ["memory://bucket/shard-000.tar"]
    assert [s.key for s in iter_shard(urls[0])] == ["n01440764_10026", "sub/dir/img_b", "img_c", "img_d"]
    assert [s.key for s in iter_shard(f"file://{braces[1]}")][-1] == "img_d"
    with pytest.raises(SeedError, match=r"shard pattern '.*part-\{000..002.tar': Unbalanced braces.*expected balanced"):
        expand_urls(str(tmp_path / "part-{000..002.tar"))


def test_empty_and_truncated_tars_give_clear_errors(tmp_path: Path) -> None:
    good = foreign_tar(tmp_path / "good.tar").read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good[: len(good) // 2 + 100])
    with pytest.raises(SeedError, match="truncated.tar"):
        list(iter_shard(str(truncated)))
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    assert list(iter_shard(str(empty))) == []
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    with pytest.raises(SeedError, match="zero.tar"):
        list(iter_shard(str(zero)))
    with pytest.raises(SeedError, match="shard not found"):
        list(iter_shard(str(tmp_path / "missing.tar")))


def test_undecodable_image_is_reported_with_reason(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        _add(tar, "ok.png", _encoded("PNG", 3))
        _add(tar, "broken.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg")
        _add(tar, "nolabel_noimage.cls", b"2")
    samples = list(iter_shard(str(tmp_path / "bad.tar")))
    assert [s.key for s in samples] == ["ok", "broken", "nolabel_noimage"]
    decode_image(samples[0])
    with pytest.raises(ValueError, match="does not decode"):
        decode_image(samples[1])
    with pytest.raises(ValueError, match="no image member"):
        decode_image(samples[2])


def _write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - truncate])


def _fake_source(root: Path, truncate: int = 0) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), truncate)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def test_truncated_idx_is_refused_and_leaves_no_output(tmp_path: Path) -> None:
    src = _fake_source(tmp_path / "src", truncate=100)
    out = tmp_path / "out"
    with pytest.raises(SeedError, match="train-images-idx3-ubyte.gz: truncated"):
        fashion_mnist_to_shards(str(out), source=str(src), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".seed-shards-*"))
    with pytest.raises(SeedError, match="not found"):
        fashion_mnist_to_shards(str(out), source=str(tmp_path / "nowhere"), progress=False)


def test_shards_limit_per_shard_and_overwrite(tmp_path: Path) -> None:
    src = _fake_source(tmp_path / "src")
    out = tmp_path / "out"
    info = fashion_mnist_to_shards(str(out), source=str(src), per_shard=8, limit=20, progress=False)
    assert info["splits"]["train"]["shard_lengths"] == [8, 8, 4] and info["splits"]["test"]["num_samples"] == 10
    assert read_idx(src / "train-labels-idx1-ubyte.gz")[:20].tolist() == [s.label for u in sorted((out / "train").glob("*.tar")) for s in iter_shard(str(u))]
    with pytest.raises(SeedError, match="--overwrite"):
        fashion_mnist_to_shards(str(out), source=str(src), per_shard=8, limit=20, progress=False)
    fashion_mnist_to_shards(str(out), source=str(src), per_shard=50, progress=False, overwrite=True)
    assert len(list((out / "train").glob("*.tar"))) == 1


def test_imagefolder(tmp_path: Path) -> None:
    for c, values in (("cat", (1, 2)), ("dog", (3,))):
        (tmp_path / "src" / c).mkdir(parents=True)
        for v in values:
            (tmp_path / "src" / c / f"im.{v}.jpg").write_bytes(_encoded("JPEG", v * 50))
    info = imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "out"), progress=False, shuffle=False)
    samples = list(iter_shard(str(tmp_path / "out" / "train" / "train-000000.tar")))
    assert info["classes"] == ["cat", "dog"] and info["order"] == "class by class, as in the tree"
    assert [(s.key, s.label, s.ext) for s in samples] == [("cat_im_1", 0, "jpg"), ("cat_im_2", 0, "jpg"), ("dog_im_3", 1, "jpg")]
    assert samples[2].image == (tmp_path / "src" / "dog" / "im.3.jpg").read_bytes()  # bytes kept as they are
    on_disk = json.loads((tmp_path / "out" / "_info.json").read_text())     # the class names are written down
    assert on_disk["classes"] == ["cat", "dog"] and on_disk["order"] == "class by class, as in the tree"
    # a name too long for a plain tar header is written with an extended one, and read back
    long = "x" * 150
    (tmp_path / "src" / "dog" / f"{long}.jpg").write_bytes(_encoded("JPEG", 9))
    imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "long"), progress=False, shuffle=False)
    assert f"dog_{long}" in [s.key for s in iter_shard(str(tmp_path / "long" / "train" / "train-000000.tar"))]
    # two files that would be one key are refused before anything is written
    (tmp_path / "src" / "cat" / "im.1.png").write_bytes(_encoded("PNG", 7))
    with pytest.raises(SeedError, match=r"im\.1\.jpg and .*im\.1\.png would both be sample 'cat_im_1'"):
        imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "twice"), progress=False)
    assert not (tmp_path / "twice").exists()


def test_imagefolder_skips_files_that_are_not_images_and_names_them(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A tree holds what its extensions claim only mostly: an empty file, a text file named .jpg and a header past
    the pixel limit are left out (each named, in the log and in ``_info.json``), and the rest is written."""
    (tmp_path / "src" / "cat").mkdir(parents=True)
    good = _encoded("JPEG", 40)
    (tmp_path / "src" / "cat" / "good.jpg").write_bytes(good)
    (tmp_path / "src" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "src" / "cat" / "html.jpg").write_bytes(b"<html>404 Not Found</html>")
    bomb = bytearray(_encoded("PNG", 3))
    bomb[16:24] = struct.pack(">II", 20_000, 20_000)           # a header claiming 400 M pixels, its checksum mended
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    (tmp_path / "src" / "cat" / "bomb.png").write_bytes(bytes(bomb))
    with caplog.at_level("WARNING", logger="seed.shards"):
        info = imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "out"), progress=False, shuffle=False)
    samples = list(iter_shard(str(tmp_path / "out" / "train" / "train-000000.tar")))
    assert [(s.key, s.image) for s in samples] == [("cat_good", good)] and info["splits"]["train"]["num_samples"] == 1
    on_disk = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert [Path(s["file"]).name for s in on_disk["skipped"]] == ["bomb.png", "empty.jpg", "html.jpg"]
    assert "over the limit" in on_disk["skipped"][0]["reason"] and "empty" in on_disk["skipped"][1]["reason"]
    # what is written reads: the split records it, so fresh views count its examples (seed.data.FreshViews.over)
    assert headers_read([str(tmp_path / "out" / "train" / "train-000000.tar")])
    assert "does not decode" in on_disk["skipped"][2]["reason"]
    assert "3 of 4 images skipped" in caplog.text and "html.jpg: skipped" in caplog.text
    (tmp_path / "src" / "cat" / "good.jpg").unlink()                 # nothing left: refused, nothing written
    with pytest.raises(SeedError, match="split 'train' has no samples"):
        imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "none"), progress=False)
    assert not (tmp_path / "none").exists()


def test_imagefolder_shuffles_classes_across_shards(tmp_path: Path) -> None:
    """A class-per-folder tree written in its own order gives shards of one class each; by default the
    images go in a seeded order, so each shard holds several classes, every image exactly once, and the
    same seed writes the same shards."""
    classes = ["a", "b", "c", "d"]
    for ci, c in enumerate(classes):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "src" / c / f"{i}.jpg").write_bytes(_encoded("JPEG", 20 * ci + i))

    def shards(name: str, **kw: object) -> list[list[tuple[str, int]]]:
        info = imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / name), per_shard=12, progress=False, **kw)
        assert info["splits"]["train"]["num_samples"] == 48
        return [[(s.key, s.label) for s in iter_shard(str(u))] for u in sorted((tmp_path / name / "train").glob("*.tar"))]

    in_tree = shards("tree", shuffle=False)
    assert [{label for _, label in shard} for shard in in_tree] == [{0}, {1}, {2}, {3}]
    mixed = shards("mixed")
    assert all(len({label for _, label in shard}) >= 3 for shard in mixed)
    assert sorted(k for shard in mixed for k in shard) == sorted(k for shard in in_tree for k in shard)
    assert shards("again") == mixed and shards("other", seed=1) != mixed
    assert all(s.image == (tmp_path / "src" / s.key[0] / f"{s.key[2:]}.jpg").read_bytes()
               for u in (tmp_path / "mixed" / "train").glob("*.tar") for s in iter_shard(str(u)))
    limited = imagefolder_to_shards(str(tmp_path / "src"), str(tmp_path / "few"), limit=8, progress=False)
    assert limited["order"] == "shuffled, seed 0"
    assert len({s.label for s in iter_shard(str(tmp_path / "few" / "train" / "train-000000.tar"))}) >= 3


def test_cli_reports_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["shards", "fashion-mnist", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "seed: error:" in err and "nope" in err
    assert not (tmp_path / "out").exists()


# --- the record of counted shard lengths ----------------------------------------------------

_RECORDERS: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _RECORDERS and isinstance(args[0], str) and args[0].endswith(".tar"):
        _RECORDERS[-1].append(os.path.basename(args[0]))


sys.addaudithook(_audit)  # stays for the process (hooks cannot be removed); idle while nothing records


@contextlib.contextmanager
def tar_opens() -> Iterator[list[str]]:
    """Names of the ``.tar`` files opened inside the block (Python's "open" audit event)."""
    opened: list[str] = []
    _RECORDERS.append(opened)
    try:
        yield opened
    finally:
        _RECORDERS.remove(opened)


def _tar_of(path: Path, n: int) -> Path:
    """Replace ``path`` whole by a shard of ``n`` samples, with a new mtime as a rewrite has."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(n):
            _add(tar, f"s{i}.png", _encoded("PNG", i, "L"))
    os.replace(tmp, path)
    if path.stat().st_mtime_ns == old:  # a filesystem with coarse timestamps
        os.utime(path, ns=(old, old + 1_000_000_000))
    return path


def test_record_counts_each_shard_once(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    urls = [str(foreign_tar(tmp_path / "shards" / f"part-{i:03d}.tar")) for i in range(3)]
    record = str(tmp_path / "caches" / "_shard_lengths.json")  # its directory does not exist yet
    with tar_opens() as opened:
        assert shard_lengths(urls, record=record) == [4, 4, 4]
    assert Counter(opened) == {"part-000.tar": 1, "part-001.tar": 1, "part-002.tar": 1}
    data = json.loads(Path(record).read_text())
    assert data["format"] == RECORD_FORMAT and len(data["shards"]) == 3
    entry = data["shards"][f"file://{urls[1]}"]
    assert entry["samples"] == 4 and entry["identity"]["size"] == Path(urls[1]).stat().st_size and "mtime" in entry["identity"]
    with tar_opens() as opened:  # as another process: everything from the record
        assert shard_lengths(urls, record=record) == [4, 4, 4]
        assert shard_lengths([f"file://{u}" for u in urls], record=record) == [4, 4, 4]  # same files, other spelling
    assert opened == []
    with pytest.raises(SeedError, match="shard not found"):
        shard_lengths([*urls, str(tmp_path / "shards" / "part-003.tar")], record=record)


def test_a_rewritten_shard_is_recounted_alone(tmp_path: Path) -> None:
    urls = [str(_tar_of(tmp_path / f"p-{i}.tar", 3)) for i in range(3)]
    record = str(tmp_path / "lengths.json")
    assert shard_lengths(urls, record=record) == [3, 3, 3]
    _tar_of(tmp_path / "p-1.tar", 2)
    with tar_opens() as opened:
        assert shard_lengths(urls, record=record) == [3, 2, 3]
    assert opened == ["p-1.tar"]
    with tar_opens() as opened:
        assert shard_lengths(urls, record=record) == [3, 2, 3]
    assert opened == []


@pytest.mark.parametrize("content", ["{\"format\": \"seed-shard-len", "[1, 2]", "\udcff", "{\"format\": \"seed-shard-lengths\", "
                                     "\"version\": 1, \"shards\": {\"x\": {\"samples\": \"four\"}}}"])
def test_a_corrupt_record_is_recounted_and_replaced(tmp_path: Path, content: str) -> None:
    urls = [str(_tar_of(tmp_path / f"p-{i}.tar", 2)) for i in range(2)]
    record = tmp_path / "lengths.json"
    record.write_bytes(content.encode("utf-8", "surrogateescape"))
    with tar_opens() as opened:
        assert shard_lengths(urls, record=str(record)) == [2, 2]
    assert sorted(opened) == ["p-0.tar", "p-1.tar"]
    assert json.loads(record.read_text())["format"] == RECORD_FORMAT
    with tar_opens() as opened:
        assert shard_lengths(urls, record=str(record)) == [2, 2]
    assert opened == []
    (tmp_path / "a-file").write_text("")  # a record that cannot be written: counted, not kept, no error
    assert shard_lengths(urls, record=str(tmp_path / "a-file" / "lengths.json")) == [2, 2]


def test_info_json_keeps_priority_and_object_stores_use_their_markers(tmp_path: Path) -> None:
    src = _fake_source(tmp_path / "src")
    fashion_mnist_to_shards(str(tmp_path / "fm"), source=str(src), per_shard=8, limit=20, progress=False)
    urls = expand_urls(str(tmp_path / "fm" / "train" / "train-*.tar"))
    with tar_opens() as opened:
        assert shard_lengths(urls, record=str(tmp_path / "lengths.json")) == [8, 8, 4]
    assert opened == [] and not (tmp_path / "lengths.json").exists()
    # an in-memory fsspec filesystem stands in for object storage, for the shards and the record
    mem = fsspec.filesystem("memory")
    try:
        for i in range(2):
            mem.pipe(f"/lengths-test/s-{i}.tar", _tar_of(tmp_path / f"m-{i}.tar", 3 + i).read_bytes())
        urls = [f"memory://lengths-test/s-{i}.tar" for i in range(2)]
        record = "memory://lengths-test/caches/_shard_lengths.json"
        assert shard_lengths(urls, record=record) == [3, 4]
        entry = json.loads(mem.cat("/lengths-test/caches/_shard_lengths.json"))["shards"]["memory:///lengths-test/s-0.tar"]
        assert entry["samples"] == 3 and set(entry["identity"]) == {"size", "created"}
        mem.pipe("/lengths-test/s-0.tar", _tar_of(tmp_path / "m-0.tar", 5).read_bytes())
        assert shard_lengths(urls, record=record) == [5, 4]
    finally:
        mem.rm("/lengths-test", recursive=True)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, checksum."""
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims ``w`` x ``h`` pixels but holds almost no data (a decompression bomb's header)."""
    import struct
    import zlib

    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))


def test_hostile_images_follow_stated_rules() -> None:
    from seed.shards import MAX_PIXELS, Sample, image_size

    def sample(ext: str, data: bytes) -> Sample:
        return Sample("k", data, ext, 0, "u.tar", 0)

    # refused by name (the stages skip and record them): bombs above the limit, empty members
    for w, h in ((100_000, 100_000), (12_000, 12_000)):
        assert w * h > MAX_PIXELS
        for read in (image_size, decode_image):
            with pytest.raises(ValueError, match=rf"header claims (\d+ x \d+ = )?{w * h:,} pixels, over the limit of"):
                read(sample("png", _png_header(w, h)))
    with pytest.raises(ValueError, match=r"^empty jpg member \(0 bytes\)$"):
        decode_image(sample("jpg", b""))
    with pytest.raises(ValueError, match=r"does not decode: UnidentifiedImageError: cannot identify image file$"):
        decode_image(sample("jpg", b"not an image"))
    # converted: CMYK, palette with alpha and RGBA become RGB (alpha dropped); 16-bit keeps its top 8 bits
    cmyk = io.BytesIO()
    Image.new("CMYK", (9, 7), (0, 0, 0, 0)).save(cmyk, format="JPEG")
    assert decode_image(sample("jpg", cmyk.getvalue())).shape == (3, 7, 9)
    pal = Image.new("P", (9, 7))
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_image(sample("png", buf.getvalue()))[:, 0, 0].tolist() == [10, 20, 30]
    deep = io.BytesIO()
    Image.fromarray(np.full((7, 9), 40_000, np.uint16)).save(deep, format="PNG")
    assert (decode_image(sample("png", deep.getvalue())) == 40_000 >> 8).all()


def test_a_read_the_network_cut_is_the_machines_failure_and_a_tar_that_is_none_the_users(tmp_path: Path) -> None:
    """A connection reset part-way through a shard (object storage, one of a thousand reads) is a ``MachineError``,
    which the flow retries; an unreadable file stays the user's ``SeedError``, which it does not."""
    from seed.errors import MachineError
    from tests.conftest import flaky_url

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i in range(4):
            _add(tar, f"k{i}.png", _encoded("PNG", i))
    with pytest.raises(MachineError, match=r"s\.tar: reading the shard failed \(ConnectionResetError: .*a re-run reads it again"):
        list(iter_shard(flaky_url(tmp_path / "s.tar")))
    (tmp_path / "dir.tar").mkdir()
    with pytest.raises(SeedError) as caught:
        list(iter_shard(str(tmp_path / "dir.tar")))
    assert not isinstance(caught.value, MachineError)


def test_odd_and_repeated_keys(tmp_path: Path) -> None:
    png = _encoded("PNG", 9)
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for name in ("dir/sub/x y.png", "ünï çødé.png", "a.b.c.png", "dup.png", "other.png", "dup.png"):
            _add(tar, name, png)
    samples = list(iter_shard(str(tmp_path / "odd.tar")))
    # keys keep slashes, spaces and non-ASCII; webdataset's rule: the key ends at the first dot of the file name,
    # so "a.b.c.png" is sample "a" with a member "b.c.png" and no image (skipped and recorded by the stages);
    # a key repeated apart is two samples in two rows (rows are positions; the key only seeds the views)
    assert [(s.key, s.ext) for s in samples] == [("dir/sub/x y", "png"), ("ünï çødé", "png"), ("a", ""),
                                                 ("dup", "png"), ("other", "png"), ("dup", "png")]
    assert [s.index for s in samples] == list(range(6))
    # a Latin-1 tar (names that are not UTF-8): the odd byte becomes a \xe9 escape, text a cache can store
    with tarfile.open(tmp_path / "latin.tar", "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
        _add(tar, "café.png", png)
    (latin,) = iter_shard(str(tmp_path / "latin.tar"))
    assert latin.key == "caf\\xe9" and latin.key.encode("utf-8") == b"caf\\xe9"
    with tarfile.open(tmp_path / "twice.tar", "w") as tar:  # one key twice in a row: refused by name
        for name in ("a.png", "a.cls", "a.png"):
            _add(tar, name, png if name.endswith("png") else b"1")
    with pytest.raises(SeedError, match=r"member 'a.png' appears twice in one sample"):
        list(iter_shard(str(tmp_path / "twice.tar")))


def test_a_killed_conversions_build_directory_is_removed_by_the_next(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from seed import shards

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    left = tmp_path / f".seed-shards-{host}-{dead.pid}-abc123"       # a conversion killed on this host
    live = tmp_path / f".seed-shards-{host}-{os.getpid()}-def456"    # one still running here
    other = tmp_path / f".seed-shards-elsewhere-{dead.pid}-ghi789"   # another host's, on a shared disk
    longer = tmp_path / f".seed-shards-{host}-4190000-{dead.pid}-jkl0"  # host "<this host>-4190000"'s, running
    for d in (left, live, other, longer):
        (d / "train").mkdir(parents=True)
    fashion_mnist_to_shards(str(tmp_path / "fm"), source=shards.FASHION_MNIST_DIR, per_shard=50, limit=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fm", live.name, other.name, longer.name])


def _writers_tars() -> dict[str, bytes]:
    """Tars as writers make them: each of tarfile's formats (pax and GNU add extension headers for long or
    non-ASCII names), every member type, sizes on and off block boundaries, webdataset metadata, gzip."""
    out = {}
    rng = np.random.default_rng(0)
    for label, fmt in (("ustar", tarfile.USTAR_FORMAT), ("gnu", tarfile.GNU_FORMAT), ("pax", tarfile.PAX_FORMAT)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            _add(tar, "__info__", b"{}")
            for i, size in enumerate((100, 0, 511, 512, 513, 3000)):
                _add(tar, f"s{i}.jpg", rng.integers(0, 256, size, dtype=np.uint8).tobytes())
                _add(tar, f"s{i}.cls", str(i).encode())
            for kind in (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.AREGTYPE):
                info = tarfile.TarInfo("v7-directory/" if kind == tarfile.AREGTYPE else f"other-{kind.decode()}")
                info.type, info.linkname = kind, "s0.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                tar.addfile(info)
            _add(tar, "deep/" * 25 + "long.png", b"long name" * 70)              # 133 characters
            if fmt != tarfile.USTAR_FORMAT:
                _add(tar, "n" * 120 + ".png", b"no slash to split at")
            _add(tar, "späť/ü.jpg", b"non-ASCII name")
            if fmt == tarfile.PAX_FORMAT:                                      # records a reader must apply
                info = tarfile.TarInfo("sized.jpg")
                info.size, info.pax_headers = 700, {"size": "700", "comment": "x", "path": "renamed/sized.jpg/"}
                tar.addfile(info, io.BytesIO(b"z" * 700))
            _add(tar, "last.cls", b"9")
        out[label] = buf.getvalue()
    buf = io.BytesIO()
    with TarWriter(buf) as writer:                    # a pax header (its float mtime) before every member
        for i in range(8):
            writer.write({"__key__": f"wds{i}" if i != 5 else "deep/" * 25 + "wds5", "jpg": bytes(range(i * 70 % 256)) * 3,
                          "cls": str(i).encode()})
    out["webdataset"] = buf.getvalue()
    with io.BytesIO() as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(out["pax"])
        out["pax, gzip"] = raw.getvalue()
    return out


def _outcome(reader, data: bytes) -> tuple[list, tuple | None]:
    """The members a reader hands out before it stops, and how it stopped (error type, message, offset)."""
    got: list = []
    try:
        for m in reader(io.BytesIO(data), "shard.tar"):
            got.append((m["fname"], m["data"]))
    except (DamagedShard, tarfile.TarError, EOFError) as exc:
        return got, (type(exc).__name__, str(exc), getattr(exc, "offset", None))
    return got, None


def test_the_plain_tar_reader_reads_what_tarfile_reads() -> None:
    """seed reads uncompressed tars with its own header loop (tarfile's stream reader parses every field in
    Python); tarfile, as the shards were read before, is the reference, for every writer's format."""
    from seed.shards import _tar_members, _tarfile_members

    tars = _writers_tars()
    for label, data in tars.items():
        got, stop = _outcome(_tar_members, data)
        assert (got, stop) == _outcome(_tarfile_members, data), label
        assert stop is None, label
        if label == "webdataset":
            assert len(got) == 16 and got[10][0] == "deep/" * 25 + "wds5.cls"
            continue
        assert len(got) == 15 + (label != "ustar") + label.startswith("pax"), label
        if label.startswith("pax"):                                           # its pax path and size applied
            assert ("renamed/sized.jpg", b"z" * 700) in got
        assert ("deep/" * 25 + "long.png", b"long name" * 70) in got and ("späť/ü.jpg", b"non-ASCII name") in got


def _rchar() -> int:
    """Bytes this process has had from read calls so far (``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_counting_and_labels_seek_over_the_images(tmp_path: Path) -> None:
    """Counting a shard and reading its labels without images read its headers and small members: not the images,
    which at ImageNet sizes are about all of its bytes."""
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(40):
            _add(tar, f"img{i:03d}.jpg", os.urandom(256 << 10))
            _add(tar, f"img{i:03d}.cls", str(i % 7).encode())
    size = path.stat().st_size
    before = _rchar()
    assert count_samples(str(path)) == 40
    assert _rchar() - before < size / 20
    before = _rchar()
    samples = list(iter_shard(str(path), images=False))
    assert _rchar() - before < size / 20
    assert [s.label for s in samples] == [i % 7 for i in range(40)] and all(s.image is None for s in samples)
    before = _rchar()
    assert sum(len(s.image) for s in iter_shard(str(path))) == 40 * (256 << 10)          # with images: all read
    assert _rchar() - before >= 40 * (256 << 10)


def test_a_negative_member_size_is_refused_whether_the_images_are_read_or_seeked_over(tmp_path: Path) -> None:
    """A header with a negative (GNU base-256) size and a valid checksum: reading refuses it; seeking must too,
    not move back and count the same members for ever."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "b.jpg", b"")
        _add(tar, "a.jpg", b"x" * 1024)
    data = bytearray(buf.getvalue())
    at = 512                                                                   # a.jpg's header: -1024 goes back to b.jpg's
    data[at + 124:at + 136] = tarfile.itn(-1024, 12, tarfile.GNU_FORMAT)
    data[at + 148:at + 156] = b"%06o\0 " % tarfile.calc_chksums(bytes(data[at:at + 512]))[0]
    path = tmp_path / "negative.tar"
    path.write_bytes(bytes(data))
    for images in (True, False):
        with pytest.raises(SeedError, match="not a readable tar shard"):
            for _ in itertools.islice(iter_shard(str(path), images=images), 100):  # never 100: it has two members
                pass
    with pytest.raises(SeedError, match="not a readable tar shard"):
        count_samples(str(path))


def test_the_plain_tar_reader_stops_where_tarfile_stops() -> None:
    """Cut anywhere, or one header byte changed anywhere: the same members before the damage, and the same
    error, message and byte offset, as tarfile's reader; the same when it seeks over the images' data."""
    from seed.shards import _image_member, _tar_members, _tarfile_members

    tars = _writers_tars()
    for label in ("ustar", "gnu", "pax", "webdataset"):
        data = tars[label]
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            headers = [m.offset for m in t.getmembers()]
        cases = {f"cut at {n}": data[:n] for n in range(0, len(data), 97)}
        for h in headers[::3]:
            # name, size, checksum, type, magic, prefix; then, after a pax header, its records and the next header
            for at in (0, 100, 124, 130, 148, 156, 257, 345, 512, 514, 520, 530, 1024 + 124, 1024 + 148, 1024 + 156):
                for value in (0x00, 0x37, 0xFF):
                    cases[f"header {h} byte {at} = {value}"] = data[:h + at] + bytes([value]) + data[h + at + 1:]
        for case, bad in cases.items():
            assert _outcome(_tar_members, bad) == _outcome(_tarfile_members, bad), (label, case)
    # seeking over the images (counting, labels): the same members and the same stop, the images' data not read
    seeks = lambda stream, url: _tar_members(stream, url, skip=_image_member)  # noqa: E731
    for label in ("ustar", "gnu", "pax", "webdataset"):
        data = tars[label]
        cases = {f"cut at {n}": data[:n] for n in range(0, len(data), 97)}
        cases["whole"] = data
        for case, bad in cases.items():
            (got, stop), (want, want_stop) = _outcome(seeks, bad), _outcome(_tarfile_members, bad)
            assert [n for n, _ in got] == [n for n, _ in want] and stop == want_stop, (label, case)
            # ``tarfile``, which takes over at GNU long names, reads what it meets
            assert all(d == w or (d is None and _image_member(n)) for (n, d), (_, w) in zip(got, want)), (label, case)
        assert any(d is None for _, d in _outcome(seeks, data)[0]), label
    # a pax size that is not a number: tarfile takes it as 0, and what follows no longer parses
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "a.cls", b"1")
        info = tarfile.TarInfo("b.jpg")
        info.size, info.pax_headers = 3, {"size": "abc"}
        tar.addfile(info, io.BytesIO(b"abc"))
        _add(tar, "c.cls", b"2")
    got, stop = _outcome(_tar_members, buf.getvalue())
    assert (got, stop) == _outcome(_tarfile_members, buf.getvalue()) and stop is not None and stop[0] == "DamagedShard"


def test_plain_pngs_decode_to_the_pixels_pil_gives() -> None:
    """8-bit greyscale and RGB PNGs go to libpng (torchvision), every other image to PIL: the same pixels
    as PIL's, on real Fashion-MNIST images; a plain PNG cut short is refused by name as before."""
    from seed.shards import FASHION_MNIST_DIR, Sample, _plain_png, load_fashion_mnist

    images, _ = load_fashion_mnist(FASHION_MNIST_DIR, "test", 64)

    def png(im: Image.Image, **options: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG", **options)
        return buf.getvalue()

    def sample(data: bytes) -> Sample:
        return Sample("k", data, "png", 0, "u.tar", 0)

    def by_pil(data: bytes) -> torch.Tensor:
        return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)

    def with_colour_chunks(data: bytes, channels: int) -> bytes:
        """gamma, sRGB intent and significant bits after the header: neither decoder applies them."""
        import struct

        return (data[:33] + _png_chunk(b"gAMA", struct.pack(">I", 45455)) + _png_chunk(b"sRGB", b"\0")
                + _png_chunk(b"sBIT", bytes([5] * channels)) + data[33:])

    rgb = np.stack([images[:32], images[32:], 255 - images[:32]], axis=-1)    # 32 colour images made of real ones
    plain = ([png(Image.fromarray(im)) for im in images] + [png(Image.fromarray(im)) for im in rgb]
             + [png(Image.fromarray(images[0]), compress_level=0), png(Image.fromarray(rgb[1]), optimize=True),
                with_colour_chunks(png(Image.fromarray(images[7])), 1), with_colour_chunks(png(Image.fromarray(rgb[7])), 3)])
    for data in plain:
        assert _plain_png(data)
        out = decode_image(sample(data))
        assert out.shape == (3, 28, 28) and out.is_contiguous() and torch.equal(out, by_pil(data))
    jpeg = io.BytesIO()
    Image.fromarray(rgb[2]).save(jpeg, format="JPEG")
    others = {"palette": png(Image.fromarray(rgb[3]).convert("P")), "alpha": png(Image.fromarray(rgb[4]).convert("RGBA")),
              "transparency key": png(Image.fromarray(images[5]), transparency=0),
              "16-bit": png(Image.fromarray(images[6].astype(np.uint16) * 257)), "jpeg": jpeg.getvalue()}
    for name, data in others.items():
        assert not _plain_png(data), name
        assert torch.equal(decode_image(sample(data)), by_pil(data) if name != "16-bit" else torch.from_numpy(
            np.repeat(images[6][None], 3, axis=0))), name
    # sizes from the PNG header chunk, as PIL reads them, for every kind; a header whose checksum is wrong goes to PIL
    from seed.shards import image_size

    tall = png(Image.fromarray(np.zeros((31, 17), np.uint8)))
    for data in [*plain[:3], *others.values(), tall]:
        assert image_size(sample(data)) == Image.open(io.BytesIO(data)).size[::-1]
    bad_crc = tall[:29] + bytes([tall[29] ^ 1]) + tall[30:]
    with pytest.raises(ValueError, match="^png does not decode"):
        image_size(sample(bad_crc))
    cut = plain[40][: len(plain[40]) // 2]                                     # header whole, image data cut
    assert _plain_png(cut)
    with pytest.raises(ValueError, match="^png does not decode"):
        decode_image(sample(cut))


def test_the_class_count_is_recorded_when_shards_are_written_and_read_without_opening_them(tmp_path: Path) -> None:
    """``seed shards`` records each split's ``num_classes`` (largest label + 1) when every sample has a label, and
    supervised pre-training takes it from there instead of reading every shard; shards whose ``_info.json``
    lacks it, or that it does not list, are read as before."""
    from pipeline.pretrain import num_classes
    from seed.shards import _write_split, classes_from_info

    src = _fake_source(tmp_path / "src")
    out = tmp_path / "out"
    info = fashion_mnist_to_shards(str(out), source=str(src), per_shard=8, limit=20, progress=False)
    labels = read_idx(src / "train-labels-idx1-ubyte.gz")[:20]
    assert info["splits"]["train"]["num_classes"] == int(labels.max()) + 1
    urls = sorted(str(u) for u in (out / "train").glob("*.tar"))
    with tar_opens() as opened:
        assert classes_from_info(urls) == num_classes(urls) == int(labels.max()) + 1
        assert classes_from_info(urls[1:]) == int(labels.max()) + 1           # a subset: the split's count
    assert opened == []
    unrecorded = json.loads((out / "train" / "_info.json").read_text())
    del unrecorded["splits"]["train"]["num_classes"]
    (out / "train" / "_info.json").write_text(json.dumps(unrecorded))
    with tar_opens() as opened:
        assert classes_from_info(urls) is None and num_classes(urls) == int(labels.max()) + 1
    assert sorted(opened) == sorted(os.path.basename(u) for u in urls)        # read them all
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    assert "num_classes" not in _write_split(iter([("a", b"x", "png", 3), ("b", b"y", "png", -1)]), unlabelled, "t", 8)


@pytest.mark.parametrize("compress", ["gzip", "bz2", "xz"])
def test_a_tar_cut_short_inside_a_complete_compressed_stream_is_damaged(tmp_path: Path, compress: str) -> None:
    """`tar c | gzip` with tar killed: gzip still ends its stream properly around a cut tar. The tar inside is
    checked for its end marker as an uncompressed one is (before, such a shard read as complete, shorter)."""
    import bz2
    import lzma

    good = _writers_tars()["ustar"]
    with tarfile.open(fileobj=io.BytesIO(good)) as t:
        cut_at = t.getmembers()[6].offset                                   # at a header: nothing looks wrong
    pack = {"gzip": lambda b: gzip.compress(b, mtime=0), "bz2": bz2.compress, "xz": lzma.compress}[compress]
    whole, cut = tmp_path / "whole.tar", tmp_path / "cut.tar"
    whole.write_bytes(pack(good))
    cut.write_bytes(pack(good[:cut_at]))
    assert len(list(iter_shard(str(whole)))) > 3
    with pytest.raises(DamagedShard, match=r"cut.tar: damaged tar shard at byte \d+ after member .*cut short"):
        list(iter_shard(str(cut)))


def test_a_stream_that_returns_short_reads_is_read_whole() -> None:
    """fsspec's HTTP stream (no Content-Length) returns what it has at hand, not what was asked: that is no cut."""
    from seed.shards import _tar_members

    class Trickle:
        def __init__(self, data: bytes):
            self.data, self.at = data, 0

        def read(self, size: int = -1) -> bytes:
            n = len(self.data) - self.at if size < 0 else min(size, 700)
            out, self.at = self.data[self.at:self.at + n], self.at + n
            return out

    for label, data in _writers_tars().items():
        expected = [(m["fname"], m["data"]) for m in _tar_members(io.BytesIO(data), "shard.tar")]
        assert [(m["fname"], m["data"]) for m in _tar_members(Trickle(data), "shard.tar")] == expected, label


def test_published_shards_replace_an_earlier_output_and_reach_an_object_store_whole(tmp_path: Path) -> None:
    from seed import shards

    local = tmp_path / "fm"
    fashion_mnist_to_shards(str(local), source=shards.FASHION_MNIST_DIR, per_shard=50, limit=100)
    first = (local / "train" / "train-000000.tar").read_bytes()
    fashion_mnist_to_shards(str(local), source=shards.FASHION_MNIST_DIR, per_shard=50, limit=100, overwrite=True)
    assert (local / "train" / "train-000000.tar").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]             # the earlier output renamed aside, gone
    url = "memory://publish-test/fm"
    fashion_mnist_to_shards(url, source=shards.FASHION_MNIST_DIR, per_shard=50, limit=100)
    mem = fsspec.filesystem("memory")
    here = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    there = sorted(p.split("/publish-test/fm/", 1)[1] for p in mem.find("/publish-test/fm"))
    assert there == here and mem.cat_file("/publish-test/fm/train/train-000000.tar") == first


def test_json_labels_are_class_indices_or_named_errors(tmp_path: Path) -> None:
    """A .json label of 3, 3.0 or "3" is class 3; true, 2.5 or "cat" is a label that cannot be read (named), not
    class 1 or an unlabelled sample; a .json without a label field leaves the sample unlabelled."""
    def shard(meta: object) -> str:
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as tar:
            _add(tar, "a.png", _encoded("PNG", 1, "L"))
            _add(tar, "a.json", json.dumps(meta).encode())
        return str(path)

    for meta, label in (({"label": 3}, 3), ({"label": 3.0}, 3), ({"cls": "3"}, 3), ({"other": 1}, -1)):
        assert [s.label for s in iter_shard(shard(meta))] == [label], meta
    for meta in ({"label": True}, {"label": 2.5}, {"target": "cat"}):
        with pytest.raises(SeedError, match=r"sample 'a' has an unreadable label .*is not a class index"):
            list(iter_shard(shard(meta)))


def _other_tools_shards(directory: Path, sizes: tuple[int, ...] = (10, 12, 9), bad: str | None = None,
                        unlabelled: str | None = None) -> list[str]:
    """Real Fashion-MNIST images packed with the plain tarfile module (JPEG + .cls), as other tools pack them,
    ``sizes`` samples a shard; ``bad``: the key of a sample whose image is not an image; ``unlabelled``: of one
    without its .cls."""
    from seed.shards import load_fashion_mnist

    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "train", limit=sum(sizes))
    directory.mkdir(parents=True)
    starts = np.cumsum((0, *sizes))
    for s in range(len(sizes)):
        with tarfile.open(directory / f"part-{s:04d}.tar", "w") as tar:
            for i in range(starts[s], starts[s + 1]):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="JPEG", quality=90)
                key = f"img{i:05d}"
                _add(tar, f"{key}.jpg", b"not an image" if key == bad else buf.getvalue())
                if key != unlabelled:
                    _add(tar, f"{key}.cls", str(int(labels[i])).encode())
    return sorted(str(p) for p in directory.glob("*.tar"))


def test_describing_other_tools_shards_records_what_seed_shards_records(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """``seed shards describe`` reads each shard once and writes the ``_info.json`` the stages read instead of
    the tars: the counts they would scan, the class count, and whether every image header reads (the fast
    resume of fresh views); one that does not read is named and the split says so."""
    from seed.shards import classes_from_info, describe_shards, lengths_from_info, load_fashion_mnist

    urls = _other_tools_shards(tmp_path / "clean")
    assert lengths_from_info(urls) is None and not headers_read(urls)
    with caplog.at_level("INFO", logger="seed.shards"):                  # a stage's count says what would spare it
        assert shard_lengths(urls, record=str(tmp_path / "counted.json")) == [10, 12, 9]
    assert "counting the samples of 3 shard(s) no _info.json lists" in caplog.text and "seed shards describe" in caplog.text
    assert main(["shards", "describe", str(tmp_path / "clean"), "--split", "train", "--threads", "1"]) == 0
    assert "train: 31 samples in 3 shards; every image header reads" in capsys.readouterr().out
    counted = [count_samples(u) for u in urls]
    with tar_opens() as opened:
        assert lengths_from_info(urls) == counted == [10, 12, 9]
        assert lengths_from_info(urls[1:]) == [12, 9] and headers_read(urls) and headers_read(urls[1:])
        assert classes_from_info(urls) == int(load_fashion_mnist(FASHION_MNIST_DIR, "train", limit=31)[1].max()) + 1
    assert opened == []                                                    # from the description alone
    stored = shard_lengths(urls, record=str(tmp_path / "record.json"))
    assert stored == [10, 12, 9] and not (tmp_path / "record.json").exists()  # no scan, so nothing to record

    urls = _other_tools_shards(tmp_path / "one-bad", bad="img00014", unlabelled="img00003")
    info = describe_shards(str(tmp_path / "one-bad"), threads=1)
    assert list(info["splits"]) == ["one-bad"] and info["splits"]["one-bad"]["headers_read"] is False
    assert [(u["key"], u["url"]) for u in info["unread"]["one-bad"]] == [("img00014", urls[1])]
    assert lengths_from_info(urls) == [10, 12, 9] and not headers_read(urls)   # counted all the same
    assert "num_classes" not in info["splits"]["one-bad"] and classes_from_info(urls) is None  # a sample unlabelled
    with pytest.raises(SeedError, match="no-such: no such directory"):
        describe_shards(str(tmp_path / "no-such"))
    with pytest.raises(SeedError, match="no tar shards in it"):
        describe_shards(str(tmp_path))


def test_describing_shards_that_have_an_info_json_checks_it_and_keeps_its_fields(tmp_path: Path) -> None:
    """An ``_info.json`` made by another tool (timm's ImageNet shards have one) is replaced only when asked, its
    counts and class count are checked against the shards (a wrong one leaves the file as it was), and its other
    fields stay."""
    from seed.shards import describe_shards

    urls = _other_tools_shards(tmp_path / "wds")
    names = [os.path.basename(u) for u in urls]
    theirs = {"name": "imagenet-1k", "version": "1.0", "splits": {
        "train": {"name": "train", "filenames": names[:2], "shard_lengths": [10, 11], "extra": 1},
        "validation": {"name": "validation", "filenames": names[2:], "num_classes": 1000}}}
    info_file = tmp_path / "wds" / "_info.json"

    def refused(changed: dict, match: str) -> None:
        info_file.write_text(json.dumps(changed))
        with pytest.raises(SeedError, match=match):
            describe_shards(str(tmp_path / "wds"), overwrite=True)
        assert json.loads(info_file.read_text()) == changed                # left as it was

    info_file.write_text(json.dumps(theirs))
    with pytest.raises(SeedError, match="_info.json exists; pass --overwrite"):
        describe_shards(str(tmp_path / "wds"))
    refused(theirs, r"part-0001.tar: .*_info.json says 11 samples, the shard holds 12; nothing")
    short = json.loads(json.dumps(theirs))
    short["splits"]["train"]["shard_lengths"] = [10]
    refused(short, "split 'train': 'shard_lengths' is not a list of 2 integers")
    few = json.loads(json.dumps(theirs))
    few["splits"]["train"] |= {"shard_lengths": [10, 12], "num_classes": 2}
    refused(few, "split 'train' says num_classes 2, its labels go up to")
    gone = json.loads(json.dumps(theirs))
    gone["splits"]["validation"]["filenames"] = []
    refused(gone, "lists no split for 1 shard.*part-0002.tar")
    more = json.loads(json.dumps(theirs))
    more["splits"]["validation"]["filenames"] = [names[2], "part-9999.tar"]
    refused(more, "lists 1 shard.* not here .*part-9999.tar")
    theirs["splits"]["train"]["shard_lengths"] = [10, 12]
    info_file.write_text(json.dumps(theirs))
    describe_shards(str(tmp_path / "wds"), overwrite=True)
    now = json.loads(info_file.read_text())
    assert (now["name"], now["version"], now["splits"]["train"]["extra"]) == ("imagenet-1k", "1.0", 1)
    assert now["splits"]["validation"]["shard_lengths"] == [9] and now["splits"]["validation"]["num_classes"] == 1000
    assert headers_read(urls) and shard_lengths(urls) == [10, 12, 9]


def test_describing_in_threads_writes_what_one_thread_writes(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Shards read four at a time give the description one reader gives; a damaged tar stops it, naming the shard,
    and leaves the description as it was."""
    from seed.shards import describe_shards

    urls = _other_tools_shards(tmp_path / "four", sizes=(15, 7, 12, 9), bad="img00031")
    shutil.copytree(tmp_path / "four", tmp_path / "one")
    assert main(["shards", "describe", str(tmp_path / "four"), "--threads", "4", "--split", "train"]) == 0
    assert (f"train: 43 samples in 4 shards; 1 sample whose image header does not read (first: 'img00031' in "
            f"{urls[2]}: jpg does not decode") in capsys.readouterr().out
    describe_shards(str(tmp_path / "one"), split="train", threads=1)
    four, one = (json.loads((tmp_path / d / "_info.json").read_text()) for d in ("four", "one"))
    assert four["splits"] == one["splits"] and four["splits"]["train"]["shard_lengths"] == [15, 7, 12, 9]
    with tarfile.open(urls[1]) as tar:
        cut = tar.getmembers()[-1].offset_data + 10
    with open(urls[1], "r+b") as f:                                         # cut a shard inside its last member
        f.truncate(cut)
    assert main(["shards", "describe", str(tmp_path / "four"), "--threads", "4", "--overwrite"]) == 2
    assert "part-0001.tar: damaged tar shard" in capsys.readouterr().err
    assert json.loads((tmp_path / "four" / "_info.json").read_text()) == four  # nothing written
