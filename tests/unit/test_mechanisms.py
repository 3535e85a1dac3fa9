"""The small mechanisms the stages stand on, each against an independent statement of what it must do."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seed import cache
from seed.config import load_config, to_dict
from seed.data import rank_shards, shard_order
from seed.errors import SeedError
from seed.models import mlp_from_state_dict, mlp_head
from seed.objectives import OBJECTIVES, CachedQueueSeed, CachedSeed, MocoV2, Objective, OnlineSeed, Queue, Supervised, create_objective
from seed.prefetch import WriteBehind, prefetch
from seed.schedules import warmup_cosine


# --- prefetch --------------------------------------------------------------------------------

def test_prefetch_keeps_order_and_runs_ahead() -> None:
    produced: list[int] = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)  # the producer thread fills the queue meanwhile
    assert len(produced) >= 3  # one consumed + two queued (+ one blocked in put)
    assert [0, *it] == list(range(6))


def test_prefetch_reraises_producer_errors_in_order() -> None:
    def items():
        yield 1
        yield 2
        raise ValueError("bad shard")

    got = []
    with pytest.raises(ValueError, match="bad shard"):
        for x in prefetch(items(), depth=2):
            got.append(x)
    assert got == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    def producers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "seed-prefetch"]

    before = producers()
    it = prefetch(endless(), depth=2)
    assert next(it) == 0
    mine = [t for t in producers() if t not in before]
    assert len(mine) == 1 and mine[0].is_alive()
    it.close()  # break out of the loop: the generator's finally stops the producer
    mine[0].join(timeout=5)
    assert not mine[0].is_alive()


def test_prefetch_depth_zero_is_inline() -> None:
    assert list(prefetch(iter(range(3)), depth=0)) == [0, 1, 2]


def test_write_behind_overlaps_one_write_with_the_callers_work_in_order() -> None:
    log: list[tuple[str, int, str]] = []
    caller = threading.current_thread().name
    release = [threading.Event() for _ in range(3)]

    def write(i: int) -> None:
        # waits until the caller, after submit returned, says it is computing the next block: a submit that
        # wrote inline would time out here
        assert release[i].wait(timeout=5), f"write {i} ran inline"
        log.append(("write", i, threading.current_thread().name))

    with WriteBehind("test-write") as writes:
        for i in range(3):
            writes.submit(lambda i=i: write(i), then=lambda i=i: log.append(("then", i, threading.current_thread().name)))
            log.append(("computing", i + 1, caller))
            release[i].set()
    # in order; a write's "then" runs in the caller's thread, after that write, before the next write starts
    assert [(what, i) for what, i, _ in log] == [("computing", 1), ("write", 0), ("then", 0), ("computing", 2),
                                                  ("write", 1), ("then", 1), ("computing", 3), ("write", 2), ("then", 2)]
    assert {t for what, _, t in log if what == "write"} != {caller} and all(t.startswith("test-write") for what, _, t in log
                                                                             if what == "write")
    assert {t for what, _, t in log if what != "write"} == {caller}


def test_write_behind_errors_reach_the_caller_and_a_write_in_flight_is_finished() -> None:
    done: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    writes = WriteBehind()
    writes.submit(fail, then=lambda: done.append(0))
    with pytest.raises(OSError, match="disk full"):  # raised by the next submit, which starts nothing
        writes.submit(lambda: done.append(1))
    writes.close()
    assert done == []
    with pytest.raises(OSError, match="disk full"):  # or by close, the last write's
        with WriteBehind() as writes:
            writes.submit(fail)
    # the caller's own error stands; the write it left in flight is finished (and its record kept) first
    with pytest.raises(KeyError, match="caller"):
        with WriteBehind() as writes:
            writes.submit(lambda: (time.sleep(0.2), done.append(2)), then=lambda: done.append(3))
            raise KeyError("caller")
    assert done == [2, 3]
    # Ctrl-C while the caller waits for a write: the write is finished, and reported, before the interrupt goes on
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def interrupted() -> None:
        time.sleep(0.1)                                          # the caller is waiting for this write by now
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.2)
        done.append(6)

    with pytest.raises(KeyboardInterrupt):
        with WriteBehind() as writes:
            writes.submit(interrupted, then=lambda: done.append(7))
            writes.submit(lambda: done.append(8))                # waits for the first: interrupted
    assert done == [2, 3, 6, 7]
    inline = WriteBehind(enabled=False)
    inline.submit(lambda: (time.sleep(0.1), done.append(4)), then=lambda: done.append(5))
    assert done == [2, 3, 6, 7, 4, 5] and inline.wait_s >= 0.1  # written before submit returns, all of it waited for
    inline.close()


# --- schedule --------------------------------------------------------------------------------

def test_warmup_then_cosine() -> None:
    lr = warmup_cosine(0.4, epochs=3, steps_per_epoch=10, warmup_epochs=0.5)
    assert lr.shape == (30,)
    assert np.allclose(lr[:5], 0.4 * np.arange(1, 6) / 5)  # linear warm-up over 5 steps, reaching base_lr
    t = np.arange(25)
    assert np.allclose(lr[5:], 0.2 * (1 + np.cos(math.pi * t / 25)))  # cosine from base_lr to 0
    assert lr.argmax() in (4, 5) and lr[-1] < 0.01


def test_warmup_longer_than_training_is_all_warmup() -> None:
    lr = warmup_cosine(1.0, epochs=1, steps_per_epoch=4, warmup_epochs=3)
    assert np.allclose(lr, [0.25, 0.5, 0.75, 1.0])


# --- queue -----------------------------------------------------------------------------------

def test_queue_wraps_around_keeping_the_newest() -> None:
    q = Queue(5, 2, torch.device("cpu"), seed=0)
    start = q.data.clone()
    q.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert q.ptr == 3 and torch.equal(q.data[:3, 0], torch.tensor([1.0, 2, 3])) and torch.equal(q.data[3:], start[3:])
    q.push(torch.tensor([[4.0, 0], [5, 0], [6, 0]]))  # 4, 5 fill the end, 6 wraps to the front
    assert q.ptr == 1 and q.data[:, 0].tolist() == [6, 2, 3, 4, 5]
    q.push(torch.arange(7, 14, dtype=torch.float32)[:, None].repeat(1, 2))  # more than K: the last K stay
    assert sorted(q.data[:, 0].tolist()) == [9, 10, 11, 12, 13] and q.ptr == 1


def test_queue_state_round_trip() -> None:
    a = Queue(4, 3, torch.device("cpu"), seed=1)
    a.push(torch.ones(3, 3))
    b = Queue(4, 3, torch.device("cpu"), seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.data, b.data) and a.ptr == b.ptr == 3


# --- shard order -----------------------------------------------------------------------------

def test_rank_shards_partition_the_shards() -> None:
    parts = [rank_shards(10, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(parts, [])) == list(range(10))


def test_shard_order_is_a_seeded_permutation_per_epoch() -> None:
    a0, a1 = shard_order(20, 0, seed=0), shard_order(20, 1, seed=0)
    assert sorted(a0) == sorted(a1) == list(range(20))
    assert a0 == shard_order(20, 0, seed=0)          # the same epoch, the same order (resume)
    assert a0 != a1 and a0 != shard_order(20, 0, seed=1)
    assert sorted(shard_order(20, 3, seed=0, rank=1, world=4)) == rank_shards(20, 1, 4)


# --- fingerprint diff ------------------------------------------------------------------------

def test_fingerprint_is_canonical_and_diff_names_fields() -> None:
    a = {"teacher": {"arch": "resnet50", "sha": "ab"}, "views": 4, "shards": ["s0", "s1"]}
    b = {"views": 4, "shards": ["s0", "s1"], "teacher": {"sha": "ab", "arch": "resnet50"}}
    assert cache.fingerprint(a) == cache.fingerprint(b)  # key order does not matter
    c = {**a, "teacher": {"arch": "resnet18", "sha": "ab"}, "views": 8}
    assert cache.fingerprint(c) != cache.fingerprint(a)
    assert cache.diff_fields(a, c) == ["teacher.arch: cache has 'resnet50', config wants 'resnet18'",
                                       "views: cache has 4, config wants 8"]
    assert cache.diff_fields(a, {**a, "seed": 1}) == ["seed: cache has '<absent>', config wants 1"]
    long = {"shards": [f"s{i}" for i in range(9)]}
    assert cache.diff_fields(long, {"shards": [f"s{i}" for i in range(10)]}) == [
        "shards: cache has '9 entries', config wants '10 entries'"]


# --- heads from state dicts -------------------------------------------------------------------

@pytest.mark.parametrize("layout,activation", [
    ({"0.weight": (8, 6), "0.bias": (8,), "2.weight": (4, 8), "2.bias": (4,)}, "relu"),                  # MoCo fc.0/fc.2
    ({"0.weight": (8, 6), "0.bias": (8,), "1.weight": (8,), "1.bias": (8,), "1.running_mean": (8,),
      "1.running_var": (8,), "1.num_batches_tracked": (), "3.weight": (4, 8), "3.bias": (4,)}, "relu"),  # SwAV
    ({"0.weight": (8, 6), "0.bias": (8,), "2.weight": (8, 8), "2.bias": (8,), "4.weight": (4, 8)}, "gelu"),  # DINO
])
def test_mlp_from_state_dict_rebuilds_the_layers(layout: dict, activation: str) -> None:
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randint(0, 5, shape, generator=g) if k.endswith("num_batches_tracked")
                 else torch.rand(shape, generator=g) + (0.5 if k.endswith("running_var") else 0.0))
             for k, shape in layout.items()}
    head = mlp_from_state_dict(state, activation, "ckpt.pth").eval()
    assert head.state_dict().keys() == state.keys()
    assert all(torch.equal(head.state_dict()[k], state[k]) for k in state)
    x = torch.rand(3, 6, generator=g)
    # the same computation written out by hand from the tensors
    act = torch.relu if activation == "relu" else torch.nn.functional.gelu
    h = x
    indices = sorted({int(k.split(".")[0]) for k in state})
    for i in range(max(indices) + 1):
        if i not in indices:
            h = act(h)
        elif f"{i}.running_mean" in state:
            h = (h - state[f"{i}.running_mean"]) / torch.sqrt(state[f"{i}.running_var"] + 1e-5) * state[f"{i}.weight"] \
                + state[f"{i}.bias"]
        else:
            h = h @ state[f"{i}.weight"].T + (state[f"{i}.bias"] if f"{i}.bias" in state else 0)
    with torch.no_grad():
        assert torch.allclose(head(x), h, atol=1e-5)


def test_mlp_from_state_dict_names_what_it_cannot_read() -> None:
    with pytest.raises(SeedError, match="ckpt.pth: unexpected head key 'weight'"):
        mlp_from_state_dict({"weight": torch.zeros(2, 2)}, "relu", "ckpt.pth")
    with pytest.raises(SeedError, match="cannot tell what head layer 0 is"):
        mlp_from_state_dict({"0.scale": torch.zeros(2)}, "relu", "ckpt.pth")
    with pytest.raises(SeedError, match="no projection head"):
        mlp_from_state_dict({}, "relu", "ckpt.pth")


def test_mlp_head_layout() -> None:
    head = mlp_head([6, 8, 4])
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]


# --- objectives registry ---------------------------------------------------------------------

def test_objectives_are_registered_by_method_name() -> None:
    assert {"seed-cached": CachedSeed, "seed-cached-queue": CachedQueueSeed, "seed-online": OnlineSeed, "moco": MocoV2,
            "supervised": Supervised}.items() <= OBJECTIVES.items()
    obj = create_objective("seed-cached", bank_vectors=torch.zeros(3, 2), bank_rows=torch.arange(3), tau_s=0.2,
                           tau_t=1e-4, dense=True)
    assert isinstance(obj, CachedSeed) and isinstance(obj, Objective) and obj.teacher_forwards == 0
    with pytest.raises(SeedError, match="unknown objective 'byol' \\(known: moco, seed-cached, seed-cached-queue, seed-online, supervised"):
        create_objective("byol")


# --- config sections -------------------------------------------------------------------------

def test_old_flat_keys_name_their_new_place() -> None:
    with pytest.raises(SeedError, match=r"config key train\.epochs is now train\.optim\.epochs"):
        load_config(None, ["train.epochs=3"])
    with pytest.raises(SeedError, match=r"pretrain\.shuffle_buffer is now pretrain\.loader\.shuffle_buffer"):
        load_config(None, ["pretrain.shuffle_buffer=10"])


def test_a_partial_section_keeps_its_parents_defaults() -> None:
    cfg = load_config(None, ["pretrain.optim.epochs=5", "train.optim.batch_size=64"])
    assert (cfg.pretrain.optim.epochs, cfg.pretrain.optim.base_lr) == (5, 0.06)  # pre-training's own lr default
    assert (cfg.train.optim.batch_size, cfg.train.optim.base_lr, cfg.train.optim.epochs) == (64, 0.03, 2)


def test_loader_settings_are_checked_and_do_not_decide_reuse() -> None:
    from seed.config import outcome

    with pytest.raises(SeedError, match="train.loader.shuffle_buffer must be > 0"):
        load_config(None, ["train.loader.shuffle_buffer=0"])
    with pytest.raises(SeedError, match="pretrain.loader.prefetch must be >= 0 \\(0 = no read-ahead\\), or -1"):
        load_config(None, ["pretrain.loader.prefetch=-2"])
    with pytest.raises(SeedError, match="cache.workers must be >= 0, or -1"):
        load_config(None, ["cache.workers=-2"])
    a = load_config(None, ["train.loader.workers=0", "train.device=cpu"]).train
    b = load_config(None, ["train.loader.workers=3", "train.loader.prefetch=5", "train.loader.fused_augment=true"]).train
    assert outcome(a) == outcome(b) and outcome(a) != outcome(load_config(None, ["train.loader.shuffle_buffer=7"]).train)
    # a section saved before the augmentation kernels (no fused_augment) still decides the same: no retraining
    saved = to_dict(a)
    del saved["loader"]["fused_augment"]
    assert outcome(saved) == outcome(a)
    assert outcome(load_config(None, []).pretrain) == outcome(load_config(None, ["pretrain.loader.fused_augment=true"]).pretrain)


def test_devices_are_named_clearly() -> None:
    from seed.devices import data_workers, resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(SeedError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SeedError, match="no CUDA device"):
            resolve_device("cuda:1")
    assert data_workers(3, torch.device("cpu")) == 3 and 1 <= data_workers(-1, torch.device("cpu")) <= 8
    assert 1 <= data_workers(-1, torch.device("cuda")) <= 4


def test_the_data_path_leaves_a_cpu_forward_its_cores() -> None:
    """Automatic settings: a CPU forward's threads take their cores first; workers get the cores left, and
    with none left and no workers the data path runs between forwards (read ahead 0). Explicit settings
    stand; CUDA keeps its workers and read-ahead whatever the thread count."""
    from seed.devices import READ_AHEAD, Launch, data_workers, read_ahead

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert data_workers(-1, cpu, model_threads=2, cores=2) == 0
    assert data_workers(-1, cpu, model_threads=4, cores=16) == 8 and data_workers(-1, cpu, model_threads=12, cores=16) == 4
    assert data_workers(-1, cpu, cores=2) == 1                                # no forward beside them: half the cores
    assert data_workers(2, cpu, model_threads=2, cores=2) == 2
    assert data_workers(-1, cuda, model_threads=None, cores=16) == 4
    # torchrun's ranks on one node share its cores: each rank's workers come from its share
    eight = Launch(rank=3, world=16, local_rank=3, local_world=8)
    assert data_workers(-1, cuda, cores=16, launch=eight) == 1 and data_workers(-1, cuda, cores=96, launch=eight) == 4
    assert data_workers(-1, cpu, cores=16, launch=Launch(local_world=4)) == 2
    assert data_workers(-1, cuda, cores=4, launch=eight) == 1 and data_workers(5, cuda, cores=4, launch=eight) == 5
    assert read_ahead(-1, cpu, 0, model_threads=2, cores=2) == 0
    assert read_ahead(-1, cpu, 0, model_threads=1, cores=2) == READ_AHEAD   # a core is free for the thread
    assert read_ahead(-1, cpu, 1, model_threads=2, cores=2) == READ_AHEAD   # the workers' batches ahead
    assert read_ahead(-1, cuda, 0, model_threads=None, cores=1) == READ_AHEAD
    assert read_ahead(3, cpu, 0, model_threads=2, cores=2) == 3 and read_ahead(0, cuda, 4) == 0
    # two one-thread ranks on two cores: each rank's one core is full, so neither workers nor a thread
    two = Launch(rank=1, world=2, local_rank=1, local_world=2)
    assert data_workers(-1, cpu, model_threads=1, cores=2, launch=two) == 0
    assert read_ahead(-1, cpu, 0, model_threads=1, cores=2, launch=two) == 0
    with pytest.raises(SeedError, match="cache.prefetch must be >= 0, or -1"):
        load_config(None, ["cache.prefetch=-2"])


def test_teacher_processes_on_the_cpu_take_even_shares_of_the_cores() -> None:
    from seed.devices import split_cores

    assert split_cores([0, 1], 2) == [[0], [1]]
    assert split_cores([2, 3, 5, 6, 7, 9, 10], 3) == [[2, 3, 5], [6, 7], [9, 10]]   # this process's cores, in order
    assert split_cores(list(range(16)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert split_cores([0, 1], 3) is None and split_cores([0], 0) is None            # too few to split


def test_teacher_processes_on_gpus_count_their_share_of_the_cores() -> None:
    """`seed teacher --procs 8` on a 16-core node with 8 GPUs: each process is pinned to two cores, so its
    automatic data workers are one, not the four a process that saw every core would start (32 on 16 cores)."""
    from seed.launcher import process_cores
    from seed.devices import data_workers

    cuda = torch.device("cuda", 0)
    shares = process_cores(8, list(range(16)))
    assert shares == [[2 * i, 2 * i + 1] for i in range(8)]
    assert [data_workers(-1, cuda, cores=len(s)) for s in shares] == [1] * 8
    assert data_workers(-1, cuda, cores=16) == 4                                      # unpinned: every process takes 4
    assert process_cores(1, list(range(16))) is None                                  # one process: left as it is
    assert process_cores(4, [0, 1]) is None                                           # fewer cores than processes


def test_each_local_rank_takes_its_own_gpu() -> None:
    from seed.devices import Launch, resolve_device

    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    launch = Launch.from_env(env)
    assert launch == Launch(rank=5, world=8, local_rank=1, local_world=4) and Launch.from_env({}) == Launch()
    # a fake count of 4 GPUs: auto and cuda become this rank's GPU; the CPU stays the CPU
    assert resolve_device("auto", launch=launch, cuda_count=4) == torch.device("cuda", 1)
    assert resolve_device("cuda", launch=launch, cuda_count=4) == torch.device("cuda", 1)
    assert resolve_device("cpu", launch=launch, cuda_count=4) == torch.device("cpu")
    assert resolve_device("auto", launch=launch, cuda_count=0) == torch.device("cpu")
    assert resolve_device("cuda", launch=Launch(), cuda_count=1) == torch.device("cuda", 0)
    assert resolve_device("cuda:2", launch=Launch(), cuda_count=4) == torch.device("cuda", 2)
    with pytest.raises(SeedError, match="local rank 1 of 4 has no GPU: this machine has 1"):
        resolve_device("auto", launch=launch, cuda_count=1)
    with pytest.raises(SeedError, match="'cuda:2' with 4 processes on this node: every rank would use that GPU"):
        resolve_device("cuda:2", launch=launch, cuda_count=4)
    with pytest.raises(SeedError, match="has 4 CUDA devices"):
        resolve_device("cuda:4", launch=Launch(), cuda_count=4)


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_written_files_respect_the_umask(tmp_path: Path, mask: int) -> None:
    """Checkpoints, the shard-lengths record and published shard directories are made through tempfile
    (private by default); they must end up as a plain create would make them, for teams sharing a root."""
    import io
    import os
    import tarfile

    from PIL import Image

    from seed import checkpoint
    from seed.shards import imagefolder_to_shards, shard_lengths

    (tmp_path / "tree" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "tree" / "cat" / "a.png")
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:  # a shard without _info.json: its count is recorded
        info = tarfile.TarInfo("k.png")
        data = (tmp_path / "tree" / "cat" / "a.png").read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    old = os.umask(mask)
    try:
        checkpoint.save({"w": torch.zeros(1)}, str(tmp_path / "runs" / "s" / "checkpoint.pt"))
        assert shard_lengths([str(tmp_path / "plain.tar")], record=str(tmp_path / "caches" / "_shard_lengths.json")) == [1]
        imagefolder_to_shards(str(tmp_path / "tree"), str(tmp_path / "shards"), per_shard=10)
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "runs" / "s" / "checkpoint.pt") == 0o666 & ~mask
    assert mode(tmp_path / "caches" / "_shard_lengths.json") == 0o666 & ~mask
    assert mode(tmp_path / "shards") == 0o777 & ~mask



def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    """A write that fails half-way (a full disk; here a file-size limit, which fails the same ``write``) surfaces
    inside ``torch.save`` as a bare RuntimeError: the user gets a SeedError naming the checkpoint and the free
    space, the previous checkpoint survives byte for byte and no temporary file is left behind."""
    import resource
    import signal

    from seed import checkpoint
    from seed.errors import MachineError

    url = tmp_path / "runs" / "checkpoint.pt"
    checkpoint.save({"epoch": 1}, str(url))
    before = url.read_bytes()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
        with pytest.raises(MachineError, match=r"could not write checkpoint .*checkpoint\.pt \(\d+ MiB free"):
            checkpoint.save({"epoch": 2, "w": torch.zeros(100_000)}, str(url))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert url.read_bytes() == before
    assert sorted(p.name for p in url.parent.iterdir()) == ["checkpoint.pt"]

# --- MoCo's Shuffle-BN --------------------------------------------------------------------------

def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_shuffle_bn_in_one_process_uses_sub_batches_of_a_seeded_permutation() -> None:
    """G = 4 sub-batches: each query sub-batch (contiguous) and each key sub-batch (a seeded permutation of the
    keys) has its own BatchNorm statistics, as on 4 GPUs; keys come back to their rows. Checked against the
    computation written out, and against the plain (one-batch) keys, which must differ (BN mattered)."""
    from seed.data import Batch
    from seed.loss import info_nce

    B, G, seed = 16, 4, 3
    x = torch.randn(2 * B, 6, generator=torch.Generator().manual_seed(1))
    batch = Batch(x, torch.arange(B), torch.zeros(B, dtype=torch.long), {}, 2)
    model = _bn_model().train()
    obj = MocoV2(model, Queue(32, 4, torch.device("cpu")), momentum=0.99, temperature=0.2, shuffle_bn=G, seed=seed)
    ref_key = _bn_model().train()                    # the key encoder starts as a copy; the momentum update keeps it
    plain = torch.nn.functional.normalize(ref_key(x[B:]), dim=1).detach()
    ctx = obj.prepare(batch, torch.device("cpu"))

    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed * 1_000_003 + 0))
    expected = torch.empty(B, 4)
    for idx in perm.chunk(G):
        expected[idx] = ref_key(x[B:][idx]).detach()
    assert torch.allclose(ctx["k"], torch.nn.functional.normalize(expected, dim=1), atol=1e-6)
    assert not torch.allclose(ctx["k"], plain, atol=1e-3)

    q = torch.cat([model(c) for c in x[:B].chunk(G)])
    loss = obj.loss(model, x, ctx, batch.labels)
    assert loss.item() == pytest.approx(info_nce(torch.nn.functional.normalize(q, dim=1), ctx["k"], obj.queue.data,
                                                 0.2).item(), rel=1e-6)

    # the permutation follows the step count, which a resumed run restores from the checkpoint
    again = MocoV2(_bn_model().train(), Queue(32, 4, torch.device("cpu")), momentum=0.99, temperature=0.2,
                   shuffle_bn=G, seed=seed)
    again.load_state_dict(obj.state_dict())
    assert again.step == 1
    nxt = torch.randperm(B, generator=torch.Generator().manual_seed(seed * 1_000_003 + 1))
    assert not torch.equal(nxt, perm)
    off = MocoV2(_bn_model().train(), Queue(32, 4, torch.device("cpu")), momentum=0.99, temperature=0.2)
    assert torch.allclose(off.prepare(batch, torch.device("cpu"))["k"], plain, atol=1e-6)  # 0 = off: one batch


def test_cached_seed_takes_the_bank_of_the_batchs_rotation() -> None:
    """Rotating banks: the objective holds R banks and uses the one its batch's targets were computed over."""
    from seed.data import Batch
    from seed.loss import seed_loss

    g = torch.Generator().manual_seed(0)
    banks = torch.nn.functional.normalize(torch.randn(2, 6, 4, generator=g), dim=2)
    rows = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    obj = CachedSeed(banks, rows, tau_s=0.2, tau_t=0.05, dense=True)
    z_t = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    model = torch.nn.Linear(5, 4)
    x = torch.randn(3, 5, generator=g)
    for r in (1, 0, 1):
        batch = Batch(x, torch.tensor([21, 11, 3]), torch.zeros(3, dtype=torch.long),
                      {"z_t": z_t, "rotation": torch.full((3,), r)}, 1)
        ctx = obj.prepare(batch, torch.device("cpu"))
        own = torch.tensor([21, 11, 3])[:, None] == rows[r][None, :]
        expected = seed_loss(torch.nn.functional.normalize(model(x), dim=1), z_t, banks[r], 0.2, 0.05, own)
        assert torch.equal(ctx["own"], own)
        assert obj.loss(model, x, ctx, batch.labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_progress_bars_refresh_every_half_minute_into_a_log() -> None:
    """Under pytest stderr is captured, as in a log file or a Prefect worker: a bar refreshes every
    LOG_REFRESH_S seconds there, not ten times a second; a caller's own interval wins."""
    import io

    from seed.report import LOG_REFRESH_S, progress_bar

    with progress_bar(total=1000, file=io.StringIO()) as bar:
        assert bar.mininterval == LOG_REFRESH_S == 30.0
    with progress_bar(total=1, file=io.StringIO(), mininterval=0.5) as bar:
        assert bar.mininterval == 0.5


def _halves(shards: list[int]) -> Iterator[tuple[int, int]]:
    for s in shards:
        if s == 3:
            raise SeedError("shard 3: unreadable")
        yield from [(s, 0), (s, 1)]


def test_shard_split_hands_a_seed_error_over_as_an_item_and_reraise_raises_it() -> None:
    from seed.workers import ShardSplit, reraise

    assert list(ShardSplit([0, 1, 2], _halves)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    items = list(ShardSplit([2, 3, 4], _halves))  # what came before the error, then the error; nothing after
    assert items[:2] == [(2, 0), (2, 1)] and len(items) == 3 and isinstance(items[2], SeedError)
    seen = []
    with pytest.raises(SeedError, match="shard 3: unreadable"):
        for item in reraise(items):
            seen.append(item)
    assert seen == [(2, 0), (2, 1)]
    assert list(reraise([(0, 0), (1, 0)])) == [(0, 0), (1, 0)]


def test_processes_a_stage_starts_know_it_and_watch_only_another_process() -> None:
    import os

    from seed.lifetime import PARENT_ENV, alive, child_env, exit_with_parent

    env = child_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", PARENT_ENV: str(os.getpid())}
    assert alive(os.getpid())
    with open("/proc/sys/kernel/pid_max") as f:
        assert not alive(int(f.read()) + 1)                                            # no process can have it
    # this process was not started by a stage, or names itself: nothing to watch
    assert os.environ.get(PARENT_ENV) is None and exit_with_parent() is None


@pytest.mark.parametrize("root", ["local", "memory://together"])
def test_students_saved_together_resume_together_wherever_the_save_was_cut(tmp_path: Path, root: str) -> None:
    """``save_together`` writes every checkpoint whole as ``.next`` before moving any in; ``settle`` finishes a
    save cut during the moves and undoes one cut while the new set was still being written. Each cut point is
    laid out on disk (or an fsspec store) as the save leaves it, then settled."""
    from seed import checkpoint
    base = str(tmp_path) if root == "local" else f"{root}/{tmp_path.name}"
    a, b = f"{base}/a/checkpoint.pt", f"{base}/b/checkpoint.pt"

    def epochs() -> list:
        return [checkpoint.load(u)["epoch"] if checkpoint.exists(u) else None for u in (a, b)]

    def pending() -> list[bool]:
        return [checkpoint.exists(u + checkpoint.PENDING) for u in (a, b)]

    checkpoint.save_together([(a, {"epoch": 1}), (b, {"epoch": 1})])
    assert epochs() == [1, 1] and pending() == [False, False]
    checkpoint.save({"epoch": 2}, a + checkpoint.PENDING)                  # cut while the new set was written
    checkpoint.settle([a, b])
    assert epochs() == [1, 1] and pending() == [False, False]
    checkpoint.save({"epoch": 2}, a)                                       # cut between the moves: a moved in,
    checkpoint.save({"epoch": 2}, b + checkpoint.PENDING)                  # b still pending
    checkpoint.settle([a, b])
    assert epochs() == [2, 2] and pending() == [False, False]
    checkpoint.save({"epoch": 3}, a + checkpoint.PENDING)                  # both written, none moved
    checkpoint.save({"epoch": 3}, b + checkpoint.PENDING)
    checkpoint.settle([a, b])
    assert epochs() == [3, 3] and pending() == [False, False]
    c = f"{base}/c/checkpoint.pt"                                           # a first save cut: nothing in place
    checkpoint.save({"epoch": 1}, c + checkpoint.PENDING)
    checkpoint.settle([a, b, c])
    assert epochs() == [3, 3] and not checkpoint.exists(c) and not checkpoint.exists(c + checkpoint.PENDING)
    # checkpoints inside an epoch: the same epoch, another step is another set
    checkpoint.save_together([(a, {"epoch": 3, "step": 1000}), (b, {"epoch": 3, "step": 1000})])
    checkpoint.save({"epoch": 3, "step": 2000}, a + checkpoint.PENDING)    # cut while the new set was written
    checkpoint.settle([a, b])
    assert [checkpoint.load(u)["step"] for u in (a, b)] == [1000, 1000] and pending() == [False, False]


def test_teacher_processes_on_the_cpu_record_one_thread_per_core_of_their_share() -> None:
    """What a new cache records as its forward's threads when N CPU processes make it (seed teacher --procs N, or the
    flow's teacher_workers=N, which lays the cache out before starting them): one per core of a share."""
    from pipeline.teacher import processes_config

    cfg = load_config(None, ["cache.device=cpu"])
    cores = [0, 1, 2, 3]
    assert processes_config(cfg, 2, cores).cache.cpu_threads == 2
    assert processes_config(cfg, 4, cores).cache.cpu_threads == 1
    assert processes_config(cfg, 1, cores).cache.cpu_threads == 0                     # one process: as it is
    explicit = load_config(None, ["cache.device=cpu", "cache.cpu_threads=3"])
    assert processes_config(explicit, 2, cores).cache.cpu_threads == 3                # asked for: kept
