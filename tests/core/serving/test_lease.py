"""LeaseKeeper's may-sweep guarantee: after a store outage a worker sweeps only once
its lease has been renewed without a break for a whole lease. Otherwise a sweep run
just after the store comes back finds every lease stale, its own included, and puts
back the messages and running jobs of live workers. Real SQLite; a clock the test
moves (the lease reads only ``time.monotonic``), so no step depends on timing."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from core import store
from core.config import Settings
from core.serving import lease as lease_mod
from core.serving.lease import LeaseKeeper
from core.store.migrations import upgrade

LEASE_S, RENEW_S = 20.0, 5.0


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Host:
    """What LeaseKeeper uses of a ModelHost: settings and transactions, with a
    store that can be taken down, or made to hang (the clock moves meanwhile)."""

    def __init__(self, settings: Settings, clock: Clock):
        self.settings, self.clock = settings, clock
        self.sessions = store.session_factory(store.make_engine(settings.db_url))
        self.down = False
        self.hang_s = 0.0
        self.during_hang: list[bool] = []  # may_sweep, asked while a renewal hangs
        self.keeper: LeaseKeeper | None = None

    def check_cancelled(self) -> list[str]:
        return []

    @contextmanager
    def tx(self):
        if self.down:
            raise OperationalError("renew", {}, ConnectionRefusedError("store down"))
        if self.hang_s:
            self.clock.t += self.hang_s
            self.during_hang.append(self.keeper.may_sweep())
            self.hang_s = 0.0
        with self.sessions.begin() as s:
            yield s


@pytest.fixture
def keeper(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'mmq.db'}"
    upgrade(url)
    clock = Clock()
    monkeypatch.setattr(lease_mod, "time", SimpleNamespace(monotonic=clock))
    host = Host(Settings(database_url=url, lease_s=LEASE_S, lease_renew_s=RENEW_S), clock)
    host.keeper = LeaseKeeper(host, "text-1.abc@h", "text")
    return host.keeper


def _renew_for(k: LeaseKeeper, seconds: float) -> list[bool]:
    """Renew every RENEW_S for ``seconds``; -> may_sweep after each renewal."""
    out = []
    for _ in range(int(seconds / RENEW_S)):
        k.host.clock.t += RENEW_S
        k.tick()
        out.append(k.may_sweep())
    return out


def test_a_worker_sweeps_only_after_a_whole_lease_of_renewals(keeper):
    k = keeper
    assert not k.may_sweep()  # never renewed
    k.tick()
    assert not k.may_sweep()  # renewed once: other workers' leases may be stale yet
    assert _renew_for(k, LEASE_S) == [False, False, False, True]
    with k.host.sessions() as s:
        assert k.worker in store.live_workers(session=s, lease=timedelta(seconds=LEASE_S))


def test_after_a_store_outage_a_worker_waits_a_whole_lease_before_sweeping(keeper):
    k = keeper
    k.tick()
    _renew_for(k, LEASE_S)
    assert k.may_sweep()
    k.host.down = True  # the store goes away: every lease goes stale, this one too
    assert _renew_for(k, 3 * LEASE_S) == [False] * 12
    k.host.down = False
    # Back: the first renewals must not let it sweep; the other workers have not all
    # renewed yet, and a sweep now would take their live messages and jobs.
    assert _renew_for(k, LEASE_S + RENEW_S) == [False, False, False, False, True]


def test_a_renewal_that_hangs_past_a_lease_counts_as_an_outage(keeper):
    """A cut link makes the renewal hang rather than fail: no renewal for a lease,
    and no failure to see."""
    k = keeper
    k.tick()
    _renew_for(k, LEASE_S)
    assert k.may_sweep()
    k.host.hang_s = 2 * LEASE_S
    assert _renew_for(k, RENEW_S) == [False]  # it came back: a new run of renewals
    assert k.host.during_hang == [False]  # and while it hung, no sweeping either
    # The hung renewal may have written its heartbeat when it began: only the next
    # one is surely fresh, and the run counts from there.
    assert _renew_for(k, LEASE_S + RENEW_S) == [False, False, False, False, True]


def test_a_failed_renewal_logs_the_drivers_message_not_its_sql(keeper, caplog):
    """SQLAlchemy's message carries the statement and its parameters: the warning
    gives the driver's own message, one short line."""
    import sqlite3

    k = keeper

    @contextmanager
    def failing_tx():
        raise OperationalError("INSERT INTO worker_leases (worker, modality) VALUES (?, ?)",
                               ("text-1.abc@h", "text"),
                               sqlite3.OperationalError("database is locked"))
        yield  # pragma: no cover

    k.host.tx = failing_tx
    with caplog.at_level("DEBUG", logger="mmq"):
        k.tick()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "database is locked" in warned[0]
    assert "INSERT INTO" not in warned[0] and "parameters" not in warned[0], warned[0]
    # Nor at debug level, where the traceback goes: where, never the statement.
    logged = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "Traceback (most recent call last)" in logged, logged
    assert "[SQL:" not in logged and "text-1.abc@h" not in logged, logged
