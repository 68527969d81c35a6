"""Waveform -> log-mel frames, exactly as faster-whisper's ``FeatureExtractor`` computes them.

What matters for identical transcripts (faster_whisper/feature_extractor.py, transcribe.py):

- the waveform gets 160 zero samples appended, then a centred STFT (reflect padding of
  n_fft/2), a periodic Hann window of 400, hop 160; the last STFT frame is dropped;
- power spectrum -> 80 Slaney mel bands -> log10 (floor 1e-10) -> floored at the clip's
  *global* maximum minus 8 -> (x + 4) / 4. The maximum is over the whole clip, not per
  30 s window, so long clips are featurised whole and then cut;
- ``transcribe`` then keeps ``n_samples // 160`` frames ("content frames") and pads each
  30 s window's mel with **zeros in the log-mel domain** (``pad_or_trim``), which is not
  what OpenAI's Whisper or transformers do (they pad the waveform with silence, which
  lands at the max-8 floor): that difference changed 28 of 60 transcripts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FrontEndConfig:
    sample_rate: int = 16_000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 80
    window_frames: int = 3000  # 30 s: the window Whisper was trained on


def mel_filters(cfg: FrontEndConfig) -> np.ndarray:
    """(n_mels, n_fft//2 + 1) Slaney-scale, Slaney-normalised triangular filters (as librosa
    ``mel(htk=False, norm="slaney")``, the bank Whisper's own assets hold), computed in
    float64 and stored float32 as faster-whisper does."""
    sr, n_fft, n_mels = cfg.sample_rate, cfg.n_fft, cfg.n_mels
    fft_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    # Slaney mel: linear below 1 kHz (200/3 Hz per mel), logarithmic above (6.4x per 27 mel).
    f_sp, lin_hz = 200.0 / 3, 1000.0
    lin_mel, logstep = lin_hz / f_sp, np.log(6.4) / 27.0
    top_mel = lin_mel + np.log(sr / 2 / lin_hz) / logstep  # Nyquist, in mel
    mels = np.linspace(0.0, top_mel, n_mels + 2)
    hz = np.where(mels < lin_mel, f_sp * mels, lin_hz * np.exp(logstep * (mels - lin_mel)))
    width = np.diff(hz)  # (n_mels + 1,)
    ramps = hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_freq)
    rise = -ramps[:-2] / width[:-1, None]
    fall = ramps[2:] / width[1:, None]
    w = np.maximum(0.0, np.minimum(rise, fall))
    w *= (2.0 / (hz[2:n_mels + 2] - hz[:n_mels]))[:, None]  # equal area per band
    return w.astype(np.float32)


class LogMelFrontEnd:
    """Mono 16 kHz float waveform (samples,) -> (n_mels, n_samples // hop) log-mel frames."""

    def __init__(self, cfg: FrontEndConfig | None = None):
        self.cfg = cfg or FrontEndConfig()
        self.filters = torch.from_numpy(mel_filters(self.cfg))  # (n_mels, n_freq)
        # np.hanning(n + 1)[:-1]: the periodic Hann window, float32 like faster-whisper's.
        self.window = torch.from_numpy(np.hanning(self.cfg.n_fft + 1)[:-1].astype(np.float32))

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = wave.detach().to("cpu", torch.float32).reshape(-1)
        n = x.shape[0]
        x = torch.cat([x, x.new_zeros(cfg.hop)])  # faster-whisper's padding=160
        half = cfg.n_fft // 2
        if x.shape[0] <= half:  # reflect padding needs more samples than the pad width
            x = torch.cat([x, x.new_zeros(half + 1 - x.shape[0])])
        x = torch.nn.functional.pad(x[None, None], (half, half), mode="reflect")[0, 0]
        frames = x.unfold(0, cfg.n_fft, cfg.hop) * self.window  # (n_frames, n_fft) float32
        # numpy's rfft computes in float64 and faster-whisper casts to complex64: do the same.
        spec = torch.fft.rfft(frames.double(), dim=-1).to(torch.complex64)
        power = spec[:-1].abs() ** 2  # (n_frames - 1, n_freq), last frame dropped
        mel = self.filters @ power.T  # (n_mels, n_frames - 1)
        log = torch.log10(mel.clamp_min(1e-10))
        log = torch.maximum(log, log.max() - 8.0)
        log = (log + 4.0) / 4.0
        return log[:, :n // cfg.hop].contiguous()  # content frames only

    def pad_window(self, mel: torch.Tensor) -> torch.Tensor:
        """(n_mels, T <= 3000) -> (n_mels, 3000), zero-padded as faster-whisper's pad_or_trim."""
        T = mel.shape[1]
        return torch.nn.functional.pad(mel, (0, self.cfg.window_frames - T))
