"""The committed default towers: held-out accuracy, retrieval, and the training command.

The weights in core/model/weights were produced by `mmq train-default`; these tests
re-measure them through the public API on data they were not trained on.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.model.files import sha256_file
from core.model.towers import WEIGHTS_DIR
from core.training import datasets as ds
from core.training.train import digit_png

needs_espeak = pytest.mark.skipif(not ds.espeak_available(),
                                  reason="espeak-ng is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def digits_model():
    """The digits image tower, by name: the default image tower is the ImageNet one."""
    from core.config import Settings
    from core.model.multimodal import MultimodalModel

    return MultimodalModel.load(device="cpu", settings=Settings(image_tower="digits"))


@pytest.fixture(scope="module")
def meta():
    return json.loads((WEIGHTS_DIR / "towers.json").read_text())["meta"]


def test_weights_are_small_and_match_their_sha256():
    size = (WEIGHTS_DIR / "towers.safetensors").stat().st_size
    assert size <= 20 * 1024 * 1024
    want = (WEIGHTS_DIR / "towers.sha256").read_text().split()[0]
    assert sha256_file(WEIGHTS_DIR / "towers.safetensors") == want


def test_default_model_has_all_modalities(model):
    assert model.modalities == ("text", "image", "audio")
    assert "+towers@" in model.version


def test_held_out_digit_images(digits_model, meta):
    model = digits_model
    x, y = ds.digits(32)
    _, test = ds.split_indices(y, 0.3, meta["train_config"]["seed"])
    pngs = [digit_png(x[i]) for i in test]
    preds = model.classify("image", pngs, labels=ds.DIGIT_WORDS, top_k=1)
    acc = sum(p[0][0] == ds.DIGIT_WORDS[y[i]] for p, i in zip(preds, test, strict=True)) / len(test)
    print(f"held-out digit images: zero-shot top-1 {acc:.3f} on {len(test)}")
    assert acc >= 0.90


def test_text_seven_retrieves_sevens_first(digits_model, meta):
    model = digits_model
    x, y = ds.digits(32)
    _, test = ds.split_indices(y, 0.3, meta["train_config"]["seed"])
    images = model.embed("image", [digit_png(x[i]) for i in test])
    query = model.embed("text", ["seven"])[0]
    top = (images @ query).topk(10).indices
    assert all(int(y[test[int(i)]]) == 7 for i in top)


@needs_espeak
def test_held_out_voices(model):
    clips = ds.speech_clips(ds.HELD_OUT_VARIANTS, 1, seed=123)
    preds = model.classify("audio", [c.wav for c in clips], labels=ds.AUDIO_WORDS, top_k=1)
    hits = [p[0][0] == ds.AUDIO_WORDS[c.word] for p, c in zip(preds, clips, strict=True)]
    acc = sum(hits) / len(clips)
    print(f"held-out voices: zero-shot top-1 {acc:.3f} on {len(clips)} clips")
    assert acc >= 0.90


@needs_espeak
def test_tiny_retrain_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "towers"
    r = subprocess.run([str(Path(sys.executable).parent / "mmq"), "train-default", "--tiny",
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert {"image_eval", "audio_eval", "sha256"} <= report.keys()
    assert (out / "towers.sha256").read_text().split()[0] == report["sha256"]
    from core.config import Settings
    from core.model.multimodal import MultimodalModel

    m = MultimodalModel.load(device="cpu", settings=Settings(towers_path=str(out),
                                                             image_tower="digits"))
    assert m.embed("image", [digit_png(torch.ones(3, 32, 32))]).shape == (1, 384)
