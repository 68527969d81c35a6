"""The vector cache saved on disk and memory-mapped, so that a restarted API process
maps it instead of reading every stored prediction from SQL (minutes at 1 M), and the
API processes of one host share its pages (~1.6 GiB per million 384-d vectors, once
per host instead of once per process).

In ``MMQ_SEARCH_INDEX_DIR`` (beside the saved HNSW index, core/search/saved.py), in a
folder per database (``cache-<hash of the database URL, password hidden>``: processes
of one host on two stores never take each other's files), one generation (``epoch``)
of files:

    cache.json                    the header and commit point: format, epoch, the
                                  watermark (the newest jobs.finished_at loaded, the
                                  database's clock, epoch microseconds), the filter
                                  columns' string tables, per space its dimension, row
                                  count and capacity, and a sample of rows to check
                                  against SQL
    cache.<epoch>.<key>.vecs      float32 (capacity, D), rows [:count] valid
    cache.<epoch>.<key>.<column>  one file per filter column (shard.py COLUMNS), the
                                  job ids (S36) among them
    cache.lock                    fcntl.flock: one process reads SQL and appends at a
                                  time

Every searching process maps the files shared and writable. Whoever refreshes takes
the lock, re-reads the header (rows other processes appended become its own: one
row numbering per host, so the saved HNSW index's keys are these rows), reads from
SQL only what finished after the watermark (minus the catch-up window), writes the new
rows past ``count`` (growing the files in place: they are sparse), flushes, and
replaces the header (temp name + rename): the commit. A crash before the rename leaves
rows past ``count`` that the next writer overwrites.

SQL stays the truth. A header that is unreadable, of another format, or whose files
are short is ignored and the cache rebuilt from SQL under a new epoch (processes that
mapped the old one notice the new epoch and reload); so is one whose sampled rows
(spread over each space, and the newest) are not in the database with the same
finished_at and the same embedding bytes: a directory filled from another database,
or a database restored to an older state. Each host keeps its own directory; nothing
here compares one host's clock with another's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np

from core.search.saved import space_key
from core.search.shard import COLUMNS
from core.search.types import flocked, writable_dir

log = logging.getLogger(__name__)

FORMAT = 1
HEADER, LOCK = "cache.json", "cache.lock"
MIN_CAPACITY = 1024


class Backing:
    """The files of one space in one epoch, mapped shared (``arrays``)."""

    def __init__(self, prefix: Path, epoch: str, dim: int, capacity: int,
                 create: bool = False):
        self.prefix, self.epoch, self.dim, self.capacity = prefix, epoch, dim, capacity
        if create:
            for name, size in self._sizes(capacity).items():
                with open(self._path(name), "wb") as f:
                    f.truncate(size)  # sparse: zero pages cost no disk until written
        else:
            self.check()
        self.arrays = self._map()

    def _path(self, name: str) -> Path:
        return Path(f"{self.prefix}.{name}")

    def _sizes(self, cap: int) -> dict[str, int]:
        return {"vecs": cap * self.dim * 4} | {c: cap * np.dtype(t).itemsize
                                                for c, t in COLUMNS.items()}

    def check(self) -> None:
        """Every file as long as the header's capacity says (else: ValueError)."""
        for name, size in self._sizes(self.capacity).items():
            got = self._path(name).stat().st_size
            if got < size:
                raise ValueError(f"{self._path(name).name} has {got} bytes, needs {size}")

    def _map(self) -> dict[str, np.ndarray]:
        cap = self.capacity
        out = {"vecs": np.memmap(self._path("vecs"), np.float32, "r+", shape=(cap, self.dim))}
        for c, t in COLUMNS.items():
            out[c] = np.memmap(self._path(c), np.dtype(t), "r+", shape=(cap,))
        return out

    def grow(self, capacity: int) -> dict[str, np.ndarray]:
        """Lengthen the files (under the cache lock) and map them again."""
        for name, size in self._sizes(capacity).items():
            os.truncate(self._path(name), size)
        self.capacity = capacity
        self.arrays = self._map()
        return self.arrays

    def remap(self, capacity: int) -> Backing:
        """The same files at the capacity another process grew them to."""
        return Backing(self.prefix, self.epoch, self.dim, capacity)

    def flush(self) -> None:
        for a in self.arrays.values():
            a.flush()


class CacheFiles:
    """The saved vector cache of one store on one host."""

    def __init__(self, index_dir: str | os.PathLike, store_url: str = ""):
        key = hashlib.sha256(store_url.encode()).hexdigest()[:12]
        self.dir = Path(index_dir) / f"cache-{key}"

    def locked(self):
        return flocked(self.dir / LOCK)

    def writable(self) -> bool:
        return writable_dir(self.dir, "vector cache")

    def header(self) -> dict | None:
        """The committed header, None if there is none; ValueError if unusable."""
        path = self.dir / HEADER
        if not path.exists():
            return None
        h = json.loads(path.read_text())
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise ValueError(f"format {h.get('format') if isinstance(h, dict) else h!r}, "
                             f"this process reads {FORMAT}")
        return h

    def backing(self, epoch: str, space: str, dim: int, capacity: int,
                create: bool = False) -> Backing:
        prefix = self.dir / f"cache.{epoch}.{space_key(space)}"
        return Backing(prefix, epoch, dim, max(MIN_CAPACITY, capacity), create=create)

    @staticmethod
    def new_epoch() -> str:
        return uuid.uuid4().hex[:12]

    def commit(self, header: dict, durable: bool) -> None:
        """Replace the header. ``durable``: the data files were flushed to disk first,
        and the header is too (else the page cache has it: every process of the host
        sees it, and after a crash the rows past ``synced`` are read from SQL again)."""
        path = self.dir / HEADER
        tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(header, f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def drop_other_epochs(self, epoch: str) -> None:
        """Delete older generations' files (under the lock; a process that still maps
        one keeps its pages until it notices the new epoch)."""
        for p in self.dir.glob("cache.*"):
            parts = p.name.split(".")
            if (len(parts) == 4 and parts[1] != epoch) or parts[-1] == "tmp":
                p.unlink(missing_ok=True)


def store_url(sessions) -> str:
    """The database's URL, password hidden ("" without one): whose cache files."""
    bind = sessions.kw.get("bind") if sessions is not None else None
    return "" if bind is None else bind.url.render_as_string(hide_password=True)


def boot_id() -> str:
    """This boot of the host: page-cache writes not flushed before it may be lost."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def sample_rows(shard, k: int = 4) -> list[list]:
    """[job id, finished µs, row] of k rows spread over a shard, and its newest."""
    if shard.n == 0:
        return []
    rows = sorted({*np.linspace(0, shard.n - 1, k).astype(int).tolist(), shard.n - 1})
    return [[shard.job_id(r), int(shard.finished[r]), r] for r in rows]


def check_sample(header: dict, shards: dict, found: dict) -> None:
    """The header's sampled rows against SQL (``found``: job id -> (finished µs,
    embedding bytes)): ValueError on the first difference."""
    for space, rows in header["sample"].items():
        shard = shards[space]
        for job_id, fin, row in rows:
            if row >= shard.n:  # past the rows kept after a crash: not used
                continue
            if shard.job_id(row) != job_id:
                raise ValueError(f"sampled row {row} is not job {job_id}")
            got = found.get(job_id)
            if got is None:
                raise ValueError(f"job {job_id} is not a stored result in this database")
            if got[0] != fin or got[1] != shard.vecs[row].astype("<f4").tobytes():
                raise ValueError(f"job {job_id} differs in this database")


def sample_ids(header: dict) -> list[str]:
    return [r[0] for rows in header["sample"].values() for r in rows]
