"""A bounded, least-recently-used cache safe from several threads: the model's label
embeddings and the speech tower's label priors (a text worker's batcher runs two
forwards at once)."""

from __future__ import annotations

import threading
from collections import OrderedDict


class LruCache(OrderedDict):
    """A dict bounded to ``capacity`` entries; ``get`` and ``put`` mark an entry used.
    Safe from several threads (the batcher's streams run forwards at once)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
            return default

    def put(self, key, value) -> None:
        with self._lock:
            self[key] = value
            self.move_to_end(key)
            while len(self) > self.capacity:
                self.popitem(last=False)
