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
