"""Encoders shared by teachers and students: normalise -> timm backbone (pooled) -> optional MLP head.

The input is a float image batch in [0, 1] (what ``seed.augment.apply_batch`` returns); the
mean/std normalisation lives inside the module, so a checkpoint carries its own preprocessing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import timm
import torch
from torch import nn

from seed.errors import SeedError


class Encoder(nn.Module):
    """``normalise -> backbone -> head``; ``forward`` returns the head output (or pooled features).

    Attributes:
        feature_dim: width of the pooled backbone features.
        out_dim: width of ``forward``'s output.
    """

    mean: torch.Tensor  # [1, 3, 1, 1] buffers, not saved in state dicts: the architecture defines them
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, head: nn.Module | None, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.feature_dim = feature_dim(backbone)
        self.out_dim = _out_features(self.head, self.feature_dim)

    @classmethod
    def for_backbone(cls, backbone: nn.Module, head: nn.Module | None = None) -> Encoder:
        """An encoder normalising with the backbone's own mean and std (its ``pretrained_cfg``)."""
        pre = preprocessing(backbone)
        return cls(backbone, head, tuple(pre["mean"]), tuple(pre["std"]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[B, feature_dim]`` of images in [0, 1]."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def feature_dim(backbone: nn.Module) -> int:
    """Width of a timm backbone's pooled output (``num_classes=0``).

    ``head_hidden_size`` where timm defines it: MobileNet-v3's pooled output passes a 1280-d
    pre-logits layer, wider than ``num_features`` (960).
    """
    width: int = getattr(backbone, "head_hidden_size", 0) or getattr(backbone, "num_features")
    return int(width)


def _out_features(head: nn.Module, default: int) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else default


M = TypeVar("M", bound=nn.Module)


def create_backbone(arch: str, *, small_input: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model returning pooled features (``num_classes=0``), never touching the hub.

    ``small_input`` turns the stem into a stride-1 stem without max-pool (CIFAR-style ResNets), so
    28-32 px images keep their spatial detail.
    """
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise SeedError(f"unknown timm architecture {arch!r}: {exc}") from exc
    if small_input:
        _stride_one_stem(model, arch)
    return model


def _stride_one_stem(model: nn.Module, arch: str) -> None:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)), None)
    if first is None:
        raise SeedError(f"small_input: {arch} has no strided stem convolution to change")
    first.stride = (1, 1)
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        model.maxpool = nn.Identity()


def mlp_head(dims: list[int], activation: str = "relu") -> nn.Sequential:
    """``Linear(d0, d1) - act - Linear(d1, d2) ...`` (SEED's student head: ``[d, d, 128]``)."""
    act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def mlp_from_state_dict(state: Mapping[str, torch.Tensor], activation: str, where: str) -> nn.Sequential:
    """Rebuild an ``nn.Sequential`` head from its state dict, then load it.

    Index ``i`` with a 2-D ``weight`` is a Linear, with ``running_mean`` a BatchNorm1d; an index with
    no parameters is the activation (MoCo ``fc.0/fc.2``: Linear-ReLU-Linear; SwAV
    ``projection_head.0/1/3``: Linear-BN-ReLU-Linear; DINO ``head.mlp.0/2/4`` with GELU).
    """
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(\d+)\.(.+)", key)
        if not m:
            raise SeedError(f"{where}: unexpected head key {key!r} (expected <index>.<param>)")
        by_index.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not by_index:
        raise SeedError(f"{where}: the checkpoint has no projection head")
    act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
    layers: list[nn.Module] = []
    for i in range(max(by_index) + 1):
        params = by_index.get(i)
        if params is None:
            layers.append(act())
        elif "running_mean" in params:
            layers.append(nn.BatchNorm1d(params["weight"].shape[0]))
        elif "weight" in params and params["weight"].ndim == 2:
            out_f, in_f = params["weight"].shape
            layers.append(nn.Linear(in_f, out_f, bias="bias" in params))
        else:
            raise SeedError(f"{where}: cannot tell what head layer {i} is from keys {sorted(params)}")
    head = nn.Sequential(*layers)
    head.load_state_dict(dict(state), strict=True)
    return head


def preprocessing(model: nn.Module) -> dict[str, list[float]]:
    """The mean/std a timm model was defined with (its ``pretrained_cfg``), ImageNet's by default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))],
    }


def freeze(model: M) -> M:
    """Eval mode, no gradients: BatchNorm statistics stay as loaded."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def mlp_encoder(arch: str, dim: int, *, small_input: bool = False) -> Encoder:
    """timm backbone + MLP head ``Linear(d, d) - ReLU - Linear(d, dim)``: SEED's student, MoCo-v2's encoder."""
    backbone = create_backbone(arch, small_input=small_input)
    d = feature_dim(backbone)
    return Encoder.for_backbone(backbone, mlp_head([d, d, dim]))
