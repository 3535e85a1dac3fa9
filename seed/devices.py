"""Where models run: device names, mixed precision and the CPU thread count.

These are explicit inputs of every stage (``cache.device``, ``train.device``, ``cache.cpu_threads``),
resolved here in one place. Nothing in this module changes process state on import.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from seed.errors import SeedError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; anything else is parsed by torch (``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SeedError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:<index>)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SeedError(f"device {name!r}: this machine has no CUDA device (use auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SeedError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (the backbones' convolutions and matmuls); a no-op context on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def data_workers(setting: int, device: torch.device) -> int:
    """Data-path processes for a stage on ``device``: when ``setting`` is -1 (automatic), half the cores,
    at most 8 on the CPU and 4 on CUDA, leaving the rest to the model's threads and this process; else
    ``setting``.

    On the CPU they read, decode and augment. On CUDA the GPU decodes (nvJPEG) and augments, so the
    teacher stage's workers only read shards and draw views, and training composes its batches in
    this process and uses none (see ``seed.data.Batches``).
    """
    if setting >= 0:
        return setting
    half = max(1, (os.cpu_count() or 1) // 2)
    # On CUDA the main process's decode-and-augment thread limits first: on an H200 with 16 cores,
    # 4 workers beat 8 and 15 (docs/benchmarks.md, "Teacher stage on a GPU against its worker count").
    return min(4 if device.type == "cuda" else 8, half)


def set_cpu_threads(n: int) -> None:
    """Fix torch's intra-op thread count (0 = leave it as it is).

    The split of a reduction across threads changes the last bits of a CPU forward, so every writer
    of one cache must use the same count. Threads are a process-wide setting: entry points call this
    once (the Prefect shard tasks call it in each task, always with the cache's value, so threads
    never race to different counts); shard writers only check it (``require_cpu_threads``).
    """
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def require_cpu_threads(n: int, what: str) -> None:
    """Refuse to write ``what`` with another thread count than the one it was started with."""
    if n > 0 and torch.get_num_threads() != n:
        raise SeedError(f"{what} was written with {n} CPU threads but this process uses {torch.get_num_threads()}; "
                        f"call seed.devices.set_cpu_threads({n}) first (the stage entry points do)")
