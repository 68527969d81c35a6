"""How long one scrape of the API's /metrics takes with a million jobs in the store.

Fills a fresh PostgreSQL database (and, with --sqlite, a SQLite file) with N jobs in
the proportions of a busy store (mostly succeeded, some failed and cancelled, a queue
and running jobs in every modality), then times the API's collector: each store family
on its own (one query each), the whole scrape, and, as the baseline measured in the same
run, the scrape the API had before the alert signals (jobs by status and the latency
histogram only).

    python bench/metrics_scrape.py                 # 1,000,000 jobs on PostgreSQL
    python bench/metrics_scrape.py --jobs 200000 --sqlite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.chaos_services import PG_ADMIN, create_pg, drop_pg  # noqa: E402
from core import store  # noqa: E402
from core.config import Settings  # noqa: E402
from core.store.migrations import upgrade  # noqa: E402
from producer.api.metrics import metrics_registry  # noqa: E402

# status, share of the store (the rest of 1.0 is succeeded)
MIX = (("failed", 0.02), ("cancelled", 0.01), ("queued", 0.005), ("running", 0.0005))


PG_FILL = """
INSERT INTO jobs (id, modality, task, params, status, attempts, created_at, started_at,
                  finished_at, text)
SELECT md5(random()::text || g), (ARRAY['text','image','audio'])[1 + g % 3], 'embed', '{}',
       CAST(:st AS varchar), 1, now() - make_interval(secs => g),
       CASE WHEN CAST(:st AS varchar) <> 'queued' THEN now() - make_interval(secs => g) END,
       CASE WHEN CAST(:st AS varchar) NOT IN ('queued', 'running')
            THEN now() - make_interval(secs => g) END, 'x'
FROM generate_series(1, :k) g"""
SQLITE_FILL = """
INSERT INTO jobs (id, modality, task, params, status, attempts, created_at, started_at,
                  finished_at, text)
VALUES (:id, :m, 'embed', '{}', :st, 1,
        strftime('%Y-%m-%d %H:%M:%f000', 'now', '-' || :i || ' seconds'),
        CASE WHEN :st <> 'queued' THEN strftime('%Y-%m-%d %H:%M:%f000', 'now') END,
        CASE WHEN :st NOT IN ('queued', 'running')
             THEN strftime('%Y-%m-%d %H:%M:%f000', 'now') END, 'x')"""


def fill(url: str, n: int) -> None:
    engine = store.make_engine(url)
    pg = url.startswith("postgresql")
    with engine.begin() as c:
        for status, share in (*MIX, ("succeeded", 1 - sum(s for _, s in MIX))):
            k = int(n * share)
            if pg:
                c.execute(text(PG_FILL), {"st": status, "k": k})
            else:
                rows = [{"id": uuid.uuid4().hex, "m": ("text", "image", "audio")[i % 3],
                         "st": status, "i": i} for i in range(k)]
                c.execute(text(SQLITE_FILL), rows)
    if pg:  # what autovacuum does to a table this size soon after: the visibility map
        # lets the status counts read only the (modality, status) index.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE jobs"))
    engine.dispose()


class Sessions:
    def __init__(self, engine):
        self.factory = store.session_factory(engine)

    def sessions(self):
        return self.factory()


def timed(fn, rounds: int) -> float:
    fn()  # warm: plans, caches
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(url: str, broker: str, rounds: int) -> list[tuple[str, float]]:
    engine = store.make_engine(url)
    sess = Sessions(engine)
    s = Settings(broker_url=broker, database_url=url)
    reg = metrics_registry(s, sess, redis.Redis.from_url(broker))

    def q(fn, **kw):
        def run():
            with sess.sessions() as session:
                fn(session=session, **kw)
        return run

    def before():  # the scrape before the alert signals: jobs by status + latency
        with sess.sessions() as session:
            store.count_by_status(session=session)
            store.finished_since(session=session, after=store.db_time(session=session))

    rows = [
        ("count_by_status (mmq_jobs, mmq_jobs_finished_total)", timed(q(store.count_by_status),
                                                                      rounds)),
        ("live_workers_by_modality (mmq_live_workers)",
         timed(q(store.live_workers_by_modality, lease_s=20), rounds)),
        ("oldest_active (mmq_oldest_job_age_seconds)", timed(q(store.oldest_active), rounds)),
        ("cancelled_while_running", timed(q(store.cancelled_while_running), rounds)),
        ("baseline: the scrape before (status counts, latency)", timed(before, rounds)),
        ("whole /metrics scrape now", timed(lambda: generate_latest(reg), rounds)),
    ]
    engine.dispose()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sqlite", action="store_true", help="also a SQLite file")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/15")
    a = ap.parse_args()
    dbs = []
    name = create_pg()
    pg_base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    dbs.append(("postgresql", f"{pg_base}/{name}"))
    if a.sqlite:
        dbs.append(("sqlite", f"sqlite:////tmp/{name}.db"))
    try:
        for kind, url in dbs:
            upgrade(url)
            t = time.perf_counter()
            fill(url, a.jobs)
            print(f"\n{kind}: {a.jobs:,} jobs stored in {time.perf_counter() - t:.0f} s")
            rows = measure(url, a.broker, a.rounds)
            base = dict(rows)["baseline: the scrape before (status counts, latency)"]
            print(f"{'query (median of ' + str(a.rounds) + ')':<58}{'ms':>9}{'x before':>10}")
            for what, sec in rows:
                print(f"{what:<58}{1e3 * sec:>9.1f}{sec / base:>10.2f}")
    finally:
        drop_pg(name)
        Path(f"/tmp/{name}.db").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
