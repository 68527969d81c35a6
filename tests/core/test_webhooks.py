"""core/webhooks without a stack: signatures that the `standardwebhooks` package
verifies, the retry schedule, URLs refused at submit because no delivery to them could
ever succeed, and a delivery refused at the door when its host now resolves to a
loopback address (a real listener proves nothing was sent), and IPv6 forms that carry a
private IPv4 address refused at both."""

from __future__ import annotations

import base64
import socket
import threading
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from core.config import Settings
from core.errors import InvalidInput
from core.webhooks import signing
from core.webhooks.deliver import backoff_s, post
from core.webhooks.urls import check_url

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_signatures_verify_with_the_standard_library_and_tampering_fails():
    body = b'{"type":"job.succeeded","data":{"id":"x"}}'
    key = signing.secret_key(SECRET)
    headers = signing.headers(key, "msg_x", int(time.time()), body)
    hook = Webhook(SECRET)
    assert hook.verify(body, headers) == {"type": "job.succeeded", "data": {"id": "x"}}
    with pytest.raises(WebhookVerificationError):
        hook.verify(body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        hook.verify(body, {**headers, "webhook-id": "msg_y"})
    with pytest.raises(WebhookVerificationError, match="too old"):  # replays are refused
        hook.verify(body, signing.headers(key, "msg_x", int(time.time()) - 3600, body))
    for bad in ("", "secret", "whsec_not*base64", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            signing.secret_key(bad)


def test_backoff_doubles_up_to_its_cap_with_bounded_jitter():
    s = Settings(webhook_retry_base_s=5, webhook_retry_max_s=60)
    assert [backoff_s(n, s, rnd=lambda: 0.5) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert backoff_s(1, s, rnd=lambda: 0.0) == pytest.approx(4.0)
    assert backoff_s(1, s, rnd=lambda: 1.0) == pytest.approx(6.0)
    assert backoff_s(500, s, rnd=lambda: 0.5) == 60  # no overflow after many attempts


# URLs that http.client refuses to send (InvalidURL, or no connection at all) or that
# PostgreSQL refuses to store (NUL in a text column): each must be a 422 at submit, in
# development mode too, not 24 h of failed attempts or a 500. Address literals: no DNS.
UNDELIVERABLE = {
    "http://1.1.1.1/a b": "whitespace or control character",
    "http://1.1.1.1/a\tb": "whitespace or control character",
    "http://1.1.1.1/a?b=\x01": "whitespace or control character",
    "http://example.com/\x00": "whitespace or control character",
    "http://example.com/?q=\x00": "whitespace or control character",
    "http://1.1.1.1/\x7f": "whitespace or control character",
    "http://1.1.1.1/\u2028": "whitespace or control character",
    "http://1.1.1.1:0/": "port",
    "http://1.1.1.1:65536/": "port",
    "http://1.1.1.1:x/": "port",
    "http://a..b/": "not a valid host name",
    "http://.a/": "not a valid host name",
    "http://-a.example/": "not a valid host name",
    "http://a!b.example/": "not a valid host name",
    "http://" + "x" * 64 + ".example/": "not a valid host name",
    "http://" + "x." * 127 + "example/": "not a valid host name",
    "http://1.1.1.1/caf\u00e9": "non-ASCII",
    "http://b\u00fccher.example/": "non-ASCII",
}


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize("url", list(UNDELIVERABLE))
def test_urls_that_can_never_be_delivered_are_refused(url, allow_private):
    with pytest.raises(InvalidInput, match=UNDELIVERABLE[url]) as e:
        check_url(url, allow_private=allow_private, index=3)
    assert e.value.reason.startswith("webhook_url: ") and e.value.index == 3


@pytest.mark.parametrize("url", [
    "http://1.1.1.1/a%20b?x=%00", "https://1.1.1.1:65535/", "http://1.1.1.1:/",
    "http://[2606:4700:4700::1111]:1/", "http://hooks.example./", "http://in_ternal.example/",
    "http://xn--bcher-kva.example/p", "http://" + "x" * 63 + ".example/",
])
def test_urls_that_can_be_delivered_are_kept(url):
    assert check_url(url, allow_private=True) == url


# URLs stored before the submit checks above, or that get past them some other way:
# each raised out of post() (not OSError or HTTPException), so the delivery turn failed
# and the delivery stayed pending with 0 attempts forever. Development mode: the address
# check would refuse these before the error.
RAISED = {
    "http://a..b/": "UnicodeError",  # the resolver's IDNA encoding: an empty label
    "http://127.0.0.1:99999/": "ValueError",  # urlsplit's port: out of range
    "http://127.0.0.1:1/caf\u00e9": "UnicodeEncodeError",  # http.client's ASCII request line
}


@pytest.mark.parametrize("url", list(RAISED))
def test_any_error_of_one_post_is_its_failed_attempt(url):
    status, error = post(url, b"{}", {}, timeout=1, allow_private=True)
    assert status is None and RAISED[url] in error


def test_a_host_resolving_to_loopback_is_not_called():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(1.5)
    port = listener.getsockname()[1]
    got: list = []

    def accept():
        try:
            got.append(listener.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    status, error = post(f"http://localhost:{port}/h", b"{}", {}, timeout=1,
                         allow_private=False)
    t.join()
    listener.close()
    assert status is None and "private" in error and got == []
    # Allowed (tests, local development): the same URL is called.
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(1)

    def answer():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    assert post(f"http://127.0.0.1:{port}/h", b"{}", {}, timeout=5,
                allow_private=True) == (204, None)
    t.join()
    listener.close()


def _sql_error():
    """What SQLAlchemy raises: its message carries the statement and its parameters."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    return OperationalError("UPDATE webhook_deliveries SET attempts=? WHERE id = ?",
                            (1, "d1"), sqlite3.OperationalError("database is locked"))


def _warnings(caplog) -> list[str]:
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for line in warned:
        assert "database is locked" in line, line
        assert "UPDATE webhook_deliveries" not in line and "parameters" not in line, line
    # Nor at debug level, where the traceback goes: where, never the statement.
    logged = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "Traceback (most recent call last)" in logged, logged
    assert "UPDATE webhook_deliveries" not in logged and "[parameters" not in logged, logged
    return warned


def test_store_errors_of_delivery_log_the_drivers_message_not_its_sql(monkeypatch, caplog):
    from contextlib import contextmanager

    from core.store.webhooks import Claimed
    from core.webhooks import deliver

    d = deliver.Deliverer(sessions=None, settings=Settings(webhook_secret=SECRET,
                                                           webhook_poll_s=0.001))

    def run_once():  # a turn's claim fails; the loop goes on
        d._stop.set()
        raise _sql_error()

    monkeypatch.setattr(d, "run_once", run_once)
    with caplog.at_level("DEBUG", logger="mmq"):
        d._loop()
    assert len(_warnings(caplog)) == 1

    caplog.clear()

    @contextmanager
    def failing_tx():  # the attempt's record fails
        raise _sql_error()
        yield  # pragma: no cover

    @contextmanager
    def no_session():
        yield None

    monkeypatch.setattr(d, "sessions", no_session)
    monkeypatch.setattr(deliver, "event_body", lambda *a: None)
    monkeypatch.setattr(d, "_tx", failing_tx)
    claimed = Claimed(id="d1", job_id="j1", event="job.succeeded", url="http://x/",
                      attempts=0, claim="c")
    with caplog.at_level("DEBUG", logger="mmq"):
        assert d.attempt(claimed) is None
    assert len(_warnings(caplog)) == 1
    d.stop()


# IPv6 forms that carry an IPv4 address, judged by the address they carry: the stdlib's
# is_global judged them as IPv6 (all "global") and let loopback through. Teredo and the
# local-use NAT64 prefix are refused whatever they carry.
EMBEDS_PRIVATE_IPV4 = [
    "::127.0.0.1",  # IPv4-compatible (::/96)
    "::ffff:127.0.0.1",  # IPv4-mapped (::ffff:0:0/96)
    "::ffff:0:10.0.0.1",  # IPv4-translated (::ffff:0:0:0/96, SIIT)
    "64:ff9b::7f00:1",  # NAT64, well-known prefix (64:ff9b::/96): 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64: 169.254.169.254, the cloud metadata endpoint
    "64:ff9b:1::7f00:1",  # NAT64, local-use prefix (64:ff9b:1::/48): never public
    "2002:7f00:1::",  # 6to4 (2002::/16): 127.0.0.1 in bits 16-48
    "2002:c0a8:101::1",  # 6to4: 192.168.1.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo (2001::/32): client 127.0.0.1
    "2001:0:808:808:8000:63bf:f7f7:f7f7",  # Teredo with public server and client
]
PUBLIC = [
    "2606:4700:4700::1111", "8.8.8.8", "::8.8.8.8", "::ffff:8.8.8.8",
    "64:ff9b::808:808", "2002:808:808::1",
]


@pytest.mark.parametrize("ip", EMBEDS_PRIVATE_IPV4)
def test_ipv6_forms_carrying_a_private_ipv4_are_refused_at_submit_and_delivery(ip):
    host = f"[{ip}]" if ":" in ip else ip
    with pytest.raises(InvalidInput, match="private, loopback or link-local"):
        check_url(f"http://{host}/h", allow_private=False)
    # Stored before the fix, or resolved from a name later (DNS rebinding): refused at
    # the door, before any connection.
    status, error = post(f"http://{host}:1/h", b"{}", {}, timeout=1, allow_private=False)
    assert status is None and "private" in error


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_ipv6_and_public_ipv4_carried_in_ipv6_are_accepted(ip):
    url = f"http://[{ip}]/h" if ":" in ip else f"http://{ip}/h"
    assert check_url(url, allow_private=False) == url
