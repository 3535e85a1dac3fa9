"""Bank stage: sample the instance bank from a complete cache and cache the teacher targets.

Recipe: sample K (row, view) entries (R disjoint sets of them with ``bank.rotations = R``) -> for each,
build the index -> for each input shard's row block, compute the sparse targets of its valid views (and
write them in a background thread while the next block's are computed) ->
measure fidelity on a sample against the dense distribution -> mark the bank complete. Everything lives in the cache's ``bank`` sub-group; the
teacher's arrays are only read. A bank with other parameters is rebuilt (it is derived data); a build of the
same parameters cut short (killed, a full disk) resumes from the row blocks it recorded, with the index it stored.

Device: ``cache.device`` (``auto``: CUDA when present). With ``bank.index=torch`` the whole targets
pass runs there. So it does with ``flat`` on CUDA: its search by faiss-gpu when installed, else its exact
top-k from the normaliser's product on the GPU (not a CPU search the GPU would wait for). With ``ivf`` and
``hnsw`` all but the search runs there (and ``ivf``'s search with faiss-gpu). The summary's ``search`` says
where the top-k came from (``device``, ``faiss-gpu``, ``faiss-cpu``). ``bank.batch_size``
views go to each ``seed.bank.sparse_targets`` call, which splits them into row chunks within
``seed.bank.LOGITS_BUDGET`` bytes of logits, so the batch size sets per-call overhead, not memory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import numpy as np
import torch
import zarr

from seed import bank as B
from seed import bank_store, cache
from seed.config import BankConfig, RunConfig
from seed.devices import resolve_device, tf32_forced
from seed.errors import SeedError
from seed.prefetch import WriteBehind
from seed.storage import Storage

log = logging.getLogger(__name__)
# Float32 logits per chunk of the fidelity sample's dense reference: 127 rows at K = 65,536.
_FIDELITY_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class BankResult:
    """The bank of ``cache``: built now (``skipped`` False) or found complete; its summary attributes."""

    cache: str
    skipped: bool
    summary: dict[str, Any]


def run(cfg: RunConfig, storage: Storage, *, progress: bool = True, write_behind: bool = True) -> BankResult:
    """Build (or confirm) the bank and targets of the configured cache.

    ``write_behind``: each input shard's block of targets is written in a background thread while the next
    block's are computed (``seed.prefetch.WriteBehind``); False writes it before going on (to measure one
    against the other). The summary's ``write_seconds`` are the writes' own time (of every block, as
    ``targets_seconds``: those a build cut short wrote too), ``write_wait_seconds`` this run's computation's
    wait for its writes."""
    from seed.report import progress_bar

    b = cfg.bank
    url = storage.cache_url(cfg.cache.name)
    group = cache.open_complete(url, "r+")
    V, D, cap, n_shards = (int(cache.attributes(group)[k]) for k in ("V", "D", "capacity", "n_shards"))
    if b.topk > b.size + 1:
        raise SeedError(f"bank.topk={b.topk} exceeds the {b.size + 1} columns of D+ (bank.size + 1)")
    for name in bank_store.drop_unreadable(group):
        log.warning("%s/%s: its metadata did not parse (a write cut short, as by a full disk): removed, to be made "
                    "again", url, name)
    up_to_date, reason = bank_store.current(group, b)
    if up_to_date:
        log.info("bank of %s is complete with the same parameters; skipping", url)
        return BankResult(url, True, dict(cache.subgroup(group, bank_store.NAME).attrs))

    start = time.perf_counter()
    device = resolve_device(cfg.cache.device)                              # BankConfig has no device of its own
    valid = cache.read(group, "valid")
    # everything that can refuse the parameters, before the bank in place is removed
    banks = B.sample_banks(np.flatnonzero(valid), V, b.size, b.seed, b.rotations)  # R x (K x 2 (row, view))
    B.check_topk(min(b.topk, b.size), b.index, device)
    shortfall = B.ivf_shortfall(b.topk, b.size, b.ivf_lists, b.nprobe) if b.index == "ivf" else None
    if shortfall is not None:
        log.warning("%s", shortfall)
    if device.type == "cuda" and tf32_forced():
        log.warning("NVIDIA_TF32_OVERRIDE=1 forces TF32 on the GPU's float32 products: at bank.tau_t=%g the targets' "
                    "logits may move by about %.0f; unset it for this stage", b.tau_t, 1e-3 / b.tau_t)
    if bank_store.resumable(group, b, banks):
        log.info("resuming the bank of %s: a build of the same parameters was cut short", url)
    else:
        if reason != "no bank":
            log.info("rebuilding the bank of %s (%s); the teacher cache is kept", url, reason)
        bank_store.remove(group)
    n_views = int(valid.sum()) * V
    with progress_bar(total=n_views * b.rotations, unit="view", desc="bank targets" + (f" ({b.rotations} rotations)"
                      if b.rotations > 1 else ""), disable=not progress, smoothing=0.1) as bar:  # closed before any error prints
        summaries = [_build(group, b, r, ids, valid, device, bar.update, write_behind) for r, ids in enumerate(banks)]
    seconds = time.perf_counter() - start
    search_s = sum(x["targets_seconds"] for x in summaries)
    summary = {"K": b.size, "topk": b.topk, "tau_t": b.tau_t, "index": b.index,
               "normaliser": "exact" if b.exact_normaliser else "sampled", "device": str(device),
               "faiss_gpu": summaries[0]["faiss_gpu"], "search": summaries[0]["search"], "views": n_views,
               "rotations": b.rotations,
               "seconds": round(seconds, 3), "targets_seconds": round(search_s, 3),
               "write_seconds": round(sum(x["write_seconds"] for x in summaries), 3),
               "write_wait_seconds": round(sum(x["write_wait_seconds"] for x in summaries), 3),
               "views_per_s": round(n_views * b.rotations / max(search_s, 1e-9), 1),
               "fidelity": summaries[0]["fidelity"]}
    for r, part in enumerate(summaries):  # readers check every rotation's status
        bank_store.complete(cache.subgroup(group, bank_store.node_name(r)),
                            {**summary, "fidelity": part["fidelity"]} if r == 0 else part)
    return BankResult(url, False, summary)


def _build(group: zarr.Group, b: BankConfig, rotation: int, ids: np.ndarray, valid: np.ndarray, device: torch.device,
           on_views: Any, write_behind: bool = True) -> dict[str, Any]:
    """One bank rotation: its index, every valid view's sparse targets over it and their fidelity (the
    rotation's status stays ``building``: ``run`` completes them all at the end). A rotation laid out by a
    build cut short keeps its index and the row blocks it recorded; the others are made now, each written
    while the next is computed (``write_behind``, see ``run``)."""
    V, D, cap, n_shards = (int(cache.attributes(group)[k]) for k in ("V", "D", "capacity", "n_shards"))
    vectors = cache.read_pairs(group, "embeddings", ids[:, 0], ids[:, 1])                     # K x D, float16
    resumed = bank_store.node_name(rotation) in group  # ``run`` checked its parameters and entries
    bank = cache.subgroup(group, bank_store.node_name(rotation)) if resumed else None
    stored = cache.read(bank, "faiss_index") if bank is not None and "faiss_index" in bank else None
    index = B.BankIndex(vectors.astype(np.float32), b.index, device=device, ivf_lists=b.ivf_lists, nprobe=b.nprobe,
                        hnsw_m=b.hnsw_m, ef_search=b.ef_search, seed=b.seed, serialized=stored)  # the index it stored
    if rotation == 0 and index.on_device and b.index == "flat":
        log.info("bank.index=flat on %s without FAISS GPU support (faiss-gpu): the exact top-k comes from the "
                 "normaliser's product on the GPU, not from a search on the CPU", device)
    if bank is None:
        bank = bank_store.create(group, b, ids, vectors, index.serialize(), rotation)
    done = bank_store.done_blocks(bank)
    exact = b.exact_normaliser
    bank_rows = ids[:, 0]
    search_s = sum(float(r.get("targets_seconds", 0.0)) for r in done.values())
    sample = FidelitySample.draw(valid, V, D, b)
    records = list(done.values())  # of the blocks written, before the cut and now
    # a block's targets are written in the background while the next block's are computed
    with WriteBehind("seed-bank-write", enabled=write_behind) as writes:
        for s in range(n_shards):
            rows = slice(s * cap, (s + 1) * cap)
            ok = valid[rows]
            if s in done:  # written before the cut: its views count as made; the fidelity's sampled ones read back
                on_views(int(ok.sum()) * V)
                if sample.wants(s * cap, cap):
                    kept = bank_store.Bank(bank)
                    t = kept.targets(rows)
                    sample.take(s * cap, cache.read(group, "embeddings", rows), t["cols"], t["logp"], kept.mass(rows))
                continue
            out_idx = np.full((cap, V, b.topk), -1, np.int32)
            out_logp = np.full((cap, V, b.topk), np.nan, np.float16)
            out_mass = np.full((cap, V), np.nan, np.float32)
            embeddings = None
            shard_s = 0.0
            if ok.any():
                local = np.flatnonzero(ok)
                embeddings = cache.read(group, "embeddings", rows)                                     # cap x V x D
                z = embeddings[local].astype(np.float32).reshape(-1, D)                               # n*V x D
                q_rows = np.repeat(local + s * cap, V)
                for lo in range(0, len(z), b.batch_size):
                    t0 = time.perf_counter()
                    # the sampled normaliser's tail sample: one per shard and rotation, whatever the batch size
                    rng = np.random.default_rng([b.seed + 1, rotation, s])
                    cols, logp, mass = B.sparse_targets(z[lo: lo + b.batch_size], q_rows[lo: lo + b.batch_size], index,
                                                        bank_rows, topk=b.topk, tau=b.tau_t, exact_normaliser=exact,
                                                        tail_samples=b.tail_samples, rng=rng)
                    shard_s += time.perf_counter() - t0
                    flat = slice(lo, lo + len(cols))
                    out_idx.reshape(-1, b.topk)[_flat_positions(local, V)[flat]] = cols
                    out_logp.reshape(-1, b.topk)[_flat_positions(local, V)[flat]] = logp.astype(np.float16)
                    out_mass.reshape(-1)[_flat_positions(local, V)[flat]] = mass
                    on_views(len(cols))
            if embeddings is not None:
                sample.take(s * cap, embeddings, out_idx, out_logp, out_mass)
            search_s += shard_s
            record = {"views": int(ok.sum()) * V, "targets_seconds": round(shard_s, 3)}
            writes.submit(functools.partial(bank_store.write_targets, bank, rows, out_idx, out_logp, out_mass, shard=s,
                                            record=record), then=functools.partial(records.append, record))
    return {"targets_seconds": round(search_s, 3), "faiss_gpu": index.on_gpu,
            "write_seconds": round(sum(float(r.get("write_seconds", 0.0)) for r in records), 3),
            "write_wait_seconds": round(writes.wait_s, 3),
            "search": "device" if index.on_device else "faiss-gpu" if index.on_gpu else "faiss-cpu",
            "fidelity": measure_fidelity(bank, index, b, sample)}


def _flat_positions(local: np.ndarray, V: int) -> np.ndarray:
    """Positions in a ``[cap * V]`` view of the valid rows' (row, view) pairs, row-major."""
    return (local[:, None] * V + np.arange(V)[None, :]).reshape(-1)


@dataclasses.dataclass
class FidelitySample:
    """The views the fidelity is measured on (``bank.kl_sample`` of them, drawn from ``bank.seed + 2``, sorted
    by row) with their embeddings and stored targets, copied as each shard's targets are made: reading them
    back afterwards would decode a whole chunk (one input shard's rows) for each sampled row, about the
    whole target store again at ImageNet scale."""

    rows: np.ndarray
    views: np.ndarray
    z: np.ndarray       # n x D float32 (the float16 embeddings, as the targets were computed from)
    cols: np.ndarray    # n x topk int32
    logp: np.ndarray    # n x topk float32 (the float16 values stored)
    mass: np.ndarray    # n float32

    @classmethod
    def draw(cls, valid: np.ndarray, V: int, D: int, b: BankConfig) -> FidelitySample:
        valid_rows = np.flatnonzero(valid)
        rng = np.random.default_rng(b.seed + 2)
        n = min(b.kl_sample, len(valid_rows) * V)
        pick = rng.choice(len(valid_rows) * V, size=n, replace=False)
        rows, views = valid_rows[pick // V], pick % V
        order = np.argsort(rows, kind="stable")
        return cls(rows[order], views[order], np.zeros((n, D), np.float32), np.full((n, b.topk), -1, np.int32),
                   np.full((n, b.topk), np.nan, np.float32), np.full(n, np.nan, np.float32))

    def wants(self, first_row: int, rows: int) -> bool:
        """Whether any sampled view lies in the block of ``rows`` rows from ``first_row``."""
        lo, hi = np.searchsorted(self.rows, [first_row, first_row + rows])
        return bool(hi > lo)

    def take(self, first_row: int, embeddings: np.ndarray, cols: np.ndarray, logp: np.ndarray,
             mass: np.ndarray) -> None:
        """Copy the sampled views among the block of rows from ``first_row`` (its arrays ``[cap, V, ...]``)."""
        lo, hi = np.searchsorted(self.rows, [first_row, first_row + len(embeddings)])
        r, v = self.rows[lo:hi] - first_row, self.views[lo:hi]
        self.z[lo:hi] = embeddings[r, v]
        self.cols[lo:hi], self.logp[lo:hi], self.mass[lo:hi] = cols[r, v], logp[r, v], mass[r, v]


def measure_fidelity(bank: zarr.Group, index: B.BankIndex, b: BankConfig, sample: FidelitySample) -> dict[str, Any]:
    """Captured mass over all views; KL(dense || sparse) and (approximate indices) recall on ``sample``.

    The dense reference runs on ``index.device`` in row chunks (``_FIDELITY_BYTES`` of float32 logits
    each: the float64 arrays built from them are a few times larger), so any bank size fits.
    """
    mass = cache.read(bank, "mass")
    mass = mass[np.isfinite(mass)]
    rows, z, cols, logp, m = sample.rows, sample.z, sample.cols, sample.logp, sample.mass
    n = len(rows)
    dev = index.device
    bank_rows = torch.from_numpy(cache.read(bank, "ids", (slice(None), 0)).astype(np.int64)).to(dev)
    K = len(index.vectors)
    kl, true_mass = np.zeros(n), np.zeros(n)
    step = B.chunk_rows(K + 1, _FIDELITY_BYTES)
    with torch.no_grad():
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            dense = B.dense_log_probs(torch.from_numpy(z[sl]).to(dev), torch.from_numpy(rows[sl].astype(np.int64)).to(dev),
                                      index.bank_t, bank_rows, b.tau_t).cpu().numpy()   # c x (1 + K)
            kl[sl] = B.kl_dense_sparse(dense, B.sparse_to_dense(cols[sl], logp[sl], m[sl], K + 1, ~np.isfinite(dense)))
            picked = np.take_along_axis(dense, np.maximum(cols[sl], 0), axis=1).astype(np.float64)
            true_mass[sl] = np.where(cols[sl] >= 0, np.exp(picked), 0.0).sum(axis=1)
            del dense
    out: dict[str, Any] = {"mass": B.stats(mass), "kl": B.stats(kl), "sample": int(n),
                           "stored_minus_true_mass": B.stats(m - true_mass)}
    if b.index in ("ivf", "hnsw") and n:
        _, approx = index.search(z, b.topk)
        with torch.no_grad():
            _, exact_t = B.topk_chunked(torch.from_numpy(z).to(dev), index.bank_t, min(b.topk, K))
        exact_pos = exact_t.cpu().numpy()
        hits = [len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact_pos)]
        out["recall_at_k"] = float(np.mean(hits))
    return out
