"""Audio front end: containers, sample formats, downmix, resampling, limits."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from core.errors import InvalidInput
from core.model.audio import AudioConfig, decode_audio

CFG = AudioConfig()


def tone(seconds=0.5, rate=22050, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def encode(x, rate, fmt, subtype=None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, subtype", [
    ("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"),
    ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"),
])
def test_containers_and_sample_formats(fmt, subtype):
    wave = decode_audio(encode(tone(), 22050, fmt, subtype), CFG)
    assert wave.dtype == torch.float32 and abs(wave.numel() - 8000) <= 400  # 0.5 s at 16 kHz
    assert 0.2 < wave.abs().max() < 0.7


# Every container docs/model.md lists (core.inputs.AUDIO_FORMATS_TEXT), each written here.
LISTED = [("WAV", "PCM_16", 22050), ("WAVEX", "PCM_24", 22050), ("FLAC", "PCM_16", 22050),
          ("OGG", "VORBIS", 22050), ("OGG", "OPUS", 48000), ("MP3", "MPEG_LAYER_III", 22050),
          ("AIFF", "PCM_16", 22050)]


def test_the_docs_list_the_audio_formats_that_are_accepted():
    """MP3 was accepted but not listed; AU, CAF, VOC, ... (anything libsndfile reads)
    were accepted too. The documented list and the accepted set are one list now."""
    from pathlib import Path

    from core.inputs import AUDIO_FORMATS, AUDIO_FORMATS_TEXT

    readme = (Path(__file__).parents[3] / "docs" / "model.md").read_text()
    assert f"- Audio: bytes ({AUDIO_FORMATS_TEXT};" in readme
    assert {f for f, _, _ in LISTED} == set(AUDIO_FORMATS)
    for name in ("WAV", "FLAC", "OGG", "Vorbis", "Opus", "MP3", "AIFF"):
        assert name in AUDIO_FORMATS_TEXT


@pytest.mark.parametrize("fmt, subtype, rate", LISTED)
def test_every_listed_audio_format_is_accepted(fmt, subtype, rate):
    wave = decode_audio(encode(tone(rate=rate), rate, fmt, subtype), CFG)
    assert abs(wave.numel() - 8000) <= 1200  # 0.5 s at 16 kHz (MP3 pads a frame)
    assert 0.2 < wave.abs().max() < 0.8


@pytest.mark.parametrize("fmt, subtype", [("AU", "PCM_16"), ("CAF", "PCM_16"),
                                          ("VOC", "PCM_16"), ("W64", "PCM_16"),
                                          ("NIST", "PCM_16"), ("PAF", "PCM_16")])
def test_audio_formats_not_listed_are_refused(fmt, subtype):
    with pytest.raises(InvalidInput, match=f"{fmt} audio is not accepted") as e:
        decode_audio(encode(tone(), 22050, fmt, subtype), CFG)
    assert e.value.kind == InvalidInput.UNSUPPORTED


def test_stereo_is_downmixed_and_arrays_are_accepted():
    stereo = decode_audio(encode(tone(channels=2), 22050, "WAV", "PCM_16"), CFG)
    mono = decode_audio((tone().astype(np.float32), 22050), CFG)
    assert stereo.shape == mono.shape and (stereo - mono).abs().max() < 1e-3
    two_d = decode_audio((np.stack([tone(), tone()]), 22050), CFG)  # (channels, samples)
    assert two_d.shape == mono.shape


def test_many_channels_are_downmixed_a_block_at_a_time():
    """An 8-channel 192 kHz FLAC of 60 s silence (a few KB) was decoded with every channel
    in memory at once (368 MB here; a review's 299 s file took an API process to 2.2 GB)
    before the downmix: now a block at a time, the mono result the largest allocation."""
    import tracemalloc

    from core.inputs import read_audio

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 192_000, 8, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((192_000, 8), np.float32)
        block[:, 3] = 0.8  # one loud channel: the downmix is the mean, 0.1
        for _ in range(60):
            f.write(block)
    tracemalloc.start()
    try:
        wave, rate = read_audio(buf.getvalue(), CFG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rate == 192_000 and wave.shape == (60 * 192_000,)
    assert abs(float(wave.mean()) - 0.1) < 1e-3
    assert peak < 2.5 * wave.nbytes, f"peak {peak / 2**20:.0f} MiB"  # mono: 44 MiB


@pytest.mark.parametrize("peak", [1e3, 1e20])
def test_samples_far_past_full_scale_are_refused(peak):
    """Float samples near 1e19 overflowed the log-mel's power to inf: the job succeeded
    with NaN label scores on SQLite and failed with a page of SQL on PostgreSQL."""
    loud = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * peak
    for data in (encode(loud, 16000, "WAV", "FLOAT"), (loud, 16000)):
        with pytest.raises(InvalidInput, match=r"expected within \[-1, 1\]"):
            decode_audio(data, CFG)
    decode_audio((np.clip(loud, -2, 2), 16000), CFG)  # a clipped master's overs: accepted


def test_silence_is_valid():
    wave = decode_audio((np.zeros(16000, np.float32), 16000), CFG)
    assert wave.shape == (16000,) and torch.isfinite(wave).all()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"RIFF....WAVEjunk", "not a readable audio file"),
    ("clip.wav", "must be bytes"),
    ((np.zeros(0, np.float32), 16000), "zero length"),
    ((np.zeros(100, np.float32), 0), "sample rate"),
    ((np.zeros(100, np.float32), 2_000_000_000), "sample rate"),  # resample would fail
    ((np.zeros(100, np.float32), 4000), "sample rate"),
    ((np.full(100, np.nan, np.float32), 16000), "NaN"),
])
def test_bad_inputs(data, reason):
    with pytest.raises(InvalidInput, match=reason):
        decode_audio(data, CFG)


def test_zero_length_wav_file():
    with pytest.raises(InvalidInput, match="zero length"):
        decode_audio(encode(np.zeros(0), 16000, "WAV", "PCM_16"), CFG)


def test_unsupported_codec():
    import subprocess
    import wave as wavmod

    buf = io.BytesIO()
    with wavmod.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    data = bytearray(buf.getvalue())
    data[20:22] = (0x55).to_bytes(2, "little")  # format tag 0x55 = MP3-in-WAV
    with pytest.raises(InvalidInput, match="not a readable audio file"):
        decode_audio(bytes(data), CFG)
    del subprocess


def test_duration_limit_from_the_header():
    short = AudioConfig(max_seconds=1.0)
    with pytest.raises(InvalidInput, match="over the limit of 1 s"):
        decode_audio(encode(tone(seconds=2.0), 8000, "WAV", "PCM_16"), short)

