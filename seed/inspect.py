"""What is in a teacher cache: identity, completeness, size, and statistics of the embeddings.

Reads the cache alone (never the teacher). ``describe`` returns plain data (the ``--json`` output);
``format_text`` renders it for people.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import zarr

from seed import cache
from seed.errors import SeedError


def disk_bytes(url: str) -> int:
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def sample_views(group: zarr.Group, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (row, view) embeddings of valid rows as float32 ``[n, D]`` and their rows."""
    valid = np.flatnonzero(group["valid"][:])
    if len(valid) == 0:
        return np.zeros((0, int(group.attrs["D"])), np.float32), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(valid, size=min(n, len(valid)), replace=False))
    views = rng.integers(0, int(group.attrs["V"]), size=len(rows))
    emb = group["embeddings"].oindex[rows]                                    # n x V x D
    return emb[np.arange(len(rows)), views].astype(np.float32), rows


def _stats(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    q = np.percentile(x, [1, 50, 99])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "p1": float(q[0]),
            "p50": float(q[1]), "p99": float(q[2]), "max": float(x.max())}


def describe(url: str, sample: int = 512) -> dict[str, Any]:
    group = cache.open_group(url, "r")
    cache.check_format(group, url)
    a = group.attrs
    N, V, D, P = (int(a[k]) for k in ("N", "V", "D", "P"))
    done = cache.done_shards(group)
    skipped = cache.skipped_samples(group)
    valid_rows = int(np.count_nonzero(group["valid"][:]))
    size = disk_bytes(url)
    emb, rows = sample_views(group, sample)
    norms = np.linalg.norm(emb, axis=1) if len(emb) else np.zeros(0)
    sims = emb @ emb.T if len(emb) else np.zeros((0, 0))
    off = sims[~np.eye(len(emb), dtype=bool)] if len(emb) > 1 else np.zeros(0)
    info: dict[str, Any] = {
        "cache": url,
        "format": a["format"], "format_version": a["format_version"], "status": a.get("status"),
        "fingerprint": a["fingerprint"], "teacher": a.get("teacher"),
        "recipe": a["fingerprint_fields"]["recipe"], "resolution": a["fingerprint_fields"]["resolution"],
        "seed": a["fingerprint_fields"]["seed"], "preprocessing": a.get("preprocessing"),
        "N": N, "V": V, "D": D, "P": P, "capacity": a["capacity"],
        "shards": {"done": len(done), "total": int(a["n_shards"])},
        "rows": {"valid": valid_rows, "padding_or_skipped": N - valid_rows},
        "skipped": {"count": len(skipped), "first": skipped[:10]},
        "bytes": {"on_disk": size, "per_view": size / max(1, valid_rows * V),
                  "raw_per_view": 2 * D + 4 * P},
        "totals": a.get("totals"),
        "embedding_norms": _stats(norms),
        "pairwise_similarity": _stats(off),
        "sampled_views": len(emb),
    }
    if "bank" in group:
        info["bank"] = dict(group["bank"].attrs)
    return info


def format_text(info: dict[str, Any]) -> str:
    t = info["teacher"] or {}
    b = info["bytes"]
    lines = [
        f"cache        {info['cache']}",
        f"format       {info['format']} v{info['format_version']}, status {info['status']}",
        f"fingerprint  {info['fingerprint'][:16]}...",
        f"teacher      {t.get('arch')} ({t.get('format')} checkpoint, {t.get('output')} output) {t.get('checkpoint')}",
        f"views        N={info['N']} rows x V={info['V']} views x D={info['D']} dims; P={info['P']} augment params; "
        f"{info['resolution']} px, seed {info['seed']}",
        f"shards       {info['shards']['done']}/{info['shards']['total']} done, capacity {info['capacity']} rows each",
        f"rows         {info['rows']['valid']} valid, {info['rows']['padding_or_skipped']} padding or skipped",
        f"skipped      {info['skipped']['count']} samples"
        + "".join(f"\n               shard {s['shard']} {s['key']}: {s['reason']}" for s in info["skipped"]["first"]),
        f"size         {b['on_disk'] / 1e6:.2f} MB on disk, {b['per_view']:.1f} B per view (raw {b['raw_per_view']} B)",
    ]
    if info["totals"]:
        tot = info["totals"]
        lines.append(f"teacher      {tot['teacher_forwards']} forwards in {tot['teacher_seconds']:.1f} s")
    r = info["recipe"]
    lines.append("recipe       " + ", ".join(f"{k}={v}" for k, v in r.items()))
    for name in ("embedding_norms", "pairwise_similarity"):
        s = info[name]
        if s:
            lines.append(f"{name.replace('_', ' '):<20s} mean {s['mean']:.4f} std {s['std']:.4f} "
                         f"[p1 {s['p1']:.4f}, p50 {s['p50']:.4f}, p99 {s['p99']:.4f}] over {info['sampled_views']} views")
    if "bank" in info:
        bank = info["bank"]
        lines.append(f"bank         K={bank.get('K')} k={bank.get('topk')} tau_T={bank.get('tau_t')} "
                     f"index {bank.get('index')}, status {bank.get('status')}")
        fid = bank.get("fidelity")
        if fid:
            lines.append(f"fidelity     captured mass mean {fid['mass']['mean']:.4f} (min {fid['mass']['min']:.4f}); "
                         f"KL(dense||sparse) mean {fid['kl']['mean']:.2e} (max {fid['kl']['max']:.2e})")
    return "\n".join(lines)


def require_key(group: zarr.Group, key: str, url: str) -> int:
    """The row of a sample key, or a clear error."""
    keys = group["keys"][:]
    hits = np.flatnonzero(keys == key)
    if len(hits) == 0:
        raise SeedError(f"{url}: no sample with key {key!r}")
    return int(hits[0])
