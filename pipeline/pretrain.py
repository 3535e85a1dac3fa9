"""Pre-training stage: make a teacher (MoCo-v2 or supervised) when the user has none.

MoCo-v2 writes its query encoder in the MoCo checkpoint layout (``module.encoder_q.*`` with the
MLP head as ``fc.0``/``fc.2``) and supervised training a timm state dict with its classifier;
both load through ``seed.teachers`` like checkpoints made elsewhere. The same loop trains the
MoCo-v2-only student baseline that SEED is compared against.

``pretrain.nproc`` > 1 trains in that many processes on this node, as the student stage does: ``launch``
starts ``torchrun`` over ``pipeline.cli pretrain`` (``seed.launcher``), one rank per GPU on CUDA; MoCo's
Shuffle-BN then shuffles the keys across the ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from seed import cache, checkpoint
from seed.checkpoint import Position
from seed.config import PretrainConfig, RunConfig, TeacherConfig, outcome, to_dict, write_run_files
from seed.data import FreshViews, rank_shards, sampled_label_mix
from seed.devices import Launch, join_process_group, resolve_device
from seed.errors import SeedError
from seed.launcher import node_processes, torchrun
from seed.models import Encoder, create_backbone, feature_dim, mlp_encoder
from seed.objectives import Objective, ObjectiveFactory, Queue, create_objective
from seed.shards import Damaged, classes_from_info, damage_handler, expand_urls, iter_shard, shard_lengths
from seed.storage import Storage, join
from seed.teachers import save_moco_checkpoint
from seed.train import Loop, make_member, train
from seed.views import recipe_fields

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """The teacher checkpoint written (or reused: ``skipped``) and the teacher section that reads it."""

    checkpoint: str
    skipped: bool
    teacher: TeacherConfig
    metrics: list[dict[str, Any]]


def teacher_config(cfg: RunConfig, path: str) -> TeacherConfig:
    """The teacher section that reads what ``run`` wrote."""
    p = cfg.pretrain
    return TeacherConfig(arch=p.arch, checkpoint=path, format="moco" if p.method == "moco" else "timm",
                         output="head" if p.method == "moco" else "pooled", small_input=p.small_input)


def with_pretrained(asked: TeacherConfig, made: TeacherConfig) -> TeacherConfig:
    """The teacher section of a run that pre-trains its teacher: what pre-training decides (architecture,
    checkpoint, format, stem) from ``made``; everything else as ``asked`` (head activation, key checks), and
    the pooled features when asked for them instead of a MoCo teacher's head."""
    output = "pooled" if asked.output == "pooled" else made.output
    return dataclasses.replace(asked, arch=made.arch, checkpoint=made.checkpoint, format=made.format,
                               small_input=made.small_input, output=output)


def trains(cfg: RunConfig, urls: list[str], lengths: list[int]) -> dict[str, Any]:
    """What decides the teacher pre-training makes: its section (less device and data-path settings), the
    ranks it trains in (on all nodes: under ``torchrun`` its world, else ``processes``), the training shards
    (their pattern, file names and sample counts, as the teacher cache's fingerprint has them: another storage
    root with the same layout is other data), and the views it trains on (the recipe at the resolution). A
    finished export or an epoch checkpoint is reused only when this is the same."""
    section = outcome(cfg.pretrain)
    section.pop("nproc")  # the ranks in all, below, are what changes the training (the batches, the learning rate)
    launched = Launch.from_env()
    world = launched.world if launched.world > 1 else processes(cfg)
    ranks = {"ranks": world} if world > 1 else {}  # one process: as every export made before ranks were recorded
    return json.loads(json.dumps({"pretrain": section, **ranks, "data": cfg.data.train,
                                  "shards": [u.rsplit("/", 1)[-1] for u in urls], "shard_lengths": list(lengths),
                                  "recipe": recipe_fields(cfg.cache.recipe), "resolution": cfg.cache.resolution}))


VIEW_SEED_OFFSET = 7  # pre-training's views are drawn from pretrain.seed + 7, in the cache's (seed, key, view) space


def pretraining_views(cfg: RunConfig, n_views: int, urls: Sequence[str] = (),
                      lengths: Sequence[int] = ()) -> FreshViews:
    """The views pre-training trains on: ``n_views`` new ones per image and epoch, from ``pretrain.seed + 7``, of
    the shards ``urls`` of ``lengths`` samples (``FreshViews.over``)."""
    return FreshViews.over(urls, lengths, cfg.cache.recipe, seed=cfg.pretrain.seed + VIEW_SEED_OFFSET, n_views=n_views,
                           damaged=cfg.data.damaged)


def view_overlap_note(cfg: RunConfig) -> str | None:
    """A warning when pre-training would draw the very views the cache then embeds: both draw view ``i`` of an
    image from (seed, key, i), pre-training from ``pretrain.seed + 7`` and the cache from ``cache.seed``."""
    if cfg.pretrain.seed + VIEW_SEED_OFFSET != cfg.cache.seed:
        return None
    return (f"pretrain.seed {cfg.pretrain.seed} and cache.seed {cfg.cache.seed}: pre-training draws its views from "
            f"pretrain.seed + {VIEW_SEED_OFFSET}, so the teacher is pre-trained on the very views the cache then "
            "embeds (its first views of every image); choose another cache.seed or pretrain.seed")


def num_classes(urls: list[str], damaged: Damaged = "stop") -> int:
    """Largest label + 1: from the shards' ``_info.json`` when it records it (``seed shards`` does), else by
    reading every shard's labels (a pass over the whole set's headers, seeking over its images where the store
    can, with a log line saying so)."""
    recorded = classes_from_info(urls)
    if recorded is not None:
        return recorded
    log.info("counting the classes of %d shards: reading all their labels (no _info.json beside them records "
             "num_classes; seed shards describe writes one, once)", len(urls))
    labels = {s.label for u in urls for s in iter_shard(u, damage_handler(damaged), images=False)}
    if -1 in labels or not labels:
        raise SeedError("supervised pre-training needs a label (.cls or .json) on every training sample")
    return max(labels) + 1


def build(p: PretrainConfig, n_classes: int = 0) -> Encoder:
    """MoCo-v2: backbone + MLP head of ``p.dim``; supervised: backbone + linear classifier."""
    if p.method == "moco":
        return mlp_encoder(p.arch, p.dim, small_input=p.small_input)
    backbone = create_backbone(p.arch, small_input=p.small_input)
    return Encoder.for_backbone(backbone, nn.Linear(feature_dim(backbone), n_classes))


def resumable(cfg: RunConfig, storage: Storage, what: dict[str, Any] | None = None) -> Position:
    """Where an interrupted pre-training of these settings can continue from (false: none); a checkpoint of its
    last epoch whose teacher was not exported counts (the run then only exports it). ``what``: its ``trains``,
    when the caller has them."""
    p = cfg.pretrain
    url = join(storage.resolve("runs", p.name), p.method, "checkpoint.pt")
    if not checkpoint.exists(url):
        return Position()
    if what is None:
        what = _trains(cfg, storage)[2]
    state = checkpoint.load(url)
    at = Position.of(state)
    if state.get("trains") != what or at.epoch > p.optim.epochs:
        return Position()
    if at.epoch == p.optim.epochs and _exported(cfg, storage, what):  # resumable only while its export is missing
        return Position()
    return at


def run(cfg: RunConfig, storage: Storage, *, resume: bool = False, progress: bool = True,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
        objective: ObjectiveFactory | None = None) -> PretrainResult:
    """Train and export the teacher; a finished export with the same config is reused. ``objective`` replaces the
    registered class of ``pretrain.method`` (the tests' way to stop a run at a chosen step)."""
    p = cfg.pretrain
    launched = Launch.from_env()
    if launched.local_world != processes(cfg):
        raise SeedError(f"pretrain.nproc={p.nproc} asks for {processes(cfg)} processes on this node but this one is "
                        f"one of {launched.local_world}; run `seed pretrain`, which starts torchrun itself, or set "
                        f"pretrain.nproc={launched.local_world}")
    out = storage.resolve("runs", p.name)
    path = storage.pretrained_teacher(p.name)
    urls, lengths, what = _trains(cfg, storage)
    if done := _exported(cfg, storage, what):
        return done
    device = resolve_device(p.device)
    rank, world = join_process_group(device)
    torch.manual_seed(p.seed)
    model = build(p, num_classes(urls, cfg.data.damaged) if p.method == "supervised" else 0)
    member = make_member(p.method, model, join(out, p.method), optim=p.optim, device=device,
                         meta={"arch": p.arch, "config": to_dict(cfg), "trains": what})
    stored = checkpoint.load(member.checkpoint).get("trains") if checkpoint.exists(member.checkpoint) else None
    if stored is not None and stored != what:
        differs = sorted(k for k in {*stored, *what} if stored.get(k) != what.get(k))
        if resume and differs == ["ranks"]:  # asked to continue, on another number of ranks: nothing is overwritten
            raise SeedError(f"{member.checkpoint}: cannot resume: it was trained on {stored.get('ranks', 1)} rank(s), "
                            f"this run has {what.get('ranks', 1)} (the batches and the learning rate would change); "
                            "resume with pretrain.nproc set to its ranks per node, or start again without --resume")
        if rank == 0:
            log.warning("%s is a checkpoint of other pre-training settings (they differ in %s); pre-training %s "
                        "starts again", member.checkpoint, ", ".join(differs), p.name)
        resume = False
    elif resume and rank == 0 and stored is None:
        log.warning("--resume: pre-training %s has no checkpoint yet; training from the first epoch", p.name)
    elif not resume and rank == 0 and (start := resumable(cfg, storage, what)):
        log.warning("pre-training %s stopped at %s of %d with these settings; starting again from the first "
                    "epoch as asked (pass --resume to continue, the flow does)", p.name, start, p.optim.epochs)
    make = objective or functools.partial(create_objective, p.method)
    method: Objective = (
        make(model=member.model, queue=Queue(p.queue, p.dim, device, p.seed), momentum=p.key_momentum,
             temperature=p.temperature, shuffle_bn=p.shuffle_bn, seed=p.seed)
        if p.method == "moco" else make())
    source = pretraining_views(cfg, method.n_views, urls, lengths)
    if rank == 0 and (note := view_overlap_note(cfg)):
        log.warning(note)
    if rank == 0 and (note := cache.shard_mix_note(sampled_label_mix(urls, lengths), p.loader.shuffle_buffer,
                                                   "pretrain.loader.shuffle_buffer")):
        log.warning("%s: %s", cfg.data.train, note)
    rank_counts = [sum(lengths[i] for i in rank_shards(len(urls), r, world)) for r in range(world)]
    loop = Loop(optim=p.optim, loader=p.loader, seed=p.seed, resolution=cfg.cache.resolution, recipe=cfg.cache.recipe,
                checkpoint_steps=p.checkpoint_steps, section="pretrain")
    metrics = train([member], method, urls, source, rank_counts, loop, device=device, resume=resume,
                    progress=progress, on_epoch=on_epoch)
    if rank == 0:
        encoder = model.cpu()
        extra = {"pretrain": to_dict(p), "data": cfg.data.train, "trains": what, "metrics": metrics, "arch": p.arch}
        if p.method == "moco":
            save_moco_checkpoint(encoder, path, **extra)
        else:  # a timm state dict: backbone keys plus the classifier under the timm name (dropped on load)
            classifier = (getattr(encoder.backbone, "pretrained_cfg", None) or {}).get("classifier", "fc")
            state = dict(encoder.backbone.state_dict())
            state |= {f"{classifier}.{k}": v for k, v in encoder.head.state_dict().items()}
            checkpoint.save({"state_dict": state, **extra}, path)
    return PretrainResult(path, False, teacher_config(cfg, path), metrics)


def _trains(cfg: RunConfig, storage: Storage) -> tuple[list[str], list[int], dict[str, Any]]:
    """The training shards, their sample counts and ``trains`` of them."""
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    lengths = shard_lengths(urls, record=storage.shard_lengths_record(), damaged=cfg.data.damaged)
    return urls, lengths, trains(cfg, urls, lengths)


def _exported(cfg: RunConfig, storage: Storage, what: dict[str, Any]) -> PretrainResult | None:
    """The finished export of these settings (``what``), reused; None when there is none."""
    path = storage.pretrained_teacher(cfg.pretrain.name)
    if not checkpoint.exists(path):
        return None
    done = checkpoint.load(path)
    if done.get("trains") != what:
        return None
    return PretrainResult(path, True, teacher_config(cfg, path), done.get("metrics", []))


def processes(cfg: RunConfig) -> int:
    """Processes pre-training runs in on this node: ``pretrain.nproc``, 0 = one per visible GPU (1 without)."""
    return node_processes(cfg.pretrain.nproc)


def launch(cfg: RunConfig, storage: Storage, *, resume: bool = False,
           on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
           on_line: Callable[[str], None] = print) -> PretrainResult:
    """Pre-train in ``processes(cfg)`` ranks started by ``torchrun`` on this node (``seed.launcher``), and wait;
    a finished export of these settings is reused without starting any. Rank 0's epoch reports go to
    ``on_epoch``, every other line of the ranks' output to ``on_line``; a rank that fails stops them all, and
    the checkpoints written so far stay for ``resume``."""
    _, _, what = _trains(cfg, storage)
    if done := _exported(cfg, storage, what):
        return done
    with tempfile.TemporaryDirectory(prefix="seed-pretrain-") as tmp:
        config, roots = write_run_files(cfg, storage, tmp)
        torchrun(["-m", "pipeline.cli", "pretrain", "-c", config, "--storage", roots, "--events",
                  *(["--resume"] if resume else [])], processes(cfg), stage="pre-training",
                 on_epoch=on_epoch, on_line=on_line)
    made = _exported(cfg, storage, what)
    if made is None:
        raise SeedError(f"torchrun finished but {storage.pretrained_teacher(cfg.pretrain.name)} is not the teacher "
                        "of these pre-training settings")
    return dataclasses.replace(made, skipped=False)
