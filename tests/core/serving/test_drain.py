"""The many-threads-to-one hand-off behind the writer and both ends of the model pipe."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from core.serving.drain import Drain


def test_take_returns_everything_queued_in_order():
    d: Drain[int] = Drain()
    for i in range(5):
        d.put(i)
    assert d.take() == [0, 1, 2, 3, 4]
    d.put(5)
    assert d.take() == [5]


def test_items_from_many_threads_all_arrive_once():
    d: Drain[int] = Drain()
    got: list[int] = []

    def consume():
        while len(got) < 1000:
            got.extend(d.take())

    t = threading.Thread(target=consume)
    t.start()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(d.put, range(1000)))
    t.join(30)
    assert sorted(got) == list(range(1000))


def test_a_quiet_put_waits_for_a_wake():
    """The model process queues a batch's results quietly and wakes its sender once
    the batch is done: one message per batch."""
    d: Drain[str] = Drain()
    taken: list[list[str]] = []
    t = threading.Thread(target=lambda: taken.append(d.take()), daemon=True)
    t.start()
    d.put("a", wake=False)
    d.put("b", wake=False)
    t.join(0.3)
    assert t.is_alive() and not taken  # nobody woke the consumer
    d.wake()
    t.join(30)
    assert taken == [["a", "b"]]


def test_puts_inside_deferred_wake_the_consumer_on_leaving():
    """The writer resolves a group's futures inside ``Drain.deferred()``: the model
    pipe's sender wakes once for the group's jobs, not once per job."""
    d: Drain[str] = Drain()
    taken: list[list[str]] = []
    t = threading.Thread(target=lambda: taken.append(d.take()), daemon=True)
    t.start()
    with Drain.deferred():
        d.put("a")
        with Drain.deferred():  # nested: only the outermost wakes
            d.put("b")
        t.join(0.3)
        assert t.is_alive() and not taken
        d.put("c")
    t.join(30)
    assert taken == [["a", "b", "c"]]
    d.put("d")  # outside: at once, as before
    assert d.take() == ["d"]
