"""Cached SEED in queue mode is online SEED: the same losses step by step, with no teacher forward.

Online SEED's bank is a FIFO of the teacher's embeddings of the views just trained on. The cache holds
exactly those embeddings (the teacher's, of the views it replays), so a FIFO of *cached* embeddings
(``train.bank=queue``, ``CachedQueueSeed``) is the official queue without the teacher. Here a real cache is
made from Fashion-MNIST with a small teacher, then two identical students train side by side on the
same cached views, one against the online teacher and one against the cache, for two epochs through a
queue that turns over several times.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import teacher as teacher_stage
from seed import cache
from seed.config import load_config
from seed.data import Batches, CachedSource
from seed.objectives import CachedQueueSeed, OnlineSeed, Queue
from seed.shards import FASHION_MNIST_DIR, expand_urls, fashion_mnist_to_shards
from seed.teachers import LoadReport
from tests.conftest import make_storage, tiny_encoder


@pytest.mark.parametrize("tau_t", [1e-4, 0.05])
def test_cached_queue_mode_equals_online_seed_on_the_cached_views(tmp_path: Path, tau_t: float) -> None:
    fashion_mnist_to_shards(str(tmp_path / "shards" / "fm"), source=FASHION_MNIST_DIR, per_shard=48, limit=96)
    storage = make_storage(tmp_path, tmp_path / "shards")
    cfg = load_config(None, ["data.train=fm/train/train-{000000..000001}.tar", "cache.views=2", "cache.name=q",
                             "cache.workers=0", "cache.batch_size=64", "cache.device=cpu"])
    teacher = tiny_encoder("resnet10t", 32, seed=0)
    teacher_stage.run(cfg, storage, progress=False, load=lambda _: (teacher, LoadReport("timm", "0" * 64, [], [], [])))
    group = cache.open_complete(storage.cache_url("q"))
    source = CachedSource(group, None, view="cycle", seed=0, dense=True)
    urls = expand_urls(storage.resolve("shards", cfg.data.train))
    cpu = torch.device("cpu")
    maker = Batches(cfg.cache.recipe, cfg.cache.resolution, device=cpu, workers=0, depth=0)

    K, B = 40, 16                                                  # 96 views an epoch: the queue turns over 2.4 times
    online = OnlineSeed(teacher, Queue(K, 32, cpu, seed=0), tau_s=0.2, tau_t=tau_t)
    cached = CachedQueueSeed(Queue(K, 32, cpu, seed=0), tau_s=0.2, tau_t=tau_t)
    runs = []
    for obj in (online, cached):
        model = tiny_encoder("resnet10t", 32, seed=1).train()
        runs.append((obj, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)))
    losses: list[tuple[float, float]] = []
    masked = 0
    for epoch in range(2):
        for batch in maker.epoch(urls, [0, 1], source, epoch, batch_size=B, steps=96 // B, seed=0, shuffle_buffer=32):
            step = []
            for obj, model, opt in runs:
                ctx = obj.prepare(batch, cpu)
                own = ctx.get("own")  # what the loss masks
                masked += int(own.sum()) if own is not None and obj is cached else 0
                loss = obj.loss(model, batch.x, ctx, batch.labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                obj.after_step(ctx)
                step.append(loss.item())
            losses.append((step[0], step[1]))
    maker.close()
    assert len(losses) == 12 and cached.teacher_forwards == 0 and online.teacher_forwards == 2 * 96
    assert masked > 0                                   # the second epoch met its own images' views in the queue
    assert torch.equal(online.queue.rows, cached.queue.rows)
    # the cache stores embeddings in fp16 (relative error <= 2^-11 per coordinate): that is the whole difference
    assert torch.allclose(online.queue.data, cached.queue.data, atol=2e-3)
    for o, c in losses:
        assert c == pytest.approx(o, rel=2e-3)
