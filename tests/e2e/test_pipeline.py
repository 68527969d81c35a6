"""End to end: SDK -> a real redis-server -> real worker processes -> SQLite / PostgreSQL.

Every test here runs once per database (the `database_url` fixture's params).
"""

from __future__ import annotations

import io
import signal
import time

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import func, select

from core import store
from core.broker.sender import send_jobs
from core.errors import InvalidInput
from core.training.samples import sentences
from producer.ops.stack import EXAMPLES
from producer.sdk import Client
from tests.helpers import Worker, assert_rows_close, service_env


@pytest.fixture(scope="module")
def stack(new_broker, database_url, tmp_path_factory):
    broker = new_broker()  # each database run gets a Redis database of its own
    env = service_env(broker, database_url)
    logs = tmp_path_factory.mktemp("logs")
    workers = [Worker(m, env, logs / f"{m}.log") for m in ("text", "image", "audio")]
    for w in workers:
        w.wait_ready()
    client = Client(broker_url=broker, database_url=database_url)
    yield client, env, workers
    client.close()
    for w in workers:
        w.stop()


def wav_bytes(seconds: float, freq: float = 440.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * freq * t), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def prediction_count(client: Client, job_ids: list[str]) -> int:
    with client.sessions() as s:
        return s.scalar(select(func.count()).select_from(store.Prediction)
                        .where(store.Prediction.job_id.in_(job_ids)))


def test_each_modality_round_trip_equals_the_model(stack, model):
    client, _, _ = stack
    texts = sentences(12, seed=5)
    pngs = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.png"))]
    wavs = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.wav"))] + [wav_bytes(1.3)]
    items = ([{"modality": "text", "input": t} for t in texts]
             + [{"modality": "image", "input": b} for b in pngs]
             + [{"modality": "audio", "input": b} for b in wavs])
    ids = client.submit_many(items)
    results = client.wait(ids, timeout=180)
    assert [r["status"] for r in results] == ["succeeded"] * len(ids), results
    assert prediction_count(client, ids) == len(ids)
    got = np.array([r["prediction"]["embedding"] for r in results], dtype=np.float32)
    want = np.concatenate([model.embed("text", texts).numpy(), model.embed("image", pngs).numpy(),
                           model.embed("audio", wavs).numpy()])
    assert_rows_close(got, want, model.version)
    assert all(r["worker"].startswith(r["modality"] + "-") for r in results)
    assert all(r["model_version"] == model.version for r in results)


def test_each_job_reaches_only_its_own_queue(stack):
    """Every modality's exchange is bound to its own queue alone, so a text job is
    never copied into the image or audio queue."""
    import redis

    client, env, _ = stack
    r = redis.Redis.from_url(env["MMQ_BROKER_URL"])
    for q in ("text", "image", "audio"):
        bound = {m.decode().split("\x06\x16")[2] for m in r.smembers(f"_kombu.binding.{q}")}
        assert bound == {q}, (q, bound)
    ids = client.submit_many([{"modality": "text", "input": f"only text {i}"}
                              for i in range(5)])
    res = client.wait(ids, timeout=60, with_embedding=False)
    assert all(x["attempts"] == 1 and x["worker"].startswith("text-") for x in res)


def test_classify_jobs(stack):
    client, _, _ = stack
    ids = [client.submit_text("the bank raised interest rates", task="classify",
                              labels=["sport", "finance"], top_k=1),
           client.submit_image(EXAMPLES / "photo-cat.jpg", task="classify",
                               labels=["a dog", "a cat", "a car"]),
           client.submit_audio(EXAMPLES / "spoken-yes.wav", task="classify",
                               labels=["yes", "no", "stop"])]
    r = client.wait(ids, timeout=120, with_embedding=False)
    assert [x["prediction"]["labels"][0][0] for x in r] == ["finance", "a cat", "yes"]
    assert len(r[0]["prediction"]["labels"]) == 1 and len(r[1]["prediction"]["labels"]) == 3


def test_the_demo_shows_a_photo_spoken_keywords_and_a_transcribed_sentence(stack, capsys):
    """`mmq demo` (and `mmq up --demo`): every job succeeds; the photograph is a cat, each
    spoken keyword is its word (scored zero-shot by the speech tower), and the spoken
    sentence is transcribed and classified as weather."""
    from producer.ops.stack import run_demo

    client, _, _ = stack
    run_demo(timeout=300, client=client)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] in (["text"], ["image"], ["audio"])]
    assert rows and all(r[2] == "succeeded" for r in rows), rows
    by_input = {}
    for r in rows:
        for w in r:
            if w.endswith((".jpg", ".wav")):
                by_input.setdefault(w, []).append(r)
                break
    assert by_input["photo-cat.jpg"][0][3:5] == ["a", "cat"]
    for name in ("spoken-yes.wav", "spoken-stop.wav", "spoken-seven.wav"):
        assert by_input[name][0][3] == name[len("spoken-"):-len(".wav")], by_input[name]
    transcribe, classify = by_input["spoken-weather.wav"]
    assert transcribe[1] == "transcribe" and "heard:" in transcribe
    assert classify[1] == "classify" and classify[3] == "weather"


def test_bad_payloads_fail_with_reasons_and_workers_go_on(stack):
    """Payloads that skipped producer validation (another client, a bug) still end
    `failed` with a readable error; the worker keeps serving the next job."""
    client, _, _ = stack
    with client.sessions.begin() as s:
        bad_img = store.create_job(session=s, modality="image", task="embed",
                                   payload=b"\x89PNG\r\n\x1a\n garbage").id
        empty_wav = store.create_job(session=s, modality="audio", task="embed",
                                     payload=b"").id
        bad_labels = store.create_job(session=s, modality="text", task="classify",
                                      text="hello", params={"labels": []}).id
    send_jobs(client.app, [(bad_img, "image"), (empty_wav, "audio"), (bad_labels, "text")])
    good = client.submit_many([{"modality": "image", "input": EXAMPLES / "digit-three.png"},
                               {"modality": "audio", "input": wav_bytes(0.5)}])
    res = {r["id"]: r for r in client.wait([bad_img, empty_wav, bad_labels] + good, 120)}
    assert res[bad_img]["status"] == "failed" and "not an image" in res[bad_img]["error"]
    assert res[empty_wav]["status"] == "failed" and "empty" in res[empty_wav]["error"]
    assert res[bad_labels]["status"] == "failed" and "labels" in res[bad_labels]["error"]
    assert all(res[g]["status"] == "succeeded" for g in good)
    assert res[bad_img]["attempts"] == 1  # bad input is not retried


def test_producer_validation_enqueues_nothing(stack):
    client, _, _ = stack
    with client.sessions() as s:
        before = s.scalar(select(func.count()).select_from(store.Job))
    for kw in ({"modality": "image", "input": b"not an image"},
               {"modality": "audio", "input": b""},
               {"modality": "text", "input": "   "},
               {"modality": "text", "input": "x", "task": "classify", "labels": []}):
        with pytest.raises(InvalidInput):
            client.submit_many([{"modality": "text", "input": "fine"}, kw])
    with client.sessions() as s:
        assert s.scalar(select(func.count()).select_from(store.Job)) == before


def test_cancel_before_start_prevents_the_run(stack):
    client, env, _ = stack
    # A client whose broker is unreachable: rows are written, sends fail, jobs stay queued.
    offline = Client(broker_url="redis://127.0.0.1:1/0", database_url=client.settings.db_url)
    ids = offline.submit_many([{"modality": "text", "input": f"never run {i}"}
                               for i in range(3)])
    assert [offline.get(i)["status"] for i in ids] == ["queued"] * 3
    assert offline.cancel(ids[0]) is True
    # The cancelled job's message arrives anyway (a race in real life): it must not run.
    send_jobs(client.app, [(ids[0], "text")])
    # The other two are re-sent by requeue (their message was never delivered).
    from core.broker.sweep import requeue_stale

    assert requeue_stale(client.settings, stale_s=0) == 2
    res = client.wait(ids, timeout=60)
    assert [r["status"] for r in res] == ["cancelled", "succeeded", "succeeded"]
    assert res[0]["attempts"] == 0 and res[0]["prediction"] is None
    assert client.cancel(ids[1]) is False  # finished jobs cannot be cancelled
    offline.close()


def test_cli_submit_wait_results_cancel(stack, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    client, env, _ = stack
    mmq = str(Path(sys.executable).parent / "mmq")
    run = lambda *a: subprocess.run([mmq, *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    d = tmp_path / "inbox"
    d.mkdir()
    (d / "note.txt").write_text("a short note about the weather")
    (d / "cat.jpg").write_bytes((EXAMPLES / "photo-cat.jpg").read_bytes())
    (d / "yes.wav").write_bytes((EXAMPLES / "spoken-yes.wav").read_bytes())
    (d / "ignored.bin").write_bytes(b"\0")
    r = run("submit", "--from-dir", str(d), "--task", "classify", "--labels",
            "cat,yes,weather", "--wait", "120")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted(x["modality"] for x in out) == ["audio", "image", "text"]
    assert {x["prediction"]["labels"][0][0] for x in out} == {"cat", "yes", "weather"}
    r = run("submit", "text", "one", "two")
    ids = r.stdout.split()
    assert r.returncode == 0 and len(ids) == 2
    r = run("wait", *ids, "--timeout", "60")
    assert r.returncode == 0 and all(x["status"] == "succeeded" for x in json.loads(r.stdout))
    r = run("status", ids[0])
    assert json.loads(r.stdout)["id"] == ids[0]
    r = run("results", "--status", "succeeded", "--since", "1h", "--json")
    assert {ids[0], ids[1]} <= {x["id"] for x in json.loads(r.stdout)}
    r = run("cancel", ids[0])
    assert r.returncode == 1 and "not cancelled" in r.stdout
    r = run("submit", "image", str(d / "ignored.bin"))
    assert r.returncode == 2 and "not an image" in r.stderr


def _until_running(client: Client, ids: list[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with client.sessions() as s:
            if s.scalar(select(func.count()).select_from(store.Job).where(
                    store.Job.id.in_(ids), store.Job.status == "running")):
                return
        time.sleep(0.005)


def test_sigkill_mid_job_is_redelivered_and_completed_once(broker_url, database_url,
                                                           start_worker):
    """Runs on a Redis database and workers of its own, not the stack's: it kills a
    worker, and no other test may depend on running before or after it."""
    # Short leases and a fast sweep (as tests/e2e/test_recovery.py): the killed worker's
    # running jobs come back in seconds rather than the default lease's 20 s.
    env = service_env(broker_url, database_url, MMQ_VISIBILITY_TIMEOUT=3, MMQ_LEASE_S=3,
                      MMQ_LEASE_RENEW_S=0.5, MMQ_REQUEUE_EVERY_S=1, MMQ_REQUEUE_STALE_S=5)
    victim = start_worker("text", env, concurrency=4)
    client = Client(broker_url=broker_url, database_url=database_url)
    ids = client.submit_many([{"modality": "text", "input": s}
                              for s in sentences(400, seed=9, median_words=40)])
    client.wait(ids[:5], timeout=120, with_embedding=False)  # busy, far from done
    for _ in range(5):
        _until_running(client, ids)  # kill mid-job, not in the gap between two batches
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        with client.sessions() as s:  # what was running at the kill: nothing runs now
            running = s.scalar(select(func.count()).select_from(store.Job).where(
                store.Job.id.in_(ids), store.Job.status == "running"))
        if running:
            break
        # The batch ended between the check and the kill (a forward is a fraction of a
        # second): a worker again, and another kill.
        victim = start_worker("text", env, concurrency=4)
    start_worker("text", env, concurrency=4)
    res = client.wait(ids, timeout=300, with_embedding=False)
    n_predictions = prediction_count(client, ids)
    client.close()
    assert all(r["status"] == "succeeded" for r in res)
    assert n_predictions == len(ids)  # exactly one prediction per job
    assert running >= 1, "the worker was killed between jobs; the test proves nothing"
    # Jobs caught mid-run were taken again by the new worker.
    assert sum(r["attempts"] >= 2 for r in res) >= running
