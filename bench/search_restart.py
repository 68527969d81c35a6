"""Search restarts: the HNSW index rebuilt by each API process (the baseline, measured
in the same run) against the index saved once and memory-mapped (core/search/saved.py).

The parent builds the index over synthetic clustered vectors (bench/search.py's data)
and saves it; then two fresh child processes, one after the other while the first is
still alive, each rebuild the same cache and time restart-to-first-answer from the
saved file (read + checksum + map + the first search), then report their memory
(RSS, and from /proc/self/smaps_rollup the anonymous memory: what a process does not
share) before and after the index step, and recall@10 against exact search.
The file is in the page cache (the parent just wrote it): a cold disk adds its read
time once per host. The float32 vector cache (1.5 GiB per million) is not part of
this: it is loaded from SQL per process as before.

    .venv/bin/python bench/search_restart.py [--size 200000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.search import VERSION, make_queries, make_shard, recall  # noqa: E402
from core.search import SearchConfig, SearchEngine, SearchFilters  # noqa: E402
from core.search.ann import AnnConfig  # noqa: E402
from core.search.saved import IndexStore  # noqa: E402


def mem() -> dict[str, float]:
    """MiB: RSS, PSS and anonymous (private, not file-backed) memory of this process."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous"):
            out[key.lower()] = int(rest.split()[0]) / 1024
    return out


def engine(index_dir: str | None, args) -> SearchEngine:
    cfg = SearchConfig(ann_min=0, ann=AnnConfig(), background_build=False,
                       index_dir=index_dir)
    return SearchEngine(None, cfg)


def data(args):
    rng = np.random.default_rng([args.seed, args.size])
    shard, centres, spread = make_shard(args.size, rng)
    return shard, make_queries(shard, centres, spread, args.queries, rng)


def truth_of(eng, shard, queries, k):
    return [shard.exact(q, k, shard.n, None)[0] for q in queries]


def child(args) -> None:
    """One API process restarting: the cache, then the saved index, then searches."""
    shard, queries = data(args)
    truth = truth_of(None, shard, queries, args.k)
    eng = engine(args.dir, args)
    eng.shards[VERSION] = shard
    before = mem()
    t = time.perf_counter()
    eng._index_new_rows(shard)  # maps the saved index (what a restart's refresh does)
    eng._nearest(shard, queries[0], SearchFilters(), args.k)
    first = time.perf_counter() - t
    assert shard.ann is not None and not shard.ann.mutable, "the saved index was not mapped"
    got = [eng._nearest(shard, q, SearchFilters(), args.k)[0] for q in queries]
    after = mem()
    print(json.dumps({"first_s": first, "recall": recall(got, truth, args.k),
                      **{f"d_{k}": after[k] - before[k] for k in after},
                      "rss": after["rss"]}), flush=True)
    sys.stdin.readline()  # stay alive (mapped) until the parent says so


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.dir = tmp
        shard, queries = data(args)
        truth = truth_of(None, shard, queries, args.k)
        eng = engine(None, args)
        eng.shards[VERSION] = shard
        m0 = mem()
        t = time.perf_counter()
        idx, n0 = eng._build_rows(shard)
        shard.ann, shard.ann_rows = idx, n0
        build = time.perf_counter() - t
        eng._nearest(shard, queries[0], SearchFilters(), args.k)
        rebuild_first = time.perf_counter() - t
        got = [eng._nearest(shard, q, SearchFilters(), args.k)[0] for q in queries]
        m1 = mem()
        rec_mem = recall(got, truth, args.k)
        store = IndexStore(tmp)
        t = time.perf_counter()
        with store.locked(VERSION):
            meta = store.save(VERSION, idx.index, shard.job_ids[:n0], AnnConfig())
        save = time.perf_counter() - t
        mib = (meta.index_bytes + meta.ids_bytes) / 2**20
        del idx, shard, eng
        cmd = [sys.executable, __file__, "--child", "--dir", tmp, "--size", str(args.size),
               "--queries", str(args.queries), "--seed", str(args.seed), "--k", str(args.k)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        procs, res = [], []
        for _ in range(2):  # the 2nd starts while the 1st still maps the index
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
            res.append(json.loads(p.stdout.readline()))
            procs.append(p)
        for p in procs:
            p.communicate("exit\n")
    n = args.size
    print(f"\n{n:,} vectors x 384, i8 HNSW (M=16, efC=128), saved files {mib:.0f} MiB; "
          f"{os.cpu_count()} CPU cores (shared); one run")
    print(f"{'':<34}{'seconds':>9}{'rss +MiB':>10}{'anon +MiB':>10}{'pss +MiB':>10}"
          f"{'rec@10':>8}")
    print(f"{'build (baseline: every process)':<34}{build:>9.1f}{m1['rss'] - m0['rss']:>10.0f}"
          f"{m1['anonymous'] - m0['anonymous']:>10.0f}{m1['pss'] - m0['pss']:>10.0f}"
          f"{rec_mem:>8.3f}")
    print(f"{'save (once)':<34}{save:>9.1f}")
    for i, r in enumerate(res, 1):
        print(f"{f'process {i}: map + first answer':<34}{r['first_s']:>9.2f}{r['d_rss']:>10.0f}"
              f"{r['d_anonymous']:>10.0f}{r['d_pss']:>10.0f}{r['recall']:>8.3f}")
    scale = 1_000_000 / n
    print(f"\nrestart to first answer: rebuild {rebuild_first:.1f} s, mapped "
          f"{res[0]['first_s']:.2f} s ({rebuild_first / res[0]['first_s']:.0f}x faster)")
    print(f"extrapolated linearly to 1 M (not measured): mapped first answer "
          f"~{res[0]['first_s'] * scale:.1f} s (target <= 10), 2nd process's index memory "
          f"~{res[1]['d_anonymous'] * scale:.0f} MiB anonymous (target <= 200 MB; the "
          f"float32 cache's 1.5 GiB is per process and not counted)")


if __name__ == "__main__":
    main()
