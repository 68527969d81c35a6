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
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, timedelta

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.precision import untagged
from core.search.ann import AnnConfig, AnnIndex
from core.search.shard import Codes, Shard
from core.search.types import SearchFilters, SearchHit, SearchStats, epoch, is_search_query
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

    @classmethod
    def from_settings(cls, s: Settings) -> SearchConfig:
        return cls(ann_min=s.search_ann_min,
                   ann=AnnConfig(connectivity=s.search_ann_connectivity,
                                 expansion_add=s.search_ann_expansion_add,
                                 expansion_search=s.search_ann_expansion_search),
                   overfetch=s.search_ann_overfetch, max_fetch=s.search_ann_max_fetch,
                   refresh_s=s.search_refresh_s, catchup_s=s.search_catchup_s)


class SearchEngine:
    """One per process (the API's Client holds it); thread-safe."""

    def __init__(self, sessions: sessionmaker[Session], cfg: SearchConfig | None = None):
        self.sessions, self.cfg = sessions, cfg or SearchConfig()
        self.shards: dict[str, Shard] = {}
        self.codes = {t: Codes() for t in ("modality", "task", "owner", "label", "version")}
        self.spaces: dict[str, str] = {}  # model version -> its space (base model version)
        self.watermark = None  # the newest jobs.finished_at loaded (the DB's own type)
        self.recent: dict[str, object] = {}  # job id -> finished_at, inside the window
        self.loaded_at = -math.inf  # time.monotonic() of the last refresh
        self.lock = threading.Lock()  # one refresh at a time
        self.builds: list[threading.Thread] = []

    # -- loading -------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> int:
        """Load predictions stored since the last refresh -> rows loaded."""
        if not force and time.monotonic() - self.loaded_at < self.cfg.refresh_s:
            return 0
        with self.lock:
            if not force and time.monotonic() - self.loaded_at < self.cfg.refresh_s:
                return 0  # another thread refreshed while this one waited
            started = time.monotonic()
            n = self._load_all() if self.watermark is None else self._catch_up()
            self.loaded_at = started
            for shard in self.shards.values():
                self._index_new_rows(shard)
            return n

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
        since = self.watermark - timedelta(seconds=self.cfg.catchup_s)
        with self.sessions() as s:
            ids = vectors.succeeded_since(session=s, since=since)
            new = [r.id for r in ids if self.recent.get(r.id) != r.finished_at]
            total = 0
            for lo in range(0, len(new), PAGE):
                total += self._put_rows(s, vectors.vector_rows(
                    session=s, job_ids=new[lo:lo + PAGE]))
        # Forget what fell out of the window: it will not be read again.
        self.recent = {j: at for j, at in self.recent.items() if at >= since}
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
            self.recent[r.id] = r.finished_at
            if self.watermark is None or r.finished_at > self.watermark:
                self.watermark = r.finished_at
            if r.embedding is None or is_search_query(r.params):
                continue
            vec = np.frombuffer(r.embedding, dtype="<f4")  # (D,)
            version = r.model_version or ""
            space = self.space_of(version, session)
            shard = self.shards.get(space)
            if shard is None:
                shard = self.shards[space] = Shard(space, len(vec))
            if len(vec) != shard.dim:  # one space, one dimension: a bad row
                log.warning("search: job %s has a %d-d embedding, its space %s has %d",
                            r.id, len(vec), space, shard.dim)
                continue
            top = r.labels[0][0].strip().casefold() if r.labels else None
            c = self.codes
            row = shard.put(r.id, vec, c["modality"].code(r.modality), c["task"].code(r.task),
                            c["owner"].code(r.owner), c["label"].code(top),
                            epoch(r.created_at), c["version"].code(version))
            added += row is not None
        return added

    # -- the approximate index -------------------------------------------------------------------

    def _index_new_rows(self, shard: Shard) -> None:
        with shard.lock:
            if shard.ann is not None and shard.ann_rows < shard.n:
                rows = np.arange(shard.ann_rows, shard.n)
                shard.ann.add(rows, shard.vecs[rows])
                shard.ann_rows = shard.n
                return
        if shard.ann is None and not shard.building and shard.n >= self.cfg.ann_min:
            shard.building = True
            if not self.cfg.background_build:
                self._build(shard)
                return
            t = threading.Thread(target=self._build, args=(shard,), daemon=True,
                                 name=f"ann-build-{shard.version[:20]}")
            self.builds.append(t)
            t.start()

    def _build(self, shard: Shard) -> None:
        """Index rows [:n0] outside any lock (minutes at 1 M), then the rows added
        meanwhile under the shard's lock, and hand the index over."""
        try:
            t0 = time.monotonic()
            n0, vecs = shard.n, shard.vecs
            idx = AnnIndex(shard.dim, self.cfg.ann)
            idx.add(np.arange(n0), vecs[:n0])
            with shard.lock:
                rows = np.arange(n0, shard.n)
                idx.add(rows, shard.vecs[rows])
                shard.ann, shard.ann_rows = idx, shard.n
            log.info("search: HNSW index of %d vectors (version %s) built in %.1f s",
                     shard.ann_rows, shard.version, time.monotonic() - t0)
        except Exception:  # exact search goes on; the next refresh tries again
            log.exception("search: building the HNSW index failed")
        finally:
            shard.building = False

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
        ids = [shard.job_ids[int(r)] for r in rows]
        if not ids:
            return []
        with self.sessions() as s:
            found = vectors.hit_summaries(session=s, job_ids=ids, chars=TEXT_START)
        return [hit_of(found[i], float(sc)) for i, sc in zip(ids, scores, strict=True)
                if i in found]

    def stats(self) -> dict:
        """What the cache holds, per embedding space (for logs and bench/)."""
        return {v: {"vectors": s.n, "ann": None if s.ann is None else len(s.ann),
                    "cache_bytes": s.memory_bytes,
                    "ann_bytes": None if s.ann is None else s.ann.memory_bytes}
                for v, s in self.shards.items()}


def hit_of(r, score: float) -> SearchHit:
    label, label_score = (r.labels[0][0], float(r.labels[0][1])) if r.labels else (None, None)
    text = r.transcript if r.modality == "audio" else r.text
    parts = []
    if label is not None:
        parts.append(f"{label} ({label_score:.2f})")
    if text:
        cut = text[:80].strip()
        parts.append(f"“{cut}{'…' if len(text) > 80 else ''}”")
    summary = " · ".join(parts) or f"{r.modality} {r.task}"
    created = r.created_at
    return SearchHit(id=r.id, modality=r.modality, task=r.task, score=round(score, 6),
                     summary=summary, model_version=r.model_version,
                     created_at=None if created is None else _iso(created),
                     label=label, label_score=label_score, text=text or None, owner=r.owner)


def _iso(d) -> str:
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).isoformat()
