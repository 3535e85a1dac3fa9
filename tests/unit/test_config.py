"""Config and storage: defaults, YAML, overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from seed.config import RunConfig, load_config, to_dict
from seed.errors import SeedError
from seed.storage import load_storage


def test_defaults_are_seed_paper_values() -> None:
    cfg = load_config(None)
    assert cfg.bank.tau_t == 1e-4 and cfg.cache.recipe.crop_scale == (0.2, 1.0)
    assert cfg.cache.recipe.brightness == 0.4 and cfg.cache.recipe.hue == 0.1 and cfg.cache.recipe.grayscale_p == 0.2


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("teacher:\n  arch: resnet18\ncache:\n  views: 8\n  recipe:\n    crop_scale: [0.3, 1.0]\n")
    cfg = load_config(path, ["cache.views=2", "bank.tau_t=0.01"])
    assert (cfg.teacher.arch, cfg.cache.views, cfg.bank.tau_t, cfg.cache.recipe.crop_scale) == ("resnet18", 2, 0.01, (0.3, 1.0))
    assert load_config(None, []).cache.views == 4
    assert RunConfig() == load_config(None) and to_dict(cfg)["cache"]["recipe"]["crop_scale"] == [0.3, 1.0]


@pytest.mark.parametrize("override,message", [
    ("cache.viewz=2", "unknown config key cache.viewz"),
    ("cache.views=two", "cache.views: expected an integer"),
    ("cache.views=0", "cache.views must be > 0"),
    ("teacher.output=logits", "teacher.output: expected one of"),
    ("cache.recipe.jitter_p=2", "jitter_p must be a probability"),
    ("cache.recipe.crop_scale=[0.2]", "cache.recipe.crop_scale: expected a list of 2"),
    ("bank.tau_t=0", "bank.tau_t must be > 0"),
    ("nonsense", "section.field=value"),
])
def test_bad_fields_are_named(override: str, message: str) -> None:
    with pytest.raises(SeedError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SeedError, match="mapping"):
        load_config(bad)


def test_storage_roots(tmp_path: Path) -> None:
    (tmp_path / "storage.yaml").write_text("shards: rel/shards\ncaches: s3://bucket/caches\n")
    s = load_storage(str(tmp_path / "storage.yaml"))
    assert s.shards == str(tmp_path / "rel" / "shards") and s.caches == "s3://bucket/caches"
    assert s.runs == str(tmp_path / "data" / "runs")
    assert s.resolve("caches", "x.zarr") == "s3://bucket/caches/x.zarr"
    assert s.resolve("shards", "/abs/x.tar") == "/abs/x.tar"
    (tmp_path / "bad.yaml").write_text("shardz: x\n")
    with pytest.raises(SeedError, match="unknown storage root"):
        load_storage(str(tmp_path / "bad.yaml"))
    with pytest.raises(SeedError, match="storage file not found"):
        load_storage(str(tmp_path / "missing.yaml"))
