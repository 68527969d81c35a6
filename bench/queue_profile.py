"""Where a text job's CPU goes between Redis and the SQL row, and what the queue keeps
of the model's own speed.

Runs N text jobs through a real worker (producer -> Redis -> one worker -> SQLite)
and prints, per job: the CPU time of each process (the worker, its model process,
redis-server, the producer), the worker's CPU split by component (a sampling profile
by py-spy: Celery/kombu fetch, decode and ack; the task threads; the pipe to the
model process; the group-commit writer; SQL; events for Flower), and jobs/s against
mmq's own model offline (``MultimodalModel.embed``) on the same texts, measured in
the same run.

    .venv/bin/python bench/queue_profile.py [--n 3000] [--texts FILE] [--rounds 2]
        [--spy [--spy-keep DIR]] [--baseline-tree DIR] [--per-message 1,8]
        [--worker-env "MMQ_MAX_BATCH_SIZE=64;MMQ_MAX_BATCH_SIZE=128"]

``--baseline-tree DIR``: another checkout of mmq (a detached worktree of an earlier
commit; its attention kernels are built in place first if it has none); its worker
runs alternately with this tree's, round by round, on the same
Redis, texts and producer, so that the two are compared under the same load.
``--per-message 1,8``: this tree's worker, with producers sending 1 and 8 jobs per Celery
message (MMQ_JOBS_PER_MESSAGE), alternating round by round.
``--worker-env "A=1;A=2,B=3"``: this tree's worker under each set of environment
variables (";" between sets, "," within one), alternating round by round.
``--spy``: also profile the worker process with py-spy (the dev extra), in a round
of its own after the timed rounds (sampling costs some CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.e2e import Stack, batching_summary, mmq_offline, read_texts, run_jobs  # noqa: E402
from core.config import get_settings  # noqa: E402
from core.serving.procs import keep_freed_memory  # noqa: E402
from producer.sdk import Client  # noqa: E402

DEFAULT_TEXTS = ROOT / "bench" / "data" / "short_sentences.txt"
TICK = os.sysconf("SC_CLK_TCK")

# A sample belongs to the first of these that its stack names, from the innermost
# frame outwards; plain standard-library frames (threading, json, queue, socket)
# count for the caller that is classified. First match per frame wins.
COMPONENTS = (
    ("events for Flower", ("celery/events/", "_flush_events", "send_event")),
    ("SQL (SQLAlchemy + sqlite3)", ("sqlalchemy/", "sqlite3/", "core/store/", "psycopg")),
    ("pipe to the model process", ("multiprocessing/", "core/serving/modelproc.py")),
    ("group-commit writer", ("core/serving/writer.py", "core/serving/drain.py")),
    ("host stages (start/prepare/record)", ("core/serving/host.py",
                                            "core/serving/stages.py")),
    ("lease, sweep, metrics", ("core/serving/lease.py", "core/broker/sweep.py",
                               "core/serving/metrics.py", "core/serving/exporter.py")),
    ("task body + threads pool", ("workers/tasks.py", "celery/concurrency/thread.py",
                                  "celery/app/trace.py", "concurrent/futures/thread.py")),
    ("Redis client (redis-py)", ("redis/",)),
    ("Celery/kombu fetch, decode, ack", ("kombu/", "celery/", "vine/", "billiard/",
                                         "workers/app.py", "workers/poison.py")),
)


def build_kernels(tree: Path) -> None:
    """Build a checkout's CPU attention kernels in place, as its ``pip install -e`` would.
    A fresh worktree has none, and its worker then falls back to SDPA: a comparison
    with this tree measured that fallback, not the change (the model process took
    3.12 against 2.79 CPU ms per job with identical code)."""
    if not (tree / "setup.py").exists() or any(
            (tree / "core/model/kernels").glob("_varlen_attn_*.so")):
        return
    print(f"building the attention kernels in {tree} (setup.py build_ext --inplace)")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                   check=True, stdout=subprocess.DEVNULL)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / TICK


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (t / "children").read_text().split()]
    return out


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, marks in COMPONENTS:
            if any(m in frame for m in marks):
                return name
    return "other"


def spy_table(raw: Path) -> Counter:
    """py-spy's raw (collapsed) stacks -> samples per component."""
    got: Counter = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit() and "(" in stack:  # "(": not an empty (frameless) stack
            got[classify(stack)] += int(n)
    return got


def one_run(stack: Stack, tree: Path, texts: list[str], spy: Path | None = None,
            per_message: int | None = None, worker_env: dict | None = None) -> dict:
    """``per_message``: the producer's jobs per Celery message (None: its settings').
    ``worker_env``: extra environment of the worker (settings to compare)."""
    db = stack.fresh_db()
    env = {"PYTHONPATH": str(tree), **(worker_env or {})}
    log = stack.start_worker("text", db, cwd=tree, **env)
    worker = stack.workers[-1][0].pid
    kids = child_pids(worker)
    settings = get_settings()
    if per_message is not None:
        settings = settings.model_copy(update={"jobs_per_message": per_message})
    c = Client(broker_url=stack.broker, database_url=db, settings=settings)
    pids = {"worker": [worker], "model process": kids, "redis-server": [stack.redis.pid]}
    before = {k: sum(proc_cpu(x) for x in v) for k, v in pids.items()}
    me0 = sum(os.times()[:2])
    if spy is not None:  # attached once the worker is ready: its start-up is not counted
        spy_proc = subprocess.Popen(
            [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
             "--pid", str(worker), "--format", "raw", "--full-filenames", "--gil",
             "-r", "200", "-o", str(spy)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    r = run_jobs(c, [{"modality": "text", "input": t} for t in texts])
    cpu = {k: sum(proc_cpu(x) for x in v) - before[k] for k, v in pids.items()}
    cpu["producer + poll (this process)"] = sum(os.times()[:2]) - me0
    c.close()
    if spy is not None:  # py-spy writes its profile on Ctrl-C
        spy_proc.send_signal(signal.SIGINT)
        spy_proc.wait(120)
    stack.stop_workers()
    r["cpu"] = cpu
    r["log"] = log
    return r


def offline_run(model, texts: list[str]) -> tuple[float, float]:
    """mmq's model offline on these texts: (texts/s, CPU ms per text of this process)."""
    import torch

    passes = 2 if torch.get_num_threads() > 1 else 1  # one forward and two (mmq_offline)
    c0 = time.process_time()
    rate = mmq_offline(model, texts, rounds=1)
    return rate, 1e3 * (time.process_time() - c0) / (passes * len(texts) + 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--spy", action="store_true", help="also a py-spy profile of the worker")
    ap.add_argument("--spy-keep", type=Path, help="with --spy: keep py-spy's raw stacks "
                    "in this folder (to read function by function)")
    ap.add_argument("--baseline-tree", type=Path, help="an earlier checkout to compare with")
    ap.add_argument("--per-message", help="compare producers' jobs per message on this "
                    "tree, alternating, e.g. 1,8 (MMQ_JOBS_PER_MESSAGE)")
    ap.add_argument("--worker-env", help="compare worker environments on this tree, "
                    "alternating: sets split by ';', variables by ','")
    args = ap.parse_args()
    keep_freed_memory()  # mmq's model runs so in its model process (core/serving/procs.py)
    texts = read_texts(args.texts, args.n)
    trees: dict[str, tuple[Path, int | None]] = {"this tree": (ROOT, None)}
    envs: dict[str, dict] = {}
    if args.per_message:
        trees = {f"{k}/message": (ROOT, int(k)) for k in args.per_message.split(",")}
    if args.worker_env:
        for i, spec in enumerate(args.worker_env.split(";"), 1):
            name = f"env {i}"
            print(f"{name}: {spec}")
            trees[name] = (ROOT, None)
            envs[name] = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        trees.pop("this tree", None)
    if args.baseline_tree:
        build_kernels(args.baseline_tree.resolve())
        trees = {"baseline": (args.baseline_tree.resolve(), None), **trees}
    from core.model.multimodal import MultimodalModel

    model = MultimodalModel.load(device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="mmq-qprof-"))
    stack = Stack(tmp)
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    offline: list[tuple[float, float]] = []
    try:
        for i in range(args.rounds):
            offline.append(offline_run(model, texts))
            # Alternate the order: the machine's load drifts, and a fixed order would
            # give one tree the same share of the drift every round.
            order = list(trees.items())
            for name, (tree, k) in (order if i % 2 == 0 else order[::-1]):
                r = one_run(stack, tree, texts, per_message=k, worker_env=envs.get(name))
                runs[name].append(r)
                b = batching_summary(r["log"])
                print(f"round {i + 1} {name:<10} {r['jobs_per_s']:7.1f} jobs/s "
                      f"(offline {offline[-1][0]:.1f}/s: {r['jobs_per_s'] / offline[-1][0]:.2f}x)"
                      f"; mean batch {b.get('mean_batch_size', '?')}, model "
                      f"{b.get('mean_model_ms', '?')} ms/batch", flush=True)
        offline.append(offline_run(model, texts))
        spied = {}
        if args.spy:
            for name, (tree, k) in trees.items():
                raw = tmp / f"spy-{name.replace(' ', '_').replace('/', '_')}.txt"
                one_run(stack, tree, texts, spy=raw, per_message=k, worker_env=envs.get(name))
                spied[name] = spy_table(raw)
                if args.spy_keep:
                    args.spy_keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(raw, args.spy_keep / raw.name)
    finally:
        stack.close()
    off = sorted(o[0] for o in offline)[len(offline) // 2]
    off_cpu = sorted(o[1] for o in offline)[len(offline) // 2]
    n = len(texts)
    print(f"\n{n} short text jobs ({args.texts.name}), one worker, SQLite, Redis; mmq offline "
          f"(MultimodalModel.embed, one or two forwards at once, the best; same texts) "
          f"median {off:.1f}/s over {len(offline)} runs")
    print(f"{'':<34}" + "".join(f"{k:>14}" for k in trees))
    best = {k: max(v, key=lambda r: r["jobs_per_s"]) for k, v in runs.items()}
    med = {k: sorted(r["jobs_per_s"] for r in v)[len(v) // 2] for k, v in runs.items()}
    print(f"{'jobs/s (median of rounds)':<34}" + "".join(f"{med[k]:>14.1f}" for k in trees))
    print(f"{'  / mmq offline':<34}" + "".join(f"{med[k] / off:>13.2f}x" for k in trees))
    print(f"{'p50 latency ms (best round)':<34}"
          + "".join(f"{1e3 * best[k]['p50']:>14.0f}" for k in trees))
    if len(runs) > 1:  # paired by round: on a drifting VM the medians alone mislead
        first = next(iter(runs))
        ahead = {k: sum(a["jobs_per_s"] > b["jobs_per_s"]
                        for a, b in zip(v, runs[first], strict=True))
                 for k, v in runs.items()}
        print(f"{'rounds ahead of ' + first:<34}"
              + "".join(f"{'-' if k == first else f'{ahead[k]} of {len(v)}':>14}"
                        for k, v in runs.items()))
    print("CPU ms per job (median of rounds)")
    for proc in next(iter(runs.values()))[0]["cpu"]:
        vals = {k: sorted(1e3 * r["cpu"][proc] / n for r in v)[len(v) // 2]
                for k, v in runs.items()}
        print(f"  {proc:<32}" + "".join(f"{vals[k]:>14.2f}" for k in trees))
    tot = {k: sorted(1e3 * sum(r["cpu"].values()) / n for r in v)[len(v) // 2]
           for k, v in runs.items()}
    print(f"  {'all four':<32}" + "".join(f"{tot[k]:>14.2f}" for k in trees))
    print(f"  {'mmq offline, CPU ms per text':<32}{off_cpu:>14.2f}")
    print(f"{'offline CPU / e2e CPU per job':<34}"
          + "".join(f"{off_cpu / tot[k]:>13.2f}x" for k in trees)
          + "  (the jobs/s ratio on an idle machine whose cores all do this work)")
    if spied:
        print("\nworker process CPU by component (py-spy samples, share of the worker's CPU; "
              "ms per job from the worker's CPU in the timed rounds)")
        wcpu = {k: sorted(1e3 * r["cpu"]["worker"] / n for r in v)[len(v) // 2]
                for k, v in runs.items()}
        names = [c for c, _ in COMPONENTS] + ["other"]
        for comp in names:
            cells = []
            for k in trees:
                total = sum(spied[k].values()) or 1
                share = spied[k][comp] / total
                cells.append(f"{100 * share:>6.1f}% {wcpu[k] * share:>5.2f}")
            print(f"  {comp:<36}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
