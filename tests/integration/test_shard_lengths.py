"""Third-party shards (no ``_info.json``) are counted once per storage, not once per process."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from pipeline import teacher as stage
from seed.errors import SeedError
from seed.teachers import load_teacher
from tests.conftest import make_storage, small_config
from tests.unit.test_shards import tar_opens

def _drop_last_samples(path: Path, n: int) -> None:
    """Rewrite a Fashion-MNIST shard without its last ``n`` samples (each is ``KEY.png`` + ``KEY.cls``)."""
    old = path.stat().st_mtime_ns
    with tarfile.open(path) as src:
        members = [(m, f.read() if (f := src.extractfile(m)) else b"") for m in src.getmembers()]
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m, data in members[: len(members) - 2 * n]:
            dst.addfile(m, io.BytesIO(data))
    os.replace(tmp, path)
    if path.stat().st_mtime_ns == old:  # a filesystem with coarse timestamps
        os.utime(path, ns=(old, old + 1_000_000_000))


def test_third_party_shards_are_counted_once_and_a_changed_one_is_named(tmp_path: Path, shards_root: Path,
                                                                        moco_checkpoint: Path) -> None:
    (tmp_path / "third").mkdir()
    for i in range(3):  # copied without the _info.json our writer puts beside them
        shutil.copy(shards_root / "fm" / "train" / f"train-{i:06d}.tar", tmp_path / "third")
    cfg = small_config(moco_checkpoint, shards="third/train-{000000..000002}.tar")
    storage = make_storage(tmp_path, tmp_path)
    with tar_opens() as opened:
        plan = stage.make_plan(cfg, storage)
    assert plan.lengths == (100, 100, 100)
    assert Counter(opened) == {f"train-{i:06d}.tar": 1 for i in range(3)}
    assert Path(storage.shard_lengths_record()).is_file()
    with tar_opens() as opened:  # the next plan (another process, a --shards worker) reads no tar
        assert stage.make_plan(cfg, storage) == plan
    assert opened == []

    stage.prepare(cfg, storage, *load_teacher(cfg.teacher))  # a cache made from 3 x 100 samples
    _drop_last_samples(tmp_path / "third" / "train-000001.tar", 2)
    with tar_opens() as opened, pytest.raises(SeedError) as refused:
        stage.make_plan(cfg, storage, check_cache=True)
    assert opened == ["train-000001.tar"]
    assert "shard train-000001.tar had 100 samples when the cache was made, now 98" in str(refused.value)
    assert "train-000000" not in str(refused.value) and "train-000002" not in str(refused.value)
    with tar_opens() as opened, pytest.raises(SeedError, match=r"shard train-000001\.tar had 100 samples when the cache was made, now 98"):
        stage.prepare(cfg, storage, *load_teacher(cfg.teacher))  # the stage refuses the cache
    assert opened == []  # the recount was recorded
    assert stage.make_plan(cfg, storage).lengths == (100, 98, 100)
