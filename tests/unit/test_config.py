"""Config and storage: defaults, YAML, overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

from seed.config import RunConfig, format_resolved, load_config, require_cache, resolve_config, template, templates, to_dict
from seed.errors import SeedError
from seed.storage import Storage, load_storage


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
    ("cache.recipe.jitter_mode=hsv", "recipe.jitter_mode must be one of sequential, affine, got .hsv."),
    ("cache.recipe.crop_scale=[0.2]", "cache.recipe.crop_scale: expected a list of 2"),
    ("cache.recipe.brightness=.nan", "recipe.brightness must be finite and >= 0, got nan"),
    ("cache.recipe.contrast=.inf", "recipe.contrast must be finite and >= 0, got inf"),
    ("cache.recipe.blur_sigma=[0.1, .inf]", "recipe.blur_sigma must satisfy 0 < min <= max .finite."),
    ("train.checkpoint_steps=-1", "train.checkpoint_steps must be >= 0, got -1"),
    ("train.nproc=-1", r"train.nproc must be >= 0 \(0 = one process per visible GPU\), got -1"),
    ("pretrain.nproc=-2", r"pretrain.nproc must be >= 0 \(0 = one process per visible GPU\), got -2"),
    ("bank.tau_t=0", "bank.tau_t must be > 0"),
    ("bank.tau_t=1e-4x", "bank.tau_t: expected a number, got '1e-4x'"),
    ("bank.rotations=0", "bank.rotations must be > 0, got 0"),
    ("bank.nprobe=0", "bank.nprobe must be > 0"),
    ("bank.kl_sample=-1", "bank.kl_sample must be >= 0"),
    ("train.tau_s=-0.2", "train.tau_s must be > 0, got -0.2"),
    ("train.tau_t=-1e-4", "train.tau_t must be >= 0"),
    ("train.queue=-5", "train.queue must be >= 0"),
    ("pretrain.key_momentum=1.5", "pretrain.key_momentum must be within .0, 1."),
    ("train.optim.weight_decay=-1e-3", "train.optim.weight_decay must be >= 0"),
    ("pretrain.optim.momentum=1", "pretrain.optim.momentum must be within .0, 1."),
    ("train.optim.warmup_epochs=-1", "train.optim.warmup_epochs must be >= 0"),
    ('train.students=[{arch: ""}]', "train.students.0..arch must name a timm architecture, got ''"),
    ("nonsense", "section.field=value"),
    ("=3", "override '=3' names no field before '='"),
])
def test_bad_fields_are_named(override: str, message: str) -> None:
    with pytest.raises(SeedError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_exponents_without_a_dot_are_numbers() -> None:
    """YAML 1.1 reads ``1e-4`` as a string; in a float field it means the number (``1.0e-4`` always did)."""
    cfg = load_config(None, ["bank.tau_t=1e-5", "train.tau_s=2E-1", "train.optim.weight_decay=1e-3"])
    assert (cfg.bank.tau_t, cfg.train.tau_s, cfg.train.optim.weight_decay) == (1e-5, 0.2, 1e-3)
    with pytest.raises(SeedError, match="cache.views: expected an integer, got '1e3'"):
        load_config(None, ["cache.views=1e3"])  # integers stay strict


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SeedError, match="mapping"):
        load_config(bad)
    bad.write_text("train:\n  run: demo\n   tau_s: 0.2\n")  # indented one space too far: a parse error, one line
    with pytest.raises(SeedError) as caught:
        load_config(bad)
    assert str(caught.value) == f"{bad}:3:9: not valid YAML: mapping values are not allowed here"


def test_storage_roots(tmp_path: Path) -> None:
    (tmp_path / "storage.yaml").write_text("shards: rel/shards\ncaches: s3://bucket/caches\n")
    s = load_storage(str(tmp_path / "storage.yaml"))
    assert s.shards == str(tmp_path / "rel" / "shards") and s.caches == "s3://bucket/caches"
    assert s.runs == str(tmp_path / "data" / "runs")
    assert s.resolve("caches", "x.zarr") == "s3://bucket/caches/x.zarr"
    assert s.resolve("shards", "/abs/x.tar") == "/abs/x.tar"
    (tmp_path / "file.yaml").write_text("shards: file:///data/shards\ncaches: file://rel/caches\n")
    f = load_storage(str(tmp_path / "file.yaml"))                       # file:// is a path: absolute, or relative
    assert f.shards == "/data/shards" and f.caches == str(tmp_path / "rel" / "caches")
    (tmp_path / "bad.yaml").write_text("shardz: x\n")
    with pytest.raises(SeedError, match="unknown storage root"):
        load_storage(str(tmp_path / "bad.yaml"))
    with pytest.raises(SeedError, match="storage file not found"):
        load_storage(str(tmp_path / "missing.yaml"))
    # a protocol fsspec does not know, or whose package is missing, is refused when the file is read, naming the root
    (tmp_path / "scheme.yaml").write_text("shards: nosuch://x/shards\n")
    with pytest.raises(SeedError, match=r"scheme.yaml: root shards: nosuch://x/shards: unknown protocol nosuch://"):
        load_storage(str(tmp_path / "scheme.yaml"))
    (tmp_path / "chain.yaml").write_text("caches: simplecache::nosuch://x/caches\n")
    with pytest.raises(SeedError, match=r"root caches: .*unknown protocol nosuch://"):
        load_storage(str(tmp_path / "chain.yaml"))


# --- provenance, templates and the missing-cache message (seed config, issue 16) ---

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "seed" / "templates"


def _comments(text: str) -> dict[str, tuple[str, str]]:
    """``dotted.field -> (value text, trailing comment)`` read back from ``format_resolved`` output by indentation."""
    out: dict[str, tuple[str, str]] = {}
    stack: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key, _, rest = line.strip().partition(":")
        stack = stack[:depth] + [key]
        if rest.strip():
            value, _, comment = rest.rpartition("  # ")
            out[".".join(stack)] = (value.strip(), comment)
    return out


def test_resolved_config_says_where_each_value_came_from(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("cache:\n  views: 8\n  name: mine\ntrain:\n  optim:\n    epochs: 3\n    base_lr: 0.1\n")
    resolved = resolve_config(run, ["cache.views=2", "train.optim={epochs: 5}", "bank.size=128"])
    assert resolved.config == load_config(run, ["cache.views=2", "train.optim={epochs: 5}", "bank.size=128"])
    assert (resolved.source("cache.views"), resolved.source("cache.name"), resolved.source("bank.size")) == (
        "--set", str(run), "--set")
    # a section set whole replaces the file's section: its base_lr falls back to the default, as the value does
    assert resolved.source("train.optim.epochs") == "--set" and resolved.source("train.optim.base_lr") == "default"
    assert resolved.config.train.optim.base_lr == 0.03 and resolved.config.train.optim.epochs == 5
    assert resolved.source("cache.recipe.hue") == "default" and resolve_config(None).sources == {}


def test_formatted_resolved_config_reads_back_with_one_comment_per_field(tmp_path: Path) -> None:
    sets = ["train.run=odd #name: 'x'", "train.students=[{arch: resnet10t, name: a}, {arch: resnet18}]",
            "cache.recipe.crop_scale=[0.3, 1]", "teacher.checkpoint=null", "bank.tau_t=1e-5"]
    resolved = resolve_config(ROOT / "configs" / "demo.yaml", sets, label="configs/demo.yaml")
    text = format_resolved(resolved)
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert load_config(again) == resolved.config  # the printed YAML is the config, comments and all
    fields = _comments(text)
    leaves = {k for k, v in _flatten(to_dict(resolved.config)).items()}
    assert set(fields) == leaves  # every field printed once, each with its origin
    assert fields["cache.name"] == ("demo-fashion-mnist", "configs/demo.yaml")
    assert fields["train.run"][1] == "--set" and fields["train.students"][1] == "--set"
    assert fields["cache.recipe.crop_scale"] == ("[0.3, 1.0]", "--set")
    assert fields["bank.topk"] == ("32", "configs/demo.yaml") and fields["bank.index"] == ("flat", "default")
    assert text.splitlines()[0] == "# resolved run config: defaults < configs/demo.yaml < --set"


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_templates_validate_and_carry_the_seed_paper_settings() -> None:
    assert templates() == ["fashion-mnist", "imagenet"]
    for name in templates():
        assert template(name) == (TEMPLATES / f"{name}.yaml").read_text()
        load_config(TEMPLATES / f"{name}.yaml")
    cfg = load_config(TEMPLATES / "imagenet.yaml")
    # Fang et al. 2021 and the official code's defaults (tools/opts.py): 224 px, MoCo-v2 ResNet-50 head,
    # K = 65,536, tau_T = 1e-4, tau_S = 0.2, 200 epochs, SGD lr 0.03 per 256, momentum 0.9, wd 1e-4
    assert (cfg.cache.resolution, cfg.teacher.arch, cfg.teacher.format, cfg.teacher.output) == (224, "resnet50", "moco", "head")
    assert (cfg.bank.size, cfg.bank.tau_t, cfg.train.tau_s) == (65536, 1e-4, 0.2)
    o = cfg.train.optim
    assert (o.epochs, o.batch_size, o.base_lr, o.momentum, o.weight_decay) == (200, 256, 0.03, 0.9, 1e-4)
    assert [s.arch for s in cfg.train.students] == ["efficientnet_b0", "mobilenetv3_large_100", "resnet18"]
    assert cfg.cache.recipe == RunConfig().cache.recipe  # MoCo-v2's augmentation, spelled out
    with pytest.raises(SeedError, match="no config template 'cifar' \\(known: fashion-mnist, imagenet\\)"):
        template("cifar")


@pytest.mark.parametrize("name", ["imagenet", "fashion-mnist"])
def test_every_template_field_is_commented(name: str) -> None:
    """Each field line has a comment on it or on the line above (list items share their list's)."""
    lines = (TEMPLATES / f"{name}.yaml").read_text().splitlines()
    bare = [line for prev, line in zip(["#"] + lines, lines)
            if ":" in line and not line.strip().startswith(("#", "- ")) and line.split("#")[0].split(":", 1)[1].strip()
            and " #" not in line and not prev.strip().startswith("#")]
    assert bare == []


def _make_cache(url: Path, **attrs: object) -> None:
    zarr.open_group(str(url), mode="w", attributes=attrs)


def test_missing_cache_names_the_caches_there_and_their_configs(tmp_path: Path) -> None:
    storage = Storage(shards=str(tmp_path), caches=str(tmp_path / "caches"), runs=str(tmp_path), reports=str(tmp_path))
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.yaml").write_text("cache:\n  name: made\n")
    (configs / "broken.yaml").write_text("cache: [\n")  # unreadable files are passed over
    cfg = load_config(None)
    with pytest.raises(SeedError, match=r"^no cache at .*fashion-mnist-resnet10t.zarr, and none under .*caches: make one"):
        require_cache(cfg, storage, configs)
    _make_cache(tmp_path / "caches" / "made.zarr", status="complete")
    _make_cache(tmp_path / "caches" / "elsewhere.zarr", status="incomplete", config={"cache": {"name": "elsewhere"}})
    with pytest.raises(SeedError) as err:
        require_cache(cfg, storage, configs)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no cache at {storage.cache_url(cfg.cache.name)} "
                                                      "(cache.name=fashion-mnist-resnet10t); caches there: ")
    assert f"made.zarr (complete; pass -c {configs / 'a.yaml'})" in message
    assert "elsewhere.zarr (incomplete; its run config is attributes.config in elsewhere.zarr/zarr.json)" in message
    assert require_cache(load_config(None, ["cache.name=made"]), storage, configs) == storage.cache_url("made")


@pytest.mark.parametrize("key", ["cache.seed", "bank.seed", "train.seed", "pretrain.seed"])
def test_negative_seeds_are_refused_by_name(key: str) -> None:
    """numpy's seeding takes non-negative integers only (the views' vectorised seeding would loop on -1)."""
    with pytest.raises(SeedError, match=rf"{key} must be >= 0, got -1"):
        load_config(None, [f"{key}=-1"])


def test_an_override_whose_value_is_not_yaml_is_named() -> None:
    with pytest.raises(SeedError, match=r"override 'train.students=\[\{arch: x\}': the value is not valid YAML .*"
                                        r"goes in YAML quotes \(--set 'train.students=\"...\"'\), a list or mapping "
                                        r"in YAML's flow style \(--set 'train.students=\[\{arch: resnet18\}\]'\)"):
        load_config(None, ["train.students=[{arch: x}"])


@pytest.mark.parametrize("override, key", [("cache.name=../elsewhere", "cache.name"), ("cache.name=/tmp/x", "cache.name"),
                                           ("train.run=a/../../b", "train.run"), ("train.run=''", "train.run"),
                                           ("pretrain.name=a//b", "pretrain.name"), ("pretrain.name=./a", "pretrain.name"),
                                           ("train.students=[{arch: resnet18, name: ..}]", r"train.students\[0\].name"),
                                           (r"cache.name=a\..\b", "cache.name")])
def test_names_that_would_leave_their_storage_root_are_refused(override: str, key: str, tmp_path: Path) -> None:
    """Names become paths under a storage root (``<caches>/<cache.name>.zarr``, ``<runs>/<train.run>/<student>``):
    one that climbs out of it, or starts at ``/``, would write beside or far from the root."""
    with pytest.raises(SeedError, match=rf"{key} must be a name under its storage root .* got "):
        load_config(None, [override])
    storage = Storage(*(str(tmp_path / root) for root in ("shards", "caches", "runs", "reports")))
    cfg = load_config(None, ["cache.name=ablation/tau-0.1", "train.run=runs-2026/a.b"])  # sub-directories are names
    assert Path(storage.cache_url(cfg.cache.name)).resolve().is_relative_to(tmp_path / "caches")
    assert Path(storage.run_dir(cfg.train.run)).resolve().is_relative_to(tmp_path / "runs")
