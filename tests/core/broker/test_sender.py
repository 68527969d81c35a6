"""Sending jobs: a send never waits without bound for a pooled broker connection."""

from __future__ import annotations

import threading

from kombu.exceptions import OperationalError

from core.broker import sender
from core.config import Settings


def test_a_send_with_every_connection_taken_fails_instead_of_hanging(monkeypatch):
    """Celery's producer pool waits for ever for one of its ``broker_pool_limit``
    connections; a submit must fail (the SDK then leaves the job to the sweep) instead."""
    monkeypatch.setattr(sender, "POOL_ACQUIRE_TIMEOUT_S", 0.5, raising=False)
    # No broker is contacted: the pool hands out lazy connections, and all are taken.
    app = sender.producer_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    taken = [app.pool.acquire(block=False) for _ in range(app.conf.broker_pool_limit)]
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            sender.send_jobs(app, [("job-1", "text")])
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "send_jobs waited for a broker connection without bound"
    assert isinstance(outcome[0], OperationalError), outcome
    assert "no broker connection came free" in str(outcome[0])
    for p in taken:
        p.release()


def test_jobs_go_to_messages_per_modality_in_submit_order():
    pairs = [("t1", "text"), ("i1", "image"), ("t2", "text"), ("t3", "text")]
    assert sender.messages(pairs, 2) == [("text", ["t1", "t2"]), ("text", ["t3"]),
                                         ("image", ["i1"])]
    assert sender.messages(pairs, 1) == [("text", ["t1"]), ("text", ["t2"]),
                                         ("text", ["t3"]), ("image", ["i1"])]


def test_a_submit_is_split_into_even_messages():
    """65 jobs at 64 a message are two of 33 and 32, not 64 and one; 500 are eight."""
    pairs = [(f"t{i}", "text") for i in range(65)]
    got = sender.messages(pairs, 64)
    assert [len(ids) for _, ids in got] == [33, 32]
    assert [j for _, ids in got for j in ids] == [j for j, _ in pairs]  # in order
    sizes = [len(ids) for _, ids in sender.messages([(f"t{i}", "text") for i in range(500)],
                                                    64)]
    assert sizes == [63, 63, 63, 63, 62, 62, 62, 62]


def test_a_producer_keeps_its_transport_across_a_sentinel_failover_switch(monkeypatch):
    """kombu's Connection.switch (a failover to the next URL of a sentinel:// list)
    re-reads the transport from the URL's scheme: the filling transport, set only as
    Celery's broker_transport, was dropped, and batches went out without fillers."""
    import kombu.transport
    from kombu.transport import TRANSPORT_ALIASES

    from core.broker.transport import FillingSentinelTransport

    for scheme in ("redis", "sentinel"):  # restored after the test, with kombu's memo
        monkeypatch.setitem(TRANSPORT_ALIASES, scheme, TRANSPORT_ALIASES[scheme])
    monkeypatch.setattr(kombu.transport, "_transport_cache", {})
    app = sender.producer_app(Settings(broker_url="sentinel://127.0.0.1:1;"
                                                  "sentinel://127.0.0.1:2"))
    conn = app.connection_for_write()
    assert isinstance(conn.transport, FillingSentinelTransport)
    conn.switch("sentinel://127.0.0.1:2")  # what a failover does; nothing connects yet
    assert isinstance(conn.transport, FillingSentinelTransport)


def test_a_messages_argument_reprs_are_the_ones_celery_would_make():
    """Flower shows a task's arguments from the reprs in its message; the sender makes
    them itself (Celery's saferepr was a quarter of a submit's CPU), the same text."""
    import uuid

    from celery.utils.saferepr import saferepr

    app = sender.producer_app(Settings(broker_url="memory://"))
    for n in (1, 16, 64):  # 64 ids exceed Celery's 1,024 characters: cut like Celery's
        ids = [str(uuid.uuid4()) for _ in range(n)]
        with app.connection_for_write() as conn:
            sender.send_jobs(app, [(i, "text") for i in ids], per_message=n)
            msg = conn.SimpleQueue("text", no_ack=True).get(timeout=5)
        headers = msg.headers
        args = [ids[0]] if n == 1 else [ids]
        assert headers["kwargsrepr"] == saferepr({"modality": "text"}, 1024)
        if n < 64:
            assert headers["argsrepr"] == saferepr(args, 1024)
        else:
            assert len(headers["argsrepr"]) <= 1024
            assert headers["argsrepr"].startswith(repr(args)[:1000])
        assert msg.decode()[0] == args


def test_a_send_to_a_broker_that_refuses_fails_at_its_first_refusal(monkeypatch):
    """With Redis down, kombu's connection set-up retried a refused connect with sleeps
    in between (3 connects, ~6 s a send): an SDK submit, which sends twice, took 12 s
    to leave its job queued for the sweep, and an API thread was held as long. One
    connect a send: counted here, not timed."""
    import redis.connection as rc

    connects: list[int] = []
    real = rc.AbstractConnection.connect

    def counting(self, *a, **k):
        connects.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(rc.AbstractConnection, "connect", counting)
    app = sender.producer_app(Settings(broker_url="redis://127.0.0.1:1/0"))  # refused
    try:
        sender.send_jobs(app, [("job-1", "text")])
    except OperationalError as e:
        assert "refused" in str(e).lower(), e
    else:
        raise AssertionError("a send to port 1 succeeded")
    assert len(connects) == 1, f"{len(connects)} connects for one send"
