"""Labelled data built locally from real sources, for fine-tuned versions (bench/
finetune.py: the digits and keywords as `mmq train` versions), the speech benchmarks
and tests.

- Images: the 1,797 handwritten digits shipped inside scikit-learn (8x8, 16 grey
  levels), upscaled.
- Audio: spoken words synthesised with espeak-ng (Debian package) across English
  accents, voice variants, speeds and pitches. Evaluation holds out whole voice
  variants, so a model is scored on voices it never heard.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


def split_indices(labels: torch.Tensor, held_out: float, seed: int, *,
                  at_least_one: bool = False) -> tuple[list[int], list[int]]:
    """Stratified split: the same fraction of every class is held out (``at_least_one``:
    one item of every class of two or more, however small the fraction: a class of two
    at 20% rounds to none, which left `mmq train` with no held-out item to report)."""
    rng = random.Random(seed)
    train, test = [], []
    for c in sorted(set(labels.tolist())):
        idx = [i for i, y in enumerate(labels.tolist()) if y == c]
        rng.shuffle(idx)
        k = round(len(idx) * held_out)
        if at_least_one and held_out > 0 and len(idx) >= 2:
            k = min(len(idx) - 1, max(1, k))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


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
