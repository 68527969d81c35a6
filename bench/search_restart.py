"""Search restarts with N stored vectors (issue 23: 1 M, first search <= 10 s, a second
API process <= 200 MB, new results appended without a rebuild), through the engine
the API runs (SearchEngine over a SQLite store), each "API process" a fresh Python
process:

- private (the baseline, measured in the same run): the vector cache read from SQL
  into the process's own memory, as every process did before the saved cache; its
  first answer is exact (the index would then be built: build time in the next row);
- first start: no saved files: the cache read from SQL straight into the shared files,
  first answer exact, then the HNSW index built and saved (what a host pays once);
- restart, cold: the saved files and the database evicted from the page cache
  (posix_fadvise DONTNEED), then a fresh process: map, check against SQL, catch up,
  first answer (ANN);
- restart, warm: a second process while the first still runs: its private memory
  (USS = Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) and what the sum of
  both processes' PSS grew by;
- append: new results stored in SQL, then the first process's refresh (read from SQL,
  appended to the files and to the in-memory delta index: no rebuild), then the
  second's (taken from the files);
- recall@10 of the restarted process's ANN answers against exact search, over queries
  shaped as in bench/search.py.

Memory: "USS" is what a process holds alone; "+ interp" subtracts the same process's
USS before the engine was made (Python, numpy, SQLAlchemy, usearch imported).

    .venv/bin/python bench/search_restart.py --size 200000 [--db DIR] [--append 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.search import VERSION, make_queries, make_shard, recall  # noqa: E402

DIM = 384


def proc_mem(pid: int | str = "self") -> dict[str, float]:
    """MiB from /proc/PID/smaps_rollup: rss, pss, uss (private clean + dirty)."""
    out = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        kib = rest.split()[0] if rest.split() else "0"
        if key == "Rss":
            out["rss"] = int(kib) / 1024
        elif key == "Pss":
            out["pss"] = int(kib) / 1024
        elif key in ("Private_Clean", "Private_Dirty"):
            out["uss"] += int(kib) / 1024
    return out


def evict(paths) -> None:
    """Drop files' clean pages from the page cache (a cold restart)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- the store -----------------------------------------------------------------------------------


def make_store(db: Path, n: int, seed: int, append: int):
    """n stored results (and ``append`` more kept back) -> (url, queries, extra rows)."""
    from core import store
    from core.store.migrations import upgrade

    rng = np.random.default_rng([seed, n])
    shard, centres, spread = make_shard(n + append, rng)
    queries = make_queries(shard, centres, spread, 1000, rng)
    url = f"sqlite:///{db}"
    ids = [str(uuid.uuid4()) for _ in range(n + append)]
    if not db.exists():
        t = time.perf_counter()
        upgrade(url)
        factory = store.session_factory(store.make_engine(url))
        insert(factory, shard, ids, 0, n)
        print(f"[store] {n:,} results inserted in {time.perf_counter() - t:.0f} s",
              flush=True)
    return url, queries, (shard, ids)


def insert(factory, shard, ids, lo: int, hi: int, step: int = 20_000) -> None:
    from core.store import vectors

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        jobs, preds = [], []
        for i in range(a, b):
            at = t0 + timedelta(milliseconds=50 * i)  # 20 results/s: the window holds 600
            jobs.append({"id": ids[i], "modality": "text", "task": "embed", "params": {},
                         "status": "succeeded", "attempts": 1, "created_at": at,
                         "started_at": at, "finished_at": at, "text": f"text {i}"})
            preds.append({"job_id": ids[i], "embedding": shard.vecs[i].tobytes(),
                          "dim": DIM, "model_version": VERSION, "created_at": at})
        with factory.begin() as s:
            vectors.insert_results(session=s, jobs=jobs, predictions=preds)


# -- one API process -------------------------------------------------------------------------------


def child(args) -> None:
    from core import store
    from core.search import SearchConfig, SearchEngine, SearchFilters

    m0 = proc_mem()
    factory = store.session_factory(store.make_engine(args.url))
    cfg = SearchConfig(index_dir=args.dir or None, refresh_s=0,
                       ann_min=10**12 if args.private else args.ann_min)
    eng = SearchEngine(factory, cfg)
    queries = np.load(args.queries)
    t = time.perf_counter()
    hits, stats = eng.search(queries[0], VERSION, SearchFilters(), k=10)
    now = time.time()
    say({"first_s": time.perf_counter() - t, "since_start_s": now - args.started,
         "method": stats.method, "n": stats.searched, "base_uss": m0["uss"],
         "hits": len(hits)})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "build":  # wait for the background build (and save)
            t = time.perf_counter()
            for th in eng.builds:
                th.join()
            say({"build_wait_s": time.perf_counter() - t, **eng.stats()[VERSION]})
        elif cmd[0] == "refresh":
            t = time.perf_counter()
            n = eng.refresh(force=True)
            say({"refresh_s": time.perf_counter() - t, "loaded": n, **eng.stats()[VERSION]})
        elif cmd[0] == "recall":
            shard = eng.shards[VERSION]
            got, truth, lat = [], [], []
            for q in queries[:int(cmd[1])]:
                t = time.perf_counter()
                rows, _, st = eng._nearest(shard, q, SearchFilters(), 10)
                lat.append(time.perf_counter() - t)
                got.append(rows)
                truth.append(shard.exact(q, 10, shard.n, None)[0])
            say({"recall": recall(got, truth, 10), "p50_ms": 1e3 * float(np.median(lat)),
                 "method": st.method})
        elif cmd[0] == "exit":
            return


def say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class Proc:
    def __init__(self, args, private: bool = False):
        cmd = [sys.executable, __file__, "--child", "--url", args.url, "--queries-file",
               args.queries_file, "--started", repr(time.time()),
               "--ann-min", str(args.ann_min)]
        if not private:
            cmd += ["--dir", args.dir]
        else:
            cmd += ["--private"]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.first = self.read()

    def read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the child exited ({self.p.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def mem(self) -> dict:
        return proc_mem(self.p.pid)

    def close(self) -> None:
        self.p.communicate("exit\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=200_000)
    ap.add_argument("--append", type=int, default=10_000, help="new results to append")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ann-min", type=int, default=100_000, help="MMQ_SEARCH_ANN_MIN")
    ap.add_argument("--db", default=None, help="keep the store here (reused if there)")
    ap.add_argument("--restarts-only", action="store_true",
                    help="keep the saved files of an earlier run (--db) and measure only "
                         "the restarts (no private baseline, no build)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--url")
    ap.add_argument("--dir")
    ap.add_argument("--queries-file")
    ap.add_argument("--started", type=float)
    args = ap.parse_args()
    if args.child:
        args.queries = args.queries_file
        child(args)
        return
    work = Path(args.db or tempfile.mkdtemp(prefix="mmq-restart-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / f"store-{args.size}.db"
    args.url, queries, (shard, ids) = make_store(db, args.size, args.seed, args.append)
    args.queries_file = str(work / "queries.npy")
    np.save(args.queries_file, queries.astype(np.float32))
    args.dir = str(work / "index")
    if not args.restarts_only:
        shutil.rmtree(args.dir, ignore_errors=True)
    rows = {}
    try:
        if not args.restarts_only:
            p = Proc(args, private=True)  # baseline: the cache read into private memory
            rows["private"] = {**p.first, **p.mem()}
            p.close()
            a = Proc(args)  # the first start: SQL into the files, then build + save
            rows["first"] = {**a.first, **a.mem()}
            rows["build"] = a.ask("build")
            a.close()
        files = [str(f) for f in Path(args.dir).iterdir() if f.is_file()]
        evict(files + [str(db)])
        b = Proc(args)  # restart, cold page cache
        rows["cold"] = {**b.first, **b.mem()}
        pss_b = b.mem()["pss"]
        c = Proc(args)  # a second process while the first runs
        rows["warm"] = {**c.first, **c.mem()}
        rows["warm"]["sum_pss_added"] = c.mem()["pss"] + b.mem()["pss"] - pss_b
        rows["recall"] = b.ask(f"recall {args.queries}")
        from core import store  # the new results, then each process's refresh

        factory = store.session_factory(store.make_engine(args.url))
        insert(factory, shard, ids, args.size, args.size + args.append)
        rows["append_b"] = b.ask("refresh")
        rows["append_c"] = c.ask("refresh")
        rows["after"] = {"b": b.mem(), "c": c.mem()}
        b.close()
        c.close()
    finally:
        if args.db is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(rows), file=sys.stderr)
    table(args, rows)


def table(args, r) -> None:
    n = r["cold"]["n"]  # a kept --db also holds earlier runs' appended rows
    print(f"\n{n:,} stored vectors x {DIM} (SQLite), i8 HNSW M=16; {os.cpu_count()} CPU "
          f"cores shared with other work (loaded); one run")
    print(f"{'':<44}{'first answer s':>15}{'from exec s':>12}{'USS MiB':>9}"
          f"{'+interp':>9}{'PSS MiB':>9}")

    def line(name, x):
        print(f"{name:<44}{x['first_s']:>15.2f}{x['since_start_s']:>12.2f}{x['uss']:>9.0f}"
              f"{x['uss'] - x['base_uss']:>9.0f}{x['pss']:>9.0f}")

    if "private" in r:
        line("private cache from SQL (baseline, exact)", r["private"])
        line("first start: SQL -> saved files (exact)", r["first"])
        b = r["build"]
        print(f"{'  then HNSW build + save (once per host)':<44}{b['build_wait_s']:>15.1f}"
              "  (after the first answer, in the background)")
    line(f"restart, cold page cache ({r['cold']['method']})", r["cold"])
    line(f"2nd process, warm ({r['warm']['method']})", r["warm"])
    w = r["warm"]
    print(f"\n2nd process adds: USS {w['uss']:.0f} MiB ({w['uss'] - w['base_uss']:.0f} MiB "
          f"over its bare interpreter); sum of PSS grew {w['sum_pss_added']:.0f} MiB "
          "(target <= 200 MB)")
    if "private" not in r:
        print(f"restart to first answer: cold {r['cold']['first_s']:.2f} s, warm "
              f"{w['first_s']:.2f} s (target <= 10 s)")
    else:
        rebuild = r["private"]["first_s"] + b["build_wait_s"]
        print(f"restart to first answer: cold {r['cold']['first_s']:.2f} s, warm "
              f"{w['first_s']:.2f} s (target <= 10 s) vs {r['private']['first_s']:.1f} s "
              f"private reload ({r['private']['first_s'] / r['cold']['first_s']:.0f}x), "
              f"{rebuild:.0f} s reload + index rebuild "
              f"({rebuild / r['cold']['first_s']:.0f}x)")
    rc = r["recall"]
    print(f"recall@10 vs exact: {rc['recall']:.3f} over {args.queries} queries "
          f"({rc['method']}, p50 {rc['p50_ms']:.1f} ms)")
    ab, ac = r["append_b"], r["append_c"]
    print(f"append {args.append:,} new results: process 1 refresh {ab['refresh_s']:.2f} s "
          f"({ab['loaded']:,} read from SQL, {1e6 * ab['refresh_s'] / max(1, ab['loaded']):.0f}"
          f" us/row; delta index {ab['delta']:,} rows, no rebuild), process 2 "
          f"{ac['refresh_s']:.2f} s ({ac['loaded']} read from SQL: taken from the files)")


if __name__ == "__main__":
    main()
