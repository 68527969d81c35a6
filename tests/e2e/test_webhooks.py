"""Signed webhooks and streamed job events end to end, on SQLite and PostgreSQL: `mmq
api` (uvicorn) and a real text worker over a real redis-server, and a receiver (a real
HTTP server in this process) that verifies every delivery with the `standardwebhooks`
package; an SSE client (`httpx-sse`) on GET /v1/jobs/{id}/events.

The retry schedule is shortened (base 0.5 s, doubling, capped at 4 s) so that a
receiver down for 30 s (PostgreSQL; 8 s on SQLite) sees several retries of every
event within the test; the API and the worker are both restarted while it is down.
Run with -s to see the delivery table.
"""

from __future__ import annotations

import base64
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from httpx_sse import connect_sse
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.helpers import Worker, free_port, service_env, wait_http

KEY, OTHER = "hook-e2e-key", "hook-e2e-other"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "whsec_" + base64.b64encode(b"mmq-e2e-webhook-secret-32-bytes!").decode()


class Receiver:
    """A webhook receiver: verifies each POST (standardwebhooks), keeps what came, and
    can be taken down (its port refuses connections) and brought back."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.got: list[dict] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(SECRET).verify(body, headers)
                    verified = True
                except WebhookVerificationError:
                    verified = False
                with receiver.lock:
                    receiver.got.append({"id": headers.get("webhook-id"), "body": body,
                                         "headers": headers, "verified": verified,
                                         "at": time.time()})
                self.send_response(204 if verified else 400)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def by_id(self) -> dict[str, list[dict]]:
        with self.lock:
            out: dict[str, list[dict]] = {}
            for g in self.got:
                out.setdefault(g["id"], []).append(g)
            return out

    def wait_for(self, ids: set[str], timeout: float) -> dict[str, list[dict]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            seen = self.by_id()
            if ids <= set(seen):
                return seen
            time.sleep(0.1)
        raise TimeoutError(f"{len(ids - set(self.by_id()))} of {len(ids)} events never came")


class Stack:
    def __init__(self, env: dict, logs):
        self.env, self.logs, self.port = env, logs, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.worker = Worker("text", env, logs / "text-0.log")
        self.api = None
        self.restarts = 0

    def start_api(self) -> None:
        log = self.logs / f"api-{self.restarts}.log"
        self.api = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port",
                                     str(self.port)], env=self.env, stdout=open(log, "wb"),
                                    stderr=subprocess.STDOUT)
        wait_http(f"{self.base}/healthz", self.api, log)

    def restart_all(self) -> None:
        """The API SIGKILLed (a crash), the worker stopped; then both started again."""
        self.restarts += 1
        self.api.send_signal(signal.SIGKILL)
        self.api.wait(10)
        self.worker.stop()
        self.worker = Worker("text", self.env, self.logs / f"text-{self.restarts}.log")
        self.start_api()
        self.worker.wait_ready()

    def stop(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            self.api.wait(20)
        self.worker.stop()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.down()


@pytest.fixture(scope="module")
def stack(new_broker, database_url, tmp_path_factory):
    env = service_env(new_broker(), database_url, MMQ_API_KEYS=f"{KEY},{OTHER}",
                      MMQ_WEBHOOK_SECRET=SECRET, MMQ_WEBHOOK_ALLOW_PRIVATE=1,
                      MMQ_WEBHOOK_RETRY_BASE_S=0.5, MMQ_WEBHOOK_RETRY_MAX_S=4,
                      MMQ_WEBHOOK_TIMEOUT_S=2, MMQ_WEBHOOK_POLL_S=0.2,
                      MMQ_REQUEUE_EVERY_S=1)
    subprocess.run([sys.executable, "-m", "producer.cli", "db", "upgrade"], env=env,
                   check=True)
    st = Stack(env, tmp_path_factory.mktemp("webhook-logs"))
    try:
        st.start_api()
        st.worker.wait_ready()
        yield st
    finally:
        st.stop()


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.base, headers=AUTH, timeout=60) as c:
        yield c


def _submit(http, receiver, n: int, **extra) -> list[str]:
    r = http.post("/v1/jobs:batch", json={"webhook_url": receiver.url, **extra,
                                          "items": [{"text": f"event {i} {time.time()}"}
                                                    for i in range(n)]})
    assert r.status_code == 202, r.text
    return [j["id"] for j in r.json()["jobs"]]


def _wait_done(http, ids, timeout=120):
    for i in ids:
        assert http.get(f"/v1/jobs/{i}/wait", params={"timeout": timeout}).json()[
            "status"] == "succeeded"


def _table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n{'events':>7} {'attempts':>9} {'delivered':>10} {'dup-after-dedup':>16}"
          f" {'deliver p50 s':>14} {'deliver max s':>14}")
    for r in rows:
        print(f"{r[0]:>7} {r[1]:>9} {r[2]:>10} {r[3]:>16} {r[4]:>14.2f} {r[5]:>14.2f}")


def _finished(http, job_id) -> float:
    return datetime.fromisoformat(http.get(f"/v1/jobs/{job_id}",
                                           params={"embedding": "false"}).json()
                                  ["finished_at"]).timestamp()


def test_one_verified_delivery_per_job(http, receiver, stack):
    ids = _submit(http, receiver, 6)
    sdk = http.post("/v1/jobs", json={"text": "with its vector", "webhook_url": receiver.url,
                                      "webhook_embedding": True}).json()["id"]
    ids.append(sdk)
    _wait_done(http, ids)
    seen = receiver.wait_for({f"msg_{i}" for i in ids}, 60)
    for i in ids:
        (got,) = seen[f"msg_{i}"]  # one delivery, verified
        assert got["verified"]
        event = json.loads(got["body"])
        assert event["type"] == "job.succeeded"
        # The event's data is the job as GET /v1/jobs/{id} returns it.
        want = http.get(f"/v1/jobs/{i}", params={"embedding": str(i == sdk).lower()}).json()
        assert event["data"] == want
        (hook,) = http.get(f"/v1/jobs/{i}/webhooks").json()["webhooks"]
        assert (hook["status"], hook["attempts"], hook["history"][0]["status_code"]) == (
            "delivered", 1, 204)
    assert len(json.loads(seen[f"msg_{sdk}"][0]["body"])["data"]["prediction"]
               ["embedding"]) == 384
    assert "embedding" not in json.loads(seen[f"msg_{ids[0]}"][0]["body"])["data"][
        "prediction"] or json.loads(seen[f"msg_{ids[0]}"][0]["body"])["data"]["prediction"][
        "embedding"] is None
    lat = [seen[f"msg_{i}"][0]["at"] - _finished(http, i) for i in ids]
    _table("webhooks, receiver up", [(len(ids), len(ids), len(ids), 0,
                                      statistics.median(lat), max(lat))])
    assert "mmq_webhook_deliveries" in http.get("/metrics").text


def test_a_tampered_body_fails_verification(http, receiver, stack):
    (job,) = _submit(http, receiver, 1)
    _wait_done(http, [job])
    (got,) = receiver.wait_for({f"msg_{job}"}, 60)[f"msg_{job}"]
    Webhook(SECRET).verify(got["body"], got["headers"])  # the real one passes
    tampered = got["body"].replace(b'"succeeded"', b'"failed"', 1)
    assert tampered != got["body"]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, got["headers"])
    other = "whsec_" + base64.b64encode(b"another-secret-of-thirty-two-by!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(got["body"], got["headers"])


def test_receiver_down_gets_every_event_once_after_dedup(http, receiver, stack,
                                                         database_url):
    down_s = 30 if database_url.startswith("postgresql") else 8
    receiver.down()
    t_down = time.time()
    ids = _submit(http, receiver, 8)
    _wait_done(http, ids)
    time.sleep(min(3, down_s / 4))
    hooks = [http.get(f"/v1/jobs/{i}/webhooks").json()["webhooks"][0] for i in ids]
    assert all(h["status"] == "pending" and h["attempts"] >= 1 and h["last_error"]
               for h in hooks), hooks
    stack.restart_all()  # every delivering process dies and comes back meanwhile
    time.sleep(max(0.0, t_down + down_s - time.time()))
    receiver.up()
    t_up = time.time()
    seen = receiver.wait_for({f"msg_{i}" for i in ids}, 60)
    time.sleep(1)  # a duplicate, if any, would come now
    seen = receiver.by_id()
    deliveries = [seen[f"msg_{i}"] for i in ids]
    assert all(g["verified"] for d in deliveries for g in d)
    dedup = {g["id"] for d in deliveries for g in d}
    assert dedup == {f"msg_{i}" for i in ids}  # every event, each webhook-id once
    hooks = [http.get(f"/v1/jobs/{i}/webhooks").json()["webhooks"][0] for i in ids]
    attempts = [h["attempts"] for h in hooks]
    assert all(h["status"] == "delivered" for h in hooks)
    assert min(attempts) >= 3, attempts  # several retries while it was down
    # The same webhook-id on every attempt: the receiver only saw the successful ones.
    assert all(h["history"][-1]["status_code"] == 204 for h in hooks)
    assert all(h["history"][0]["status_code"] is None for h in hooks)
    after_up = [min(g["at"] for g in seen[f"msg_{i}"]) - t_up for i in ids]
    received = sum(len(d) for d in deliveries)
    _table(f"webhooks, receiver down {down_s} s (API and worker restarted meanwhile); "
           "deliver = after it came back", [(len(ids), sum(attempts), len(dedup),
                                             received - len(dedup),
                                             statistics.median(after_up), max(after_up))])


def test_sse_client_sees_queued_running_succeeded(http, stack):
    job = http.post("/v1/jobs", json={"text": "stream me"}).json()["id"]
    with connect_sse(http, "GET", f"/v1/jobs/{job}/events") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
    print(f"\nSSE client saw: {[(e, d.get('status')) for e, d in events]}")
    assert events[-1] == ("end", {})
    events = events[:-1]
    assert [d["status"] for _, d in events] == ["queued", "running", "succeeded"]
    assert {e for e, _ in events} == {"status"}
    final = events[-1][1]
    assert final["prediction"]["dim"] == 384 and final["prediction"]["embedding"] is None
    assert final == http.get(f"/v1/jobs/{job}", params={"embedding": "false"}).json()
    # Several jobs in one stream; a late stream still tells each job's whole history.
    ids = [http.post("/v1/jobs", json={"text": f"many {i}"}).json()["id"] for i in range(3)]
    _wait_done(http, ids[:1])
    with connect_sse(http, "GET", "/v1/jobs:events", params={"ids": ",".join(ids)}) as source:
        got = [json.loads(e.data) for e in source.iter_sse() if e.event == "status"]
    for i in ids:
        assert [d["status"] for d in got if d["id"] == i] == ["queued", "running",
                                                               "succeeded"]
    # Ownership like the other job routes: another key's job is a 404, no key a 401.
    assert http.get(f"/v1/jobs/{job}/events",
                    headers={"Authorization": f"Bearer {OTHER}"}).status_code == 404
    assert httpx.get(f"{stack.base}/v1/jobs/{job}/events").status_code == 401
