"""The audio front end: WAV/FLAC/OGG bytes or (waveform, rate) in, a mono waveform at
the model's sample rate out (the speech tower's ``prepare`` starts from it)."""

from __future__ import annotations

import torch
import torchaudio

from core.inputs import AudioConfig, read_audio


def decode_audio(data: object, cfg: AudioConfig, index: int | None = None) -> torch.Tensor:
    """Audio bytes or (waveform, sample_rate) -> mono float32 (samples,) at cfg.sample_rate."""
    wave, rate = read_audio(data, cfg, index)  # checked, torch-free (core/audio_input.py)
    x = torch.from_numpy(wave)
    if rate != cfg.sample_rate:
        x = torchaudio.functional.resample(x, rate, cfg.sample_rate)
    return x
