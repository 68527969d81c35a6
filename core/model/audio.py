"""The audio front end: WAV/FLAC/OGG bytes or (waveform, rate) in, log-mel patches out.

Clip length sets the token count (one token per ``frames_per_patch`` mel frames),
so audio batches are ragged and go through the packed attention core as text does.
"""

from __future__ import annotations

import torch
import torchaudio

from core.inputs import AudioConfig, read_audio


def decode_audio(data: object, cfg: AudioConfig, index: int | None = None) -> torch.Tensor:
    """Audio bytes or (waveform, sample_rate) -> mono float32 (samples,) at cfg.sample_rate."""
    wave, rate = read_audio(data, cfg, index)  # checked, torch-free (core/inputs.py)
    x = torch.from_numpy(wave)
    if rate != cfg.sample_rate:
        x = torchaudio.functional.resample(x, rate, cfg.sample_rate)
    return x


class LogMel:
    """Waveform -> per-clip normalised log-mel frames (T, n_mels)."""

    def __init__(self, cfg: AudioConfig):
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=cfg.n_mels)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        m = torch.log(self.mel(wave) + 1e-6).T  # (T, n_mels)
        # Per-clip mean/variance normalisation: loudness and channel colour vary by
        # recording far more than by word; silence stays finite (std floor).
        return (m - m.mean()) / m.std(unbiased=False).clamp_min(0.5)


def frames_to_patches(frames: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """(T, n_mels) -> (ceil(T / k), k * n_mels): k consecutive frames per token."""
    T, M = frames.shape
    k = cfg.frames_per_patch
    pad = (-T) % k
    if pad:  # a partial last patch is padded with the clip's quietest frame value
        frames = torch.cat([frames, frames.new_full((pad, M), float(frames.min()))])
    return frames.reshape(-1, k * M)
