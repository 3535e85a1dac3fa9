"""bench/datapath.py's pass clock: whole-pass and after-the-first-round rates on a scripted clock."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import bench_script


@pytest.fixture(scope="module")
def dp() -> Any:
    return bench_script("datapath")


def scripted(times: list[float]):
    ticks = iter(times)
    return lambda: next(ticks)


def test_two_workers_rate_counts_from_the_end_of_the_first_round(dp: Any) -> None:
    # start at 0 s; 5 s of start-up, then two workers deliver a batch of 100 views each every 2 s, side by side
    clock = dp.PassClock(2, now=scripted([0.0, 5.0, 5.01, 7.0, 7.01, 9.0, 9.01]))
    for _ in range(6):
        clock.batch(100)
    rate = clock.rate()
    assert rate.whole == pytest.approx(600 / 9.01)
    # after batch 2 (5.01 s): 400 views in 4.0 s; timing from the first batch would give 500 / 4.01
    assert rate.steady == pytest.approx(400 / 4.0)


def test_one_worker_and_the_thread_count_from_the_first_batch(dp: Any) -> None:
    for workers in (0, 1):
        clock = dp.PassClock(workers, now=scripted([0.0, 3.0, 4.0, 5.0]))
        for views in (10, 10, 6):
            clock.batch(views)
        rate = clock.rate()
        assert (rate.whole, rate.steady) == (pytest.approx(26 / 5.0), pytest.approx(16 / 2.0))


def test_a_pass_without_a_second_round_is_refused(dp: Any) -> None:
    clock = dp.PassClock(2, now=scripted([0.0, 1.0, 1.0]))
    clock.batch(8)
    clock.batch(8)
    with pytest.raises(ValueError, match="no second round"):
        clock.rate()
