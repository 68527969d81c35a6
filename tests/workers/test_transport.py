"""A worker keeps mmq's guarded transport when kombu fails over to another Sentinel URL."""

from kombu.transport import TRANSPORT_ALIASES

from core.broker.transport import install
from core.config import Settings
from workers.app import GUARDED_TRANSPORTS, make_app
from workers.poison import GuardedSentinelTransport


def test_a_worker_keeps_its_guarded_transport_across_a_sentinel_failover_switch(monkeypatch):
    """kombu's Connection.switch re-reads the transport from the URL's scheme. Celery's
    broker_transport setting was all that chose the guarded one, so after a Sentinel
    failover the worker ran kombu's plain channel (no poison guard, no fetched-by
    records) and died on the first filler entry (tests/e2e/test_sentinel.py). The
    worker's entry point installs the guarded transports for the process."""
    import kombu.transport

    for scheme in ("redis", "sentinel"):  # restored after the test, with kombu's memo
        monkeypatch.setitem(TRANSPORT_ALIASES, scheme, TRANSPORT_ALIASES[scheme])
    monkeypatch.setattr(kombu.transport, "_transport_cache", {})
    install(GUARDED_TRANSPORTS, replace=True)  # as workers/__main__.py does
    app = make_app(Settings(broker_url="sentinel://127.0.0.1:1;sentinel://127.0.0.1:2"))
    conn = app.connection_for_read()
    assert isinstance(conn.transport, GuardedSentinelTransport)
    conn.switch("sentinel://127.0.0.1:2")
    assert isinstance(conn.transport, GuardedSentinelTransport)
