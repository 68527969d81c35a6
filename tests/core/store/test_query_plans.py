"""The statements that pick jobs by id cost the same whatever the queue's depth.

For ``id IN (...) AND status = 'queued'`` a planner without statistics (SQLite always;
PostgreSQL until autovacuum has analyzed the table) chose the status index, believing
it selective, and read every queued job: a worker's start of 16 jobs read the whole
queue (20x the SQLite steps at 4,000 queued jobs than at 40), and so did the sweep's
``queued_among`` (61x), the lease's ``cancelled_among`` (every job ever cancelled, 60x),
the fenced finish and failure (every running job) and search's reads of stored vectors
(every succeeded job); a fine-tune's read of its corrected jobs and their count read
every succeeded job of the modality (57x and 56x, with no job corrected). Counted in
SQLite's virtual-machine steps and read from the plans, not timed: deterministic on a
shared machine."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from sqlalchemy import event

from core import store
from core.jobs import JobResult
from core.store import corrections, vectors
from core.store.migrations import upgrade


def _steps(sessions, fn) -> int:
    """SQLite virtual-machine instructions that ``fn(session)`` runs, commit included."""
    with sessions.begin() as s:
        raw = s.connection().connection.dbapi_connection
        n = [0]

        def count() -> int:
            n[0] += 1
            return 0

        raw.set_progress_handler(count, 1)
        try:
            fn(s)
        finally:
            raw.set_progress_handler(None, 1)
    return n[0]


def _store(tmp_path, name: str, depth: int):
    """A store (a SQLite file ``name`` in ``tmp_path``, or a database URL) holding
    ``depth`` queued jobs and a quarter as many of each: running
    (another worker's), cancelled, succeeded; and 16 more queued ones -> (sessions,
    the 16 ids, 16 succeeded ids)."""
    url = name if "://" in name else f"sqlite:///{tmp_path / name}"
    upgrade(url)
    sessions = store.session_factory(store.make_engine(url))
    q = depth // 4
    with sessions.begin() as s:
        many = [j for j, _ in store.create_jobs(session=s, rows=[
            {"modality": "text", "task": "embed", "text": f"t{i}"} for i in range(depth + 3 * q)])]
        store.start_jobs(session=s, job_ids=many[:2 * q], worker="other")
        done = many[q:2 * q]
        store.finish_jobs(session=s, model_version="v", attempts=dict.fromkeys(done, 1),
                          results={j: JobResult(embedding=np.zeros(4, "f4")) for j in done})
        for j in many[2 * q:3 * q]:
            store.cancel_job(session=s, job_id=j)
        mine = [j for j, _ in store.create_jobs(session=s, rows=[
            {"modality": "text", "task": "embed", "text": f"m{i}"} for i in range(16)])]
    return sessions, mine, many[q:q + 16]


def _costs(sessions, ids: list[str], done: list[str]) -> dict[str, int]:
    def steps(fn) -> int:
        return _steps(sessions, fn)

    return {
        "queued_among": steps(lambda s: store.queued_among(session=s, job_ids=ids)),
        "start_jobs": steps(lambda s: store.start_jobs(session=s, job_ids=ids, worker="w1",
                                                       lease=timedelta(seconds=20))),
        "cancelled_among": steps(lambda s: store.cancelled_among(session=s, job_ids=ids)),
        "finish_jobs": steps(lambda s: store.finish_jobs(
            session=s, model_version="v", results={j: JobResult(tokens=1) for j in ids[:4]},
            attempts=dict.fromkeys(ids[:4], 1))),
        "fail_job": steps(lambda s: store.fail_job(session=s, job_id=ids[4], error="x",
                                                   attempt=1)),
        "cancel_job": steps(lambda s: store.cancel_job(session=s, job_id=ids[5])),
        "release_jobs": steps(lambda s: store.release_jobs(session=s, job_ids=ids[6:10],
                                                           worker="w1")),
        "requeue_orphans": steps(lambda s: store.requeue_orphans(
            session=s, jobs=[(j, "w1") for j in ids[10:14]])),
        "vector_rows": steps(lambda s: vectors.vector_rows(session=s, job_ids=done)),
        "stored_rows": steps(lambda s: vectors.stored_rows(session=s, job_ids=done)),
        # A fine-tune's training data and the count of it: the corrections drive them.
        "corrected_jobs": steps(lambda s: list(corrections.corrected_jobs(session=s,
                                                                    modality="text"))),
        "count_corrections": steps(lambda s: corrections.count_corrections(session=s)),
    }


def test_jobs_picked_by_id_cost_the_same_at_any_queue_depth(tmp_path):
    shallow = _costs(*_store(tmp_path, "shallow.db", 40))
    deep = _costs(*_store(tmp_path, "deep.db", 4000))
    grew = {k: round(deep[k] / shallow[k], 2) for k in shallow
            if deep[k] > 1.5 * shallow[k]}
    assert not grew, f"steps grew with the queue's depth (deep / shallow): {grew}"


def test_statements_picking_jobs_by_id_use_the_primary_key(database_url, tmp_path):
    """Their plans on a fresh database (PostgreSQL has not analyzed it yet) with a deep
    queue: the jobs table is read through its primary key, never the status index."""
    sessions, ids, done = _store(tmp_path, database_url, 2000)
    engine = sessions.kw["bind"]
    seen: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, params, context, executemany):
        if not executemany:
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        with sessions.begin() as s:
            store.queued_among(session=s, job_ids=ids)
            store.cancelled_among(session=s, job_ids=ids)
            store.start_jobs(session=s, job_ids=ids, worker="w1")
            store.fail_job(session=s, job_id=ids[0], error="x", attempt=1)
            store.finish_jobs(session=s, model_version="v", attempts=dict.fromkeys(ids[1:5], 1),
                              results={j: JobResult(tokens=1) for j in ids[1:5]})
            store.release_jobs(session=s, job_ids=ids[5:9], worker="w1")
            vectors.vector_rows(session=s, job_ids=done)
            vectors.stored_rows(session=s, job_ids=done)
            list(corrections.corrected_jobs(session=s, modality="text"))
            corrections.count_corrections(session=s, modality="text")
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    # No other index of jobs; on SQLite no scan of the table either (it has no costs to
    # weigh). PostgreSQL may scan a table it measures as small: its choice, by cost.
    forbidden = ("ix_jobs", "SCAN jobs") if engine.dialect.name == "sqlite" else ("ix_jobs",)
    with engine.connect() as conn:
        cur = conn.connection.dbapi_connection.cursor()
        for statement, params in seen:
            if "jobs" not in statement or statement.lstrip().upper().startswith("SELECT STRF"):
                continue
            cur.execute(explain + statement, params)
            plan = " / ".join(str(r[-1]) for r in cur.fetchall())
            assert not any(bad in plan for bad in forbidden), (statement.split("\n")[0], plan)
        conn.connection.dbapi_connection.rollback()
