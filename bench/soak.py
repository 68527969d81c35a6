"""Soak: many text jobs through the real pipeline, watching the worker's memory.

SDK -> Redis -> one ``python -m workers text`` process -> SQL (a private
redis-server and a SQLite file, as in bench/e2e.py, or ``--db`` a PostgreSQL URL).
Jobs are submitted paced, at most ``--window`` open at a time, so the worker sees
a steady stream rather than one backlog. A quarter of them are zero-shot
classifications with label sets drawn from a pool (``--labels``), so the label
cache, the adapter and label paths are exercised too. The resident set size
(VmRSS, /proc) of the worker's main process (Celery, the writer, the metrics) and
of its model process (batcher and model) is sampled every ``--every`` finished
jobs.

A leak grows by about the same amount over every stretch of jobs; allocator and
cache warm-up grows early and then stops. The table shows each stretch's growth
so the two can be told apart.

    python bench/soak.py [--n 20000] [--every 1000] [--window 400] [--labels 300]
                         [--distinct N] [--db sqlite|postgresql] [--env K=V]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench.e2e import Stack, children, rss_mb  # noqa: E402
from core import store  # noqa: E402
from core.jobs import TERMINAL  # noqa: E402
from core.training.samples import sentences  # noqa: E402
from producer.sdk import Client  # noqa: E402

WORDS = ("sport cooking finance travel music health politics science weather art law "
         "film games fashion cars pets garden books history space").split()


def label_pool(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    out = {f"{rng.choice(WORDS)} {rng.choice(WORDS)}" for _ in range(20 * n)}
    return sorted(out)[:n] if len(out) >= n else sorted(out) + [
        f"topic {i}" for i in range(n - len(out))]


def items(n: int, labels: list[str], seed: int = 21) -> list[dict]:
    rng = random.Random(seed)
    texts = sentences(n, seed=seed)
    out = []
    for i, t in enumerate(texts):
        item = {"modality": "text", "input": t}
        if i % 4 == 3:
            item.update(task="classify", labels=rng.sample(labels, rng.randint(2, 6)),
                        top_k=1)
        out.append(item)
    return out


def finished(c: Client) -> tuple[int, int]:
    with c.sessions() as s:
        rows = dict(s.execute(select(store.Job.status, func.count())
                              .group_by(store.Job.status)).all())
    return sum(v for k, v in rows.items() if k in TERMINAL), rows.get("failed", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--every", type=int, default=1000, help="sample every N finished jobs")
    ap.add_argument("--window", type=int, default=400, help="open jobs at most")
    ap.add_argument("--labels", type=int, default=300, help="size of the label pool")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                    help="postgresql: a database of its own in the local cluster, dropped after")
    ap.add_argument("--distinct", type=int, default=0,
                    help="only this many distinct jobs, submitted over and over: after the "
                         "first round every input (and its shape) has been seen, so what "
                         "still grows is not warm-up")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="extra environment for the worker (repeatable), e.g. "
                         "MALLOC_MMAP_THRESHOLD_=131072 to see what the allocator accounts for")
    args = ap.parse_args()
    work = items(args.distinct or args.n, label_pool(args.labels))
    work = [work[i % len(work)] for i in range(args.n)]
    stack = Stack(Path(tempfile.mkdtemp(prefix="mmq-soak-")))
    pg = None
    try:
        if args.db == "sqlite":
            db = stack.fresh_db()
        else:
            from bench.chaos_services import PG_HOST, PG_PORT, create_pg

            pg = create_pg()
            db = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{pg}"
        t0 = time.monotonic()
        stack.start_worker("text", db, MMQ_METRICS_LOG_EVERY_S=60,
                           **dict(e.split("=", 1) for e in args.env))
        pid = stack.workers[-1][0].pid
        kids = [k for k in children(pid)  # the model process, not the resource tracker
                if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        print(f"worker {pid} ready in {time.monotonic() - t0:.0f} s; model process(es) "
              f"{kids}; RSS MiB main {rss_mb(pid):.0f}, model "
              f"{sum(rss_mb(k) for k in kids):.0f}", flush=True)
        c = Client(broker_url=stack.broker, database_url=db)
        samples: list[tuple[int, float, float, float]] = []  # done, main, model, t
        submitted, done, failed, mark = 0, 0, 0, args.every
        t0 = time.monotonic()
        while done < args.n:
            if submitted < args.n and submitted - done < args.window:
                k = min(200, args.n - submitted, args.window - (submitted - done))
                c.submit_many(work[submitted:submitted + k])
                submitted += k
            else:
                time.sleep(0.2)
            done, failed = finished(c)
            while done >= mark:
                samples.append((mark, rss_mb(pid), sum(rss_mb(k) for k in kids),
                                time.monotonic() - t0))
                print(f"  {mark:>6} jobs: main {samples[-1][1]:7.1f} MiB, model "
                      f"{samples[-1][2]:7.1f} MiB, {samples[-1][3]:6.0f} s", flush=True)
                mark += args.every
        wall = time.monotonic() - t0
        c.close()
    finally:
        stack.close()
        if pg is not None:
            from bench.chaos_services import drop_pg

            drop_pg(pg)
    report(samples, args, wall, failed)


def report(samples, args, wall: float, failed: int) -> None:
    distinct = (f", {args.distinct} distinct" if args.distinct else "") + "".join(
        f", {e}" for e in args.env)
    print(f"\n{args.n} text jobs{distinct} (1 in 4 classify, {args.labels}-label pool), one text "
          f"worker, {args.db}; {args.n / wall:.1f} jobs/s, {failed} failed\n")
    print(f"{'jobs done':>9} | {'main MiB':>8} | {'+ main':>7} | {'model MiB':>9} | "
          f"{'+ model':>7} | {'total':>7}")
    print("-" * 60)
    prev = None
    for done, main, model, _ in samples:
        dm = "" if prev is None else f"{main - prev[1]:+7.1f}"
        dd = "" if prev is None else f"{model - prev[2]:+7.1f}"
        print(f"{done:>9} | {main:8.1f} | {dm:>7} | {model:9.1f} | {dd:>7} | "
              f"{main + model:7.1f}")
        prev = (done, main, model)
    at = {d: (m, k) for d, m, k, _ in samples}

    def growth(a: int, b: int) -> str:
        if a not in at or b not in at:
            return "n/a"
        return (f"main {at[b][0] - at[a][0]:+.1f} MiB, model {at[b][1] - at[a][1]:+.1f} MiB "
                f"(total {sum(at[b]) - sum(at[a]):+.1f})")

    last = samples[-1][0] if samples else 0
    print("\nRSS at 2k: " + (f"main {at[2000][0]:.1f}, model {at[2000][1]:.1f} MiB"
                             if 2000 in at else "n/a")
          + f"; at {last}: main {samples[-1][1]:.1f}, model {samples[-1][2]:.1f} MiB")
    print(f"growth 2k->4k: {growth(2000, 4000)}")
    if last > 4000:
        print(f"growth 4k->{last}: {growth(4000, last)}; per 2k over that stretch: "
              f"{(sum(at[last]) - sum(at[4000])) / ((last - 4000) / 2000):+.1f} MiB")
    half = (last // 2 // args.every) * args.every
    if half > 4000:
        print(f"growth {half}->{last} (second half): {growth(half, last)}")


if __name__ == "__main__":
    main()
