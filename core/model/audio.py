"""The audio front end: WAV/FLAC/OGG bytes or (waveform, rate) in, log-mel patches out.

Clip length sets the token count (one token per ``frames_per_patch`` mel frames),
so audio batches are ragged and go through the packed attention core as text does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio

from core.errors import InvalidInput, check_payload_size


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16_000
    n_fft: int = 400  # 25 ms windows
    hop: int = 160  # 10 ms between frames
    n_mels: int = 64
    frames_per_patch: int = 4  # 40 ms per token: 1 s of audio = 25 tokens
    max_seconds: float = 30.0  # longer clips are refused (750 tokens at the default)
    max_bytes: int = 50 * 1024 * 1024
    # Sample rates accepted (Hz): telephone speech to studio masters. A header can
    # claim anything: 2 GHz passed the duration check (few samples per "second")
    # and then failed in the worker's resampler with a raw torch error.
    min_sample_rate: int = 8_000
    max_sample_rate: int = 192_000

    @property
    def patch_dim(self) -> int:
        return self.n_mels * self.frames_per_patch

    @property
    def max_patches(self) -> int:
        frames = int(self.max_seconds * self.sample_rate) // self.hop + 1
        return -(-frames // self.frames_per_patch)


def decode_audio(data: object, cfg: AudioConfig, index: int | None = None) -> torch.Tensor:
    """Audio bytes or (waveform, sample_rate) -> mono float32 (samples,) at cfg.sample_rate."""
    if isinstance(data, tuple) and len(data) == 2:
        wave, rate = data
        try:
            wave = torch.as_tensor(np.asarray(wave), dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"waveform is not numeric: {e}", index=index) from None
        if wave.dim() == 2:  # (channels, samples) or (samples, channels): the short side
            wave = wave.mean(dim=0 if wave.shape[0] <= wave.shape[1] else 1)
        if wave.dim() != 1:
            raise InvalidInput(f"waveform must be 1-D or 2-D, got shape {tuple(wave.shape)}",
                               index=index)
        if not isinstance(rate, int | np.integer) or isinstance(rate, bool):
            raise InvalidInput(f"sample rate must be an integer, got {rate!r}", index=index)
        rate = _check_rate(int(rate), cfg, index)
    elif isinstance(data, bytes | bytearray | memoryview):
        wave, rate = _decode_bytes(bytes(data), cfg, index)
    else:
        raise InvalidInput(f"audio must be bytes or (waveform, sample_rate), got "
                           f"{type(data).__name__}", index=index)
    if wave.numel() == 0:
        raise InvalidInput("audio has no samples (zero length)", index=index)
    if wave.numel() / rate > cfg.max_seconds:
        raise InvalidInput(f"audio is {wave.numel() / rate:.1f} s long, over the limit of "
                           f"{cfg.max_seconds:g} s", index=index, kind=InvalidInput.TOO_LARGE)
    if not torch.isfinite(wave).all():
        raise InvalidInput("audio contains NaN or infinite samples", index=index)
    if rate != cfg.sample_rate:
        wave = torchaudio.functional.resample(wave, rate, cfg.sample_rate)
    return wave


def _decode_bytes(data: bytes, cfg: AudioConfig, index: int | None) -> tuple[torch.Tensor, int]:
    check_payload_size(data, cfg.max_bytes, "audio", index)
    try:
        info = sf.info(io.BytesIO(data))
        _check_rate(info.samplerate, cfg, index)
        # Refuse long clips from the header, before decoding them into memory.
        if info.frames / max(info.samplerate, 1) > cfg.max_seconds:
            raise InvalidInput(f"audio is {info.frames / info.samplerate:.1f} s long, over "
                               f"the limit of {cfg.max_seconds:g} s", index=index,
                               kind=InvalidInput.TOO_LARGE)
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except InvalidInput:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise InvalidInput(f"not a readable audio file (WAV, FLAC or OGG): {e}",
                           index=index, kind=InvalidInput.UNSUPPORTED) from None
    return torch.from_numpy(wave).mean(dim=1), int(rate)  # downmix (samples, ch) -> mono


def _check_rate(rate: int, cfg: AudioConfig, index: int | None) -> int:
    if not cfg.min_sample_rate <= rate <= cfg.max_sample_rate:
        raise InvalidInput(f"sample rate {rate} Hz is outside {cfg.min_sample_rate}.."
                           f"{cfg.max_sample_rate} Hz", index=index)
    return rate


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
