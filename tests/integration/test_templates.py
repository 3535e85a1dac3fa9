"""The config templates: both validate and name real timm architectures, and the ImageNet one, scaled
down by --set alone (32 px, K = 64, one epoch, a tiny teacher), runs teacher -> bank -> student on real
Fashion-MNIST shards made by `seed shards fashion-mnist --limit`, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
import zarr

from pipeline.cli import main
from seed import checkpoint
from seed.config import load_config, templates
from seed.evaluate import images
from seed.teachers import save_moco_checkpoint
from tests.conftest import tiny_encoder

ROOT = Path(__file__).resolve().parents[2]


def _printed(name: str, capsys: pytest.CaptureFixture[str], path: Path) -> Path:
    """The template as `seed config --template NAME > path` writes it."""
    assert main(["config", "--template", name]) == 0
    path.write_text(capsys.readouterr().out)
    return path


@pytest.mark.parametrize("name", ["imagenet", "fashion-mnist"])
def test_templates_validate_and_name_timm_architectures(name: str, capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    assert name in templates()
    cfg = load_config(_printed(name, capsys, tmp_path / f"{name}.yaml"))
    archs = [cfg.teacher.arch, *(s.arch for s in cfg.train.students)]
    assert all(timm.is_model(a) for a in archs), [a for a in archs if not timm.is_model(a)]
    assert yaml.safe_load((tmp_path / f"{name}.yaml").read_text()) == yaml.safe_load(
        (ROOT / "seed" / "templates" / f"{name}.yaml").read_text())


def test_imagenet_template_scaled_down_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       fmnist_source: Path) -> None:
    shards = tmp_path / "shards"
    assert main(["shards", "fashion-mnist", "--source", str(fmnist_source), "--limit", "200", "--per-shard", "100",
                 "--out", str(shards / "fm")]) == 0
    capsys.readouterr()
    storage = tmp_path / "storage.yaml"
    storage.write_text(yaml.safe_dump({"shards": str(shards), "caches": str(tmp_path / "caches"),
                                       "runs": str(tmp_path / "runs"), "reports": str(tmp_path / "reports")}))
    # a MoCo-v2-layout checkpoint of a tiny resnet10t, its head centred on real images (see conftest.moco_checkpoint)
    encoder = tiny_encoder()
    batch, _ = images([str(shards / "fm" / "train" / "train-000001.tar")], 32)
    with torch.no_grad():
        encoder.head[-1].bias -= encoder(batch[0]).mean(dim=0)
    ckpt = tmp_path / "moco.pth"
    save_moco_checkpoint(encoder, ckpt, arch="resnet10t")

    template = _printed("imagenet", capsys, tmp_path / "imagenet.yaml")
    scaled = ["data.train=fm/train/train-{000000..000001}.tar", "data.test=fm/test/test-{000000..000001}.tar",
              "teacher.arch=resnet10t", f"teacher.checkpoint={ckpt}", "cache.resolution=32", "cache.views=2",
              "cache.batch_size=64", "cache.cpu_threads=2", "cache.workers=1", "bank.size=64", "bank.topk=8",
              "train.students=[{arch: resnet18}]", "train.optim.epochs=1", "train.optim.batch_size=50",
              "train.loader.shuffle_buffer=200", "train.loader.workers=0"]
    common = ["-c", str(template), "--storage", str(storage), *(w for s in scaled for w in ("--set", s))]

    assert main(["teacher", *common, "--quiet"]) == 0
    assert "complete" in capsys.readouterr().out
    cache = zarr.open_group(str(tmp_path / "caches" / "imagenet-r50-mocov2.zarr"), mode="r")  # the template's cache.name
    fields = cache.attrs["fingerprint_fields"]
    assert (fields["resolution"], fields["views"], fields["teacher"]["format"], fields["teacher"]["output"]) == (32, 2, "moco", "head")
    assert int(cache["valid"][:].sum()) == 200 and cache.attrs["status"] == "complete"

    assert main(["bank", *common]) == 0
    assert "K=64 top-8 tau_T=0.0001" in capsys.readouterr().out  # the template's tau_T, the --set K

    assert main(["student", *common]) == 0
    out = capsys.readouterr().out
    ckpt_path = tmp_path / "runs" / "imagenet-seed" / "resnet18" / "checkpoint.pt"  # the template's train.run
    assert out.startswith("run ") and str(ckpt_path) in out
    state = checkpoint.load(str(ckpt_path))
    train = state["config"]["train"]
    assert state["epoch"] == 1 and state["mode"] == "cached" and torch.isfinite(torch.tensor(state["metrics"][-1]["loss"]["resnet18"]))
    assert (train["tau_s"], train["optim"]["base_lr"], train["optim"]["weight_decay"], state["config"]["bank"]["tau_t"]) == (
        0.2, 0.03, 1e-4, 1e-4)
    assert json.loads(json.dumps(state["config"]["cache"]["recipe"]))["crop_scale"] == [0.2, 1.0]

    # the student as plain weights, through `seed export` (pipeline.export)
    assert main(["export", "imagenet-seed", *common, "--head"]) == 0
    export = ckpt_path.parent / "export"
    files = [str(export / f) for f in ("model.safetensors", "head.safetensors", "config.json")]
    assert capsys.readouterr().out == f"resnet18 (epoch 1 of 1, timm): {', '.join(files)}\n"
    assert all(Path(f).is_file() for f in files)
    assert json.loads((export / "config.json").read_text())["architecture"] == "resnet18"
