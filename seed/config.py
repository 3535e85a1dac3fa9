"""Typed run configuration: defaults in one place, YAML in, overrides on top, clear errors out.

A run config is YAML mapping onto ``RunConfig``; unknown keys and wrong types are errors naming the
field (``teacher.arch: expected str, got int``). ``--set teacher.arch=resnet18`` style overrides
are applied on the mapping before validation, so they are checked the same way.

Example:
    >>> cfg = load_config(None, overrides=["cache.views=2", "teacher.arch=resnet18"])
    >>> cfg.cache.views, cfg.teacher.arch
    (2, 'resnet18')
"""

from __future__ import annotations

import dataclasses
import math
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from seed.views import Recipe
from seed.errors import SeedError
from seed.storage import Storage, exists, join, load_yaml, read_json


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the input shards are: brace patterns, globs, ``::`` lists or fsspec URLs.

    Relative paths are resolved against the ``shards`` root of ``storage.yaml``.
    """

    train: str = "fashion-mnist/train/train-{000000..000059}.tar"
    test: str = "fashion-mnist/test/test-{000000..000009}.tar"
    # A damaged tar (cut short, bad header, data after its end): "stop" names it and stops the stage;
    # "keep" keeps the samples before the damage and records the shard as damaged (seed inspect shows it)
    damaged: Literal["stop", "keep"] = "stop"


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The frozen teacher: a timm architecture and a local checkpoint (no hub access).

    ``output``: ``head`` caches the projection head (SEED uses MoCo-v2's 128-d MLP head);
    ``pooled`` caches the pooled backbone features. ``format``: ``auto`` detects timm/torchvision,
    MoCo, SwAV and DINO checkpoints from their keys.
    """

    arch: str = "resnet10t"
    checkpoint: str | None = None
    format: Literal["auto", "timm", "moco", "swav", "dino"] = "auto"
    output: Literal["head", "pooled"] = "head"
    dino_weights: Literal["teacher", "student"] = "teacher"
    head_activation: Literal["auto", "relu", "gelu"] = "auto"
    allow_missing_keys: bool = False
    allow_unexpected_keys: bool = False
    small_input: bool = False  # stride-1 stem without max-pool (CIFAR-style), for 28-32 px images


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The teacher pass: V views per image at ``resolution`` px, seeded by ``seed``.

    ``shard_capacity`` is the row slot of each input shard (0 = the largest shard's sample count);
    rows of different shards never share a Zarr chunk.
    """

    name: str = "fashion-mnist-resnet10t"
    views: int = 4
    resolution: int = 32
    seed: int = 0
    batch_size: int = 256
    shard_capacity: int = 0
    prefetch: int = -1  # batches made ahead of the forward (-1 = auto: seed.devices.read_ahead)
    device: str = "auto"
    cpu_threads: int = 0  # intra-op threads of CPU forwards, fixed per cache (0 = this machine's default)
    workers: int = -1  # decoding/augmentation processes, each owning whole shards (-1 = auto: seed.devices.data_workers)
    cuda_graph: bool = True  # on CUDA, replay the teacher's forward as one CUDA graph (pipeline.teacher.Forward)
    fused_augment: bool = False  # on CUDA, the views made by Triton kernels (seed.augment_kernels)
    recipe: Recipe = dataclasses.field(default_factory=Recipe)


@dataclasses.dataclass(frozen=True)
class BankConfig:
    """The instance bank and cached teacher targets (SEED: K = 65536, tau_T = 1e-4)."""

    size: int = 4096
    rotations: int = 1  # R > 1: R disjoint banks with their own targets; a student uses bank epoch mod R
    topk: int = 64
    tau_t: float = 1e-4
    seed: int = 0
    index: Literal["flat", "ivf", "hnsw", "torch"] = "flat"
    normaliser: Literal["auto", "exact", "sampled"] = "auto"  # auto: exact for flat/torch, sampled for ivf/hnsw
    tail_samples: int = 1024
    ivf_lists: int = 0  # 0 = about 4 sqrt(K)
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    batch_size: int = 4096
    kl_sample: int = 2048

    @property
    def exact_normaliser(self) -> bool:
        """Whether log Z sums over the whole bank (``auto``: for the exact indices) or is sampled."""
        return self.normaliser == "exact" or (self.normaliser == "auto" and self.index in ("flat", "torch"))


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """One student: a timm architecture plus the SEED head Linear(d, d) - ReLU - Linear(d, D)."""

    arch: str = "mobilenetv3_small_050"
    name: str = ""  # run sub-directory; defaults to the architecture
    small_input: bool = False

    @property
    def label(self) -> str:
        return self.name or self.arch


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum; learning rate ``base_lr x batch_size x ranks / 256``, linear warm-up then cosine.

    SEED's recipe (Fang et al. 2021): momentum 0.9, weight decay 1e-4, lr 0.03 per 256 images,
    5 warm-up epochs of 200 on ImageNet (short runs here warm up for a fraction of an epoch).
    """

    epochs: int = 2
    batch_size: int = 256
    base_lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.2


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """The training data path: a seeded shuffle buffer of ``shuffle_buffer`` encoded examples, batches
    made ``prefetch`` ahead (-1 = auto: ``seed.devices.read_ahead``), decoded and augmented by ``workers``
    processes (-1 = auto: ``seed.devices.data_workers``). The batches are the same for any number of
    workers and any read-ahead. ``fused_augment``: on CUDA, the views made by Triton kernels (crops, jitter,
    blur; ``seed.augment_kernels``; the same views up to float rounding). The evaluation stage reads
    ``train.loader``'s ``workers``, ``prefetch`` and ``fused_augment`` too (decoding and resizing for every
    encoder's forward)."""

    shuffle_buffer: int = 2048
    prefetch: int = -1
    workers: int = -1
    fused_augment: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Student training: which targets, which students, the SEED temperatures; ``optim`` and ``loader`` sections.

    ``mode``: ``cached`` reads teacher embeddings and targets from the cache (no teacher);
    ``online`` runs the teacher on every batch with a FIFO queue of ``queue`` embeddings, as the
    official code. ``targets``: ``sparse`` uses the cached top-k, ``dense`` recomputes p_T from the
    cached embedding and bank. ``tau_t`` 0 means the bank's.
    """

    run: str = "demo"
    mode: Literal["cached", "online"] = "cached"
    targets: Literal["sparse", "dense"] = "sparse"
    tail: Literal["uniform", "lumped", "renorm"] = "renorm"  # sparse targets: the mass the top-k miss (seed.loss.Tail)
    view: Literal["random", "cycle"] = "random"
    students: tuple[StudentConfig, ...] = (StudentConfig(),)
    tau_s: float = 0.2
    tau_t: float = 0.0
    # cached mode: "fixed" = the bank stage's sampled bank and cached targets; "queue" = a FIFO of the cached
    # teacher embeddings of the views trained on (the official queue, with no teacher), dense targets
    bank: Literal["fixed", "queue"] = "fixed"
    queue: int = 0  # online and bank=queue: the queue's length (0 = bank.size)
    seed: int = 0
    device: str = "auto"
    nproc: int = 1  # processes on this node (torchrun; one per GPU on CUDA); 0 = one per visible GPU
    # per-step TensorBoard event files in <run>/<student>/tb/; None = when installed and the runs root is local
    tensorboard: bool | None = None
    # a resumable checkpoint every this many steps inside an epoch too (0 = at epochs' ends only)
    checkpoint_steps: int = 1000
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A teacher made here: MoCo-v2 (He et al. 2020; Chen et al. 2020) or supervised cross-entropy."""

    name: str = "teacher-moco"
    method: Literal["moco", "supervised"] = "moco"
    arch: str = "resnet10t"
    small_input: bool = False
    dim: int = 128
    queue: int = 4096
    key_momentum: float = 0.99  # 0.999 in MoCo for 200 ImageNet epochs; faster for short runs
    temperature: float = 0.2
    # MoCo's Shuffle-BN: G > 1 key and query BatchNorm sub-batches in one process (keys shuffled across them);
    # under DDP any G > 0 shuffles the keys across the ranks instead. 0 = off
    shuffle_bn: int = 0
    seed: int = 0
    device: str = "auto"
    nproc: int = 1  # as train.nproc: processes on this node (torchrun; one per GPU on CUDA); 0 = one per visible GPU
    checkpoint_steps: int = 1000  # as train.checkpoint_steps
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(epochs=3, base_lr=0.06))
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    bank: BankConfig = dataclasses.field(default_factory=BankConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        _check_positive(self, "cache.views", self.cache.views)
        _check_positive(self, "cache.resolution", self.cache.resolution)
        _check_positive(self, "cache.batch_size", self.cache.batch_size)
        _check_positive(self, "bank.size", self.bank.size)
        _check_positive(self, "bank.topk", self.bank.topk)
        _check_positive(self, "bank.batch_size", self.bank.batch_size)
        _check_positive(self, "bank.tail_samples", self.bank.tail_samples)
        if self.cache.prefetch < -1:
            raise SeedError(f"cache.prefetch must be >= 0, or -1 for automatic, got {self.cache.prefetch}")
        if self.cache.cpu_threads < 0:
            raise SeedError(f"cache.cpu_threads must be >= 0 (0 = automatic), got {self.cache.cpu_threads}")
        for name, workers in (("cache", self.cache.workers), ("train.loader", self.train.loader.workers),
                              ("pretrain.loader", self.pretrain.loader.workers)):
            if workers < -1:
                raise SeedError(f"{name}.workers must be >= 0, or -1 for automatic, got {workers}")
        for name, loader in (("train.loader", self.train.loader), ("pretrain.loader", self.pretrain.loader)):
            _check_positive(self, f"{name}.shuffle_buffer", loader.shuffle_buffer)
            if loader.prefetch < -1:
                raise SeedError(f"{name}.prefetch must be >= 0 (0 = no read-ahead), or -1 for automatic, "
                                f"got {loader.prefetch}")
        for name, nproc in (("train.nproc", self.train.nproc), ("pretrain.nproc", self.pretrain.nproc)):
            if nproc < 0:
                raise SeedError(f"{name} must be >= 0 (0 = one process per visible GPU), got {nproc}")
        if self.cache.shard_capacity < 0:
            raise SeedError(f"cache.shard_capacity must be >= 0 (0 = automatic), got {self.cache.shard_capacity}")
        if not self.bank.tau_t > 0:
            raise SeedError(f"bank.tau_t must be > 0, got {self.bank.tau_t}")
        for name, value in (("cache.seed", self.cache.seed), ("bank.seed", self.bank.seed),
                            ("train.seed", self.train.seed), ("pretrain.seed", self.pretrain.seed)):
            if value < 0:  # numpy's seeding takes non-negative integers only
                raise SeedError(f"{name} must be >= 0, got {value}")
        for name in ("epochs", "batch_size"):
            _check_positive(self, f"train.optim.{name}", getattr(self.train.optim, name))
            _check_positive(self, f"pretrain.optim.{name}", getattr(self.pretrain.optim, name))
        for name, value in (("bank.rotations", self.bank.rotations), ("bank.nprobe", self.bank.nprobe),
                            ("bank.hnsw_m", self.bank.hnsw_m), ("bank.ef_search", self.bank.ef_search),
                            ("pretrain.dim", self.pretrain.dim), ("pretrain.queue", self.pretrain.queue)):
            _check_positive(self, name, value)
        for name, value in (("bank.ivf_lists", self.bank.ivf_lists), ("bank.kl_sample", self.bank.kl_sample),
                            ("train.queue", self.train.queue), ("train.checkpoint_steps", self.train.checkpoint_steps),
                            ("pretrain.checkpoint_steps", self.pretrain.checkpoint_steps)):
            if value < 0:
                raise SeedError(f"{name} must be >= 0, got {value}")
        for name, temperature, strict in (("train.tau_s", self.train.tau_s, True), ("train.tau_t", self.train.tau_t, False),
                                          ("pretrain.temperature", self.pretrain.temperature, True)):
            if not math.isfinite(temperature) or temperature < 0 or (strict and temperature == 0):
                raise SeedError(f"{name} must be {'>' if strict else '>='} 0, got {temperature}")
        if not 0 <= self.pretrain.key_momentum <= 1:
            raise SeedError(f"pretrain.key_momentum must be within [0, 1], got {self.pretrain.key_momentum}")
        for section, o in (("train.optim", self.train.optim), ("pretrain.optim", self.pretrain.optim)):
            for name in ("base_lr", "weight_decay", "warmup_epochs"):
                rate = float(getattr(o, name))
                if not math.isfinite(rate) or rate < 0:
                    raise SeedError(f"{section}.{name} must be >= 0, got {rate}")
            if not 0 <= o.momentum < 1:
                raise SeedError(f"{section}.momentum must be within [0, 1), got {o.momentum}")
        if not self.train.students:
            raise SeedError("train.students must list at least one student")
        for i, student in enumerate(self.train.students):
            if not str(student.arch or "").strip():
                raise SeedError(f"train.students[{i}].arch must name a timm architecture, got {student.arch!r}")
        labels = [s.label for s in self.train.students]
        if len(set(labels)) != len(labels):
            raise SeedError(f"train.students: names must differ (got {labels}); set name: for repeated architectures")
        names = [("cache.name", self.cache.name), ("train.run", self.train.run), ("pretrain.name", self.pretrain.name)]
        names += [(f"train.students[{i}].name", s.label) for i, s in enumerate(self.train.students)]
        for key, text in names:
            _check_name(key, text)


def _check_name(name: str, value: str) -> None:
    """A name that becomes a path under a storage root stays under it: relative, no ``..``, no empty part."""
    parts = value.replace("\\", "/").split("/")
    if not value or value.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise SeedError(f"{name} must be a name under its storage root (sub-directories with '/'; no '..' or '.' "
                        f"part, no empty part, no leading '/'), got {value!r}")


def _check_positive(_: object, name: str, value: int) -> None:
    if value <= 0:
        raise SeedError(f"{name} must be > 0, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting lists to tuples, ints to floats)."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SeedError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise SeedError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except SeedError as exc:
                errors.append(str(exc))
        raise SeedError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is tuple and len(get_args(tp)) == 2 and get_args(tp)[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise SeedError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SeedError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; it means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SeedError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SeedError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SeedError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SeedError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {where} has an unsupported annotation {tp}")  # a bug in this module


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build the dataclass ``cls`` from a mapping; unknown keys and bad types name the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in names:
            moved = [f"{prefix}{name}.{key}" for name in sorted(names)
                     if dataclasses.is_dataclass(hints[name]) and key in {f.name for f in dataclasses.fields(hints[name])}]
            if moved:
                raise SeedError(f"config key {prefix}{key} is now {moved[0]} (optimiser and data-path settings "
                                "have their own sections since seed 0.2)")
            raise SeedError(f"unknown config key {prefix}{key} (known: {', '.join(sorted(names))})")
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[f.name])}
    kwargs = {k: _convert(_with_defaults(v, defaults.get(k)), hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # validation in __post_init__ of nested recipes
        raise SeedError(str(exc)) from exc


def _with_defaults(value: Any, default: Any) -> Any:
    """A partial mapping for a nested section, completed from that section's default in its parent.

    ``pretrain: {optim: {epochs: 5}}`` keeps pre-training's own default learning rate, not the
    ``OptimConfig`` class default.
    """
    if default is None or not isinstance(value, dict):
        return value
    return {**to_dict(default), **value}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-ready data (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def write_run_files(cfg: RunConfig, storage: Storage, directory: str | Path) -> tuple[str, str]:
    """The resolved config and the storage roots as ``run.yaml`` and ``storage.yaml`` in ``directory``:
    what a process this one starts reads (``-c run.yaml --storage storage.yaml``) to run exactly ``cfg``."""
    config, roots = Path(directory, "run.yaml"), Path(directory, "storage.yaml")
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=True))
    roots.write_text(yaml.safe_dump(dataclasses.asdict(storage)))
    return str(config), str(roots)


def outcome(section: Any) -> dict[str, Any]:
    """A train or pretrain section as plain data without the settings that cannot change what training
    produces (device, TensorBoard logging, how often checkpoints are written, data-path workers and read-ahead,
    the augmentation kernels, which change views by float rounding as the device does): what decides whether a
    finished run is reused."""
    data = to_dict(section) if dataclasses.is_dataclass(section) else dict(section)
    data.pop("device", None)
    data.pop("tensorboard", None)  # logging, not training: switching it never retrains a finished run
    data.pop("checkpoint_steps", None)
    loader = data.get("loader")
    if isinstance(loader, dict):
        data["loader"] = {k: v for k, v in loader.items() if k not in ("workers", "prefetch", "fused_augment")}
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) onto a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise SeedError(f"override {item!r} must look like section.field=value")
        path, raw = item.split("=", 1)
        if not path.strip():
            raise SeedError(f"override {item!r} names no field before '=': it must look like section.field=value")
        node = data
        parts = path.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SeedError(f"override {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise SeedError(f"override {item!r}: the value is not valid YAML ({problem}); a text value with braces, "
                            f"commas or colons goes in YAML quotes (--set '{path.strip()}=\"...\"'), a list or mapping "
                            f"in YAML's flow style (--set 'train.students=[{{arch: resnet18}}]')") from None
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (or the defaults when ``path`` is None) with overrides applied."""
    data = load_yaml(path, "config") if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A resolved config and where each field's value came from: ``sources`` maps dotted field names
    (``cache.views``; a list such as ``train.students`` is one field) to ``default``, the config file
    as named, or ``--set``. Fields absent from ``sources`` are defaults."""

    config: RunConfig
    sources: dict[str, str]

    def source(self, field: str) -> str:
        return self.sources.get(field, "default")


def _leaves(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the non-mapping values in a nested mapping (lists are leaves)."""
    out: list[str] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        out += _leaves(value, name + ".") if isinstance(value, dict) else [name]
    return out


def resolve_config(path: str | Path | None, overrides: list[str] | None = None, *,
                   label: str | None = None) -> Resolved:
    """``load_config`` plus the origin of every field set by the file or an override, for ``seed config``.

    A ``--set`` of a whole section (``--set train.optim='{epochs: 5}'``) replaces that section of the
    file, as ``apply_overrides`` does, so the file's other values in it fall back to defaults.
    ``label`` names the file in ``sources`` (default: ``path`` as given).
    """
    cfg = load_config(path, overrides)  # validates first: every override below is well formed
    named = label or (str(path) if path is not None else "")
    sources = {name: named for name in _leaves(load_yaml(path, "config"))} if path is not None else {}
    for item in overrides or []:
        field, raw = (part.strip() for part in item.split("=", 1))
        sources = {k: v for k, v in sources.items() if k != field and not k.startswith(field + ".")}
        value = yaml.safe_load(raw)
        sources.update({f"{field}.{leaf}": "--set" for leaf in _leaves(value)} if isinstance(value, dict)
                       else {field: "--set"})
    return Resolved(cfg, sources)


def _flow(value: Any) -> str:
    """One value as single-line YAML (flow style for lists and mappings)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def format_resolved(resolved: Resolved) -> str:
    """The resolved config as YAML that ``load_config`` reads back, each field followed by ``# <source>``."""
    rows: list[tuple[str, str]] = []  # (text, comment); comment "" for section headers

    def walk(node: dict[str, Any], prefix: str, depth: int) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                rows.append((f"{'  ' * depth}{key}:", ""))
                walk(value, f"{prefix}{key}.", depth + 1)
            else:
                rows.append((f"{'  ' * depth}{key}: {_flow(value)}", resolved.source(f"{prefix}{key}")))

    walk(to_dict(resolved.config), "", 0)
    width = min(max(len(text) for text, comment in rows if comment), 56)
    given = set(resolved.sources.values())
    layers = ["defaults", *sorted(given - {"--set"}), *(["--set"] if "--set" in given else [])]
    head = ["# resolved run config: " + " < ".join(layers),
            "# (the comment after each field says where its value came from)"]
    return "\n".join(head + [f"{text:<{width}}  # {comment}" if comment else text for text, comment in rows]) + "\n"


def templates() -> list[str]:
    """Names of the commented starting configs shipped in ``seed/templates`` (``seed config --template``)."""
    folder = importlib.resources.files("seed").joinpath("templates")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def template(name: str) -> str:
    """The text of template ``name``: comments say what each field is and why it has its value."""
    if name not in templates():
        raise SeedError(f"no config template {name!r} (known: {', '.join(templates())})")
    return importlib.resources.files("seed").joinpath("templates", f"{name}.yaml").read_text()


def require_cache(cfg: RunConfig, storage: Storage, configs: str | Path = "configs") -> str:
    """The URL of ``cfg``'s cache; when there is none, a one-line ``SeedError`` listing the caches that are
    under the caches root, each with its status and the config file in ``configs`` that names it.

    Why: the stage defaults are not the demo's, so ``seed student`` without ``-c`` after ``make demo``
    looks for a cache that was never made, next to the one that was.
    """
    url = storage.cache_url(cfg.cache.name)
    if exists(join(url, "zarr.json")):
        return url
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(storage.caches)
    found = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(join(root, "*.zarr")))
    if not found:
        raise SeedError(f"no cache at {url}, and none under {storage.caches}: make one with `seed teacher -c run.yaml`, "
                        "or pass the config that made yours")
    naming: dict[str, list[str]] = {}
    for file in sorted(Path(configs).glob("*.y*ml")):
        try:
            name = ((yaml.safe_load(file.read_text()) or {}).get("cache") or {}).get("name")
        except (yaml.YAMLError, AttributeError, OSError):
            continue
        if isinstance(name, str):
            naming.setdefault(f"{name}.zarr", []).append(str(file))
    described = []
    for stem in found[:6]:
        try:
            attrs = (read_json(join(storage.caches, stem, "zarr.json")) or {}).get("attributes", {})
        except SeedError:  # a damaged cache beside the one asked for must not hide the others
            attrs = {"status": "its zarr.json is damaged"}
        files = naming.get(stem)
        how = (f"; pass -c {' or -c '.join(files)}" if files
               else f"; its run config is attributes.config in {stem}/zarr.json" if "config" in attrs else "")
        described.append(f"{stem} ({attrs.get('status', 'not a seed cache')}{how})")
    more = f" and {len(found) - 6} more" if len(found) > 6 else ""
    raise SeedError(f"no cache at {url} (cache.name={cfg.cache.name}); caches there: {', '.join(described)}{more}")
