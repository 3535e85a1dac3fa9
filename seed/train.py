"""One training loop for cached SEED, online SEED, MoCo-v2 and supervised teachers.

The loop owns what every method shares: the data pass, per-step learning rates (warm-up then
cosine), SGD, autocast on CUDA, DDP, checkpoints (every epoch, and every ``Loop.checkpoint_steps``
steps inside one), resume, metrics, and the stop on a non-finite loss. An objective
(``seed.objectives``) owns what differs. Several models (students) train on the same decoded batches.

Metrics: ``<member.out>/metrics.jsonl`` (one line per epoch), and, when TensorBoard is installed
(the ``tensorboard`` extra) or asked for, per-step loss, learning rate and throughput as event files
in ``<member.out>/tb/`` (rank 0 only). Without a progress bar, rank 0 logs a progress line
(``seed.train``, INFO) at most every ``PROGRESS_EVERY_S`` seconds; the Prefect flow forwards it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from seed import checkpoint
from seed.checkpoint import Position
from seed.views import Recipe
from seed.config import LoaderConfig, OptimConfig
from seed.data import Batches, Source, shard_order
from seed.devices import autocast, data_workers, join_process_group, read_ahead
from seed.errors import SeedError
from seed.objectives import Objective, unwrap
from seed.schedules import warmup_cosine
from seed.storage import is_url, join, local_path, write_text

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # the least time between two progress log lines of an epoch (no progress bar)
UNUSED_WARNING = 0.1  # the share of an epoch's examples left out by uneven ranks that is worth a warning
TENSORBOARD_EXTRA = "pip install 'seed-distill[tensorboard]'"


@dataclasses.dataclass
class Member:
    """One trained model with its optimiser, output directory and checkpoint metadata."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    out: str
    meta: dict[str, Any]
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def checkpoint(self) -> str:
        return join(self.out, "checkpoint.pt")


@dataclasses.dataclass(frozen=True)
class Loop:
    """What one training run needs besides its models, objective and data: schedule and data path.

    ``checkpoint_steps``: a checkpoint every this many steps inside an epoch as well as at its end (0: at
    its end only). A run resumed from one continues on the batches an uninterrupted run would have had
    (``Batches.epoch``'s ``skip``: nothing of the skipped ones is decoded, and from a cache, or fresh views of
    shards whose every image header reads, only the shards the shuffle buffer still holds are read).
    """

    optim: OptimConfig
    loader: LoaderConfig
    seed: int
    resolution: int
    recipe: Recipe
    checkpoint_steps: int = 0
    section: str = "train"  # the config section these settings come from, as messages name them


def make_member(name: str, model: nn.Module, out: str, *, optim: OptimConfig, device: torch.device,
                meta: dict[str, Any]) -> Member:
    """Move ``model`` to ``device`` (channels_last on CUDA), wrap it in DDP when distributed, give it SGD."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return Member(name, model, opt, out, meta)


def train(members: Sequence[Member], objective: Objective, urls: Sequence[str], source: Source,
          rank_counts: Sequence[int], loop: Loop, *, device: torch.device, resume: bool = False, progress: bool = True,
          on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
          tensorboard: bool | None = None) -> list[dict[str, Any]]:
    """Train ``members`` for ``loop.optim.epochs`` on ``urls``; returns the per-epoch metrics.

    ``rank_counts[r]`` is the number of examples rank r sees per epoch (DDP ranks need the same
    number of steps). Checkpoints go to ``<member.out>/checkpoint.pt`` after every epoch (and every
    ``loop.checkpoint_steps`` steps).
    ``tensorboard``: True writes TensorBoard event files (an error when the package is missing),
    False does not, None writes them when the package is installed and the outputs are local.
    """
    o = loop.optim
    rank, world = join_process_group(device)
    steps = min(rank_counts) // o.batch_size
    if min(rank_counts) == 0:
        raise SeedError(f"{len(urls)} shard(s) for {world} ranks: a rank has no examples (ranks take whole shards); "
                        f"use fewer ranks ({loop.section}.nproc) or more shards")
    if steps == 0:
        raise SeedError(f"batch size {o.batch_size} is larger than the {min(rank_counts)} examples of a rank; "
                        "lower the batch size (optim.batch_size)")
    if rank == 0 and sum(rank_counts) - world * min(rank_counts) > UNUSED_WARNING * sum(rank_counts):
        log.warning("each epoch trains on at most %d of the %d examples: every rank makes the steps of the smallest "
                    "(%d examples in its share of %d shards over %d ranks); a shard count divisible by the ranks, "
                    "of similar sizes, evens them", world * min(rank_counts), sum(rank_counts), min(rank_counts),
                    len(urls), world)
    lr = warmup_cosine(o.base_lr * o.batch_size * world / 256, o.epochs, steps, o.warmup_epochs)
    writer_class = tensorboard_writer(tensorboard, [m.out for m in members])
    start, partial = (_resume(members, objective, {"world": world, "steps_per_epoch": steps}, loop.section) if resume
                      else (Position(), None))
    if resume and dist.is_initialized():  # each rank read the checkpoints itself: they must have read the same ones
        positions: list[Any] = [None] * world
        dist.all_gather_object(positions, start)
        if len(set(positions)) > 1:
            raise SeedError(f"the ranks resumed from different checkpoints (rank by rank: "
                            f"{', '.join(map(str, positions))}): they do not see the same checkpoints, so the runs root "
                            "is not one file system or bucket for every node; point every node's storage.yaml at a "
                            "shared runs root")
    metrics: list[dict[str, Any]] = list(members[0].history)
    # a restart at step s drops the steps >= s that an interrupted attempt had written; a fresh run drops them all
    if writer_class is not None and rank == 0 and not start:
        for m in members:
            _remove_event_files(tensorboard_dir(m.out))
    writers = [writer_class(tensorboard_dir(m.out), purge_step=start.epoch * steps + start.step + 1)
               for m in members] if writer_class is not None and rank == 0 else []
    # on the CPU the step's threads take their cores first (seed.devices.read_ahead)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    workers = data_workers(loop.loader.workers, device, model_threads=threads)
    maker = Batches(loop.recipe, loop.resolution, device=device, workers=workers,
                    depth=read_ahead(loop.loader.prefetch, device, workers, model_threads=threads),
                    fused_augment=loop.loader.fused_augment)
    try:
        return _epochs(members, objective, urls, source, loop, maker, device=device, steps=steps, lr=lr,
                       start=start, partial=partial, metrics=metrics, progress=progress, on_epoch=on_epoch,
                       writers=writers)
    finally:
        maker.close()
        for w in writers:
            w.close()


def _remove_event_files(directory: str) -> None:
    """Remove the event files a previous run left in ``directory`` (a local path: see ``tensorboard_writer``).

    TensorBoard drops a restarted run's later steps (``purge_step``) only from files it read before the new
    writer's, in name order, and a file's name holds its creation second and a per-process counter without
    padding: the writer of a run started within the same second as the one it replaces (counter 10 after
    9) could be read first, and the old steps shown after it. A fresh run's steps replace them all, so their
    files go."""
    for old in Path(directory).glob("events.out.tfevents.*"):
        old.unlink(missing_ok=True)


def tensorboard_dir(out: str) -> str:
    """Where a member's event files go: ``<out>/tb`` (``tensorboard --logdir <run dir>`` shows every member)."""
    return join(out, "tb") if is_url(out) else local_path(join(out, "tb"))


def tensorboard_writer(setting: bool | None, outs: Sequence[str]) -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` when event files are to be written, else None.

    ``setting`` True and no tensorboard package: a ``SeedError`` naming the extra to install. None
    (automatic): the writer when the package is importable and every output is a local path
    (TensorBoard's own file layer reaches object stores only through boto3).
    """
    if setting is False:
        return None
    if setting is None and any(is_url(o) for o in outs):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if setting:
            raise SeedError(f"train.tensorboard is true but the tensorboard package is not installed: "
                            f"{TENSORBOARD_EXTRA}, or set train.tensorboard=false") from None
        return None
    return SummaryWriter


def _epochs(members: Sequence[Member], objective: Objective, urls: Sequence[str], source: Source,
            loop: Loop, maker: Batches, *, device: torch.device, steps: int,
            lr: np.ndarray, start: Position, partial: dict[str, Any] | None, metrics: list[dict[str, Any]],
            progress: bool, on_epoch: Callable[[int, dict[str, Any]], None] | None,
            writers: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The epochs from ``start`` on, with their checkpoints, metrics and ``on_epoch`` calls. ``partial``: what a
    checkpoint inside ``start``'s epoch kept of its steps (``training_state``).

    ``writers``: one TensorBoard ``SummaryWriter`` per member (rank 0 only) for the per-step scalars.
    """
    from seed.report import progress_bar

    o = loop.optim
    rank, world = join_process_group(device)
    images = o.batch_size * world  # per step, over all ranks
    report = not progress and rank == 0
    for epoch in range(start.epoch, o.epochs):
        first = start.step if epoch == start.epoch else 0  # the steps a checkpoint inside this epoch had made
        carried = partial if first and partial is not None else {}
        t0 = time.perf_counter() - float(carried.get("seconds", 0.0))
        last_step = last_report = time.perf_counter()
        forwards0 = objective.teacher_forwards - int(carried.get("teacher_forwards", 0))
        order = shard_order(len(urls), epoch, loop.seed, rank, world)
        # this rank's summed losses (a resumed epoch starts from this rank's sums before the checkpoint), over the
        # ``read`` steps whose losses were read
        totals = np.array(carried["losses"][rank], dtype=np.float64) if carried else np.zeros(len(members))
        read = first
        for m in members:
            m.model.train()
        bar = progress_bar(total=steps, initial=first, desc=f"epoch {epoch + 1}/{o.epochs}", unit="step",
                           disable=not progress or rank != 0)
        if first and rank == 0:
            log.info("epoch %d continues at step %d of %d, on the batches an uninterrupted run has there", epoch + 1,
                     first + 1, steps)
        data = maker.epoch(urls, order, source, epoch, batch_size=o.batch_size, steps=steps, seed=loop.seed,
                           shuffle_buffer=loop.loader.shuffle_buffer, skip=first)
        done = first
        queued: tuple[int, list[torch.Tensor]] | None = None  # the last step's losses, not yet read

        def settle(step: int, losses: list[torch.Tensor]) -> None:
            """Read a step's losses: stop at a non-finite one, else add them to the epoch's totals.

            Read one step late, once the next step is queued, so the host queues step s + 1 while the
            device still runs step s (reading at once made every step wait for the device, idle while
            the next step's launches were made). A non-finite loss has then updated the weights in
            memory for one more step, but only in memory: the checkpoint on disk is the last good one.
            """
            nonlocal read
            g = epoch * steps + step
            read += 1
            for i, (m, value) in enumerate(zip(members, (loss.item() for loss in losses))):
                if not math.isfinite(value):
                    raise SeedError(f"non-finite loss ({value}) for {m.name} at epoch {epoch + 1}, step {step + 1}; "
                                    f"stopped; {_last_good(m)} (lower the learning rate?)")
                totals[i] += value
                if writers:
                    writers[i].add_scalar("train/loss", value, g + 1)

        try:  # the bar closes before an error is printed, never after it
            for step, batch in enumerate(data, start=first):
                g = epoch * steps + step
                ctx = objective.prepare(batch, device)
                x = batch.x.to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                labels = batch.labels.to(device, non_blocking=True)
                losses = []
                for m in members:
                    for group in m.optimizer.param_groups:
                        group["lr"] = float(lr[g])
                    with autocast(device):
                        loss = objective.loss(m.model, x, ctx, labels)
                    m.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    m.optimizer.step()
                    losses.append(loss.detach())
                objective.after_step(ctx)
                if queued is not None:
                    settle(*queued)
                queued = (step, losses)
                done += 1
                bar.update(1)
                if loop.checkpoint_steps and done % loop.checkpoint_steps == 0 and done < steps:
                    settle(*queued)
                    queued = None
                    _save_inside(members, objective, Position(epoch, done), metrics, device=device, steps=steps,
                                 partial={"losses": _by_rank(totals, device).tolist(),
                                          "seconds": time.perf_counter() - t0,
                                          "teacher_forwards": int(objective.teacher_forwards - forwards0)})
                    if report:
                        log.info("epoch %d/%d: checkpoint at step %d", epoch + 1, o.epochs, done)
                if read:  # the losses read so far: every step's but the last (all of them after a checkpoint)
                    bar.set_postfix(loss=f"{totals[0] / read:.4f}", lr=f"{lr[g]:.4f}")
                now = time.perf_counter()
                for w in writers:
                    w.add_scalar("train/lr", float(lr[g]), g + 1)
                    w.add_scalar("train/images_per_s", images / max(now - last_step, 1e-9), g + 1)
                last_step = now
                if report and done < steps and now - last_report >= PROGRESS_EVERY_S:
                    last_report = now
                    log.info("epoch %d/%d: step %d/%d (%d %%), %s, lr %.4g, %s images/s", epoch + 1, o.epochs, done, steps,
                             100 * done // steps, losses_text(members, (totals / max(read, 1)).tolist()), lr[g],
                             f"{done * images / (now - t0):,.0f}")
            if queued is not None:
                settle(*queued)  # the epoch's last step, before anything is saved
        finally:
            bar.close()
        if done != steps:
            raise SeedError(f"epoch {epoch + 1}: the shards gave {done} batches, {steps} expected (did the shards change?)")
        totals = _mean_over_ranks(totals, device)  # the epoch's loss over every rank's shards, not rank 0's alone
        if rank == 0:
            _check_finite(members, f"after epoch {epoch + 1}")
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "steps": steps, "lr_end": float(lr[(epoch + 1) * steps - 1]), "seconds": round(seconds, 2),
               "images_per_s": round(steps * o.batch_size * world / seconds, 1),
               "teacher_forwards": int(objective.teacher_forwards - forwards0) * world,
               "loss": {m.name: float(totals[i] / steps) for i, m in enumerate(members)}}
        metrics.append(row)
        for i, w in enumerate(writers):
            w.add_scalar("epoch/loss", float(totals[i] / steps), (epoch + 1) * steps)  # the epoch's mean, at its last step
            w.flush()
        if rank == 0:
            _save(members, objective, Position(epoch + 1), metrics, {"world": world, "steps_per_epoch": steps})
        if on_epoch is not None and rank == 0:
            on_epoch(epoch, row)
        if dist.is_initialized():
            dist.barrier()
    return metrics


def losses_text(members: Sequence[Member], losses: Sequence[float]) -> str:
    """``moco loss 6.672`` (4 significant digits, as ``seed.report.loss_text``), one per member, comma-separated."""
    return ", ".join(f"{m.name} loss {v:#.4g}" for m, v in zip(members, losses))


def _by_rank(totals: np.ndarray, device: torch.device) -> np.ndarray:
    """Every rank's ``totals``, in rank order: ``[world, len(totals)]`` (one row with one process)."""
    if not dist.is_initialized():
        return totals[None]
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(totals, dtype=torch.float64, device=on)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return torch.stack(rows).cpu().numpy()


def _mean_over_ranks(totals: np.ndarray, device: torch.device) -> np.ndarray:
    """Each rank's ``totals`` averaged over the ranks (``totals`` itself with one process)."""
    rows = _by_rank(totals, device)
    return rows.sum(axis=0) / len(rows)


def _save_inside(members: Sequence[Member], objective: Objective, at: Position, metrics: list[dict[str, Any]], *,
                 device: torch.device, steps: int, partial: dict[str, Any]) -> None:
    """A checkpoint ``at`` a step inside an epoch (rank 0 writes it; every rank calls this, at the same step)."""
    rank, world = join_process_group(device)
    if rank == 0:
        _check_finite(members, f"at {at}")
        _save(members, objective, at, metrics, {"world": world, "steps_per_epoch": steps}, partial)


def _check_finite(members: Sequence[Member], when: str) -> None:
    """Refuse to save weights that are not finite. Each rank reads only its own losses: with DDP one rank's
    non-finite gradient at an epoch's last step leaves every rank's weights non-finite while rank 0's loss is
    finite (and on one rank, a finite loss can still make a non-finite update)."""
    for m in members:
        params = list(unwrap(m.model).parameters())
        if bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            continue
        bad = [name for name, p in unwrap(m.model).named_parameters() if not bool(torch.isfinite(p).all())]
        raise SeedError(f"non-finite weights for {m.name} {when} ({len(bad)} tensors, the first "
                        f"{bad[0]}: a rank's loss or gradient was not finite); stopped before saving; {_last_good(m)} "
                        "(lower the learning rate?)")


def _last_good(m: Member) -> str:
    """Where a stopped run stands: its last checkpoint (from the epoch before), or none yet."""
    if checkpoint.exists(m.checkpoint):
        return f"the last good checkpoint is {m.checkpoint}"
    return f"no checkpoint was written yet ({m.checkpoint})"


def _save(members: Sequence[Member], objective: Objective, at: Position, metrics: list[dict[str, Any]],
          layout: dict[str, int], partial: dict[str, Any] | None = None) -> None:
    """Every member's checkpoint ``at`` a position, with the run's ``layout`` (ranks and steps per epoch), written
    together: a kill between two members' writes cannot leave them apart (``checkpoint.save_together``).
    At an epoch's end each ``metrics.jsonl`` (rewritten whole from the metrics) goes first: a kill after it and
    before the checkpoints leaves a line the resumed epoch rewrites, where the other order could leave a
    finished run's file a line short for good."""
    lines = [] if at.step else members  # inside an epoch there is no row to add
    for m in lines:
        write_text(join(m.out, "metrics.jsonl"), "".join(
            json.dumps({"epoch": r["epoch"], "loss": r["loss"][m.name], "lr_end": r["lr_end"], "seconds": r["seconds"],
                        "images_per_s": r["images_per_s"], "teacher_forwards": r["teacher_forwards"]}) + "\n"
            for r in metrics))
    checkpoint.save_together([(m.checkpoint, checkpoint.training_state(
        model=unwrap(m.model), optimizer=m.optimizer, at=at, objective=objective.state_dict(),
        metrics=metrics, meta={**m.meta, **layout}, partial=partial)) for m in members])


def _resume(members: Sequence[Member], objective: Objective, layout: dict[str, int],
            section: str = "train") -> tuple[Position, dict[str, Any] | None]:
    """Load every member's last checkpoint; all must stand at the same position, made with this ``layout`` (ranks
    and steps per epoch: they set the learning rate's scale and schedule, and each rank's shards). Returns the
    position to start from and, inside an epoch, what the checkpoint kept of its steps."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        checkpoint.settle([m.checkpoint for m in members])  # a save of several members that a kill cut short
    if dist.is_initialized():
        dist.barrier()
    present = [checkpoint.exists(m.checkpoint) for m in members]
    if not any(present):
        return Position(), None
    if not all(present):
        _mismatch(members, f"{[m.name for m, p in zip(members, present) if not p]} have none")
    positions: set[Position] = set()
    partial = None
    for m in members:
        state = checkpoint.load_training(m.checkpoint, model=unwrap(m.model), optimizer=m.optimizer, meta=m.meta)
        was = {key: state[key] for key in layout if key in state}  # (checkpoints of older versions have none)
        if was and was != {key: layout[key] for key in was}:
            raise SeedError(f"{m.checkpoint}: cannot resume: it was trained on {was.get('world', '?')} rank(s) of "
                            f"{was.get('steps_per_epoch', '?')} steps an epoch, this run has {layout['world']} of "
                            f"{layout['steps_per_epoch']} (the learning rate, the schedule and each rank's shards would "
                            f"change); resume with {section}.nproc={was.get('world', '?')} and the same shards, or start again")
        objective.load_state_dict(state["objective"])
        m.history = list(state.get("metrics", []))
        positions.add(Position.of(state))
        partial = state.get("partial")
    if len(positions) > 1:
        _mismatch(members, f"they stand at {', '.join(map(str, sorted(positions)))}")
    return positions.pop(), partial


def _mismatch(members: Sequence[Member], why: str) -> None:
    raise SeedError(f"cannot resume {[m.name for m in members]} together: {why}; train them separately or start again")
