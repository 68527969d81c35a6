"""CPU per job of a worker's own path, without Celery and without a model: the host's
stages, the group-commit writer and SQLite, for short text jobs.

``bench/queue_profile.py`` measures the whole queue, where the model's forward is 90%
of the CPU and the VM's noise swamps a change of a few percent in the rest. Here a
stand-in model answers each hand-over at once, from a receiver thread inside
``Drain.deferred`` as the model process's receiver does, so what is timed is what the
worker spends per job between a message's job ids and their committed predictions:
the start (UPDATE ... RETURNING), the prepare stage, the hand-over, the record (the
fenced UPDATE and the predictions' upsert), the futures and callbacks between them.
Several task threads hand over 16-job messages (``process_many``) as ``run_jobs`` does.

    .venv/bin/python bench/host_path.py [--msgs 400] [--rounds 5] [--threads 4]
        [--baseline-tree DIR] [--spy]

``--baseline-tree DIR``: another checkout of mmq (a detached worktree of an earlier
commit), run alternately with this tree, round by round, each round in a fresh process
on a fresh database. ``--spy``: after the rounds, a py-spy profile (GIL holder, 500 Hz)
of one more run of this tree: the frames that take the most of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_MESSAGE = 16  # MMQ_JOBS_PER_MESSAGE's default


def child(msgs: int, threads: int) -> dict:
    """One run in this process (``sys.path`` already points at the tree to time)."""
    import queue
    from concurrent.futures import Future
    from contextlib import nullcontext

    import numpy as np

    from core import store
    from core.config import Settings
    from core.jobs import JobResult
    from core.serving.host import ModelHost
    from core.serving.metrics import BatchMetrics
    from core.serving.writer import GroupWriter
    from core.store.migrations import upgrade

    try:
        from core.serving.drain import Drain
        deferred = Drain.deferred
    except ImportError:  # a tree from before the drain
        deferred = nullcontext

    class AnsweringModel:
        """Answers every hand-over at once, from its own thread, as one report."""

        version, device, cfg = "bench-1", "cpu", None

        def __init__(self):
            self.q: queue.Queue = queue.Queue()
            threading.Thread(target=self._answer, daemon=True).start()

        def submit(self, request):
            return self.submit_many([request])[0]

        def submit_many(self, requests):
            futs = [Future() for _ in requests]
            self.q.put(futs)
            return futs

        def _answer(self):
            emb = np.random.default_rng(0).random(384, dtype=np.float32)  # (384,)
            while True:
                futs = self.q.get()
                with deferred():
                    for f in futs:
                        f.set_result(JobResult(embedding=emb, tokens=12, truncated=False))

        def cancel(self, job_ids):
            pass

        def close(self):
            pass

    url = f"sqlite:///{tempfile.mkdtemp(prefix='mmq-host-path-')}/mmq.db"
    upgrade(url)
    settings = Settings(database_url=url, device="cpu", model_process=False)
    sessions = store.session_factory(store.make_engine(url))
    lock = threading.Lock()  # SQLite: one writer per process, as start_host sets up
    host = ModelHost(settings, AnsweringModel(), BatchMetrics(), sessions,
                     GroupWriter(sessions, lock), lock)
    n = msgs * PER_MESSAGE
    with host.tx() as s:
        ids = [j for j, _ in store.create_jobs(session=s, rows=[
            {"modality": "text", "task": "embed", "text": f"a short sentence, number {i}"}
            for i in range(n)])]
    messages = [ids[i:i + PER_MESSAGE] for i in range(0, n, PER_MESSAGE)]

    def task_thread(mine: list[list[str]]) -> None:
        for m in mine:
            if hasattr(host, "process_many"):
                futs = list(host.process_many(m, "w1").values())
            else:  # a tree from before BatchRun: one job at a time
                futs = [host.process(j, "w1") for j in m]
            for f in futs:
                assert f.result(timeout=120)["status"] == "succeeded"

    workers = [threading.Thread(target=task_thread, args=(messages[k::threads],))
               for k in range(threads)]
    c0, t0 = time.process_time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"cpu_ms": 1e3 * cpu / n, "wall_ms": 1e3 * wall / n, "jobs": n}


def run_tree(tree: Path, msgs: int, threads: int, spy: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree),
           "--msgs", str(msgs), "--threads", str(threads)]
    if spy is not None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [exe, "record", "--gil", "-r", "500", "--format", "raw", "--full-filenames",
               "-o", str(spy), "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "MMQ_LOG_LEVEL": "WARNING"})
    # py-spy adds lines of its own after the run's
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def top_frames(raw: Path, n: int = 25) -> list[tuple[float, str]]:
    """py-spy's raw stacks -> (share of samples, frame) for the frames that most samples
    pass through (inclusive), the run's set-up (the migrations, the job rows) left out."""
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or any(k in stack for k in ("create_jobs", "migrations", "importlib")):
            continue
        total += int(count)
        frames = {f.split(" (")[0] + " " + f.split(" (")[-1].split("site-packages/")[-1]
                  .replace(str(ROOT) + "/", "").split(":")[0] for f in stack.split(";")}
        for f in frames:
            if "threading.py" not in f:
                incl[f] += int(count)
    return [(v / max(1, total), k) for k, v in incl.most_common(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--msgs", type=int, default=400, help=f"messages of {PER_MESSAGE} jobs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=4, help="task threads handing over")
    ap.add_argument("--baseline-tree", type=Path, help="an earlier checkout to compare with")
    ap.add_argument("--spy", action="store_true", help="also a py-spy profile of this tree")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(args.child))
        print(json.dumps(child(args.msgs, args.threads)))
        return

    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees = {"baseline": args.baseline_tree.resolve(), **trees}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))  # alternate who leads
        for name in order:
            res = run_tree(trees[name], args.msgs, args.threads)
            runs[name].append(res)
            print(f"round {r + 1} {name:<10} CPU {res['cpu_ms']:.3f} ms/job, "
                  f"wall {res['wall_ms']:.3f} ms/job", flush=True)

    jobs = args.msgs * PER_MESSAGE
    print(f"\n{jobs} short text jobs in {PER_MESSAGE}-job messages from {args.threads} task "
          "threads: host stages + group-commit writer + SQLite, a model that answers at "
          "once (no Celery, no forward)")
    names = list(trees)
    print(f"{'':<28}" + "".join(f"{n:>14}" for n in names))
    med = {n: statistics.median(x["cpu_ms"] for x in runs[n]) for n in names}
    wall = {n: statistics.median(x["wall_ms"] for x in runs[n]) for n in names}
    print(f"{'CPU ms per job (median)':<28}" + "".join(f"{med[n]:>14.3f}" for n in names))
    print(f"{'wall ms per job (median)':<28}" + "".join(f"{wall[n]:>14.3f}" for n in names))
    if "baseline" in runs:
        ahead = sum(a["cpu_ms"] < b["cpu_ms"]
                    for a, b in zip(runs["this tree"], runs["baseline"], strict=True))
        print(f"{'this tree / baseline (CPU)':<28}{'':>14}"
              f"{med['this tree'] / med['baseline']:>13.2f}x")
        print(f"{'rounds ahead of baseline':<28}{'-':>14}{f'{ahead} of {args.rounds}':>14}")
    if args.spy:
        with tempfile.TemporaryDirectory() as d:
            raw = Path(d) / "spy.txt"
            run_tree(ROOT, args.msgs, args.threads, spy=raw)
            print("\nwhere this tree's CPU goes (py-spy, GIL holder; share of samples that "
                  "pass through each frame)")
            for share, frame in top_frames(raw):
                print(f"  {100 * share:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
