"""The saved, memory-mapped vector cache (core/search/cached.py, sharing.py): a restart
maps it instead of reading SQL, new results are appended to it (and to the index)
without a rebuild, a stale or foreign file is detected and rebuilt from SQL, and two
processes share its pages and each other's appends. On SQLite and PostgreSQL where the
database's clock matters (the watermark); SQLite elsewhere."""

from __future__ import annotations

import json
import logging
import multiprocessing
import uuid

import numpy as np
import pytest

from core import store
from core.search import SearchConfig, SearchEngine, SearchFilters
from core.search.ann import AnnConfig
from core.search.cached import HEADER
from core.store.migrations import upgrade
from tests.core.search.stored import V1, brute, store_jobs, unit
from tests.helpers import pg_database, pg_drop

ANN = AnnConfig(threads=1)


def _sessions(url: str):
    upgrade(url)
    engine = store.make_engine(url)
    return engine, store.session_factory(engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url, name = f"sqlite:///{tmp_path / 'search.db'}", None
    else:
        name = f"mmq_cache_{uuid.uuid4().hex[:10]}"
        url = pg_database(name)
    engine, factory = _sessions(url)
    yield factory
    engine.dispose()
    if name:
        pg_drop(name)


@pytest.fixture
def lite(tmp_path):
    engine, factory = _sessions(f"sqlite:///{tmp_path / 'search.db'}")
    yield factory
    engine.dispose()


def engine_at(sessions, index_dir, **kw) -> SearchEngine:
    cfg = dict(ann_min=400, ann=ANN, index_dir=str(index_dir)) | kw
    return SearchEngine(sessions, SearchConfig(refresh_s=0, background_build=False, **cfg))


def header_of(index_dir):
    """The cache header of the one store that used index_dir."""
    (folder,) = index_dir.glob("cache-*")
    return folder / HEADER


def top(eng: SearchEngine, q, k: int = 10) -> list[str]:
    return [h.id for h in eng.search(q, V1, SearchFilters(), k=k)[0]]


def test_a_restart_maps_the_saved_cache_and_reads_only_new_rows(sessions, tmp_path,
                                                                caplog):
    rng = np.random.default_rng(0)
    vecs = unit(rng, 300)
    ids = store_jobs(sessions, vecs, owner="alice")
    a = engine_at(sessions, tmp_path)
    assert a.refresh(force=True) == 300
    assert a.stats()[V1]["cache_mapped"]
    header = json.loads(header_of(tmp_path).read_text())
    assert header["spaces"][V1]["count"] == 300 and header["watermark"] is not None
    caplog.set_level(logging.INFO, "core.search")
    b = engine_at(sessions, tmp_path)  # a restart
    assert b.refresh(force=True) == 0  # nothing read from SQL: all mapped
    assert "mapped the saved vector cache" in caplog.text
    assert "rebuilt" not in caplog.text
    for q in vecs[:5]:
        assert top(b, q) == top(a, q) == brute(vecs, ids, q, 10)
    # Filters work on the mapped columns (codes came with the file).
    hits, _ = b.search(vecs[0], V1, SearchFilters(owner="alice"), k=3)
    assert len(hits) == 3
    assert b.search(vecs[0], V1, SearchFilters(owner="bob"), k=3)[0] == []
    # Rows stored after the watermark are read (and only they), then appended.
    new = unit(rng, 20)
    new_ids = store_jobs(sessions, new)
    c = engine_at(sessions, tmp_path)
    assert c.refresh(force=True) == 20
    assert top(c, new[3], 1) == [new_ids[3]]
    assert json.loads(header_of(tmp_path).read_text())["spaces"][V1]["count"] == 320


def test_new_results_are_appended_to_the_file_and_index_without_a_rebuild(
        sessions, tmp_path, caplog):
    rng = np.random.default_rng(1)
    vecs = unit(rng, 500)
    store_jobs(sessions, vecs)
    a = engine_at(sessions, tmp_path)
    a.refresh(force=True)
    assert a.stats()[V1]["mapped"]  # index built over the cache rows, saved, mapped
    b = engine_at(sessions, tmp_path)  # a second process of the host
    b.refresh(force=True)
    caplog.set_level(logging.INFO, "core.search")
    new = unit(rng, 40)
    new_ids = store_jobs(sessions, new)
    assert a.refresh(force=True) == 40  # a reads them from SQL and appends them
    hits, stats = a.search(new[7], V1, SearchFilters(), k=1)
    assert stats.method == "ann" and hits[0].id == new_ids[7]
    st = a.stats()[V1]
    assert (st["vectors"], st["ann"], st["delta"]) == (540, 500, 40)
    # b takes a's appended rows from the file: nothing read from SQL.
    assert b.refresh(force=True) == 0
    hits, stats = b.search(new[9], V1, SearchFilters(), k=1)
    assert stats.method == "ann" and hits[0].id == new_ids[9]
    assert b.stats()[V1]["delta"] == 40
    assert "built in" not in caplog.text and "loaded from SQL" not in caplog.text


def damage_foreign(index_dir):  # the database is made again under the same URL
    pass


def damage_vector(index_dir):  # a sampled row's bytes changed
    vec = next(header_of(index_dir).parent.glob("cache.*.vecs"))
    with open(vec, "r+b") as f:
        f.write(b"\x00" * 64)


def damage_short(index_dir):
    ids = next(header_of(index_dir).parent.glob("cache.*.ids"))
    ids.write_bytes(ids.read_bytes()[:100])


def damage_header(index_dir):
    header_of(index_dir).write_text("{not json")


def damage_format(index_dir):
    h = json.loads(header_of(index_dir).read_text())
    h["format"] = 99
    header_of(index_dir).write_text(json.dumps(h))


@pytest.mark.parametrize("damage", [damage_foreign, damage_vector, damage_short,
                                    damage_header, damage_format])
def test_a_stale_or_foreign_cache_is_detected_and_rebuilt_from_sql(tmp_path, caplog,
                                                                   damage):
    rng = np.random.default_rng(2)
    db = tmp_path / "a.db"
    engine, sessions = _sessions(f"sqlite:///{db}")
    vecs = unit(rng, 120)
    ids = store_jobs(sessions, vecs)
    d = tmp_path / "index"
    engine_at(sessions, d).refresh(force=True)
    damage(d)
    if damage is damage_foreign:  # other results, under the same URL (same folder)
        engine.dispose()
        for p in tmp_path.glob("a.db*"):
            p.unlink()
        engine, sessions = _sessions(f"sqlite:///{db}")
        vecs = unit(rng, 120)
        ids = store_jobs(sessions, vecs)
    caplog.set_level(logging.INFO, "core.search")
    b = engine_at(sessions, d)
    assert b.refresh(force=True) == 120  # all read from SQL again
    assert "ignoring the saved vector cache" in caplog.text
    assert top(b, vecs[4]) == brute(vecs, ids, vecs[4], 10)
    caplog.clear()
    c = engine_at(sessions, d)  # the rebuilt one is good
    assert c.refresh(force=True) == 0 and "ignoring" not in caplog.text
    assert top(c, vecs[4]) == brute(vecs, ids, vecs[4], 10)
    engine.dispose()


def _child(url: str, index_dir: str, q: list[float], out) -> None:
    """Another API process: map the cache, search, report what it maps and shares."""
    engine, factory = _sessions(url)
    eng = engine_at(factory, index_dir, ann_min=10**9)  # exact: reads every page
    n = eng.refresh(force=True)
    hits = top(eng, np.asarray(q, np.float32), 3)
    vecs = eng.shards[V1].vecs
    path = str(vecs.filename)
    eng.search(np.asarray(q, np.float32), V1, SearchFilters(), k=3)
    # /proc/self/smaps: the vectors file's pages, and how many are shared.
    shared = rss = 0
    lines = open("/proc/self/smaps").read().splitlines()
    inside = False
    for line in lines:
        if "-" in line.split()[0] and len(line.split()) >= 5:
            inside = line.endswith(path)
        elif inside and line.startswith(("Shared_Clean:", "Shared_Dirty:")):
            shared += int(line.split()[1])
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
    out.put({"loaded": n, "hits": hits, "path": path, "shared_kb": shared, "rss_kb": rss})
    engine.dispose()


def test_two_processes_share_the_cache_pages_and_each_others_appends(lite, tmp_path):
    rng = np.random.default_rng(3)
    vecs = unit(rng, 2000)  # 3 MB of vectors: pages enough to see shared
    ids = store_jobs(lite, vecs)
    a = engine_at(lite, tmp_path / "idx", ann_min=10**9)  # exact: reads every page
    a.refresh(force=True)
    top(a, vecs[0])
    url = str(lite.kw["bind"].url)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_child, args=(url, str(tmp_path / "idx"), vecs[5].tolist(), out))
    p.start()
    got = out.get(timeout=120)
    p.join(60)
    assert p.exitcode == 0
    assert got["loaded"] == 0 and got["hits"] == brute(vecs, ids, vecs[5], 3)
    assert got["path"] == str(a.shards[V1].vecs.filename)
    # Every page of the rows' vectors is resident in the child and shared with this
    # process (a private copy would count as Private_*, not Shared_*).
    rows_kb = 2000 * 384 * 4 // 1024
    assert got["shared_kb"] >= rows_kb - 8
    # The child appends (new rows, read from SQL); this process takes them from the file.
    new = unit(rng, 5)
    new_ids = store_jobs(lite, new)
    p = ctx.Process(target=_child, args=(url, str(tmp_path / "idx"), new[2].tolist(), out))
    p.start()
    got = out.get(timeout=120)
    p.join(60)
    assert got["loaded"] == 5 and got["hits"][0] == new_ids[2]
    assert a.refresh(force=True) == 0 and top(a, new[2], 1) == [new_ids[2]]


def test_after_a_host_crash_rows_past_the_last_flush_are_read_again(lite, tmp_path):
    rng = np.random.default_rng(4)
    store_jobs(lite, unit(rng, 200))
    a = engine_at(lite, tmp_path)
    a.refresh(force=True)  # the first commit flushes to disk
    new = unit(rng, 30)
    new_ids = store_jobs(lite, new)
    assert a.refresh(force=True) == 30  # appended, in the page cache only
    h = json.loads(header_of(tmp_path).read_text())
    assert (h["spaces"][V1]["count"], h["spaces"][V1]["synced"]) == (230, 200)
    h["boot"] = "an earlier boot"  # as if the host had crashed and rebooted since
    header_of(tmp_path).write_text(json.dumps(h))
    b = engine_at(lite, tmp_path)
    assert b.refresh(force=True) == 30  # the unflushed rows, from SQL again
    assert b.stats()[V1]["vectors"] == 230
    assert top(b, new[4], 1) == [new_ids[4]]
