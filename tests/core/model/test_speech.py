"""Whisper tiny.en on the packed core against faster-whisper / CTranslate2 (the reference),
on espeak-ng speech: features, encoder states, greedy and beam transcripts, label scores."""

from __future__ import annotations

import io
import subprocess

import ctranslate2
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from faster_whisper import WhisperModel
from faster_whisper.feature_extractor import FeatureExtractor

from core.errors import InvalidInput
from core.model.whisper.frontend import LogMelFrontEnd
from core.model.whisper.tower import SpeechItem, SpeechTower
from core.model.whisper.weights import bundled_dir

SENTENCES = ["the weather will be rainy tomorrow", "please turn off the lights in the kitchen",
             "the train to london leaves at seven", "add salt and pepper to the soup"]
VOICE = "en-gb-x-rp+m2"  # in neither of bench/speech.py's voice lists
KEYWORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def speak(text: str, voice: str) -> torch.Tensor:
    """espeak-ng speech, 16 kHz mono float32."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True,
                         capture_output=True).stdout
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return torchaudio.functional.resample(torch.from_numpy(x), rate, 16_000)


@pytest.fixture(scope="module")
def tower():
    return SpeechTower.from_bundled(device="cpu")


@pytest.fixture(scope="module")
def waves():
    return [speak(t, VOICE) for t in SENTENCES]


@pytest.fixture(scope="module")
def reference():
    return WhisperModel(str(bundled_dir()), device="cpu", compute_type="float32")


def _fw(model: WhisperModel, wave: torch.Tensor, beam: int) -> str:
    # faster-whisper's decoding without timestamps or previous text; temperature 0 only
    # (its fallback to sampling at 0.2+ is random, nothing to compare against).
    segs, _ = model.transcribe(wave.numpy(), beam_size=beam, without_timestamps=True,
                               temperature=0.0, condition_on_previous_text=False)
    return "".join(s.text for s in segs).strip()


def test_front_end_matches_faster_whisper(waves):
    w = waves[0].numpy()
    ref = FeatureExtractor()(w)[:, : w.shape[0] // 160]  # transcribe's content frames
    ours = LogMelFrontEnd()(waves[0]).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_encoder_matches_ctranslate2(tower, waves, monkeypatch):
    import core.model.whisper.model as whisper_model

    mel = tower.front.pad_window(tower.prepare(waves[1]).mel)  # (80, 3000)
    ct = ctranslate2.models.Whisper(str(bundled_dir()), device="cpu", compute_type="float32")
    ref = np.array(ct.encode(ctranslate2.StorageView.from_array(mel[None].numpy().copy())))
    enc = tower.model.encoder
    was = enc.mm_dtype, enc.attn_dtype
    low = {}
    try:
        with torch.inference_mode():
            enc.set_matmul_dtype(None)  # fp32 throughout: CTranslate2's fp32 to 1e-3
            ours, plan = enc([mel])
            enc.set_matmul_dtype(torch.bfloat16)  # SpeechConfig(precision="bf16")
            # Both bf16 attention paths, whatever this CPU: the explicit one (no AMX)
            # and bf16 SDPA (AMX).
            for amx in (False, True):
                monkeypatch.setattr(whisper_model, "amx_bf16", lambda amx=amx: amx)
                low[amx], _ = enc([mel])
    finally:
        enc.set_matmul_dtype(*was)
    assert plan.lengths == [1500]
    diff = (ours - torch.from_numpy(ref[0])).abs()
    assert diff.max() < 1e-3
    for amx, states in low.items():
        d = (states - torch.from_numpy(ref[0])).abs()
        assert d.mean() < 0.03 and d.max() < 1.0, (amx, d.mean(), d.max())


def test_ragged_clips_packed_equal_each_alone(tower, waves):
    # The encoder packs clips by their real frames (used without the 30 s padding): a
    # clip's states must not depend on the others in its batch.
    mels = [tower.prepare(w).mel for w in waves[:2]]
    mels = [mels[0][:, :151], mels[1][:, :120]]  # odd and even frame counts
    # fp32: a batch of one clip is "equal-length windows" (bf16 there when the CPU has
    # it), ragged ones take the packed core in the model's dtype.
    enc = tower.model.encoder
    was = enc.mm_dtype, enc.attn_dtype
    try:
        enc.set_matmul_dtype(None)
        with torch.inference_mode():
            both, plan = enc(mels)
            alone = [enc([m])[0] for m in mels]
    finally:
        enc.set_matmul_dtype(*was)
    assert plan.lengths == [76, 60]
    assert torch.allclose(both, torch.cat(alone), atol=1e-4)


def test_greedy_transcripts_equal_faster_whisper(tower, waves, reference):
    items = [tower.prepare(w) for w in waves]
    assert tower.transcribe(items, beam_size=1) == [_fw(reference, w, 1) for w in waves]


def test_beam_search_equals_faster_whisper(tower, waves, reference):
    items = [tower.prepare(w) for w in waves[:2]]
    ours = tower.transcribe(items, beam_size=5)
    assert ours == [_fw(reference, w, 5) for w in waves[:2]]
    assert "kitchen" in ours[1].lower()


def test_label_scoring_picks_the_keyword(tower):
    words = ["seven", "yes", "left", "stop"]
    items = [tower.prepare(speak(w, VOICE)) for w in words]
    scores = tower.label_scores(items, KEYWORDS)
    assert scores.shape == (4, 20)
    assert [KEYWORDS[i] for i in scores.argmax(1).tolist()] == words


def test_long_clip_is_cut_into_30s_windows():
    item = SpeechItem(torch.zeros(80, 6500), 65.0)
    assert item.windows == [(0, 3000), (3000, 3000), (6000, 500)]
    assert item.cost == 3 * 1500


def _wav(wave: np.ndarray, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [b"", b"RIFF\x00\x00not a wave file", torch.zeros(0),
                                 torch.tensor([0.0, float("nan")]), torch.zeros(2, 100),
                                 "a string"])
def test_bad_input_is_invalid_input(tower, bad):
    with pytest.raises(InvalidInput):
        tower.prepare(bad)


def test_too_long_is_refused(tower):
    with pytest.raises(InvalidInput) as e:
        tower.prepare(torch.zeros(301 * 16_000))
    assert e.value.kind == InvalidInput.TOO_LARGE


def test_bytes_and_other_rates_are_read(tower, waves):
    data = _wav(waves[3].numpy()[::2].copy(), rate=8_000)  # 8 kHz WAV, resampled to 16 kHz
    item = tower.prepare(data)
    assert abs(item.seconds - waves[3].numel() / 16_000) < 0.01


def test_clip_over_30s_is_transcribed_window_by_window(tower, waves, reference):
    # sentence, 29 s of silence, sentence: the second lands in the second window.
    wave = torch.cat([waves[2], torch.zeros(29 * 16_000), waves[3]])
    item = tower.prepare(wave)
    assert len(item.windows) == 2
    segments = tower.transcribe_segments([item], beam_size=1)[0]
    assert [s.start for s in segments] == [0.0, 30.0]
    assert tower.transcribe([item], beam_size=1) == [_fw(reference, wave, 1)]
