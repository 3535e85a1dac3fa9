"""The GPU's own budget in the teacher stage: the GPU time of each part of one batch, and what it allows.

    python3 bench/gpu_budget.py [--rounds 5] [--smoke]

On one GPU the teacher stage decodes its JPEGs (nvJPEG), augments the views (``apply_batch``) and embeds them
(the teacher's forward) on the same device. This measures, for one batch of 256 views at 224 px (128
ImageNet-shaped JPEGs from ``.whl/fmnist-2048.npz``, V = 2, MoCo-v2's rows from ``draw_many``), the GPU
time of each part under ``torch.profiler``: the kernels and copies it ran, summed (its work, whatever else
the GPU could have done beside it; with the number of GPU events, which a profiler that lost its events
would show as 0), and the wall time of the call with the GPU synchronised after it:
- nvJPEG's decode of the 128 images (``seed.decode.Decoder``; on GPUs with hardware JPEG engines, such as
  the H100, baseline JPEGs decode there, outside the kernel time, so its wall time and images/s matter too);
- ``apply_batch`` with each jitter mode (``sequential``, the default, and ``affine``), and the sequential one with
  ``fused_augment`` (crops, jitter and blur as Triton kernels, ``seed.augment_kernels``; compiled in the warm-up
  calls), and the affine one with it (its crops and blur by kernels);
- the stage's forward (``pipeline.teacher.Forward``: a random-init ``resnet50``, bf16, channels_last), as
  a CUDA graph and eagerly.
Run one after another on the GPU, the stage's views/s can be at most ``forward / (decode + augmentation +
forward)`` of the pure forward's, however fast the host feeds it: the last table gives that ceiling for
each mode and forward. Parts on other streams could overlap the forward's kernels only where the forward
leaves the GPU's units idle.

``--smoke`` (or no CUDA): 16 views on the CPU, wall times only, to test the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Profiler sessions one after another: without this, a session started soon after another ended can record no
# GPU events on some CUDA/kineto versions (kineto keeps CUPTI set up between sessions with it)
os.environ.setdefault("TEARDOWN_CUPTI", "0")

import torch  # noqa: E402

from bench.common import gpu_spans, jpeg_shards, machine, teacher_checkpoint  # noqa: E402
from pipeline.teacher import Forward  # noqa: E402
from seed.augment import apply_batch  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.decode import Decoder  # noqa: E402
from seed.shards import iter_shard  # noqa: E402
from seed.teachers import load_teacher  # noqa: E402
from seed.views import Recipe, draw_many  # noqa: E402

MODES = ("sequential", "affine")
# the augmentations measured: (label, jitter mode, fused_augment)
AUGMENTATIONS = (("sequential", "sequential", False), ("sequential, fused kernels", "sequential", True),
                 ("affine", "affine", False), ("affine, fused crops and blur", "affine", True))


def gpu_and_wall_ms(fn: Callable[[], object], device: torch.device,
                    rounds: int) -> tuple[float | None, float, float | None]:
    """(GPU kernel and copy time, wall time, GPU events) of one ``fn()``: the wall time a median over ``rounds``
    calls after two warm-up calls; the GPU time and event count the mean over ``rounds`` calls under one profiler
    session (None on the CPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    walls = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync()
        walls.append((time.perf_counter() - t) * 1e3)
    if device.type != "cuda":
        return None, statistics.median(walls), None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            fn()
        sync()
    spans = gpu_spans(prof)
    return sum(b - a for a, b in spans) / 1e3 / rounds, statistics.median(walls), len(spans) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="16 views on the CPU (figures mean nothing)")
    parser.add_argument("--data", default=str(ROOT / ".whl" / "fmnist-2048.npz"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    views, size = (16, 224) if device.type == "cpu" else (256, 224)
    root = Path(tempfile.mkdtemp(prefix="seed-gpu-budget-"))
    shards = jpeg_shards(root, views // 2, views // 2, source=args.data if Path(args.data).exists() else None)
    samples = list(iter_shard(str(next(shards.glob("train-*.tar")))))
    decoder = Decoder(device)
    images = decoder.decode(samples)
    assert all(isinstance(im, torch.Tensor) for im in images), "an image did not decode"
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    rows = {m: torch.from_numpy(draw_many(Recipe(jitter_mode=m), seed=0, keys=[s.key for s in samples], sizes=sizes,
                                          views=2).reshape(views, -1)) for m in MODES}
    per_view = [im for im in images for _ in range(2)]                       # image-major, as the stage's batches

    cfg = load_config(None, ["teacher.arch=resnet50", f"teacher.checkpoint={teacher_checkpoint(root, 'resnet50')}"])
    teacher, _ = load_teacher(cfg.teacher)
    teacher = teacher.to(device)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    x = apply_batch(per_view, rows["sequential"], Recipe(), size, device)
    if device.type == "cuda":  # the profiler set up before any graph is captured (a graph made before it, then
        from torch.profiler import ProfilerActivity, profile  # replayed under it, has crashed some versions)

        with profile(activities=[ProfilerActivity.CUDA]):
            torch.ones(1, device=device).add_(1)
            torch.cuda.synchronize()
    forwards = {"CUDA graph": Forward(teacher, device, batch_size=views, resolution=size, graph=True),
                "eager": Forward(teacher, device, batch_size=views, resolution=size, graph=False)}

    decode_name = (f"nvJPEG decode, {views // 2} images (the hardware JPEG engines' work is not in the kernel time)"
                   if device.type == "cuda" else f"decode (PIL), {views // 2} images")
    parts: dict[str, tuple[float | None, float, float | None]] = {
        decode_name: gpu_and_wall_ms(lambda: decoder.decode(samples), device, args.rounds)}
    for label, m, fused in AUGMENTATIONS:
        parts[f"apply_batch, {label}"] = gpu_and_wall_ms(
            lambda m=m, fused=fused: apply_batch(per_view, rows[m], Recipe(jitter_mode=m), size, device,
                                                 fused_augment=fused), device, args.rounds)
    for name, forward in forwards.items():
        if forward.mode == ("cuda graph" if name == "CUDA graph" else "eager"):
            parts[f"forward, {name}"] = gpu_and_wall_ms(lambda f=forward: f(x), device, args.rounds)

    gpu_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"machine: {machine()}, {gpu_name}; one batch of {views} views at {size} px ({views // 2} JPEGs, V = 2), "
          f"after 2 warm-up calls: wall times the median of {args.rounds} calls, GPU times the mean of {args.rounds} calls "
          "under one profiler session\n")
    print("| part | GPU kernels and copies, ms | GPU events per call | wall, ms (GPU synchronised) |\n|---|---|---|---|")
    for name, (gpu, wall, events) in parts.items():
        print(f"| {name} | {'-' if gpu is None else f'{gpu:.2f}'} | {'-' if events is None else f'{events:.0f}'} "
              f"| {wall:.2f} |")
    if device.type == "cuda":
        from seed import augment_kernels

        why = augment_kernels.unavailable()
        print("\naugmentation kernels: " + ("ran" if why is None else f"did NOT run ({why}): the fused rows are the tensor path"))
    decode = parts[decode_name]
    print(f"\ndecode: {views // 2 / decode[1] * 1e3:.0f} images/s by the wall clock")
    pick = 0 if device.type == "cuda" else 1                                  # GPU time, or wall on the CPU
    print(f"\nceiling of the stage / pure forward when the parts run one after another on the "
          f"{'GPU (kernel time)' if pick == 0 else 'CPU (wall time: the script tested, not a budget)'}:\n")
    print("| forward | augmentation | decode + augmentation, ms | forward, ms | ceiling |\n|---|---|---|---|---|")
    for name in forwards:
        if f"forward, {name}" not in parts:
            continue
        fwd = parts[f"forward, {name}"][pick] or 0.0
        for label, _, _ in AUGMENTATIONS:
            rest = (decode[pick] or 0.0) + (parts[f"apply_batch, {label}"][pick] or 0.0)
            print(f"| {name} | {label} | {rest:.2f} | {fwd:.2f} | {fwd / (fwd + rest):.2f} |")


if __name__ == "__main__":
    main()
