"""The approximate index: an HNSW graph (usearch) over one model version's vectors.

usearch was chosen over faiss's IndexHNSWFlat after measuring both on the same
clustered 384-d data (bench/search.py --compare-faiss): similar recall and latency
at equal graph parameters, but usearch can keep its own copy of the vectors in int8
(a quarter of faiss's flat float32 copy: at 100 k, 81 MiB against 160 MiB, and
the graph built in half the time of float16, with the same recall), adds
incrementally from several threads, and is one small wheel. The index only
proposes candidates: they are re-scored against the float32 vectors of the cache,
so reported scores are exact cosines and int8 costs recall only at the candidate
boundary.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from usearch.index import Index


@dataclass(frozen=True)
class AnnConfig:
    connectivity: int = 16  # HNSW graph degree (M)
    expansion_add: int = 128  # candidate list while inserting (efConstruction)
    expansion_search: int = 1024  # candidate list while searching (ef), raised to the fetch
    threads: int = 0  # threads for bulk adds; 0 = all cores
    dtype: str = "i8"  # the index's own copy of the vectors (re-scored in float32)


class AnnIndex:
    """Keys are row numbers of the cache shard the index belongs to, or, for an index
    mapped from disk (core/search/saved.py), positions that ``rows`` maps to them."""

    def __init__(self, dim: int, cfg: AnnConfig, index: Index | None = None,
                 rows: np.ndarray | None = None):
        self.cfg = cfg
        self.index = index if index is not None else Index(
            ndim=dim, metric="ip", dtype=cfg.dtype, connectivity=cfg.connectivity,
            expansion_add=cfg.expansion_add, expansion_search=cfg.expansion_search)
        # A viewed index (a read-only memory map) cannot take adds: new rows go to a
        # small in-memory index beside it (the shard's ``delta``).
        self.mutable = index is None
        self.rows = rows  # (len,) int64: key -> the shard's row (-1: not loaded); None: same
        # usearch allows concurrent adds and searches, but not a search during the
        # index's own growth (reserve); one lock keeps it simple and adds are batched.
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def add(self, rows: np.ndarray, vecs: np.ndarray) -> None:
        """rows (n,) int64, vecs (n, D) float32 L2-normalised."""
        if len(rows) == 0:
            return
        with self.lock:
            self.index.add(rows.astype(np.uint64), vecs, threads=self.cfg.threads)

    def search(self, q: np.ndarray, fetch: int) -> np.ndarray:
        """q (D,) -> up to ``fetch`` candidate rows, nearest first (int64)."""
        with self.lock:
            self.index.expansion_search = max(self.cfg.expansion_search, fetch)
            m = self.index.search(q, fetch, threads=1)
        keys = np.asarray(m.keys, dtype=np.int64)
        if self.rows is None:
            return keys
        rows = self.rows[keys]
        return rows[rows >= 0]

    @property
    def memory_bytes(self) -> int:
        return int(self.index.memory_usage)
