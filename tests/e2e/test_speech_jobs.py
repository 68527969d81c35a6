"""Speech end to end: audio jobs through a real audio worker on the Whisper tower,
submitted by the SDK and by the HTTP API (multipart, ``task=transcribe``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from core.config import Settings
from producer.api import create_app
from producer.ops.stack import EXAMPLES
from producer.sdk import Client
from tests.helpers import Worker, service_env

KEY = "speech-key"
SENTENCE = EXAMPLES / "spoken-weather.wav"  # "The weather will be rainy tomorrow." (espeak-ng)


@pytest.fixture(scope="module")
def speech(new_broker, tmp_path_factory):
    broker = new_broker()
    tmp = tmp_path_factory.mktemp("speech")
    db = f"sqlite:///{tmp / 'mmq.db'}"
    worker = Worker("audio", service_env(broker, db), tmp / "audio.log")
    worker.wait_ready()
    client = Client(broker_url=broker, database_url=db)
    api = TestClient(create_app(Settings(broker_url=broker, database_url=db, api_keys=KEY)))
    yield client, api
    api.close()
    client.close()
    worker.stop()


def test_a_spoken_sentence_is_transcribed_classified_and_embedded(speech, model):
    client, _ = speech
    wav = SENTENCE.read_bytes()
    ids = [client.submit_audio(wav, task="transcribe"),
           client.submit_audio(wav, task="classify", labels=["weather", "sport", "cooking"],
                               top_k=3),
           client.submit_audio(wav)]
    res = client.wait(ids, timeout=300)
    assert [r["status"] for r in res] == ["succeeded"] * 3, [r["error"] for r in res]
    texts = {r["prediction"]["text"] for r in res}
    assert len(texts) == 1 and "weather" in texts.pop().lower()  # one transcript per clip
    assert res[1]["prediction"]["labels"][0][0] == "weather"
    # The embedding is the transcript's: next to the sentence written down.
    written = model.embed("text", ["The weather will be rainy tomorrow."])[0].numpy()
    assert float(np.asarray(res[2]["prediction"]["embedding"]) @ written) > 0.8


def test_transcribe_over_http_and_silence_has_an_empty_transcript(speech):
    client, api = speech
    auth = {"Authorization": f"Bearer {KEY}"}
    r = api.post("/v1/jobs", headers=auth, data={"task": "transcribe"},
                 files={"file": ("weather.wav", SENTENCE.read_bytes(), "audio/wav")})
    assert r.status_code == 202, r.text
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, dtype="float32"), 16000, format="WAV")
    r2 = api.post("/v1/jobs", headers=auth, data={"task": "transcribe"},
                  files={"file": ("silence.wav", buf.getvalue(), "audio/wav")})
    assert r2.status_code == 202, r2.text
    done = client.wait([r.json()["id"], r2.json()["id"]], timeout=300)
    assert [d["status"] for d in done] == ["succeeded", "succeeded"]
    assert "weather" in done[0]["prediction"]["text"].lower()
    assert done[1]["prediction"]["text"] == ""
    got = api.get(f"/v1/jobs/{r.json()['id']}", headers=auth).json()
    assert "weather" in got["prediction"]["text"].lower()


def test_transcribe_is_refused_for_text_at_the_api(speech):
    _, api = speech
    r = api.post("/v1/jobs", headers={"Authorization": f"Bearer {KEY}"},
                 json={"modality": "text", "text": "hello", "task": "transcribe"})
    assert r.status_code == 422 and "transcribe is for audio" in r.text
