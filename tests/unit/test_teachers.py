"""Teacher checkpoints: each supported layout, built here from a model, loads into the same forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from seed.config import TeacherConfig
from seed.errors import SeedError
from seed.teachers import load_teacher

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    for mod in m.modules():  # non-trivial BN statistics, so a wrong BN load shows
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _features(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m((x - MEAN) / STD)


def _load(tmp_path: Path, obj: object, **kw: object) -> nn.Module:
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    teacher, report = load_teacher(TeacherConfig(arch=kw.pop("arch", "resnet10t"), checkpoint=str(path), **kw))  # type: ignore[arg-type]
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    return teacher


def test_timm_state_dict_with_classifier(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features((images - MEAN) / STD), pre_logits=True)
    teacher = _load(tmp_path, model.state_dict(), output="pooled")
    assert torch.allclose(teacher(images), expected, atol=1e-5)
    with pytest.raises(SeedError, match="no projection head; set teacher.output=pooled"):
        _load(tmp_path, model.state_dict(), output="head")


def test_torchvision_resnet18_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None).eval()
    tv.fc = nn.Identity()  # torchvision's own forward, pooled features
    expected = _features(tv, images)
    teacher = _load(tmp_path, {"model": tv.state_dict()}, arch="resnet18", output="pooled")
    assert torch.allclose(teacher(images), expected, atol=1e-5)


def _mlp(*dims: int, bn: bool = False, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(3)
    if bn:
        seq = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.BatchNorm1d(dims[1]), act(), nn.Linear(dims[1], dims[2]))
        seq[1].running_mean.uniform_(-0.2, 0.2)
        seq[1].running_var.uniform_(0.5, 2.0)
        return seq.eval()
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += ([act()] if i else []) + [nn.Linear(a, b)]
    return nn.Sequential(*layers).eval()


def test_moco_v2_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    backbone, head = _backbone(), _mlp(512, 512, 128)
    state = {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"module.encoder_q.fc.{k}": v for k, v in head.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v + 1 for k, v in backbone.state_dict().items()}  # the key encoder is ignored
    state |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 200, "arch": "resnet10t", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}
    teacher = _load(tmp_path, ckpt)
    assert torch.allclose(teacher(images), head(_features(backbone, images)), atol=1e-5)
    assert torch.allclose(_load(tmp_path, ckpt, output="pooled")(images), _features(backbone, images), atol=1e-5)


def test_moco_v1_linear_head(tmp_path: Path, images: torch.Tensor) -> None:
    backbone, fc = _backbone(), nn.Linear(512, 128)
    state = {f"module.encoder_q.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"module.encoder_q.fc.{k}": v for k, v in fc.state_dict().items()}
    teacher = _load(tmp_path, {"state_dict": state})
    assert torch.allclose(teacher(images), fc(_features(backbone, images)), atol=1e-5)


def test_swav_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    backbone, head = _backbone(), _mlp(512, 256, 128, bn=True)
    state = {f"module.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"module.projection_head.{k}": v for k, v in head.state_dict().items()}
    state["module.prototypes.weight"] = torch.randn(3000, 128)
    teacher = _load(tmp_path, state)
    with torch.no_grad():
        assert torch.allclose(teacher(images), head(_features(backbone, images)), atol=1e-5)


def test_dino_checkpoint(tmp_path: Path, images: torch.Tensor) -> None:
    backbone, mlp = _backbone(), _mlp(512, 256, 256, 64, act=nn.GELU)
    teacher_sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher_sd |= {f"head.mlp.{k}": v for k, v in mlp.state_dict().items()}
    teacher_sd |= {"head.last_layer.weight_g": torch.ones(1000, 1), "head.last_layer.weight_v": torch.randn(1000, 64)}
    student_sd = {f"module.{k}": torch.zeros_like(v) for k, v in teacher_sd.items()}
    ckpt = {"teacher": teacher_sd, "student": student_sd, "epoch": 100}
    with torch.no_grad():
        assert torch.allclose(_load(tmp_path, ckpt)(images), mlp(_features(backbone, images)), atol=1e-5)
        assert torch.allclose(_load(tmp_path, ckpt, output="pooled")(images), _features(backbone, images), atol=1e-5)
        zero = _load(tmp_path, ckpt, dino_weights="student", output="pooled")(images)
    assert not torch.allclose(zero, _features(backbone, images))  # the student weights were read instead


def test_full_checkpoints_from_the_wild_load_weights_only(tmp_path: Path, images: torch.Tensor) -> None:
    """DINO's training script saves its argparse.Namespace and numpy values beside the weights; they load
    with weights_only=True (allow-listed), while any other object is refused in one short line."""
    import argparse
    import datetime

    import numpy as np

    backbone = _backbone()
    teacher_sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    args = argparse.Namespace(arch="resnet18", lr=np.float64(5e-4), epochs=np.int64(100), momentum_teacher=0.996)
    ckpt = {"teacher": teacher_sd, "student": {f"module.{k}": v for k, v in teacher_sd.items()}, "args": args,
            "epoch": np.int64(100), "loss": np.float32(2.5), "dino_loss_center": np.zeros((1, 64), np.float32)}
    with torch.no_grad():
        assert torch.allclose(_load(tmp_path, ckpt, output="pooled")(images), _features(backbone, images), atol=1e-5)
    bad = tmp_path / "odd.pth"
    torch.save({"state_dict": backbone.state_dict(), "saved_at": datetime.datetime(2026, 1, 1)}, bad)
    with pytest.raises(SeedError) as refused:
        load_teacher(TeacherConfig(arch="resnet18", checkpoint=str(bad), output="pooled"))
    message = str(refused.value)
    assert message.startswith(f"{bad}: holds objects that weights-only loading does not allow (datetime.datetime)")
    assert "\n" not in message and "\x1b" not in message and len(message) < 300


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = dict(_backbone().state_dict())
    del state["layer4.0.conv1.weight"]
    with pytest.raises(SeedError, match=r"missing .*layer4\.0\.conv1\.weight"):
        _load(tmp_path, state, output="pooled")
    _load(tmp_path, state, output="pooled", allow_missing_keys=True)
    state = dict(_backbone().state_dict()) | {"extra.weight": torch.zeros(3)}
    with pytest.raises(SeedError, match=r"unexpected .*extra\.weight"):
        _load(tmp_path, state, output="pooled")
    with pytest.raises(SeedError, match="do not fit resnet18"):
        _load(tmp_path, dict(_backbone().state_dict()), arch="resnet18", output="pooled")


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="not found"):
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "none.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SeedError, match="junk.pth: not a readable torch checkpoint"):
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "junk.pth")))
    with pytest.raises(SeedError, match="teacher.checkpoint is not set"):
        load_teacher(TeacherConfig())


def test_settings_that_pick_other_weights_or_heads_are_in_the_cache_fingerprint() -> None:
    """``teacher.dino_weights`` and ``teacher.head_activation`` change the embeddings of the same checkpoint
    file, so they change the cache's fingerprint; at their defaults the fields are those of older caches."""
    from pipeline.teacher import Plan, fingerprint_fields
    from seed.cache import fingerprint
    from seed.config import load_config
    from seed.teachers import LoadReport

    report = LoadReport("dino", "ab" * 32, [], [], [])
    plan = Plan("mem://c", ("s/train-000000.tar",), (10,), 10)

    def fields(*overrides: str) -> dict:
        return fingerprint_fields(load_config(None, list(overrides)), report, 32, plan)

    default = fields()
    assert "dino_weights" not in default["teacher"] and "head_activation" not in default["teacher"]
    prints = {fingerprint(f) for f in (default, fields("teacher.dino_weights=student"),
                                       fields("teacher.head_activation=gelu"))}
    assert len(prints) == 3
    assert fields("teacher.dino_weights=teacher", "teacher.head_activation=auto") == default


def test_a_pretrained_teacher_keeps_the_teacher_settings_pretraining_does_not_decide() -> None:
    """The flow pre-trains the teacher, then embeds with it: architecture, checkpoint, format and stem come from
    pre-training; the head activation, key checks and a request for pooled features stay the user's."""
    from pipeline.pretrain import teacher_config, with_pretrained
    from seed.config import load_config

    cfg = load_config(None, ["pretrain.arch=resnet18", "teacher.arch=resnet50", "teacher.output=pooled",
                             "teacher.head_activation=gelu", "teacher.allow_unexpected_keys=true"])
    made = teacher_config(cfg, "/runs/teacher.pth")
    section = with_pretrained(cfg.teacher, made)
    assert (section.arch, section.checkpoint, section.format) == ("resnet18", "/runs/teacher.pth", made.format)
    assert (section.output, section.head_activation, section.allow_unexpected_keys) == ("pooled", "gelu", True)
    assert with_pretrained(load_config(None, []).teacher, made).output == made.output  # the default: MoCo's head


def test_a_checkpoint_read_the_network_cuts_is_the_machines_failure(tmp_path: Path) -> None:
    """A connection reset as a checkpoint is opened or part-way through (object storage after a preemption) is a
    ``MachineError``, which the flow retries; a file that is no checkpoint stays the user's ``SeedError``."""
    from seed import checkpoint
    from seed.errors import MachineError, SeedError
    from tests.conftest import flaky_url

    path = tmp_path / "c.pt"
    checkpoint.save({"weights": torch.zeros(4096)}, str(path))
    with pytest.raises(MachineError, match=r"c\.pt: reading the checkpoint failed \(ConnectionResetError"):
        checkpoint.load(flaky_url(path, after=None))                # refused as it is opened
    with pytest.raises(MachineError, match=r"c\.pt: reading the checkpoint failed \(ConnectionResetError"):
        checkpoint.load(flaky_url(path, after=4096))                # reset part-way through
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SeedError) as caught:
        checkpoint.load(str(tmp_path / "bad.pt"))
    assert not isinstance(caught.value, MachineError)
