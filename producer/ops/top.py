"""``mmq top``: a live terminal summary of the queues, the workers and the store.

One frame = Redis queue lengths, the workers that answer a Celery broadcast, and
from SQL the jobs/s that finished in the last interval, the counts by status, the
jobs of each API key (by key id, never the key) and the most recent failures.
Read-only: it never migrates or writes anything. Each source is read on its own, so
a Redis or database outage shows up in the frame instead of ending the command.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from core import store
from core.broker.sender import producer_app, queue_depths
from core.broker.stats import WorkerJobStats
from core.config import Settings, get_settings
from core.errors import brief_error
from core.jobs import QUEUES, TERMINAL, JobStatus
from producer.ops.rules import Thresholds, load_thresholds

CLEAR = "\x1b[H\x1b[2J"  # cursor home + erase screen: plain ANSI, no curses needed
STATUSES = [s.value for s in JobStatus]
MAX_OWNERS = 10  # owner rows in a frame: the busiest; the rest are summed up in one line
NO_OWNER = "(no key)"  # jobs made by the SDK or CLI, which submit without an API key


@dataclass
class WorkerInfo:
    name: str  # "text-1234@host": the modality is the part before the first "-"
    modality: str
    # Jobs through the model since the worker started (core/broker/stats.py); None: the
    # worker sent no count. Not Celery's ``total``: that counts task messages, and one
    # run_jobs message carries up to MMQ_JOBS_PER_MESSAGE jobs.
    jobs: int | None
    messages: int  # Celery task messages it has taken since it started (its ``total``)
    uptime_s: float | None


@dataclass
class Frame:
    at: datetime
    window_s: float
    depths: dict[str, int] | None = None  # None: the broker did not answer
    workers: list[WorkerInfo] | None = None
    rates: dict[str, float] | None = None  # succeeded per second over window_s
    counts: dict[tuple[str, str], int] | None = None  # (modality, status) -> jobs
    # key id (None: no key) -> {"queued", "running", "finished"} -> jobs
    owners: dict[str | None, dict[str, int]] | None = None
    failures: list[dict] = field(default_factory=list)
    transcripts: list[dict] = field(default_factory=list)  # latest audio jobs' text
    problems: list[str] = field(default_factory=list)
    # What the alert rules watch (producer/ops/monitoring/alerts.yml), from the store:
    slo: dict[str, SLO] | None = None  # modality -> figures; None: no database
    alerts: list[str] = field(default_factory=list)  # what the rules would fire on


# The failure ratio is taken over the same window as the rule's (10 minutes).
SLO_WINDOW_S = 600.0


@dataclass
class SLO:
    live_workers: int  # leases the database calls live
    queued: int
    oldest_queued_s: float | None
    oldest_running_s: float | None
    finished: int  # in the last SLO_WINDOW_S
    failed: int

    @property
    def failure_ratio(self) -> float | None:
        return self.failed / self.finished if self.finished else None


def _workers(app, timeout: float) -> list[WorkerInfo]:
    stats = app.control.inspect(timeout=timeout).stats() or {}
    out = []
    for name, st in sorted(stats.items()):
        total = st.get("total") or {}
        own = WorkerJobStats.from_stats(st)
        out.append(WorkerInfo(name=name, modality=name.split("-", 1)[0],
                              jobs=None if own is None else own.jobs,
                              messages=sum(total.values()), uptime_s=st.get("uptime")))
    return out


def _sql(session: Session, window_s: float, n_failures: int) -> tuple[dict, dict, list]:
    done = store.succeeded_within(session=session, seconds=window_s)  # the database's clock
    rates = {m: n / window_s for m, n in done.items()}
    counts = store.count_by_status(session=session)
    failed = store.latest_failures(session=session, limit=n_failures)
    failures = [{"id": j.id, "modality": j.modality, "error": j.error or "",
                 "at": j.finished_at} for j in failed]
    return rates, counts, failures


def _transcripts(session: Session, n: int) -> list[dict]:
    """The latest transcribed audio jobs: what the speech workers are hearing."""
    rows = store.latest_transcripts(session=session, limit=n)
    return [{"id": i, "at": at, "text": t} for i, at, t in rows]


def _slo(session: Session, settings: Settings, counts: dict) -> dict[str, SLO]:
    live = store.live_workers_by_modality(session=session, lease_s=settings.lease_s)
    now = store.db_time(session=session)
    oldest = store.oldest_active(session=session)
    done = store.finished_within(session=session, seconds=SLO_WINDOW_S)

    def age(m: str, st: str) -> float | None:
        at = oldest.get((m, st))
        return None if at is None else max(0.0, (now - at).total_seconds())

    return {m: SLO(live_workers=live.get(m, 0), queued=counts.get((m, "queued"), 0),
                   oldest_queued_s=age(m, "queued"), oldest_running_s=age(m, "running"),
                   finished=sum(n for (mm, _), n in done.items() if mm == m),
                   failed=done.get((m, JobStatus.FAILED.value), 0)) for m in QUEUES}


def alerts_of(frame: Frame, t: Thresholds) -> list[str]:
    """The alerts of alerts.yml whose condition holds in this frame (before their
    ``for``: what would page if it lasted)."""
    out = []
    if frame.depths is None:
        out.append("MmqBrokerDown: Redis does not answer")
    if frame.slo is None:
        out.append("MmqStoreUnreachable: the database does not answer")
        return out
    for m, s in frame.slo.items():
        if s.queued and not s.live_workers:
            out.append(f"MmqNoLiveWorker: {s.queued} {m} jobs queued, no live {m} worker")
        if s.oldest_queued_s is not None and s.oldest_queued_s > t.oldest_queued_s:
            out.append(f"MmqOldestQueuedJobTooOld: oldest queued {m} job waited "
                       f"{_fmt_age(s.oldest_queued_s)} (> {_fmt_age(t.oldest_queued_s)})")
        ratio = s.failure_ratio
        if ratio is not None and ratio > t.failure_ratio and s.finished >= t.failure_min_jobs:
            out.append(f"MmqFailureRatioHigh: {ratio:.0%} of {s.finished} finished {m} jobs "
                       f"failed (> {t.failure_ratio:.0%})")
    return out


def _owners(session: Session) -> dict[str | None, dict[str, int]]:
    """Jobs per key id: what each API client has waiting, running and done."""
    out: dict[str | None, dict[str, int]] = {}
    rows = store.count_by_owner(session=session)
    for owner, status, n in rows:
        col = "finished" if status in TERMINAL else status
        c = out.setdefault(owner, {"queued": 0, "running": 0, "finished": 0})
        c[col] = c.get(col, 0) + n
    return out


def collect(settings: Settings, sessions: sessionmaker[Session], app, *, window_s: float,
            n_failures: int = 5, timeout: float = 1.0,
            thresholds: Thresholds | None = None) -> Frame:
    """One frame; a source that fails leaves its part empty and says why."""
    frame = Frame(at=store.utcnow(), window_s=window_s)
    try:
        frame.depths = queue_depths(settings)
    except Exception as e:  # any broker error: show it, keep the other parts
        frame.problems.append(f"redis: {type(e).__name__}: {e}")
    if frame.depths is not None:  # no broadcast when Redis is down: it would hang
        try:
            frame.workers = _workers(app, timeout)
        except Exception as e:
            frame.problems.append(f"workers: {type(e).__name__}: {e}")
    try:
        with sessions() as s:
            frame.rates, frame.counts, frame.failures = _sql(s, window_s, n_failures)
            frame.owners = _owners(s)
            frame.transcripts = _transcripts(s, n_failures)
            frame.slo = _slo(s, settings, frame.counts)
    except Exception as e:
        frame.problems.append(f"database: {brief_error(e)}")
    frame.alerts = alerts_of(frame, thresholds or load_thresholds())
    return frame


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(frame: Frame, settings: Settings) -> str:
    """The frame as plain text (no colour, no cursor codes)."""
    lines = [f"mmq top  {frame.at:%Y-%m-%d %H:%M:%S} UTC  broker "
             f"{settings.broker_url.split('@')[-1]}  store {settings.db_url.split('@')[-1]}",
             ""]
    head = f"{'modality':<9}{'waiting':>9}{'workers':>9}{'jobs/s':>9}"
    lines.append(head + "".join(f"{s:>11}" for s in STATUSES))
    workers = frame.workers or []
    for q in QUEUES:
        waiting = "?" if frame.depths is None else str(frame.depths.get(q, 0))
        n = "?" if frame.workers is None else str(sum(w.modality == q for w in workers))
        rate = "?" if frame.rates is None else f"{frame.rates.get(q, 0.0):.2f}"
        row = f"{q:<9}{waiting:>9}{n:>9}{rate:>9}"
        counts = frame.counts
        lines.append(row + "".join(
            f"{'?' if counts is None else counts.get((q, s), 0):>11}" for s in STATUSES))
    lines += _render_slo(frame)
    lines += ["", f"workers ({'?' if frame.workers is None else len(workers)})"]
    lines += [f"  {w.name:<40} {w.modality:<6} up {_fmt_age(w.uptime_s):>7}  "
              f"jobs {'?' if w.jobs is None else w.jobs} ({w.messages} messages)"
              for w in workers] or [
        "  none answered" if frame.workers is not None else "  unknown: no broker"]
    lines += _render_owners(frame.owners)
    lines += ["", "recent transcripts"]
    for t in frame.transcripts:
        at = f"{t['at']:%Y-%m-%d %H:%M:%S}" if t["at"] else "-"
        lines.append(f"  {at}  {t['id']}  {' '.join(t['text'].split())[:60]!r}")
    if not frame.transcripts:
        lines.append("  none")
    lines += ["", "recent failures"]
    for f in frame.failures:
        at = f"{f['at']:%Y-%m-%d %H:%M:%S}" if f["at"] else "-"
        error = " ".join(f["error"].split())[:80]
        lines.append(f"  {at}  {f['modality']:<6} {f['id']}  {error}")
    if not frame.failures:
        lines.append("  none")
    if frame.problems:
        lines += ["", "problems"] + [f"  {p}" for p in frame.problems]
    lines.append(f"\njobs/s = succeeded in the last {frame.window_s:g}s")
    lines.append(f"a worker's jobs = through its model since it started (?: it sends no "
                 f"count); messages = Celery tasks it took, each up to "
                 f"{settings.jobs_per_message} jobs")
    return "\n".join(lines)


def _render_slo(frame: Frame) -> list[str]:
    """The figures the alert rules watch, then what they would alert on now."""
    # Indented, so no row starts with a modality's name (the first table's rows do).
    lines = ["", f"{'slo':<11}{'live':>7}{'oldest queued':>15}{'oldest running':>16}"
                 f"{'failed (10m)':>15}"]
    for m, s in (frame.slo or {}).items():
        ratio = "-" if s.failure_ratio is None else f"{s.failure_ratio:.0%} of {s.finished}"
        lines.append(f"  {m:<9}{s.live_workers:>7}{_fmt_age(s.oldest_queued_s):>15}"
                     f"{_fmt_age(s.oldest_running_s):>16}{ratio:>15}")
    if frame.slo is None:
        lines.append("  unknown: no database")
    lines += ["", "alerts (conditions of producer/ops/monitoring/alerts.yml that hold now)"]
    return lines + ([f"  ! {a}" for a in frame.alerts] or ["  none"])


def _render_owners(owners: dict[str | None, dict[str, int]] | None) -> list[str]:
    """Busiest keys first; indented, so no row starts with a modality's name."""
    cols = ("queued", "running", "finished")
    lines = ["", f"{'owners':<24}" + "".join(f"{c:>11}" for c in cols)]
    if owners is None:
        return lines + ["  unknown: no database"]
    ranked = sorted(owners.items(), key=lambda kv: (-kv[1]["queued"] - kv[1]["running"],
                                                    -sum(kv[1].values()), kv[0] or ""))
    for owner, c in ranked[:MAX_OWNERS]:
        lines.append(f"  {(owner or NO_OWNER)[:22]:<22}" + "".join(f"{c[k]:>11}" for k in cols))
    if rest := ranked[MAX_OWNERS:]:
        lines.append(f"  {f'{len(rest)} more':<22}" + "".join(
            f"{sum(c[k] for _, c in rest):>11}" for k in cols))
    return lines if owners else lines + ["  no jobs"]


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise SystemExit("mmq top: --interval must be above 0")
    s = get_settings()
    engine = store.make_engine(s.db_url)
    sessions = store.session_factory(engine)
    app = producer_app(s)
    try:
        while True:
            frame = collect(s, sessions, app, window_s=args.interval, n_failures=args.failures)
            text = render(frame, s)
            if args.once:
                print(text)
                return 0 if not frame.problems else 1
            sys.stdout.write(CLEAR + text + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        engine.dispose()


def add_top_command(sub) -> None:
    p = sub.add_parser("top", help="live summary: queues, workers, jobs/s, failures")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between frames; jobs/s is measured over it")
    p.add_argument("--once", action="store_true",
                   help="print one frame and exit (exit 1 if a source did not answer)")
    p.add_argument("--failures", type=int, default=5, help="recent failures to list")
    p.set_defaults(func=cmd_top)
