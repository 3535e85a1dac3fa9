"""Shared set-up for the benchmarks: real Fashion-MNIST shards (as they are, or upscaled to ImageNet-like
JPEGs) and random teachers in a scratch directory."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seed.models import mlp_encoder
from seed.shards import FASHION_MNIST_DIR, INFO_FILE, _write_split, fashion_mnist_to_shards, load_fashion_mnist
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


def _jpeg(pixels: np.ndarray, h: int, w: int, quality: int) -> bytes:
    im = Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _train_images(source: str | Path | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` Fashion-MNIST train images and labels, from an IDX directory or an ``.npz``
    (``images``, ``labels``: what ``bench/gpu.sh`` carries to machines without the dataset)."""
    src = Path(source or os.environ.get("SEED_FASHION_MNIST", FASHION_MNIST_DIR))
    if src.suffix == ".npz":
        with np.load(src) as z:
            images, labels = z["images"][:n], z["labels"][:n]
    else:
        images, labels = load_fashion_mnist(src, "train", n)
    if len(images) < n:
        raise ValueError(f"{src} holds {len(images)} train images, {n} asked for")
    return images, labels


def jpeg_shards(root: Path, n: int, per_shard: int = 256, min_side: int = 333, max_side: int = 640, quality: int = 90,
                seed: int = 0, *, source: str | Path | None = None) -> Path:
    """ImageNet-shaped webdataset shards, made once per root: the first ``n`` Fashion-MNIST train images,
    each upscaled (PIL bilinear, RGB) to a seeded random size with sides in [min_side, max_side] and
    stored as JPEG at ``quality`` (``KEY.jpg`` + ``KEY.cls``, ``train-%06d.tar``, with an ``_info.json``).

    ``source``: a Fashion-MNIST IDX directory or an ``.npz`` of ``images`` and ``labels`` (default
    ``$SEED_FASHION_MNIST`` or ``seed.shards.FASHION_MNIST_DIR``). How the shards were made (sizes,
    bytes, encode and write seconds) is recorded under ``generation`` in the ``_info.json``.
    Returns the directory.
    """
    out = root / f"jpeg-{n}-{per_shard}-{min_side}to{max_side}-q{quality}-s{seed}"
    if (out / INFO_FILE).exists():
        return out
    images, labels = _train_images(source, n)
    t = time.perf_counter()
    sides = np.random.default_rng(seed).integers(min_side, max_side + 1, size=(n, 2))   # (h, w) each
    threads = max(1, min(16, os.cpu_count() or 1))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".jpeg-", dir=root))                 # renamed when complete
    stats = {"encode_s": 0.0, "bytes": 0}

    def samples(pool: concurrent.futures.ThreadPoolExecutor) -> Iterator[tuple[str, bytes, str, int]]:
        for start in range(0, n, 1024):                                      # bounded memory for any n
            t0 = time.perf_counter()
            blobs = list(pool.map(lambda i: _jpeg(images[i], int(sides[i, 0]), int(sides[i, 1]), quality),
                                  range(start, min(n, start + 1024))))
            stats["encode_s"] += time.perf_counter() - t0
            for i, blob in enumerate(blobs, start):
                stats["bytes"] += len(blob)
                yield f"img-{i:06d}", blob, "jpg", int(labels[i])

    try:
        t_write = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:         # PIL releases the GIL
            split = _write_split(samples(pool), tmp, "train", per_shard)
        write_s = time.perf_counter() - t_write - stats["encode_s"]
        generation = {"writer": "seed.shards._write_split", "images": n, "shards": len(split["filenames"]),
                      "per_shard": per_shard, "min_side": min_side, "max_side": max_side, "quality": quality,
                      "seed": seed, "mean_jpeg_bytes": round(stats["bytes"] / n, 0),
                      "mean_pixels": round(float(np.mean(sides[:, 0] * sides[:, 1])), 0),
                      "encode_s": round(stats["encode_s"], 2), "encode_threads": threads, "write_s": round(write_s, 2),
                      "generation_s": round(time.perf_counter() - t, 2)}
        (tmp / INFO_FILE).write_text(json.dumps({"splits": {"train": split}, "generation": generation}, indent=1))
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)                                 # a stale incomplete one
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    """This process's peak resident set, MB.

    On Linux the high-water mark of this process's own memory (``VmHWM``): ``ru_maxrss`` survives
    ``exec``, so in a child started by ``child`` it would be at least the parent's RSS at the fork.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(script: str, *args: str) -> str:
    """Run ``script`` in a fresh interpreter (for per-run peak RSS) and return its last stdout line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def fashion_mnist_all(root: Path, per_shard: int = 1000) -> str:
    """A ``data.train`` spec over all 70,000 Fashion-MNIST images, the 60,000 train shards then the
    10,000 test shards (a ``::`` list of absolute globs; made once per root), for banks that need more
    distinct images than the train split holds (K = 65,536)."""
    data = shards(root, 70_000, per_shard).absolute()
    return "::".join(str(data / split / f"{split}-*.tar") for split in ("train", "test"))
