"""Export stage: a trained student as plain weights that timm (or any safetensors reader) loads alone.

A student checkpoint (``<runs>/<run>/<student>/checkpoint.pt``) mixes backbone, projection head,
optimiser, RNG state and metrics, and only ``seed.checkpoint`` reads it. An export keeps what a user
of the student needs, in ``<run>/<student>/export/`` (or ``out``):

- ``model.safetensors``: the backbone's timm state dict (pooled features, ``num_classes=0``);
- ``head.safetensors`` (``head=True``): SEED's projection head, keys under ``head.``;
- ``config.json``, written last. ``fmt="timm"``: timm's hub layout (``architecture``, ``num_classes``
  0, ``pretrained_cfg`` with the input size, mean/std, interpolation and crop of this project's data
  path), so ``timm.create_model("local-dir:<dir>", pretrained=True)`` rebuilds the backbone with timm
  alone; the project's own description sits under its ``seed`` key, which timm ignores.
  ``fmt="safetensors"``: that description alone (``format: seed-student-export``).

The description names the architecture, the feature width, the input (RGB in [0, 1], normalised as
``(x - mean) / std`` inside ``seed.models.Encoder``), the head's layers, and where the weights come
from: run, student, checkpoint epoch and the run's planned ``optim.epochs``. A checkpoint short of
them (an interrupted or running run) is exported as it is, with a warning; ``finished`` says which.

``small_input`` students have a stride-1 stem without max-pool. No ``timm.create_model`` argument
builds that (timm's ResNet and MobileNet stems hard-code stride 2), and timm would load the weights
into its own stem without complaint and compute other features. So the timm format refuses a
backbone that differs from timm's own build of its architecture, and the safetensors format lists
the differences (``timm_changes``) for a loader to apply after ``timm.create_model``.

Each file is replaced whole (temp file and rename locally, with the mode a plain create gives; one
PUT on object stores); ``config.json`` comes last, so a complete one describes the files beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import fsspec
import numpy as np
import safetensors.torch
import timm
import torch
import yaml
from torch import nn

from seed import checkpoint
from seed.config import RunConfig
from seed.errors import SeedError
from seed.models import Encoder
from seed.storage import Storage, is_url, join, local_path, write_bytes, yaml_problem

log = logging.getLogger(__name__)

FORMATS = ("timm", "safetensors")
EXPORT_FORMAT = "seed-student-export"
EXPORT_VERSION = 1
WEIGHTS, HEAD, CONFIG = "model.safetensors", "head.safetensors", "config.json"
INTERPOLATION = "bilinear"  # seed.augment resizes bilinearly; evaluation takes the whole image (crop_pct 1)


@dataclasses.dataclass(frozen=True)
class StudentExport:
    """One exported student: its directory, the files written there, the checkpoint epoch they hold."""

    student: str
    directory: str
    files: list[str]
    epoch: int
    epochs: int  # the run's optim.epochs
    step: int = 0  # steps of the next epoch, for a checkpoint written inside one

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    @property
    def position(self) -> str:
        """``epoch 2 of 3`` or ``step 400 of epoch 3 of 3``."""
        return f"{checkpoint.Position(self.epoch, self.step)} of {self.epochs}"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """The run directory, the format, and each exported student (in the run's order): ``directories``
    and ``paths`` list what was written."""

    run: str
    format: str
    students: list[StudentExport]

    @property
    def directories(self) -> list[str]:
        return [s.directory for s in self.students]

    @property
    def paths(self) -> list[str]:
        """Every file written, student by student, ``config.json`` last in each."""
        return [f for s in self.students for f in s.files]


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """A student read from its checkpoint, checked for the format, ready to write."""

    name: str
    url: str
    model: Encoder
    state: dict[str, Any]
    changes: list[dict[str, Any]]


def run(cfg: RunConfig, storage: Storage, *, run: str | None = None, student: str | None = None, fmt: str = "timm",
        head: bool = False, out: str | None = None) -> ExportResult:
    """Export ``student`` (default: every student) of ``run`` (default ``train.run``) in ``fmt``.

    ``out`` defaults to ``<run>/<student>/export/``; given, it is the directory of a single student,
    or holds one sub-directory per student when several are exported. Every student is read and
    checked before anything is written.
    """
    if fmt not in FORMATS:
        raise SeedError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    run_dir = storage.run_dir(run or cfg.train.run)
    known = students_of(run_dir)
    if student is not None and student not in known:
        raise SeedError(f"{run_dir} has no student {student!r} (known: {', '.join(known)})")
    chosen = [student] if student is not None else known
    loaded = [_load(run_dir, name, fmt) for name in chosen]
    exports = []
    for item in loaded:
        if out is None:
            directory = join(run_dir, item.name, "export")
        else:
            base = out if is_url(out) else os.path.abspath(local_path(out))
            directory = base if len(chosen) == 1 else join(base, item.name)
        exports.append(_write_export(item, directory, run_dir, fmt=fmt, head=head))
    return ExportResult(run_dir, fmt, exports)


def students_of(run_dir: str) -> list[str]:
    """The student names of a run, in its order, from the ``config.yaml`` the student stage wrote."""
    url = join(run_dir, "config.yaml")
    try:
        with fsspec.open(url, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise SeedError(f"no student run at {run_dir}: {url} not found (train students first: seed student)") from exc
    except yaml.YAMLError as exc:
        raise SeedError(yaml_problem(exc, url)) from None
    train = data.get("train") if isinstance(data, dict) else None
    students = train.get("students") if isinstance(train, dict) else None
    if not isinstance(students, list) or not all(isinstance(s, dict) and s.get("arch") for s in students):
        raise SeedError(f"{url}: no train.students list; not a student run's config")
    return [str(s.get("name") or s["arch"]) for s in students]


def timm_changes(arch: str, backbone: nn.Module) -> list[dict[str, Any]]:
    """How ``backbone`` differs from ``timm.create_model(arch, num_classes=0)``: modules of another type
    (or missing) and convolutions with another stride, padding or dilation. Empty: timm builds it as is.

    The reference is built on the CPU (some timm constructors read values back, which the meta device
    cannot) under a forked RNG, so the caller's random stream is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        reference = dict(timm.create_model(arch, pretrained=False, num_classes=0).named_modules())
    mine = dict(backbone.named_modules())
    changes: list[dict[str, Any]] = []
    for name in [*mine, *(n for n in reference if n not in mine)]:
        m, ref = mine.get(name), reference.get(name)
        if type(m) is not type(ref):
            changes.append({"module": name, "timm": _type(ref), "student": _type(m)})
        elif isinstance(m, nn.Conv2d) and isinstance(ref, nn.Conv2d):
            for attr in ("stride", "padding", "dilation"):
                if getattr(m, attr) != getattr(ref, attr):
                    changes.append({"module": name, "attribute": attr, "timm": _plain(getattr(ref, attr)),
                                    "student": _plain(getattr(m, attr))})
    return changes


def _type(module: nn.Module | None) -> str | None:
    return None if module is None else type(module).__name__


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _load(run_dir: str, name: str, fmt: str) -> _Loaded:
    url = join(run_dir, name, "checkpoint.pt")
    if not checkpoint.exists(url):
        raise SeedError(f"student {name} has no checkpoint: {url} not found (it has not finished an epoch yet)")
    model, state = checkpoint.load_student(url)  # a file that is no student checkpoint is named there
    changes = timm_changes(state["arch"], model.backbone)
    if fmt == "timm" and changes:
        what = "; ".join(_change_text(c) for c in changes)
        raise SeedError(f"{url}: student {name} ({state['arch']}, small_input={bool(state.get('small_input'))}) differs "
                        f"from timm's own {state['arch']} ({what}) and no timm.create_model argument builds that; "
                        "export it with format safetensors, whose config.json lists these changes")
    epochs = _planned_epochs(state)
    if int(state["epoch"]) < epochs:
        log.warning("%s: exporting %s of a %d-epoch run (the run has not finished)", url,
                    checkpoint.Position.of(state), epochs)
    return _Loaded(name, url, model, state, changes)


def _change_text(change: dict[str, Any]) -> str:
    if "attribute" in change:
        return f"{change['module']}.{change['attribute']} {change['student']} instead of {change['timm']}"
    return f"{change['module'] or 'model'} is {change['student']} instead of {change['timm']}"


def _planned_epochs(state: dict[str, Any]) -> int:
    """The run's ``train.optim.epochs`` (``train.epochs`` before seed 0.2) as the checkpoint recorded it."""
    train = (state.get("config") or {}).get("train") or {}
    return int((train.get("optim") or {}).get("epochs", train.get("epochs", state["epoch"])))


def describe(item: _Loaded, run_dir: str, *, head: bool) -> dict[str, Any]:
    """The project's own description of an export: how to build, feed and trust the weights."""
    model, state = item.model, item.state
    config = state.get("config") or {}
    resolution = int((config.get("cache") or {}).get("resolution", 0)) or None
    epoch, epochs = int(state["epoch"]), _planned_epochs(state)
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "architecture": state["arch"],
        "timm_kwargs": {"num_classes": 0},
        "small_input": bool(state.get("small_input", False)),
        "timm_changes": item.changes,
        "feature_dim": model.feature_dim,
        "input_size": [3, resolution, resolution] if resolution else None,
        "input": "RGB in [0, 1], normalised as (x - mean) / std before the backbone",
        "mean": _float32_list(model.mean),
        "std": _float32_list(model.std),
        "interpolation": INTERPOLATION,
        "crop_pct": 1.0,
        "weights": WEIGHTS,
        "head": _head_description(model.head) if head else None,
        "run": run_dir,
        "student": item.name,
        "checkpoint": item.url,
        "epoch": epoch,
        "step": int(state.get("step", 0)),  # steps of the next epoch (0: the checkpoint ends an epoch)
        "epochs": epochs,
        "finished": epoch >= epochs,
        "mode": state.get("mode"),
        "teacher": (config.get("teacher") or {}).get("arch"),
        "cache_fingerprint": state.get("cache_fingerprint"),
        "timm_version": timm.__version__,
    }


def _float32_list(t: torch.Tensor) -> list[float]:
    """Float32 values as their shortest decimals (0.485, not 0.48500001430511475): the same float32 when read."""
    return [float(str(np.float32(v))) for v in t.flatten().tolist()]


def _head_description(head: nn.Module) -> dict[str, Any]:
    layers: list[dict[str, Any]] = []
    for m in head.children():
        if isinstance(m, nn.Linear):
            layers.append({"type": "Linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None})
        else:
            layers.append({"type": type(m).__name__})
    return {"file": HEAD, "prefix": "head.", "layers": layers}


def timm_config(item: _Loaded, description: dict[str, Any]) -> dict[str, Any]:
    """timm's hub ``config.json`` (as ``timm.models.save_config_for_hf`` lays it out) for a headless backbone.

    ``pretrained_cfg`` keeps the architecture's own ``first_conv``, ``classifier`` and
    ``fixed_input_size`` and replaces what describes ImageNet weights (input size, crop, tag, licence)
    with this student's; timm reads only ``PretrainedCfg`` fields there, so the rest goes under ``seed``.
    """
    backbone = item.model.backbone
    default = getattr(backbone, "pretrained_cfg", None) or {}
    pretrained_cfg = {
        "architecture": item.state["arch"],
        "custom_load": False,
        "input_size": description["input_size"] or list(default.get("input_size", (3, 224, 224))),
        "fixed_input_size": bool(default.get("fixed_input_size", False)),
        "interpolation": INTERPOLATION,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": description["mean"],
        "std": description["std"],
        "num_classes": 0,
        "pool_size": None,
        "first_conv": default.get("first_conv"),
        "classifier": default.get("classifier"),
        "description": f"SEED student {item.name}, "
                       f"{checkpoint.Position(description['epoch'], description['step'])} of {description['epochs']}, "
                       f"pooled features ({description['feature_dim']}-d)",
    }
    return {"architecture": pretrained_cfg.pop("architecture"), "num_classes": 0,
            "num_features": int(getattr(backbone, "num_features", description["feature_dim"])),
            "pretrained_cfg": pretrained_cfg, "seed": description}


def _write_export(item: _Loaded, directory: str, run_dir: str, *, fmt: str, head: bool) -> StudentExport:
    description = describe(item, run_dir, head=head)
    config = timm_config(item, description) if fmt == "timm" else description
    # config.json last, and an earlier one gone first: a complete config.json describes the files beside it,
    # also when this export is cut short (a re-export killed part-way leaves no config at all)
    _remove(join(directory, CONFIG))
    written = [join(directory, WEIGHTS)]
    write_bytes(written[0], _safetensors(item.model.backbone.state_dict()))
    if head:
        written.append(join(directory, HEAD))
        write_bytes(written[-1], _safetensors({f"head.{k}": v for k, v in item.model.head.state_dict().items()}))
    else:
        _remove(join(directory, HEAD))  # an earlier export's head no longer matches this backbone
    written.append(join(directory, CONFIG))
    write_bytes(written[-1], (json.dumps(config, indent=2) + "\n").encode())
    return StudentExport(item.name, directory, written, description["epoch"], description["epochs"], description["step"])


def _safetensors(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes; cloned, since safetensors refuses views and shared storage."""
    return safetensors.torch.save({k: v.detach().cpu().clone().contiguous() for k, v in state.items()},
                                  metadata={"format": "pt"})


def _remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm_file(path)
