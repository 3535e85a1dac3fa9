"""Which tail rule makes the sparse SEED loss closest to the dense one: measured on a real teacher cache.

    python bench/sparse_tail.py --cache data/caches/demo-fashion-mnist.zarr [--k 4096] [--topk 64]

From the cache's teacher embeddings: a bank of K views of distinct images, B query views, and for each
tau_T the teacher's exact top-k targets (as the bank stage stores them, exact normaliser). For each
tail rule (``seed.loss.Tail``) it prints the captured mass, the loss's relative error against the dense
loss and the relative error of the gradient with respect to the student embeddings,
||g_sparse - g_dense|| / ||g_dense||, for two students: "trained" (the teacher's embedding of another
view of the same image: a student that has learned) and "untrained" (random unit vectors). Writes the
rows as JSON and a PNG beside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seed import cache  # noqa: E402
from seed.loss import seed_loss, seed_loss_sparse, teacher_probs  # noqa: E402

TAILS = ("uniform", "lumped", "renorm")


def measure(emb: np.ndarray, valid: np.ndarray, *, k: int, topk: int, batch: int, taus: list[float],
            tau_s: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(valid)
    picked = rng.choice(rows, size=k + batch, replace=False)
    bank_rows, query_rows = picked[:k], picked[k:]
    V = emb.shape[1]
    bank = F.normalize(torch.from_numpy(emb[bank_rows, rng.integers(0, V, size=k)].astype(np.float32)), dim=1)
    z_t = F.normalize(torch.from_numpy(emb[query_rows, 0].astype(np.float32)), dim=1)
    students = {"trained": F.normalize(torch.from_numpy(emb[query_rows, 1 % V].astype(np.float32)), dim=1),
                "untrained": F.normalize(torch.randn(batch, z_t.shape[1], generator=torch.Generator().manual_seed(seed)), dim=1)}
    out = []
    for tau in taus:
        p_t = teacher_probs(z_t, bank, tau)                                     # B x (1 + K), exact
        top_p, cols = p_t.topk(topk, dim=1)
        logp = top_p.clamp(min=1e-45).log()
        mass = top_p.sum(dim=1)
        for name, z in students.items():
            zd = z.clone().requires_grad_(True)
            dense = seed_loss(zd, z_t, bank, tau_s, tau)
            dense.backward()
            for tail in TAILS:
                zs = z.clone().requires_grad_(True)
                sparse = seed_loss_sparse(zs, z_t, bank, cols, logp, tau_s, tail=tail)  # type: ignore[arg-type]
                sparse.backward()
                assert zd.grad is not None and zs.grad is not None
                out.append({"tau_t": tau, "student": name, "tail": tail, "mass_mean": round(float(mass.mean()), 4),
                            "mass_min": round(float(mass.min()), 4),
                            "loss_rel_err": float(abs(sparse.item() - dense.item()) / abs(dense.item())),
                            "grad_rel_err": float((zs.grad - zd.grad).norm() / zd.grad.norm()),
                            "grad_cos": float(F.cosine_similarity(zs.grad.flatten(), zd.grad.flatten(), dim=0))})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, student in zip(axes, ("trained", "untrained")):
        for tail in TAILS:
            pts = [(r["tau_t"], r["grad_rel_err"]) for r in rows if r["student"] == student and r["tail"] == tail]
            ax.plot(*zip(*pts), marker="o", label=tail)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("tau_T")
        ax.set_title(f"{student} student")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient relative error vs dense")
    axes[0].legend()
    fig.suptitle(f"sparse SEED loss, top-{rows[0].get('topk')} of K = {rows[0].get('k')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="a complete teacher cache (path or URL)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--tau-s", type=float, default=0.2)
    ap.add_argument("--taus", default="1e-4,0.01,0.05,0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/sparse-tail.json")
    args = ap.parse_args()
    group = cache.open_complete(args.cache)
    rows = measure(cache.read(group, "embeddings"), cache.read(group, "valid"), k=args.k, topk=args.topk,
                   batch=args.batch, taus=[float(t) for t in args.taus.split(",")], tau_s=args.tau_s, seed=args.seed)
    for r in rows:
        r |= {"k": args.k, "topk": args.topk, "cache": args.cache.rstrip("/").rsplit("/", 1)[-1]}
    print(f"{'tau_T':>7} {'student':>9} {'tail':>8} {'mass':>7} {'loss err':>9} {'grad err':>9} {'grad cos':>9}")
    for r in rows:
        print(f"{r['tau_t']:>7g} {r['student']:>9} {r['tail']:>8} {r['mass_mean']:>7.4f} {r['loss_rel_err']:>9.2e} "
              f"{r['grad_rel_err']:>9.2e} {r['grad_cos']:>9.5f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
