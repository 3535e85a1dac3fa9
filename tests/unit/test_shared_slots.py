"""``seed.workers.SharedSlots``: a worker's tensors written into reused shared buffers, sent by reference.

Both sides run in this process here (the worker side's calls, pickling as the DataLoader's queue does,
and this process's unpickling), so the test can watch when a buffer is made, taken and freed. Across
real worker processes: ``tests/integration/test_workers.py`` and the training layouts' tests.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from seed.augment import apply_batch
from seed.shards import Sample
from seed.views import Recipe, draw_params
from seed.workers import PackedSamples, SharedSlots, SlotRef


@dataclasses.dataclass
class Item:
    shard: int
    x: torch.Tensor
    rows: np.ndarray


def in_buffer(slots: SharedSlots, t: torch.Tensor) -> int | None:
    ptr = t.untyped_storage().data_ptr()
    return next((i for i, b in enumerate(slots.buffers) if b is not None and b.data_ptr() == ptr), None)


def worker_batch(slots: SharedSlots, value: float, n: int = 4) -> bytes:
    """What a worker does: take a buffer, write the batch into it, pickle the item with the tensor by reference."""
    x = slots.empty(n, 3, 8, 8)
    x.fill_(value)
    return pickle.dumps(slots.send(Item(0, x, np.arange(n))))


def test_a_batch_crosses_as_a_reference_and_unpickles_to_the_same_tensor() -> None:
    slots = SharedSlots(1, 2, 4 * 3 * 8 * 8 * 4)
    assert slots.buffers == [None, None]                                   # made when first needed
    x = slots.empty(4, 3, 8, 8)
    assert in_buffer(slots, x) == 0 and x.dtype == torch.float32 and x.is_contiguous() and slots.buffers[1] is None
    x.copy_(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    expected = x.clone()
    sent = slots.send(Item(3, x, np.arange(4)))
    assert isinstance(sent.x, SlotRef) and (sent.x.index, sent.x.shape, sent.x.dtype) == (0, (4, 3, 8, 8), torch.float32)
    assert sent.x.buffer is slots.buffers[0] and sent.shard == 3            # the buffer goes with its first batch
    data = pickle.dumps(sent)
    del x, sent
    got = pickle.loads(data)
    assert torch.equal(got.x, expected) and in_buffer(slots, got.x) == 0 and list(got.rows) == [0, 1, 2, 3]
    del got
    slots.reclaim()
    second = slots.send(Item(0, slots.empty(4, 3, 8, 8), np.arange(4)))
    assert isinstance(second.x, SlotRef) and second.x.index == 0 and second.x.buffer is None  # then only the index
    assert len(pickle.dumps(second)) < 1000


def test_a_buffer_is_reused_only_once_nothing_here_views_it() -> None:
    slots = SharedSlots(1, 2, 4 * 3 * 8 * 8 * 4)
    first = pickle.loads(worker_batch(slots, 1.0))
    second = pickle.loads(worker_batch(slots, 2.0))
    assert {in_buffer(slots, first.x), in_buffer(slots, second.x)} == {0, 1}
    # both held: the next batch gets an ordinary tensor, and neither held batch changes
    third = pickle.loads(worker_batch(slots, 3.0))
    assert in_buffer(slots, third.x) is None
    assert float(first.x.min()) == float(first.x.max()) == 1.0 and float(second.x.max()) == 2.0
    # a view of the first batch outlives it: its buffer stays taken
    kept = first.x[1:3].view(-1)
    index = in_buffer(slots, first.x)
    del first
    fourth = pickle.loads(worker_batch(slots, 4.0))
    assert in_buffer(slots, fourth.x) is None and float(kept.max()) == 1.0
    # let go of the view too: the buffer is freed (at the next batch received), and taken by the batch after
    del kept
    slots.reclaim()
    fifth = pickle.loads(worker_batch(slots, 5.0))
    assert in_buffer(slots, fifth.x) == index and float(fifth.x.min()) == 5.0
    assert float(second.x.max()) == 2.0


def test_a_free_buffer_too_small_is_made_anew_larger_and_none_free_sends_an_ordinary_tensor() -> None:
    slots = SharedSlots(1, 1, 100)
    first = pickle.loads(pickle.dumps(slots.send(Item(0, slots.empty(10), np.arange(1)))))
    assert in_buffer(slots, first.x) == 0 and slots.buffers[0] is not None and slots.buffers[0].numel() == 100
    busy = slots.empty(10)                                                  # buffer 0 is held
    assert in_buffer(slots, busy) is None and slots.send(Item(0, busy, np.arange(1))).x is busy
    del first
    slots.reclaim()
    big = slots.empty(50)                                                   # 200 bytes: made anew, a quarter larger
    big.fill_(7.0)
    sent = slots.send(Item(0, big, np.arange(1)))
    assert isinstance(sent.x, SlotRef) and sent.x.buffer is not None and sent.x.buffer.numel() == 250
    got = pickle.loads(pickle.dumps(sent))
    assert got.x.shape == (50,) and float(got.x.min()) == 7.0 and in_buffer(slots, got.x) == 0
    assert in_buffer(slots, slots.empty(0, 3)) is None                      # nothing to write: no buffer taken
    none = SharedSlots(1, 0)
    assert in_buffer(none, none.empty(2, 3)) is None


def test_for_workers_gives_each_worker_its_items_in_flight_and_the_consumers_three() -> None:
    slots = SharedSlots.for_workers(2, 2, 64)
    assert len(slots.buffers) == 2 * (2 + 3) and slots.nbytes == 64 and slots.per_worker == 5
    assert slots.taken.is_shared()
    # outside a worker, the first worker's buffers; then ordinary tensors
    assert [in_buffer(slots, slots.empty(16)) for _ in range(6)] == [0, 1, 2, 3, 4, None]
    assert all(b is not None and b.is_shared() for b in slots.buffers[:5])


def test_packed_samples_cross_in_a_buffer_and_unpack_the_same() -> None:
    samples = [Sample(f"k{i}", bytes(range(i, i + 40 + i)), "jpg", i, "shard-0.tar", i) for i in range(3)]
    samples.append(Sample("none", None, "jpg", 0, "shard-0.tar", 3))
    slots = SharedSlots(1, 2)
    packed = PackedSamples.pack(samples, slots)
    assert in_buffer(slots, packed.data) == 0
    back = pickle.loads(pickle.dumps(packed))
    assert back.slots is None and in_buffer(slots, back.data) == 0
    assert [None if s.image is None else bytes(s.image) for s in back.unpack()] == [s.image for s in samples]


def test_apply_batch_writes_into_out_the_same_bits() -> None:
    recipe = Recipe()
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in [(40, 52), (33, 33)]]
    params = torch.from_numpy(np.stack([draw_params(recipe, seed=1, key=f"k{i}", view=0, height=im.shape[1],
                                                    width=im.shape[2]) for i, im in enumerate(images)]))
    expected = apply_batch(images, params, recipe, 24)
    slots = SharedSlots(1, 1, expected.numel() * 4)
    out = slots.empty(2, 3, 24, 24)
    got = apply_batch(images, params, recipe, 24, out=out)
    assert got is out and torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[2, 3, 24, 24\]"):
        apply_batch(images, params, recipe, 24, out=torch.empty(2, 3, 24, 23))
    with pytest.raises(ValueError, match="out must be"):
        apply_batch(images, params, recipe, 24, out=torch.empty(2, 3, 24, 24, dtype=torch.float64))


def test_buffers_take_shared_memory_only_when_first_needed() -> None:
    def shm_used_mb() -> float:
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20

    before = shm_used_mb()
    slots = SharedSlots(2, 2, 64 << 20)                                    # 256 MB of buffers at most
    assert shm_used_mb() - before < 16
    slots.empty(16 << 20).fill_(1.0)                                        # one made: 64 MB
    assert 48 < shm_used_mb() - before < 96
