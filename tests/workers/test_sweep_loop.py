"""The worker's sweep thread asks its lease first (core/serving/lease.py): just after a
store outage every lease is stale, its own included, and a sweep would put back the
messages and running jobs of live workers."""

from __future__ import annotations

import threading

from workers.__main__ import _sweep_forever


class Lease:
    def __init__(self):
        self.allowed = False
        self.asked = threading.Semaphore(0)

    def may_sweep(self) -> bool:
        self.asked.release()
        return self.allowed


def test_the_sweep_thread_sweeps_only_when_its_lease_allows(monkeypatch):
    import core.broker.sweep

    swept = threading.Semaphore(0)
    monkeypatch.setattr(core.broker.sweep, "sweep", lambda *a, **kw: swept.release())
    lease, stop = Lease(), threading.Event()
    t = threading.Thread(target=_sweep_forever, args=("text", 0.001, lease, stop))
    t.start()
    try:
        for _ in range(20):  # twenty turns, each asked and refused
            assert lease.asked.acquire(timeout=60)
        assert not swept.acquire(blocking=False)
        lease.allowed = True
        assert swept.acquire(timeout=60)
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive()


def _sql_error():
    """What SQLAlchemy raises: its message carries the statement and its parameters."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    return OperationalError("DELETE FROM worker_leases WHERE heartbeat_at < ? RETURNING worker",
                            (-86400.0,), sqlite3.OperationalError("database is locked"))


def _one_short_warning(caplog) -> str:
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warned, "no warning logged"
    line = warned[0].getMessage()
    assert "database is locked" in line and "OperationalError" in line
    assert "DELETE FROM" not in line and "parameters" not in line, line
    # Nor at debug level, where the traceback goes: where, never the statement.
    logged = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "Traceback (most recent call last)" in logged, logged
    assert "DELETE FROM" not in logged and "-86400" not in logged, logged
    return line


def test_a_failed_sweep_logs_the_drivers_message_not_its_sql(monkeypatch, caplog):
    import core.broker.sweep

    failed = threading.Semaphore(0)

    def sweep(*a, **kw):
        failed.release()
        raise _sql_error()

    monkeypatch.setattr(core.broker.sweep, "sweep", sweep)
    lease, stop = Lease(), threading.Event()
    lease.allowed = True
    with caplog.at_level("DEBUG", logger="mmq"):
        t = threading.Thread(target=_sweep_forever, args=("text", 0.001, lease, stop))
        t.start()
        try:
            assert failed.acquire(timeout=60)
        finally:
            stop.set()
            t.join(60)
    _one_short_warning(caplog)


def test_a_failed_first_renewal_logs_the_drivers_message_not_its_sql(caplog):
    from workers.__main__ import _first_renewal

    class FirstFails:
        tries = 0

        def renew(self):
            self.tries += 1
            if self.tries == 1:
                raise _sql_error()

    lease = FirstFails()
    with caplog.at_level("DEBUG", logger="mmq"):
        _first_renewal(lease, 0.001)
    assert lease.tries == 2
    _one_short_warning(caplog)
