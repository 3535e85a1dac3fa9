"""What the main process pays to receive encoded batches from a DataLoader worker: bytes pickled through
the pipe, the image bytes packed into one new shared-memory tensor per batch (``seed.workers.PackedSamples``),
and packed into the worker's reused shared buffers (``seed.workers.SharedSlots``); then the float batches of
the CPU layouts, made in fresh memory against written into the worker's reused buffers.

    python bench/handover.py [--batches 40] [--images 128] [--bytes 110000] [--views 256] [--rounds 2]

On CUDA the teacher stage's workers send batches of views whose images are still encoded
(``pipeline.teacher._Encoded``: 256 views = 128 images at V = 2), and training's composing worker sends
batches of examples (``seed.data._Composed``); the main process receives them in the thread that then
decodes and augments on the GPU. ImageNet JPEGs average about 110 KB. The payload here is random bytes of
that size; the receiving thread reads a byte of every 4 KB page of each image, as the decoder will (so
pages of shared memory are faulted in on this side too). Prints the receiving thread's CPU time per
batch (``time.thread_time``) and the wall time per batch, the layouts alternating, for the teacher's
batches. On the CPU the workers send float views instead (``--views`` of 3 x 224 x 224: the teacher
stage's, training's and the evaluation's batches); the worker fills each batch, as augmentation writes
it, and this process reads a value of every 4 KB page, as the forward will.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine  # noqa: E402
from pipeline.teacher import _Encoded  # noqa: E402
from seed.shards import Sample  # noqa: E402
from seed.workers import SharedSlots  # noqa: E402


class Pickled:
    """The same views, pickled as they are (each image's bytes through the pipe): the handover before packing."""

    def __init__(self, shard: int, views: list) -> None:
        self.shard, self.views = shard, views


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, layout: str, batches: int, images: int, size: int, slots: SharedSlots | None) -> None:
        self.layout, self.batches, self.images, self.size, self.slots = layout, batches, images, size, slots

    def __iter__(self):
        rng = np.random.default_rng(0)
        for b in range(self.batches + 1):  # the first is the warm-up
            samples = [Sample(f"img-{b}-{i}", rng.integers(0, 256, self.size, dtype=np.uint8).tobytes(), "jpg", 0,
                              "shard-0.tar", i) for i in range(self.images)]
            views = [((s, (375, 500)), np.zeros(13, np.float32), s.index, v) for s in samples for v in range(2)]
            yield Pickled(0, views) if self.layout == PIPE else _Encoded(0, views, self.slots)


@dataclasses.dataclass
class Floats:
    x: torch.Tensor


class FloatBatches(torch.utils.data.IterableDataset):
    def __init__(self, batches: int, views: int, slots: SharedSlots | None) -> None:
        self.batches, self.views, self.slots = batches, views, slots

    def __iter__(self):
        for b in range(self.batches + 1):
            shape = (self.views, 3, 224, 224)
            x = torch.empty(shape) if self.slots is None else self.slots.empty(*shape)
            x.fill_(b)
            yield Floats(x) if self.slots is None else self.slots.send(Floats(x))


def receive_floats(reused: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(receiving thread's CPU ms per batch, wall ms per batch), after the first batch."""
    slots = SharedSlots.for_workers(1, 2) if reused else None
    loader = torch.utils.data.DataLoader(FloatBatches(args.batches, args.views, slots), batch_size=None, num_workers=1,
                                         prefetch_factor=2)
    it = iter(loader)
    next(it)
    cpu, wall = time.thread_time(), time.perf_counter()
    n = 0
    for batch in it:
        n += 1
        assert float(batch.x.view(-1)[::1024].mean()) == n  # a value of every 4 KB page
    return (time.thread_time() - cpu) / n * 1e3, (time.perf_counter() - wall) / n * 1e3


PIPE, TENSOR, SLOTS = ("bytes pickled through the pipe", "one new shared-memory tensor per batch",
                       "the worker's reused shared buffers")


def receive(layout: str, args: argparse.Namespace) -> tuple[float, float]:
    """(receiving thread's CPU ms per batch, wall ms per batch), after the first batch."""
    slots = SharedSlots.for_workers(1, 2) if layout == SLOTS else None
    loader = torch.utils.data.DataLoader(Batches(layout, args.batches, args.images, args.bytes, slots),
                                         batch_size=None, num_workers=1, prefetch_factor=2)
    it = iter(loader)
    first = next(it)
    assert len(first.views) == 2 * args.images
    cpu, wall = time.thread_time(), time.perf_counter()
    n = 0
    for batch in it:  # read a byte of every page, as the decoder will: shared memory faults its pages in here
        n += 1
        for (sample, _), *_ in batch.views[::2]:
            np.frombuffer(sample.image, dtype=np.uint8)[::4096].sum()
    return (time.thread_time() - cpu) / n * 1e3, (time.perf_counter() - wall) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--bytes", type=int, default=110_000)
    parser.add_argument("--views", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {PIPE: [], TENSOR: [], SLOTS: []}
    floats: dict[str, list[tuple[float, float]]] = {"made in fresh memory (torch's way)": [],
                                                    "written into the worker's reused shared buffers": []}
    for _ in range(args.rounds):
        for layout, values in rows.items():
            values.append(receive(layout, args))
        for reused, values in enumerate(floats.values()):
            values.append(receive_floats(bool(reused), args))
    print(f"machine: {machine()}; 1 worker, median of {args.rounds} rounds, {args.batches} batches after the first\n")
    table(f"encoded batches, {args.images} images x {args.bytes:,} B (V = 2)", rows)
    table(f"float batches, {args.views} x 3 x 224 x 224", floats)


def table(what: str, rows: dict[str, list[tuple[float, float]]]) -> None:
    print(f"| {what} | receiving thread CPU, ms per batch | wall, ms per batch |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(v[0] for v in values):.2f} | {statistics.median(v[1] for v in values):.2f} |")
    print()


if __name__ == "__main__":
    main()
