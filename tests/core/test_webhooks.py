"""core/webhooks without a stack: signatures that the `standardwebhooks` package
verifies, the retry schedule, and a delivery refused at the door when its host now
resolves to a loopback address (a real listener proves nothing was sent)."""

from __future__ import annotations

import base64
import socket
import threading
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from core.config import Settings
from core.webhooks import signing
from core.webhooks.deliver import backoff_s, post

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
