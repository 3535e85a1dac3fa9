"""The same student epoch, again and again in one process: how much do wall and CPU time move between runs?

    python bench/epoch_spread.py [--config data/runs/demo/config.yaml] [--runs 4]

Runs ``pipeline.student.run`` for one epoch ``--runs`` times (the demo's cache, bank and student by default:
run ``make demo`` first), in this process, without Prefect, and prints each run's epoch seconds and the CPU
seconds this process spent (``time.process_time``, all its threads), with a fixed single-thread matmul timed
before each run as a yardstick of the cores' speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import student  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.storage import load_storage  # noqa: E402


def yardstick() -> float:
    """Seconds for 20 products of two 1024 x 1024 float32 matrices on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.set_num_threads(threads)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "data" / "runs" / "demo" / "config.yaml"))
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(args.config, ["train.optim.epochs=1", "train.run=epoch-spread"])
    storage = load_storage(None)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
          "| run | matmul yardstick, s | epoch, s | CPU of this process, s | CPU / epoch |\n|---|---|---|---|---|", flush=True)
    for r in range(args.runs):
        stick = yardstick()
        cpu = time.process_time()
        m = student.run(cfg, storage, progress=False).metrics[-1]
        cpu = time.process_time() - cpu
        print(f"| {r + 1} | {stick:.2f} | {m['seconds']:.2f} | {cpu:.1f} | {cpu / m['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
