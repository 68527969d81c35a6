"""Proof on many hosts: one fleet across network-namespace hosts with skewed clocks,
faults injected one at a time, every job ending exactly once.

Hosts (bench/netns.py: one bridge, a private 10.231.X.0/24, no route anywhere else):
- ``svc``: a TCP proxy to the local PostgreSQL (a fresh ``mmq_cluster_<random>``
  database per run), Redis primary + replica + three sentinels, and ``mmq api``;
- ``prod``: the producer (bench/cluster_producer.py): a mixed stream (about 80% text
  embed/classify, 12% image classify, 8% spoken words) through the HTTP API, every
  job with ``timeout_s=300``, paced so that about ``--window`` jobs are open;
- ``w1`` text, clock +10 min; ``w2`` text, clock -10 min; ``w3`` image + audio,
  clock -3 min (``faketime -f``, FAKETIME_DONT_FAKE_MONOTONIC=1: only the wall
  clock moves). Real model weights (the towers the workers always load).

Scenarios, in this order, each on its share of the jobs (``--jobs`` split evenly),
its fault injected once a third of its share is submitted:
- link-cut: w1's link down for ``--cut-s`` (60) s, then up again;
- host-kill: every process on w1 SIGKILLed, its worker started again;
- rolling-restart: each worker in turn SIGTERMed (warm shutdown), started again and
  waited for before the next;
- cancel-storm: the producer DELETEs every job the API lists as running;
- redis-failover: the Redis primary SIGKILLed; Sentinel promotes the replica (needs
  ``--broker sentinel``, the default: with ``redis`` the URL names the dead primary).

Columns: lost = jobs not terminal at the end + succeeded jobs without a prediction;
duplicate predictions = jobs with more than one prediction row; late outcomes dropped
= the workers' ``mmq_late_outcomes_dropped_total`` over the scenario ('-' where no
worker exports it); time to recover = per fault, from the fault until every job watched
is terminal (the worst, for several faults): for a host's fault (link cut, kill,
restart) the jobs running on that host at the fault; for the storm and the Redis
kill every job open at that moment. PASS needs:
every job submitted and terminal, 0 lost, 0 duplicates, nothing failed, nothing
cancelled but what the storm cancelled (DELETE answered 200), every such job still
``cancelled`` at the end, no prediction on a cancelled job, recovery <= 60 s.

    python bench/cluster.py [--jobs 3000] [--only SCENARIO[,..]] [--quick]
                            [--broker sentinel|redis] [--keep-logs] [--cleanup]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from bench import netns, table  # noqa: E402
from bench.cluster_hosts import Cluster, Worker, WorkerSpec  # noqa: E402
from core.jobs import TERMINAL  # noqa: E402

TERMINAL_SQL = ", ".join(f"'{s}'" for s in TERMINAL)
RECOVERY_TARGET_S = 60.0
FLEET = [WorkerSpec("w1", "+10m", ("text",)), WorkerSpec("w2", "-10m", ("text",)),
         WorkerSpec("w3", "-3m", ("image", "audio"))]


@dataclass
class Fault:
    what: str
    t: float  # monotonic
    watch: set[str]  # the jobs whose end is its recovery
    everything: set[str] = field(default_factory=set)  # every job open at the fault
    recovered_s: float | None = None
    all_done_s: float | None = None  # informative: when every job open then had ended


@dataclass
class Row:
    name: str
    cells: dict = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed: bool | None = None


class Run:
    """The cluster, the producer's reports, pacing, fault watching and metrics."""

    def __init__(self, c: Cluster, window: int):
        self.c, self.window = c, window
        self.engine = create_engine(c.direct_url, pool_pre_ping=True)
        self.ctl, self.out = c.tmp / "producer.ctl", c.tmp / "producer.out"
        self.ids: list[str] = []
        self.cancel_codes: dict[str, int] = {}
        self.cancel_said: dict[str, str] = {}  # the job's status, or the error message
        self.start = self.n = 0  # the current scenario's share of the stream
        self.errors: list[str] = []
        self.limit = 0  # the pacer lets the producer submit up to here
        self.storms = 0
        self.faults: list[Fault] = []
        self.late: dict[str, float] = {}  # per worker incarnation: the last value read
        self._off = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        c.start_producer(self.ctl, self.out)
        threading.Thread(target=self._loop, daemon=True).start()

    # -- the store ----------------------------------------------------------------------

    def q(self, sql: str, **p):
        with self.engine.connect() as conn:
            return conn.execute(text(sql), p).all()

    def open_ids(self) -> set[str]:
        return {r[0] for r in self.q(f"SELECT id FROM jobs WHERE status NOT IN ({TERMINAL_SQL})")}

    # -- the background loop: read reports, pace, watch faults, scrape metrics ---------------

    def _read(self) -> None:
        with open(self.out) as f:
            f.seek(self._off)
            for line in f:
                if not line.endswith("\n"):
                    break
                self._off += len(line.encode())
                rec = json.loads(line)
                if "ids" in rec:
                    self.ids += rec["ids"]
                elif "cancel" in rec:
                    self.cancel_codes[rec["cancel"]] = rec["code"]
                    self.cancel_said[rec["cancel"]] = rec["status"]
                elif "error" in rec:
                    self.errors.append(rec["error"])

    def _write_ctl(self, **ctl) -> None:
        tmp = self.ctl.with_suffix(".tmp")  # renamed over: never read half-written
        tmp.write_text(json.dumps(ctl))
        tmp.replace(self.ctl)

    def _loop(self) -> None:
        last_scrape = 0.0
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._read()
                    opened = self.open_ids()
                    room = self.window - len(opened)
                    allow = min(self.limit, len(self.ids) + max(0, room))
                    if not self._stop.is_set():
                        self._write_ctl(allow=allow, storm=self.storms)
                    for f in self.faults:
                        if f.recovered_s is None and not (f.watch & opened):
                            f.recovered_s = time.monotonic() - f.t
                        if f.all_done_s is None and not (f.everything & opened):
                            f.all_done_s = time.monotonic() - f.t
                if time.monotonic() - last_scrape > 2:
                    last_scrape = time.monotonic()
                    self.scrape()
            except Exception as e:  # noqa: BLE001  (the next turn tries again)
                self.errors.append(f"bench loop: {type(e).__name__}: {e}"[:200])
            time.sleep(0.3)

    def scrape(self, workers: list[Worker] | None = None) -> None:
        for w in workers or self.c.workers:
            v = self.c.late_dropped(w) if w.alive() else None
            if v is not None:
                self.late[w.incarnation] = v

    def late_total(self) -> float | None:
        return sum(self.late.values()) if self.late else None

    def fault(self, what: str, host: str | None = None, modality: str | None = None) -> Fault:
        """A fault from now on. Watched: the jobs running on ``host`` (and
        ``modality``) at this moment, or with no host every job open now."""
        with self._lock:
            everything = self.open_ids()
            if host is None:
                watch = everything
            else:
                like = f"{modality or '%'}-%@{host}"
                watch = {r[0] for r in self.q("SELECT id FROM jobs WHERE status = 'running' "
                                              "AND worker LIKE :w", w=like)}
            f = Fault(what, time.monotonic(), watch, everything)
            self.faults.append(f)
        return f

    def release(self, k: int, of: int) -> None:
        """Let the scenario's share be submitted up to its (k+1)/(of+1) part, and wait
        for that: a scenario with several faults meets jobs in flight at each."""
        self.limit = self.start + self.n * (k + 1) // (of + 1)
        self.until_submitted(self.limit)

    def storm(self) -> None:
        self.storms += 1

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._write_ctl(stop=True)

    # -- one scenario's share --------------------------------------------------------------

    def submitted(self) -> int:
        with self._lock:
            self._read()
            return len(self.ids)

    def until_submitted(self, n: int, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while self.submitted() < n and time.monotonic() < end:
            time.sleep(0.2)

    def until_terminal(self, ids: list[str], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not (set(ids) & self.open_ids()):
                return True
            time.sleep(0.5)
        return False


# -- the scenarios: each injects its fault(s) and returns once they are over ---------------------

def link_cut(run: Run, args) -> None:
    h = run.c.net["w1"]
    run.fault(f"w1 link down {args.cut_s:.0f} s", host="w1")
    h.link(False)
    time.sleep(args.cut_s)
    h.link(True)


def host_kill(run: Run, args) -> None:
    ws = [w for w in run.c.workers if w.host.name == "w1"]
    run.scrape(ws)
    run.fault("w1 SIGKILL", host="w1")
    ws[0].host.kill_all()
    for w in ws:
        run.c.start_worker(w)
    run.c.wait_ready(ws)


def rolling_restart(run: Run, args) -> None:
    for i, w in enumerate(run.c.workers):
        if i:
            run.release(i, len(run.c.workers))
        run.scrape([w])
        run.fault(f"restart {w.host.name} {w.modality}", host=w.host.name, modality=w.modality)
        run.c.stop_worker(w)
        run.c.start_worker(w)
        run.c.wait_ready([w])


def cancel_storm(run: Run, args) -> None:
    run.fault("cancel storm (every job open at the storm)")
    run.storm()
    time.sleep(5)  # the producer lists and deletes; its reports are read meanwhile


def redis_failover(run: Run, args) -> None:
    run.fault("Redis primary SIGKILL (every job open at the kill)")
    port = run.c.kill_redis_primary()
    end = time.monotonic() + 60
    while run.c.primary_port() in (port, None) and time.monotonic() < end:
        time.sleep(0.5)
    time.sleep(5)
    run.c.start_redis(port)  # back as a replica of the promoted one


SCENARIOS = {"link-cut": link_cut, "host-kill": host_kill, "rolling-restart": rolling_restart,
             "cancel-storm": cancel_storm, "redis-failover": redis_failover}


def run_scenario(run: Run, name: str, n: int, args) -> Row:
    row = Row(name)
    start = run.start = run.submitted()
    run.n = n
    run.faults = []
    late0 = run.late_total()
    errors0 = len(run.errors)
    run.release(0, 2)  # a third, then the fault
    run.limit = start + n  # the rest goes on while the fault plays out
    SCENARIOS[name](run, args)
    run.until_submitted(start + n)
    done = run.until_terminal(run.ids[start:start + n], args.timeout)
    time.sleep(1)  # the loop sees the last recoveries
    run.scrape()
    ids = run.ids[start:start + n]
    _fill(run, row, ids, late0, done, n)
    row.notes += [f"bench/producer: {e}" for e in sorted(set(run.errors[errors0:]))[:5]]
    return row


def _fill(run: Run, row: Row, ids: list[str], late0, done: bool, n: int) -> None:
    rows = run.q("SELECT j.id, j.status, j.attempts, count(p.job_id), max(j.error) FROM jobs j "
                 "LEFT JOIN predictions p ON p.job_id = j.id WHERE j.id = ANY(:ids) "
                 "GROUP BY j.id, j.status, j.attempts", ids=ids)
    by = {s: 0 for s in TERMINAL}
    lost = dup = reruns = pred_on_cancelled = 0
    unintended, errors = [], {}
    storm_ok = {i for i, code in run.cancel_codes.items() if code == 200}
    for jid, status, attempts, preds, err in rows:
        by[status] = by.get(status, 0) + 1
        lost += status not in TERMINAL or (status == "succeeded" and preds == 0)
        dup += preds > 1
        reruns += (attempts or 0) > 1
        if status == "cancelled" and preds:
            pred_on_cancelled += 1
        if status == "cancelled" and jid not in storm_ok:
            unintended.append(jid)
        if status == "failed" or (status == "cancelled" and jid not in storm_ok):
            errors[err] = errors.get(err, 0) + 1
    mine = set(ids)
    asked = {i: c for i, c in run.cancel_codes.items() if i in mine}
    status_of = {r[0]: r[1] for r in rows}
    not_kept = [i for i in storm_ok & mine if status_of.get(i) != "cancelled"]
    late1 = run.late_total()
    rec = [f.recovered_s for f in run.faults]
    row.faults = list(run.faults)
    row.cells = {"submitted": len(ids), "succeeded": by["succeeded"],
                 "cancelled": by["cancelled"], "failed": by["failed"], "lost": lost,
                 "dup": dup,
                 "late": "-" if late1 is None else f"{late1 - (late0 or 0):.0f}",
                 "recover": "-" if not rec else "never" if None in rec else f"{max(rec):.1f} s",
                 # beyond the table, for the notes and tests/e2e/test_cluster.py:
                 "unintended": len(unintended), "not_kept": len(not_kept),
                 "pred_on_cancelled": pred_on_cancelled, "done": done}
    in_target = all(r is not None and r <= RECOVERY_TARGET_S for r in rec)
    row.passed = (len(ids) == n and done and lost == 0 and dup == 0 and by["failed"] == 0
                  and not unintended and not not_kept and not pred_on_cancelled and in_target)
    if len(ids) < n:
        row.notes.append(f"only {len(ids)} of {n} jobs submitted")
    if asked:
        codes = {}
        for c in asked.values():
            codes[c] = codes.get(c, 0) + 1
        row.notes.append(f"storm: {len(asked)} DELETEs on running jobs, answers {codes}")
        said: dict[str, int] = {}
        for i, c in asked.items():
            if c != 200:
                m = run.cancel_said.get(i, "").replace(i, "ID")
                said[m] = said.get(m, 0) + 1
        row.notes += [f"storm: {k} x not 200: {m!r}" for m, k in said.items()]
    if unintended:
        row.notes.append(f"{len(unintended)} job(s) cancelled that no one cancelled")
    if not_kept:
        row.notes.append(f"{len(not_kept)} job(s) cancelled (200) but not cancelled at the end")
    if pred_on_cancelled:
        row.notes.append(f"{pred_on_cancelled} cancelled job(s) with a prediction")
    for err, k in sorted(errors.items(), key=lambda e: -e[1])[:3]:
        row.notes.append(f"failed/cancelled: {k} x {str(err)[:140]!r}")
    row.notes.append(f"re-runs (attempts > 1): {reruns}")
    for f in run.faults:
        got = "never" if f.recovered_s is None else f"{f.recovered_s:.1f} s"
        every = "never" if f.all_done_s is None else f"{f.all_done_s:.1f} s"
        row.notes.append(f"{f.what}: {len(f.watch)} watched job(s) terminal after {got}; "
                         f"all {len(f.everything)} open then, after {every}")


COLUMNS = [("scenario", 16), ("submitted", 9), ("succeeded", 9), ("cancelled", 9),
           ("failed", 6), ("lost", 4), ("duplicate predictions", 21),
           ("late outcomes dropped", 21), ("time to recover", 15), ("result", 6)]


def print_table(rows: list[Row]) -> None:
    keys = ("submitted", "succeeded", "cancelled", "failed", "lost", "dup", "late", "recover")
    table.print_table(COLUMNS, [[r.name, *(r.cells.get(k, "-") for k in keys),
                                 table.VERDICT[r.passed]] for r in rows],
                      [(r.name, r.notes) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3000, help="over all chosen scenarios")
    ap.add_argument("--only", default="", help="scenario names, comma-separated")
    ap.add_argument("--quick", action="store_true",
                    help="300 jobs, a 30 s link cut (a smoke run; not the proof)")
    ap.add_argument("--broker", choices=("sentinel", "redis"), default="sentinel")
    ap.add_argument("--cut-s", type=float, default=60.0)
    ap.add_argument("--window", type=int, default=150, help="jobs open at a time")
    ap.add_argument("--timeout", type=float, default=420,
                    help="per scenario: seconds for its jobs to end after the fault")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--cleanup", action="store_true",
                    help="remove namespaces and links a killed run left, then exit")
    args = ap.parse_args()
    if args.cleanup:
        print("\n".join(netns.cleanup()) or "nothing to remove")
        return
    if why := netns.unavailable():
        sys.exit(f"cluster bench: {why}")
    if args.quick:
        args.jobs, args.cut_s = min(args.jobs, 300), min(args.cut_s, 30)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    if bad := [n for n in names if n not in SCENARIOS]:
        ap.error(f"no such scenario: {', '.join(bad)} (choose from {', '.join(SCENARIOS)})")
    rows = []
    if args.broker == "redis" and "redis-failover" in names:
        names.remove("redis-failover")
        rows_tail = [Row("redis-failover", notes=["not run: --broker redis names the "
                                                  "primary itself; use --broker sentinel"])]
    else:
        rows_tail = []
    tmp = Path(tempfile.mkdtemp(prefix="mmq-cluster-"))
    print(f"logs in {tmp}", flush=True)
    c = Cluster(tmp, FLEET, broker=args.broker)
    try:
        t0 = time.monotonic()
        c.start()
        print(f"cluster up in {time.monotonic() - t0:.0f} s: {c.net.subnet}.0/24, broker "
              f"{c.broker_url}", flush=True)
        run = Run(c, args.window)
        for i, name in enumerate(names):
            n = args.jobs // len(names) + (i < args.jobs % len(names))
            t1 = time.monotonic()
            print(f"== {name}: {n} jobs ...", flush=True)
            row = run_scenario(run, name, n, args)
            rows.append(row)
            print(f"   {name}: {time.monotonic() - t1:.0f} s, "
                  f"{ {True: 'PASS', False: 'MISS', None: 'n/a'}[row.passed]}", flush=True)
        run.stop()
        print_table(rows + rows_tail)
    finally:
        c.close()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
