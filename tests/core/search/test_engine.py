"""Search over stored predictions, on SQLite and PostgreSQL: exact search against a
brute-force oracle, every filter, owner scoping, query jobs never returned, the cache
catching up with new predictions, and the HNSW index's recall against exact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import update

from core import store
from core.jobs import JobResult
from core.search import SearchConfig, SearchEngine, SearchFilters
from core.search.ann import AnnConfig
from core.store.migrations import upgrade
from tests.core.search.stored import V1, V2, D, brute, store_jobs, unit
from tests.helpers import pg_database, pg_drop


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url, name = f"sqlite:///{tmp_path / 'search.db'}", None
    else:
        name = f"mmq_search_{uuid.uuid4().hex[:10]}"
        url = pg_database(name)
    upgrade(url)
    engine = store.make_engine(url)
    yield store.session_factory(engine)
    engine.dispose()
    if name:
        pg_drop(name)


def engine_for(sessions, **kw) -> SearchEngine:
    return SearchEngine(sessions, SearchConfig(refresh_s=0, background_build=False, **kw))


def test_exact_search_matches_brute_force_and_reports_scores(sessions):
    rng = np.random.default_rng(0)
    vecs = unit(rng, 300)
    ids = store_jobs(sessions, vecs)
    eng = engine_for(sessions)
    q = unit(rng, 1)[0]
    hits, stats = eng.search(q, V1, SearchFilters(), k=10)
    assert [h.id for h in hits] == brute(vecs, ids, q, 10)
    assert stats.method == "exact" and stats.searched == 300
    assert hits[0].score == pytest.approx(float(vecs[ids.index(hits[0].id)] @ q), abs=1e-5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
    h = hits[0]
    assert h.modality == "text" and h.task == "embed" and h.model_version == V1
    assert h.text.startswith("text ") and h.text in h.summary and h.created_at


def test_filters_modality_task_label_time_and_version(sessions):
    rng = np.random.default_rng(1)
    t_old = datetime(2026, 1, 1, tzinfo=UTC)
    texts = store_jobs(sessions, unit(rng, 20), created_at=t_old)
    cats = store_jobs(sessions, unit(rng, 5), modality="image", task="classify",
                      labels=[[("a cat", 0.9), ("a dog", 0.1)]] * 5)
    dogs = store_jobs(sessions, unit(rng, 5), modality="image", task="classify",
                      labels=[[("a dog", 0.8), ("a cat", 0.2)]] * 5)
    other_version = store_jobs(sessions, unit(rng, 5), version=V2)
    eng = engine_for(sessions)
    q = unit(rng, 1)[0]

    def ids(**f):
        version = f.pop("version", V1)
        return {h.id for h in eng.search(q, version, SearchFilters(**f), k=100)[0]}

    assert ids() == set(texts + cats + dogs)  # never another version's rows
    assert ids(version=V2) == set(other_version)
    assert ids(modality="image") == set(cats + dogs)
    assert ids(task="classify") == set(cats + dogs)
    # The top label only, case-insensitively: a dog picture whose second label is
    # "a cat" is not a cat picture.
    assert ids(label="A Cat") == set(cats)
    assert ids(label="a horse") == set()
    assert ids(created_until=t_old + timedelta(days=1)) == set(texts)
    assert ids(created_since=t_old + timedelta(days=1)) == set(cats + dogs)
    assert ids(modality="audio") == set()
    hit = eng.search(q, V1, SearchFilters(label="a cat"), k=1)[0][0]
    assert hit.label == "a cat" and hit.label_score == pytest.approx(0.9)
    assert hit.summary.startswith("a cat (0.90)")


def test_owner_scoping_and_query_jobs_never_returned(sessions):
    rng = np.random.default_rng(2)
    alice = store_jobs(sessions, unit(rng, 10), owner="alice")
    bob = store_jobs(sessions, unit(rng, 10), owner="bob")
    sdk = store_jobs(sessions, unit(rng, 10))
    q = unit(rng, 1)[0]
    queries = store_jobs(sessions, np.stack([q] * 3), owner="alice",
                         params={"search_query": True})
    eng = engine_for(sessions)
    seen = lambda owner: {h.id for h in eng.search(  # noqa: E731
        q, V1, SearchFilters(owner=owner), k=100)[0]}
    assert seen("alice") == set(alice)
    assert seen("bob") == set(bob)
    assert seen("nobody") == set()
    assert seen(None) == set(alice + bob + sdk)  # an admin; still no query jobs
    assert not set(queries) & seen(None)


def test_cache_catches_up_with_new_and_redelivered_predictions(sessions):
    rng = np.random.default_rng(3)
    store_jobs(sessions, unit(rng, 50))
    eng = engine_for(sessions)
    q = unit(rng, 1)[0]
    assert eng.search(q, V1, SearchFilters(), k=5)[1].searched == 50
    new = store_jobs(sessions, np.stack([q]))  # the query's own vector lands later
    hits, stats = eng.search(q, V1, SearchFilters(), k=5)
    assert stats.searched == 51 and hits[0].id == new[0]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    # A redelivered job's prediction is upserted again: updated in place, not doubled.
    with sessions.begin() as s:  # the sweep put it back (its ack was lost), it ran again
        s.execute(update(store.Job).where(store.Job.id == new[0]).values(status="queued"))
        store.start_jobs(session=s, job_ids=[new[0]], worker="w2")
        store.finish_jobs(session=s, model_version=V1, attempts={new[0]: 2},
                          results={new[0]: JobResult(embedding=-q)})
    hits, stats = eng.search(q, V1, SearchFilters(), k=51)
    assert stats.searched == 51 and hits[-1].id == new[0]
    assert eng.refresh(force=True) == 0  # nothing new: nothing loaded


def test_ann_index_recall_against_exact_and_catch_up(sessions):
    rng = np.random.default_rng(4)
    centres = unit(rng, 20)
    lab = rng.integers(0, 20, 2000)
    vecs = centres[lab] + 0.05 * rng.standard_normal((2000, D)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = store_jobs(sessions, vecs, owner="alice")
    eng = engine_for(sessions, ann_min=1000, ann=AnnConfig(threads=1))
    qs = vecs[rng.integers(0, 2000, 50)] + 0.02 * rng.standard_normal((50, D)).astype(
        np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    recall = []
    for q in qs:
        hits, stats = eng.search(q, V1, SearchFilters(), k=10)
        assert stats.method == "ann"
        recall.append(len({h.id for h in hits} & set(brute(vecs, ids, q, 10))) / 10)
    assert np.mean(recall) >= 0.95
    # New predictions go into the index as they land.
    new = store_jobs(sessions, qs[:1] * 1.0, owner="bob")
    hits, stats = eng.search(qs[0], V1, SearchFilters(), k=1)
    assert stats.method == "ann" and hits[0].id == new[0]
    assert eng.stats()[V1]["ann"] == 2001
    # A filter few rows pass: too few candidates survive, so exact answers in full.
    hits, stats = eng.search(qs[1], V1, SearchFilters(owner="bob"), k=10)
    assert [h.id for h in hits] == new and stats.method == "exact"


def test_ann_falls_back_to_exact_when_too_few_candidates_pass(sessions):
    """A filter most candidates fail: the images sit in one cluster, the query and the
    texts in another. The index's candidates are all texts, so exact search over the
    images answers, in full."""
    rng = np.random.default_rng(5)
    a, b = unit(rng, 2)

    def around(c, n):
        x = c + 0.03 * rng.standard_normal((n, D)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    images = around(a, 700)
    image_ids = store_jobs(sessions, images, modality="image")
    store_jobs(sessions, around(b, 600))
    # A short search list (64, 75 candidates with the over-fetch), all of them texts.
    eng = engine_for(sessions, ann_min=500, ann=AnnConfig(threads=1, expansion_search=64))
    q = around(b, 1)[0]
    hits, stats = eng.search(q, V1, SearchFilters(modality="image"), k=10)
    assert stats.method == "ann->exact"
    assert [h.id for h in hits] == brute(images, image_ids, q, 10)


def test_adapter_versions_share_their_base_models_space(sessions):
    """A model version (an adapter trained into its base model's space, issue 16) is
    searched with its base: a text query of the base model finds image jobs run under
    an image adapter. model_version= narrows to one version's predictions."""
    from core.store.versions import create_version

    rng = np.random.default_rng(6)
    sha = "ab" * 32
    with sessions.begin() as s:
        create_version(session=s, name="cats", modality="image", base_model=V1,
                       data_digest="0" * 64, metrics={}, config={},
                       adapter_file="cats.safetensors", adapter_sha256=sha)
    base = store_jobs(sessions, unit(rng, 5))
    adapted = store_jobs(sessions, unit(rng, 5), modality="image",
                         version=f"cats@{sha[:12]}")
    stranger = store_jobs(sessions, unit(rng, 5), version="dogs@" + "cd" * 6)  # no row
    eng = engine_for(sessions)
    q = unit(rng, 1)[0]
    found = lambda version, **f: {h.id for h in eng.search(  # noqa: E731
        q, version, SearchFilters(**f), k=100)[0]}
    assert found(V1) == set(base + adapted)
    assert found(f"cats@{sha[:12]}") == set(base + adapted)  # an adapted query: same space
    assert found(V1, model_version=f"cats@{sha[:12]}") == set(adapted)
    assert found(V1, model_version=V1) == set(base)
    assert found("dogs@" + "cd" * 6) == set(stranger)  # unknown version: a space of its own
    hits, stats = eng.search(q, V1, SearchFilters(modality="image"), k=1)
    assert hits[0].model_version == f"cats@{sha[:12]}" and stats.model_version == V1


def test_precisions_of_one_model_share_its_space(sessions):
    """Results of the same weights run in bf16 (version tagged "/bf16", core/precision.py)
    are searched with the fp32 ones, whichever precision the query ran in; an adapter
    trained on a bf16 tower is in that same space too."""
    from core.store.versions import create_version

    rng = np.random.default_rng(7)
    full, bf16 = f"{V1}+image@x", f"{V1}/bf16+image@x"
    sha = "ef" * 32
    with sessions.begin() as s:
        create_version(session=s, name="dogs", modality="text", base_model=bf16,
                       data_digest="0" * 64, metrics={}, config={},
                       adapter_file="dogs.safetensors", adapter_sha256=sha)
    fp = store_jobs(sessions, unit(rng, 4), version=full)
    bf = store_jobs(sessions, unit(rng, 4), version=bf16)
    ad = store_jobs(sessions, unit(rng, 4), version=f"dogs@{sha[:12]}")
    other = store_jobs(sessions, unit(rng, 4), version=f"{V2}/bf16+image@x")
    eng = engine_for(sessions)
    q = unit(rng, 1)[0]
    found = lambda version, **f: {h.id for h in eng.search(  # noqa: E731
        q, version, SearchFilters(**f), k=100)[0]}
    assert found(full) == found(bf16) == set(fp + bf + ad)
    assert found(full, model_version=bf16) == set(bf)  # narrowing stays exact
    assert found(f"{V2}+image@x") == set(other)
