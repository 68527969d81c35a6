"""One embedding space's stored vectors in memory, with the columns filters need, and
exact search over them in chunks.

Rows only grow (a prediction upserted again, by a redelivered job, is updated in
place), so a search that read ``n`` once sees a consistent prefix of the arrays
while the loader appends beyond it.
"""

from __future__ import annotations

import threading

import numpy as np

from core.search.ann import AnnIndex
from core.search.saved import SavedMeta
from core.search.types import SearchFilters, epoch

# Rows per matmul: 65,536 x 384 float32 is 96 MiB, a chunk's scores 256 KiB; bigger
# chunks gained nothing in bench/search.py and cost a temporary of their size.
CHUNK = 65_536
NONE = -1  # the code of a missing owner / label


def dot(block: np.ndarray, q: np.ndarray) -> np.ndarray:
    """block (m, D) @ q (D,) -> (m,). einsum, not ``@``: ``@`` is OpenBLAS's threaded
    gemv, which on a machine whose cores are busy (the API beside workers) ran 7x
    slower than einsum's single-threaded loop (15 ms against 2 ms for 20,000 rows);
    the product is bound by memory bandwidth, so one thread loses little."""
    return np.einsum("nd,d->n", block, q)


class Codes:
    """Strings (owners, labels, modalities, tasks) as small integers, so a filter is
    one vectorised comparison over a column."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def code(self, value: str | None) -> int:
        if value is None:
            return NONE
        return self.ids.setdefault(value, len(self.ids))

    def adopt(self, table: list[str]) -> None:
        """Take the codes of a saved cache (theirs extend ours, never disagree)."""
        mine = list(self.ids)
        if table[:len(mine)] != mine:
            raise ValueError("the saved cache's codes disagree with this process's")
        for value in table[len(mine):]:
            self.code(value)

    def find(self, value: str | None) -> int | None:
        """The code of a value, None if no row has it (then nothing can match)."""
        return NONE if value is None else self.ids.get(value)


# The per-row columns beside the vectors: name -> dtype. Contiguous arrays (a filter is
# one vectorised comparison over a column); in a saved cache (core/search/cached.py)
# each is a file of its own, grown in place.
COLUMNS = {"modality": "<i2", "task": "<i2", "owner": "<i4",
           "label": "<i4",  # the top label's code, NONE if none
           "versions": "<i4",  # predictions.model_version's code
           "created": "<f8",  # jobs.created_at, epoch seconds
           "finished": "<i8",  # jobs.finished_at, epoch microseconds (the database's clock)
           "ids": "S36"}  # the job id (a UUID)


class Shard:
    """The vectors of one embedding space (a base model version, with the adapters
    trained on it): growable arrays, capacity grown on demand. Private numpy arrays,
    or with a ``backing`` (core/search/cached.py) files mapped shared by the host's
    processes."""

    def __init__(self, version: str, dim: int, capacity: int = 1024, backing=None,
                 n: int = 0):
        self.version, self.dim, self.n = version, dim, n  # version: the space's base model
        self.backing = backing
        if backing is None:
            self._set({"vecs": np.zeros((capacity, dim), np.float32)}  # (cap, D)
                      | {c: np.zeros(capacity, t) for c, t in COLUMNS.items()})
        else:
            self._set(backing.arrays)
        self.ann: AnnIndex | None = None  # set once a background build has finished
        self.delta: AnnIndex | None = None  # rows a mapped (read-only) ``ann`` lacks
        self.ann_rows = 0  # rows [:ann_rows] are in the index (ann, or delta)
        self.saved: SavedMeta | None = None  # the saved generation ``ann`` maps
        self.tried_saved = False  # the first refresh past ann_min looked for a saved index
        self.building = False  # a build or re-save thread runs
        self.resave_ok = True  # False after a re-save failed (the disk): not retried
        self.lock = threading.Lock()  # appends, and the hand-over of a built index

    def _set(self, arrays: dict[str, np.ndarray]) -> None:
        # A search holding the old arrays keeps a valid (shorter) copy or mapping.
        self.vecs = arrays["vecs"]  # (cap, D), rows [:n] valid
        for c in COLUMNS:
            setattr(self, c, arrays[c])  # (cap,)

    # -- writing (the loader, under the cache's lock) ----------------------------------------

    def _grow(self, need: int) -> None:
        cap = len(self.vecs)
        if need <= cap:
            return
        if self.backing is not None:  # files grow in place (sparse), then are re-mapped
            self._set(self.backing.grow(max(need, cap + cap // 2)))
            return
        new = max(need, cap * 2)
        arrays = {}
        for name in ("vecs", *COLUMNS):
            old = getattr(self, name)
            arr = np.zeros((new, *old.shape[1:]), old.dtype)
            arr[:cap] = old
            arrays[name] = arr
        self._set(arrays)

    def attach(self, backing) -> None:
        """Map the backing's (grown) files again: another process grew them."""
        self.backing = backing
        self._set(backing.arrays)

    def put(self, job_id: str, vec: np.ndarray, modality: int, task: int, owner: int,
            label: int, created: float, version: int = 0, finished: int = 0,
            row: int | None = None) -> int:
        """Append a row, or with ``row`` update that row in place (a job loaded again)
        -> its row."""
        new = row is None
        if new:
            row = self.n
            self._grow(row + 1)
        self.vecs[row] = vec
        self.modality[row], self.task[row], self.owner[row] = modality, task, owner
        self.label[row], self.created[row], self.versions[row] = label, created, version
        self.finished[row], self.ids[row] = finished, job_id.encode()
        if new:
            self.n = row + 1  # published last: a reader never sees a half-written row
        return row

    def extend(self, job_ids: list[str], vecs: np.ndarray, modality: np.ndarray,
               task: np.ndarray, owner: np.ndarray, label: np.ndarray,
               created: np.ndarray, version: int = 0, finished: np.ndarray | int = 0) -> None:
        """Append many new rows at once: vecs (m, D), the columns (m,) (a bulk load)."""
        lo, m = self.n, len(job_ids)
        self._grow(lo + m)
        hi = lo + m
        self.vecs[lo:hi], self.modality[lo:hi], self.task[lo:hi] = vecs, modality, task
        self.owner[lo:hi], self.label[lo:hi], self.created[lo:hi] = owner, label, created
        self.versions[lo:hi], self.finished[lo:hi] = version, finished
        self.ids[lo:hi] = np.array(job_ids, "S36")
        self.n = hi

    def job_id(self, row: int) -> str:
        return self.ids[row].decode()

    def ids_of(self, lo: int, hi: int) -> list[str]:
        return [b.decode() for b in self.ids[lo:hi]]

    # -- reading -----------------------------------------------------------------------------

    def mask(self, f: SearchFilters, codes: dict[str, Codes], n: int) -> np.ndarray | None:
        """(n,) bool of rows passing the filters; None when nothing is filtered."""
        if not f.restricts_rows():
            return None
        m = np.ones(n, bool)
        for value, col, table in ((f.modality, self.modality, "modality"),
                                  (f.task, self.task, "task"),
                                  (f.owner, self.owner, "owner"),
                                  (f.label and f.label.strip().casefold(), self.label,
                                   "label"),
                                  (f.model_version, self.versions, "version")):
            if value is None:
                continue
            code = codes[table].find(value)
            if code is None:  # no stored row has it
                return np.zeros(n, bool)
            m &= col[:n] == code
        if f.created_since is not None:
            m &= self.created[:n] >= epoch(f.created_since)
        if f.created_until is not None:
            m &= self.created[:n] < epoch(f.created_until)
        return m

    def exact(self, q: np.ndarray, k: int, n: int,
              mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top k of rows [:n] by inner product with q (D,) -> (rows, scores), best first."""
        if mask is not None:
            rows = np.flatnonzero(mask)
            # Few pass: score only those. A gather copies its rows, so it pays only when
            # it skips most of them (bench/search.py: a third passing was 2x slower
            # gathered than masked).
            if len(rows) < n // 8:
                return self._top(rows, self._scores_of(rows, q), k)
        best_r, best_s = [], []
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            s = dot(self.vecs[lo:hi], q)  # (hi-lo,)
            if mask is not None:
                s = np.where(mask[lo:hi], s, -np.inf)
            r, sc = self._top(np.arange(lo, hi), s, k)
            best_r.append(r)
            best_s.append(sc)
        if not best_r:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, scores = self._top(np.concatenate(best_r), np.concatenate(best_s), k)
        keep = np.isfinite(scores)  # rows masked out score -inf
        return rows[keep], scores[keep]

    def _scores_of(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), np.float32)
        for lo in range(0, len(rows), CHUNK):
            out[lo:lo + CHUNK] = dot(self.vecs[rows[lo:lo + CHUNK]], q)  # (chunk,)
        return out

    @staticmethod
    def _top(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(scores) > k:
            part = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[part], scores[part]
        order = np.argsort(-scores, kind="stable")
        return rows[order], scores[order]

    def rescore(self, rows: np.ndarray, q: np.ndarray, k: int,
                mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the index, re-scored exactly against the float32 rows and
        filtered -> top k (rows, scores)."""
        if mask is not None:
            rows = rows[mask[rows]]
        return self._top(rows, self._scores_of(rows, q), k)

    @property
    def memory_bytes(self) -> int:
        return int(sum(getattr(self, a).nbytes for a in ("vecs", *COLUMNS)))
