"""What is in a teacher cache: identity, completeness, size, and statistics of the embeddings.

Reads the cache alone (never the teacher). ``describe`` returns plain data (the ``--json`` output);
``format_text`` renders it for people.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import zarr

from seed import bank_store, cache
from seed.errors import SeedError


def disk_bytes(url: str) -> int:
    fs, _, (path,) = fsspec.get_fs_token_paths(url)
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def sample_views(group: zarr.Group, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (row, view) embeddings of valid rows as float32 ``[n, D]`` and their rows."""
    valid = np.flatnonzero(cache.read(group, "valid"))
    if len(valid) == 0:
        return np.zeros((0, int(cache.attributes(group)["D"])), np.float32), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(valid, size=min(n, len(valid)), replace=False))
    views = rng.integers(0, int(cache.attributes(group)["V"]), size=len(rows))
    emb = cache.read_rows(group, "embeddings", rows)                       # n x V x D
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
    a = cache.attributes(group)
    N, V, D, P = (int(a[k]) for k in ("N", "V", "D", "P"))
    done = cache.done_shards(group)
    skipped = cache.skipped_samples(group)
    valid_rows = int(np.count_nonzero(cache.read(group, "valid")))
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
    if bank_store.NAME in group:
        info["bank"] = dict(cache.subgroup(group, bank_store.NAME).attrs)
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
    keys = cache.read(group, "keys")
    hits = np.flatnonzero(keys == key)
    if len(hits) == 0:
        raise SeedError(f"{url}: no sample with key {key!r}")
    return int(hits[0])


def _replay(group: zarr.Group, rows: np.ndarray, views: np.ndarray) -> Any:
    """The cached views (row, view) replayed from the shards: float images ``[n, 3, r, r]`` (no teacher)."""
    import torch

    from seed.augment import apply_batch
    from seed.views import Recipe
    from seed.config import from_dict
    from seed.shards import decode_image, iter_shard

    cap = int(cache.attributes(group)["capacity"])
    urls = cache.attributes(group)["shard_urls"]
    fields = cache.attributes(group)["fingerprint_fields"]
    recipe = from_dict(Recipe, fields["recipe"], "recipe")
    wanted: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        wanted.setdefault(int(r) // cap, []).append(i)
    images: list[torch.Tensor | None] = [None] * len(rows)
    for shard, positions in wanted.items():
        need: dict[int, list[int]] = {}
        for i in positions:
            need.setdefault(int(rows[i]) % cap, []).append(i)
        for sample in iter_shard(urls[shard]):
            for i in need.get(sample.index, []):
                images[i] = decode_image(sample)
    augment = cache.array(group, "augment")
    params = torch.from_numpy(np.stack([augment[int(r), int(v)] for r, v in zip(rows, views)]))
    missing = [int(rows[i]) for i, im in enumerate(images) if im is None]
    if missing:
        raise SeedError(f"rows {missing[:5]} are not in their shards any more (did the shards change?)")
    return apply_batch(images, params, recipe, int(fields["resolution"]))  # type: ignore[arg-type]


def neighbours(url: str, key: str, out_png: str, k: int = 8) -> dict[str, Any]:
    """A PNG grid: the image's V cached views, then its ``k`` nearest bank entries (similarity, label)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seed.report import save_figure

    group = cache.open_complete(url)
    if not bank_store.is_complete(group):
        raise SeedError(f"{url}: no complete bank; run the bank stage before asking for neighbours")
    row = require_key(group, key, url)
    if not cache.read(group, "valid", row):
        raise SeedError(f"{url}: sample {key!r} was skipped at the teacher stage (it did not decode)")
    V = int(cache.attributes(group)["V"])
    _, bank = bank_store.open_bank(url)
    ids = bank.ids()
    z = cache.read(group, "embeddings", row).astype(np.float32)             # V x D
    sims = bank.vectors() @ z[0]                                              # K: from the first view
    sims[ids[:, 0] == row] = -np.inf                                          # never the image itself
    top = np.argsort(-sims)[:k]
    labels = cache.read(group, "labels")
    views = _replay(group, np.array([row] * V + ids[top, 0].tolist()), np.array(list(range(V)) + ids[top, 1].tolist()))
    cols = max(V, k)
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols, 3.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for v in range(V):
        axes[0, v].imshow(views[v].permute(1, 2, 0).numpy())
        axes[0, v].set_title(f"view {v}" + (f"\n{key}" if v == 0 else ""), fontsize=7)
    for j, b in enumerate(top):
        axes[1, j].imshow(views[V + j].permute(1, 2, 0).numpy())
        axes[1, j].set_title(f"sim {sims[b]:.3f}\nlabel {int(labels[int(ids[b, 0])])}", fontsize=7)
    fig.suptitle(f"{key} (label {int(labels[row])}): cached views, then nearest bank entries", fontsize=9)
    save_figure(fig, out_png)
    plt.close(fig)
    return {"key": key, "row": row, "png": out_png,
            "neighbours": [{"row": int(ids[b, 0]), "view": int(ids[b, 1]), "similarity": float(sims[b]),
                            "label": int(labels[int(ids[b, 0])])} for b in top]}


def plots(url: str, out_dir: str, sample: int = 2000) -> list[str]:
    """Histograms of pairwise similarity, target entropy and captured mass; a PCA scatter by label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seed.report import save_figure
    from seed.storage import join

    group = cache.open_complete(url)
    emb, rows = sample_views(group, sample)
    labels = cache.read_rows(group, "labels", rows)
    written = []

    def save(fig: Any, name: str) -> None:
        path = join(out_dir, name)
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)

    sims = (emb[:500] @ emb[:500].T)[~np.eye(min(500, len(emb)), dtype=bool)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(sims, bins=60)
    ax.set_xlabel("cosine similarity between views of different images")
    ax.set_ylabel("pairs")
    save(fig, "similarity.png")

    centred = emb - emb.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 4.5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4)
    ax.legend(*points.legend_elements(), title="label", fontsize=7, loc="best")
    ax.set_title("teacher embeddings, first two principal components")
    save(fig, "pca.png")

    if bank_store.is_complete(group):
        bank = bank_store.Bank(cache.subgroup(group, bank_store.NAME))
        cap = int(cache.attributes(group)["capacity"])
        block = slice(0, min(int(cache.attributes(group)["N"]), 4 * cap))  # a few shards: enough for the histograms
        logp = bank.log_probs(block).astype(np.float64)
        mass = bank.mass(block)
        ok = np.isfinite(mass)
        p = np.where(np.isfinite(logp), np.exp(logp), 0.0)
        entropy = -(p * np.where(p > 0, logp, 0.0)).sum(axis=-1)[ok]
        for values, name, label in ((entropy, "target_entropy.png", "entropy of the cached top-k target (nats)"),
                                    (mass[ok], "captured_mass.png", "probability mass captured by the top-k")):
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.hist(values, bins=60)
            ax.set_xlabel(label)
            ax.set_ylabel("views")
            save(fig, name)
    return written


def _chunks_of(arr: zarr.Array) -> list[slice]:
    """Row blocks of ``arr``, one per chunk along its first axis (cache and bank arrays are chunked by row)."""
    step = int(arr.chunks[0])
    return [slice(lo, min(lo + step, int(arr.shape[0]))) for lo in range(0, int(arr.shape[0]), step)]


def _read_block(arr: zarr.Array, block: slice, label: str, problems: list[str]) -> np.ndarray | None:
    """One chunk's rows, or None (named in ``problems``) when the chunk is damaged."""
    try:
        return np.asarray(arr[block])
    except ValueError as exc:  # the crc32c codec, or a chunk too damaged to decode
        problems.append(f"{label}: chunk {block.start // int(arr.chunks[0])} (rows {block.start}-{block.stop - 1}) "
                        f"is damaged ({str(exc).splitlines()[0][:80]})")
        return None


def _check_shard(s: int, record: dict[str, Any], rows: dict[str, np.ndarray | None], V: int, problems: list[str]) -> None:
    """A finished shard's record against its rows (arrays of damaged chunks are None and not checked)."""
    valid = rows["valid"]
    if valid is None:
        return
    where = f"shard {s} ({str(record.get('url', '')).rsplit('/', 1)[-1]})"
    if int(valid.sum()) != int(record.get("valid", -1)):
        problems.append(f"{where}: its record says {record.get('valid')} valid rows, the data has {int(valid.sum())}")
    emb = rows["embeddings"]
    if emb is not None:
        e = emb.astype(np.float32)
        norms = np.linalg.norm(e[valid], axis=-1)
        bad = int((~np.isfinite(norms) | (np.abs(norms - 1) > 1e-2)).sum())
        if bad:
            problems.append(f"{where}: {bad} of {valid.sum() * V} embeddings of valid rows are not finite unit vectors")
        if np.isfinite(e[~valid]).any():
            problems.append(f"{where}: rows marked invalid hold embeddings")
    if rows["keys"] is not None and (rows["keys"][valid] == "").any():
        problems.append(f"{where}: valid rows without a key")
    if rows["augment"] is not None and not np.isfinite(rows["augment"][valid]).all():
        problems.append(f"{where}: valid rows without replay parameters")


def verify(url: str) -> dict[str, Any]:
    """Read every chunk of the cache (and its bank), then check the completion records against the data.

    One row block (an input shard's chunk of every array) at a time, so memory does not grow with
    N. Per finished shard: the recorded number of valid rows; valid rows with a key, finite
    embeddings of unit norm (float16 rounding allowed) and replay parameters; other rows empty. For
    the bank: entries pointing at valid rows, finite targets in [0, 1] for valid rows. Returns
    ``{"problems": [...], "chunks": n, "shards": n}``; no problem means the cache reads back as it
    was written.
    """
    group = cache.open_group(url, "r")
    cache.check_format(group, url)
    a = cache.attributes(group)
    cap, V, n_shards = int(a["capacity"]), int(a["V"]), int(a["n_shards"])
    problems: list[str] = []
    if a.get("format_version", 0) < cache.FORMAT_VERSION:
        problems.append(f"format {a.get('format_version')} has no chunk checksums: damaged chunks may read as data")
    arrays = {name: cache.array(group, name) for name in cache.ARRAYS}
    bank = cache.subgroup(group, bank_store.NAME) if bank_store.NAME in group else None
    targets = {name: cache.array(bank, name) for name in ("indices", "logp", "mass")} if bank is not None else {}
    complete_bank = bank is not None and cache.attributes(bank).get("status") == "complete"
    done = set(cache.done_shards(group))
    valid_all = np.zeros(n_shards * cap, dtype=bool)                    # one bool a row: for the bank's entries
    chunks = 0
    for s in range(n_shards):
        block = slice(s * cap, (s + 1) * cap)
        rows = {name: _read_block(arr, block, name, problems) for name, arr in arrays.items()}
        for name, arr in targets.items():
            rows[f"bank/{name}"] = _read_block(arr, block, f"bank/{name}", problems)
        chunks += len(rows)
        if rows["valid"] is not None:
            valid_all[block] = rows["valid"]
        if s in done:
            _check_shard(s, cache.shard_record(group, s) or {}, rows, V, problems)
        mass = rows.get("bank/mass")
        if complete_bank and mass is not None and rows["valid"] is not None:
            m = mass[rows["valid"]]
            if not (np.isfinite(m) & (m >= 0) & (m <= 1.0001)).all():
                problems.append(f"bank/mass: shard {s} has valid rows without targets (or a mass outside [0, 1])")
    if a.get("status") == "complete" and len(done) != n_shards:
        problems.append(f"marked complete but {len(done)} of {n_shards} shards have a record")
    if bank is not None:
        entries = {}
        for name in ("ids", "vectors"):
            arr = cache.array(bank, name)
            parts = [_read_block(arr, b, f"bank/{name}", problems) for b in _chunks_of(arr)]
            chunks += len(parts)
            entries[name] = None if any(x is None for x in parts) else np.concatenate([x for x in parts if x is not None])
        ids = entries["ids"]
        if ids is not None:
            entry_rows = ids[:, 0]
            if ((entry_rows < 0) | (entry_rows >= len(valid_all))).any() or not valid_all[entry_rows].all():
                problems.append("bank/ids: entries that are not valid rows of the cache")
    return {"problems": problems, "chunks": chunks, "shards": len(done)}
