"""Student step time: cached SEED against online SEED and a bare student step, same student, batch, threads.

    python bench/student_step.py [--scratch DIR] [--student mobilenetv3_small_050] [--steps 10]

Compute only (in-memory batches): the bare step (forward + backward + SGD, a loss that needs no
teacher), the cached SEED step (plus the sparse SEED loss over the cached bank), the online SEED
step (plus the teacher forward). Then the whole training loop (shards, decoding, replayed
augmentation, cache look-ups) for cached SEED and for the bare objective on the same data path.
Prints the implied teacher-compute saving for M students x E epochs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import machine, shards, storage, teacher_checkpoint  # noqa: E402
from pipeline import bank as bank_stage  # noqa: E402
from pipeline import student as student_stage  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed.config import load_config  # noqa: E402
from seed.loss import seed_loss, seed_loss_sparse  # noqa: E402
from seed.models import mlp_encoder  # noqa: E402
from seed.objectives import CachedSeed, ObjectiveFactory  # noqa: E402
from seed.teachers import load_teacher  # noqa: E402


def timed(fn, steps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1000


class Bare(CachedSeed):
    """The same loop and data path as cached SEED, with a loss that uses nothing from the cache."""

    def prepare(self, batch, device):
        return {}

    def loss(self, model, x, ctx, labels):
        return F.normalize(model(x).float(), dim=1).sum(dim=1).mean()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    root = Path(args.scratch or tempfile.mkdtemp(prefix="seed-bench-"))
    B, K = args.batch, 4096
    print(f"machine: {machine()}; student {args.student}, batch {B}, bank K={K}, 32 px")

    data = shards(root, 8000)
    cfg = load_config(None, [f"data.train={data.name}/train/train-*.tar", f"teacher.checkpoint={teacher_checkpoint(root, 'resnet10t')}",
                             "cache.views=2", "cache.name=step-bench", f"bank.size={K}", "bank.topk=32",
                             f"train.students=[{{arch: {args.student}}}]", f"train.optim.batch_size={B}", "train.optim.epochs=1",
                             "train.run=step-bench"])
    teacher_stage.run(cfg, storage(root), progress=False)
    bank_stage.run(cfg, storage(root), progress=False)

    torch.manual_seed(0)
    student = mlp_encoder(args.student, 128)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    teacher, _ = load_teacher(cfg.teacher)
    x = torch.rand(B, 3, 32, 32)
    bank = F.normalize(torch.randn(K, 128), dim=1)
    z_t = F.normalize(torch.randn(B, 128), dim=1)
    cols = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.randint(1, K + 1, (B, 31))], dim=1)
    logp = torch.full((B, 32), -12.0)
    logp[:, 0] = -1e-3

    def step(loss_fn) -> None:
        z = F.normalize(student(x), dim=1)
        loss = loss_fn(z)
        opt.zero_grad()
        loss.backward()
        opt.step()

    bare = timed(lambda: step(lambda z: z.sum(dim=1).mean()), args.steps)
    cached = timed(lambda: step(lambda z: seed_loss_sparse(z, z_t, bank, cols, logp, 0.2)), args.steps)

    def online_step() -> None:
        with torch.no_grad():
            zt = F.normalize(teacher(x), dim=1)
        step(lambda z: seed_loss(z, zt, bank, 0.2, 1e-4))

    online = timed(online_step, args.steps)
    print("\ncompute only (in-memory batch):\n")
    print("| step | ms | x bare |")
    print("|---|---|---|")
    for name, ms in (("bare student step", bare), ("cached SEED step", cached), ("online SEED step (teacher resnet10t)", online)):
        print(f"| {name} | {ms:.0f} | {ms / bare:.2f} |")

    def loop_ms(objective: ObjectiveFactory) -> float:
        m = student_stage.run(cfg, storage(root), progress=False, objective=objective).metrics[-1]
        return m["seconds"] / m["steps"] * 1000

    loop_bare = loop_ms(Bare)
    loop_cached = loop_ms(CachedSeed)
    print("\nwhole loop (8,000 real images: shards, decode, replayed views, cache look-ups, prefetch thread):\n")
    print("| loop | ms per step | x bare loop |")
    print("|---|---|---|")
    print(f"| bare objective, same data path | {loop_bare:.0f} | 1.00 |")
    print(f"| cached SEED | {loop_cached:.0f} | {loop_cached / loop_bare:.2f} |")
    N, V = 1_281_167, 4
    print(f"\nteacher forwards for M students x E epochs on N={N:,} images: online M x E x N, cached V x N (V={V}):")
    for M, E in ((1, 200), (3, 200), (5, 100)):
        print(f"  M={M}, E={E}: online {M * E * N:.3g}, cached {V * N:.3g} -> {M * E / V:.0f}x fewer")
    print(f"  per step here: online SEED costs {online / cached:.2f}x a cached SEED step (teacher forward removed)")


if __name__ == "__main__":
    main()
