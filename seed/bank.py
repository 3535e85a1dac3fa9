"""The instance bank and the teacher's similarity distribution over it, stored sparsely.

SEED (Fang et al., ICLR 2021, ``seed/builder.py``) scores a teacher embedding z_T against
D+ = [z_T ; bank] and takes p_T = softmax(z_T . D+ / tau_T). Offline, the bank is K cached views
of K distinct images, and an image's own bank entry is excluded from its
row set. For every cached (row, view) we keep the top-k of p_T as column indices into D+
(0 = the view's own embedding, j >= 1 = bank entry j - 1), their log-probabilities under the
*full* distribution, and the probability mass they capture.

The top-k come from a FAISS index over the bank (exact ``flat``; ``ivf`` or ``hnsw`` for large
banks) or from an exact torch matmul + top-k (``torch``, the GPU path). The normaliser log Z is
exact for ``flat``/``torch`` (a matmul over the whole bank) and, for the approximate indices,
estimated as top-k + (K' / M) x a uniform sample of M tail entries, which is unbiased and costs
O(k + M) per view instead of O(K).

Everything after the FAISS search runs in fp32 on ``BankIndex.device`` (with ``torch``, the search
too, fused with the exact normaliser: one matmul per chunk gives both), over row chunks whose
``[rows, K]`` logits stay within ``max_logits_bytes``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from seed.devices import ieee_float32
from seed.errors import SeedError
from seed.loss import dplus_logits, own_mask


def sample_bank(valid_rows: np.ndarray, views: int, size: int, seed: int) -> np.ndarray:
    """K distinct rows (sorted) with one seeded view each: int64 ``[K, 2]`` of (row, view)."""
    return sample_banks(valid_rows, views, size, seed, 1)[0]


def sample_banks(valid_rows: np.ndarray, views: int, size: int, seed: int, rotations: int) -> list[np.ndarray]:
    """``rotations`` disjoint banks of K distinct rows (each sorted) with one seeded view each: int64 ``[K, 2]``
    arrays of (row, view). One rotation is exactly ``sample_bank``'s bank."""
    if size * rotations > len(valid_rows):
        what = f"bank.size={size}" if rotations == 1 else f"bank.size={size} x bank.rotations={rotations}"
        raise SeedError(f"{what} is larger than the {len(valid_rows)} valid images in the cache; "
                        f"choose bank.size x bank.rotations <= {len(valid_rows)}")
    if rotations < 1:
        raise SeedError(f"bank.rotations must be >= 1, got {rotations}")
    rng = np.random.default_rng(seed)
    rows = rng.choice(valid_rows, size=size * rotations, replace=False)
    if rotations == 1:  # as banks were always drawn: rows sorted, then their views
        rows = np.sort(rows)
        return [np.stack([rows, rng.integers(0, views, size=size)], axis=1).astype(np.int64)]
    picked = rng.integers(0, views, size=size * rotations)
    out = []
    for r in range(rotations):
        part = slice(r * size, (r + 1) * size)
        order = np.argsort(rows[part], kind="stable")
        out.append(np.stack([rows[part][order], picked[part][order]], axis=1).astype(np.int64))
    return out


def faiss_on_gpu(kind: str, device: torch.device) -> bool:
    """Whether a ``BankIndex`` of ``kind`` on ``device`` searches with FAISS on the GPU (flat and IVF indexes,
    on CUDA, with a FAISS built with GPU support)."""
    if device.type != "cuda" or kind not in ("flat", "ivf"):
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def searches_on_device(kind: str, device: torch.device, faiss_gpu: bool) -> bool:
    """Whether a ``BankIndex`` of ``kind`` finds its top-k by a product and ``torch.topk`` on ``device``: ``torch``
    always; ``flat`` (an exact search either way) on CUDA when FAISS cannot search there (no faiss-gpu), where
    FAISS would search on the CPU while the GPU waits (and, with the exact normaliser, computes the same product
    anyway)."""
    return kind == "torch" or (kind == "flat" and device.type == "cuda" and not faiss_gpu)


def ivf_list_count(K: int, ivf_lists: int = 0) -> int:
    """The IVF index's lists over a bank of ``K``: ``ivf_lists``, or 4 sqrt(K) when 0."""
    return ivf_lists or max(1, int(4 * math.sqrt(K)))


def ivf_shortfall(topk: int, K: int, ivf_lists: int, nprobe: int) -> str | None:
    """Why an IVF search of ``nprobe`` lists cannot return ``topk`` entries (it reads about nprobe x K / lists
    bank entries, and pads the rest of the top-k with -1), with the ``nprobe`` that would; None when it can."""
    lists = ivf_list_count(K, ivf_lists)
    read = min(K, nprobe * K / lists)
    if topk <= read:
        return None
    need = min(lists, math.ceil(2 * topk * lists / K))  # twice the top-k: lists are not all the same size
    return (f"bank.topk={topk} with bank.index=ivf reads about {int(read)} bank entries a view (bank.nprobe={nprobe} "
            f"of {lists} lists over K={K}): the rest of each top-k would be empty columns; set bank.nprobe={need} "
            "or more, or use bank.index=flat or torch")


def check_topk(topk: int, kind: str, device: torch.device) -> None:
    """Refuse a ``topk`` that FAISS's GPU search cannot return (at most 2048)."""
    if topk > 2048 and faiss_on_gpu(kind, device):
        raise SeedError(f"bank.topk={topk}: FAISS GPU search is limited to k <= 2048; use bank.index=torch")


LOGITS_BUDGET = 256 << 20  # bytes of one chunk's float32 logits: 1,023 rows of the 1 + K columns at K = 65,536
# A chunk's [rows, 1 + topk] arrays (similarities, positions, masks, logits, columns, their sort order and
# gathers: about ten, half of them int64) counted in float32 columns per top-k entry, so that a large top-k
# sizes the chunk when it outweighs the [rows, K] logits or the sampled normaliser's [rows, m] arrays
TOPK_COLUMNS = 20


def chunk_rows(width: int, max_logits_bytes: int = LOGITS_BUDGET) -> int:
    """Rows per chunk so that a ``[rows, width]`` float32 array fits in ``max_logits_bytes`` (at least 1)."""
    return max(1, max_logits_bytes // (4 * max(1, width)))


def targets_chunk_rows(K: int, topk: int, tail_samples: int, dense: bool, max_logits_bytes: int = LOGITS_BUDGET) -> int:
    """Rows per chunk of ``sparse_targets``: its widest arrays within ``max_logits_bytes``: the ``[rows, 1 + K]``
    logits (``dense``: the exact normaliser or the torch search), else the sampled normaliser's four
    ``[rows, tail_samples]`` arrays; or the top-k's own (``TOPK_COLUMNS x (1 + topk)``) when wider."""
    return chunk_rows(max(K + 1 if dense else 4 * min(tail_samples, K), TOPK_COLUMNS * (1 + topk)), max_logits_bytes)


def bank_logits(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``q @ bank.T`` in IEEE float32 whatever the autocast state or TF32 setting (bf16 would merge near-duplicates
    at tau_T = 1e-4; TF32 would move logits by about 10)."""
    with torch.autocast(q.device.type, enabled=False), ieee_float32():
        return q.float() @ bank.float().T


def topk_chunked(q: torch.Tensor, bank: torch.Tensor, k: int,
                 max_logits_bytes: int = LOGITS_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of ``q [B, D]`` against ``bank [K, D]``, best first, on their device:
    float32 similarities and int64 positions ``[B, k]``; at most ``max_logits_bytes`` of logits at a time."""
    step = chunk_rows(len(bank), max_logits_bytes)
    parts = [torch.topk(bank_logits(q[lo: lo + step], bank), k, dim=1) for lo in range(0, len(q), step)]
    if not parts:
        return torch.empty(0, k, device=q.device), torch.empty(0, k, dtype=torch.int64, device=q.device)
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


class BankIndex:
    """Top-k inner-product search over the bank vectors (unit vectors: cosine similarity).

    ``kind``: ``flat`` (FAISS exact), ``ivf`` / ``hnsw`` (FAISS approximate), ``torch`` (exact
    matmul + top-k on ``device``). FAISS runs on the GPU when faiss-gpu is installed and a GPU is
    present; otherwise on CPU, except ``flat`` on CUDA, whose exact top-k then comes from a product on
    the GPU as ``torch``'s does (``searches_on_device``; the FAISS index is still built and stored).
    ``bank_t`` holds the vectors on ``device`` for every kind: the targets' normaliser runs there.
    """

    def __init__(self, vectors: np.ndarray, kind: str, *, device: torch.device | None = None, ivf_lists: int = 0,
                 nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0,
                 serialized: np.ndarray | None = None):
        self.kind = kind
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)        # K x D
        self.device = device or torch.device("cpu")
        self.on_gpu = False
        self.on_device = kind == "torch"                                      # top-k by a product on ``device``
        self.bank_t = torch.from_numpy(self.vectors).to(self.device)          # shares memory on the CPU
        if kind == "torch":
            return
        import faiss  # only the bank stage needs FAISS

        K, D = self.vectors.shape
        index: Any
        if serialized is not None:
            index = faiss.deserialize_index(np.asarray(serialized, dtype=np.uint8))
        elif kind == "flat":
            index = faiss.IndexFlatIP(D)
        elif kind == "ivf":
            nlist = ivf_list_count(K, ivf_lists)
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
        if faiss_on_gpu(kind, self.device):
            self.gpu_res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.gpu_res, self.device.index or 0, index)
            self.on_gpu = True
        self.on_device = searches_on_device(kind, self.device, self.on_gpu)

    def search(self, queries: np.ndarray, k: int, *,
               max_logits_bytes: int = LOGITS_BUDGET) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and bank positions of the top ``k``, best first: float32 and int64 ``[B, k]`` (-1 = none).

        ``max_logits_bytes`` bounds the ``torch`` kind's ``[rows, K]`` logits (FAISS blocks its own search).
        """
        k = min(k, len(self.vectors))
        if self.on_device:
            with torch.no_grad():
                q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
                sims, pos = topk_chunked(q, self.bank_t, k, max_logits_bytes)
            return sims.cpu().numpy(), pos.cpu().numpy()
        if self.on_gpu:
            check_topk(k, self.kind, self.device)
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
                   rng: np.random.Generator | None = None,
                   max_logits_bytes: int = LOGITS_BUDGET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of p_T for a batch of cached views ``z [B, D]`` (float32, unit norm) of rows ``q_rows``.

    Returns column indices into D+ (int32 ``[B, topk]``, -1 = none), their log-probabilities
    (float32, -inf = none) and the captured mass (float32 ``[B]``), as numpy arrays on the CPU.

    Runs on ``index.device`` in float32 (autocast off): with ``index.on_device`` (``torch``, and ``flat``
    on CUDA without faiss-gpu) all of it, the search included; with FAISS all but the search. The batch is processed in chunks of rows
    whose ``[rows, K]`` float32 logits take at most ``max_logits_bytes`` (default ``LOGITS_BUDGET``,
    256 MiB: 1,023 rows at K = 65,536); a chunk's working memory is about 1.3x that (its logits
    and a boolean own-image mask). With the sampled normaliser and a FAISS index no ``[rows, K]``
    array is made: chunks are sized so that the four ``[rows, tail_samples]`` arrays it keeps fit
    instead. Where ``TOPK_COLUMNS x (1 + topk)`` is wider than either, the top-k's own arrays size the
    chunk. The FAISS search runs a chunk at a time too, so any batch size fits. Results do not depend
    on the chunking (up to the matmul's float rounding); the tail sample is drawn once per call from ``rng``.
    """
    B, K = len(z), len(index.vectors)
    dev = index.device
    dense = exact_normaliser or index.on_device                              # a [rows, K] matmul per chunk
    m = min(tail_samples, K)
    sample = None if exact_normaliser else \
        torch.from_numpy(np.sort((rng or np.random.default_rng(0)).choice(K, size=m, replace=False)))
    step = targets_chunk_rows(K, topk, m, dense, max_logits_bytes)
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(dev)
        rows_t = torch.from_numpy(np.asarray(q_rows, dtype=np.int64)).to(dev)
        bank_rows_t = torch.from_numpy(np.asarray(bank_rows, dtype=np.int64)).to(dev)
        sample_t = None if sample is None else sample.to(dev)
        sample_vecs = None if sample_t is None else index.bank_t[sample_t]   # m x D
        parts = []
        for lo in range(0, B, step):
            zc, rc = zt[lo: lo + step], rows_t[lo: lo + step]
            log_z = None
            if index.on_device:
                l_neg = bank_logits(zc, index.bank_t)                         # c x K: top-k and log Z from one matmul
                top = torch.topk(l_neg, min(topk, K), dim=1)
                sims, pos = top.values, top.indices
                if exact_normaliser:
                    log_z = _exact_log_normaliser(zc, rc, l_neg, bank_rows_t, tau)
                del l_neg
            else:
                found = index.search(z[lo: lo + step], topk)                  # [c, topk]: FAISS blocks its own work
                sims = torch.from_numpy(found[0].astype(np.float32)).to(dev)
                pos = torch.from_numpy(found[1].astype(np.int64)).to(dev)
                if exact_normaliser:
                    log_z = _exact_log_normaliser(zc, rc, bank_logits(zc, index.bank_t), bank_rows_t, tau)
            logits, cols = _ordered_columns(zc, rc, sims, pos, bank_rows_t, tau, topk)
            if log_z is None:
                assert sample_t is not None and sample_vecs is not None
                log_z = _sampled_log_normaliser(zc, rc, logits, cols, sample_vecs, bank_rows_t, tau, sample_t)
            logp = logits - log_z[:, None]
            valid = torch.isfinite(logits)
            mass = torch.where(valid, logp.exp(), 0.0).sum(dim=1).clamp(max=1.0)
            parts.append((torch.where(valid, cols, -1).to(torch.int32), logp, mass))
        if not parts:
            return (np.empty((0, topk), np.int32), np.empty((0, topk), np.float32), np.empty(0, np.float32))
        cols_o, logp_o, mass_o = (torch.cat(p).cpu().numpy() for p in zip(*parts))
    return cols_o, logp_o.astype(np.float32), mass_o.astype(np.float32)


def _ordered_columns(z: torch.Tensor, rows: torch.Tensor, sims: torch.Tensor, pos: torch.Tensor,
                     bank_rows: torch.Tensor, tau: float, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The own view (column 0) and the searched bank entries minus the own image's, best ``topk`` first:
    logits / tau (-inf = none) and D+ columns, ``[c, topk]``."""
    hit_rows = bank_rows[pos.clamp(min=0)]
    drop = (pos < 0) | (hit_rows == rows[:, None])                            # c x k: empty or the own image
    own = (z * z).sum(dim=1, keepdim=True)                                    # c x 1
    logits = torch.cat([own, sims.masked_fill(drop, float("-inf"))], dim=1) / tau   # c x (1 + k)
    cols = torch.cat([torch.zeros(len(z), 1, dtype=torch.int64, device=z.device), pos + 1], dim=1)
    order = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :topk]     # own first, then best bank
    return logits.gather(1, order), cols.gather(1, order)


def _exact_log_normaliser(z: torch.Tensor, rows: torch.Tensor, l_neg: torch.Tensor, bank_rows: torch.Tensor,
                          tau: float) -> torch.Tensor:
    """log Z over D+ from ``l_neg = z @ bank.T`` ``[c, K]``, which it overwrites: in place, so the chunk's
    logits are the only ``[c, K]`` float array."""
    l_pos = (z * z).sum(dim=1) / tau                                          # c
    l_neg.masked_fill_(own_mask(rows, bank_rows), float("-inf")).div_(tau)
    top = torch.maximum(l_pos, l_neg.amax(dim=1))                            # finite: l_pos is
    total = l_neg.sub_(top[:, None]).exp_().sum(dim=1) + torch.exp(l_pos - top)
    return top + torch.log(total)


def _sampled_log_normaliser(z: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor, cols: torch.Tensor,
                            sample_vecs: torch.Tensor, bank_rows: torch.Tensor, tau: float,
                            sample: torch.Tensor) -> torch.Tensor:
    """log Z = own logit (+) logsumexp(bank entries in the top-k) (+) log((K' - k') / m' * sum of a uniform
    tail sample).

    The own view's logit counts whether or not it made the top-k (near-duplicates in the bank can push
    it out of a small one); ``sample``: sorted distinct bank positions, the same for every chunk of a call;
    ``sample_vecs`` their vectors ``[m, D]``.
    """
    K, m = len(bank_rows), len(sample)
    s = bank_logits(z, sample_vecs) / tau                                     # c x m
    # the sample is sorted and distinct: searchsorted finds the one slot a kept bank column can match
    bank_pos = cols - 1                                                       # c x k (-1: the own view)
    slot = torch.searchsorted(sample, bank_pos.clamp(min=0)).clamp(max=m - 1)
    hit = (sample[slot] == bank_pos).to(torch.int32)
    in_topk = torch.zeros(len(z), m, dtype=torch.int32, device=z.device).scatter_add_(1, slot, hit) > 0   # c x m
    own = own_mask(rows, bank_rows[sample])                                   # c x m
    tail = s.masked_fill(in_topk | own, float("-inf"))
    n_tail_sample = (~(in_topk | own)).sum(dim=1).clamp(min=1)                # c
    bank_kept = torch.isfinite(logits) & (cols > 0)                           # c x k: the bank entries kept
    n_topk_bank = bank_kept.sum(dim=1)                                        # c
    sorted_rows = torch.sort(bank_rows).values
    n_own = (torch.searchsorted(sorted_rows, rows, right=True) - torch.searchsorted(sorted_rows, rows))   # c
    n_tail = (K - n_topk_bank - n_own).clamp(min=0)                           # c
    log_tail = torch.logsumexp(tail, dim=1) + torch.log(n_tail.float() / n_tail_sample.float())
    log_tail = torch.where(n_tail > 0, log_tail, torch.full_like(log_tail, float("-inf")))
    l_pos = (z * z).sum(dim=1) / tau                                          # c: the own view, always in D+
    in_list = torch.logsumexp(logits.masked_fill(~bank_kept, float("-inf")), dim=1)
    return torch.logaddexp(torch.logaddexp(l_pos, in_list), log_tail)


def sparse_to_dense(cols: np.ndarray, logp: np.ndarray, mass: np.ndarray, width: int,
                    excluded: np.ndarray | None = None) -> np.ndarray:
    """A sparse target as a dense distribution ``[B, width]``: the top-k probabilities, and the
    uncaptured mass spread evenly over the other allowed columns (the loss's ``uniform`` tail rule; the
    fidelity's KL is measured against this target, whichever rule training uses)."""
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
