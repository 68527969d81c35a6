"""The saved, memory-mapped HNSW index (core/search/saved.py): it round-trips, a
restarted engine maps it and indexes only the rows it lacks, a corrupt, partial or
mismatched file is ignored and rebuilt, and concurrent savers never leave a broken one.
SQLite only: the store's dialect does not matter here."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading

import numpy as np
import pytest

from core import store
from core.search import SearchConfig, SearchEngine, SearchFilters
from core.search.ann import AnnConfig, AnnIndex
from core.search.saved import IndexStore, space_key
from core.store.migrations import upgrade
from tests.core.search.stored import V1, D, brute, store_jobs, unit

ANN = AnnConfig(threads=1)


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    upgrade(url)
    engine = store.make_engine(url)
    yield store.session_factory(engine)
    engine.dispose()


def clustered(rng, n: int) -> np.ndarray:
    centres = unit(rng, 20)
    x = centres[rng.integers(0, 20, n)] + 0.05 * rng.standard_normal((n, D)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, D)


def engine_at(sessions, index_dir, **kw) -> SearchEngine:
    cfg = dict(ann_min=500, ann=ANN, index_dir=str(index_dir)) | kw
    return SearchEngine(sessions, SearchConfig(refresh_s=0, background_build=False, **cfg))


def settle(eng: SearchEngine) -> None:
    for t in eng.builds:
        t.join()


def top_ids(eng: SearchEngine, qs: np.ndarray, k: int = 10) -> list[list[str]]:
    out = []
    for q in qs:
        hits, stats = eng.search(q, V1, SearchFilters(), k=k)
        assert stats.method == "ann"
        out.append([h.id for h in hits])
    return out


def test_saved_index_round_trips_to_the_same_top_k(tmp_path):
    rng = np.random.default_rng(0)
    vecs = clustered(rng, 800)
    idx = AnnIndex(D, ANN)
    idx.add(np.arange(800), vecs)
    before = [idx.search(q, 64)[:10].tolist() for q in vecs[:30]]
    ids = [f"job-{i}" for i in range(800)]
    s = IndexStore(tmp_path)
    with s.locked(V1):
        s.save(V1, idx.index, ids, ANN)
    saved = s.load(V1, D, ANN)
    assert saved is not None and saved.ids == ids and saved.meta.count == 800
    mapped = AnnIndex(D, ANN, index=saved.index)
    assert not mapped.mutable
    assert [mapped.search(q, 64)[:10].tolist() for q in vecs[:30]] == before


def test_a_restart_maps_the_saved_index_and_indexes_only_new_rows(sessions, tmp_path,
                                                                  caplog):
    rng = np.random.default_rng(1)
    vecs = clustered(rng, 1200)
    ids = store_jobs(sessions, vecs)
    a = engine_at(sessions, tmp_path)
    qs = vecs[:20]
    first = top_ids(a, qs)
    st = a.stats()[V1]
    assert st["mapped"] and st["ann"] == 1200 and st["delta"] == 0  # built, saved, mapped
    assert IndexStore(tmp_path).generation(V1) == 1
    new_vecs = clustered(rng, 300)
    new = store_jobs(sessions, new_vecs)
    caplog.set_level(logging.INFO, "core.search.engine")
    b = engine_at(sessions, tmp_path)  # a restart
    assert top_ids(b, qs) == first
    assert "built in" not in caplog.text  # mapped, not rebuilt
    st = b.stats()[V1]
    assert (st["vectors"], st["ann"], st["delta"]) == (1500, 1200, 300)
    hits, stats = b.search(new_vecs[0], V1, SearchFilters(), k=1)
    assert stats.method == "ann" and hits[0].id == new[0]
    # Recall of the mapped index (with its delta) against exact search.
    allv, allids = np.concatenate([vecs, new_vecs]), ids + new
    qs2 = allv[rng.integers(0, 1500, 30)]
    got = top_ids(b, qs2)
    assert np.mean([len(set(g) & set(brute(allv, allids, q, 10))) / 10
                    for g, q in zip(got, qs2, strict=True)]) >= 0.95


def test_a_full_delta_is_folded_into_a_new_generation(sessions, tmp_path):
    rng = np.random.default_rng(2)
    store_jobs(sessions, clustered(rng, 600))
    a = engine_at(sessions, tmp_path, index_resave_rows=100)
    a.refresh(force=True)
    assert a.stats()[V1]["ann"] == 600
    c = engine_at(sessions, tmp_path, index_resave_rows=100)  # another process
    c.refresh(force=True)
    assert c.shards[V1].saved.generation == 1
    new_vecs = clustered(rng, 150)
    new = store_jobs(sessions, new_vecs)
    a.refresh(force=True)  # 150 delta rows >= 100: a re-save starts
    settle(a)
    st = a.stats()[V1]
    assert IndexStore(tmp_path).generation(V1) == 2
    assert (st["ann"], st["delta"]) == (750, 0)
    hits, _ = a.search(clustered(rng, 1)[0], V1, SearchFilters(), k=5)
    assert len(hits) == 5
    # The other process, still on generation 1, fills its own delta, then adopts
    # generation 2 instead of saving a third.
    c.refresh(force=True)
    settle(c)
    assert IndexStore(tmp_path).generation(V1) == 2 and c.shards[V1].saved.generation == 2
    assert (c.stats()[V1]["ann"], c.stats()[V1]["delta"]) == (750, 0)
    assert c.search(new_vecs[3], V1, SearchFilters(), k=1)[0][0].id == new[3]
    # Only the new generation's files remain.
    names = sorted(p.name.split(".", 1)[1] for p in tmp_path.glob(f"{space_key(V1)}.*"))
    assert names == ["2.ids", "2.usearch", "json", "lock"]


def damage_flip(ipath, meta):
    data = bytearray(ipath.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    ipath.write_bytes(bytes(data))


def damage_truncate(ipath, meta):
    ipath.write_bytes(ipath.read_bytes()[: ipath.stat().st_size // 2])


def damage_mismatch(ipath, meta):  # made with another graph degree
    m = json.loads(meta.read_text())
    m["connectivity"] = 32
    meta.write_text(json.dumps(m))


def damage_json(ipath, meta):
    meta.write_text("{not json")


def damage_missing(ipath, meta):
    ipath.unlink()


@pytest.mark.parametrize("damage", [damage_flip, damage_truncate, damage_mismatch,
                                    damage_json, damage_missing])
def test_a_damaged_or_mismatched_index_is_ignored_and_rebuilt(sessions, tmp_path, caplog,
                                                              damage):
    rng = np.random.default_rng(3)
    vecs = clustered(rng, 700)
    ids = store_jobs(sessions, vecs)
    engine_at(sessions, tmp_path).refresh(force=True)
    key = space_key(V1)
    damage(tmp_path / f"{key}.1.usearch", tmp_path / f"{key}.json")
    caplog.set_level(logging.INFO, "core.search")
    b = engine_at(sessions, tmp_path)
    qs = vecs[:20]
    got = top_ids(b, qs)
    assert "ignoring the saved index" in caplog.text and "built in" in caplog.text
    assert np.mean([len(set(g) & set(brute(vecs, ids, q, 10))) / 10
                    for g, q in zip(got, qs, strict=True)]) >= 0.95
    assert IndexStore(tmp_path).load(V1, D, ANN) is not None  # a good one saved again


def _save_many(directory: str, seed: int, times: int) -> None:
    rng = np.random.default_rng(seed)
    s = IndexStore(directory)
    for _ in range(times):
        n = int(rng.integers(50, 400))
        idx = AnnIndex(D, ANN)
        idx.add(np.arange(n), unit(rng, n))
        with s.locked(V1):
            s.save(V1, idx.index, [f"{seed}-{i}" for i in range(n)], ANN)


def test_concurrent_savers_never_leave_a_broken_index(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_many, args=(str(tmp_path), s, 4)) for s in (1, 2)]
    threads = [threading.Thread(target=_save_many, args=(str(tmp_path), s, 4))
               for s in (3, 4)]
    for w in procs + threads:
        w.start()
    s = IndexStore(tmp_path)
    loads = 0
    while any(w.is_alive() for w in threads) or any(p.is_alive() for p in procs):
        # A reader between writers maps a complete generation or, if the writer
        # deleted the one it was reading, nothing; never a broken one.
        got = s.load(V1, D, ANN)
        if got is not None:
            assert len(got.ids) == got.meta.count == len(got.index)
            loads += 1
    for w in procs + threads:
        w.join()
    assert all(p.exitcode == 0 for p in procs)
    got = s.load(V1, D, ANN)
    assert got is not None and got.meta.generation == 16
    assert len({i.split("-")[0] for i in got.ids}) == 1  # one writer's ids, whole


def test_an_unwritable_index_dir_keeps_the_index_in_memory(sessions, tmp_path, caplog):
    rng = np.random.default_rng(5)
    vecs = clustered(rng, 600)
    ids = store_jobs(sessions, vecs)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    eng = engine_at(sessions, blocker / "index")
    got = top_ids(eng, vecs[:10])
    assert "cannot save the HNSW index" in caplog.text
    assert not eng.stats()[V1]["mapped"] and eng.stats()[V1]["ann"] == 600
    assert np.mean([len(set(g) & set(brute(vecs, ids, q, 10))) / 10
                    for g, q in zip(got, vecs[:10], strict=True)]) >= 0.95
