"""The trainer on real Fashion-MNIST shards: every mode learns, resume is exact, failures are clean."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import pipeline.pretrain as pretrain_stage
import pipeline.student as student_stage
import pipeline.teacher as teacher_stage
from seed import bank_store, checkpoint
from seed.checkpoint import Position
from seed.data import Batches, CachedSource, examples, shard_order
from seed.errors import SeedError
from seed.objectives import CachedSeed
from seed.shards import Sample, expand_urls
from seed.storage import Storage
from seed.teachers import load_teacher
from tests.conftest import cache_and_bank, free_port, make_storage, small_config

TRAIN = ("bank.size=64", "bank.topk=8", "train.optim.batch_size=50", "train.optim.epochs=3", "train.loader.shuffle_buffer=200",
         "train.optim.base_lr=0.1", "pretrain.optim.batch_size=50", "pretrain.optim.epochs=2", "pretrain.queue=100",
         "pretrain.loader.shuffle_buffer=200", "pretrain.dim=32")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shards_root: Path, moco_checkpoint: Path):
    """A complete cache and bank over 300 real images (2 views), made once for the module."""
    cfg, storage = cache_and_bank(tmp_path_factory.mktemp("train"), shards_root, moco_checkpoint, *TRAIN)
    return cfg, storage, moco_checkpoint


def _cfg(prepared, *extra: str):
    _, _, ckpt = prepared
    return small_config(ckpt, *TRAIN, *extra)


def _losses(summary: student_stage.StudentResult, name: str = "mobilenetv3_small_050") -> list[float]:
    return [m["loss"][name] for m in summary.metrics]


@pytest.mark.parametrize("mode,targets", [("cached", "sparse"), ("cached", "dense"), ("online", "dense")])
def test_seed_modes_reduce_the_loss(prepared, mode: str, targets: str) -> None:
    _, storage, _ = prepared
    summary = student_stage.run(_cfg(prepared, f"train.mode={mode}", f"train.targets={targets}", f"train.run={mode}-{targets}"),
                                storage, progress=False)
    losses = _losses(summary)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses
    assert summary.teacher_forwards == (0 if mode == "cached" else 3 * 6 * 50)
    state = checkpoint.load(summary.students["mobilenetv3_small_050"])
    assert state["epoch"] == 3 and state["mode"] == mode and "optimizer" in state and "config" in state
    if mode == "cached":
        assert len(state["cache_fingerprint"]) == 64 and len(state["bank_fingerprint"]) == 64


def test_queue_mode_trains_from_the_cache_alone(prepared) -> None:
    """train.bank=queue: a FIFO of cached teacher embeddings; no teacher, and no bank (a bank built with other
    parameters is not even opened); a finished run is recognised as done."""
    _, storage, _ = prepared

    def forbidden(*_: object) -> None:
        raise AssertionError("queue mode loaded the teacher")

    cfg = _cfg(prepared, "train.bank=queue", "train.queue=128", "bank.size=32", "bank.tau_t=0.05", "train.run=queue")
    summary = student_stage.run(cfg, storage, progress=False, load=forbidden)  # type: ignore[arg-type]
    losses = _losses(summary)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses
    assert summary.teacher_forwards == 0
    state = checkpoint.load(summary.students["mobilenetv3_small_050"])
    assert state["bank_fingerprint"] == "queue" and state["objective"]["queue"]["rows"].max() >= 0
    done = student_stage.completed(cfg, storage)
    assert done is not None and done.skipped
    # the queue's temperature comes from bank.tau_t: another one is another run, not this finished one
    other = _cfg(prepared, "train.bank=queue", "train.queue=128", "bank.size=32", "bank.tau_t=0.01", "train.run=queue")
    assert student_stage.completed(other, storage) is None and not student_stage.resumable(other, storage)
    with pytest.raises(SeedError, match=r"cannot resume, it was trained against something else: "
                                        r"tau_t: checkpoint has 0.05, config wants 0.01"):
        student_stage.run(other, storage, resume=True, progress=False, load=forbidden)  # type: ignore[arg-type]
    # the cache's rows changed (a repaired shard embedded again gives it a new revision): no bank names it here,
    # but the checkpoints do, so the run is neither done nor resumable
    from seed import cache

    group = cache.open_group(storage.cache_url(cfg.cache.name), "r+")
    revision = cache.attributes(group)["revision"]
    group.update_attributes({"revision": "rows embedded again"})
    try:
        assert student_stage.completed(cfg, storage) is None and not student_stage.resumable(cfg, storage)
    finally:
        group.update_attributes({"revision": revision})
    assert student_stage.completed(cfg, storage) is not None


def test_cached_training_never_builds_the_teacher(prepared, tmp_path: Path) -> None:
    cfg, storage, _ = prepared

    def forbidden(*_: object) -> None:
        raise AssertionError("cached training loaded the teacher")

    summary = student_stage.run(_cfg(prepared, "train.optim.epochs=1", "train.run=no-teacher"), storage, progress=False,
                                load=forbidden)  # type: ignore[arg-type]
    assert summary.teacher_forwards == 0 and list(summary.students) == ["mobilenetv3_small_050"]


class CountingSource(CachedSource):
    """The cached data path, counting the images it hands to the batches."""

    made = 0

    def load(self, shard: int, epoch: int):  # type: ignore[no-untyped-def]
        make = super().load(shard, epoch)

        def counting(index: int, sample: Sample):  # type: ignore[no-untyped-def]
            ex = make(index, sample)
            CountingSource.made += ex is not None
            return ex
        return counting


def test_two_students_share_one_data_pass(prepared) -> None:
    _, storage, _ = prepared
    one = student_stage.run(_cfg(prepared, "train.run=one"), storage, progress=False, source=CountingSource)
    n_one, CountingSource.made = CountingSource.made, 0
    two = student_stage.run(_cfg(prepared, "train.run=two", "train.students=[{arch: mobilenetv3_small_050}, "
                                 "{arch: resnet10t, name: r10}]"), storage, progress=False, source=CountingSource)
    assert n_one == CountingSource.made == 3 * 300  # 3 epochs of 300 images, whatever the number of students
    assert one.metrics[-1]["steps"] == two.metrics[-1]["steps"] == 6
    assert set(two.students) == {"mobilenetv3_small_050", "r10"}
    for name in two.students:
        losses = _losses(two, name)
        assert losses[-1] < losses[0], (name, losses)
    # they resume together or not at all: one without its checkpoint is named (whichever comes first)
    Path(two.students["mobilenetv3_small_050"]).unlink()
    with pytest.raises(SeedError, match=r"cannot resume \['mobilenetv3_small_050', 'r10'\] together: "
                                        r"\['mobilenetv3_small_050'\] have none"):
        student_stage.run(_cfg(prepared, "train.run=two", "train.students=[{arch: mobilenetv3_small_050}, "
                               "{arch: resnet10t, name: r10}]"), storage, resume=True, progress=False)


class _Stop(Exception):
    pass


def test_resume_equals_uninterrupted_whatever_the_workers(prepared) -> None:
    """One uninterrupted run in this process against a run cut after an epoch with 2 worker processes
    and resumed with 1: the batches are composed in the main process, so the weights are the same."""
    _, storage, _ = prepared
    full = student_stage.run(_cfg(prepared, "train.run=full", "train.optim.epochs=2", "train.loader.workers=0"), storage,
                             progress=False)

    def stop_after_first(epoch: int, row: dict) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        student_stage.run(_cfg(prepared, "train.run=cut", "train.optim.epochs=2", "train.loader.workers=2"), storage,
                          progress=False, on_epoch=stop_after_first)
    cut = checkpoint.load(str(Path(storage.runs) / "cut" / "mobilenetv3_small_050" / "checkpoint.pt"))
    assert cut["epoch"] == 1 and (cut["world"], cut["steps_per_epoch"]) == (1, 6)
    # another batch size would continue another schedule, from other learning rates: refused, naming both, before
    # the run's config.yaml is touched; so is another tau_s
    config = Path(storage.runs) / "cut" / "config.yaml"
    before = config.read_bytes()
    for setting, named in (("train.optim.batch_size=75", "train.optim.batch_size: checkpoint has 50, config wants 75"),
                           ("train.tau_s=0.5", "train.tau_s: checkpoint has 0.2, config wants 0.5")):
        with pytest.raises(SeedError, match=r"checkpoint.pt: cannot resume, it was trained with other settings: "
                                            + named.replace(".", r"\.")):
            student_stage.run(_cfg(prepared, "train.run=cut", "train.optim.epochs=2", setting), storage, resume=True,
                              progress=False)
    assert config.read_bytes() == before
    # a checkpoint of a version whose train section lacked a setting resumes on the settings both name
    path = str(Path(storage.runs) / "cut" / "mobilenetv3_small_050" / "checkpoint.pt")
    state = checkpoint.load(path)
    del state["config"]["train"]["tail"]
    checkpoint.save(state, path)
    resumed = student_stage.run(_cfg(prepared, "train.run=cut", "train.optim.epochs=2", "train.loader.workers=1"),
                                storage, resume=True, progress=False)
    a = checkpoint.load(full.students["mobilenetv3_small_050"])["model"]
    b = checkpoint.load(resumed.students["mobilenetv3_small_050"])["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics]

    # a run cut inside an epoch (a preemption at step 5 of epoch 2, after the checkpoint of step 4) continues at
    # the step of its last checkpoint on the batches the uninterrupted run had: the same weights and losses
    inside = ("train.run=inside", "train.optim.epochs=2", "train.checkpoint_steps=4")
    with pytest.raises(_Stop):
        student_stage.run(_cfg(prepared, *inside, "train.loader.workers=2"), storage, progress=False,
                          objective=_crashing(after=6 + 5))
    path = str(Path(storage.runs) / "inside" / "mobilenetv3_small_050" / "checkpoint.pt")
    assert checkpoint.Position.of(checkpoint.load(path)) == Position(1, 4)
    assert student_stage.resumable(_cfg(prepared, *inside), storage) == Position(1, 4)
    # how often checkpoints are written is no training setting: another value resumes the run
    resumed = student_stage.run(_cfg(prepared, *inside, "train.checkpoint_steps=0", "train.loader.workers=1"),
                                storage, resume=True, progress=False)
    b = checkpoint.load(resumed.students["mobilenetv3_small_050"])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics]
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]


def _crashing(after: int, objective: type = CachedSeed) -> type:
    """``objective`` (cached SEED unless given) that stops the run (``_Stop``) once ``after`` steps are done."""

    class Crashing(objective):  # type: ignore[valid-type, misc]
        steps = 0

        def after_step(self, ctx):  # type: ignore[no-untyped-def]
            super().after_step(ctx)
            Crashing.steps += 1
            if Crashing.steps == after:
                raise _Stop

    return Crashing


def test_batches_are_the_same_in_every_data_layout(prepared) -> None:
    """Composed and decoded in this process, decoded by 2 workers, composed by a worker (CUDA's layout, here on
    the CPU): the same two epochs of batches, to the bit (views, rows, labels, cached embeddings and targets), and
    the same last batches of an epoch resumed part-way."""
    cfg, storage, _ = prepared
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    group, banks = bank_store.open_banks(storage.cache_url(cfg.cache.name), cfg.bank)
    source = CachedSource(group, banks, view="random", seed=3, dense=False)
    cpu = torch.device("cpu")
    layouts = {"thread": Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=0, depth=2),
               "2 workers decode": Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=2, depth=2),
               "a worker composes": Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=2, depth=2,
                                            compose_in_worker=True)}
    made: dict[str, list] = {}
    try:
        for name, maker in layouts.items():
            made[name] = [b for epoch in range(2) for b in maker.epoch(
                urls, shard_order(len(urls), epoch, 0), source, epoch, batch_size=50, steps=6, seed=0, shuffle_buffer=200)]
            # an epoch resumed after its fourth step (a checkpoint inside it): its last two batches
            made[name] += list(maker.epoch(urls, shard_order(len(urls), 1, 0), source, 1, batch_size=50, steps=6, seed=0,
                                           shuffle_buffer=200, skip=4))
    finally:
        for maker in layouts.values():
            maker.close()
    assert layouts["a worker composes"].compose_in_worker and not layouts["thread"].compose_in_worker
    first = made["thread"]
    assert len(first) == 14 and first[0].extra.keys() >= {"z_t", "cols", "logp"}
    assert all(torch.equal(first[10 + i].x, first[12 + i].x) and torch.equal(first[10 + i].rows, first[12 + i].rows)
               for i in range(2))
    assert not torch.equal(first[0].rows, first[6].rows)                 # the epochs differ
    for name, batches in made.items():
        assert len(batches) == len(first), name
        for a, b in zip(first, batches):
            assert torch.equal(a.x, b.x) and torch.equal(a.rows, b.rows) and torch.equal(a.labels, b.labels), name
            assert a.extra.keys() == b.extra.keys() and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra), name


def test_closing_stops_an_epoch_left_part_way_though_its_failure_is_kept(prepared) -> None:
    """A step that fails part-way through an epoch leaves the epoch's generator suspended; a caller that keeps the
    exception (a flow's state, a retry) keeps it alive, and with it the prefetching thread and, where a worker
    composes the batches, that process and its shuffle buffer. ``close`` stops them now."""
    import multiprocessing
    import threading
    import time

    cfg, storage, _ = prepared
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    group, banks = bank_store.open_banks(storage.cache_url(cfg.cache.name), cfg.bank)
    source = CachedSource(group, banks, view="random", seed=3, dense=False)

    def alive() -> tuple[int, int]:
        return (len(multiprocessing.active_children()),
                sum(t.name == "seed-prefetch" and t.is_alive() for t in threading.enumerate()))

    for compose in (True, False):
        maker = Batches(cfg.cache.recipe, cfg.cache.resolution, device=torch.device("cpu"), workers=2, depth=2,
                        compose_in_worker=compose)
        kept = []
        try:
            for i, _ in enumerate(maker.epoch(urls, shard_order(len(urls), 0, 0), source, 0, batch_size=10, steps=25,
                                              seed=0, shuffle_buffer=50)):
                if i == 2:
                    raise RuntimeError("a failed step")
        except RuntimeError as exc:
            kept.append(exc)                                                 # its traceback holds the epoch
        assert alive() != (0, 0), compose
        maker.close()
        for _ in range(50):
            if alive() == (0, 0):
                break
            time.sleep(0.1)
        assert alive() == (0, 0), (compose, alive())
        assert kept


def test_a_shard_grown_past_its_rows_is_named(prepared, tmp_path: Path, shards_root: Path) -> None:
    """Samples appended to a shard after its cache was made have no row: the first is named (it was an
    ``IndexError``)."""
    cfg, storage, _ = prepared
    grown = tmp_path / "train-000000.tar"
    shutil.copy(shards_root / "fm/train/train-000000.tar", grown)
    with tarfile.open(shards_root / "fm/train/train-000001.tar") as src:
        extra = [(m, src.extractfile(m).read()) for m in src.getmembers()][:10]  # type: ignore[union-attr]
    with tarfile.open(grown, "a") as tar:
        for m, data in extra:
            m.name = "more-" + m.name
            tar.addfile(m, io.BytesIO(data))
    group, banks = bank_store.open_banks(storage.cache_url(cfg.cache.name), cfg.bank)
    source = CachedSource(group, banks, view="cycle", seed=0, dense=False)
    urls = [str(grown)] + expand_urls(storage.resolve("shards", cfg.data.train))[1:]
    with pytest.raises(SeedError, match=r"train-000000.tar: sample 100 \('more-.*'\) is past the 100 rows the cache holds"):
        list(examples(urls, [0], source, 0, seed=0, shuffle_buffer=16))


def test_worker_batches_reuse_shared_buffers_only_once_let_go(prepared) -> None:
    """2 workers decode into shared buffers (``SharedSlots``) that a loop taking one batch at a time lets go of:
    the buffers are reused, and every batch still equals the one thread's to the bit. (The test above holds
    every batch, so there the buffers run out and ordinary tensors follow.)"""
    cfg, storage, _ = prepared
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    group, banks = bank_store.open_banks(storage.cache_url(cfg.cache.name), cfg.bank)
    source = CachedSource(group, banks, view="random", seed=3, dense=False)
    cpu = torch.device("cpu")
    thread = Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=0, depth=2)
    workers = Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=2, depth=2)

    def epoch(maker: Batches, e: int):  # type: ignore[no-untyped-def]
        return maker.epoch(urls, shard_order(len(urls), e, 0), source, e, batch_size=50, steps=6, seed=0,
                           shuffle_buffer=200)

    expected = {e: [b.x for b in epoch(thread, e)] for e in range(2)}
    seen: list[int | None] = []
    try:
        for e in range(2):
            for i, batch in enumerate(epoch(workers, e)):
                assert torch.equal(batch.x, expected[e][i]), (e, i)
                slots = workers._collate.slots
                assert slots is not None
                ptr = batch.x.untyped_storage().data_ptr()
                seen.append(next((j for j, b in enumerate(slots.buffers) if b is not None and b.data_ptr() == ptr), None))
    finally:
        workers.close()
    # a worker has at most 2 batches in flight (the DataLoader's bound), and the loop holds one and the one before
    assert len(seen) == 12 and len(slots.buffers) == 2 * (2 + 3) and None not in seen, seen
    assert len(set(seen)) < len(seen), seen                              # buffers carried several batches


def exploding(after: int) -> type[CachedSeed]:
    """Cached SEED whose loss turns NaN after ``after`` calls (6 steps an epoch)."""

    class Exploding(CachedSeed):
        calls = 0

        def loss(self, model, x, ctx, labels):  # type: ignore[no-untyped-def]
            Exploding.calls += 1
            loss = super().loss(model, x, ctx, labels)
            return loss * float("nan") if Exploding.calls > after else loss

    return Exploding


@pytest.mark.parametrize("after,step,saved", [(8, "epoch 2, step 3", 1), (11, "epoch 2, step 6", 1), (5, "epoch 1, step 6", None)])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared, after: int, step: str, saved: int | None) -> None:
    """Losses are read one step late; a NaN in an epoch's last step still stops the run before its checkpoint."""
    _, storage, _ = prepared
    run = f"nan-{after}"
    where = "the last good checkpoint is" if saved else "no checkpoint was written yet"
    with pytest.raises(SeedError, match=rf"non-finite loss .* {step};.*{where}"):
        student_stage.run(_cfg(prepared, f"train.run={run}"), storage, progress=False, objective=exploding(after))
    path = Path(storage.runs) / run / "mobilenetv3_small_050" / "checkpoint.pt"
    assert (checkpoint.load(str(path))["epoch"] if path.exists() else None) == saved


def test_a_finite_loss_with_a_non_finite_update_at_the_last_step_is_not_saved_as_finished(prepared) -> None:
    """The loss of the run's very last step is finite but its gradient is not (what another rank's NaN does to
    every rank's weights through DDP's averaged gradients): the weights are checked before the checkpoint, so the
    run stops at epoch 1's checkpoint instead of saving NaN weights as a finished run."""
    _, storage, _ = prepared

    class Poisoned(CachedSeed):
        calls = 0

        def loss(self, model, x, ctx, labels):  # type: ignore[no-untyped-def]
            Poisoned.calls += 1
            loss = super().loss(model, x, ctx, labels)
            if Poisoned.calls == 12:  # epoch 2, step 6 of 6: finite forward, NaN backward (0 x d sqrt(u)/du at u = 0)
                p = next(model.parameters())
                loss = loss + 0.0 * torch.sqrt((p - p.detach()).pow(2).sum())
            return loss

    cfg = _cfg(prepared, "train.run=poisoned")
    with pytest.raises(SeedError, match=r"non-finite weights for mobilenetv3_small_050 after epoch 2 .*stopped before "
                                        r"saving; the last good checkpoint is"):
        student_stage.run(cfg, storage, progress=False, objective=Poisoned)
    path = Path(storage.runs) / "poisoned" / "mobilenetv3_small_050" / "checkpoint.pt"
    assert checkpoint.load(str(path))["epoch"] == 1 and student_stage.completed(cfg, storage) is None


def test_mismatched_or_missing_cache_is_refused(prepared, tmp_path: Path, shards_root: Path) -> None:
    _, storage, _ = prepared
    with pytest.raises(SeedError, match="bank was built with other parameters: size"):
        student_stage.run(_cfg(prepared, "bank.size=32"), storage, progress=False)
    with pytest.raises(SeedError, match="no cache at"):
        student_stage.run(_cfg(prepared, "cache.name=nothing"), storage, progress=False)
    with pytest.raises(SeedError, match="was made from 3 shards"):
        student_stage.run(_cfg(prepared, "data.train=fm/train/train-{000000..000001}.tar"), storage, progress=False)
    # the same shard names and counts, other contents (the first shard's samples in reverse order): the
    # fingerprint cannot tell, the rows' keys do
    moved = tmp_path / "reordered"
    shutil.copytree(shards_root / "fm", moved / "fm")
    first = moved / "fm/train/train-000000.tar"
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    by_key: dict[str, list] = {}
    for m, data in members:
        by_key.setdefault(m.name.split(".", 1)[0], []).append((m, data))
    with tarfile.open(first, "w") as tar:
        for key in reversed(list(by_key)):
            for m, data in by_key[key]:
                tar.addfile(m, io.BytesIO(data))
    reordered = Storage(shards=str(moved), caches=storage.caches, runs=str(tmp_path / "runs"), reports=storage.reports)
    with pytest.raises(SeedError, match=r"train-000000.tar: sample 0 is '.*', but the cache's row 0 was made from"):
        student_stage.run(_cfg(prepared, "train.run=reordered"), reordered, progress=False)
    other = make_storage(tmp_path, shards_root)
    teacher_stage.run(prepared[0], other, progress=False)  # a cache without a bank
    with pytest.raises(SeedError, match="no bank yet"):
        student_stage.run(prepared[0], other, progress=False)


def test_moco_pretraining_makes_a_loadable_teacher(prepared) -> None:
    _, storage, _ = prepared
    cfg = _cfg(prepared, "pretrain.name=moco-test", "pretrain.optim.epochs=4")
    summary = pretrain_stage.run(cfg, storage, progress=False)
    losses = [m["loss"]["moco"] for m in summary.metrics]
    # The queue starts as random vectors (as MoCo's), easy negatives during the first steps: compare
    # epochs once it holds real keys (100 keys, 300 images an epoch).
    assert losses[-1] < losses[1], losses
    teacher, report = load_teacher(summary.teacher)
    assert report.format == "moco" and teacher.out_dim == 32
    trained = pretrain_stage.build(cfg.pretrain)
    trained.load_state_dict(checkpoint.load(str(Path(storage.runs) / "moco-test" / "moco" / "checkpoint.pt"))["model"])
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), trained.eval()(x), atol=1e-5)
    assert pretrain_stage.run(cfg, storage, progress=False).skipped is True  # made once


def test_moco_pretraining_cut_inside_an_epoch_resumes_to_the_same_teacher(prepared) -> None:
    """MoCo's state beyond the weights (key encoder, queue and its pointer, the Shuffle-BN permutation's step) is in
    the checkpoint written inside an epoch: a run cut at step 5 of epoch 2 and resumed from step 4 ends with the
    uninterrupted run's weights, key encoder and queue, and its losses."""
    from seed.objectives import MocoV2

    _, storage, _ = prepared
    sets = ("pretrain.optim.epochs=2", "pretrain.checkpoint_steps=4", "pretrain.shuffle_bn=2")
    full = pretrain_stage.run(_cfg(prepared, "pretrain.name=moco-whole", *sets), storage, progress=False)

    Crashing = _crashing(6 + 5, MocoV2)  # step 5 of epoch 2: 300 images an epoch in batches of 50
    cut = _cfg(prepared, "pretrain.name=moco-cut", *sets)
    with pytest.raises(_Stop):
        pretrain_stage.run(cut, storage, progress=False, objective=Crashing)
    assert pretrain_stage.resumable(cut, storage) == Position(1, 4)
    resumed = pretrain_stage.run(cut, storage, resume=True, progress=False)
    a, b = (checkpoint.load(str(Path(storage.runs) / name / "moco" / "checkpoint.pt")) for name in ("moco-whole", "moco-cut"))
    assert Position.of(a) == Position.of(b) == Position(2)
    _assert_same_state(a, b)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics]


def test_online_seed_cut_inside_an_epoch_resumes_to_the_uninterrupted_student(prepared) -> None:
    """Online SEED draws fresh views of shards whose _info.json says every header reads, so its resume counts its
    way to the step: cut at step 5 of epoch 2 and resumed from step 4, the student ends with the uninterrupted
    run's weights, queue and losses."""
    from seed.objectives import OnlineSeed

    _, storage, _ = prepared
    sets = ("train.mode=online", "train.targets=dense", "train.optim.epochs=2", "train.checkpoint_steps=4")
    full = student_stage.run(_cfg(prepared, *sets, "train.run=online-whole"), storage, progress=False)

    Crashing = _crashing(6 + 5, OnlineSeed)
    cut = _cfg(prepared, *sets, "train.run=online-cut")
    with pytest.raises(_Stop):
        student_stage.run(cut, storage, progress=False, objective=Crashing)
    assert student_stage.resumable(cut, storage) == Position(1, 4)
    resumed = student_stage.run(cut, storage, resume=True, progress=False)
    a, b = (checkpoint.load(str(r.students["mobilenetv3_small_050"])) for r in (full, resumed))
    assert Position.of(a) == Position.of(b) == Position(2)
    _assert_same_state(a, b)
    assert _losses(resumed) == _losses(full)


def _assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints' weights and objective state (queue, key encoder, ...) equal to the bit."""
    for key in ("model", "objective"):
        flat_a, flat_b = (dict(_flatten(x[key])) for x in (a, b))
        assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), key


def _flatten(state, prefix: str = ""):  # type: ignore[no-untyped-def]
    """(dotted name, tensor) pairs of a nested state dict; other values as one-element tensors."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v if isinstance(v, torch.Tensor) else torch.tensor(v)


def test_pretraining_is_reused_and_resumed_only_for_the_same_views(prepared, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    _, storage, _ = prepared
    a = _cfg(prepared, "pretrain.name=views-test", "pretrain.optim.epochs=1")
    pretrain_stage.run(a, storage, progress=False)
    assert pretrain_stage.run(a, storage, progress=False).skipped is True
    # the same pattern under another shards root, whose first shard holds other samples: other data, made again
    other_root = Path(storage.runs).parent / "other-shards"
    shutil.copytree(Path(storage.shards) / "fm", other_root / "fm")
    first = other_root / "fm/train/train-000000.tar"
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(first, "w") as tar:
        for m, data in members[: len(members) // 2]:  # its first half of samples
            tar.addfile(m, io.BytesIO(data))
    (other_root / "fm/train/_info.json").unlink(missing_ok=True)
    elsewhere = Storage(shards=str(other_root), caches=storage.caches, runs=storage.runs, reports=storage.reports)
    assert pretrain_stage.run(a, elsewhere, progress=False).skipped is False
    assert pretrain_stage.run(a, storage, progress=False).skipped is False  # back: the export is elsewhere's now
    # the same pretrain section over other views (no blur) is another teacher: made again
    b = _cfg(prepared, "pretrain.name=views-test", "pretrain.optim.epochs=1", "cache.recipe.blur_p=0")
    second = pretrain_stage.run(b, storage, progress=False)
    assert second.skipped is False
    # b's epoch checkpoint is not resumed under other settings: 2 epochs trained, not b's first plus one
    c = _cfg(prepared, "pretrain.name=views-test", "pretrain.optim.epochs=2")
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrain"):
        third = pretrain_stage.run(c, storage, resume=True, progress=False)
    assert "is a checkpoint of other pre-training settings" in caplog.text
    assert len(third.metrics) == 2 and third.metrics[0]["loss"] != second.metrics[0]["loss"]


def test_an_interrupted_pretraining_is_resumable_for_its_own_settings_and_starting_over_says_so(
        prepared, caplog: pytest.LogCaptureFixture) -> None:
    """Pre-training stopped after epoch 1 of 2 (a preemption): ``resumable`` gives 1 for its settings (the flow then
    continues it), 0 for others; ``seed pretrain`` without --resume starts over, and says what it gives up."""
    import logging

    class Stop(Exception):
        pass

    def stop(epoch: int, row: dict) -> None:
        raise Stop

    _, storage, _ = prepared
    a = _cfg(prepared, "pretrain.name=cut", "pretrain.optim.epochs=2")
    with pytest.raises(Stop):
        pretrain_stage.run(a, storage, progress=False, on_epoch=stop)
    assert pretrain_stage.resumable(a, storage) == Position(1)
    assert pretrain_stage.resumable(_cfg(prepared, "pretrain.name=cut", "pretrain.optim.epochs=2",
                                         "pretrain.seed=3"), storage) == Position()
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrain"), pytest.raises(Stop):
        pretrain_stage.run(a, storage, progress=False, on_epoch=stop)
    assert "pre-training cut stopped at epoch 1 of 2 with these settings; starting again" in caplog.text
    # stopped after its last epoch's checkpoint, before the teacher was exported: the resume only exports it
    with pytest.raises(Stop):
        pretrain_stage.run(a, storage, resume=True, progress=False, on_epoch=lambda e, r: stop(e, r) if e == 1 else None)
    assert pretrain_stage.resumable(a, storage) == Position(2)
    done = pretrain_stage.run(a, storage, resume=True, progress=False, on_epoch=stop)  # no epoch left to stop in
    assert not done.skipped and [m["epoch"] for m in done.metrics] == [1, 2]
    assert not pretrain_stage.resumable(a, storage)  # exported: nothing to resume


def test_supervised_pretraining(prepared) -> None:
    _, storage, _ = prepared
    cfg = _cfg(prepared, "pretrain.name=sup-test", "pretrain.method=supervised", "pretrain.optim.epochs=3")
    summary = pretrain_stage.run(cfg, storage, progress=False)
    losses = [m["loss"]["supervised"] for m in summary.metrics]
    assert losses[-1] < losses[0] and losses[0] > 1.5, losses
    teacher, report = load_teacher(summary.teacher)
    assert report.format == "timm" and report.dropped and teacher.out_dim == teacher.feature_dim


PROBE = """
import json, sys
import torch.distributed as dist
from seed.devices import Launch, resolve_device
from pipeline.cli import main
launch = Launch.from_env()
# the device this rank would take on a node with two GPUs (a fake count: this machine has none)
print("probe " + json.dumps({"rank": launch.rank, "local_rank": launch.local_rank,
                             "would_use": str(resolve_device("auto", cuda_count=2))}), flush=True)
code = main(sys.argv[1:])
print("left the process group" if not dist.is_initialized() else "still in the process group", flush=True)
sys.exit(code)
"""


def test_two_process_gloo_run(prepared, tmp_path: Path) -> None:
    cfg, storage, ckpt = prepared
    storage_file = tmp_path / "storage.yaml"
    storage_file.write_text(f"shards: {storage.shards}\ncaches: {storage.caches}\nruns: {tmp_path / 'runs'}\nreports: {tmp_path}\n")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    sets = []
    for s in ("data.train=fm/train/train-{000000..000002}.tar", f"teacher.checkpoint={ckpt}", "cache.views=2",
              "cache.batch_size=64", "cache.cpu_threads=2", "cache.name=test", *TRAIN, "train.optim.epochs=2", "train.optim.batch_size=25",
              "train.device=cpu", "train.nproc=2", "train.checkpoint_steps=2"):
        sets += ["--set", s]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(probe), "student",
                             "--storage", str(storage_file), *sets], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
    assert result.returncode == 0, result.stderr[-3000:]
    probes = sorted((json.loads(line[6:]) for line in result.stdout.splitlines() if line.startswith("probe ")),
                    key=lambda p: p["rank"])
    assert probes == [{"rank": 0, "local_rank": 0, "would_use": "cuda:0"}, {"rank": 1, "local_rank": 1, "would_use": "cuda:1"}]
    assert sum(line.startswith("run ") for line in result.stdout.splitlines()) == 1  # rank 0 alone reports the run
    # a finished command leaves the process group (NCCL asks for it at exit: pending operations finish first)
    assert result.stdout.count("left the process group") == 2, result.stdout[-2000:]
    state = checkpoint.load(str(tmp_path / "runs" / "demo" / "mobilenetv3_small_050" / "checkpoint.pt"))
    # 3 shards split 2 + 1 between the ranks: min(200, 100) // 25 = 4 steps an epoch, on each rank; the checkpoints
    # at step 2 of each epoch (every rank at the same step: the losses so far are averaged over them) did not stop it
    assert state["epoch"] == 2 and [m["steps"] for m in state["metrics"]] == [4, 4] and state["step"] == 0


def test_two_launches_at_once_on_one_node_both_train(prepared) -> None:
    """``seed student`` with ``train.nproc=2`` started twice at the same moment on one node: torchrun's stores bind
    ports of their own choosing, so neither launch can take the port the other picked."""
    import threading

    _, storage, _ = prepared
    results: dict[str, object] = {}

    def launch(run: str) -> None:
        try:
            results[run] = student_stage.launch(_cfg(prepared, "train.device=cpu", "train.nproc=2", f"train.run={run}",
                                                     "train.optim.epochs=1", "train.optim.batch_size=25"),
                                                storage, on_line=lambda line: None)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[run] = exc

    threads = [threading.Thread(target=launch, args=(run,)) for run in ("at-once-a", "at-once-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == ["at-once-a", "at-once-b"], results
    for run, result in results.items():
        assert isinstance(result, student_stage.StudentResult), (run, result)
        state = checkpoint.load(str(result.students["mobilenetv3_small_050"]))
        assert state["epoch"] == 1 and state["metrics"][0]["steps"] == 4, (run, state["metrics"])


def _two_nodes(command: str, files: list[tuple[str, str]], *extra: str) -> tuple[list[int], list[str]]:
    """``seed <command>`` by torchrun as two one-rank nodes on this machine, meeting at node 0's store on loopback;
    node i reads the config and storage roots ``files[i]``. Their exit codes and outputs."""
    import os

    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m",
                               "pipeline.cli", command, "-c", config, "--storage", roots, *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
             for node, (config, roots) in enumerate(files)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    return [node.returncode for node in nodes], outputs


def test_torchrun_by_hand_across_two_nodes_trains_what_one_node_does(prepared, tmp_path: Path) -> None:
    """The README's launch across nodes: a torchrun per node (here two on one machine, meeting at node 0's store on
    loopback), one rank each, ``train.nproc=1`` (ranks per node). The two ranks take the shards and batches that two
    ranks of ``train.nproc=2`` on one node take, and train the same weights to the bit."""
    from seed.config import write_run_files

    _, storage, _ = prepared
    sets = ("train.device=cpu", "train.optim.epochs=1", "train.optim.batch_size=25")
    one = student_stage.launch(_cfg(prepared, *sets, "train.nproc=2", "train.run=one-node"), storage,
                               on_line=lambda line: None)
    files = write_run_files(_cfg(prepared, *sets, "train.nproc=1", "train.run=two-nodes"), storage, tmp_path)
    codes, outputs = _two_nodes("student", [files, files])
    assert codes == [0, 0], "\n".join(out[-2000:] for out in outputs)
    ours = checkpoint.load(str(one.students["mobilenetv3_small_050"]))
    theirs = checkpoint.load(str(storage.student_checkpoint("two-nodes", "mobilenetv3_small_050")))
    assert theirs["epoch"] == ours["epoch"] == 1 and theirs["world"] == 2 and theirs["metrics"][0]["steps"] == 4
    assert [m["loss"] for m in theirs["metrics"]] == [m["loss"] for m in ours["metrics"]]
    assert all(torch.equal(theirs["model"][k], v) for k, v in ours["model"].items())


def test_pretraining_in_two_ranks_through_seed_pretrain_trains_what_torchrun_by_hand_does(prepared, tmp_path: Path) -> None:
    """``seed pretrain`` with ``pretrain.nproc=2`` starts torchrun itself (as ``seed student`` does): MoCo-v2 in two
    gloo ranks, keys shuffled across them (Shuffle-BN), rank 0 alone reporting the run. Its teacher equals, to the
    bit, the one two torchruns started by hand make (two nodes of one rank each, meeting on loopback); once made it
    is reused without starting any rank, and a one-process pre-training of the same section is other training."""
    import os

    from seed.config import write_run_files

    _, storage, _ = prepared
    sets = ("pretrain.optim.epochs=1", "pretrain.shuffle_bn=1", "pretrain.device=cpu")
    cfg = _cfg(prepared, *sets, "pretrain.nproc=2", "pretrain.name=moco-ranks")
    config, roots = write_run_files(cfg, storage, tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "pretrain", "-c", config, "--storage", roots],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "pre-training: 2 processes (torchrun)" in out.stdout and "pretrain epoch 1/1: moco loss" in out.stdout
    assert out.stdout.count("wrote teacher ") == 1, out.stdout[-2000:]
    state = checkpoint.load(str(Path(storage.runs) / "moco-ranks" / "moco" / "checkpoint.pt"))
    # 3 shards split 2 + 1 between the ranks: min(200, 100) // 50 = 2 steps, on each rank
    assert state["world"] == 2 and state["epoch"] == 1 and state["metrics"][0]["steps"] == 2
    made = pretrain_stage.launch(cfg, storage, on_line=lambda line: pytest.fail(f"a rank started: {line}"))
    assert made.skipped and made.checkpoint == storage.pretrained_teacher("moco-ranks")
    teacher, report = load_teacher(made.teacher)
    assert report.format == "moco" and teacher.out_dim == 32
    ours = checkpoint.load(made.checkpoint)
    one = _cfg(prepared, *sets, "pretrain.name=moco-ranks")  # pretrain.nproc=1: one process, other batches and rate
    urls = expand_urls(storage.resolve("shards", one.data.train))
    alone = pretrain_stage.trains(one, urls, ours["trains"]["shard_lengths"])
    assert ours["trains"]["ranks"] == 2 and alone == {k: v for k, v in ours["trains"].items() if k != "ranks"}
    with pytest.raises(SeedError, match="moco/checkpoint.pt: cannot resume: it was trained on 2 rank.s., this run has 1"):
        pretrain_stage.run(one, storage, resume=True, progress=False)   # nothing overwritten: asked to continue
    assert checkpoint.load(str(Path(storage.runs) / "moco-ranks" / "moco" / "checkpoint.pt"))["world"] == 2

    by_hand = _cfg(prepared, *sets, "pretrain.nproc=1", "pretrain.name=moco-by-hand")
    (tmp_path / "by-hand").mkdir()
    files = write_run_files(by_hand, storage, tmp_path / "by-hand")
    codes, outputs = _two_nodes("pretrain", [files, files])
    assert codes == [0, 0], "\n".join(o[-2000:] for o in outputs)
    theirs = checkpoint.load(storage.pretrained_teacher("moco-by-hand"))
    assert theirs["trains"]["ranks"] == 2
    assert [m["loss"] for m in theirs["metrics"]] == [m["loss"] for m in ours["metrics"]]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(theirs["state_dict"][k], v) for k, v in ours["state_dict"].items())


def test_nodes_that_see_different_checkpoints_refuse_to_resume(prepared, tmp_path: Path) -> None:
    """Two nodes whose storage.yaml name different runs roots (not one shared file system): node 0 finds the run's
    epoch-1 checkpoint, node 1 none. Resuming, the ranks compare the epochs they read and both stop in one line,
    instead of training from different epochs and weights."""
    from seed.config import write_run_files
    from seed.storage import Storage

    _, storage, _ = prepared
    sets = ("train.device=cpu", "train.optim.batch_size=25", "train.run=split")
    student_stage.launch(_cfg(prepared, *sets, "train.nproc=2", "train.optim.epochs=1"), storage, on_line=lambda line: None)
    cfg = _cfg(prepared, *sets, "train.nproc=1", "train.optim.epochs=2")
    path = str(storage.student_checkpoint("split", "mobilenetv3_small_050"))
    state = checkpoint.load(path)  # as if made by these two nodes (the same 2 ranks), stopped after epoch 1 of 2
    state["config"]["train"]["nproc"], state["config"]["train"]["optim"]["epochs"] = 1, 2
    checkpoint.save(state, path)
    elsewhere = Storage(shards=storage.shards, caches=storage.caches, runs=str(tmp_path / "runs-b"),
                        reports=storage.reports)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    files = [write_run_files(cfg, s, str(tmp_path / name)) for s, name in ((storage, "a"), (elsewhere, "b"))]
    codes, outputs = _two_nodes("student", files, "--resume")
    assert all(code != 0 for code in codes), outputs
    assert all("the ranks resumed from different checkpoints (rank by rank: epoch 1, epoch 0)" in out for out in outputs), outputs
    assert checkpoint.load(path)["epoch"] == 1


def test_a_ranks_mistake_is_the_users_and_not_the_machines(prepared) -> None:
    """Ranks that stop on a user's mistake (here a bank built with other parameters, which only the ranks open)
    fail the launch with a ``SeedError`` quoting their line, which the flow does not retry; a rank killed or
    failing on the machine (``MachineError``) is retried (``tests/integration/test_flow.py``)."""
    from seed.errors import MachineError

    _, storage, _ = prepared
    cfg = _cfg(prepared, "train.device=cpu", "train.nproc=2", "train.run=mistake", "bank.topk=4")
    with pytest.raises(SeedError, match="the bank was built with other parameters") as caught:
        student_stage.launch(cfg, storage, on_line=lambda line: None)
    assert not isinstance(caught.value, MachineError)


def test_resuming_on_two_ranks_over_other_settings_is_refused_once_and_touches_nothing(prepared) -> None:
    """Rank 0 alone reads the checkpoints to check a ``--resume`` (one read, not one a rank) and hands its
    verdict to the other rank: both stop on the one-line error (no rank's traceback), the launch fails as the
    user's mistake, and the run's files are as they were."""
    from seed.errors import MachineError

    _, storage, _ = prepared
    student_stage.run(_cfg(prepared, "train.run=refused", "train.optim.epochs=1"), storage, progress=False)
    run = Path(storage.runs) / "refused"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    lines: list[str] = []
    cfg = _cfg(prepared, "train.device=cpu", "train.nproc=2", "train.run=refused", "train.optim.epochs=1",
               "train.tau_s=0.5")
    with pytest.raises(SeedError, match=r"cannot resume, it was trained with other settings: .*train\.tau_s: checkpoint has 0\.2") as caught:
        student_stage.launch(cfg, storage, resume=True, on_line=lines.append)
    assert not isinstance(caught.value, MachineError)
    assert not any(line.startswith("[rank") for line in lines), lines          # no rank's traceback (a rank left
    assert sum(line.startswith("seed: error:") for line in lines) == 2, lines   # alone meets a closed connection)
    assert str(caught.value).count("cannot resume") == 1                # quoted once
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_nproc_must_match_the_launch(prepared) -> None:
    _, storage, _ = prepared
    with pytest.raises(SeedError, match=r"train.nproc=3 asks for 3 processes on this node but this one is one of 1; run `seed student`"):
        student_stage.run(_cfg(prepared, "train.nproc=3", "train.run=nproc"), storage, progress=False)
    with pytest.raises(SeedError, match=r"pretrain.nproc=3 asks for 3 processes on this node but this one is one of 1; "
                                        r"run `seed pretrain`"):
        pretrain_stage.run(_cfg(prepared, "pretrain.nproc=3", "pretrain.name=nproc"), storage, progress=False)