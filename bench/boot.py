"""How long a worker takes to start: from ``python -m workers <modality>`` to Celery's
"ready", and to the stored result of a job that was waiting for it (what an operator
scaling up, or a restarted container, waits for), with the memory it then holds.

Each start is a fresh process on a fresh SQLite file (so it migrates) and a flushed
Redis database of a private redis-server, one job queued before the worker starts.

    .venv/bin/python bench/boot.py [--rounds 4] [--modalities text,image,audio]
        [--baseline-tree DIR]

``--baseline-tree DIR``: another checkout of mmq (a detached worktree of an earlier
commit), started alternately with this tree, round by round, which leads alternating.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `producer` and `core` when run as a script

from bench.e2e import Stack, children, rss_mb  # noqa: E402


def sample_input(modality: str) -> object:
    """A small valid input: what it says does not change a start's cost."""
    if modality == "text":
        return "a worker that has just started answers this sentence"
    if modality == "image":
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (224, 224), (200, 40, 40)).save(buf, format="PNG")
        return buf.getvalue()
    import numpy as np
    import soundfile as sf

    t = np.arange(16_000 * 2) / 16_000  # 2 s of a 440 Hz tone
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000, format="WAV")
    return buf.getvalue()


def one_start(stack: Stack, tree: Path, modality: str) -> dict:
    """Queue one job, start a worker of ``tree`` -> seconds to ready and to the job's
    stored result, and the worker's and its model process's RSS (MiB) at that point."""
    from producer.sdk import Client

    db = stack.fresh_db()
    client = Client(broker_url=stack.broker, database_url=db)
    job = client.submit_many([{"modality": modality, "input": sample_input(modality)}])[0]
    log = stack.tmp / f"boot-{modality}-{time.monotonic_ns()}.log"
    env = {**os.environ, "MMQ_BROKER_URL": stack.broker, "MMQ_DATABASE_URL": db,
           "MMQ_DEVICE": "cpu", "MMQ_WORKER_METRICS_PORT": "0", "PYTHONPATH": str(tree)}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "workers", modality], env=env, cwd=tree,
                         stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    ready = None
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace")[-2000:])
            now = time.monotonic() - t0
            if ready is None and " ready." in log.read_text(errors="replace"):
                ready = now
            if ready is not None and client.get(job)["status"] in ("succeeded", "failed"):
                result = client.get(job)
                break
            time.sleep(0.02)
        first = time.monotonic() - t0
        if result["status"] != "succeeded":
            raise RuntimeError(f"the job failed: {result.get('error')}")
        parent = rss_mb(p.pid)
        model = sum(rss_mb(c) for c in children(p.pid))
    finally:
        p.terminate()
        p.wait(60)
        client.close()
    return {"ready": ready, "first": first, "rss": parent, "model_rss": model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--modalities", default="text,image,audio")
    ap.add_argument("--baseline-tree", type=Path, help="an earlier checkout to compare with")
    args = ap.parse_args()
    modalities = args.modalities.split(",")
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees = {"baseline": args.baseline_tree.resolve(), **trees}
    runs: dict[tuple[str, str], list[dict]] = {(t, m): [] for t in trees for m in modalities}
    with tempfile.TemporaryDirectory() as d:
        stack = Stack(Path(d))
        try:
            for r in range(args.rounds):
                order = list(trees) if r % 2 == 0 else list(reversed(trees))
                for m in modalities:
                    for name in order:
                        res = one_start(stack, trees[name], m)
                        runs[name, m].append(res)
                        print(f"round {r + 1} {m:<5} {name:<9} ready {res['ready']:5.2f} s, "
                              f"first result {res['first']:5.2f} s, RSS {res['rss']:.0f} + "
                              f"{res['model_rss']:.0f} MiB", flush=True)
        finally:
            stack.close()

    print(f"\nworker start, median of {args.rounds} (s; MiB: the worker + its model process)")
    head = f"{'modality':<9}{'tree':<11}{'ready':>8}{'first result':>14}{'RSS':>14}"
    if "baseline" in trees:
        head += f"{'ready ratio':>13}{'first ratio':>13}"
    print(head + "\n" + "-" * len(head))
    for m in modalities:
        med = {t: {k: statistics.median(x[k] for x in runs[t, m])
                   for k in ("ready", "first", "rss", "model_rss")} for t in trees}
        for t in trees:
            rss = f"{med[t]['rss']:.0f} + {med[t]['model_rss']:.0f}"
            row = f"{m:<9}{t:<11}{med[t]['ready']:>8.2f}{med[t]['first']:>14.2f}{rss:>14}"
            if "baseline" in trees and t == "this tree":
                row += (f"{med[t]['ready'] / med['baseline']['ready']:>12.2f}x"
                        f"{med[t]['first'] / med['baseline']['first']:>12.2f}x")
            print(row)


if __name__ == "__main__":
    main()
