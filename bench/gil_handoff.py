"""Does a torch call give the interpreter lock back, and how long does it wait to take it again?

    python bench/gil_handoff.py [--calls 150] [--intervals 0.005 0.001 0.0002]

torchvision's ``decode_jpeg`` (a ``torch.ops`` call, as every call of the data path is) on one real-size
JPEG (560 x 480, quality 90), on one thread:
  1. alone;
  2. on two threads at once: near 2x when the call releases the lock while it runs;
  3. beside a thread that runs pure Python: each call, once done, waits for the lock that thread holds,
     up to the interpreter's switch interval (``sys.setswitchinterval``), once per given interval.

On a GPU the stage's data thread makes a few hundred such calls per batch, each giving the lock back and
taking it again; this measures what one handover costs when another thread wants the lock.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time

import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_jpeg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--intervals", type=float, nargs="+", default=[0.005, 0.001, 0.0002])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pixels = (np.random.default_rng(0).random((480, 560, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    def work() -> None:
        for _ in range(args.calls):
            decode_jpeg(data)

    def timed(fn: object) -> float:
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        return time.perf_counter() - t

    work()  # warm-up
    alone = timed(work)
    print(f"{threading.active_count()} thread, torch {torch.__version__}; decode_jpeg alone: {args.calls / alone:.0f} calls/s")
    pair = [threading.Thread(target=work) for _ in range(2)]
    both = timed(lambda: ([t.start() for t in pair], [t.join() for t in pair]))
    print(f"two threads at once: {2 * args.calls / both:.0f} calls/s together ({alone * 2 / both:.2f}x one)")
    default = sys.getswitchinterval()
    print("\n| beside a pure-Python thread, switch interval | calls/s | / alone |\n|---|---|---|")
    for interval in args.intervals:
        stop = threading.Event()

        def spin() -> None:
            n = 0
            while not stop.is_set():
                n += 1

        sys.setswitchinterval(interval)
        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            beside = timed(work)
        finally:
            stop.set()
            spinner.join()
            sys.setswitchinterval(default)
        print(f"| {interval * 1e3:g} ms | {args.calls / beside:.0f} | {alone / beside:.2f} |")


if __name__ == "__main__":
    main()
