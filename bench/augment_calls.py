"""The torch operations the CUDA path's augmentation dispatches per batch, with and without the Triton kernels.

    TRITON_INTERPRET=1 python bench/augment_calls.py [--images 128] [--views 2] [--size 32]

Runs the CUDA path's code (``seed.augment._crops_on_canvas`` or ``_kernel_crops``, then ``_colour_and_blur``) on
the CPU for one batch of MoCo-v2 views of random images of 40-57 px, and counts the aten operations it
dispatches (a ``TorchDispatchMode``), by name: on a GPU the data thread issues each of them, and most launch a
kernel. The kernels themselves run under Triton's interpreter (``TRITON_INTERPRET=1``; without it they cannot
run on the CPU and the kernel path falls back to the tensor path), whose own operations are counted apart,
as "(interpreter)": on a GPU a kernel is one launch instead.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.common import machine  # noqa: E402
from seed import augment  # noqa: E402
from seed.views import Recipe, draw_views  # noqa: E402


class Count(TorchDispatchMode):
    """Counts dispatched aten operations by name; those the Triton interpreter makes as "(interpreter)"."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and "/triton/" not in frame.f_code.co_filename:
            frame = frame.f_back
        self.ops["(interpreter)" if frame is not None else func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--views", type=int, default=2, help="views per image")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    recipe, out, cpu = Recipe(), (args.size, args.size), torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40 + i % 9, 50 + i % 7), generator=g, dtype=torch.uint8)
              for i in range(args.images)]
    per_view = [im for im in images for _ in range(args.views)]
    rows = torch.from_numpy(np.concatenate([
        draw_views(recipe, seed=0, key=f"k{i // args.views}", views=1, first=i % args.views, height=int(im.shape[1]),
                   width=int(im.shape[2])) for i, im in enumerate(per_view)]))

    def tensor_path() -> torch.Tensor:
        return augment._colour_and_blur(augment._crops_on_canvas(per_view, rows, out), rows, rows, recipe, out)

    def kernels() -> torch.Tensor:
        x = augment._kernel_crops(per_view, rows, out, cpu)
        x = augment._crops_on_canvas(per_view, rows, out) if x is None else x
        return augment._colour_and_blur(x, rows, rows, recipe, out, fused=True)

    from seed import augment_kernels

    print(f"machine: {machine()}; {len(per_view)} views ({args.images} images x {args.views}) at {args.size} px, "
          f"the CUDA path's code on the CPU\n")
    print("| path | aten operations | (interpreter) | views (no kernel) | the others, most common |\n|---|---|---|---|---|")
    for name, fn in (("tensor path", tensor_path), ("kernels", kernels)):
        fn()                                                                  # warm-up
        with Count() as count:
            fn()
        ops = count.ops
        others = [(k, v) for k, v in ops.most_common() if k not in ("(interpreter)", "view")]
        print(f"| {name} | {sum(ops.values())} | {ops['(interpreter)']} | {ops['view']} | "
              + ", ".join(f"{k} {v}" for k, v in others[:8]) + f" ({sum(v for _, v in others)} in all) |")
    why = augment_kernels.unavailable()
    print("\naugmentation kernels: " + ("ran (interpreted)" if why is None else f"did NOT run ({why})"))


if __name__ == "__main__":
    main()
