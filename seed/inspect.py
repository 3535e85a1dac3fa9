"""What is in a teacher cache: identity, completeness, size, and statistics of the embeddings.

Reads the cache alone (never the teacher). ``describe`` returns plain data (the ``--json`` output);
``format_text`` renders it for people; ``plots`` and ``neighbours`` draw what the cached targets mean
at the cache's tau_T; ``verify`` reads every chunk. Only ``neighbours`` imports torch (it replays views
with ``seed.augment``), inside the function: the rest stays light (numpy, zarr, matplotlib).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import zarr

from seed import bank_store, cache
from seed.errors import SeedError
from seed.report import input_wait, rows_written
from seed.storage import filesystem, is_url

log = logging.getLogger(__name__)

def _use_storage(url: str) -> None:
    """A URL cache is read with the storage options of ``$SEED_STORAGE`` or ``./storage.yaml`` when no
    storage is in force yet (``seed inspect`` is given the cache's URL, not a run config)."""
    from seed import storage

    if is_url(url) and storage.active() is None:
        storage.load_storage()


def stored_bytes(url: str) -> dict[str, int]:
    """Bytes stored under a cache by node, from one recursive listing: each array (``embeddings``, ...,
    ``bank/logp``, ...), the metadata (``zarr.json``, ``bank/zarr.json``) and the completion records
    (``progress``). Empty when there is no cache."""
    fs, path = filesystem(url)
    root = path.rstrip("/")
    try:
        files = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for name, entry in files.items():
        parts = name[len(root):].strip("/").split("/")
        node = "/".join(parts[:2]) if _is_bank(parts[0]) and len(parts) > 1 else parts[0]
        out[node] = out.get(node, 0) + int(entry.get("size") or 0)
    return out


def _is_bank(node: str) -> bool:
    """``bank`` or a rotation of it (``bank-1``, ...: ``bank.rotations``)."""
    return node == bank_store.NAME or (node.startswith(f"{bank_store.NAME}-") and node[len(bank_store.NAME) + 1:].isdigit())


def disk_bytes(url: str) -> int:
    """Bytes of every file of the cache (bank included); 0 when there is none."""
    return sum(stored_bytes(url).values())


def raw_bytes(arr: zarr.Array) -> int:
    """What an array holds uncompressed: shape x item size; for variable-length strings (``keys``) the
    UTF-8 bytes of its values, read one chunk at a time."""
    if arr.dtype.kind in "OTU":
        return sum(len(str(x).encode()) for block in _chunks_of(arr)
                   for x in np.asarray(cache.read_array(arr, block)).ravel())
    return int(np.prod(arr.shape, dtype=np.int64)) * int(arr.dtype.itemsize)


def byte_counts(group: zarr.Group, url: str, views: int) -> dict[str, Any]:
    """Stored and raw bytes of the cache and of its bank, separately, in total and per valid view.

    The bank is a sub-group of the cache, so a listing of the cache counts both; here they are split:
    ``cache`` is every node outside ``bank/`` (its six arrays, metadata, completion records), ``bank``
    the rest. ``raw_per_view`` at the top is a view's own data: its float16 embedding and float32
    replay row (2 D + 4 P)."""
    a = cache.attributes(group)
    stored = stored_bytes(url)
    per = max(1, views)

    def part(nodes: list[tuple[zarr.Group, str]], names: tuple[str, ...], bank: bool) -> dict[str, Any]:
        arrays: dict[str, dict[str, int]] = {}
        for node, prefix in nodes:  # the bank's rotations add up, array by array
            for n in (n for n in names if n in node):
                a = arrays.setdefault(n, {"stored": 0, "raw": 0})
                a["stored"] += stored.get(prefix + n, 0)
                a["raw"] += raw_bytes(cache.array(node, n))
        total = sum(v for k, v in stored.items() if _is_bank(k.split("/", 1)[0]) == bank)
        raw = sum(x["raw"] for x in arrays.values())
        return {"stored": total, "raw": raw, "stored_per_view": total / per, "raw_per_view": raw / per,
                "metadata": total - sum(x["stored"] for x in arrays.values()), "arrays": arrays}

    out: dict[str, Any] = {"on_disk": sum(stored.values()), "views": views}
    out["cache"] = part([(group, "")], cache.ARRAYS, False)
    out["per_view"] = out["cache"]["stored_per_view"]
    out["raw_per_view"] = 2 * int(a["D"]) + 4 * int(a["P"])
    if bank_store.NAME in group:
        rotations = [bank_store.node_name(r) for r in range(bank_store.rotations(group)) if bank_store.node_name(r) in group]
        out["bank"] = part([(cache.subgroup(group, n), f"{n}/") for n in rotations], BANK_ARRAYS, True)
        out["bank"]["rotations"] = len(rotations)
    return out


BANK_ARRAYS = ("ids", "vectors", "faiss_index", "indices", "logp", "mass")


def sample_rows(group: zarr.Group, n: int, seed: int = 0, blocks: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` valid rows (sorted) and one view of each, drawn from ``seed`` within at most ``blocks``
    input shards that hold data: a sample then reads a few chunks of each array whatever N is."""
    a = cache.attributes(group)
    cap, n_shards, V = int(a["capacity"]), int(a["n_shards"]), int(a["V"])
    valid = cache.read(group, "valid")
    filled = np.flatnonzero(valid.reshape(n_shards, cap).any(axis=1))
    rng = np.random.default_rng(seed)
    if len(filled) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    chosen = rng.choice(filled, size=min(blocks, len(filled)), replace=False)
    candidates = np.concatenate([np.flatnonzero(valid[s * cap:(s + 1) * cap]) + s * cap for s in np.sort(chosen)])
    rows = np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))
    return rows, rng.integers(0, V, size=len(rows))


def sample_views(group: zarr.Group, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (row, view) embeddings of valid rows as float32 ``[n, D]`` and their rows (``sample_rows``)."""
    rows, views = sample_rows(group, n, seed)
    if len(rows) == 0:
        return np.zeros((0, int(cache.attributes(group)["D"])), np.float32), rows
    emb = cache.read_rows(group, "embeddings", rows)                       # n x V x D
    return emb[np.arange(len(rows)), views].astype(np.float32), rows


def _stats(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    q = np.percentile(x, [1, 50, 99])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "p1": float(q[0]),
            "p50": float(q[1]), "p99": float(q[2]), "max": float(x.max())}


def describe(url: str, sample: int = 512) -> dict[str, Any]:
    _use_storage(url)
    group = cache.open_group(url, "r")
    cache.check_format(group, url)
    a = cache.attributes(group)
    N, V, D, P = (int(a[k]) for k in ("N", "V", "D", "P"))
    records = cache.records(group)  # each record read once (on object storage, a request each)
    done = list(records)
    skipped = cache.skipped_samples(group, records)
    valid_rows = int(np.count_nonzero(cache.read(group, "valid")))
    emb, rows = sample_views(group, sample)
    norms = np.linalg.norm(emb, axis=1) if len(emb) else np.zeros(0)
    sims = emb @ emb.T if len(emb) else np.zeros((0, 0))
    off = sims[~np.eye(len(emb), dtype=bool)] if len(emb) > 1 else np.zeros(0)
    info: dict[str, Any] = {
        "cache": url,
        "format": a["format"], "format_version": a["format_version"], "status": a.get("status"),
        "fingerprint": a["fingerprint"], "revision": a.get("revision"), "teacher": a.get("teacher"),
        "recipe": a["fingerprint_fields"]["recipe"], "resolution": a["fingerprint_fields"]["resolution"],
        "seed": a["fingerprint_fields"]["seed"], "preprocessing": a.get("preprocessing"),
        "N": N, "V": V, "D": D, "P": P, "capacity": a["capacity"],
        "shards": {"done": len(done), "total": int(a["n_shards"])},
        "rows": {"valid": valid_rows, "padding_or_skipped": N - valid_rows},
        "skipped": {"count": len(skipped), "first": skipped[:10]},
        "damaged_shards": {str(s): d for s, d in cache.damaged_shards(group, records).items()},
        "reopened": [{"shard": r["shard"], "why": r["why"], "at": r["at"]} for r in a.get("reopened", [])],
        "bytes": byte_counts(group, url, valid_rows * V),
        "totals": a.get("totals"),
        "embedding_norms": _stats(norms),
        "pairwise_similarity": _stats(off),
        "sampled_views": len(emb),
        "labels": _label_mix(cache.shard_label_mix(group)),
    }
    arrays = {"embeddings": cache.array(group, "embeddings")}
    if bank_store.NAME in group:
        info["bank"] = dict(cache.subgroup(group, bank_store.NAME).attrs)
        node = cache.subgroup(group, bank_store.NAME)
        arrays |= {f"bank/{name}": cache.array(node, name) for name in ("indices", "logp") if name in node}
    # chunks one view deep, or (made before 2026-11-29) every view of a row block in one chunk
    info["views_per_chunk"] = {name: int(arr.chunks[1]) for name, arr in arrays.items()}
    return info


def _label_mix(mix: cache.LabelMix | None) -> dict[str, Any] | None:
    return None if mix is None else {**dataclasses.asdict(mix), "sorted_by_class": mix.sorted_by_class}


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


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
        f"damaged      {len(info['damaged_shards'])} shards kept by data.damaged=keep"
        + "".join(f"\n               shard {s}: read {d['read']} of {d['expected']} samples, lost "
                  f"{d['lost'] if d['lost'] is not None else 'an unknown number (its size was scanned)'}; "
                  f"damage at byte {d['offset']} after key {d['last_key']!r}"
                  for s, d in info["damaged_shards"].items()),
        *([f"reopened     {len(info['reopened'])} shards embedded again, revision {info['revision']}"
           + "".join(f"\n               shard {r['shard']} at {r['at']}: {r['why']}" for r in info["reopened"])]
          if info["reopened"] else []),
        f"size         {_size(b['on_disk'])} on disk: cache {_size(b['cache']['stored'])}"
        + (f", bank {_size(b['bank']['stored'])}" if "bank" in b else ", no bank"),
        f"cache bytes  {b['cache']['stored_per_view']:.1f} B stored per view, {b['cache']['raw_per_view']:.1f} B raw "
        f"(embedding + replay row {b['raw_per_view']} B; keys, labels, sizes, padding), over {b['views']} valid views",
    ]
    if "bank" in b:
        lines.append(f"bank bytes   {b['bank']['stored_per_view']:.1f} B stored per view, {b['bank']['raw_per_view']:.1f} B raw "
                     "(top-k targets of every view, the bank's entries and index)")
    per_chunk = info.get("views_per_chunk")
    whole = {name: n for name, n in (per_chunk or {}).items() if n > 1}
    if per_chunk is not None:  # (a description made before it was recorded has none)
        lines.append("chunks       one view deep: a student epoch reads only the view of each row block it uses"
                     if not whole else f"chunks       {', '.join(whole)} hold {max(whole.values())} views a chunk (made "
                     f"before each view had chunks of its own): a student epoch reads up to {max(whole.values())} times "
                     "the bytes of the view it uses; seed teacher --overwrite, then seed bank, make them again")
    if info["totals"]:
        tot = info["totals"]
        lines.append(f"teacher      {tot['teacher_forwards']} forwards in {tot['teacher_seconds']:.1f} s"
                     + input_wait(tot) + rows_written(tot))
    mix = info.get("labels")
    lines.append("labels       fewer than 3 known" if mix is None else
                 f"labels       {mix['labels']} classes; the most common holds {mix['overall']:.0%} of all images and "
                 f"{mix['median_shard']:.0%} of the median shard: "
                 + ("shards LOOK SORTED BY CLASS, so training batches hold few classes (write the shards in random "
                    "order: seed shards imagefolder does)" if mix["sorted_by_class"] else "shards mixed"))
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
    arr = cache.array(group, "keys")
    for block in _chunks_of(arr):  # a shard's block at a time, stopping at the first hit (1.28M keys at ImageNet)
        hits = np.flatnonzero(cache.read_array(arr, block) == key)
        if len(hits):
            return int(block.start + hits[0])
    raise SeedError(f"{url}: no sample with key {key!r}")


def _replay(group: zarr.Group, rows: np.ndarray, views: np.ndarray) -> Any:
    """The cached views (row, view) replayed from the shards: float images ``[n, 3, r, r]`` (no teacher)."""
    import torch

    from seed.augment import apply_batch
    from seed.config import from_dict
    from seed.shards import decode_image, iter_shard
    from seed.views import Recipe

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
        last = max(need)
        for sample in iter_shard(urls[shard]):  # read up to the last sample wanted, not the whole shard
            for i in need.get(sample.index, []):
                images[i] = decode_image(sample)
            if sample.index >= last:
                break
    params = torch.from_numpy(cache.read_pairs(group, "augment", np.asarray(rows), np.asarray(views)))
    missing = [int(rows[i]) for i, im in enumerate(images) if im is None]
    if missing:
        raise SeedError(f"rows {missing[:5]} are not in their shards any more (did the shards change?)")
    return apply_batch(images, params, recipe, int(fields["resolution"]))  # type: ignore[arg-type]


def nearest_other(z: np.ndarray, rows: np.ndarray, vectors: np.ndarray, entry_rows: np.ndarray,
                  block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each query ``z [n, D]`` of image ``rows``: the similarity to its nearest entry of ``vectors [K, D]``
    that belongs to another image (``entry_rows``), and that entry (-inf, -1 when there is none).

    A block of queries at a time: n x K similarities at once would not fit for K = 65536.
    """
    best = np.full(len(z), -np.inf, np.float32)
    where = np.full(len(z), -1, np.int64)
    if len(vectors) == 0:
        return best, where
    for lo in range(0, len(z), block):
        s = z[lo:lo + block] @ vectors.T
        s[rows[lo:lo + block, None] == entry_rows[None, :]] = -np.inf
        j = np.argmax(s, axis=1)
        best[lo:lo + block] = s[np.arange(len(s)), j]
        where[lo:lo + block] = np.where(np.isfinite(best[lo:lo + block]), j, -1)
    return best, where


def topk_profile(logp: np.ndarray, mass: np.ndarray) -> dict[str, Any]:
    """The cached sparse targets by rank r (columns sorted by p_T, missing ones last), from ``logp [..., k]``
    (log p_T under the full distribution over 1 + K columns) and ``mass [...]`` (what the top-k capture).

    Per rank: the mean p_T, the 10/50/90th percentiles of log p_T, and the mean mass not captured by the
    first r columns: the top-k's own entries past r plus the tail ``1 - mass`` (summed, not ``1 - cumulative``,
    which float16 log-probabilities near 0 would drown in rounding). Views without targets are left out.
    """
    lp = logp.reshape(-1, logp.shape[-1]).astype(np.float64)
    has = np.isfinite(lp).any(axis=1)
    lp = -np.sort(-np.where(np.isfinite(lp), lp, -np.inf)[has], axis=1)
    p = np.exp(lp)
    tail = np.clip(1.0 - mass.reshape(-1).astype(np.float64)[has], 0.0, None)
    after = np.cumsum(p[:, ::-1], axis=1)[:, ::-1]                      # sum of p over ranks >= r
    beyond = np.concatenate([after[:, 1:], np.zeros((len(p), 1))], axis=1) + tail[:, None]
    q = np.percentile(lp, [10, 50, 90], axis=0) if len(lp) else np.zeros((3, lp.shape[1]))
    return {"rank": np.arange(1, lp.shape[1] + 1), "mean": p.mean(axis=0), "logp_p10": q[0], "logp_p50": q[1],
            "logp_p90": q[2], "beyond": beyond.mean(axis=0), "captured": float(1 - tail.mean()) if len(tail) else 0.0,
            "views": len(lp)}


def neighbours(url: str, key: str, out_png: str, k: int = 8) -> dict[str, Any]:
    """A PNG grid, one line per cached view of ``key``: the view as replayed, then its ``k`` nearest bank
    entries of other images (replayed too), each with its cosine, label, key and the log p_T the cache
    holds for it (at tau_T = 1e-4 a neighbour's weight is ~e^(-(1 - cosine) / tau_T) of the own view's)."""
    _use_storage(url)
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
    ids, tau = bank.ids(), float(bank.attrs["fields"]["tau_t"])
    z = cache.read(group, "embeddings", row).astype(np.float32)             # V x D
    sims = z @ bank.vectors().T                                               # V x K
    sims[:, ids[:, 0] == row] = -np.inf                                       # never the image itself
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    targets = bank.targets(slice(row, row + 1))
    cols, logp = targets["cols"][0], targets["logp"][0].astype(np.float64)  # V x topk: D+ columns, 0 = own view
    entries = sorted({int(b) for v in range(V) for b in order[v] if np.isfinite(sims[v, b])})
    looked = np.array(sorted({row, *(int(ids[b, 0]) for b in entries)}))
    label_of = dict(zip(looked.tolist(), cache.read_rows(group, "labels", looked).tolist()))
    key_of = dict(zip(looked.tolist(), cache.read_rows(group, "keys", looked).tolist()))

    def cached_logp(v: int, column: int) -> float | None:
        hit = np.flatnonzero(cols[v] == column)
        return float(logp[v, hit[0]]) if len(hit) else None

    per_view: list[dict[str, Any]] = []
    for v in range(V):
        near: list[dict[str, Any]] = [{"row": int(ids[b, 0]), "view": int(ids[b, 1]), "key": str(key_of[int(ids[b, 0])]),
                 "similarity": float(sims[v, b]), "label": int(label_of[int(ids[b, 0])]),
                 "logp": cached_logp(v, int(b) + 1)} for b in order[v] if np.isfinite(sims[v, b])]
        per_view.append({"view": v, "own_logp": cached_logp(v, 0), "neighbours": near})
    replay_rows = [row] * V + [n["row"] for pv in per_view for n in pv["neighbours"]]
    replay_views = list(range(V)) + [n["view"] for pv in per_view for n in pv["neighbours"]]
    images = _replay(group, np.array(replay_rows), np.array(replay_views)).permute(0, 2, 3, 1).clamp(0, 1).numpy()
    fig, axes = plt.subplots(V, k + 1, figsize=(1.35 * (k + 1), 1.95 * V), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    at = V
    for v, pv in enumerate(per_view):
        own = pv["own_logp"]
        axes[v, 0].imshow(images[v])
        axes[v, 0].set_title(f"view {v}, label {label_of[row]}\nown p_T "
                             + (f"{np.exp(own):.4f}" if own is not None else "not cached"), fontsize=7, color="tab:blue")
        for j, n in enumerate(pv["neighbours"]):
            axes[v, j + 1].imshow(images[at])
            at += 1
            lp = "not in top-k" if n["logp"] is None else f"log p_T {n['logp']:.1f}"
            axes[v, j + 1].set_title(f"cos {n['similarity']:.3f}, label {n['label']}\n{n['key']} v{n['view']}\n{lp}",
                                     fontsize=6, color="tab:green" if n["label"] == label_of[row] else "tab:red")
    fig.suptitle(f"{key} (label {label_of[row]}): each cached view, then its {k} nearest bank entries of other images "
                 f"(cosine; green = same label; log p_T as cached at tau_T = {tau:g})", fontsize=8)
    save_figure(fig, out_png)
    plt.close(fig)
    return {"key": key, "row": row, "label": int(label_of[row]), "png": out_png, "tau_t": tau,
            "neighbours": per_view[0]["neighbours"], "views": per_view}


def _plain_log_labels(axis: Any) -> None:
    """Tick labels of a log axis as plain text (1e-05): matplotlib's default typesets each one as TeX
    mathtext, which took about a second of a ``--plots`` run."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.0e}"))
    axis.set_minor_formatter(NullFormatter())


def plots(url: str, out_dir: str, sample: int = 2000) -> list[str]:
    """PNGs that read the same at any tau_T: nearest-neighbour similarities (own other view, nearest other
    image, a random image), and with a bank the own-view margin over the nearest entry and the cached top-k
    mass by rank; a PCA scatter by label."""
    _use_storage(url)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seed.report import save_figure
    from seed.storage import join

    group = cache.open_complete(url)
    V = int(cache.attributes(group)["V"])
    rows, views = sample_rows(group, sample)
    if len(rows) < 2:
        raise SeedError(f"{url}: fewer than 2 valid rows, nothing to plot")
    every = cache.read_rows(group, "embeddings", rows).astype(np.float32)  # n x V x D
    z = every[np.arange(len(rows)), views]
    labels = cache.read_rows(group, "labels", rows)
    bank = bank_store.Bank(cache.subgroup(group, bank_store.NAME)) if bank_store.is_complete(group) else None
    written = []

    def save(fig: Any, name: str) -> None:
        path = join(out_dir, name)
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)

    if bank is not None:
        nearest, _ = nearest_other(z, rows, bank.vectors(), bank.ids()[:, 0])
        against = f"the bank (K={len(bank.ids())})"
    else:
        nearest, _ = nearest_other(z, rows, every.reshape(-1, every.shape[-1]), np.repeat(rows, V))
        against = f"the {len(rows)} sampled images"
    curves = [(nearest, f"nearest other image in {against}")]
    if V > 1:
        other_view = np.einsum("nd,nd->n", every[np.arange(len(rows)), (views + 1) % V], z)
        curves.insert(0, (other_view, "same image, another cached view"))
    curves.append((np.einsum("nd,nd->n", np.roll(z, 1, axis=0), z), "a random other image"))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(min(c.min() for c, _ in curves), 1.0, 80).tolist()
    for values, label in curves:
        ax.hist(values, bins=bins, histtype="step", linewidth=1.4, label=label)
    title = f"teacher cosine similarity of {len(rows)} cached views"
    if V > 1:
        title += f"\nthe other view is nearer than any other image for {(curves[0][0] > nearest).mean():.1%} of views"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("cosine similarity to ...")
    ax.set_ylabel("views")
    ax.legend(fontsize=7, loc="upper left")
    save(fig, "neighbour_similarity.png")

    if bank is not None:
        tau = float(bank.attrs["fields"]["tau_t"])
        own = np.einsum("nd,nd->n", z, z)                  # column 0 of D+: the view itself
        margin = own - nearest
        fig, ax = plt.subplots(figsize=(6, 3.6))
        positive = margin[margin > 0]
        lo = max(positive.min() if len(positive) else 1e-4, 1e-6)
        ax.hist(np.maximum(margin, lo), bins=np.geomspace(lo, max(lo * 10, margin.max()), 60).tolist())
        ax.set_xscale("log")
        _plain_log_labels(ax.xaxis)
        for m, text in ((tau, "e^-1"), (tau * np.log(100), "1%"), (tau * np.log(1e4), "0.01%")):
            ax.axvline(m, color="k", linestyle=":", linewidth=1)
            ax.text(m, ax.get_ylim()[1] * 0.97, f" {text}\n {(margin < m).mean():.1%}\n of views", fontsize=6, va="top")
        def gap(m: Any) -> Any:
            return np.asarray(m) / tau

        def cosine(g: Any) -> Any:
            return np.asarray(g) * tau

        top = ax.secondary_xaxis("top", functions=(gap, cosine))
        _plain_log_labels(top.xaxis)
        top.set_xlabel(f"logit gap at tau_T = {tau:g}", fontsize=8)
        ax.set_xlabel("own-view similarity minus nearest other image's (cosine margin)")
        ax.set_ylabel("views")
        near = (margin < tau * np.log(100)).mean()
        ax.set_title(f"the nearest other image gets >= 1% of the own view's weight for {near:.1%} of views\n"
                     "(dotted: where the neighbour gets e^-1, 1%, 0.01% of the own view's weight; share of views left of it)",
                     fontsize=8)
        save(fig, "margin.png")

        prof = topk_profile(cache.read_rows(bank.group, "logp", rows), cache.read_rows(bank.group, "mass", rows))
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        left.plot(prof["rank"], prof["mean"], "o-", markersize=3, label="mean p_T at rank r")
        left.plot(prof["rank"], prof["beyond"], "s-", markersize=3, label="mean mass after rank r (incl. beyond top-k)")
        left.axhline(np.finfo(np.float32).eps / 2, color="grey", linestyle=":", linewidth=1)
        left.text(prof["rank"][-1], np.finfo(np.float32).eps / 2, "1 - mass unresolved below here\n(mass is float32)",
                  fontsize=6, ha="right", va="bottom", color="grey")
        left.set_yscale("log")  # zeros (underflow) are not drawn
        _plain_log_labels(left.yaxis)
        left.set_xlabel("rank r in the cached top-k (1 = largest p_T)")
        left.set_ylabel("probability")
        left.legend(fontsize=7)
        left.grid(alpha=0.3, which="both")
        right.fill_between(prof["rank"], prof["logp_p10"], prof["logp_p90"], alpha=0.3, label="10-90% of views")
        right.plot(prof["rank"], prof["logp_p50"], "o-", markersize=3, label="median")
        right.set_xlabel("rank r")
        right.set_ylabel("log p_T (nats)")
        right.legend(fontsize=7)
        right.grid(alpha=0.3)
        for ax in (left, right):
            if len(prof["rank"]) > 16:
                ax.set_xscale("log")
                _plain_log_labels(ax.xaxis)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        fig.suptitle(f"cached top-{len(prof['rank'])} targets at tau_T = {tau:g} over {prof['views']} views: top-k "
                     f"captures {prof['captured']:.6f} of the mass on average, rank 1 leaves {prof['beyond'][0]:.2e}", fontsize=9)
        save(fig, "topk_mass.png")

    centred = (z - z.mean(axis=0)).astype(np.float64)
    eigval, eigvec = np.linalg.eigh(centred.T @ centred)      # D x D: cheaper than an SVD of the n x D sample
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    share = np.clip(eigval, 0, None) / max(float(np.clip(eigval, 0, None).sum()), 1e-12)
    xy = centred @ eigvec[:, :2]
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4)
    ax.legend(*points.legend_elements(), title="label", fontsize=7, loc="best")
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%})" if len(share) > 1 else "PC 2")
    ax.set_title(f"teacher embeddings of {len(rows)} cached views, first two principal components", fontsize=8)
    save(fig, "pca.png")
    if bank is None:  # the bank's two plots were not drawn: ones left from an earlier bank would look current
        for name in ("margin.png", "topk_mass.png"):
            fs, old = filesystem(join(out_dir, name))
            if fs.exists(old):
                fs.rm(old)
                log.warning("%s removed: it was drawn from a bank this cache no longer has complete", old)
        log.warning("%s has no complete bank: margin.png and topk_mass.png are drawn only with one (seed bank)", url)
    return written


def _chunks_of(arr: zarr.Array) -> list[slice]:
    """Row blocks of ``arr``, one per chunk along its first axis (cache and bank arrays are chunked by row)."""
    step = int(arr.chunks[0])
    return [slice(lo, min(lo + step, int(arr.shape[0]))) for lo in range(0, int(arr.shape[0]), step)]


def _read_block(arr: zarr.Array, block: slice, label: str, problems: list[str]) -> np.ndarray | None:
    """One row block's chunks, or None (named in ``problems``, with the views whose chunks are damaged where an
    array has one per view) when a chunk is damaged."""
    try:
        return np.asarray(arr[block])
    except ValueError as exc:  # the crc32c codec, or a chunk too damaged to decode
        views = ""
        if arr.ndim > 1 and arr.chunks[1] == 1 and arr.shape[1] > 1:
            views = f", views {', '.join(str(v) for v in range(arr.shape[1]) if not _reads(arr, (block, v)))}"
        problems.append(f"{label}: chunk {block.start // int(arr.chunks[0])} (rows {block.start}-{block.stop - 1}"
                        f"{views}) is damaged ({str(exc).splitlines()[0][:80]})")
        return None


def _reads(arr: zarr.Array, selection: Any) -> bool:
    try:
        arr[selection]
        return True
    except ValueError:
        return False


def _chunks_per_block(arr: zarr.Array) -> int:
    """Chunks of one row block of ``arr`` (V for the arrays chunked one view deep, else 1)."""
    return int(np.prod(arr.cdata_shape[1:], dtype=np.int64))


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


def _missing_chunks(arrays: dict[str, zarr.Array], shard: int, files: set[str], problems: list[str]) -> None:
    """Name the arrays whose chunk of ``shard`` is not stored (``files``: the paths under the cache). Zarr reads an
    absent chunk as its fill value, so a lost file would pass for an empty block; called for shards with valid
    rows, whose chunks cannot all be fill (``labels`` can: all -1 for an unlabelled set, and is not asked)."""
    for name, arr in arrays.items():
        if name.rsplit("/", 1)[-1] == "labels":
            continue
        # every chunk of the row block (``embeddings``, ``indices`` and ``logp`` have one per view)
        lost = [rest for rest in np.ndindex(*arr.cdata_shape[1:])
                if f"{arr.path}/{arr.metadata.encode_chunk_key((shard, *rest))}" not in files]
        if lost:
            views = f", views {', '.join(str(r[0]) for r in lost)}" if arr.chunks[1:2] == (1,) else ""
            problems.append(f"{name}: chunk {shard} (rows {shard * arr.chunks[0]}-{(shard + 1) * arr.chunks[0] - 1}"
                            f"{views}) is missing: it would read as empty rows")


def verify(url: str) -> dict[str, Any]:
    """Read every chunk of the cache (and its bank), then check the completion records against the data.

    One row block (an input shard's chunk of every array) at a time, so memory does not grow with
    N. Per finished shard: the recorded number of valid rows; valid rows with a key, finite
    embeddings of unit norm (float16 rounding allowed) and replay parameters; other rows empty. For
    the bank: entries pointing at valid rows, finite targets in [0, 1] for valid rows. Returns
    ``{"problems": [...], "chunks": n, "shards": n, "n_shards": n, "status": ...}``; no problem means the cache
    reads back as it was written. Chunks a finished shard with valid rows must have and that are not stored are
    named (zarr would read them as fill values), from one listing of the cache's files.
    """
    group = cache.open_group(url, "r")
    fs, path = filesystem(url)
    root = path.rstrip("/")
    files = {name[len(root):].strip("/") for name in fs.find(root)}
    cache.check_format(group, url)
    a = cache.attributes(group)
    cap, V, n_shards = int(a["capacity"]), int(a["V"]), int(a["n_shards"])
    problems: list[str] = []
    if a.get("format_version", 0) < cache.FORMAT_VERSION:
        problems.append(f"format {a.get('format_version')} has no chunk checksums: damaged chunks may read as data")
    arrays = {name: cache.array(group, name) for name in cache.ARRAYS}
    # every rotation's bank (bank, bank-1, ...), named as their arrays are in the problems
    banks = {} if bank_store.NAME not in group else {
        bank_store.node_name(r): cache.subgroup(group, bank_store.node_name(r)) for r in range(bank_store.rotations(group))
        if bank_store.node_name(r) in group}
    targets = {f"{node}/{name}": cache.array(bank, name) for node, bank in banks.items()
               for name in ("indices", "logp", "mass")}
    complete = {node for node, bank in banks.items() if cache.attributes(bank).get("status") == "complete"}
    records = cache.records(group)
    done = set(records)
    valid_all = np.zeros(n_shards * cap, dtype=bool)                    # one bool a row: for the bank's entries
    chunks = 0
    for s in range(n_shards):
        block = slice(s * cap, (s + 1) * cap)
        rows = {name: _read_block(arr, block, name, problems) for name, arr in arrays.items()}
        for name, arr in targets.items():
            rows[name] = _read_block(arr, block, name, problems)
        chunks += sum(_chunks_per_block(arr) for arr in [*arrays.values(), *targets.values()])
        if rows["valid"] is not None:
            valid_all[block] = rows["valid"]
        has_valid = rows["valid"] is not None and bool(rows["valid"].any())
        if s in done:
            _check_shard(s, records[s], rows, V, problems)
            if has_valid:
                _missing_chunks(arrays, s, files, problems)
        for node in sorted(complete):
            if has_valid:
                _missing_chunks({k: v for k, v in targets.items() if k.startswith(f"{node}/")}, s, files, problems)
            mass, best, best_logp = rows.get(f"{node}/mass"), rows.get(f"{node}/indices"), rows.get(f"{node}/logp")
            if mass is not None and rows["valid"] is not None:
                m = mass[rows["valid"]]
                if not (np.isfinite(m) & (m >= 0) & (m <= 1.0001)).all():
                    problems.append(f"{node}/mass: shard {s} has valid rows without targets (or a mass outside [0, 1])")
            # every valid view's best target (the first column) is a column of D+ with a log-probability
            if best is not None and best_logp is not None and rows["valid"] is not None:
                ok = (best[rows["valid"]][..., 0] >= 0) & np.isfinite(best_logp[rows["valid"]][..., 0])
                if not ok.all():
                    problems.append(f"{node}/indices, logp: shard {s} has {int((~ok).sum())} valid views without a "
                                    "first target")
    if a.get("status") == "complete" and len(done) != n_shards:
        problems.append(f"marked complete but {len(done)} of {n_shards} shards have a record")
    for node, bank in banks.items():
        entries = {}
        for name in ("ids", "vectors", "faiss_index"):
            if name == "faiss_index" and name not in bank:  # bank.index=torch stores none
                continue
            arr = cache.array(bank, name)
            parts = [_read_block(arr, b, f"{node}/{name}", problems) for b in _chunks_of(arr)]
            chunks += len(parts)
            entries[name] = None if any(x is None for x in parts) else np.concatenate([x for x in parts if x is not None])
        ids = entries["ids"]
        if ids is not None:
            entry_rows = ids[:, 0]
            if ((entry_rows < 0) | (entry_rows >= len(valid_all))).any() or not valid_all[entry_rows].all():
                problems.append(f"{node}/ids: entries that are not valid rows of the cache")
    return {"problems": problems, "chunks": chunks, "shards": len(done), "n_shards": n_shards, "status": a.get("status")}
