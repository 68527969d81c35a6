"""The model's API for image and audio items on the real towers (the ImageNet image
tower, the Whisper speech tower): all three modalities in one space, and a bad item
fails alone with a reason while its neighbours are prepared."""

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from core.errors import InvalidInput
from core.jobs import MODALITIES


def png(color=(200, 30, 30), size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png() -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float, rate=16000, freq=440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * freq * t), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_the_model_always_has_all_three_modalities(model):
    assert model.modalities == MODALITIES == ("text", "image", "audio")
    text, rest = model.version.split("+image@")
    image, speech = rest.split("+speech@")
    assert text.startswith("all-MiniLM-L6-v2@") and image.startswith("efficientnet-lite0@")
    assert speech and "towers" not in model.version


def test_every_modality_embeds_into_one_space(model):
    t = model.embed("text", ["red"])
    i = model.embed("image", [png(), Image.new("L", (9, 9), 128)])
    a = model.embed("audio", [wav(0.3), (np.zeros(8000, np.float32), 8000)])
    assert t.shape == (1, 384) and i.shape == (2, 384) and a.shape == (2, 384)
    res = model.embed_items("audio", [wav(0.3), wav(2.0)])
    assert res[1].tokens > res[0].tokens  # clip length sets the batch cost
    assert len(model.classify("image", [png()], labels=["red", "blue"], top_k=2)[0]) == 2


@pytest.mark.parametrize("modality, bad, reason", [
    ("image", b"not an image at all", "not an image"),
    ("image", noise_png()[:1500], "could not be decoded"),  # truncated file
    ("image", noise_png()[:-12], "could not be decoded"),  # no IEND: was classified
    ("audio", b"", "empty"),
    ("audio", wav(0.0), "zero length"),
    ("audio", wav(301.0), "over the limit"),  # the speech tower takes 5 minutes
    ("audio", b"OggS" + b"\0" * 60, "not a readable audio file"),
])
def test_bad_items_fail_alone(model, modality, bad, reason):
    good = png() if modality == "image" else wav(0.5)
    prepared = model.prepare_many(modality, [good, bad, good])
    assert isinstance(prepared[1], InvalidInput) and reason in str(prepared[1])
    assert not isinstance(prepared[0], InvalidInput) and not isinstance(prepared[2], InvalidInput)
    with pytest.raises(InvalidInput, match=reason):
        model.prepare(modality, bad, index=7)
