"""Do process layouts change the teacher cache on a GPU? Per-view comparison of caches made by
different layouts of the same config, and a replay of every cached view.

    python3 bench/gpu_layouts.py [--out DIR] [--data .whl/fmnist-2048.npz] [--set cache.fused_augment=true]

Makes the JPEG shards and a random resnet50 (as bench/gpu_check.py), then the same cache five ways:
in this process with 4 workers (twice), with no workers (one thread), and through
``run_processes`` with one and two processes. For each pair it prints the per-view cosine (min,
how many views under 0.999) and the largest element difference; then it re-embeds every cached
view of two of the caches through the student's data path and compares with what is stored: with the
cache's ``fused_augment``, and the first cache also with the other choice (what a student that augments
differently from its teacher stage costs). ``--set``: config overrides for every cache (repeatable).
On the CPU (``--device cpu``) the layouts are expected to be byte-identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from bench.common import jpeg_shards, storage as make_storage, teacher_checkpoint  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed.config import load_config  # noqa: E402


def embeddings(url: str) -> np.ndarray:
    return zarr.open_group(url, mode="r")["embeddings"][:].astype(np.float32)


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(a).all(axis=-1) & np.isfinite(b).all(axis=-1)
    x, y = a[ok], b[ok]
    cos = (x * y).sum(axis=-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    return {"views": int(ok.sum()), "min_cos": float(cos.min()), "under_0.999": int((cos < 0.999).sum()),
            "max_abs": float(np.abs(x - y).max()), "identical": bool(np.array_equal(x, y))}


def replay(cfg, url: str, device: torch.device, fused_augment: bool) -> dict[str, float]:
    """Re-embed every cached view of ``url`` through the student's data path and compare."""
    from pipeline.teacher import embed
    from seed.data import CachedSource, collate
    from seed.decode import Decoder
    from seed.shards import iter_shard
    from seed.teachers import load_teacher

    group = zarr.open_group(url, mode="r")
    teacher, _ = load_teacher(cfg.teacher)
    teacher = teacher.to(device)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    worst, low, n = 1.0, 0, 0
    source = CachedSource(group, None, view="cycle", seed=0, dense=True)
    for s, shard_url in enumerate(group.attrs["shard_urls"]):
        for epoch in range(cfg.cache.views):           # view="cycle": view (e + s) mod V, each once over V epochs
            make = source.load(s, epoch)
            items = [ex for smp in iter_shard(shard_url) if (ex := make(smp.index, smp)) is not None]
            for lo in range(0, len(items), 256):
                part = items[lo: lo + 256]
                batch = collate(part, cfg.cache.recipe, cfg.cache.resolution, Decoder(device), device,
                                fused_augment=fused_augment)
                z = embed(teacher, batch.x, device)
                cached = torch.stack([torch.from_numpy(it.extra["z_t"]) for it in part]).float()
                cos = torch.nn.functional.cosine_similarity(z, cached, dim=1)
                worst, low, n = min(worst, float(cos.min())), low + int((cos < 0.999).sum()), n + len(part)
    return {"views": n, "min_cos": worst, "under_0.999": low}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-layouts-out")
    parser.add_argument("--data", default=str(ROOT / ".whl" / "fmnist-2048.npz"))
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="seed-layouts-"))
    data = Path(args.data)
    shard_dir = jpeg_shards(root, args.images, 256, source=data if data.exists() else None)
    (root / "jpeg").symlink_to(shard_dir.name, target_is_directory=True)
    n_shards = len(list(shard_dir.glob("train-*.tar")))
    device = torch.device(args.device)
    storage = make_storage(root)
    base = load_config(None, [
        f"data.train=jpeg/train-{{000000..{n_shards - 1:06d}}}.tar", "teacher.arch=resnet50",
        f"teacher.checkpoint={teacher_checkpoint(root, 'resnet50')}", "cache.views=2", "cache.resolution=224",
        "cache.batch_size=256", f"cache.device={'auto' if device.type == 'cuda' else 'cpu'}", *args.set])
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                  "overrides": args.set}
    urls: dict[str, str] = {}

    def made(name: str, run) -> None:
        cfg = dataclasses.replace(base, cache=dataclasses.replace(base.cache, name=name))
        t = time.perf_counter()
        result = run(cfg)
        urls[name] = result.cache
        results[f"{name}_s"] = round(time.perf_counter() - t, 2)
        print(f"{name}: {results[f'{name}_s']} s", flush=True)

    for name, workers in (("in_process_a", -1), ("in_process_b", -1), ("thread", 0)):
        made(name, lambda cfg, w=workers: teacher_stage.run(
            dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, workers=w)), storage, progress=False))
    for n in (1, 2):
        made(f"procs{n}", lambda cfg, n=n: teacher_stage.run_processes(cfg, storage, n, progress=False))
    ref = embeddings(urls["in_process_a"])
    for name in ("in_process_b", "thread", "procs1", "procs2"):
        results[f"in_process_a_vs_{name}"] = compare(ref, embeddings(urls[name]))
        print(name, results[f"in_process_a_vs_{name}"], flush=True)
    results["procs1_vs_procs2"] = compare(embeddings(urls["procs1"]), embeddings(urls["procs2"]))
    fused = base.cache.fused_augment
    for name, student_fused in (("in_process_a", fused), ("procs1", fused), ("in_process_a", not fused)):
        cfg = dataclasses.replace(base, cache=dataclasses.replace(base.cache, name=name))
        key = f"replay_{name}" + ("" if student_fused == fused else f"_student_fused_augment_{student_fused}")
        results[key] = replay(cfg, urls[name], device, student_fused)
        print(key, results[key], flush=True)
    (out / "layouts.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
