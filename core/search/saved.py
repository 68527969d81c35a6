"""The HNSW index saved to disk, so that a restarted API process maps it in seconds
instead of rebuilding it (671 s at 1 M vectors), and the API processes of one host share
its pages (a read-only memory map: the page cache holds one copy).

Per embedding space, in ``MMQ_SEARCH_INDEX_DIR``, three files of one generation:

    <key>.<gen>.usearch   the usearch index; its keys are positions in the ids file
    <key>.<gen>.ids       the job ids, one a line: key i is the job on line i
    <key>.json            the commit point: which generation, its sizes and CRC-32s,
                          the space, dimension and index parameters

A writer holds ``<key>.lock`` (fcntl.flock, one writer per host at a time), writes the
two data files under new names, then replaces the JSON (temp name + rename), then
deletes older generations (a process that mapped one keeps its pages: unlinking does
not unmap). A reader only follows the JSON, and uses a generation only if its sizes,
checksums and parameters match: anything else is logged and ignored (the caller builds
a new index), never a crash and never wrong rows.

Keys are positions in the ids file, not the reader's row numbers: two processes load
the same predictions in different orders (a late commit lands at the end of one
process's cache and in finished_at order in a fresh one), so a reader maps each saved
job id to its own row (``SavedIndex.rows``; -1: a job it has not loaded yet). Except
when the index was built over the host's saved vector cache (core/search/cached.py):
then every process of the host numbers rows alike, the JSON names that cache's
generation (``cache``), and a process mapping the same generation uses the keys as
rows without reading the ids (a million strings each).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from usearch.index import Index

from core.search.ann import AnnConfig
from core.search.types import flocked, writable_dir

log = logging.getLogger(__name__)

FORMAT = 1
CRC_BLOCK = 16 * 2**20


@dataclass(frozen=True)
class SavedMeta:
    """The JSON sidecar of one saved generation."""

    format: int
    space: str  # the embedding space (its base model version)
    dim: int
    dtype: str
    connectivity: int
    generation: int
    count: int  # vectors in the index = lines in the ids file
    index_bytes: int
    index_crc: int
    ids_bytes: int
    ids_crc: int
    # The saved vector cache generation (core/search/cached.py) whose rows the keys
    # are ("": keys are only positions in the ids file).
    cache: str = ""


@dataclass
class SavedIndex:
    """A generation mapped by this process."""

    meta: SavedMeta
    index: Index  # a read-only view of the file
    ids: list[str] | None  # the job id of each key; None: keys are the cache's rows


def space_key(space: str) -> str:
    """A file name for an embedding space (versions hold '@', '/', ':')."""
    return hashlib.sha256(space.encode()).hexdigest()[:16]


def crc_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CRC_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


class IndexStore:
    """The saved indexes of one directory (one per host, or a shared volume that
    honours flock)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def _meta_path(self, space: str) -> Path:
        return self.dir / f"{space_key(space)}.json"

    def _files(self, space: str, gen: int) -> tuple[Path, Path]:
        stem = f"{space_key(space)}.{gen}"
        return self.dir / f"{stem}.usearch", self.dir / f"{stem}.ids"

    def locked(self, space: str):
        """The space's writer lock (blocking): one process saves at a time."""
        return flocked(self.dir / f"{space_key(space)}.lock")

    def writable(self) -> bool:
        """The directory can be made and written (else the caller keeps its index in
        memory, with a warning)."""
        return writable_dir(self.dir, "HNSW index")

    def generation(self, space: str) -> int | None:
        """The saved generation (a cheap read of the JSON), None if none or unreadable."""
        try:
            return int(json.loads(self._meta_path(space).read_text())["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self, space: str, dim: int, cfg: AnnConfig,
             cache: str | None = None) -> SavedIndex | None:
        """Map the saved index of a space, if there is a complete one made with these
        parameters; None (with a warning when a file is there but unusable) otherwise.
        Made over the rows of the saved cache ``cache``: its ids are not read (at 1 M,
        ~100 MB of strings per process), the keys are rows."""
        path = self._meta_path(space)
        if not path.exists():
            return None
        try:
            meta = SavedMeta(**json.loads(path.read_text()))
            want = (FORMAT, space, dim, cfg.dtype, cfg.connectivity)
            got = (meta.format, meta.space, meta.dim, meta.dtype, meta.connectivity)
            if got != want:
                raise ValueError(f"made for {got}, this process needs {want}")
            ipath, idpath = self._files(space, meta.generation)
            # Sizes, then CRC-32s: a torn or bit-rotten file is refused here, before
            # usearch walks it (its own check catches truncation, not flipped bytes).
            # Reading the file also faults its pages into the shared page cache, which
            # the searches would do anyway (0.5 GB at 1 M vectors: about a second).
            for p, size, crc in ((ipath, meta.index_bytes, meta.index_crc),
                                 (idpath, meta.ids_bytes, meta.ids_crc)):
                if p.stat().st_size != size or crc_of(p) != crc:
                    raise ValueError(f"{p.name} does not match its checksum or size")
            ids = None if cache and meta.cache == cache else self.ids(meta)
            index = Index.restore(str(ipath), view=True)
            if index is None or (ids is not None and len(ids) != meta.count) \
                    or len(index) != meta.count or index.ndim != dim:
                raise ValueError("the index and its ids disagree")
            return SavedIndex(meta, index, ids)
        except Exception as e:  # noqa: BLE001 - any unusable file means: rebuild
            log.warning("search: ignoring the saved index of %s in %s (%s); it will be "
                        "rebuilt", space, self.dir, e)
            return None

    def save(self, space: str, index: Index, ids: list[str], cfg: AnnConfig,
             cache: str | None = None) -> SavedMeta:
        """Write a new generation (call under ``locked``): keys of ``index`` are
        positions in ``ids`` (and rows of the saved cache ``cache``, if given)."""
        assert len(index) == len(ids), "every key needs its job id"
        self.dir.mkdir(parents=True, exist_ok=True)
        gen = (self.generation(space) or 0) + 1
        ipath, idpath = self._files(space, gen)
        tmp_i, tmp_d = ipath.with_suffix(".usearch.tmp"), idpath.with_suffix(".ids.tmp")
        index.save(str(tmp_i))
        tmp_d.write_text("\n".join(ids))
        for tmp in (tmp_i, tmp_d):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, tmp.with_suffix(""))
        meta = SavedMeta(FORMAT, space, int(index.ndim), cfg.dtype, cfg.connectivity, gen,
                         len(ids), ipath.stat().st_size, crc_of(ipath),
                         idpath.stat().st_size, crc_of(idpath), cache or "")
        mpath = self._meta_path(space)
        tmp_m = mpath.with_suffix(f".json.{os.getpid()}.tmp")
        tmp_m.write_text(json.dumps(asdict(meta)))
        os.replace(tmp_m, mpath)  # the commit point
        for old in self.dir.glob(f"{space_key(space)}.*"):
            parts = old.name.split(".")
            stale = parts[-1] == "tmp" or (len(parts) == 3 and parts[1].isdigit()
                                           and int(parts[1]) != gen)
            if stale:  # under the lock, any temp file is a crashed writer's
                old.unlink(missing_ok=True)
        return meta

    def copy(self, meta: SavedMeta) -> Index:
        """A private, writable copy of a generation (to extend it)."""
        index = Index.restore(str(self._files(meta.space, meta.generation)[0]), view=False)
        if index is None or len(index) != meta.count:
            raise ValueError("the saved index changed under its lock")
        return index

    def ids(self, meta: SavedMeta) -> list[str]:
        """The job ids of a generation (re-read when it is extended)."""
        text = self._files(meta.space, meta.generation)[1].read_text()
        return text.split("\n") if meta.count else []


def rows_of(saved: SavedIndex, row_of: dict[str, int]) -> np.ndarray:
    """(count,) int64: this process's row of each saved key, -1 where it has not
    loaded that job (yet)."""
    return np.fromiter((row_of.get(j, -1) for j in saved.ids), np.int64, len(saved.ids))
