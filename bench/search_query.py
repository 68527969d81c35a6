"""How long a search takes to embed its query: a short job on the text queue (what the
API does) against the text tower loaded in the searching process (what the API would
have to do instead, with torch in it), on a running stack: a private redis-server,
a SQLite store, one real text worker, 1,000 stored texts.

Also the queued path behind a backlog: the query waits its turn in the queue, the
cost of keeping torch out of the API.

    .venv/bin/python bench/search_query.py [--queries 50] [--stored 1000] [--backlog 2000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench.e2e` when run as a script

from bench.e2e import Stack  # noqa: E402
from core.search import SearchFilters  # noqa: E402
from core.training.samples import sentences  # noqa: E402
from producer.sdk import Client  # noqa: E402
from producer.sdk.search import run_search  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(xs) -> tuple[float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--stored", type=int, default=1000)
    ap.add_argument("--backlog", type=int, default=2000, help="0 = skip")
    args = ap.parse_args()
    queries = [f"a photo of {w}" for w in sentences(args.queries, seed=7)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            db = stack.fresh_db()
            stack.start_worker("text", db, MMQ_METRICS_LOG_EVERY_S=0)
            c = Client(stack.broker, db)
            c.wait(c.submit_many([{"modality": "text", "input": s}
                                  for s in sentences(args.stored, seed=3)]), timeout=600)
            run_search(c, "warm-up", k=10)  # the cache's first load, the worker's first job
            rss0 = rss_mib()
            total, embed, search = [], [], []
            for q in queries:
                t = time.perf_counter()
                res = run_search(c, q, k=10)
                total.append(time.perf_counter() - t)
                embed.append(res.embed_s)
                search.append(res.search_s)
            rows.append(("queued (text worker)", *pct(embed), *pct(search), *pct(total),
                         rss0))
            if args.backlog:
                c.submit_many([{"modality": "text", "input": s}
                               for s in sentences(args.backlog, seed=11)])
                t = time.perf_counter()
                res = run_search(c, queries[0], k=10)
                dt = time.perf_counter() - t
                rows.append((f"queued, {args.backlog} jobs ahead", res.embed_s * 1e3,
                             res.embed_s * 1e3, res.search_s * 1e3, res.search_s * 1e3,
                             dt * 1e3, dt * 1e3, rss0))
            inproc = in_process(c, queries)
            rows.append(inproc)
            c.close()
        finally:
            stack.close()
    print(f"\n{'query path':<28}{'embed p50':>10}{'p99':>8}{'search p50':>11}{'p99':>8}"
          f"{'total p50':>10}{'p99':>8}{'RSS MiB':>9}   (ms; {args.stored} stored texts)")
    for name, *v in rows:
        print(f"{name:<28}{v[0]:>10.1f}{v[1]:>8.1f}{v[2]:>11.2f}{v[3]:>8.2f}{v[4]:>10.1f}"
              f"{v[5]:>8.1f}{v[6]:>9.0f}")


def in_process(c: Client, queries: list[str]) -> tuple:
    """The text tower in this process: its embedding, then the same engine."""
    import torch

    from core.model.multimodal import MultimodalModel

    torch.set_num_threads(1)  # an API process must leave the cores to the workers
    model = MultimodalModel.load(device="cpu")
    rss = rss_mib()
    engine = c.search_engine()
    version = next(iter(engine.shards))
    model.embed("text", ["warm-up"])
    embed, search = [], []
    for q in queries:
        t = time.perf_counter()
        v = model.embed("text", [q])[0].numpy()
        t1 = time.perf_counter()
        engine.search(v, version, SearchFilters(), 10)
        embed.append(t1 - t)
        search.append(time.perf_counter() - t1)
    tot = [a + b for a, b in zip(embed, search, strict=True)]
    return ("in-process text tower", *pct(embed), *pct(search), *pct(tot), rss)


if __name__ == "__main__":
    main()
