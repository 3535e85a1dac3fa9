"""Shared set-up for the benchmarks: real Fashion-MNIST shards (as they are, or upscaled to ImageNet-like
JPEGs) and random teachers in a scratch directory."""

from __future__ import annotations

import collections
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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def rchar() -> int:
    """Bytes this process has had from read calls so far (``/proc/self/io``; page-cache hits count)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


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


class ThreadSampler:
    """Where the watched threads of this process are (by name prefix: the main thread and this project's
    threads), sampled every ``interval_s`` (``sys._current_frames``): a poor man's profiler that sees every
    thread, including those waiting (in a lock, a ``.cpu()``, a queue).

    A sample is counted under the thread's name and two frames: the innermost one (what it is doing right
    now, often inside torch or the standard library) and the innermost frame of this project's code
    (``seed/``, ``pipeline/``: who asked for it).

        with ThreadSampler() as s:
            work()
        print(s.table(12))
    """

    def __init__(self, interval_s: float = 0.002, threads: tuple[str, ...] = ("MainThread", "seed")):
        self.interval_s, self.threads = interval_s, threads                   # thread name prefixes to watch
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _where(frame: Any) -> tuple[str, str]:
        def name(f: Any) -> str:
            return f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}:{f.f_lineno}"

        inner, ours = name(frame), "-"
        f = frame
        while f is not None:
            parts = Path(f.f_code.co_filename).parts
            if "seed" in parts[-2:] or "pipeline" in parts[-2:]:
                ours = name(f)
                break
            f = f.f_back
        return inner, ours

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                name = names.get(ident, str(ident))
                if ident != me and name.startswith(self.threads):
                    self.counts[(name, *self._where(frame))] += 1

    def table(self, rows: int = 15) -> str:
        """The most frequent (thread, innermost frame, project frame) as a Markdown table, in % of samples."""
        lines = ["| thread | innermost frame | project frame | % of samples |", "|---|---|---|---|"]
        for (thread, inner, ours), n in self.counts.most_common(rows):
            lines.append(f"| {thread} | {inner} | {ours} | {100 * n / max(self.samples, 1):.1f} |")
        return "\n".join(lines)


def gpu_spans(prof: Any) -> list[tuple[float, float]]:
    """``(start, end)``, us, of every GPU kernel and copy in a ``torch.profiler`` trace recorded with CUDA activity."""
    from torch.autograd import DeviceType

    return [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]


def gpu_busy_fraction(prof: Any, wall_us: float) -> float:
    """Share of ``wall_us`` in which at least one GPU kernel or copy ran, from a ``torch.profiler`` trace
    recorded with CUDA activity (kernels on several streams are merged, never counted twice)."""
    spans = sorted(gpu_spans(prof))
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / wall_us if wall_us > 0 else 0.0
