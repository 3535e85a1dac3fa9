"""Teachers from local checkpoints: timm/torchvision, MoCo-v1/v2, SwAV and DINO formats.

Key layouts read:
- timm / torchvision: a plain state dict (optionally under ``state_dict`` or ``model``); the
  classifier is dropped; only pooled features are available.
- MoCo-v1/v2 (facebookresearch/moco): ``state_dict`` with ``module.encoder_q.*``; the MLP head is
  ``fc.0``/``fc.2`` (v2) or a linear ``fc`` (v1). ``seed pretrain`` writes this format.
- SwAV (facebookresearch/swav): ``module.*`` backbone, ``projection_head.*`` (Linear-BN-ReLU-Linear),
  ``prototypes.*`` dropped.
- DINO (facebookresearch/dino): ``teacher``/``student`` dicts with ``backbone.*`` and
  ``head.mlp.*`` (GELU MLP); ``head.last_layer`` (the prototypes) dropped.

Loading uses ``torch.load(weights_only=True)``. Missing or unexpected backbone keys are named and
are an error unless the config allows them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import torch
from torch import nn

from seed.checkpoint import torch_load
from seed.config import TeacherConfig
from seed.errors import SeedError
from seed.models import Encoder, create_backbone, freeze, mlp_from_state_dict

HEAD_PREFIX = {"moco": "fc.", "swav": "projection_head.", "dino": "head.mlp."}
DROPPED_PREFIX = {"swav": ("prototypes.",), "dino": ("head.last_layer.",), "moco": (), "timm": ()}
ACTIVATION = {"moco": "relu", "swav": "relu", "dino": "gelu", "timm": "relu"}


@dataclasses.dataclass
class LoadReport:
    """What loading did: the detected format and the keys it dropped on purpose."""

    format: str
    sha256: str
    dropped: list[str]
    missing: list[str]
    unexpected: list[str]


TeacherLoader = Callable[[TeacherConfig], tuple[Encoder, LoadReport]]
"""How a stage gets its teacher: ``load_teacher`` by default; the flow passes one that loads once per
process, and tests pass one that must not be called."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str) -> Any:
    return torch_load(path, "teacher checkpoint")


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, fmt: str, dino_weights: str, path: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, with DDP's ``module.`` prefix removed."""
    if fmt == "dino" or (fmt == "auto" and isinstance(obj, dict) and dino_weights in obj and _tensor_dict(obj[dino_weights])):
        if dino_weights not in obj:
            raise SeedError(f"{path}: DINO checkpoint has no {dino_weights!r} weights (keys: {sorted(obj)[:10]})")
        obj = obj[dino_weights]
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and _tensor_dict(obj[wrapper]):
            obj = obj[wrapper]
            break
    if not _tensor_dict(obj):
        raise SeedError(f"{path}: no state dict of tensors found (top-level keys: {sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def detect_format(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("encoder_q.") for k in keys):
        return "moco"
    if any(k.startswith(("projection_head.", "prototypes.")) for k in keys):
        return "swav"
    if any(k.startswith("backbone.") for k in keys):
        return "dino"
    return "timm"


def split_state(state: dict[str, torch.Tensor], fmt: str) -> tuple[dict, dict, list[str]]:
    """(backbone keys, head keys, dropped keys) for a checkpoint format."""
    if fmt == "moco":
        state = {k.removeprefix("encoder_q."): v for k, v in state.items() if k.startswith("encoder_q.")}
    if fmt == "dino":
        state = {(k.removeprefix("backbone.") if k.startswith("backbone.") else k): v for k, v in state.items()}
    dropped = [k for k in state if k.startswith(DROPPED_PREFIX[fmt])]
    head_prefix = HEAD_PREFIX.get(fmt)
    head: dict[str, torch.Tensor] = {}
    backbone: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in dropped:
            continue
        if head_prefix and k.startswith(head_prefix):
            head[k.removeprefix(head_prefix)] = v
        else:
            backbone[k] = v
    if fmt == "moco" and set(head) <= {"weight", "bias"} and head:  # MoCo-v1: a linear fc
        head = {f"0.{k}": v for k, v in head.items()}
    return backbone, head, dropped


def _classifier_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "fc")
    names = names if isinstance(names, (list, tuple)) else [names]
    return [k for k in state if any(k.startswith(n + ".") for n in names)]


def load_teacher(cfg: TeacherConfig) -> tuple[Encoder, LoadReport]:
    """The frozen teacher encoder described by ``cfg`` and a report of what loading did."""
    if not cfg.checkpoint:
        raise SeedError("teacher.checkpoint is not set: name a local checkpoint file (seed pretrain can make one)")
    path = cfg.checkpoint
    state = unwrap_state_dict(read_checkpoint(path), cfg.format, cfg.dino_weights, path)
    fmt = detect_format(state) if cfg.format == "auto" else cfg.format
    backbone_sd, head_sd, dropped = split_state(state, fmt)

    backbone = create_backbone(cfg.arch, small_input=cfg.small_input)
    classifier = _classifier_keys(backbone, backbone_sd)
    dropped += classifier
    backbone_sd = {k: v for k, v in backbone_sd.items() if k not in classifier}
    try:
        result = backbone.load_state_dict(backbone_sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise SeedError(f"{path}: weights do not fit {cfg.arch}: {exc}") from exc
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing and not cfg.allow_missing_keys:
        raise SeedError(f"{path}: {len(missing)} backbone weights missing for {cfg.arch} ({fmt} format): "
                        f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (teacher.allow_missing_keys to accept)")
    if unexpected and not cfg.allow_unexpected_keys:
        raise SeedError(f"{path}: {len(unexpected)} unexpected weights for {cfg.arch} ({fmt} format): "
                        f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} (teacher.allow_unexpected_keys to accept)")

    head = None
    if cfg.output == "head":
        if not head_sd:
            raise SeedError(f"{path}: a {fmt} checkpoint has no projection head; set teacher.output=pooled")
        activation = ACTIVATION[fmt] if cfg.head_activation == "auto" else cfg.head_activation
        head = mlp_from_state_dict(head_sd, activation, path)
    encoder = Encoder.for_backbone(backbone, head)
    report = LoadReport(fmt, file_sha256(path), dropped, missing, unexpected)
    return freeze(encoder), report


def save_moco_checkpoint(encoder: Encoder, path: str | Path, **extra: Any) -> None:
    """Write ``encoder`` in the MoCo-v2 layout (``state_dict`` of ``module.encoder_q.*``, head as ``fc.*``)."""
    from seed import checkpoint

    state = {f"module.encoder_q.{k}": v for k, v in encoder.backbone.state_dict().items()}
    state.update({f"module.encoder_q.fc.{k}": v for k, v in encoder.head.state_dict().items()})
    checkpoint.save({"state_dict": state, **extra}, str(path))
