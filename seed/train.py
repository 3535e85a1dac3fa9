"""One training loop for cached SEED, online SEED, MoCo-v2 and supervised teachers.

The loop owns what every method shares: the data pass, per-step learning rates (warm-up then
cosine), SGD, autocast on CUDA, DDP, checkpoints every epoch, resume, metrics, and the stop on a
non-finite loss. An *objective* owns what differs: how a batch's teacher side is made
(``prepare``), the loss of one trained model (``loss``) and any state updated after the step
(queues, momentum encoders). Several models (students) train on the same decoded batches.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seed import checkpoint
from seed.data import batches, shard_order
from seed.errors import SeedError
from seed.loss import info_nce, seed_loss, seed_loss_sparse
from seed.schedules import warmup_cosine
from seed.storage import join


# ---------------------------------------------------------------------------------------------
# Objectives


class Queue:
    """A FIFO of the K most recent embeddings (MoCo's queue; online SEED's instance queue)."""

    def __init__(self, size: int, dim: int, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(device)  # K x D, random at start (MoCo)
        self.ptr = 0

    @torch.no_grad()
    def push(self, z: torch.Tensor) -> None:
        z = _gather(z.detach().float())
        K = len(self.data)
        n = min(len(z), K)
        idx = (self.ptr + torch.arange(n, device=z.device)) % K
        self.data[idx] = z[-n:]
        self.ptr = int((self.ptr + n) % K)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.copy_(state["data"])
        self.ptr = int(state["ptr"])


def _gather(z: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order (MoCo's concat_all_gather); the input itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    out = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(out, z)
    return torch.cat(out)


class Objective:
    """What differs between methods; the defaults suit objectives without state (one view, no teacher)."""

    n_views = 1
    teacher_forwards = 0

    def prepare(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, ctx: dict[str, torch.Tensor]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CachedSeed(Objective):
    """SEED against the cache: teacher embeddings and targets were computed once, the teacher is never built."""

    def __init__(self, bank_vectors: torch.Tensor, bank_rows: torch.Tensor, *, tau_s: float, tau_t: float, dense: bool):
        self.bank, self.bank_rows = bank_vectors, bank_rows                   # K x D, K
        self.tau_s, self.tau_t, self.dense = tau_s, tau_t, dense

    def prepare(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        ctx = {"z_t": batch.extra["z_t"].to(device), "own": batch.rows.to(device)[:, None] == self.bank_rows[None, :]}
        if not self.dense:
            ctx["cols"], ctx["logp"] = batch.extra["cols"].to(device), batch.extra["logp"].to(device)
        return ctx

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        z_s = F.normalize(model(x).float(), dim=1)                            # B x D
        if self.dense:
            return seed_loss(z_s, ctx["z_t"], self.bank, self.tau_s, self.tau_t, ctx["own"])
        return seed_loss_sparse(z_s, ctx["z_t"], self.bank, ctx["cols"], ctx["logp"], self.tau_s, ctx["own"])


class OnlineSeed(Objective):
    """SEED as published: the frozen teacher embeds every batch; a FIFO queue of K teacher embeddings is the bank."""

    def __init__(self, teacher: nn.Module, queue: Queue, *, tau_s: float, tau_t: float):
        self.teacher, self.queue, self.tau_s, self.tau_t = teacher, queue, tau_s, tau_t
        self.teacher_forwards = 0

    def prepare(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        with torch.no_grad(), _autocast(device):
            z_t = F.normalize(self.teacher(batch.x.to(device)).float(), dim=1)  # B x D
        self.teacher_forwards += len(z_t)
        return {"z_t": z_t}

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        z_s = F.normalize(model(x).float(), dim=1)
        return seed_loss(z_s, ctx["z_t"], self.queue.data, self.tau_s, self.tau_t)

    def after_step(self, ctx: dict[str, torch.Tensor]) -> None:
        self.queue.push(ctx["z_t"])                                           # enqueue after the step, as the official code

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state["queue"])


class MocoV2(Objective):
    """MoCo-v2 (Chen et al. 2020): query encoder trained, key encoder = momentum copy, queue of keys."""

    n_views = 2

    def __init__(self, model: nn.Module, queue: Queue, *, momentum: float, temperature: float):
        # The key encoder keeps its own BatchNorm statistics (momentum-updated parameters only, as MoCo).
        self.key_encoder = copy.deepcopy(_unwrap(model)).requires_grad_(False).train()
        self.model, self.queue, self.m, self.t = model, queue, momentum, temperature

    def prepare(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        B = len(batch.rows)
        x = batch.x.to(device)
        with torch.no_grad():
            self._momentum_update()
            with _autocast(device):
                k = F.normalize(self.key_encoder(x[B:]).float(), dim=1)       # B x D keys of the second views
        return {"k": k, "B": torch.tensor(B)}

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        B = int(ctx["B"])
        q = F.normalize(model(x[:B]).float(), dim=1)                          # B x D queries of the first views
        return info_nce(q, ctx["k"], self.queue.data, self.t)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for pk, pq in zip(self.key_encoder.parameters(), _unwrap(self.model).parameters()):
            pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)

    def after_step(self, ctx: dict[str, torch.Tensor]) -> None:
        self.queue.push(ctx["k"])

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict(), "key_encoder": self.key_encoder.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state["queue"])
        self.key_encoder.load_state_dict(state["key_encoder"])


class Supervised(Objective):
    """Cross-entropy on the shard labels through a linear classifier (a labelled teacher for comparisons)."""

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if (labels < 0).any():
            raise SeedError("supervised pre-training needs labels (.cls or .json) on every sample")
        return F.cross_entropy(model(x).float(), labels)


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Member:
    """One trained model with its optimiser and output directory."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    out: str
    meta: dict[str, Any]
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    base_lr: float
    warmup_epochs: float
    seed: int
    shuffle_buffer: int
    prefetch: int
    resolution: int
    recipe: Any


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group (nccl on GPUs, gloo on CPU) when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def make_member(name: str, model: nn.Module, out: str, *, momentum: float, weight_decay: float, device: torch.device,
                meta: dict[str, Any]) -> Member:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=momentum, weight_decay=weight_decay)
    return Member(name, model, opt, out, meta)


def checkpoint_url(member: Member) -> str:
    return join(member.out, "checkpoint.pt")


def train(members: Sequence[Member], objective: Any, urls: Sequence[str], source: Any, rank_counts: Sequence[int],
          loop: LoopConfig, *, device: torch.device, resume: bool = False, progress: bool = True,
          on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``members`` for ``loop.epochs`` on ``urls``; returns the per-epoch metrics.

    ``rank_counts[r]`` is the number of examples rank r sees per epoch (DDP ranks need the same
    number of steps). Checkpoints go to ``<member.out>/checkpoint.pt`` after every epoch.
    """
    from tqdm import tqdm

    rank, world = distributed()
    steps = min(rank_counts) // loop.batch_size
    if steps == 0:
        raise SeedError(f"batch size {loop.batch_size} is larger than the {min(rank_counts)} examples of a rank; "
                        "lower train.batch_size")
    lr = warmup_cosine(loop.base_lr * loop.batch_size * world / 256, loop.epochs, steps, loop.warmup_epochs)
    start_epoch = _resume(members, objective, steps, loop) if resume else 0
    metrics: list[dict[str, Any]] = list(members[0].history)
    n_shards = len(urls)
    for epoch in range(start_epoch, loop.epochs):
        t0 = time.perf_counter()
        forwards0 = objective.teacher_forwards
        order = shard_order(n_shards, epoch, loop.seed, rank, world)
        totals = np.zeros(len(members))
        for m in members:
            m.model.train()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{loop.epochs}", unit="step", disable=not progress or rank != 0)
        data = batches(urls, order, source, epoch, recipe=loop.recipe, resolution=loop.resolution,
                       batch_size=loop.batch_size, steps=steps, seed=loop.seed, shuffle_buffer=loop.shuffle_buffer,
                       depth=loop.prefetch)
        done = 0
        for step, batch in enumerate(data):
            g = epoch * steps + step
            ctx = objective.prepare(batch, device)
            x = batch.x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            labels = batch.labels.to(device)
            for i, m in enumerate(members):
                for group in m.optimizer.param_groups:
                    group["lr"] = float(lr[g])
                with _autocast(device):
                    loss = objective.loss(m.model, x, ctx, labels)
                if not torch.isfinite(loss):
                    raise SeedError(f"non-finite loss ({loss.item()}) for {m.name} at epoch {epoch + 1}, step {step + 1}; "
                                    f"stopped; the last good checkpoint is {checkpoint_url(m)} (lower the learning rate?)")
                m.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                m.optimizer.step()
                totals[i] += loss.item()
            objective.after_step(ctx)
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0] / done:.4f}", lr=f"{lr[g]:.4f}")
        bar.close()
        if done != steps:
            raise SeedError(f"epoch {epoch + 1}: the shards gave {done} batches, {steps} expected (did the shards change?)")
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "steps": steps, "lr_end": float(lr[(epoch + 1) * steps - 1]), "seconds": round(seconds, 2),
               "images_per_s": round(steps * loop.batch_size * world / seconds, 1),
               "teacher_forwards": int(objective.teacher_forwards - forwards0) * world,
               "loss": {m.name: float(totals[i] / steps) for i, m in enumerate(members)}}
        metrics.append(row)
        if rank == 0:
            _save(members, objective, epoch, metrics)
        if on_epoch is not None and rank == 0:
            on_epoch(epoch, row)
        if dist.is_initialized():
            dist.barrier()
    return metrics


def _save(members: Sequence[Member], objective: Any, epoch: int, metrics: list[dict[str, Any]]) -> None:
    for m in members:
        checkpoint.save({"model": _unwrap(m.model).state_dict(), "optimizer": m.optimizer.state_dict(), "epoch": epoch + 1,
                         "objective": objective.state_dict(), "rng": torch.get_rng_state(), "metrics": metrics,
                         **m.meta}, checkpoint_url(m))
        with _open_text(join(m.out, "metrics.jsonl")) as f:
            f.write("".join(json.dumps({"epoch": r["epoch"], "loss": r["loss"][m.name], "lr_end": r["lr_end"],
                                        "seconds": r["seconds"], "images_per_s": r["images_per_s"],
                                        "teacher_forwards": r["teacher_forwards"]}) + "\n" for r in metrics))


def _open_text(url: str) -> Any:
    import fsspec

    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    return fs.open(path, "w")


def _resume(members: Sequence[Member], objective: Any, steps: int, loop: LoopConfig) -> int:
    """Load every member's last checkpoint; all must stand at the same epoch. Returns the epoch to start."""
    epochs = set()
    for m in members:
        url = checkpoint_url(m)
        if not checkpoint.exists(url):
            return 0 if not epochs else _mismatch(members)
        state = checkpoint.load(url)
        for key in ("cache_fingerprint", "bank_fingerprint", "dim", "arch"):
            if key in m.meta and state.get(key) != m.meta[key]:
                raise SeedError(f"{url}: cannot resume, {key} differs (checkpoint {state.get(key)!r}, now {m.meta[key]!r})")
        _unwrap(m.model).load_state_dict(state["model"])
        m.optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        torch.set_rng_state(state["rng"])
        m.history = list(state.get("metrics", []))
        epochs.add(int(state["epoch"]))
    if len(epochs) > 1:
        return _mismatch(members)
    return epochs.pop() if epochs else 0


def _mismatch(members: Sequence[Member]) -> int:
    raise SeedError(f"cannot resume: the checkpoints of {[m.name for m in members]} stand at different epochs; "
                    "train them separately or start again")

