"""Segment timestamps (core/model/whisper/timestamps.py) on espeak-ng speech: three
sentences apart by 1.5 s of silence become three segments timed like faster-whisper's
own timestamped decoding, and their texts joined are the job's transcript."""

from __future__ import annotations

import pytest
import torch
from faster_whisper import WhisperModel

from core.model.speech import SpeechJobs
from core.model.whisper.tower import SpeechTower
from core.model.whisper.weights import bundled_dir
from tests.helpers import speak

SENTENCES = ["the weather will be rainy tomorrow", "please turn off the lights in the kitchen",
             "the train to london leaves at seven"]
GAP_S = 1.5
VOICE = "en-gb-x-rp+m2"  # in neither of bench/speech.py's voice lists


@pytest.fixture(scope="module")
def clip():
    """-> (16 kHz waveform, each sentence's (start s, end s))."""
    parts, spans, at = [], [], 0
    gap = torch.zeros(int(GAP_S * 16_000))
    for s in SENTENCES:
        w = torch.from_numpy(speak(s, VOICE))
        parts += [w, gap]
        spans.append((at / 16_000, (at + len(w)) / 16_000))
        at += len(w) + len(gap)
    return torch.cat(parts[:-1]), spans


@pytest.fixture(scope="module")
def run(clip):
    tower = SpeechTower.from_bundled(device="cpu")
    jobs = SpeechJobs(load=lambda: tower, precision=tower.precision)
    silence = torch.zeros(16_000)
    return jobs.run([jobs.prepare_one(clip[0]), jobs.prepare_one(silence)], [None, None])


def test_each_sentence_is_a_segment_inside_its_own_speech(run, clip):
    _, spans = clip
    segs = run.segments[0]
    assert len(segs) == len(SENTENCES), segs
    for (start, end, text), (a, b) in zip(segs, spans, strict=True):
        assert start < end and text.strip()
        # Real timestamps, not the 30 s window's bounds: each segment starts within
        # half a second of its sentence and ends before the next one starts.
        assert abs(start - a) <= 0.5 and b - 0.5 <= end <= b + GAP_S / 2, (segs, spans)
    assert all(segs[i][1] <= segs[i + 1][0] for i in range(len(segs) - 1))


def test_segments_join_into_the_transcript(run):
    assert "".join(t for *_, t in run.segments[0]).strip() == run.texts[0]
    assert run.texts[1] == "" and run.segments[1] == []  # silence: no segment at all


def test_segment_times_agree_with_faster_whispers_timestamps(run, clip):
    ref = WhisperModel(str(bundled_dir()), device="cpu", compute_type="float32")
    segs, _ = ref.transcribe(clip[0].numpy(), beam_size=5, temperature=0.0,
                             condition_on_previous_text=False)
    theirs = [(s.start, s.end) for s in segs]
    ours = [(a, b) for a, b, _ in run.segments[0]]
    assert len(ours) == len(theirs), (ours, theirs)
    for (a, b), (c, d) in zip(ours, theirs, strict=True):
        assert abs(a - c) <= 0.3 and abs(b - d) <= 0.3, (ours, theirs)
