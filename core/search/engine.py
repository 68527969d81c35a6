"""Search over stored predictions: a vector cache kept in memory and updated from SQL
as predictions land, exact search by default, an HNSW index past a size. One shard
per embedding space: a base model version and the adapters (model versions, issue
16) trained into its space.

The cache is read from SQL once, then incrementally: each refresh (at most every
``search_refresh_s``, on the next query) reads the ids of jobs finished since the
watermark minus ``search_catchup_s`` and loads only the ones it has not seen. The
overlap is there because ``jobs.finished_at`` is taken by the database's clock
before its transaction commits: a row committed late still lands inside the window.
(It is never a worker's clock: one 10 minutes fast once moved the watermark past
every later result.) No migration is needed: ``jobs.finished_at``
is indexed already. Jobs made only to embed a query (``params.search_query``) are
never loaded, so they are never results.

With an index directory the cache itself is saved there and memory-mapped, shared
by the host's processes (cached.py, sharing.py): a restart maps it and reads from SQL
only what finished after its watermark; a refresh appends to it for every process.

The HNSW index is saved (core/search/saved.py) and memory-mapped read-only, so a
restart maps it instead of rebuilding it and the API processes of a host share it.
A mapped index cannot take adds: rows it lacks go to a small in-memory ``delta`` index
searched beside it; both only propose candidates, re-scored exactly in float32, so
merging is a union. Past ``index_resave_rows`` delta rows, one process (under the
save lock) copies the saved index into memory, adds its delta, saves a new generation
and maps it; the others adopt the newer generation when their own delta is full.
Why not re-save on every add: at 1 M vectors a save writes ~0.5 GB; why not keep
everything in private memory: that is the ~0.5 GB per process the issue measured
(bench/search_restart.py prints both).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.precision import untagged
from core.search.ann import AnnConfig, AnnIndex
from core.search.cached import MIN_CAPACITY, CacheFiles, store_url
from core.search.saved import IndexStore, SavedIndex, rows_of
from core.search.shard import Codes, Shard
from core.search.sharing import SharedCache
from core.search.types import (
    SearchFilters,
    SearchHit,
    SearchStats,
    at_micros,
    epoch,
    hit_of,
    is_search_query,
    micros,
)
from core.store import vectors
from core.store.versions import get_version

log = logging.getLogger(__name__)

PAGE = 2000  # rows per SQL read while loading
TEXT_START = 160  # characters of a text or transcript kept in a hit


@dataclass(frozen=True)
class SearchConfig:
    ann_min: int = 100_000  # vectors of one version before an HNSW index is built
    ann: AnnConfig = AnnConfig()
    overfetch: float = 4.0  # candidates asked of the index: k * this / filter pass rate
    max_fetch: int = 4096
    refresh_s: float = 0.2  # at most this often, a query looks for new predictions
    catchup_s: float = 30.0  # re-read window behind the watermark (late commits, skew)
    background_build: bool = True  # False: build the index inside refresh (tests)
    index_dir: str | None = None  # where the index is saved and mapped; None: not saved
    index_resave_rows: int = 50_000  # delta rows beside a mapped index before a re-save

    @classmethod
    def from_settings(cls, s: Settings) -> SearchConfig:
        return cls(ann_min=s.search_ann_min, index_dir=s.search_index_path,
                   index_resave_rows=s.search_index_resave_rows,
                   ann=AnnConfig(connectivity=s.search_ann_connectivity,
                                 expansion_add=s.search_ann_expansion_add,
                                 expansion_search=s.search_ann_expansion_search),
                   overfetch=s.search_ann_overfetch, max_fetch=s.search_ann_max_fetch,
                   refresh_s=s.search_refresh_s, catchup_s=s.search_catchup_s)


class SearchEngine:
    """One per process (the API's Client holds it); thread-safe."""

    def __init__(self, sessions: sessionmaker[Session], cfg: SearchConfig | None = None):
        self.sessions, self.cfg = sessions, cfg or SearchConfig()
        self.spaces: dict[str, str] = {}  # model version -> its space (base model version)
        self.reset()
        # The saved vector cache (cached.py), beside the saved index; None: private.
        self.files = CacheFiles(self.cfg.index_dir, store_url(sessions)) \
            if self.cfg.index_dir else None
        self.shared = SharedCache(self)
        self.loaded_at = -math.inf  # time.monotonic() of the last refresh
        self.lock = threading.Lock()  # one refresh at a time
        self.builds: list[threading.Thread] = []
        self.store = IndexStore(self.cfg.index_dir) if self.cfg.index_dir else None

    def reset(self) -> None:
        """Forget every loaded row (first use, or the saved cache was replaced)."""
        self.shards: dict[str, Shard] = {}
        self.codes = {t: Codes() for t in ("modality", "task", "owner", "label", "version")}
        self.watermark: int | None = None  # the newest jobs.finished_at loaded, epoch µs
        # job id -> (finished_at µs, space, row; None: not a vector), inside the window
        self.recent: dict[str, tuple] = {}
        self.epoch: str | None = None  # the saved cache's generation this process maps

    # -- loading -------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> int:
        """Load predictions stored since the last refresh -> rows loaded."""
        if not force and time.monotonic() - self.loaded_at < self.cfg.refresh_s:
            return 0
        with self.lock:
            if not force and time.monotonic() - self.loaded_at < self.cfg.refresh_s:
                return 0  # another thread refreshed while this one waited
            started = time.monotonic()
            if self.files is not None and self.epoch is None and not self.files.writable():
                self.files = None
            if self.files is not None:
                try:
                    n = self.shared.refresh()
                except OSError as e:  # a full disk: this process keeps its own copy
                    log.warning("search: the saved vector cache in %s failed (%s); this "
                                "process keeps its own copy", self.files.dir, e)
                    self.files = None
                    self.reset()
                    n = self.load()
            else:
                n = self.load()
            self.loaded_at = started
            for shard in self.shards.values():
                self._index_new_rows(shard)
            return n

    def load(self) -> int:
        """Everything (the first time), else what finished since the watermark."""
        return self._load_all() if self.watermark is None else self._catch_up()

    def _load_all(self) -> int:
        """First load: every stored prediction, in pages ordered by (finished_at, id)."""
        total, after = 0, None
        with self.sessions() as s:
            while True:
                rows = vectors.vector_rows_after(session=s, after=after, limit=PAGE)
                if not rows:
                    break
                total += self._put_rows(s, rows)
                after = (rows[-1].finished_at, rows[-1].id)
        if total:
            log.info("search: %d stored vectors loaded", total)
        return total

    def _catch_up(self) -> int:
        """The ids finished inside the window, then the full rows of the unseen ones."""
        since = self.watermark - round(self.cfg.catchup_s * 1e6)
        with self.sessions() as s:
            ids = vectors.succeeded_since(session=s, since=at_micros(since))
            new = [r.id for r in ids
                   if self.recent.get(r.id, (None,))[0] != micros(r.finished_at)]
            total = 0
            for lo in range(0, len(new), PAGE):
                total += self._put_rows(s, vectors.vector_rows(
                    session=s, job_ids=new[lo:lo + PAGE]))
        # Forget what fell out of the window: it will not be read again.
        self.recent = {j: v for j, v in self.recent.items() if v[0] >= since}
        return total

    def space_of(self, version: str, session: Session | None = None) -> str:
        """The embedding space of a model version: an adapter's version
        (``name@sha256[:12]``, a model_versions row) is in its base model's space (it
        was trained into it); any other version is a space of its own. Precision tags
        ("/bf16", core/precision.py) are dropped: the same weights in any precision
        share one space."""
        if version in self.spaces:
            return self.spaces[version]
        name, _, digest = version.partition("@")
        space = untagged(version)
        if digest and len(digest) == 12:
            with (nullcontext(session) if session else self.sessions()) as s:
                row = get_version(session=s, name=name)
            if row is not None and row.adapter_sha256[:12] == digest:
                space = untagged(row.base_model)
        self.spaces[version] = space
        return space

    def _put_rows(self, session: Session, rows) -> int:
        added = 0
        for r in rows:
            fin = micros(r.finished_at)
            _, seen, row = self.recent.get(r.id, (None, None, None))
            self.recent[r.id] = (fin, None, None)
            if self.watermark is None or fin > self.watermark:
                self.watermark = fin
            if r.embedding is None or r.status != vectors.SUCCEEDED or is_search_query(r.params):
                continue
            vec = np.frombuffer(r.embedding, dtype="<f4")  # (D,)
            version = r.model_version or ""
            space = self.space_of(version, session)
            shard = self.shards.get(space)
            if shard is None:
                shard = self.shards[space] = self._new_shard(space, len(vec))
            if len(vec) != shard.dim:  # one space, one dimension: a bad row
                log.warning("search: job %s has a %d-d embedding, its space %s has %d",
                            r.id, len(vec), space, shard.dim)
                continue
            top = r.labels[0][0].strip().casefold() if r.labels else None
            c = self.codes
            old = row if seen == space else None  # loaded before: updated in place
            row = shard.put(r.id, vec, c["modality"].code(r.modality), c["task"].code(r.task),
                            c["owner"].code(r.owner), c["label"].code(top),
                            epoch(r.created_at), c["version"].code(version), fin, old)
            self.recent[r.id] = (fin, space, row)
            added += old is None
        return added

    def _new_shard(self, space: str, dim: int) -> Shard:
        if self.epoch is None:
            return Shard(space, dim)
        return Shard(space, dim, backing=self.files.backing(self.epoch, space, dim,
                                                            MIN_CAPACITY, create=True))

    def cache_of(self, shard: Shard) -> str | None:
        """The saved cache generation whose rows a saved index's keys can be."""
        return shard.backing.epoch if shard.backing is not None else None

    # -- the approximate index -------------------------------------------------------------------

    def _index_new_rows(self, shard: Shard) -> None:
        with shard.lock:
            if shard.ann is not None and shard.ann_rows < shard.n:
                rows = np.arange(shard.ann_rows, shard.n)
                self._add(shard, rows)
                shard.ann_rows = shard.n
                grown = shard.delta is not None and len(shard.delta) >= \
                    self.cfg.index_resave_rows
                if grown and self.store is not None and not shard.building \
                        and shard.resave_ok:
                    shard.building = True
                    self._start(self._resave, shard, "ann-resave")
                return
        if shard.ann is None and not shard.building and shard.n >= self.cfg.ann_min:
            if self.store is not None and not shard.tried_saved:
                shard.tried_saved = True  # in this refresh: seconds, even at 1 M vectors
                saved = self._load_saved(shard)
                if saved is not None:
                    self._adopt(shard, saved)
                    return
            shard.building = True
            if not self.cfg.background_build:
                self._build(shard)
                return
            self._start(self._build, shard, "ann-build")

    def _start(self, target, shard: Shard, name: str) -> None:
        t = threading.Thread(target=target, args=(shard,), daemon=True,
                             name=f"{name}-{shard.version[:20]}")
        self.builds.append(t)
        t.start()

    def _add(self, shard: Shard, rows: np.ndarray) -> None:
        """New rows into the index (under shard.lock): the built one, or beside a
        mapped one, the delta."""
        if shard.ann.mutable:
            shard.ann.add(rows, shard.vecs[rows])
            return
        if shard.delta is None:
            shard.delta = AnnIndex(shard.dim, self.cfg.ann)
        shard.delta.add(rows, shard.vecs[rows])

    def _build(self, shard: Shard) -> None:
        """Index rows [:n0] outside any lock (minutes at 1 M), then the rows added
        meanwhile under the shard's lock, and hand the index over. With a store: under
        its lock (one process builds; the others wait, then map what it saved), saved,
        then mapped in place of the private copy."""
        try:
            if self.store is None or not self.store.writable():
                idx, n0 = self._build_rows(shard)
                with shard.lock:
                    rows = np.arange(n0, shard.n)
                    idx.add(rows, shard.vecs[rows])
                    shard.ann, shard.ann_rows = idx, shard.n
                return
            idx = None
            with self.store.locked(shard.version):
                saved = self._load_saved(shard)  # saved by another process meanwhile?
                if saved is None:
                    idx, n0 = self._build_rows(shard)
                    t0 = time.monotonic()
                    try:
                        self.store.save(shard.version, idx.index, shard.ids_of(0, n0),
                                        self.cfg.ann, cache=self.cache_of(shard))
                        log.info("search: HNSW index of %d vectors saved to %s in %.1f s",
                                 n0, self.store.dir, time.monotonic() - t0)
                        saved = self._load_saved(shard)
                    except OSError as e:  # a full or read-only disk: keep it in memory
                        log.warning("search: could not save the HNSW index in %s (%s); "
                                    "this process keeps its own copy", self.store.dir, e)
            if saved is None and idx is not None:
                with shard.lock:
                    rows = np.arange(n0, shard.n)
                    idx.add(rows, shard.vecs[rows])
                    shard.ann, shard.ann_rows = idx, shard.n
                return
            if saved is None:
                raise RuntimeError("the saved index could not be mapped")
            del idx
            self._adopt(shard, saved)
        except Exception:  # exact search goes on; the next refresh tries again
            log.exception("search: building the HNSW index failed")
        finally:
            shard.building = False

    def _build_rows(self, shard: Shard) -> tuple[AnnIndex, int]:
        t0 = time.monotonic()
        n0, vecs = shard.n, shard.vecs
        idx = AnnIndex(shard.dim, self.cfg.ann)
        idx.add(np.arange(n0), vecs[:n0])
        log.info("search: HNSW index of %d vectors (version %s) built in %.1f s",
                 n0, shard.version, time.monotonic() - t0)
        return idx, n0

    def _load_saved(self, shard: Shard) -> SavedIndex | None:
        return self.store.load(shard.version, shard.dim, self.cfg.ann,
                               cache=self.cache_of(shard))

    def _adopt(self, shard: Shard, saved: SavedIndex) -> None:
        """Search through a mapped index: each saved key mapped to this process's row,
        and the rows it lacks (loaded later, or by a late commit) indexed in the delta."""
        t0 = time.monotonic()
        if saved.ids is None:  # its keys are the rows of the saved cache this maps
            self._adopt_rows(shard, saved)
            log.info("search: mapped the saved HNSW index of %s (generation %d, %d vectors; "
                     "%d more in memory) in %.2f s", shard.version, saved.meta.generation,
                     saved.meta.count, len(shard.delta), time.monotonic() - t0)
            return
        n = shard.n
        row_of = {j: i for i, j in enumerate(shard.ids_of(0, n))}  # a temporary map
        rows = rows_of(saved, row_of)  # (count,) this process's rows
        del row_of
        rows[rows >= n] = -1  # appended meanwhile: they go to the delta below instead
        covered = np.zeros(n, bool)
        covered[rows[rows >= 0]] = True
        delta = AnnIndex(shard.dim, self.cfg.ann)
        missing = np.flatnonzero(~covered)
        delta.add(missing, shard.vecs[missing])
        same = len(rows) == n and bool(np.array_equal(rows, np.arange(n)))
        base = AnnIndex(shard.dim, self.cfg.ann, index=saved.index,
                        rows=None if same else rows)
        with shard.lock:
            extra = np.arange(n, shard.n)  # loaded while this ran
            delta.add(extra, shard.vecs[extra])
            # A search that read the old ``ann`` and the new ``delta`` (no lock on the
            # read side) only misses or repeats candidates; rows are de-duplicated.
            shard.delta, shard.ann = delta, base
            shard.ann_rows, shard.saved = shard.n, saved.meta
        log.info("search: mapped the saved HNSW index of %s (generation %d, %d vectors; "
                 "%d more in memory) in %.2f s", shard.version, saved.meta.generation,
                 saved.meta.count, len(delta), time.monotonic() - t0)

    def _adopt_rows(self, shard: Shard, saved: SavedIndex) -> None:
        """Keys are rows: the delta indexes the rows past the saved count."""
        count = saved.meta.count
        base = AnnIndex(shard.dim, self.cfg.ann, index=saved.index)
        delta = AnnIndex(shard.dim, self.cfg.ann)
        with shard.lock:
            extra = np.arange(count, shard.n)
            delta.add(extra, shard.vecs[extra])
            shard.delta, shard.ann = delta, base
            # Past n: rows another process appended and indexed, not loaded here yet
            # (a search ignores keys >= its n); they are not indexed twice.
            shard.ann_rows, shard.saved = max(shard.n, count), saved.meta

    def _resave(self, shard: Shard) -> None:
        """Fold the delta into a new saved generation (or adopt a newer one that another
        process saved), then map it: the delta's private memory stays bounded."""
        try:
            with self.store.locked(shard.version):
                if self.store.generation(shard.version) != shard.saved.generation:
                    saved = self._load_saved(shard)
                else:
                    self._save_merged(shard)
                    saved = self._load_saved(shard)
            if saved is not None:
                self._adopt(shard, saved)
        except Exception:  # the delta keeps growing in memory; no retry every refresh
            shard.resave_ok = False
            log.exception("search: re-saving the HNSW index failed; this process keeps "
                          "new rows in memory from now on")
        finally:
            shard.building = False

    def _save_merged(self, shard: Shard) -> None:
        t0 = time.monotonic()
        meta = shard.saved
        if meta.cache and meta.cache == self.cache_of(shard):  # keys are rows
            with shard.lock:
                hi = shard.ann_rows
            rows = np.arange(meta.count, hi)
            idx = self.store.copy(meta)
            idx.expansion_add = self.cfg.ann.expansion_add
            idx.add(rows.astype(np.uint64), shard.vecs[rows], threads=self.cfg.ann.threads)
            self.store.save(shard.version, idx, shard.ids_of(0, hi), self.cfg.ann,
                            cache=meta.cache)
            log.info("search: %d delta rows folded into the saved index of %s in %.1f s",
                     len(rows), shard.version, time.monotonic() - t0)
            return
        ids = self.store.ids(meta)
        known = set(ids)
        with shard.lock:
            drows = np.sort(np.asarray(shard.delta.index.keys, np.int64))
        drows = np.array([r for r in drows if shard.job_id(r) not in known], np.int64)
        idx = self.store.copy(meta)  # a private, writable copy of the saved index
        idx.expansion_add = self.cfg.ann.expansion_add  # not kept in the file
        idx.add(np.arange(meta.count, meta.count + len(drows), dtype=np.uint64),
                shard.vecs[drows], threads=self.cfg.ann.threads)
        ids += [shard.job_id(r) for r in drows]
        self.store.save(shard.version, idx, ids, self.cfg.ann)
        log.info("search: %d delta rows folded into the saved index of %s in %.1f s",
                 len(drows), shard.version, time.monotonic() - t0)

    # -- searching -------------------------------------------------------------------------------

    def search(self, q: np.ndarray, version: str, filters: SearchFilters,
               k: int = 10) -> tuple[list[SearchHit], SearchStats]:
        """The k stored predictions nearest to q (D,), best first, in the embedding
        space of ``version`` (the query's; ``filters.model_version`` narrows to one)."""
        self.refresh()
        space = self.space_of(filters.model_version or version)
        shard = self.shards.get(space)
        if shard is None or shard.n == 0 or len(q) != shard.dim:
            return [], SearchStats("exact", 0, 0, space)
        rows, scores, stats = self._nearest(shard, np.ascontiguousarray(q, np.float32),
                                            filters, k)
        return self._hits(shard, rows, scores), stats

    def _nearest(self, shard: Shard, q: np.ndarray, f: SearchFilters, k: int):
        n = shard.n  # a consistent prefix: the loader only appends past it
        mask = shard.mask(f, self.codes, n)
        passing = n if mask is None else int(mask.sum())
        ann = shard.ann
        # Exact when there is no index yet, or when the rows passing the filters are
        # few enough that scoring them all is as cheap as asking the graph.
        if ann is None or passing <= self.cfg.ann_min:
            rows, scores = shard.exact(q, k, n, mask)
            return rows, scores, SearchStats("exact", n, passing, shard.version)
        # The graph walk keeps expansion_search candidates anyway: re-scoring all of
        # them in float32 costs ~0.1 ms and undoes int8's mis-orderings of near ties.
        fetch = min(self.cfg.max_fetch, max(k, ann.cfg.expansion_search,
                                            math.ceil(k * self.cfg.overfetch * n / passing)))
        cand = ann.search(q, fetch)
        delta = shard.delta
        if delta is not None and len(delta):
            cand = np.unique(np.concatenate([cand, delta.search(q, min(fetch, len(delta)))]))
        cand = cand[cand < n]
        rows, scores = shard.rescore(cand, q, k, mask)
        if len(rows) >= min(k, passing):
            return rows, scores, SearchStats("ann", n, len(cand), shard.version)
        # Too few candidates passed the filters (a rare filter, or a query far from
        # the rows that pass it): exact over the passing rows, never a short answer.
        rows, scores = shard.exact(q, k, n, mask)
        return rows, scores, SearchStats("ann->exact", n, passing, shard.version)

    def _hits(self, shard: Shard, rows: np.ndarray, scores: np.ndarray) -> list[SearchHit]:
        """The hits' summaries, read from SQL in one query (texts are not cached)."""
        ids = [shard.job_id(int(r)) for r in rows]
        if not ids:
            return []
        with self.sessions() as s:
            found = vectors.hit_summaries(session=s, job_ids=ids, chars=TEXT_START)
        return [hit_of(found[i], float(sc)) for i, sc in zip(ids, scores, strict=True)
                if i in found]

    def stats(self) -> dict:
        """What the cache holds, per embedding space (for logs and bench/)."""
        return {v: {"vectors": s.n, "ann": None if s.ann is None else len(s.ann),
                    "delta": 0 if s.delta is None else len(s.delta),
                    "mapped": s.ann is not None and not s.ann.mutable,
                    "cache_mapped": s.backing is not None,
                    "cache_bytes": s.memory_bytes,
                    "ann_bytes": None if s.ann is None else s.ann.memory_bytes}
                for v, s in self.shards.items()}

