"""The prefetch thread: same items and positions as the loop would see, errors re-raised."""

import time

import pytest

from dpo_jax.prefetch import Prefetcher


class Counter:
    """A stand-in for the training iterator: batches 0, 1, 2… and a position."""

    def __init__(self, fail_at=None):
        self.index, self.fail_at = 0, fail_at

    def __next__(self):
        if self.index == self.fail_at:
            raise ValueError(f"bad record in batch {self.index}")
        self.index += 1
        return {"batch": self.index - 1}

    def state(self):
        return {"index": self.index}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_carry_the_position_after_their_own_batch(depth):
    with Prefetcher(Counter(), lambda b: b["batch"] * 10, depth=depth) as batches:
        taken = [next(batches) for _ in range(5)]
        time.sleep(0.05)  # let the thread run ahead: positions must not follow it
        taken.append(next(batches))
    assert taken == [(10 * i, {"index": i + 1}) for i in range(6)]


def test_an_error_in_the_thread_reaches_the_loop_in_order():
    with Prefetcher(Counter(fail_at=2), lambda b: b, depth=2) as batches:
        assert next(batches)[0] == {"batch": 0}
        assert next(batches)[0] == {"batch": 1}
        with pytest.raises(ValueError, match="batch 2"):
            next(batches)


def test_close_stops_a_thread_blocked_on_a_full_queue():
    batches = Prefetcher(Counter(), lambda b: b, depth=1)
    next(batches)
    time.sleep(0.05)
    batches.close()
    assert not batches._thread.is_alive()
