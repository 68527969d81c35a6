"""Training data for the default towers, built locally from real sources.

- Images: the 1,797 handwritten digits shipped inside scikit-learn (8x8, 16 grey
  levels), upscaled.
- Audio: spoken words synthesised with espeak-ng (Debian package) across English
  accents, voice variants, speeds and pitches. Evaluation holds out whole voice
  variants, so the audio tower is scored on voices it never heard.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COMMAND_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
AUDIO_WORDS = DIGIT_WORDS + COMMAND_WORDS

ACCENTS = ["en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc"]
# Voice variants shipped with espeak-ng. The held-out ones are never trained on.
TRAIN_VARIANTS = ["m1", "m2", "m4", "m5", "m7", "m8", "f1", "f3", "f4", "croak", "klatt", "klatt2",
                  "klatt4", "Andy", "Denis", "Michael", "anika", "aunty", "boris", "edward",
                  "iven2", "kaukovalta", "linda", "steph", "zac", "adam", "Alex", "Annie",
                  "belinda", "benjamin", "caleb", "david", "john", "paul", "quincy", "norbert"]
HELD_OUT_VARIANTS = ["m3", "m6", "f2", "f5", "klatt3", "iven", "max", "robert"]


# -- images -------------------------------------------------------------------------

def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 3, size, size) dark ink on white in [0, 1], and (1797,) labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (B, 1, 8, 8) ink = 1
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (1.0 - x).expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target)


def split_indices(labels: torch.Tensor, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split: the same fraction of every class is held out."""
    rng = random.Random(seed)
    train, test = [], []
    for c in sorted(set(labels.tolist())):
        idx = [i for i, y in enumerate(labels.tolist()) if y == c]
        rng.shuffle(idx)
        k = round(len(idx) * held_out)
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def augment_images(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine (shift, scale, rotation, shear), polarity, contrast and noise."""
    B = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    ang = (u(B) - 0.5) * 0.5  # about +-14 degrees
    scale = 0.8 + 0.4 * u(B)
    shear = (u(B) - 0.5) * 0.3
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, (u(B) - 0.5) * 0.3], 1),
                         torch.stack([sin, cos, (u(B) - 0.5) * 0.3], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ink = F.grid_sample(1.0 - x, grid, align_corners=False, padding_mode="zeros")
    out = 1.0 - ink  # white paper outside the original frame
    flip = u(B) < 0.3  # light ink on dark, as MNIST-style images come
    out[flip] = 1.0 - out[flip]
    lo, hi = 0.25 * u(B, 1, 1, 1), 1.0 - 0.25 * u(B, 1, 1, 1)
    out = lo + (hi - lo) * out
    out = out + 0.05 * u(B, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return out.clamp(0.0, 1.0)


# -- audio --------------------------------------------------------------------------

@dataclass
class Clip:
    word: int  # index into AUDIO_WORDS
    voice: str  # accent+variant
    wav: bytes


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesise(word: str, voice: str, speed: int, pitch: int) -> bytes:
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    r = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "--stdout", word], capture_output=True, timeout=60, check=True)
    return r.stdout


def speech_clips(variants: list[str], per_voice: int, seed: int,
                 accents: list[str] = ACCENTS, words: list[str] = AUDIO_WORDS,
                 workers: int = 4) -> list[Clip]:
    """Every word by every accent x variant, ``per_voice`` times with random
    speed (words per minute) and pitch, synthesised in parallel."""
    rng = random.Random(seed)
    jobs = [(w, f"{a}+{v}", rng.randint(110, 240), rng.randint(15, 85))
            for a in accents for v in variants for w in range(len(words))
            for _ in range(per_voice)]
    with ThreadPoolExecutor(workers) as pool:
        wavs = list(pool.map(lambda j: synthesise(words[j[0]], j[1], j[2], j[3]), jobs))
    return [Clip(j[0], j[1], wav) for j, wav in zip(jobs, wavs, strict=True) if len(wav) > 100]


def augment_wave(wave: torch.Tensor, rate: int, gen: torch.Generator) -> torch.Tensor:
    """Gain, time shift (leading/trailing silence), speed and additive noise."""
    u = lambda: float(torch.rand((), generator=gen))  # noqa: E731
    if u() < 0.7:  # speed/pitch perturbation by resampling, +-12%
        factor = 0.88 + 0.24 * u()
        n = max(16, int(wave.numel() / factor))
        wave = F.interpolate(wave[None, None], size=n, mode="linear", align_corners=False)[0, 0]
    lead, trail = int(u() * 0.3 * rate), int(u() * 0.3 * rate)
    wave = torch.cat([wave.new_zeros(lead), wave, wave.new_zeros(trail)])
    wave = wave * (10 ** ((u() * 30 - 20) / 20))  # gain -20 dB .. +10 dB
    if u() < 0.8:
        rms = wave.pow(2).mean().sqrt().clamp_min(1e-4)
        snr_db = 5 + 30 * u()
        noise = torch.randn(wave.shape, generator=gen)
        if u() < 0.5:  # brown-ish noise: low-passed, like room rumble
            noise = torch.cumsum(noise, 0)
            noise = noise - noise.mean()
            noise = noise / noise.std().clamp_min(1e-6)
        wave = wave + noise * rms / (10 ** (snr_db / 20))
    return wave


def spec_augment(frames: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(T, n_mels) with up to two time masks and two frequency masks."""
    T, M = frames.shape
    out = frames.clone()
    for _ in range(2):
        w = int(torch.randint(0, max(1, T // 8) + 1, (), generator=gen))
        s = int(torch.randint(0, max(1, T - w) + 1, (), generator=gen))
        out[s:s + w] = 0.0
        f = int(torch.randint(0, M // 8 + 1, (), generator=gen))
        s = int(torch.randint(0, M - f + 1, (), generator=gen))
        out[:, s:s + f] = 0.0
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
