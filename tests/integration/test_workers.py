"""``seed.workers.SharedSlots`` across real DataLoader worker processes, under every start method."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seed.workers import SharedSlots, as_is


@dataclasses.dataclass
class Item:
    index: int
    worker: int
    x: torch.Tensor


class Filled(torch.utils.data.Dataset):
    """Item i: a 4 x 8 tensor of i, written by the worker into one of its buffers."""

    def __init__(self, slots: SharedSlots, n: int):
        self.slots, self.n = slots, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        x = self.slots.empty(4, 8)
        x.fill_(float(i))
        info = torch.utils.data.get_worker_info()
        return self.slots.send(Item(i, info.id if info is not None else -1, x))


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_workers_write_their_own_buffers_under_every_start_method(method: str) -> None:
    slots = SharedSlots.for_workers(2, 2, 4 * 8 * 4)
    loader = torch.utils.data.DataLoader(Filled(slots, 24), batch_size=None, num_workers=2, prefetch_factor=2,
                                         collate_fn=as_is, multiprocessing_context=method)
    used: list[tuple[int, int | None]] = []
    for item in loader:
        assert torch.equal(item.x, torch.full((4, 8), float(item.index))), item.index
        ptr = item.x.untyped_storage().data_ptr()
        used.append((item.worker, next((j for j, b in enumerate(slots.buffers) if b is not None and b.data_ptr() == ptr),
                                       None)))
    assert len(used) == 24 and {w for w, _ in used} == {0, 1} and all(j is not None for _, j in used), used
    assert all(w * slots.per_worker <= j < (w + 1) * slots.per_worker for w, j in used), used  # type: ignore[operator]
    assert len({j for _, j in used}) < 24                                   # buffers were reused
