"""The OpenAI-compatible routes through the official ``openai`` client: `mmq api`
(uvicorn) -> a real redis-server -> real text and audio workers -> SQLite and PostgreSQL.

The client is pointed at mmq with only ``base_url`` and ``api_key``; what it reads must
be what the jobs hold: embeddings equal to the SDK's, transcripts equal to the
transcribe job's in every response format. Refusals come back as the client's own
exceptions. A second app on the same database, whose queue no worker reads, makes the
full queue (429) and the bounded wait (504) deterministic.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from core.config import Settings
from producer.ops.stack import EXAMPLES
from producer.sdk import Client
from tests.helpers import Worker, free_port, served_app, service_env, speak, wait_http

KEY = "oai-key"
SENTENCES = ["the weather will be rainy tomorrow", "please turn off the lights in the kitchen"]
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


@pytest.fixture(scope="module")
def two_sentences() -> bytes:
    """A WAV of two sentences 1.5 s apart: two segments, whatever the window."""
    gap = np.zeros(24_000, np.float32)
    wave = np.concatenate([speak(SENTENCES[0]), gap, speak(SENTENCES[1])])
    buf = io.BytesIO()
    sf.write(buf, wave, 16_000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(new_broker, database_url, tmp_path_factory):
    """-> (OpenAI client, httpx client with the key, SDK client, API base URL)."""
    broker = new_broker()
    env = service_env(broker, database_url, MMQ_API_KEYS=f"{KEY}:{KEY}-secret",
                      MMQ_MAX_WAIT_S=240)
    logs = tmp_path_factory.mktemp("openai-logs")
    subprocess.run([sys.executable, "-m", "producer.cli", "db", "upgrade"], env=env, check=True)
    workers = [Worker(m, env, logs / f"{m}.log") for m in ("text", "audio")]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                              env=env, stdout=open(logs / "api.log", "wb"),
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    sdk = Client(broker_url=broker, database_url=database_url)
    try:
        for w in workers:
            w.wait_ready()
        wait_http(f"{base}/healthz", server, logs / "api.log")
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key=f"{KEY}-secret", max_retries=0,
                            timeout=300)
        with httpx.Client(base_url=base, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}-secret"}) as http:
            yield oai, http, sdk, base
    finally:
        server.terminate()
        server.wait(20)
        for w in workers:
            w.stop()
        sdk.close()


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_equal_the_sdks_for_a_string_a_list_and_audio(stack):
    oai, http, sdk, _ = stack
    wav = (EXAMPLES / "spoken-yes.wav").read_bytes()
    texts = ["a cat sleeps on the sofa", "stocks fell sharply", "the weather is rainy"]
    ids = [sdk.submit_text(t) for t in texts] + [sdk.submit_audio(wav)]
    with ThreadPoolExecutor(3) as pool:  # at once: the jobs share the workers' batches
        # No encoding_format: the client asks for base64 and decodes it to floats.
        one = pool.submit(oai.embeddings.create, model="default", input=texts[0])
        many = pool.submit(oai.embeddings.create, model="base", input=texts[1:],
                           encoding_format="float")
        audio = pool.submit(oai.embeddings.create, model="default", input=[
            {"audio": "data:audio/wav;base64," + base64.b64encode(wav).decode()}],
            encoding_format="base64")
        one, many, audio = one.result(), many.result(), audio.result()
    ref = [r["prediction"]["embedding"] for r in sdk.wait(ids, timeout=240)]
    # Asked for explicitly, base64 comes back as sent (the client decodes only the
    # base64 it asked for itself): little-endian float32.
    b64 = np.frombuffer(base64.b64decode(audio.data[0].embedding), "<f4")
    got = [one.data[0].embedding, *(d.embedding for d in many.data), b64]
    assert [len(g) for g in got] == [384] * 4
    assert min(_cos(g, r) for g, r in zip(got, ref, strict=True)) >= 0.9999
    assert [d.index for d in many.data] == [0, 1] and one.object == "list"
    assert one.usage.prompt_tokens > 0 and many.usage.total_tokens > one.usage.total_tokens
    assert many.model == "base"
    # Ordinary jobs, owned by the key: read, listed and searched like any other.
    job_id = many.data[1].model_extra["job_id"]
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["owner"] == KEY and job["status"] == "succeeded" and job["task"] == "embed"
    listed = {j["id"] for j in http.get("/v1/jobs", params={"limit": 50}).json()["jobs"]}
    assert {one.data[0].model_extra["job_id"], job_id} <= listed
    found = http.post("/v1/search", json={"query": {"text": texts[1]}, "k": 5}).json()
    assert job_id in [h["id"] for h in found["results"]], found


def _cues(body: str) -> list[tuple[float, float, str]]:
    """SRT or WebVTT cues -> (start s, end s, text)."""
    out = []
    for m in re.finditer(r"(\d\d):(\d\d):(\d\d)[,.](\d{3}) --> (\d\d):(\d\d):(\d\d)[,.](\d{3})"
                         r"\n(.*)\n", body):
        g = [int(x) for x in m.groups()[:8]]
        out.append((g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000,
                    g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000, m.group(9)))
    return out


def test_transcriptions_are_the_jobs_transcript_in_every_format(stack, two_sentences):
    oai, http, _, _ = stack

    def create(fmt: str):
        raw = oai.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=("two.wav", two_sentences, "audio/wav"),
            response_format=fmt, language="en")
        return raw.headers["mmq-job-id"], raw.parse()

    with ThreadPoolExecutor(len(FORMATS)) as pool:  # one audio batch
        got = dict(zip(FORMATS, pool.map(create, FORMATS), strict=True))
    for fmt, (job_id, body) in got.items():
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["task"] == "transcribe" and job["owner"] == KEY, job
        text, segs = job["prediction"]["text"], job["prediction"]["segments"]
        assert "weather" in text.lower() and "kitchen" in text.lower(), text
        assert len(segs) == 2 and "".join(s[2] for s in segs).strip() == text, segs
        if fmt == "json":
            assert body.text == text
        elif fmt == "text":
            assert body == text
        elif fmt in ("srt", "vtt"):
            assert body.startswith("WEBVTT\n\n" if fmt == "vtt" else "1\n")
            cues = _cues(body)
            assert [c[2] for c in cues] == [s[2].strip() for s in segs]
            times = [t for a, b, _ in cues for t in (a, b)]
            assert times == pytest.approx([t for a, b, _ in segs for t in (a, b)], abs=1e-3)
            # Plausible: increasing, the first within a second of the start, the second
            # sentence after the 1.5 s pause, all within the 5-6 s clip.
            assert times == sorted(times) and times[0] < 1.0, body
            assert cues[0][1] < cues[1][0] + 0.01 and cues[1][0] > 1.8, body
            assert times[-1] <= job_seconds(two_sentences) + 0.02, body
        else:
            assert body.text == text and body.language == "english"
            assert body.duration == pytest.approx(job_seconds(two_sentences), abs=1e-3)
            assert [(s.start, s.end, s.text) for s in body.segments] == \
                [tuple(s) for s in segs]


def job_seconds(wav: bytes) -> float:
    info = sf.info(io.BytesIO(wav))
    return info.frames / info.samplerate


def test_other_languages_and_bad_keys_are_the_clients_errors(stack, two_sentences):
    oai, _, _, base = stack
    with pytest.raises(openai.BadRequestError) as e:
        oai.audio.transcriptions.create(model="whisper-1", language="fr",
                                        file=("a.wav", two_sentences, "audio/wav"))
    err = e.value.body
    assert err["param"] == "language" and "English only" in err["message"], err
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="default", input="hello")
    with pytest.raises(openai.AuthenticationError):
        bad.audio.transcriptions.create(model="whisper-1",
                                        file=("a.wav", two_sentences, "audio/wav"))
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError) as e:  # never fetched by the server
        oai.embeddings.create(model="default", input=[{"image": "http://example.com/a.png"}])
    assert "never fetches" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.embeddings.create(model="no-such-version", input="hello")
    assert e.value.body["param"] == "model", e.value.body


def test_models_list_reads_the_versions(stack):
    oai, http, _, _ = stack
    ids = [m.id for m in oai.models.list()]
    assert ids[:2] == ["default", "base"]
    mmq = http.get("/v1/models").json()  # mmq's own fields stay
    assert set(mmq["serving"]) == {"text", "image", "audio"} and "versions" in mmq


def test_a_full_queue_is_a_rate_limit_and_a_long_wait_a_timeout(new_broker, database_url,
                                                                  stack):
    """No worker reads this app's queue (limit: one job): the first request is queued
    and not done within MMQ_MAX_WAIT_S (504, not retried: a retry would queue it again);
    the second finds the queue full (429 with Retry-After)."""
    s = Settings(broker_url=new_broker(), database_url=database_url,
                 api_keys=f"{KEY}:{KEY}-secret", max_queue_depth=1, max_wait_s=0.5)
    with served_app(s) as base:
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key=f"{KEY}-secret", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            oai.embeddings.create(model="default", input="waits for a worker")
        assert e.value.status_code == 504 and "not done within" in e.value.body["message"]
        with pytest.raises(openai.RateLimitError) as e:
            oai.embeddings.create(model="default", input="finds the queue full")
        r = e.value.response
        assert r.headers["retry-after"] == "5" and e.value.body["type"] == "rate_limit_error"
        assert set(e.value.body) == {"message", "type", "param", "code"}
