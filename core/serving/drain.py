"""The hand-off the serving threads share: many threads put, one thread takes all.

The group-commit writer, the model pipe's sender in the worker and the result
sender in the model process all work the same way: whatever queued up while the
consumer was busy goes out as one group (one transaction, one pipe message), and
nothing waits on a timer. Under load the groups grow by themselves; at light load
a lone item goes at once.

A thread that puts many items in a row (the writer resolving a group's futures,
whose callbacks submit each job to the model pipe and queue each outcome for the
writer) does so inside ``Drain.deferred()``: every drain it touched is woken once
at the end, instead of once per item, each wake-up being a context switch and a
GIL hand-off in the middle of the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")

# Per thread: the drains put to inside ``Drain.deferred()``, woken on leaving it
# (None outside it).
_deferred = threading.local()


class Drain(Generic[T]):
    """Items from any thread, taken all at once by one consumer thread."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._cv = threading.Condition()

    def put(self, item: T, *, wake: bool = True) -> None:
        """Queue ``item``. ``wake=False`` lets it wait for the next ``wake`` (or for the
        consumer to come back by itself): the model process collects a batch's results
        and sends them in one message when the batch is done."""
        held = getattr(_deferred, "drains", None)
        with self._cv:
            self._items.append(item)
            if wake and held is None:
                self._cv.notify()
        if wake and held is not None:
            held[id(self)] = self

    def put_many(self, items: list[T]) -> None:
        """Queue ``items`` together, with one wake-up."""
        if not items:
            return
        held = getattr(_deferred, "drains", None)
        with self._cv:
            self._items += items
            if held is None:
                self._cv.notify()
        if held is not None:
            held[id(self)] = self

    @staticmethod
    @contextmanager
    def deferred() -> Iterator[None]:
        """Puts made by this thread inside wake their consumers once, on leaving
        (nested: the outermost leaves)."""
        if getattr(_deferred, "drains", None) is not None:
            yield
            return
        _deferred.drains, _deferred.after = {}, []
        try:
            yield
        finally:
            try:
                while _deferred.after:  # what they put joins the one wake-up below
                    _deferred.after.pop(0)()
            finally:
                drains, _deferred.drains, _deferred.after = _deferred.drains, None, None
                for d in drains.values():
                    d.wake()

    @staticmethod
    def after(fn: Callable[[], None]) -> None:
        """Call ``fn`` as this thread leaves its outermost ``deferred()`` block, before
        the drains it touched are woken; at once outside one. The model pipe's receiver
        resolves a report's jobs inside one, so the results of a message that came back
        together are recorded together (core/serving/stages.py ``BatchRun``)."""
        later = getattr(_deferred, "after", None)
        if later is None:
            fn()
        else:
            later.append(fn)

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

    def take_nowait(self) -> list[T]:
        """Everything queued now, oldest first (may be empty)."""
        with self._cv:
            items, self._items = self._items, []
        return items
