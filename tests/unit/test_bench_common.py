"""bench/common.py's profiling helpers: the GPU busy share of a trace and the thread sampler."""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest
from torch.autograd import DeviceType

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def common() -> Any:
    return bench_script("common")


def _trace(*spans: tuple[float, float, DeviceType]) -> Any:
    """A stand-in for a torch.profiler result: only ``events()`` with device type and time range."""
    events = [types.SimpleNamespace(device_type=d, time_range=types.SimpleNamespace(start=a, end=b))
              for a, b, d in spans]
    return types.SimpleNamespace(events=lambda: events)


def test_gpu_busy_merges_overlapping_kernels_and_ignores_cpu_events(common: Any) -> None:
    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    # kernels 0-10 and 5-20 overlap (20 us busy), 30-40 stands alone (10 us), 12-14 lies inside 5-20;
    # a CPU op spanning everything must not count
    trace = _trace((30, 40, cuda), (0, 10, cuda), (5, 20, cuda), (12, 14, cuda), (0, 100, cpu))
    assert common.gpu_busy_fraction(trace, 100.0) == pytest.approx(0.30)
    assert common.gpu_busy_fraction(_trace(), 100.0) == 0.0


def test_thread_sampler_sees_watched_threads_only(common: Any) -> None:
    stop = threading.Event()
    watched = threading.Thread(target=stop.wait, name="seed-waiting")
    other = threading.Thread(target=stop.wait, name="someone-else")
    watched.start(), other.start()
    try:
        with common.ThreadSampler(interval_s=0.001) as sampler:
            while sampler.samples < 20:
                stop.wait(0.005)
    finally:
        stop.set()
        watched.join(), other.join()
    names = {thread for thread, _, _ in sampler.counts}
    assert "seed-waiting" in names and "MainThread" in names and "someone-else" not in names
    waiting = sum(n for (thread, inner, _), n in sampler.counts.items()
                  if thread == "seed-waiting" and inner.startswith("threading.py:wait"))
    assert waiting >= 0.9 * sampler.samples - 1          # it was waiting (in Event.wait) all along
    assert "| seed-waiting | threading.py:wait" in sampler.table()
