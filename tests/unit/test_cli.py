"""The ``seed`` command line in-process: --version, every help page's examples, ``seed config``, ``seed export``'s
options and the message for a missing cache. (That the light commands import neither torch nor Prefect needs a
fresh process: tests/integration/test_cli_light.py.)"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
import zarr

from pipeline.cli import DEMO, DEMO_CACHE, DEMO_TEACHER, DISTRIBUTION, _template_names, build_parser, main
from seed.config import load_config, templates
from seed.storage import load_storage

ROOT = Path(__file__).resolve().parents[2]


def _pages(parser: argparse.ArgumentParser, name: str = "seed") -> dict[str, argparse.ArgumentParser]:
    """Every help page: the top level, each command and each sub-command (``seed shards fashion-mnist``)."""
    pages = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                pages.update(_pages(child, f"{name} {sub}"))
    return pages


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert DISTRIBUTION == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"seed {importlib.metadata.version('seed-distill')}\n"


def test_every_help_page_ends_with_examples_that_parse_and_validate() -> None:
    pages = _pages(build_parser())
    assert set(pages) == {"seed", "seed shards", "seed shards fashion-mnist", "seed shards imagefolder",
                          "seed shards describe", "seed teacher",
                          "seed bank", "seed student", "seed pretrain", "seed evaluate", "seed inspect", "seed config",
                          "seed export"}
    for name, page in pages.items():
        text = page.format_help()
        head, _, block = text.rpartition("\nexamples:\n")
        lines = block.rstrip("\n").split("\n")
        assert head and 2 <= len(lines) <= 4 and all(line.startswith(f"  {name} ") or line == f"  {name}" or
                                                     line.startswith(f"  {name}   #") for line in lines), (name, lines)
        for line in lines:
            words = shlex.split(line, comments=True)
            words = words[:words.index(">")] if ">" in words else words
            args = build_parser().parse_args(words[1:])  # exits (fails the test) on a bad option
            if getattr(args, "config", None):
                assert (ROOT / args.config).is_file(), line
                load_config(ROOT / args.config, args.overrides)  # the config and every --set validate
            elif hasattr(args, "overrides"):
                load_config(None, args.overrides)


def test_example_paths_are_where_the_demo_puts_things() -> None:
    """The examples name the demo's cache and teacher; both follow from configs/demo.yaml and storage.yaml."""
    storage, cfg = load_storage(str(ROOT / "storage.yaml")), load_config(ROOT / DEMO)
    assert Path(storage.cache_url(cfg.cache.name)) == ROOT / DEMO_CACHE
    assert Path(storage.pretrained_teacher(cfg.pretrain.name)) == ROOT / DEMO_TEACHER


def test_config_template_prints_the_packaged_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert _template_names() == templates() == ["fashion-mnist", "imagenet"]  # the parser lists them without seed.config
    for name in ("imagenet", "fashion-mnist"):
        assert main(["config", "--template", name]) == 0
        assert capsys.readouterr().out == (ROOT / "seed" / "templates" / f"{name}.yaml").read_text()


def _field_lines(text: str) -> dict[str, str]:
    return {line.split(":")[0].strip(): line for line in text.splitlines() if not line.startswith("#")}


def test_config_prints_the_resolved_config_with_origins(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config", "-c", str(ROOT / DEMO), "--set", "cache.views=4"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(out)
    assert load_config(tmp_path / "run.yaml") == load_config(ROOT / DEMO, ["cache.views=4"])
    lines = _field_lines(out)
    assert lines["views"].endswith("# --set") and lines["resolution"].endswith(f"# {ROOT / DEMO}")
    assert lines["index"].endswith("# default")
    assert main(["config", "--template", "imagenet", "--set", "cache.resolution=32"]) == 0
    lines = _field_lines(capsys.readouterr().out)
    assert lines["resolution"].endswith("# --set") and lines["checkpoint"].endswith("# template imagenet")


def test_config_mistakes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--template", "imagenet", "-c", str(ROOT / DEMO)]) == 2
    assert capsys.readouterr().err == "seed: error: --template and -c both name a config; give one\n"
    assert main(["config", "--set", "cache.viewz=2"]) == 2
    assert capsys.readouterr().err.startswith("seed: error: unknown config key cache.viewz")
    with pytest.raises(SystemExit) as done:
        main(["config", "--template", "cifar"])
    assert done.value.code == 2 and "invalid choice: 'cifar'" in capsys.readouterr().err


def test_path_and_number_mistakes_are_the_users(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path that is not what was expected (a directory for a file) is the user's mistake: exit 2, the path and
    what was expected, not the machine's "re-run once it is fixed" (exit 1); counts below their least are refused by
    the parser, naming the flag; an empty --shards is not "every shard"."""
    assert main(["config", "-c", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seed: error: [Errno 21] Is a directory") and str(tmp_path) in err
    assert "expected a file there" in err and "re-run" not in err
    for argv, flag in ((["shards", "fashion-mnist", "--limit", "-1"], "--limit"),
                       (["shards", "fashion-mnist", "--per-shard", "0"], "--per-shard"),
                       (["inspect", str(tmp_path), "--sample", "-5"], "--sample"),
                       (["teacher", "--procs", "-1"], "--procs")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and f"argument {flag}" in err and "expected an integer of at least" in err, err
    (tmp_path / "storage.yaml").write_text(f"caches: {tmp_path}/caches\n")
    assert main(["teacher", "--shards", "", "--storage", str(tmp_path / "storage.yaml")]) == 2
    assert capsys.readouterr().err.startswith("seed: error: --shards '': expected shard indices")


def test_export_options() -> None:
    args = build_parser().parse_args(["export", "demo", "-c", DEMO, "--student", "s", "--format", "timm", "--head",
                                      "--out", "d", "--set", "train.run=x", "--storage", "st.yaml"])
    assert (args.run, args.student, args.fmt, args.head, args.out, args.config, args.overrides, args.storage) == (
        "demo", "s", "timm", True, "d", DEMO, ["train.run=x"], "st.yaml")
    args = build_parser().parse_args(["export", "demo"])
    assert (args.student, args.fmt, args.head, args.out) == (None, "timm", False, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "demo", "--format", "onnx"])


@pytest.mark.parametrize("command", ["student", "bank", "evaluate"])
def test_stage_without_config_names_the_demo_cache(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """After `make demo`, `seed student` with no -c looks for the default cache: the message points at the demo's."""
    monkeypatch.chdir(ROOT)  # where configs/ is, as when run from the repository
    (tmp_path / "storage.yaml").write_text(yaml.safe_dump({"caches": str(tmp_path / "caches")}))
    demo_name = yaml.safe_load((ROOT / DEMO).read_text())["cache"]["name"]
    zarr.open_group(str(tmp_path / "caches" / f"{demo_name}.zarr"), mode="w", attributes={"status": "complete"})
    assert main([command, "--storage", str(tmp_path / "storage.yaml")]) == 2
    err = capsys.readouterr().err
    default = load_config(None).cache.name
    assert err == (f"seed: error: no cache at {tmp_path / 'caches' / default}.zarr (cache.name={default}); caches there: "
                   f"{demo_name}.zarr (complete; pass -c {os.path.join('configs', 'demo.yaml')})\n")


def test_inspect_modes_do_not_combine_and_flags_of_another_mode_are_refused(capsys: pytest.CaptureFixture[str],
                                                                            tmp_path: Path) -> None:
    """One report a call: --neighbours, --plots and --verify exclude each other (argparse, exit 2); --out without
    --neighbours and --json with --plots are refused in one line rather than ignored; --sample is bounded."""
    cache = str(tmp_path / "c.zarr")
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", cache, "--verify", "--plots", str(tmp_path)])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["inspect", cache, "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "seed: error: --out names the PNG of --neighbours KEY; give --neighbours too\n"
    assert main(["inspect", cache, "--json", "--plots", str(tmp_path)]) == 2
    assert "--json does not combine with --plots" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", cache, "--sample", "100000"])
    assert "expected an integer of at most 20,000, got 100,000" in capsys.readouterr().err
