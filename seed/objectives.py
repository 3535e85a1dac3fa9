"""Training objectives: what differs between cached SEED, online SEED, MoCo-v2 and supervised training.

The loop (``seed.train``) owns what every method shares. An objective owns how a batch's teacher
side is made (``prepare``), the loss of one trained model (``loss``) and any state updated after
the step (``after_step``: queues, momentum encoders), which it saves and restores with the
checkpoints. Objectives are built by name through ``create_objective`` (a small registry), so a
benchmark or a test can register its own and hand it to the loop.

Example:
    >>> import torch
    >>> obj = create_objective("supervised")
    >>> obj.n_views, obj.teacher_forwards
    (1, 0)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seed.data import Batch
from seed.devices import autocast
from seed.errors import SeedError
from seed.loss import Tail, info_nce, own_mask, seed_loss, seed_loss_sparse

Context = dict[str, torch.Tensor]
ObjectiveFactory = Callable[..., "Objective"]


class Queue:
    """A FIFO of the K most recent embeddings (MoCo's queue; SEED's instance queue), with the cache row of
    each entry's image (-1: none known, as for the random entries it starts with)."""

    def __init__(self, size: int, dim: int, device: torch.device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(device)  # K x D, random at start (MoCo)
        self.rows = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    @torch.no_grad()
    def push(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        z = gather(z.detach().float())                                        # B x D, all ranks
        r = gather(rows.to(z.device)) if rows is not None else torch.full((len(z),), -1, dtype=torch.long,
                                                                          device=z.device)
        K = len(self.data)
        n = min(len(z), K)
        idx = (self.ptr + torch.arange(n, device=z.device)) % K
        self.data[idx] = z[-n:]
        self.rows[idx] = r[-n:]
        self.ptr = int((self.ptr + n) % K)

    def own_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` True where an entry is a view of the same image as a batch row (rows of -1 match nothing)."""
        return own_mask(rows, self.rows) & (rows[:, None] >= 0)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.cpu(), "ptr": self.ptr, "rows": self.rows.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.copy_(state["data"])
        self.ptr = int(state["ptr"])
        if "rows" in state:
            self.rows.copy_(state["rows"])


def gather(z: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order (MoCo's concat_all_gather); the input itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    out = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(out, z)
    return torch.cat(out)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Objective:
    """What differs between methods; the defaults suit objectives without state (one view, no teacher)."""

    n_views = 1
    teacher_forwards = 0

    def prepare(self, batch: Batch, device: torch.device) -> Context:
        return {}

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: Context, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, ctx: Context) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


OBJECTIVES: dict[str, ObjectiveFactory] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an objective available to ``create_objective(name, ...)``."""
    def add(cls: type[Objective]) -> type[Objective]:
        OBJECTIVES[name] = cls
        return cls
    return add


def create_objective(name: str, **kwargs: Any) -> Objective:
    """The objective registered as ``name``, built with ``kwargs``."""
    try:
        factory = OBJECTIVES[name]
    except KeyError:
        raise SeedError(f"unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})") from None
    return factory(**kwargs)


@register("seed-cached")
class CachedSeed(Objective):
    """SEED against the cache: teacher embeddings and targets were computed once, the teacher is never built.

    ``dense``: recompute p_T from the cached embedding and the bank; otherwise the cached top-k targets.
    """

    def __init__(self, bank_vectors: torch.Tensor, bank_rows: torch.Tensor, *, tau_s: float, tau_t: float, dense: bool,
                 tail: Tail = "renorm"):
        # K x D and K, or R x K x D and R x K for rotating banks (the batch's ``rotation`` picks one)
        self.banks = bank_vectors if bank_vectors.dim() == 3 else bank_vectors[None]
        self.bank_rows_all = bank_rows if bank_rows.dim() == 2 else bank_rows[None]
        self.bank, self.bank_rows = self.banks[0], self.bank_rows_all[0]
        self.tau_s, self.tau_t, self.dense, self.tail = tau_s, tau_t, dense, tail

    def prepare(self, batch: Batch, device: torch.device) -> Context:
        if "rotation" in batch.extra:  # every example of a batch comes from one epoch, so one rotation
            r = int(batch.extra["rotation"][0])
            self.bank, self.bank_rows = self.banks[r], self.bank_rows_all[r]
        ctx = {"z_t": batch.extra["z_t"].to(device), "own": own_mask(batch.rows.to(device), self.bank_rows)}
        if not self.dense:
            ctx["cols"], ctx["logp"] = batch.extra["cols"].to(device), batch.extra["logp"].to(device)
        return ctx

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: Context, labels: torch.Tensor) -> torch.Tensor:
        z_s = F.normalize(model(x).float(), dim=1)                            # B x D
        if self.dense:
            return seed_loss(z_s, ctx["z_t"], self.bank, self.tau_s, self.tau_t, ctx["own"])
        return seed_loss_sparse(z_s, ctx["z_t"], self.bank, ctx["cols"], ctx["logp"], self.tau_s, ctx["own"], self.tail)


class _QueueSeed(Objective):
    """SEED against a FIFO queue of teacher embeddings, pushed after each step as the official code does.

    Queue entries of a batch row's own image (known when the views come from a cache, whose rows name
    the images) are excluded from both distributions; with fresh views no row is known and nothing is.
    Subclasses say where a batch's teacher embeddings come from (``teacher_embeddings``).
    """

    def __init__(self, queue: Queue, *, tau_s: float, tau_t: float):
        self.queue, self.tau_s, self.tau_t = queue, tau_s, tau_t

    def teacher_embeddings(self, batch: Batch, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, batch: Batch, device: torch.device) -> Context:
        z_t = self.teacher_embeddings(batch, device)                          # B x D, unit norm, fp32
        ctx = {"z_t": z_t, "rows": batch.rows.to(device)}
        if bool((batch.rows >= 0).any()):  # decided on the host copy: no device sync in the step
            ctx["own"] = self.queue.own_mask(ctx["rows"])                     # the queue does not change before the loss
        return ctx

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: Context, labels: torch.Tensor) -> torch.Tensor:
        z_s = F.normalize(model(x).float(), dim=1)                            # B x D
        return seed_loss(z_s, ctx["z_t"], self.queue.data, self.tau_s, self.tau_t, ctx.get("own"))

    def after_step(self, ctx: Context) -> None:
        self.queue.push(ctx["z_t"], ctx["rows"])                              # enqueue after the step, as the official code

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state["queue"])


@register("seed-online")
class OnlineSeed(_QueueSeed):
    """SEED as published: the frozen teacher embeds every batch; a FIFO queue of K teacher embeddings is the bank."""

    def __init__(self, teacher: nn.Module, queue: Queue, *, tau_s: float, tau_t: float):
        super().__init__(queue, tau_s=tau_s, tau_t=tau_t)
        self.teacher = teacher
        self.teacher_forwards = 0

    def teacher_embeddings(self, batch: Batch, device: torch.device) -> torch.Tensor:
        with torch.no_grad(), autocast(device):
            z_t = F.normalize(self.teacher(batch.x.to(device)).float(), dim=1)
        self.teacher_forwards += len(z_t)
        return z_t


@register("seed-cached-queue")
class CachedQueueSeed(_QueueSeed):
    """Online SEED's queue with no teacher: the queue holds the *cached* teacher embeddings of the views just
    trained on, so it turns over every K/B steps exactly as the official queue does, and the targets are
    computed densely in fp32 from them. With the views the cache replays, this is the official algorithm
    (``train.bank=queue``), not an approximation of it; only the fp16 storage of the embeddings differs."""

    def teacher_embeddings(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return F.normalize(batch.extra["z_t"].to(device).float(), dim=1)


@register("moco")
class MocoV2(Objective):
    """MoCo-v2 (Chen et al. 2020): query encoder trained, key encoder = momentum copy, queue of keys.

    ``shuffle_bn`` (MoCo's Shuffle-BN): BatchNorm must not see a query and its key in batches with the
    same members, or the key encoder's batch statistics leak which key is the positive and the task
    gets easier than it should. Across DDP ranks the keys' inputs are gathered, shuffled and split
    over the ranks, then the keys are returned to their rows (MoCo's ``_batch_shuffle_ddp``); each
    rank's queries use its own BN batch. In one process ``shuffle_bn = G`` > 1 does the same with G
    sub-batches: queries in G contiguous sub-batches, keys in G sub-batches of a seeded permutation,
    each with its own BN statistics, as G GPUs would.
    """

    n_views = 2

    def __init__(self, model: nn.Module, queue: Queue, *, momentum: float, temperature: float, shuffle_bn: int = 0,
                 seed: int = 0):
        # The key encoder keeps its own BatchNorm statistics (momentum-updated parameters only, as MoCo).
        self.key_encoder = copy.deepcopy(unwrap(model)).requires_grad_(False).train()
        self.model, self.queue, self.m, self.t = model, queue, momentum, temperature
        self.groups, self.seed, self.step = shuffle_bn, seed, 0

    def prepare(self, batch: Batch, device: torch.device) -> Context:
        B = len(batch.rows)
        x = batch.x.to(device)                                                # 2B x 3 x r x r, view-major
        with torch.no_grad():
            self._momentum_update()
            with autocast(device):
                k = F.normalize(self._keys(x[B:]).float(), dim=1)             # B x D keys of the second views
        self.step += 1
        return {"k": k, "B": torch.tensor(B)}

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.groups <= 0 or (self.groups == 1 and world == 1):
            return self.key_encoder(x)
        # the same permutation on every rank, from (seed, step): nothing to broadcast, and a resumed run
        # shuffles as the uninterrupted one did
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        if world > 1:
            x_all = gather(x)                                                  # world*B, rank order
            perm = torch.randperm(len(x_all), generator=g).to(x.device)
            mine = perm.view(world, -1)[dist.get_rank()]
            k_all = gather(self.key_encoder(x_all[mine]))                      # keys in permuted order
            k = torch.empty_like(k_all)
            k[perm] = k_all
            return k.view(world, len(x), -1)[dist.get_rank()]
        perm = torch.randperm(len(x), generator=g).to(x.device)
        parts = [self.key_encoder(x[idx]) for idx in perm.chunk(self.groups)]
        k = torch.empty((len(x), parts[0].shape[1]), dtype=parts[0].dtype, device=x.device)
        k[perm] = torch.cat(parts)
        return k

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: Context, labels: torch.Tensor) -> torch.Tensor:
        B = int(ctx["B"])
        single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
        if self.groups > 1 and single:
            q = torch.cat([model(c) for c in x[:B].chunk(self.groups)])      # as G GPUs' BN batches
        else:
            q = model(x[:B])
        return info_nce(F.normalize(q.float(), dim=1), ctx["k"], self.queue.data, self.t)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for pk, pq in zip(self.key_encoder.parameters(), unwrap(self.model).parameters()):
            pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)

    def after_step(self, ctx: Context) -> None:
        self.queue.push(ctx["k"])

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict(), "key_encoder": self.key_encoder.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state["queue"])
        self.key_encoder.load_state_dict(state["key_encoder"])
        self.step = int(state.get("step", 0))


@register("supervised")
class Supervised(Objective):
    """Cross-entropy on the shard labels through a linear classifier (a labelled teacher for comparisons)."""

    def loss(self, model: nn.Module, x: torch.Tensor, ctx: Context, labels: torch.Tensor) -> torch.Tensor:
        if (labels < 0).any():
            raise SeedError("supervised pre-training needs labels (.cls or .json) on every sample")
        return F.cross_entropy(model(x).float(), labels)
