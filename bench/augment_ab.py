"""The CUDA path's crops (``seed.augment._crops_on_canvas``) of another revision against this tree's, in one process.

    python bench/augment_ab.py --before 4d7e2ab [--device cpu|cuda] [--rounds 3]

Loads ``seed/augment.py`` as it was at ``--before`` (``git show``) beside this tree's module, then on
ImageNet-sized random images (sides 333-640 px) crops 256 views at 224 px with each, alternating, for
V = 2 views per image (the teacher stage's batches) and V = 1 (training's). Prints the median time of
each, the torch operations each call dispatches (each one a launch or more on a GPU, where the host's
launches are the path's cost) and the largest difference between their views. On the CPU this path only
runs in tests, so its times stand in for the memory traffic the path makes on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import seed.augment as after  # noqa: E402
from bench.common import machine  # noqa: E402
from seed.views import Recipe, draw_views  # noqa: E402


def module_at(rev: str, tmp: Path):
    source = subprocess.run(["git", "show", f"{rev}:seed/augment.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = tmp / "augment_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("augment_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision whose seed/augment.py is the baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        before = module_at(args.before, Path(tmp))
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> list[torch.Tensor]:
        return [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=g).to(device)
                for h, w in rng.integers(333, 641, size=(n, 2))]

    def timed(fn, views, params) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(views, params, (224, 224))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    print(f"machine: {machine()}, device {device}; 256 views at 224 px, median of {args.rounds} rounds, alternating\n")
    print(f"| views per image | {args.before}, ms | this tree, ms | speed-up | torch operations, {args.before} / this tree "
          "| largest difference |\n|---|---|---|---|---|---|")
    crops_before, crops_after = before._crops_on_canvas, after._crops_on_canvas
    for V in (2, 1):
        views = [im for im in images(256 // V) for _ in range(V)]
        params = torch.from_numpy(np.concatenate([
            draw_views(Recipe(), seed=0, key=f"k{i}", views=1, height=int(v.shape[-2]), width=int(v.shape[-1]))
            for i, v in enumerate(views)])).to(device)
        diff = float((crops_before(views, params, (224, 224)) - crops_after(views, params, (224, 224))).abs().max())
        ops = [operations(fn, views, params) for fn in (crops_before, crops_after)]
        t_before, t_after = [], []
        for _ in range(args.rounds):
            t_before.append(timed(crops_before, views, params))
            t_after.append(timed(crops_after, views, params))
        b, a = statistics.median(t_before) * 1e3, statistics.median(t_after) * 1e3
        print(f"| {V} | {b:.1f} | {a:.1f} | {b / a:.2f}x | {ops[0]} / {ops[1]} | {diff:.1e} |", flush=True)


def operations(fn, views, params) -> int:
    """The torch operations one call dispatches (views, copies and kernels alike)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn(views, params, (224, 224))
    return Count.n


if __name__ == "__main__":
    main()
