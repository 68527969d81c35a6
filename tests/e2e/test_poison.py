"""Poison messages: whatever lands on a queue that is not a valid mmq task goes to the
dead-letter list, and the worker keeps consuming the real jobs behind it.

A real redis-server, a real text worker, SQLite and PostgreSQL (``database_url``).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from core.broker import deadletter
from core.broker.sender import producer_app, send_jobs
from core.config import Settings
from producer.sdk import Client
from tests.helpers import free_port, service_env

ROOT = Path(__file__).parents[2]


def envelope_template(broker_url: str) -> dict:
    """A real kombu envelope as the producer writes it (for a job no SQL row has):
    the poison shapes below are this with one part broken."""
    r = redis.Redis.from_url(broker_url)
    ghost = str(uuid.uuid4())
    send_jobs(producer_app(Settings(broker_url=broker_url)), [(ghost, "text")])
    raw = r.lpop("text")  # the newest message is at the left end
    msg = json.loads(raw)
    assert msg["headers"]["id"] == ghost
    return msg


def renamed(msg: dict, **headers) -> dict:
    """A copy with its own task id and delivery tag (kombu's unacked hash is keyed by
    the tag: two messages sharing one would hide each other)."""
    out = json.loads(json.dumps(msg))
    tid = str(uuid.uuid4())
    out["headers"].update(id=tid, root_id=tid, **headers)
    out["properties"].update(correlation_id=tid, delivery_tag=str(uuid.uuid4()))
    return out


def poison_shapes(template: dict) -> list[tuple[str, bytes]]:
    """(expected reason, raw bytes as RPUSHed/LPUSHed onto the queue)."""
    bad_body = renamed(template)
    bad_body["body"] = base64.b64encode(json.dumps({"not": "a task body"}).encode()).decode()
    unknown_task = renamed(template, task="mmq.no_such_task")
    pickled = renamed(template)
    pickled["content-type"] = "application/x-python-serialize"
    pickled["body"] = base64.b64encode(pickle.dumps(([str(uuid.uuid4())], {}, {}))).decode()
    null_tag = renamed(template)  # kombu's QoS fails on it inside the event loop
    null_tag["properties"]["delivery_tag"] = None
    ghost = renamed(template)
    ghost["body"] = base64.b64encode(json.dumps(
        [[ghost["headers"]["id"]], {"modality": "text"}, {}]).encode()).decode()
    return [
        (deadletter.UNDECODABLE, b"\x00\xff this is not JSON \x80"),
        (deadletter.NOT_AN_ENVELOPE, b"[1, 2, 3]"),
        (deadletter.NOT_AN_ENVELOPE, json.dumps({"body": "no properties"}).encode()),
        (deadletter.NOT_AN_ENVELOPE, json.dumps(null_tag).encode()),
        (deadletter.BAD_BODY, json.dumps(bad_body).encode()),
        (deadletter.UNKNOWN_TASK, json.dumps(unknown_task).encode()),
        (deadletter.CONTENT_TYPE, json.dumps(pickled).encode()),
        (deadletter.UNKNOWN_JOB, json.dumps(ghost).encode()),
    ]


def scrape_dead_letters(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {s.labels["reason"]: s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples if s.name == "mmq_dead_letters_total"}


def poll(fn, timeout: float = 120, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_while_alive(client: Client, ids: list[str], worker, timeout: float = 180) -> list:
    """The jobs' results; fails at once if the worker exits (what poison used to do)."""
    end = time.monotonic() + timeout
    while True:
        assert worker.proc.poll() is None, "worker exited:\n" + worker.log.read_text()[-3000:]
        try:
            return client.wait(ids, timeout=2, with_embedding=False)
        except TimeoutError:
            if time.monotonic() > end:
                raise


def test_poison_messages_are_dead_lettered_and_jobs_behind_them_run(
        broker_url, database_url, start_worker):
    r = redis.Redis.from_url(broker_url)
    client = Client(broker_url=broker_url, database_url=database_url)
    shapes = poison_shapes(envelope_template(broker_url))
    # kombu LPUSHes and the worker BRPOPs: the first pushed is the first consumed.
    # Poison ahead of the first job, between jobs, and after the last one.
    ids: list[str] = []
    for i, (_, raw) in enumerate(shapes):
        r.lpush("text", raw)
        if i % 2:
            ids.append(client.submit_text(f"sentence number {i} between poison"))
    port = free_port()
    worker = start_worker("text", service_env(broker_url, database_url,
                                              MMQ_WORKER_METRICS_PORT=port))
    results = wait_while_alive(client, ids, worker)
    client.close()
    assert [x["status"] for x in results] == ["succeeded"] * len(ids), results
    dead = poll(lambda: (d := deadletter.list_entries(r)) and len(d) >= len(shapes) and d,
                what="dead letters")
    assert worker.proc.poll() is None, worker.log.read_text()[-3000:]
    assert [d.reason for d in dead] == [reason for reason, _ in shapes]
    for d, (_, raw) in zip(dead, shapes, strict=True):
        assert d.queue == "text" and d.detail and abs(d.time - time.time()) < 3600
        if d.reason != deadletter.UNKNOWN_JOB:
            assert d.raw_bytes() == raw
    # The unknown job's entry is the envelope as it was delivered (kombu marks it).
    ghost_id = json.loads(shapes[-1][1])["headers"]["id"]
    assert dead[-1].task_id == ghost_id
    assert json.loads(dead[-1].raw)["headers"]["id"] == ghost_id
    # Nothing left anywhere in kombu's bookkeeping: the poison was acknowledged.
    poll(lambda: r.llen("text") == 0 and r.hlen("unacked") == 0
         and r.zcard("unacked_index") == 0, what="empty queue and unacked hash")
    counts = scrape_dead_letters(port)
    want: dict[str, float] = {}
    for reason, _ in shapes:
        want[reason] = want.get(reason, 0) + 1
    assert {k: v for k, v in counts.items() if v} == want
    # Logged once each, not once per redelivery.
    log = worker.log.read_text()
    assert log.count("dead letter:") == len(shapes), log[-3000:]
    assert "Unrecoverable error" not in log


def test_dead_letter_list_is_capped_oldest_first_dropped(broker_url):
    r = redis.Redis.from_url(broker_url)
    for i in range(5):
        deadletter.push(r, reason=deadletter.UNDECODABLE, queue="text", raw=f"m{i}".encode(),
                        detail="test", max_len=3)
    assert [d.raw_bytes() for d in deadletter.list_entries(r)] == [b"m2", b"m3", b"m4"]
    assert deadletter.get(r, 1).raw_bytes() == b"m3" and deadletter.get(r, 7) is None
    assert deadletter.drop(r, 0) and not deadletter.drop(r, 9)
    assert [d.raw_bytes() for d in deadletter.list_entries(r)] == [b"m3", b"m4"]
    assert deadletter.drop_all(r) == 2 and deadletter.list_entries(r) == []


def mmq(broker: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMQ_BROKER_URL": broker}
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_dead_list_show_drop(broker_url):
    r = redis.Redis.from_url(broker_url)
    deadletter.push(r, reason=deadletter.UNDECODABLE, queue="text", raw=b"\x00\xffjunk",
                    detail="not JSON", max_len=10)
    deadletter.push(r, reason=deadletter.UNKNOWN_TASK, queue="image",
                    raw=b'{"headers": {"task": "x.y"}}', detail="no task 'x.y'", max_len=10)
    out = mmq(broker_url, "dead", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[:4] == ["#", "time", "queue", "reason"]
    assert lines[1].split()[0] == "0" and "text" in lines[1] and "undecodable" in lines[1]
    assert lines[2].split()[0] == "1" and "image" in lines[2] and "unknown-task" in lines[2]
    shown = mmq(broker_url, "dead", "show", "1")
    assert shown.returncode == 0, shown.stderr
    entry = json.loads(shown.stdout)
    assert entry["reason"] == "unknown-task" and entry["queue"] == "image"
    assert entry["raw"] == '{"headers": {"task": "x.y"}}' and entry["detail"] == "no task 'x.y'"
    assert mmq(broker_url, "dead", "show", "5").returncode == 3
    dropped = mmq(broker_url, "dead", "drop", "0")
    assert dropped.returncode == 0 and [d.queue for d in deadletter.list_entries(r)] == ["image"]
    assert mmq(broker_url, "dead", "drop").returncode != 0  # N or --all, never by accident
    assert mmq(broker_url, "dead", "drop", "--all").returncode == 0
    assert deadletter.list_entries(r) == []
    assert "no dead letters" in mmq(broker_url, "dead", "list").stdout


def test_closing_a_channel_whose_connection_is_gone_does_not_raise(broker_url):
    """After a Redis restart kombu closes the channel with its connection's client
    already None; restoring the unacked messages then raised AttributeError, which
    killed the worker (bench/chaos.py, Redis restarted empty)."""
    from kombu import Connection

    from workers.poison import GuardedRedisTransport

    with Connection(broker_url, transport=GuardedRedisTransport) as conn:
        channel = conn.channel()
        send_jobs(producer_app(Settings(broker_url=broker_url)), [(str(uuid.uuid4()), "text")])
        assert channel.basic_get("text", no_ack=False) is not None  # one unacked message
        channel.connection.client = None  # what the teardown leaves behind
        channel.close()  # raised AttributeError: 'NoneType' object has no attribute ...


def test_an_ack_after_the_connection_was_torn_down_does_not_stop_the_worker(broker_url):
    """A task that finishes after a broker failover tore its connection down acks on a
    channel whose transport has no client any more: kombu's AttributeError escaped into
    Celery's event loop and stopped every worker in bench/cluster.py's Sentinel
    failover. The guarded transport lets the ack go (kombu restores the channel's
    unacknowledged messages; the job's outcome is in the store)."""
    from kombu import Connection, Producer

    from workers.poison import GuardedRedisTransport

    conn = Connection(broker_url, transport=GuardedRedisTransport)
    ch = conn.default_channel
    Producer(ch).publish({"late": 1}, routing_key="text", headers={"id": "late-ack"})
    message = ch.basic_get("text", no_ack=False)
    assert message is not None
    client = ch.connection.client
    ch._disconnect_pools()  # what a reconnect leaves behind
    ch.connection.client = None
    try:
        message.ack()  # raised AttributeError: 'NoneType' object has no attribute 'hostname'
        message.channel.qos.reject(message.delivery_tag, requeue=True)
    finally:
        ch.connection.client = client
        conn.release()


def test_a_batch_message_dead_letters_its_unknown_job_and_runs_the_others(
        broker_url, database_url, start_worker):
    """A run_jobs message (several jobs, core/broker/sender.py) naming a job that no row
    has: that job is dead-lettered with the message as delivered, the message's real
    jobs run, and the message is acknowledged. A run_jobs message whose job ids are not
    strings is dead-lettered whole."""
    from core import store
    from core.jobs import RUN_JOBS_TASK

    r = redis.Redis.from_url(broker_url)
    client = Client(broker_url=broker_url, database_url=database_url)
    with client.sessions.begin() as s:
        real = [store.create_job(session=s, modality="text", task="embed",
                                 text=f"a real job in a batch {i}").id for i in range(2)]
    ghost = str(uuid.uuid4())
    bad = renamed(envelope_template(broker_url), task=RUN_JOBS_TASK)
    bad["body"] = base64.b64encode(json.dumps([[[1, 2]], {}, {}]).encode()).decode()
    r.lpush("text", json.dumps(bad))
    send_jobs(producer_app(Settings(broker_url=broker_url)),
              [(real[0], "text"), (ghost, "text"), (real[1], "text")], per_message=8)
    assert r.llen("text") == 1 + 3  # the bad message; the batch and its 2 fillers
    worker = start_worker("text", service_env(broker_url, database_url))
    results = wait_while_alive(client, real, worker)
    client.close()
    assert [x["status"] for x in results] == ["succeeded"] * 2, results
    dead = poll(lambda: (d := deadletter.list_entries(r)) and len(d) >= 2 and d,
                what="dead letters")
    assert [d.reason for d in dead] == [deadletter.BAD_BODY, deadletter.UNKNOWN_JOB]
    assert "not a list of 1 to 256 strings" in dead[0].detail
    assert dead[1].task_id == ghost and ghost in dead[1].detail
    delivered = json.loads(dead[1].raw)
    assert delivered["headers"]["task"] == RUN_JOBS_TASK
    poll(lambda: r.llen("text") == 0 and r.hlen("unacked") == 0,
         what="empty queue and unacked hash")
    assert worker.proc.poll() is None
