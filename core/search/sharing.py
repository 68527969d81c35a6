"""How a SearchEngine keeps its vector cache in the host's saved, memory-mapped files
(the files themselves: cached.py): open them on the first refresh (or load from SQL
into a new generation of files), then on each refresh, under the host's cache lock,
take the rows other processes appended, catch up from SQL after the watermark, append,
and commit the header.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from core.search.cached import FORMAT, boot_id, check_sample, sample_ids, sample_rows
from core.search.shard import Shard
from core.search.types import micros
from core.store import vectors

log = logging.getLogger(__name__)

# The files are flushed to disk at most this often (seconds), not on every append: an
# msync of nine files per refresh would cost more than the refresh. Until then the
# page cache holds the new rows for every process of the host; after a crash (a new
# boot id), rows past the last flush are dropped and read again from SQL.
SYNC_S = 60.0


class SharedCache:
    def __init__(self, engine):
        self.e = engine
        self.committed: tuple | None = None  # the state last committed (or read)
        self.synced: dict[str, int] = {}  # space -> rows flushed to disk (the header's)
        self.synced_at = -SYNC_S  # time.monotonic() of this process's last flush

    def refresh(self) -> int:
        """Under the host's lock: the engine's rows in step with the files, then with
        SQL -> rows loaded from SQL."""
        e, files = self.e, self.e.files
        with files.locked():
            try:
                header = files.header()
            except (OSError, ValueError) as err:
                log.warning("search: ignoring the saved vector cache in %s (%s); it will "
                            "be rebuilt from SQL", files.dir, err)
                header = None
            if e.epoch is not None and (header is None or header.get("epoch") != e.epoch):
                log.info("search: the saved vector cache in %s was replaced; mapping the "
                         "new one", files.dir)
                e.reset()
            if e.epoch is not None:
                try:
                    self._sync(header)
                except (OSError, ValueError) as err:
                    log.warning("search: the saved vector cache in %s is unusable (%s); "
                                "rebuilding it from SQL", files.dir, err)
                    e.reset()
            if e.epoch is None and (header is None or not self._open(header)):
                e.reset()
                e.epoch = files.new_epoch()
                t0 = time.monotonic()
                n = e.load()
                self.commit(durable=True)
                files.drop_other_epochs(e.epoch)
                log.info("search: %d vectors loaded from SQL and saved to %s in %.1f s",
                         n, files.dir, time.monotonic() - t0)
                return n
            n = e.load()
            if self._state() != self.committed:
                self.commit(durable=time.monotonic() - self.synced_at >= SYNC_S)
            return n

    def _state(self) -> tuple:
        e = self.e
        return (e.epoch, e.watermark, tuple((v, s.n) for v, s in e.shards.items()),
                tuple(len(c.ids) for c in e.codes.values()))

    def _open(self, header: dict) -> bool:
        """Map a committed cache after checking it against SQL -> False if unusable."""
        e, files = self.e, self.e.files
        t0 = time.monotonic()
        try:
            ids = sample_ids(header)
        except (KeyError, TypeError, AttributeError) as err:
            log.warning("search: ignoring the saved vector cache in %s (%s); it will be "
                        "rebuilt from SQL", files.dir, err)
            return False
        with e.sessions() as s:  # a database error is raised, not taken for a bad file
            found = {r.id: (micros(r.finished_at), r.embedding) for r in
                     vectors.stored_rows(session=s, job_ids=ids)}
        try:
            epoch, shards, crashed = header["epoch"], {}, header["boot"] != boot_id()
            for space, sp in header["spaces"].items():
                b = files.backing(epoch, space, sp["dim"], sp["capacity"])
                n = sp["synced"] if crashed else sp["count"]
                shards[space] = Shard(space, sp["dim"], backing=b, n=n)
            check_sample(header, shards, found)
            watermark = header["watermark"]
            if crashed:  # the newest row kept, not the newest committed
                kept = [int(s.finished[:s.n].max()) for s in shards.values() if s.n]
                watermark = max(kept) if kept else None
                log.warning("search: the host restarted since the vector cache in %s was "
                            "last flushed: %d rows are read from SQL again", files.dir,
                            sum(sp["count"] - sp["synced"]
                                for sp in header["spaces"].values()))
            e.reset()
            for table, codes in e.codes.items():
                codes.adopt(header["codes"][table])
        except Exception as err:  # noqa: BLE001 - anything unusable means: rebuild
            log.warning("search: ignoring the saved vector cache in %s (%s); it will be "
                        "rebuilt from SQL", files.dir, err)
            e.reset()
            return False
        e.shards, e.epoch, e.watermark = shards, epoch, watermark
        for shard in shards.values():
            self._remember(shard, 0)
        self.synced = {v: s.n for v, s in shards.items()} if crashed else \
            {v: sp["synced"] for v, sp in header["spaces"].items()}
        self.committed = None if crashed else self._state()
        log.info("search: mapped the saved vector cache in %s (%d vectors) in %.2f s",
                 files.dir, sum(s.n for s in shards.values()), time.monotonic() - t0)
        return True

    def _remember(self, shard: Shard, lo: int) -> None:
        """Rows [lo, n) finished inside the catch-up window go into ``recent``, so the
        next catch-up does not load them again."""
        e = self.e
        if e.watermark is None:
            return
        since = e.watermark - round(e.cfg.catchup_s * 1e6)
        for r in (np.flatnonzero(shard.finished[lo:shard.n] >= since) + lo).tolist():
            e.recent[shard.job_id(r)] = (int(shard.finished[r]), shard.version, r)

    def _sync(self, header: dict) -> None:
        """Take what other processes committed since this one last looked."""
        e, files = self.e, self.e.files
        if header["watermark"] is not None and (e.watermark is None or
                                                header["watermark"] > e.watermark):
            e.watermark = header["watermark"]
        for table, codes in e.codes.items():
            codes.adopt(header["codes"][table])
        for space, sp in header["spaces"].items():
            shard = e.shards.get(space)
            if shard is not None and shard.n > sp["count"]:
                # Rows this process appended without committing (its refresh failed):
                # another process may have written over them since.
                raise ValueError(f"{shard.n - sp['count']} rows were never committed")
            self.synced[space] = sp["synced"]
            if shard is None:
                shard = e.shards[space] = Shard(space, sp["dim"], backing=files.backing(
                    e.epoch, space, sp["dim"], sp["capacity"]))
            elif sp["capacity"] > shard.backing.capacity:
                shard.attach(shard.backing.remap(sp["capacity"]))
            if sp["count"] > shard.n:
                lo, shard.n = shard.n, sp["count"]
                self._remember(shard, lo)
        self.committed = self._state()

    def commit(self, durable: bool) -> None:
        """Replace the header (the commit point); ``durable``: flush the rows to disk
        first (msync), and record them as ``synced``."""
        e = self.e
        if durable:
            for v, shard in e.shards.items():
                shard.backing.flush()
                self.synced[v] = shard.n
            self.synced_at = time.monotonic()
        e.files.commit({
            "format": FORMAT, "epoch": e.epoch, "watermark": e.watermark, "boot": boot_id(),
            "codes": {t: list(c.ids) for t, c in e.codes.items()},
            "spaces": {v: {"dim": s.dim, "count": s.n, "capacity": s.backing.capacity,
                           "synced": self.synced.get(v, 0)}
                       for v, s in e.shards.items()},
            "sample": {v: sample_rows(s) for v, s in e.shards.items()}}, durable)
        self.committed = self._state()
