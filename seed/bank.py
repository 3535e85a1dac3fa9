"""The instance bank and the teacher's similarity distribution over it, stored sparsely.

SEED (Fang et al., ICLR 2021, ``seed/builder.py``) scores a teacher embedding z_T against
D+ = [z_T ; bank] and takes p_T = softmax(z_T . D+ / tau_T). Offline, the bank is K cached views
of K distinct images, and an image's own bank entry is excluded from its
row set. For every cached (row, view) we keep the top-k of p_T as column indices into D+
(0 = the view's own embedding, j >= 1 = bank entry j - 1), their log-probabilities under the
*full* distribution, and the probability mass they capture.

The top-k come from a FAISS index over the bank (exact ``flat``; ``ivf`` or ``hnsw`` for large
banks) or from an exact torch matmul + top-k (``torch``, the GPU path). The normaliser log Z is
exact for ``flat``/``torch`` (one streamed matmul) and, for the approximate indices, estimated
as top-k + (K' / M) x a uniform sample of M tail entries, which is unbiased and costs O(k + M)
per view instead of O(K).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from seed.errors import SeedError
from seed.loss import dplus_logits, own_mask


def sample_bank(valid_rows: np.ndarray, views: int, size: int, seed: int) -> np.ndarray:
    """K distinct rows (sorted) with one seeded view each: int64 ``[K, 2]`` of (row, view)."""
    if size > len(valid_rows):
        raise SeedError(f"bank.size={size} is larger than the {len(valid_rows)} valid images in the cache; "
                        f"choose bank.size <= {len(valid_rows)}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(valid_rows, size=size, replace=False))
    return np.stack([rows, rng.integers(0, views, size=size)], axis=1).astype(np.int64)


class BankIndex:
    """Top-k inner-product search over the bank vectors (unit vectors: cosine similarity).

    ``kind``: ``flat`` (FAISS exact), ``ivf`` / ``hnsw`` (FAISS approximate), ``torch`` (exact
    matmul + top-k on ``device``). FAISS runs on the GPU when faiss-gpu is installed and a GPU is
    present; otherwise on CPU.
    """

    def __init__(self, vectors: np.ndarray, kind: str, *, device: torch.device | None = None, ivf_lists: int = 0,
                 nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0,
                 serialized: np.ndarray | None = None):
        self.kind = kind
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)        # K x D
        self.device = device or torch.device("cpu")
        self.on_gpu = False
        if kind == "torch":
            self.bank_t = torch.from_numpy(self.vectors).to(self.device)
            return
        import faiss  # only the bank stage needs FAISS

        K, D = self.vectors.shape
        index: Any
        if serialized is not None:
            index = faiss.deserialize_index(np.asarray(serialized, dtype=np.uint8))
        elif kind == "flat":
            index = faiss.IndexFlatIP(D)
        elif kind == "ivf":
            nlist = ivf_lists or max(1, int(4 * math.sqrt(K)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(self.vectors)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(D, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * hnsw_m)
        else:
            raise SeedError(f"bank.index: unknown index type {kind!r}")
        if serialized is None:
            index.add(self.vectors)
        if kind == "ivf":
            index.nprobe = nprobe
        if kind == "hnsw":
            index.hnsw.efSearch = ef_search
        self.cpu_index = index
        self.index = index
        if self.device.type == "cuda" and kind in ("flat", "ivf") and hasattr(faiss, "StandardGpuResources") \
                and faiss.get_num_gpus() > 0:
            self.gpu_res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.gpu_res, self.device.index or 0, index)
            self.on_gpu = True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and bank positions of the top ``k``, best first: float32 and int64 ``[B, k]`` (-1 = none)."""
        k = min(k, len(self.vectors))
        if self.kind == "torch":
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
            top = torch.topk(q @ self.bank_t.T, k, dim=1)                     # B x k
            return top.values.cpu().numpy(), top.indices.cpu().numpy()
        if self.on_gpu and k > 2048:
            raise SeedError(f"bank.topk={k}: FAISS GPU search is limited to k <= 2048; use bank.index=torch")
        sims, pos = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, pos

    def serialize(self) -> np.ndarray | None:
        if self.kind == "torch":
            return None
        import faiss

        return faiss.serialize_index(self.cpu_index)


def dense_log_probs(z: torch.Tensor, q_rows: torch.Tensor, bank: torch.Tensor, bank_rows: torch.Tensor,
                    tau: float) -> torch.Tensor:
    """Exact log p_T over D+ = [z ; bank] with own-image bank entries at -inf: ``[B, 1 + K]``.

    The reference the sparse targets are measured against (and the loss's dense teacher side).
    """
    logits = dplus_logits(z, z, bank, own_mask(q_rows, bank_rows)) / tau      # B x (1 + K)
    return torch.log_softmax(logits, dim=1)


def sparse_targets(z: np.ndarray, q_rows: np.ndarray, index: BankIndex, bank_rows: np.ndarray, *, topk: int,
                   tau: float, exact_normaliser: bool, tail_samples: int = 1024,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of p_T for a batch of cached views ``z [B, D]`` (float32, unit norm) of rows ``q_rows``.

    Returns column indices into D+ (int32 ``[B, topk]``, -1 = none), their log-probabilities
    (float32, -inf = none) and the captured mass (float32 ``[B]``).
    """
    B = len(z)
    sims, pos = index.search(z, topk)                                         # B x topk: one spare for the own entry
    pos_t = torch.from_numpy(pos.astype(np.int64))
    sims_t = torch.from_numpy(sims.astype(np.float32))
    rows_t = torch.from_numpy(q_rows.astype(np.int64))
    bank_rows_t = torch.from_numpy(bank_rows.astype(np.int64))
    hit_rows = bank_rows_t[pos_t.clamp(min=0)]
    drop = (pos_t < 0) | (hit_rows == rows_t[:, None])                        # B x topk: empty or the own image
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    own = (zt * zt).sum(dim=1, keepdim=True)                                  # B x 1
    logits = torch.cat([own, sims_t.masked_fill(drop, float("-inf"))], dim=1) / tau   # B x (1 + topk)
    cols = torch.cat([torch.zeros(B, 1, dtype=torch.int64), pos_t + 1], dim=1)       # D+ columns
    order = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :topk]     # own first, then best bank
    logits, cols = logits.gather(1, order), cols.gather(1, order)             # B x topk

    if exact_normaliser:
        bank_t = torch.from_numpy(index.vectors)
        log_z = torch.logsumexp(dplus_logits(zt, zt, bank_t, own_mask(rows_t, bank_rows_t)) / tau, dim=1)  # B
    else:
        log_z = _sampled_log_normaliser(zt, rows_t, logits, cols, index, bank_rows_t, tau, tail_samples,
                                        rng or np.random.default_rng(0))
    logp = logits - log_z[:, None]
    valid = torch.isfinite(logits)
    mass = torch.where(valid, logp.exp(), 0.0).sum(dim=1).clamp(max=1.0)
    cols = torch.where(valid, cols, -1)
    return cols.to(torch.int32).numpy(), logp.numpy().astype(np.float32), mass.numpy().astype(np.float32)


def _sampled_log_normaliser(z: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor, cols: torch.Tensor,
                            index: BankIndex, bank_rows: torch.Tensor, tau: float, m: int,
                            rng: np.random.Generator) -> torch.Tensor:
    """log Z = logsumexp(top-k) (+) log((K' - k') / m' * sum of a uniform tail sample)."""
    K = len(bank_rows)
    m = min(m, K)
    sample = torch.from_numpy(np.sort(rng.choice(K, size=m, replace=False)))  # m
    s = (z @ torch.from_numpy(index.vectors)[sample].T) / tau                 # B x m
    in_topk = (cols[:, :, None] - 1 == sample[None, None, :]).any(dim=1)      # B x m
    own = own_mask(rows, bank_rows[sample])                                   # B x m
    tail = s.masked_fill(in_topk | own, float("-inf"))
    n_tail_sample = (~(in_topk | own)).sum(dim=1).clamp(min=1)                # B
    n_topk_bank = torch.isfinite(logits).sum(dim=1) - 1                       # B (bank entries kept; own is finite)
    n_own = own_mask(rows, bank_rows).sum(dim=1)                             # B (0 or 1)
    n_tail = (K - n_topk_bank - n_own).clamp(min=0)                           # B
    log_tail = torch.logsumexp(tail, dim=1) + torch.log(n_tail.float() / n_tail_sample.float())
    log_tail = torch.where(n_tail > 0, log_tail, torch.full_like(log_tail, float("-inf")))
    return torch.logaddexp(torch.logsumexp(logits, dim=1), log_tail)


def sparse_to_dense(cols: np.ndarray, logp: np.ndarray, mass: np.ndarray, width: int,
                    excluded: np.ndarray | None = None) -> np.ndarray:
    """A sparse target as a dense distribution ``[B, width]``: the top-k probabilities, and the
    uncaptured mass spread evenly over the other allowed columns (what the loss assumes)."""
    B = len(cols)
    p = np.zeros((B, width), dtype=np.float64)
    allowed = np.ones((B, width), dtype=bool) if excluded is None else ~excluded
    for b in range(B):
        keep = cols[b] >= 0
        p[b, cols[b][keep]] = np.exp(logp[b][keep].astype(np.float64))
        rest = allowed[b].copy()
        rest[cols[b][keep]] = False
        if rest.any():
            p[b, rest] = max(0.0, 1.0 - p[b].sum()) / rest.sum()
    return p


def kl_dense_sparse(dense_logp: np.ndarray, sparse_p: np.ndarray) -> np.ndarray:
    """KL(dense || sparse) per row, in nats (0 log 0 = 0); not clamped, so a target that is not a
    distribution shows as a negative value instead of hiding behind 0."""
    p = np.exp(dense_logp.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (dense_logp - np.log(np.maximum(sparse_p, 1e-300))), 0.0)
    return terms.sum(axis=1)


def stats(x: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {}
    q = np.percentile(x, [1, 50])
    return {"mean": float(x.mean()), "min": float(x.min()), "p1": float(q[0]), "p50": float(q[1]), "max": float(x.max())}
