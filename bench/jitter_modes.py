"""The two colour-jitter modes of the recipe side by side: time, and how far apart their pixels are; and the
sequential one through the augmentation kernels (``fused_augment``, CUDA).

    python bench/jitter_modes.py [--device cpu|cuda] [--rounds 5] [--size 224] [--views 256]
    TRITON_INTERPRET=1 python bench/jitter_modes.py --device cpu --size 32 --rounds 1   # the kernels, interpreted

On smooth colour images of ImageNet's sizes (a few random colours per image, bilinearly upsampled to
sides of 333-640 px, so that saturation and hue act as on photographs), with MoCo-v2's rows at V = 2
views per image, medians with the modes alternating:
- ``apply_batch`` with ``jitter_mode`` sequential and affine, and sequential with ``fused_augment`` (crops,
  jitter and blur as Triton kernels on CUDA; ``apply_batch`` ignores it on the CPU, where only the colour
  stage's row runs the kernels, under Triton's interpreter), with MoCo-v2's blur and without it, and the crops
  alone (no jitter, grayscale or blur): the differences are what the jitter costs;
- the colour stage alone (``_colour_and_blur``) on the whole batch's crops, as the CUDA path runs it
  (on the CPU, ``apply_batch`` works a few views at a time instead);
- on CUDA, the colour stage's GPU kernel time under ``torch.profiler`` and its kernel count; on any
  device, the operators it calls from Python (its host work per batch).
Then the mean and the 99th percentile of |sequential - affine| over the jittered views' pixels, in
units of the [0, 1] range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import gpu_spans, machine  # noqa: E402
from seed import augment  # noqa: E402
from seed.augment import apply_batch  # noqa: E402
from seed.views import COL, Recipe, draw_views  # noqa: E402

MODES = ("sequential", "affine")
# what is measured: label -> (jitter mode, fused_augment)
VARIANTS = {"sequential": ("sequential", False), "fused": ("sequential", True), "affine": ("affine", False)}


def colour_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` uint8 ``[3, h, w]`` images, h and w in [333, 640]: 6 x 6 random colours, bilinearly upsampled."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    return [(F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(int(h), int(w)), mode="bilinear")[0] * 255)
            .round().to(torch.uint8) for h, w in rng.integers(333, 641, size=(n, 2))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=256, help="views per batch (2 per image)")
    parser.add_argument("--png", default=None, help="also draw 8 jittered views in both modes, and their difference")
    args = parser.parse_args()
    device, size, out = torch.device(args.device), args.size, (args.size, args.size)
    recipes = {m: Recipe(jitter_mode=m) for m in MODES}
    images = [im for im in colour_images(args.views // 2) for _ in range(2)]
    rows = torch.from_numpy(np.concatenate([
        draw_views(recipes["sequential"], seed=0, key=f"k{i // 2}", views=1, first=i % 2, height=int(im.shape[-2]),
                   width=int(im.shape[-1])) for i, im in enumerate(images)]))
    if device.type == "cuda":
        images = [im.to(device) for im in images]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t) * 1e3

    # The crops every mode starts from (the CUDA path's canvas crops on a GPU, the CPU path's otherwise).
    crops = (augment._crops_on_canvas(images, rows.to(device), out) if device.type == "cuda"
             else augment._crops_by_size(images, rows, out))
    rows_here = rows.to(device)

    def colour(variant: str) -> torch.Tensor:
        mode, fused = VARIANTS[variant]
        return augment._colour_and_blur(crops.clone(), rows_here, rows, recipes[mode], out, fused)

    def augmented(variant: str, rows: torch.Tensor) -> torch.Tensor:
        mode, fused = VARIANTS[variant]
        return apply_batch(images, rows, recipes[mode], size, device, fused_augment=fused)

    # The rows decide which branches a view takes (the recipe's probabilities only drew them): clear columns.
    no_blur, plain_rows = rows.clone(), rows.clone()
    no_blur[:, COL["blur_sigma"]] = 0.0
    plain_rows[:, [COL["jitter"], COL["grayscale"], COL["blur_sigma"]]] = 0.0
    views = {v: augmented(v, rows) for v in VARIANTS}                       # warm-up (compiles), and the pixels
    steps = ("apply_batch", "apply_batch, blur off", "colour stage, whole batch")
    times: dict[str, dict[str, list[float]]] = {v: {step: [] for step in steps} for v in VARIANTS}
    plain: list[float] = []
    for _ in range(args.rounds):
        for v in VARIANTS:
            times[v][steps[0]].append(timed(lambda: augmented(v, rows)))
            times[v][steps[1]].append(timed(lambda: augmented(v, no_blur)))
            times[v][steps[2]].append(timed(lambda: colour(v)))
        plain.append(timed(lambda: apply_batch(images, plain_rows, recipes["sequential"], size, device)))
    clone = timed(lambda: crops.clone())

    print(f"machine: {machine()}, device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
          + f"; {len(images)} views of {len(images) // 2} colour images at {size} px, median of {args.rounds} rounds, "
          f"modes alternating; apply_batch making the crops alone: {statistics.median(plain):.1f} ms; the colour "
          f"stage includes a copy of the crops ({clone:.1f} ms)\n")
    from seed import augment_kernels

    why = augment_kernels.unavailable()
    print("augmentation kernels: " + ("ran" if why is None else f"did NOT run ({why}): 'fused' is the tensor path")
          + ("; on the CPU apply_batch ignores fused_augment, so only the colour stage's 'fused' row ran them (under "
             "Triton's interpreter: its time means nothing)" if device.type == "cpu" and why is None else "") + "\n")
    print("| step | sequential, ms | fused, ms | affine, ms | speed-up, fused | speed-up, affine |\n|---|---|---|---|---|---|")
    for step in steps:
        s, f, a = (statistics.median(times[v][step]) for v in VARIANTS)
        print(f"| {step} | {s:.1f} | {f:.1f} | {a:.1f} | {s / f:.2f}x | {s / a:.2f}x |", flush=True)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        print("\n| colour stage on the GPU | sequential | fused | affine |\n|---|---|---|---|")
        kernel_ms, kernels = {}, {}
        for v in VARIANTS:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                colour(v)
                sync()
            spans = gpu_spans(prof)
            kernel_ms[v] = sum(b - a for a, b in spans) / 1e3
            kernels[v] = len(spans)
        print("| GPU kernel time, ms | " + " | ".join(f"{kernel_ms[v]:.2f}" for v in VARIANTS) + " |")
        print("| kernels (the copy of the crops included) | " + " | ".join(str(kernels[v]) for v in VARIANTS) + " |")
    # Operators the colour stage calls (top-level aten ops): the host work per batch of the thread that also
    # feeds the teacher (see the interpreter-lock figures in benchmarks.md). On a GPU most of them launch a
    # kernel; a few work on the host rows (which views take a branch).
    from torch.profiler import ProfilerActivity, profile

    calls = {}
    for v in VARIANTS:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            colour(v)
        calls[v] = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    print("\noperators called by the colour stage (a copy of the crops included; the fused kernels' launches not "
          "counted): " + ", ".join(f"{v} {calls[v]}" for v in VARIANTS))
    jittered = rows[:, COL["jitter"]] > 0.5
    if args.png:
        from torchvision.utils import save_image

        picked = jittered.nonzero().squeeze(1)[:8].to(device)
        seq, aff = views["sequential"][picked], views["affine"][picked]
        rows_png = torch.cat([seq, aff, ((seq - aff).abs() * 4).clamp(0, 1)])           # difference x 4
        save_image(F.interpolate(rows_png.float().cpu(), size=(112, 112), mode="area"), args.png, nrow=len(picked),
                   padding=2, pad_value=1.0)
        print(f"\n{args.png}: 8 jittered views, sequential (top), affine (middle), |difference| x 4 (bottom)")
    gap = (views["sequential"] - views["affine"]).abs()[jittered.to(device)].flatten().float().cpu()
    q = torch.quantile(gap[torch.randperm(len(gap), generator=torch.Generator().manual_seed(0))[:1 << 24]], 0.99)
    print(f"\n|sequential - affine| over the {int(jittered.sum())} jittered views' pixels: mean {gap.mean():.4f}, "
          f"p99 {q:.4f}, max {gap.max():.4f}; over the other views: "
          f"{(views['sequential'] - views['affine']).abs()[~jittered.to(device)].max():.2e} at most")


if __name__ == "__main__":
    main()
