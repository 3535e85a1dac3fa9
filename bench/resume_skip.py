"""How long a student run resumed inside an epoch takes to reach its first batch, and how many shards it reads.

    python bench/resume_skip.py --config configs/demo.yaml --storage storage.yaml [--skip-steps 60] [--shuffle-buffer N]

Needs a finished cache and bank (``make demo``). Side by side in one process: the epoch's examples up to the
first one after ``--skip-steps`` batches, (a) fast-forwarded by counting the cache's valid rows (what
``seed.data.examples`` does for a cache) and (b) made and dropped (what it does for sources that do not know
their rows without reading them, and what a resume did before). Prints seconds and the shards each read.
The fast-forward reads the shards whose examples the shuffle buffer still holds: an example stays in a
buffer of B for about B x ln(B) later examples, so about (B / shard size) x ln(B) shards back (ImageNet's
shards of about 1,000 images and B = 2,048: about 16 shards, where the epoch has about 1,250).

Then the same for the fresh views pre-training and online SEED train on (``seed.data.FreshViews``, 2 views an
image, pre-training's batch): (a) with the shards' counts, as ``FreshViews.over`` takes them where the
shards' ``_info.json`` says every image header read (``seed shards`` writes that since 2026-11-29; given here
directly, so shards written before serve too), and (b) without, as before: every skipped example made (its
image header read, its views drawn) and dropped.
"""

from __future__ import annotations

import argparse
import itertools
import time

from seed import bank_store
from seed.config import load_config
from seed.data import CachedSource, FreshViews, examples, shard_order
from seed.shards import expand_urls, shard_lengths
from seed.storage import load_storage


class _Counting(CachedSource):
    """The cache's source, counting the shards it loads (one load a shard read)."""

    loads = 0

    def load(self, shard, epoch):  # type: ignore[no-untyped-def]
        _Counting.loads += 1
        return super().load(shard, epoch)


class _Unknown(_Counting):
    def rows(self, shard):  # type: ignore[no-untyped-def]
        return None  # as a source that must read a shard to know its examples


class _CountingViews(FreshViews):
    """Fresh views, counting the shards they load."""

    loads = 0

    def load(self, shard, epoch):  # type: ignore[no-untyped-def]
        _CountingViews.loads += 1
        return super().load(shard, epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--storage", default=None)
    ap.add_argument("--skip-steps", type=int, default=60)
    ap.add_argument("--shuffle-buffer", type=int, default=0, help="instead of the config's train.loader.shuffle_buffer")
    args = ap.parse_args()
    cfg, storage = load_config(args.config, []), load_storage(args.storage)
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    group, banks = bank_store.open_banks(storage.cache_url(cfg.cache.name), cfg.bank)
    t = cfg.train
    buffer = args.shuffle_buffer or t.loader.shuffle_buffer
    skip = args.skip_steps * t.optim.batch_size
    order = shard_order(len(urls), 1, t.seed)
    print(f"{len(urls)} shards, batch {t.optim.batch_size}, shuffle buffer {buffer}: skipping "
          f"{args.skip_steps} steps ({skip:,} examples) of epoch 2")
    firsts = []
    for name, kind in (("fast-forward (cache rows counted)", _Counting), ("made and dropped", _Unknown)):
        source = kind(group, banks, view=t.view, seed=t.seed, dense=False)
        _Counting.loads = 0
        t0 = time.perf_counter()
        first = next(iter(examples(urls, order, source, 1, seed=t.seed, shuffle_buffer=buffer,
                                   skip=skip)))
        seconds = time.perf_counter() - t0
        firsts.append(first.row)
        print(f"  {name:36s} {seconds:7.2f} s to the first example, {_Counting.loads} shard(s) read")
    whole = CachedSource(group, banks, view=t.view, seed=t.seed, dense=False)
    expected = next(itertools.islice(examples(urls, order, whole, 1, seed=t.seed,
                                              shuffle_buffer=buffer), skip, None)).row
    print(f"  the same next example both ways and as the uninterrupted stream's: {firsts == [expected, expected]}")

    p = cfg.pretrain
    skip = args.skip_steps * p.optim.batch_size
    buffer = args.shuffle_buffer or p.loader.shuffle_buffer
    order = shard_order(len(urls), 1, p.seed)
    print(f"fresh views (pre-training), batch {p.optim.batch_size}, shuffle buffer {buffer}: skipping "
          f"{args.skip_steps} steps ({skip:,} examples) of epoch 2")
    lengths, keys = shard_lengths(urls), []
    for name, counts in (("fast-forward (shard counts)", lengths), ("made and dropped", None)):
        views = _CountingViews(cfg.cache.recipe, seed=p.seed, n_views=2, counts=counts)
        _CountingViews.loads = 0
        t0 = time.perf_counter()
        first = next(iter(examples(urls, order, views, 1, seed=p.seed, shuffle_buffer=buffer, skip=skip)))
        seconds = time.perf_counter() - t0
        keys.append((first.sample.key, first.params.tobytes()))
        print(f"  {name:36s} {seconds:7.2f} s to the first example, {_CountingViews.loads} shard(s) read")
    whole = FreshViews(cfg.cache.recipe, seed=p.seed, n_views=2)
    expected = next(itertools.islice(examples(urls, order, whole, 1, seed=p.seed, shuffle_buffer=buffer), skip, None))
    same = keys == [(expected.sample.key, expected.params.tobytes())] * 2
    print(f"  the same next example (and views) both ways and as the uninterrupted stream's: {same}")


if __name__ == "__main__":
    main()
