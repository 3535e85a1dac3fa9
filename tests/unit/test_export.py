"""Student export: students trained here by the student stage, exported, then loaded by timm alone.

The runs are made by ``pipeline.student.run`` (online mode, a tiny MoCo-format teacher) on 32 real
Fashion-MNIST images, so the checkpoints are the stage's own. The reference features are the
project's ``Encoder.features`` on real test images through the project's data path; the loading side
uses only timm, safetensors and torch.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import safetensors.torch
import timm
import timm.data
import torch
from PIL import Image
from torch import nn

import pipeline.export as export
import pipeline.student as student_stage
from seed import checkpoint
from seed.checkpoint import Position
from seed.config import RunConfig, StudentConfig, load_config
from seed.errors import SeedError
from seed.evaluate import images
from seed.shards import fashion_mnist_to_shards, load_fashion_mnist
from seed.storage import Storage, umask
from seed.teachers import save_moco_checkpoint
from tests.conftest import make_storage, tiny_encoder

MNV3 = "mobilenetv3_small_050"  # the demo's student: pooled output 1024-d (head_hidden_size), not num_features
SMALL = "r10t-small"            # resnet10t with the stride-1 stem of small_input


class _Interrupt(Exception):
    pass


@dataclass(frozen=True)
class Trained:
    root: Path
    storage: Storage
    cfg: RunConfig
    x: torch.Tensor  # 16 real test images at 32 px, in [0, 1], through the project's decode and resize
    source: Path     # the Fashion-MNIST files

    def encoder(self, run: str, name: str) -> torch.nn.Module:
        model, _ = checkpoint.load_student(self.storage.student_checkpoint(run, name))
        return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fmnist_source: Path) -> Trained:
    """Run ``r``: two students, 1 epoch of 1, finished. Run ``half``: one student stopped after epoch 1 of 2."""
    root = tmp_path_factory.mktemp("export")
    fashion_mnist_to_shards(str(root / "fm"), source=str(fmnist_source), per_shard=16, limit=32, progress=False)
    save_moco_checkpoint(tiny_encoder(dim=16), root / "teacher.pth", arch="resnet10t")
    storage = make_storage(root, root)
    base = ["data.train=fm/train/train-{000000..000001}.tar", f"teacher.checkpoint={root / 'teacher.pth'}",
            "train.mode=online", "train.device=cpu", "train.optim.batch_size=16", "train.loader.workers=0",
            "train.loader.shuffle_buffer=32", "bank.size=32", "cache.resolution=32"]
    cfg = load_config(None, [*base, "train.run=r", "train.optim.epochs=1",
                             f"train.students=[{{arch: {MNV3}}}, {{arch: resnet10t, name: {SMALL}, small_input: true}}]"])
    student_stage.run(cfg, storage, progress=False)

    def stop(epoch: int, row: dict) -> None:
        raise _Interrupt

    half = load_config(None, [*base, "train.run=half", "train.optim.epochs=2", f"train.students=[{{arch: {MNV3}}}]"])
    with pytest.raises(_Interrupt):
        student_stage.run(half, storage, progress=False, on_epoch=stop)
    batches, _ = images([str(root / "fm" / "test" / "test-000000.tar")], 32)
    return Trained(root, storage, cfg, batches[0], fmnist_source)


def _normalised(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_timm_export_loads_with_timm_alone_and_gives_the_students_features(trained: Trained) -> None:
    result = export.run(trained.cfg, trained.storage, student=MNV3)
    directory = trained.root / "runs" / "r" / MNV3 / "export"
    assert result.format == "timm" and result.run == str(trained.root / "runs" / "r")
    assert result.directories == [str(directory)]
    assert result.paths == [str(directory / "model.safetensors"), str(directory / "config.json")]
    assert [s.epoch for s in result.students] == [1] and result.students[0].finished
    assert all((Path(f).stat().st_mode & 0o777) == 0o666 & ~umask() for f in result.paths)  # as a plain create
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left

    expected = trained.encoder("r", MNV3).features(trained.x)
    assert expected.shape == (16, 1024)
    # timm's own hub loader reads config.json (strict load: num_classes 0 on both sides) ...
    by_dir = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    # ... and the plain architecture takes the weights file as a pretrained_cfg overlay
    by_file = timm.create_model(MNV3, pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors"))).eval()
    data = timm.data.resolve_model_data_config(by_dir)
    assert tuple(data["input_size"]) == (3, 32, 32)
    assert data["interpolation"] == "bilinear" and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data["std"] == pytest.approx((0.229, 0.224, 0.225))
    for model in (by_dir, by_file):
        assert _close(model(_normalised(trained.x, data["mean"], data["std"])), expected)
    torch.manual_seed(123)
    fresh = timm.create_model(MNV3, pretrained=False, num_classes=0).eval()  # the comparison has power
    assert not _close(fresh(_normalised(trained.x, data["mean"], data["std"])), expected)

    # timm's own preprocessing from its data config, on the original 28 px images, lands on the same
    # features up to the uint8 rounding of PIL's resize (the project resizes in float)
    pixels, _ = load_fashion_mnist(trained.source, "test", limit=16)
    transform = timm.data.create_transform(**data)
    batch = torch.stack([transform(Image.fromarray(p).convert("RGB")) for p in pixels])
    cosine = nn.functional.cosine_similarity(by_dir(batch), expected)
    assert cosine.min() > 0.9999

    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == MNV3 and config["num_classes"] == 0 and config["pretrained_cfg"]["num_classes"] == 0
    assert config["seed"]["feature_dim"] == 1024 and config["seed"]["student"] == MNV3
    assert config["seed"]["epoch"] == 1 and config["seed"]["epochs"] == 1 and config["seed"]["finished"] is True


@torch.no_grad()
def test_safetensors_export_with_head_round_trips(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "mnv3"
    result = export.run(trained.cfg, trained.storage, student=MNV3, fmt="safetensors", head=True, out=str(out))
    assert result.paths == [str(out / "model.safetensors"), str(out / "head.safetensors"), str(out / "config.json")]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "seed-student-export" and config["architecture"] == MNV3
    assert config["input_size"] == [3, 32, 32] and config["feature_dim"] == 1024 and config["timm_changes"] == []
    assert config["mean"] == [0.485, 0.456, 0.406] and config["std"] == [0.229, 0.224, 0.225]

    backbone = timm.create_model(config["architecture"], pretrained=False, **config["timm_kwargs"]).eval()
    backbone.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"), strict=True)
    tensors = safetensors.torch.load_file(out / "head.safetensors")
    assert tensors and all(k.startswith("head.") for k in tensors)
    layers = [nn.Linear(s["in"], s["out"], bias=s["bias"]) if s["type"] == "Linear" else getattr(nn, s["type"])()
              for s in config["head"]["layers"]]
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    head = nn.Sequential(*layers)
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items()}, strict=True)
    encoder = trained.encoder("r", MNV3)
    assert _close(head(backbone(_normalised(trained.x, config["mean"], config["std"]))), encoder(trained.x))

    again = export.run(trained.cfg, trained.storage, student=MNV3, fmt="safetensors", out=str(out))
    assert not (out / "head.safetensors").exists() and again.paths[-1] == str(out / "config.json")
    assert json.loads((out / "config.json").read_text())["head"] is None


def test_export_to_an_fsspec_url_writes_the_same_bytes(trained: Trained, tmp_path: Path) -> None:
    local = export.run(trained.cfg, trained.storage, student=MNV3, fmt="safetensors", head=True, out=str(tmp_path))
    url = "memory://seed-export-test/mnv3"
    remote = export.run(trained.cfg, trained.storage, student=MNV3, fmt="safetensors", head=True, out=url)
    assert remote.paths == [f"{url}/model.safetensors", f"{url}/head.safetensors", f"{url}/config.json"]
    fs = fsspec.filesystem("memory")
    for here, there in zip(local.paths, remote.paths):
        assert fs.cat_file(there) == Path(here).read_bytes()
    export.run(trained.cfg, trained.storage, student=MNV3, fmt="safetensors", out=url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False)) == ["config.json", "model.safetensors"]


@torch.no_grad()
def test_small_input_student_is_refused_by_timm_and_described_for_safetensors(trained: Trained, tmp_path: Path) -> None:
    ckpt = trained.storage.student_checkpoint("r", SMALL)
    refused = tmp_path / "refused"
    with pytest.raises(SeedError, match=re.escape(ckpt) + r".*small_input=True.*conv1\.0\.stride \[1, 1\] instead of "
                       r"\[2, 2\].*maxpool is Identity instead of MaxPool2d.*format safetensors") as info:
        export.run(trained.cfg, trained.storage, out=str(refused))  # every student, timm format
    assert "\n" not in str(info.value)
    assert not refused.exists()  # checked before anything is written, also the student timm could take

    out = tmp_path / "all"
    result = export.run(trained.cfg, trained.storage, fmt="safetensors", out=str(out))
    assert result.directories == [str(out / MNV3), str(out / SMALL)]
    config = json.loads((out / SMALL / "config.json").read_text())
    assert config["small_input"] is True
    # what seed.models.create_backbone(small_input=True) does to timm's resnet10t, whose stem conv is conv1.0
    assert config["timm_changes"] == [
        {"module": "conv1.0", "attribute": "stride", "timm": [2, 2], "student": [1, 1]},
        {"module": "maxpool", "timm": "MaxPool2d", "student": "Identity"}]

    model = timm.create_model(config["architecture"], pretrained=False, **config["timm_kwargs"]).eval()
    model.load_state_dict(safetensors.torch.load_file(out / SMALL / "model.safetensors"), strict=True)
    x = _normalised(trained.x[:8], config["mean"], config["std"])  # stride 1 at 32 px: the slow forward here
    expected = trained.encoder("r", SMALL).features(trained.x[:8])
    assert not _close(model(x), expected)  # timm's stem, same weights: other features
    for change in config["timm_changes"]:
        if "attribute" in change:
            assert change["attribute"] == "stride"
            model.get_submodule(change["module"]).stride = tuple(change["student"])
        else:
            parent, _, child = change["module"].rpartition(".")
            model.get_submodule(parent).add_module(child, getattr(nn, change["student"])())
    assert _close(model(x), expected)


def test_an_unfinished_run_is_exported_with_its_epoch(trained: Trained, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.export"):
        result = export.run(trained.cfg, trained.storage, run="half")
    assert "exporting epoch 1 of a 2-epoch run" in caplog.text
    (done,) = result.students
    assert (done.student, done.epoch, done.epochs, done.finished) == (MNV3, 1, 2, False)
    config = json.loads(Path(done.directory, "config.json").read_text())
    assert (config["seed"]["epoch"], config["seed"]["epochs"], config["seed"]["finished"]) == (1, 2, False)
    assert "epoch 1 of 2" in config["pretrained_cfg"]["description"]
    # the same weights as if checkpointed at step 3 of epoch 2 (train.checkpoint_steps): said so, not "epoch 1"
    inside = trained.root / "runs" / "inside" / MNV3
    inside.mkdir(parents=True)
    shutil.copy(trained.root / "runs" / "half" / "config.yaml", inside.parent / "config.yaml")
    state = checkpoint.load(str(trained.root / "runs" / "half" / MNV3 / "checkpoint.pt"))
    checkpoint.save({**state, "step": 3}, str(inside / "checkpoint.pt"))
    (done,) = export.run(trained.cfg, trained.storage, run="inside").students
    config = json.loads(Path(done.directory, "config.json").read_text())
    assert (config["seed"]["epoch"], config["seed"]["step"], done.position) == (1, 3, "step 3 of epoch 2 of 2")
    assert "step 3 of epoch 2 of 2" in config["pretrained_cfg"]["description"]


def test_bad_requests_name_the_run_student_checkpoint_or_format(trained: Trained) -> None:
    runs = trained.root / "runs"
    with pytest.raises(SeedError, match=re.escape(f"no student run at {runs / 'nope'}: {runs / 'nope' / 'config.yaml'}")):
        export.run(trained.cfg, trained.storage, run="nope")
    with pytest.raises(SeedError, match=re.escape(f"{runs / 'r'} has no student 'resnet18' (known: {MNV3}, {SMALL})")):
        export.run(trained.cfg, trained.storage, student="resnet18")
    with pytest.raises(SeedError, match=r"unknown export format 'onnx' \(known: timm, safetensors\)"):
        export.run(trained.cfg, trained.storage, fmt="onnx")

    empty = runs / "empty"
    empty.mkdir()
    shutil.copy(runs / "half" / "config.yaml", empty / "config.yaml")
    missing = empty / MNV3 / "checkpoint.pt"
    with pytest.raises(SeedError, match=re.escape(f"student {MNV3} has no checkpoint: {missing} not found")):
        export.run(trained.cfg, trained.storage, run=str(empty))  # a path works as well as a name
    checkpoint.save({"model": {}, "epoch": 1}, str(missing))  # e.g. a teacher, not a student
    with pytest.raises(SeedError, match=re.escape(f"{missing}: not a student checkpoint of this project (no valid 'arch' entry)")):
        export.run(trained.cfg, trained.storage, run="empty")
    # a student checkpoint whose weights do not fit what it says it holds (edited, another model's, a timm that
    # renamed parameters): one line naming the file and the first mismatch, for export and evaluation alike
    good = checkpoint.load(str(trained.storage.student_checkpoint("r", MNV3)))
    for change, message in (({"dim": 8}, r"dim 8: head\.2\.weight is \[16, \d+\] in the file, \[8, \d+\] in the model"),
                            ({"arch": "resnet10t"}, r"resnet10t student .* in the model .*\(and \d+ more of another shape\)$")):
        checkpoint.save({**good, **change}, str(missing))
        with pytest.raises(SeedError, match=re.escape(f"{missing}: its weights do not fit a ") + ".*" + message):
            export.run(trained.cfg, trained.storage, run="empty")
    renamed = {("renamed." + k if k == "head.0.weight" else k): v for k, v in good["model"].items()}
    checkpoint.save({**good, "model": renamed}, str(missing))
    with pytest.raises(SeedError, match=re.escape("parameters 1 missing (first: head.0.weight), 1 unexpected "
                                                  "(first: renamed.head.0.weight)")):
        export.run(trained.cfg, trained.storage, run="empty")


def test_a_run_started_again_without_resume_says_what_it_gives_up(trained: Trained,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """``seed student`` without --resume over a run stopped part-way with these settings trains from the first
    epoch, as asked, and says so with where the run stood (the flow resumes it). Stopped here at its first step,
    before any checkpoint: the shared run keeps its epoch 1."""
    from seed.objectives import OnlineSeed

    class StopAtOnce(OnlineSeed):
        def prepare(self, batch, device):  # type: ignore[no-untyped-def]
            raise _Interrupt

    t = trained.cfg.train
    half = dataclasses.replace(trained.cfg, train=dataclasses.replace(
        t, run="half", optim=dataclasses.replace(t.optim, epochs=2), students=(StudentConfig(arch=MNV3),)))
    with caplog.at_level(logging.WARNING, logger="pipeline.student"), pytest.raises(_Interrupt):
        student_stage.run(half, trained.storage, progress=False, objective=StopAtOnce)
    assert "student run half stopped at epoch 1 of 2 with these settings; training again from the first epoch" \
        in caplog.text
    assert student_stage.resumable(half, trained.storage) == Position(1)


def test_an_online_run_resumes_only_against_the_same_teacher_file(trained: Trained) -> None:
    """Online students learn from the teacher file: one rewritten at the same path (pre-training run again) is
    another teacher, so the interrupted run is not continued against it, by the flow or by --resume."""
    t = trained.cfg.train
    half = dataclasses.replace(trained.cfg, train=dataclasses.replace(
        t, run="half", optim=dataclasses.replace(t.optim, epochs=2), students=(StudentConfig(arch=MNV3),)))
    assert student_stage.resumable(half, trained.storage) == Position(1)
    path = trained.root / "teacher.pth"
    before = path.read_bytes()
    try:
        other = tiny_encoder(dim=16)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.01)
        save_moco_checkpoint(other, path, arch="resnet10t")
        assert not student_stage.resumable(half, trained.storage)
        with pytest.raises(SeedError, match="cannot resume, teacher_sha256 differs"):
            student_stage.run(half, trained.storage, resume=True, progress=False)
    finally:
        path.write_bytes(before)
