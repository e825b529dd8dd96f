"""The background feed: order kept, `depth` made ahead and no more, errors raised where their item would be."""

import threading
import time

import pytest

from imagen_jax.train.feed import Prefetch


def test_items_arrive_in_order_made_ahead_by_at_most_depth():
    made = []
    counter = iter(range(100))

    def make():
        made.append(next(counter))
        return made[-1]

    feed = Prefetch(make, depth=2)
    assert next(feed) == 0
    time.sleep(0.3)  # the thread fills the queue (2) and waits with one more made (3 in all after item 0)
    assert len(made) == 4
    assert [next(feed) for _ in range(5)] == [1, 2, 3, 4, 5]
    feed.close()
    assert not feed._thread.is_alive()


def test_an_error_in_the_thread_is_raised_in_order_and_stops_it():
    values = iter([1, 2])

    def make():
        try:
            return next(values)
        except StopIteration:
            raise ValueError("shard 7 is unreadable") from None

    feed = Prefetch(make, depth=4)
    assert [next(feed), next(feed)] == [1, 2]
    with pytest.raises(ValueError, match="shard 7 is unreadable"):
        next(feed)
    feed._thread.join(5)
    assert not feed._thread.is_alive()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    feed = Prefetch(lambda: 0, depth=1, name="feed-under-test")
    time.sleep(0.2)
    assert any(t.name == "feed-under-test" for t in threading.enumerate())
    feed.close(timeout=5)
    assert not feed._thread.is_alive()
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetch(lambda: 0, depth=0)


def test_a_nice_feed_runs_at_a_lower_priority():
    import os

    feed = Prefetch(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), depth=1, nice=5)
    assert next(feed) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)  # the thread's own, not the process's
    feed.close()
