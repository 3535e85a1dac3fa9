"""Bank stage: sample the instance bank from a complete cache and cache the teacher targets.

Recipe: sample K (row, view) entries -> build the index -> for each input shard's row block,
compute the sparse targets of its valid views -> measure fidelity on a sample against the dense
distribution -> mark the bank complete. Everything lives in the cache's ``bank`` sub-group; the
teacher's arrays are only read. A bank with other parameters is rebuilt (it is derived data).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.teacher import cache_url, resolve_device
from seed import bank as B
from seed import cache
from seed.config import BankConfig, RunConfig, to_dict
from seed.errors import SeedError
from seed.storage import Storage

log = logging.getLogger(__name__)
BANK_FORMAT_VERSION = 1


def bank_fields(group: zarr.Group, b: BankConfig) -> dict[str, Any]:
    """What determines the bank and targets (not batch size, device or the fidelity sample)."""
    params = {k: v for k, v in to_dict(b).items() if k not in ("batch_size", "kl_sample")}
    return {"cache_fingerprint": group.attrs["fingerprint"], **params}


def normaliser_is_exact(b: BankConfig) -> bool:
    return b.normaliser == "exact" or (b.normaliser == "auto" and b.index in ("flat", "torch"))


def open_bank(url: str, expect: BankConfig | None = None) -> tuple[zarr.Group, zarr.Group]:
    """A complete cache and its complete bank (checked against ``expect`` when given), read-only."""
    group = cache.open_complete(url)
    if "bank" not in group:
        raise SeedError(f"{url}: no bank yet; run the bank stage (seed bank) first")
    bank = group["bank"]
    assert isinstance(bank, zarr.Group)
    if bank.attrs.get("status") != "complete":
        raise SeedError(f"{url}: the bank is incomplete (status {bank.attrs.get('status')!r}); run the bank stage again")
    if expect is not None and bank.attrs["fingerprint"] != cache.fingerprint(bank_fields(group, expect)):
        diffs = cache.diff_fields(bank.attrs["fields"], bank_fields(group, expect))
        raise SeedError(f"{url}: the bank was built with other parameters: {'; '.join(diffs)}; run the bank stage")
    return group, bank


def run(cfg: RunConfig, storage: Storage, *, progress: bool = True) -> dict[str, Any]:
    """Build (or confirm) the bank and targets of the configured cache."""
    from tqdm import tqdm

    b = cfg.bank
    url = cache_url(cfg, storage)
    group = cache.open_complete(url, "r+")
    V, D, cap, n_shards = (int(group.attrs[k]) for k in ("V", "D", "capacity", "n_shards"))
    if b.topk > b.size + 1:
        raise SeedError(f"bank.topk={b.topk} exceeds the {b.size + 1} columns of D+ (bank.size + 1)")
    fields = bank_fields(group, b)
    fp = cache.fingerprint(fields)
    if "bank" in group:
        old = group["bank"].attrs
        if old.get("status") == "complete" and old.get("fingerprint") == fp:
            log.info("bank of %s is complete with the same parameters; skipping", url)
            return {"cache": url, "skipped": True, **dict(old)}
        reason = "incomplete" if old.get("status") != "complete" else "; ".join(cache.diff_fields(old.get("fields", {}), fields))
        log.info("rebuilding the bank of %s (%s); the teacher cache is kept", url, reason)
        del group["bank"]

    start = time.perf_counter()
    device = resolve_device(cfg.cache.device)
    bank = group.create_group("bank", attributes={"format_version": BANK_FORMAT_VERSION, "status": "building",
                                                  "fingerprint": fp, "fields": fields})
    valid = group["valid"][:]
    ids = B.sample_bank(np.flatnonzero(valid), V, b.size, b.seed)            # K x 2 (row, view)
    emb = group["embeddings"]
    vectors = emb.oindex[ids[:, 0]][np.arange(len(ids)), ids[:, 1]]          # K x D, float16
    index = B.BankIndex(vectors.astype(np.float32), b.index, device=device, ivf_lists=b.ivf_lists, nprobe=b.nprobe,
                        hnsw_m=b.hnsw_m, ef_search=b.ef_search, seed=b.seed)
    bank.create_array("ids", data=ids.astype(np.int32), chunks=(min(len(ids), 1 << 16), 2))
    bank.create_array("vectors", data=vectors, chunks=(min(len(ids), 1 << 16), D), compressors=None)
    serialized = index.serialize()
    if serialized is not None:
        bank.create_array("faiss_index", data=serialized, chunks=(len(serialized),), compressors=None)
    N = int(group.attrs["N"])
    targets = {
        "indices": bank.create_array("indices", shape=(N, V, b.topk), dtype="int32", chunks=(cap, V, b.topk), fill_value=-1),
        "logp": bank.create_array("logp", shape=(N, V, b.topk), dtype="float16", chunks=(cap, V, b.topk), fill_value=np.nan),
        "mass": bank.create_array("mass", shape=(N, V), dtype="float32", chunks=(cap, V), fill_value=np.nan),
    }
    exact = normaliser_is_exact(b)
    rng = np.random.default_rng(b.seed + 1)
    bank_rows = ids[:, 0]
    n_views = int(valid.sum()) * V
    bar = tqdm(total=n_views, unit="view", desc="bank targets", disable=not progress, smoothing=0.1)
    search_s = 0.0
    for s in range(n_shards):
        rows = slice(s * cap, (s + 1) * cap)
        ok = valid[rows]
        out_idx = np.full((cap, V, b.topk), -1, np.int32)
        out_logp = np.full((cap, V, b.topk), np.nan, np.float16)
        out_mass = np.full((cap, V), np.nan, np.float32)
        if ok.any():
            local = np.flatnonzero(ok)
            z = emb[rows][local].astype(np.float32).reshape(-1, D)           # n*V x D
            q_rows = np.repeat(local + s * cap, V)
            for lo in range(0, len(z), b.batch_size):
                t0 = time.perf_counter()
                cols, logp, mass = B.sparse_targets(z[lo: lo + b.batch_size], q_rows[lo: lo + b.batch_size], index,
                                                    bank_rows, topk=b.topk, tau=b.tau_t, exact_normaliser=exact,
                                                    tail_samples=b.tail_samples, rng=rng)
                search_s += time.perf_counter() - t0
                flat = slice(lo, lo + len(cols))
                out_idx.reshape(-1, b.topk)[_flat_positions(local, V)[flat]] = cols
                out_logp.reshape(-1, b.topk)[_flat_positions(local, V)[flat]] = logp.astype(np.float16)
                out_mass.reshape(-1)[_flat_positions(local, V)[flat]] = mass
                bar.update(len(cols))
        targets["indices"][rows] = out_idx
        targets["logp"][rows] = out_logp
        targets["mass"][rows] = out_mass
    bar.close()
    fidelity = measure_fidelity(group, bank, index, b, exact)
    seconds = time.perf_counter() - start
    summary = {"K": b.size, "topk": b.topk, "tau_t": b.tau_t, "index": b.index, "normaliser": "exact" if exact else "sampled",
               "device": str(device), "faiss_gpu": index.on_gpu, "views": n_views, "seconds": round(seconds, 3),
               "targets_seconds": round(search_s, 3), "views_per_s": round(n_views / max(search_s, 1e-9), 1),
               "fidelity": fidelity}
    bank.update_attributes({**summary, "status": "complete"})
    return {"cache": url, "skipped": False, **summary}


def _flat_positions(local: np.ndarray, V: int) -> np.ndarray:
    """Positions in a ``[cap * V]`` view of the valid rows' (row, view) pairs, row-major."""
    return (local[:, None] * V + np.arange(V)[None, :]).reshape(-1)


def measure_fidelity(group: zarr.Group, bank: zarr.Group, index: B.BankIndex, b: BankConfig, exact: bool) -> dict[str, Any]:
    """Captured mass over all views; KL(dense || sparse) and (approximate indices) recall on a sample."""
    mass = bank["mass"][:]
    mass = mass[np.isfinite(mass)]
    valid_rows = np.flatnonzero(group["valid"][:])
    V = int(group.attrs["V"])
    rng = np.random.default_rng(b.seed + 2)
    n = min(b.kl_sample, len(valid_rows) * V)
    pick = rng.choice(len(valid_rows) * V, size=n, replace=False)
    rows, views = valid_rows[pick // V], pick % V
    order = np.argsort(rows, kind="stable")
    rows, views = rows[order], views[order]
    z = group["embeddings"].oindex[rows][np.arange(n), views].astype(np.float32)   # n x D
    cols = bank["indices"].oindex[rows][np.arange(n), views]
    logp = bank["logp"].oindex[rows][np.arange(n), views].astype(np.float32)
    m = bank["mass"].oindex[rows][np.arange(n), views]
    bank_vec = torch.from_numpy(index.vectors)
    bank_rows = torch.from_numpy(bank["ids"][:, 0].astype(np.int64))
    dense = B.dense_log_probs(torch.from_numpy(z), torch.from_numpy(rows.astype(np.int64)), bank_vec, bank_rows, b.tau_t)
    excluded = ~torch.isfinite(dense).numpy()
    kl = B.kl_dense_sparse(dense.numpy(), B.sparse_to_dense(cols, logp, m, dense.shape[1], excluded))
    true_mass = np.array([np.exp(dense[i, cols[i][cols[i] >= 0]].double().numpy()).sum() for i in range(n)])
    out: dict[str, Any] = {"mass": B.stats(mass), "kl": B.stats(kl), "sample": int(n),
                           "stored_minus_true_mass": B.stats(m - true_mass)}
    if b.index in ("ivf", "hnsw"):
        _, approx = index.search(z, b.topk)
        _, exact_pos = torch.topk(torch.from_numpy(z) @ bank_vec.T, min(b.topk, len(bank_vec)), dim=1)
        hits = [len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact_pos.numpy())]
        out["recall_at_k"] = float(np.mean(hits))
    return out
