"""What submitting costs a producer: jobs/s and CPU ms per job of ``Client.submit_many``
(validate, the rows in one transaction, the Celery messages, the send times), for
short texts, against an earlier checkout measured in the same run.

Each round runs one submitting process per tree, alternately, on the same private
redis-server and a fresh SQLite file (or PostgreSQL database) each; no worker runs,
so the figures are the producer's alone.

    .venv/bin/python bench/submit.py --baseline-tree DIR [--n 6000] [--chunk 500]
        [--rounds 3] [--postgres]

``--baseline-tree DIR``: another checkout of mmq (``git worktree add --detach DIR
<commit>``); without it only this tree is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.e2e import Stack, read_texts  # noqa: E402

DEFAULT_TEXTS = ROOT / "bench" / "data" / "short_sentences.txt"
PG_ADMIN = os.environ.get("MMQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

# Run in the tree under test (its producer.sdk first on the path): submit, time, report.
CHILD = r"""
import json, sys, time
texts = json.load(sys.stdin)
from producer.sdk import Client
c = Client()
items = [{"modality": "text", "input": t} for t in texts]
c.submit_many(items[:1])  # connections, statement caches, imports: not timed
chunk = int(sys.argv[1])
cpu, wall = time.process_time(), time.perf_counter()
for i in range(1, len(items), chunk):
    c.submit_many(items[i:i + chunk])
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
n = len(items) - 1
print(json.dumps({"jobs_per_s": n / wall, "cpu_ms": 1e3 * cpu / n}))
"""


def fresh_db(stack: Stack, postgres: bool) -> tuple[str, str | None]:
    """An empty broker and store -> (database URL, PostgreSQL database name or None)."""
    url = stack.fresh_db()  # a new SQLite file; empties the broker too
    if not postgres:
        return url, None
    import psycopg

    name = f"mmq_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") \
        + f"/{name}", name


def drop_db(name: str | None) -> None:
    if name:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def submit_once(tree: Path, stack: Stack, texts: list[str], chunk: int,
                postgres: bool) -> dict:
    db, name = fresh_db(stack, postgres)
    env = {**os.environ, "PYTHONPATH": str(tree), "MMQ_BROKER_URL": stack.broker,
           "MMQ_DATABASE_URL": db}
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(chunk)], cwd=tree, env=env,
                             input=json.dumps(texts), capture_output=True, text=True,
                             check=True, timeout=600)
    finally:
        drop_db(name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--chunk", type=int, default=500, help="items per submit_many call")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--baseline-tree", type=Path, help="an earlier checkout to compare with")
    ap.add_argument("--postgres", action="store_true", help="PostgreSQL at 127.0.0.1:5432")
    args = ap.parse_args()
    texts = read_texts(args.texts, args.n + 1)
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees = {"baseline": args.baseline_tree.resolve(), **trees}
    results: dict[str, list[dict]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            for r in range(args.rounds):
                order = list(trees) if r % 2 == 0 else list(trees)[::-1]
                for name in order:
                    res = submit_once(trees[name], stack, texts, args.chunk, args.postgres)
                    results[name].append(res)
                    print(f"round {r + 1} {name:<10} {res['jobs_per_s']:8.1f} jobs/s  "
                          f"{res['cpu_ms']:.3f} CPU ms/job", flush=True)
        finally:
            stack.close()
    db = "PostgreSQL" if args.postgres else "SQLite"
    print(f"\n{args.n} short text jobs submitted in calls of {args.chunk} "
          f"(Client.submit_many, {db}, Redis, no worker); median of {args.rounds} rounds")
    first = next(iter(trees))
    print(f"{'':<12} {'jobs/s':>9} {'CPU ms/job':>11} {'jobs/s vs ' + first:>20}")
    ref = statistics.median(x["jobs_per_s"] for x in results[first])
    for name, rs in results.items():
        rate = statistics.median(x["jobs_per_s"] for x in rs)
        cpu = statistics.median(x["cpu_ms"] for x in rs)
        print(f"{name:<12} {rate:>9.1f} {cpu:>11.3f} {rate / ref:>19.2f}x")


if __name__ == "__main__":
    main()
