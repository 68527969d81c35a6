"""End-to-end throughput and latency: producer -> Redis -> one worker -> SQLite.

In one run, on the same sentences: the batched text worker, the same worker with
batching off (one job per forward), and SentenceTransformer.encode offline at its
best batch size. Then latency at light load (one job at a time), and optionally
images, audio, 1 vs 2 worker processes, and a large backlog.

    .venv/bin/python bench/e2e.py [--n 2000] [--texts FILE] [--light 30] [--towers]
                                  [--scaling] [--backlog 10000] [--rounds 2]

``--texts FILE``: your own texts, one per line (cycled up to ``--n``), instead of the
bundled sample sentences. Besides sentence-transformers, the worker is compared with
mmq's own model offline (``MultimodalModel.embed`` on the same texts): the share of the
model's speed that the queue keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
from sqlalchemy import func, select

from core import store
from core.jobs import TERMINAL
from core.training.samples import sentences
from producer.sdk import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for `producer` and `core` when run as a script

from bench.faults import free_port  # noqa: E402
from core.serving.procs import keep_freed_memory  # noqa: E402


class Stack:
    """A private redis-server and SQLite file; workers started on demand."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        port = free_port()
        self.redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp)],
                                      stdout=subprocess.DEVNULL)
        self.broker = f"redis://127.0.0.1:{port}/0"
        while True:
            try:
                redis.Redis.from_url(self.broker).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.n_db = 0
        self.workers: list[tuple[subprocess.Popen, Path]] = []

    def fresh_db(self) -> str:
        self.n_db += 1
        redis.Redis.from_url(self.broker).flushdb()
        return f"sqlite:///{self.tmp / f'bench{self.n_db}.db'}"

    def start_worker(self, modality: str, db: str, *, cwd: Path = ROOT,
                     prefix: list[str] | tuple = (), **env_extra) -> Path:
        """``cwd``: the checkout whose worker runs (with PYTHONPATH in ``env_extra``);
        ``prefix``: a command the worker runs under (a profiler)."""
        log = self.tmp / f"worker-{len(self.workers)}.log"
        env = {**os.environ, "MMQ_BROKER_URL": self.broker, "MMQ_DATABASE_URL": db,
               "MMQ_DEVICE": "cpu", "MMQ_METRICS_LOG_EVERY_S": "1", "MMQ_REQUEUE_EVERY_S": "0",
               "MMQ_WORKER_METRICS_PORT": "0",
               **{k: str(v) for k, v in env_extra.items()}}
        p = subprocess.Popen([*prefix, sys.executable, "-m", "workers", modality], env=env,
                             cwd=cwd,
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.workers.append((p, log))
        while " ready." not in log.read_text(errors="replace"):
            if p.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.2)
        return log

    def stop_workers(self) -> None:
        for p, _ in self.workers:
            p.terminate()
        for p, _ in self.workers:
            p.wait(60)
        self.workers = []

    def close(self) -> None:
        self.stop_workers()
        self.redis.terminate()


def batching_summary(log: Path) -> dict:
    lines = re.findall(r"batching (\{.*\})", log.read_text(errors="replace"))
    return json.loads(lines[-1]) if lines else {}


def run_jobs(client: Client, items: list[dict], timeout: float = 1800,
             poll_s: float = float(os.environ.get("MMQ_BENCH_POLL_S", "0.25"))) -> dict:
    """Submit all items, wait until all are terminal; throughput and latencies.

    The wall time runs from the first submit to the last job's ``finished_at``: the
    database's clock, which is this host's (the bench's store is local), so the poll's
    interval adds nothing to it, and the poll can be slow (``MMQ_BENCH_POLL_S``). Every
    50 ms, its count queries took 0.05 ms of CPU per job from the two cores the worker
    runs on (the worker's own CPU per job was higher too, 0.42 against 0.38 ms on
    average): 518 against 602 jobs/s at 0.25 s, behind in 4 of 4 alternating rounds on
    a 2-core EPYC."""
    start = datetime.now(UTC)
    t0 = time.perf_counter()
    ids: list[str] = []
    for i in range(0, len(items), 500):
        ids += client.submit_many(items[i:i + 500])
    t_sub = time.perf_counter() - t0
    while True:
        with client.sessions() as s:
            left = s.scalar(select(func.count()).select_from(store.Job).where(
                store.Job.status.in_(["queued", "running"])))
        if not left:
            break
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{left} jobs still open")
        time.sleep(poll_s)
    with client.sessions() as s:
        rows = s.execute(select(store.Job.status, store.Job.created_at,
                                store.Job.finished_at)).all()
    ok = [r for r in rows if r.status == "succeeded"]
    lat = np.array([(r.finished_at - r.created_at).total_seconds() for r in ok])
    last = max(_utc(r.finished_at) for r in rows if r.finished_at is not None)
    wall = (last - start).total_seconds()
    return {"jobs": len(ids), "succeeded": len(ok), "submit_s": t_sub, "wall_s": wall,
            "jobs_per_s": len(ok) / wall, "p50": np.percentile(lat, 50),
            "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99)}


def _utc(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)  # SQLite returns naive UTC times


def st_best(texts: list[str], sizes: tuple[int, ...] = (32, 64, 128)) -> tuple[float, int]:
    from sentence_transformers import SentenceTransformer

    from core.model.text import default_text_path

    st = SentenceTransformer(str(default_text_path()), device="cpu")
    best = (0.0, 0)
    for bs in sizes:
        st.encode(texts[:bs], batch_size=bs)
        t = time.perf_counter()
        st.encode(texts, batch_size=bs)
        best = max(best, (len(texts) / (time.perf_counter() - t), bs))
    return best


def read_texts(path: Path, n: int) -> list[str]:
    """The file's non-blank lines, cycled up to ``n`` texts."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"{path}: no texts (one per line)")
    return [lines[i % len(lines)] for i in range(n)]


def mmq_offline(model, texts: list[str], rounds: int = 2) -> float:
    """Texts/s of mmq's own model on these texts, offline and at its best: the whole
    list to ``embed`` (which packs forwards of its batch budget) on all of torch's
    threads, or its two halves at once on half the threads each, as a text worker's
    two streams run (bench/streams.py); the faster, best of ``rounds``."""
    import torch

    threads = torch.get_num_threads()
    model.embed("text", texts[:64])
    best = 0.0
    for _ in range(rounds):
        best = max(best, one_forward(model, texts, threads))
        if threads > 1:
            best = max(best, two_forwards(model, texts, threads))
    torch.set_num_threads(threads)
    return best


def one_forward(model, texts: list[str], threads: int) -> float:
    """Texts/s of the whole list to ``embed`` on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model.embed("text", texts)
    return len(texts) / (time.perf_counter() - t)


def two_forwards(model, texts: list[str], threads: int) -> float:
    """Texts/s of the list's halves embedded at once by two threads of ``threads // 2``
    torch threads each (each sets its own OpenMP team size)."""
    import threading

    import torch

    def run(part: list[str]) -> None:
        torch.set_num_threads(max(1, threads // 2))
        model.embed("text", part)

    half = len(texts) // 2
    ts = [threading.Thread(target=run, args=(p,)) for p in (texts[:half], texts[half:])]
    t = time.perf_counter()
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    return len(texts) / (time.perf_counter() - t)


def row(name: str, r: dict, base: float, extra: str = "") -> str:
    return (f"{name:<34} {r['jobs_per_s']:>8.1f} {r['jobs_per_s'] / base:>6.2f} "
            f"{1e3 * r['p50']:>8.0f} {1e3 * r['p95']:>8.0f} {1e3 * r['p99']:>8.0f}  {extra}")


def light_load(c: Client, texts: list[str]) -> tuple[float, float]:
    """p50 latency one job at a time: as a client polling every millisecond sees it
    (the SDK's wait backs off, which would add up to a third to a short wait), and
    as the store recorded it (row written to prediction committed)."""
    seen, stored = [], []
    for t in texts:
        t0 = time.perf_counter()
        job_id = c.submit_text(t)
        while (job := c.get(job_id, with_embedding=False))["status"] not in TERMINAL:
            time.sleep(0.001)
        seen.append(time.perf_counter() - t0)
        stored.append((datetime.fromisoformat(job["finished_at"])
                       - datetime.fromisoformat(job["created_at"])).total_seconds())
    return float(np.percentile(seen, 50)), float(np.percentile(stored, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--texts", type=Path, help="a file of texts, one per line")
    ap.add_argument("--light", type=int, default=30, help="jobs for the light-load latency")
    ap.add_argument("--towers", action="store_true",
                    help="also an image worker (photographs) and an audio worker (speech)")
    ap.add_argument("--photo-side", type=int, default=0,
                    help="with --towers: the photographs resized to this shorter side (a "
                         "12 MP phone photo: 3024) before JPEG encoding; 0: as they are")
    ap.add_argument("--scaling", action="store_true", help="also 1 vs 2 worker processes")
    ap.add_argument("--backlog", type=int, default=0, help="also N jobs queued before start")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat s-t / batched / unbatched this many times, back to back, and "
                         "report each round's ratios and their spread (noisy shared machines)")
    args = ap.parse_args()
    keep_freed_memory()  # mmq's model runs so in its model process (core/serving/procs.py)
    texts = read_texts(args.texts, args.n) if args.texts else sentences(args.n, seed=11)
    items = [{"modality": "text", "input": t} for t in texts]
    stack = Stack(Path(tempfile.mkdtemp(prefix="mmq-bench-")))
    try:
        st_rate, st_bs = st_best(texts)
        results = {}
        for name, env in (("batched worker", {}), ("unbatched worker (1 job/forward)",
                                                   {"MMQ_MAX_BATCH_SIZE": 1})):
            db = stack.fresh_db()
            log = stack.start_worker("text", db, **env)
            c = Client(broker_url=stack.broker, database_url=db)
            results[name] = (run_jobs(c, items), batching_summary(log))
            if name == "batched worker":
                light, light_store = light_load(c, texts[:args.light])
            c.close()
            stack.stop_workers()
        print(f"\n{len(texts)} text jobs, one worker process (2 torch threads), SQLite, "
              f"Redis; sentence-transformers best: {st_rate:.1f}/s at batch {st_bs}\n")
        print(f"{'':<34} {'jobs/s':>8} {'x s-t':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
              "  batching")
        for name, (r, summ) in results.items():
            print(row(name, r, st_rate, f"mean batch {summ.get('mean_batch_size', '?')}, "
                      f"model {summ.get('mean_model_ms', '?')} ms/batch"))
        print(f"submit rate (validate, write rows, publish): "
              f"{len(texts) / results['batched worker'][0]['submit_s']:.0f} jobs/s")
        b, u = results["batched worker"][0], results["unbatched worker (1 job/forward)"][0]
        print(f"\nbatched / unbatched worker: {b['jobs_per_s'] / u['jobs_per_s']:.2f}x; "
              f"batched / sentence-transformers offline: {b['jobs_per_s'] / st_rate:.2f}x")
        from core.model.multimodal import MultimodalModel

        m = MultimodalModel.load(device="cpu")
        offline = mmq_offline(m, texts)
        print(f"mmq offline (MultimodalModel.embed, one or two forwards at once, the best; "
              f"same texts): {offline:.1f}/s; batched worker / mmq offline: "
              f"{b['jobs_per_s'] / offline:.2f}x")
        m.embed("text", texts[:1])
        t0 = time.perf_counter()
        for t in texts[:20]:
            m.embed("text", [t])
        one = (time.perf_counter() - t0) / 20
        print(f"light load (one job at a time): p50 submit-to-result {1e3 * light_store:.1f} ms "
              f"in the store (created_at to finished_at), {1e3 * light:.1f} ms seen by a "
              f"client polling every ms; bound max_wait 5 ms + one forward {1e3 * one:.1f} ms "
              f"+ 25 ms = {5 + 1e3 * one + 25:.1f} ms")
        if args.rounds > 1:
            rounds(stack, items, texts, st_bs, args.rounds,
                   (st_rate, b["jobs_per_s"], u["jobs_per_s"]))
        if args.towers:
            towers(stack, args.photo_side)
        if args.scaling:
            scaling(stack, items)
        if args.backlog:
            backlog(stack, args.backlog)
    finally:
        stack.close()


def rounds(stack: Stack, items: list[dict], texts: list[str], st_bs: int, n: int,
           first: tuple[float, float, float]) -> None:
    """Each round measures all three within a few minutes, so each round's ratios
    share the machine's load of the moment even when absolute rates drift."""
    print(f"\nrounds (s-t at batch {st_bs}, then the batched, then the unbatched worker)")
    print(f"{'round':>5} {'s-t/s':>8} {'batched':>8} {'unbatched':>9} {'b/s-t':>6} {'b/u':>6}"
          f"  batched p50/p95/p99 ms, mean batch")
    got = [first]
    print(f"{1:>5} {first[0]:>8.1f} {first[1]:>8.1f} {first[2]:>9.1f} "
          f"{first[1] / first[0]:>6.2f} {first[1] / first[2]:>6.2f}  (above)")
    for i in range(2, n + 1):
        st_rate, _ = st_best(texts, (st_bs,))
        rates, extra = [], ""
        for env in ({}, {"MMQ_MAX_BATCH_SIZE": 1}):
            db = stack.fresh_db()
            log = stack.start_worker("text", db, **env)
            c = Client(broker_url=stack.broker, database_url=db)
            r = run_jobs(c, items)
            rates.append(r["jobs_per_s"])
            if not env:
                extra = (f"{1e3 * r['p50']:.0f}/{1e3 * r['p95']:.0f}/{1e3 * r['p99']:.0f}, "
                         f"{batching_summary(log).get('mean_batch_size', '?')}")
            c.close()
            stack.stop_workers()
        got.append((st_rate, *rates))
        print(f"{i:>5} {st_rate:>8.1f} {rates[0]:>8.1f} {rates[1]:>9.1f} "
              f"{rates[0] / st_rate:>6.2f} {rates[0] / rates[1]:>6.2f}  {extra}", flush=True)
    a = np.array(got)
    for name, v in (("batched / s-t", a[:, 1] / a[:, 0]), ("batched / unbatched",
                                                           a[:, 1] / a[:, 2])):
        print(f"{name}: median {np.median(v):.2f}x, min {v.min():.2f}x, max {v.max():.2f}x")


def towers(stack: Stack, photo_side: int = 0) -> None:
    """An image worker on real photographs (the ImageNet tower; ``photo_side``: resized to
    that shorter side first, as a camera's) and an audio worker on the bundled spoken
    examples (the Whisper speech tower, transcribing each clip: about a second of CPU
    per job, hence fewer jobs)."""
    import soundfile as sf

    from bench.photos import at_side
    from core.training import photo_eval as pe
    from producer.ops.stack import EXAMPLES

    # Real photographs for the ImageNet tower (the store keeps each distinct one once).
    jpegs = [at_side(pe.load_photo(p), photo_side) if photo_side else
             pe.photo_bytes(p, "JPEG") for p in pe.HELD_OUT]
    photos = [jpegs[i % len(jpegs)] for i in range(300)]
    spoken = sorted(EXAMPLES.glob("spoken-*.wav"))
    wavs = [spoken[i % len(spoken)].read_bytes() for i in range(60)]
    secs = np.array([sf.info(spoken[i % len(spoken)]).duration for i in range(60)])
    print(f"\n{'':<34} {'jobs/s':>8} {'':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for modality, payloads in (("image", photos), ("audio", wavs)):
        db = stack.fresh_db()
        log = stack.start_worker(modality, db)
        c = Client(broker_url=stack.broker, database_url=db)
        r = run_jobs(c, [{"modality": modality, "input": p} for p in payloads])
        extra = f"mean batch {batching_summary(log).get('mean_batch_size', '?')}"
        if modality == "audio":
            extra += f", {r['jobs_per_s'] * secs.mean():.1f} audio-seconds/s"
        elif photo_side:
            extra += f", JPEGs of shorter side {photo_side} px"
        print(row(f"{modality} worker", r, r["jobs_per_s"], extra))
        c.close()
        stack.stop_workers()


def scaling(stack: Stack, items: list[dict]) -> None:
    print("\nscaling: worker processes on the same Redis and SQLite (2 cores in all)")
    base = None
    for n in (1, 2):
        db = stack.fresh_db()
        for _ in range(n):
            stack.start_worker("text", db, MMQ_TORCH_THREADS=max(1, 2 // n))
        c = Client(broker_url=stack.broker, database_url=db)
        r = run_jobs(c, items)
        base = base or r["jobs_per_s"]
        print(row(f"{n} text worker(s)", r, base))
        c.close()
        stack.stop_workers()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    """The worker's model process (spawned by it), and anything else it started."""
    out: list[int] = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (t / "children").read_text().split()]
    return out


def backlog(stack: Stack, n: int) -> None:
    db = stack.fresh_db()
    c = Client(broker_url=stack.broker, database_url=db)
    r = redis.Redis.from_url(stack.broker)
    texts = sentences(n, seed=12)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        c.submit_many([{"modality": "text", "input": t} for t in texts[i:i + 1000]])
    print(f"\nbacklog: {n} jobs queued in {time.perf_counter() - t0:.1f} s; Redis "
          f"{r.info('memory')['used_memory'] / 2**20:.1f} MiB, queue length {r.llen('text')}")
    stack.start_worker("text", db)
    pid = stack.workers[-1][0].pid
    kids = children(pid)
    samples = []
    while True:
        with c.sessions() as s:
            left = s.scalar(select(func.count()).select_from(store.Job).where(
                store.Job.status.in_(["queued", "running"])))
        samples.append((rss_mb(pid), sum(rss_mb(k) for k in kids),
                        r.info("memory")["used_memory"] / 2**20))
        if not left:
            break
        time.sleep(1)
    with c.sessions() as s:
        done = s.scalar(select(func.count()).select_from(store.Prediction))
    def curve(v: list[float]) -> str:
        return " ".join(f"{v[int(f * (len(v) - 1))]:.0f}" for f in (0, .1, .25, .5, .75, .9, 1))

    print(f"drained: {done}/{n} predictions; RSS MiB at 0/10/25/50/75/90/100% of the drain: "
          f"worker {curve([a for a, _, _ in samples])}, its model process "
          f"{curve([b for _, b, _ in samples])}; Redis max "
          f"{max(c for _, _, c in samples):.1f} MiB")
    c.close()
    stack.stop_workers()


if __name__ == "__main__":
    main()
