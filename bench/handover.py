"""What the main process pays to receive encoded batches from a DataLoader worker: bytes pickled through
the pipe against the image bytes packed into one shared-memory tensor (``seed.workers.PackedSamples``).

    python bench/handover.py [--batches 40] [--images 128] [--bytes 110000] [--rounds 2]

On CUDA the teacher stage's workers send batches of views whose images are still encoded
(``pipeline.teacher._Encoded``: 256 views = 128 images at V = 2), and training's composing worker sends
batches of examples (``seed.data._Composed``); the main process receives them in the thread that then
decodes and augments on the GPU. ImageNet JPEGs average about 110 KB. The payload here is random bytes of
that size; the receiving thread reads a byte of every 4 KB page of each image, as the decoder will (so
pages of shared memory are faulted in on this side too). Prints the receiving thread's CPU time per
batch (``time.thread_time``) and the wall time per batch, the layouts alternating, for the teacher's
batches.
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

from bench.common import machine  # noqa: E402
from pipeline.teacher import _Encoded  # noqa: E402
from seed.shards import Sample  # noqa: E402


class Pickled:
    """The same views, pickled as they are (each image's bytes through the pipe): the handover before packing."""

    def __init__(self, shard: int, views: list) -> None:
        self.shard, self.views = shard, views


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, packed: bool, batches: int, images: int, size: int) -> None:
        self.packed, self.batches, self.images, self.size = packed, batches, images, size

    def __iter__(self):
        rng = np.random.default_rng(0)
        for b in range(self.batches + 1):  # the first is the warm-up
            samples = [Sample(f"img-{b}-{i}", rng.integers(0, 256, self.size, dtype=np.uint8).tobytes(), "jpg", 0,
                              "shard-0.tar", i) for i in range(self.images)]
            views = [((s, (375, 500)), np.zeros(13, np.float32), s.index, v) for s in samples for v in range(2)]
            yield _Encoded(0, views) if self.packed else Pickled(0, views)


def receive(packed: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(receiving thread's CPU ms per batch, wall ms per batch), after the first batch."""
    loader = torch.utils.data.DataLoader(Batches(packed, args.batches, args.images, args.bytes), batch_size=None,
                                         num_workers=1, prefetch_factor=2)
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
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {"bytes pickled through the pipe": [], "one shared-memory tensor": []}
    for _ in range(args.rounds):
        rows["bytes pickled through the pipe"].append(receive(False, args))
        rows["one shared-memory tensor"].append(receive(True, args))
    print(f"machine: {machine()}; {args.batches} batches of {args.images} images x {args.bytes:,} B (V = 2), "
          f"1 worker, median of {args.rounds} rounds\n")
    print("| handover | receiving thread CPU, ms per batch | wall, ms per batch |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(v[0] for v in values):.2f} | {statistics.median(v[1] for v in values):.2f} |")


if __name__ == "__main__":
    main()
