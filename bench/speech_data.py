"""Speech clips synthesised with espeak-ng for bench/speech.py (and the tests' small set).

Voices are split: ``TUNE_VOICES`` were the only ones looked at while choosing the label
scoring's surface forms and prior; ``EVAL_VOICES`` are what the tables report.
"""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio

SENTENCES = [
    "the weather will be rainy tomorrow",
    "please turn off the lights in the kitchen",
    "my brother plays football every saturday",
    "the train to london leaves at seven",
    "she bought three apples and a loaf of bread",
    "we should finish the report before friday",
    "the children are playing in the garden",
    "can you send me the address of the hotel",
    "the river is very cold in the winter",
    "he forgot his umbrella on the bus",
    "the meeting has been moved to next week",
    "i would like a cup of coffee with milk",
    "the museum opens at nine in the morning",
    "our team won the match by two goals",
    "the doctor told him to rest for a week",
    "there is a small cafe near the station",
    "they are painting the house blue",
    "the price of petrol went up again",
    "add salt and pepper to the soup",
    "the library is closed on sunday",
]
KEYWORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
TUNE_VOICES = ["en-us+m3", "en-gb+f2"]
EVAL_VOICES = ["en-us+m1", "en-gb+m4", "en-gb-scotland+m2", "en-gb-x-rp+f3",
               "en-029+m5", "en-us-nyc+f4"]


@dataclass
class Clip:
    text: str
    voice: str
    wave: torch.Tensor  # (samples,) float32 mono at 16 kHz

    @property
    def seconds(self) -> float:
        return self.wave.shape[0] / 16_000


def speak(text: str, voice: str, speed: int = 160) -> torch.Tensor:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         check=True, capture_output=True).stdout
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    x = torch.from_numpy(np.ascontiguousarray(x))
    return torchaudio.functional.resample(x, rate, 16_000)


def clips(texts: list[str], voices: list[str]) -> list[Clip]:
    return [Clip(t, v, speak(t, v)) for v in voices for t in texts]
