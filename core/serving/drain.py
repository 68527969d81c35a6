"""The hand-off the serving threads share: many threads put, one thread takes all.

The group-commit writer, the model pipe's sender in the worker and the result
sender in the model process all work the same way: whatever queued up while the
consumer was busy goes out as one group (one transaction, one pipe message), and
nothing waits on a timer. Under load the groups grow by themselves; at light load
a lone item goes at once.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Drain(Generic[T]):
    """Items from any thread, taken all at once by one consumer thread."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._cv = threading.Condition()

    def put(self, item: T, *, wake: bool = True) -> None:
        """Queue ``item``. ``wake=False`` lets it wait for the next ``wake`` (or for the
        consumer to come back by itself): the model process collects a batch's results
        and sends them in one message when the batch is done."""
        with self._cv:
            self._items.append(item)
            if wake:
                self._cv.notify()

    def wake(self) -> None:
        """Let the consumer take what has queued up."""
        with self._cv:
            self._cv.notify()

    def take(self) -> list[T]:
        """Block until something is queued -> everything queued, oldest first."""
        with self._cv:
            while not self._items:
                self._cv.wait()
            items, self._items = self._items, []
        return items
