"""Bad input at the SDK: every case is ``InvalidInput`` naming the item, and nothing
is written. The broker is unreachable on purpose: validation must refuse the item
before any send is tried (a valid item still gets a job id; ``requeue`` sends it).
SQLite and PostgreSQL both, because PostgreSQL refuses some strings SQLite keeps."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from core import store
from core.config import Settings, get_settings
from core.errors import InvalidInput
from producer.sdk import Client
from tests.helpers import big_png, cut_images, wav_claiming

DOWN_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture(scope="module")
def client(database_url):  # noqa: F811
    s = Settings(broker_url=DOWN_BROKER, database_url=database_url,
                 max_labels=8, max_label_chars=20, max_top_k=50, max_timeout_s=3600)
    c = Client(settings=s)
    yield c
    c.close()


def _jobs(c: Client) -> int:
    with c.sessions() as s:
        return s.scalar(select(func.count()).select_from(store.Job))


CLASSIFY = {"modality": "text", "input": "x", "task": "classify", "labels": ["a", "b"]}
BAD = {
    "text with NUL": ({"modality": "text", "input": "a\x00b"}, "NUL"),
    "text bytes with NUL": ({"modality": "text", "input": b"a\x00b"}, "NUL"),
    # Zero-width characters and whitespace alone: scored as an empty string before.
    "text only zero-width": ({"modality": "text", "input": "\u200b \ufeff\u2060"},
                             "no visible characters"),
    # Combining marks with no letter under them: the tokenizer strips them as accents.
    "text only combining marks": ({"modality": "text", "input": "\u0301 \u0308"},
                                  "combining marks"),
    "label only combining marks": ({**CLASSIFY, "labels": ["a", "\u0301"]},
                                   "combining marks"),
    "top_k not a number": ({**CLASSIFY, "top_k": "five"}, "top_k"),
    "top_k float": ({**CLASSIFY, "top_k": 2.5}, "top_k"),
    "top_k bool": ({**CLASSIFY, "top_k": True}, "top_k"),
    "top_k zero": ({**CLASSIFY, "top_k": 0}, "top_k"),
    "top_k zero, embed": ({"modality": "text", "input": "x", "top_k": 0}, "top_k"),
    "top_k huge": ({**CLASSIFY, "top_k": 10**12}, "top_k"),
    "timeout not a number": ({"modality": "text", "input": "x", "timeout_s": "soon"},
                             "timeout_s"),
    "timeout huge": ({"modality": "text", "input": "x", "timeout_s": 1e300}, "timeout_s"),
    "timeout over the limit": ({"modality": "text", "input": "x", "timeout_s": 3601},
                               "timeout_s"),
    "timeout too large for a float": ({"modality": "text", "input": "x", "timeout_s": 2**1100},
                                      "timeout_s"),
    "timeout nan": ({"modality": "text", "input": "x", "timeout_s": float("nan")},
                    "timeout_s"),
    "timeout negative": ({"modality": "text", "input": "x", "timeout_s": -1}, "timeout_s"),
    "deadline a string": ({"modality": "text", "input": "x", "deadline": "tomorrow"},
                          "deadline"),
    "deadline a number": ({"modality": "text", "input": "x", "deadline": 1e9}, "deadline"),
    "too many labels": ({**CLASSIFY, "labels": [f"l{i}" for i in range(9)]}, "labels"),
    "10,000 labels": ({**CLASSIFY, "labels": [f"l{i}" for i in range(10_000)]}, "labels"),
    "label too long": ({**CLASSIFY, "labels": ["a", "x" * 21]}, "label"),
    "label with NUL": ({**CLASSIFY, "labels": ["a", "b\x00"]}, "label"),
    "label a lone surrogate": ({**CLASSIFY, "labels": ["a", "\udc00"]}, "label"),
    "labels equal after NFC": ({**CLASSIFY, "labels": ["caf\u00e9", "cafe\u0301"]},
                               "distinct"),
    "text a lone surrogate": ({"modality": "text", "input": "\ud800"}, "Unicode"),
    "transcribe a text": ({"modality": "text", "input": "x", "task": "transcribe"},
                          "transcribe is for audio"),
    "unknown task": ({"modality": "text", "input": "x", "task": "translate"}, "task must"),
    "audio claiming 2 GHz": ({"modality": "audio", "input": wav_claiming(2_000_000_000)},
                             "sample rate"),
    "audio claiming 1 kHz": ({"modality": "audio", "input": wav_claiming(1000)},
                             "sample rate"),
    "model_version with NUL": ({"modality": "text", "input": "x", "model_version": "a\x00"},
                               "model_version"),
    "model_version with ESC": ({"modality": "text", "input": "x", "model_version": "a\x1b"},
                               "model_version"),
    "model_version a lone surrogate": ({"modality": "text", "input": "x",
                                        "model_version": "\ud800"}, "model_version"),
    "item None": (None, "must be a dict"),
    # A misspelt key was dropped without a word: no deadline, no labels.
    "unknown key timeout": ({"modality": "text", "input": "x", "timeout": 5},
                            "unknown item key.*'timeout' \\(did you mean 'timeout_s'"),
    "unknown key label": ({"modality": "text", "input": "x", "task": "classify",
                          "labels": ["a"], "label": "a"}, "unknown item key.*'label'"),
    "item a string": ("a sentence", "must be a dict"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_item_is_invalid_input_and_nothing_is_written(client, case):
    item, word = BAD[case]
    before = _jobs(client)
    ok = {"modality": "text", "input": "fine"}
    with pytest.raises(InvalidInput, match=word) as e:
        client.submit_many([ok, item])
    assert e.value.index == 1 and e.value.kind == InvalidInput.INVALID
    assert _jobs(client) == before


def test_images_cut_short_or_over_the_pixel_limit_are_refused(client):
    before = _jobs(client)
    cases = [(data, InvalidInput.UNSUPPORTED) for data in cut_images().values()]
    cases.append((big_png(), InvalidInput.TOO_LARGE))
    for data, kind in cases:
        with pytest.raises(InvalidInput) as e:
            client.submit_many([{"modality": "text", "input": "fine"},
                                {"modality": "image", "input": data}])
        assert e.value.index == 1 and e.value.kind == kind, e.value
    assert _jobs(client) == before


def test_undecodable_audio_is_refused_with_a_readable_reason(client):
    """The reason held soundfile's "Error opening <_io.BytesIO object at 0x...>"."""
    with pytest.raises(InvalidInput) as e:
        client.submit_many([{"modality": "audio", "input": b"OggS" + b"\0" * 60}])
    assert e.value.kind == InvalidInput.UNSUPPORTED
    assert "object at 0x" not in str(e.value) and "expected WAV" in str(e.value), e.value


def test_a_wav_cut_short_is_refused_and_nothing_is_written(client):
    """libsndfile decoded the part of the upload that arrived: a job was queued."""
    before = _jobs(client)
    with pytest.raises(InvalidInput, match="declares 0.10 s .* holds 0.06 s: it was cut short") \
            as e:
        client.submit_many([{"modality": "text", "input": "fine"},
                            {"modality": "audio", "input": wav_claiming(16000)[:4000]}])
    assert e.value.index == 1 and e.value.kind == InvalidInput.UNSUPPORTED
    assert _jobs(client) == before


@pytest.mark.parametrize("items", ["a sentence", {"modality": "text", "input": "x"}, [], None])
def test_items_that_are_not_a_list_of_dicts_are_invalid_input(client, items):
    """They raised AttributeError (chaos run, scenario 8)."""
    before = _jobs(client)
    with pytest.raises(InvalidInput):
        client.submit_many(items)
    assert _jobs(client) == before


def test_good_bounds_and_deadlines_are_accepted(client):
    now = datetime.now(UTC)
    ids = client.submit_many([
        {**CLASSIFY, "labels": [f"l{i}" for i in range(8)], "top_k": 50},
        {**CLASSIFY, "labels": ["x" * 20]},
        {"modality": "text", "input": "x", "timeout_s": 3600},
        {"modality": "text", "input": "x", "deadline": now + timedelta(minutes=5)},
        {"modality": "text", "input": "x",  # naive datetimes are UTC
         "deadline": (now + timedelta(minutes=5)).replace(tzinfo=None)},
        {"modality": "audio", "input": wav_claiming(8000)},
    ])
    jobs = [client.get(i) for i in ids]
    assert jobs[0]["params"]["top_k"] == 50
    for j in jobs[3:5]:
        got = datetime.fromisoformat(j["deadline"])
        got = got if got.tzinfo else got.replace(tzinfo=UTC)
        assert abs((got - (now + timedelta(minutes=5))).total_seconds()) < 1


@pytest.mark.parametrize("name,value", [
    ("created_since", datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))),
    ("created_until", datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
    ("created_until", datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-2))))])
def test_search_dates_out_of_range_are_invalid_input(client, name, value):
    """A date that has no UTC instant (year 1 at +14:00) raised OverflowError from the
    conversion to UTC: a 500 at POST /v1/search."""
    with pytest.raises(InvalidInput, match=name):
        client.search("a", **{name: value})


def _in_time(fn, seconds: float = 10):
    """fn() in a thread -> what it raised (None: it returned); fails if it never ends."""
    out: list = []

    def run():
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still running after {seconds} s"
    return out[0]


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1])
def test_wait_timeout_must_be_finite_and_not_negative(client, timeout):
    """wait(timeout=nan) never returned: time.monotonic() > nan is never true."""
    job = client.submit_text("waits")
    e = _in_time(lambda: client.wait([job], timeout=timeout, poll=0.01))
    assert isinstance(e, InvalidInput) and "timeout" in str(e), e


def test_cli_wait_timeout_must_be_finite(client, monkeypatch, capsys):
    from producer import cli

    monkeypatch.setenv("MMQ_DATABASE_URL", client.settings.database_url)
    monkeypatch.setenv("MMQ_BROKER_URL", DOWN_BROKER)
    get_settings.cache_clear()
    try:
        job = client.submit_text("waits")
        out: list[int] = []
        assert _in_time(lambda: out.append(cli.main(["wait", job, "--timeout", "nan"]))) is None
        assert out == [2] and "invalid_input" in capsys.readouterr().err
        before = _jobs(client)  # refused before anything is submitted
        assert cli.main(["submit", "text", "hello", "--wait", "nan"]) == 2
        assert "invalid_input" in capsys.readouterr().err
        assert _jobs(client) == before
    finally:
        get_settings.cache_clear()
