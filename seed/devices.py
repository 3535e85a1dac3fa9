"""Where models run: device names, ranks, mixed precision and the CPU thread count.

These are explicit inputs of every stage (``cache.device``, ``train.device``, ``cache.cpu_threads``),
resolved here in one place, with the process's place in a ``torchrun`` launch. Nothing in this
module changes process state on import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from seed.errors import SeedError


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process stands in a ``torchrun`` launch; one plain process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        """The ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` torchrun sets (defaults: alone)."""
        env = os.environ if env is None else env
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", "1")))


def resolve_device(name: str, *, launch: Launch | None = None, cuda_count: int | None = None) -> torch.device:
    """The device a setting names for this process.

    ``auto`` is CUDA when present, else the CPU; anything else is parsed by torch (``cuda:1``). A
    CUDA device without an index is the process's local rank (``cuda:<LOCAL_RANK>``; ``cuda:0`` for
    a plain process), so the ranks ``torchrun`` starts on one node take one GPU each. An explicit
    index with several local ranks is refused: every rank would share that GPU. ``launch`` and
    ``cuda_count`` default to this process's environment and GPUs (tests pass their own).
    """
    launch = Launch.from_env() if launch is None else launch
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if name == "auto":
        name = "cuda" if count > 0 else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SeedError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:<index>)") from exc
    if device.type != "cuda":
        return device
    if count == 0:
        raise SeedError(f"device {name!r}: this machine has no CUDA device (use auto or cpu)")
    if device.index is None:
        if launch.local_rank >= count:
            raise SeedError(f"local rank {launch.local_rank} of {launch.local_world} has no GPU: this machine has {count}; "
                            f"start at most {count} processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", launch.local_rank)
    if launch.local_world > 1:
        raise SeedError(f"device {name!r} with {launch.local_world} processes on this node: every rank would use that GPU; "
                        "use auto or cuda (rank i takes cuda:i; choose GPUs with CUDA_VISIBLE_DEVICES)")
    if device.index >= count:
        raise SeedError(f"device {name!r}: this machine has {count} CUDA devices")
    return device


def join_process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the ``torchrun`` process group first when there is one.

    nccl when this rank runs on a GPU (which becomes the process's current device, so collectives
    and DDP use it), gloo on the CPU. Later calls return the same pair.
    """
    launch = Launch.from_env()
    if launch.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def leave_process_group() -> None:
    """Destroy the process group ``join_process_group`` joined, if any: NCCL asks for it before a process exits
    (its pending operations finish first; torch warns otherwise). Called once every rank has finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank done (rank 0 may still write an export), then each leaves on its own
        dist.destroy_process_group()


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (the backbones' convolutions and matmuls); a no-op context on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def ieee_float32() -> Any:
    """Float32 matmuls in IEEE float32 inside, whatever the process asked for outside (restored on exit).

    ``torch.set_float32_matmul_precision("high")`` (or ``fp32_precision = "tf32"``) lets cuBLAS, and oneDNN on
    CPUs that have it, round float32 products to TF32's 10-bit mantissa: a relative error of about 1e-3 in a
    cosine, about 10 in a logit at tau_T = 1e-4, enough to reorder a teacher's top-k. The SEED logits are
    made inside this. ``NVIDIA_TF32_OVERRIDE=1`` in the environment forces TF32 below torch and cannot be undone
    here (``tf32_forced`` tells it).
    """
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def tf32_forced(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``NVIDIA_TF32_OVERRIDE=1`` forces TF32 on every float32 cuBLAS product of this process."""
    return (os.environ if env is None else env).get("NVIDIA_TF32_OVERRIDE") == "1"


def cpu_core_ids() -> list[int]:
    """The ids of the cores this process may run on: its CPU affinity where the platform has one, else all."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return list(range(os.cpu_count() or 1))


def cpu_cores() -> int:
    """How many cores this process may run on (``cpu_core_ids``)."""
    return len(cpu_core_ids())


def split_cores(cores: list[int], n: int) -> list[list[int]] | None:
    """``cores`` in ``n`` contiguous shares as even as can be, one per process; None when there are fewer cores
    than processes (they then share all of them)."""
    if n < 1 or len(cores) < n:
        return None
    size, extra = divmod(len(cores), n)
    starts = [i * size + min(i, extra) for i in range(n + 1)]
    return [cores[a:b] for a, b in zip(starts, starts[1:])]


def core_share(cores: int | None = None, launch: Launch | None = None) -> int:
    """This process's share of ``cores`` (default: ``cpu_cores``): ``torchrun``'s ranks on one node (``launch``,
    default this process's) split them evenly, at least one each."""
    launch = Launch.from_env() if launch is None else launch
    return max(1, (cpu_cores() if cores is None else cores) // max(1, launch.local_world))


def data_workers(setting: int, device: torch.device, *, model_threads: int | None = None,
                 cores: int | None = None, launch: Launch | None = None) -> int:
    """Data-path processes for a stage on ``device``: when ``setting`` is -1 (automatic), half the cores,
    at most 8 on the CPU and 4 on CUDA, leaving the rest to the model's threads and this process; else
    ``setting``. The cores are this process's share: ``torchrun``'s ranks on one node (``launch``, default
    this process's) split them evenly, so 8 ranks on 16 cores take one worker each, not 4 (32 workers and
    8 ranks on 16 cores).

    ``model_threads``: on the CPU, the intra-op threads of the model that runs beside the workers (the
    teacher stage's forward, the training step). They take their cores first; the workers get the cores left (none when the forward's
    threads fill them: workers beside such a forward only take cores from it, see ``read_ahead``).
    ``cores``: the cores to share (default: this process's, ``cpu_cores``).

    On the CPU they read, decode and augment. On CUDA the GPU decodes (nvJPEG) and augments, so the
    teacher stage's workers only read shards and draw views, and training composes its batches in
    one worker process whenever the setting is not 0 (see ``seed.data.Batches``).
    """
    if setting >= 0:
        return setting
    cores = core_share(cores, launch)
    if device.type == "cpu" and model_threads is not None:
        return min(8, max(0, cores - model_threads))
    # On CUDA the main process's decode-and-augment thread limits first: on an H200 with 16 cores,
    # 4 workers beat 8 and 15 (docs/benchmarks.md, "Teacher stage on a GPU against its worker count").
    return min(4 if device.type == "cuda" else 8, max(1, cores // 2))


READ_AHEAD = 2  # batches made ahead of the model when the setting is automatic and a thread can make them


def read_ahead(setting: int, device: torch.device, workers: int, *, model_threads: int | None = None,
               cores: int | None = None, launch: Launch | None = None) -> int:
    """Batches the data path makes ahead of the model: ``setting``, or when it is -1 (automatic)
    ``READ_AHEAD``, except with no ``workers`` on a CPU whose cores the model's ``model_threads`` fill: 0,
    the data path then runs between forwards, in the forward's thread.

    A thread beside such a forward runs on the forward's cores: each time it does, one of the forward's
    threads waits and the others wait for it at the next barrier. On a 2-core CPU the teacher stage at
    32 px made 0.71 of the pure forward with a thread and 0.78 without (and 1.03 either way at 224 px,
    where the data path is a small part of the forward), and an epoch of the demo's student took 12.3 s
    inline against 13.6 s with a worker and 14.9 s with a thread (docs/benchmarks.md).
    """
    if setting >= 0:
        return setting
    cores = core_share(cores, launch)  # as data_workers counts them
    if device.type == "cpu" and workers == 0 and model_threads is not None and model_threads >= cores:
        return 0
    return READ_AHEAD


def set_cpu_threads(n: int) -> None:
    """Fix torch's intra-op thread count (0 = leave it as it is).

    The split of a reduction across threads changes the last bits of a CPU forward, so every writer
    of one cache must use the same count. Threads are a process-wide setting: entry points call this
    once (the Dask layout's shard tasks call it in each task, always with the cache's value, so threads
    never race to different counts); shard writers only check it (``require_cpu_threads``).
    """
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def require_cpu_threads(n: int, what: str) -> None:
    """Refuse to write ``what`` with another thread count than the one it was started with."""
    if n > 0 and torch.get_num_threads() != n:
        raise SeedError(f"{what} was written with {n} CPU threads but this process uses {torch.get_num_threads()}; "
                        f"call seed.devices.set_cpu_threads({n}) first (the stage entry points do)")
