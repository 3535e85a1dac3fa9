"""Shared set-up for the benchmarks: real Fashion-MNIST shards and random teachers in a scratch directory."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from seed.models import mlp_encoder
from seed.shards import FASHION_MNIST_DIR, fashion_mnist_to_shards
from seed.storage import Storage
from seed.teachers import save_moco_checkpoint


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")


def shards(root: Path, limit: int, per_shard: int = 1000) -> Path:
    """Fashion-MNIST train/test shards of the first ``limit`` images (made once per root)."""
    out = root / f"fm-{limit}"
    if not (out / "_info.json").exists():
        fashion_mnist_to_shards(str(out), source=os.environ.get("SEED_FASHION_MNIST", FASHION_MNIST_DIR),
                                per_shard=per_shard, limit=limit, progress=False)
    return out


def teacher_checkpoint(root: Path, arch: str, dim: int = 128) -> Path:
    """A MoCo-format checkpoint of a randomly initialised ``arch`` with a ``dim``-d MLP head."""
    path = root / f"{arch}-moco.pth"
    if not path.exists():
        torch.manual_seed(0)
        save_moco_checkpoint(mlp_encoder(arch, dim), path)
    return path


def storage(root: Path) -> Storage:
    return Storage(shards=str(root), caches=str(root / "caches"), runs=str(root / "runs"), reports=str(root / "reports"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(script: str, *args: str) -> str:
    """Run ``script`` in a fresh interpreter (for per-run peak RSS) and return its last stdout line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]
